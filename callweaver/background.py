"""Work off the request path, in whichever concurrency the process runs: greenlets once gevent has patched the
standard library (production), threads otherwise (tests, CLI commands). Import-light (wsgi.py's loader uses it
before Flask is imported)."""
from __future__ import annotations

import contextvars
import threading
from typing import Any, Callable


class Task:
    """Work running off the request path: a greenlet under gevent (production), a daemon thread otherwise (tests,
    CLI commands). Callers see one surface (join, dead, kill) whichever it is."""

    def __init__(self, fn: Callable, *args: Any) -> None:
        from gevent import monkey
        context = contextvars.copy_context()  # keep call_sid/tracking_id bound in the new greenlet's log lines
        self._greenlet = self._thread = None
        if monkey.is_module_patched("socket"):
            import gevent
            self._greenlet = gevent.spawn(context.run, fn, *args)
        else:
            self._thread = threading.Thread(target=context.run, args=(fn, *args), daemon=True)
            self._thread.start()

    @property
    def dead(self) -> bool:
        return self._greenlet.dead if self._greenlet is not None else not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        (self._greenlet or self._thread).join(timeout=timeout)

    def kill(self, timeout: float | None = None) -> None:
        """Stop it now: a greenlet is killed; a thread cannot be interrupted from outside, so it is given up to
        `timeout` to finish the work it was already told to stop (cancellation here is cooperative)."""
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=timeout)
        else:
            self._thread.join(timeout=timeout)


def spawn(fn: Callable, *args: Any) -> Task:
    """Run `fn(*args)` off the request path."""
    return Task(fn, *args)


class SocketReader:
    """simple-websocket's `thread_class` (its documented option, via flask-sock's SOCK_SERVER_OPTIONS): each socket's
    reader loop. Under gevent a bare greenlet: a `threading.Thread` adds its start-up handshake (an Event, locks, a
    Greenlet, a name) to every live call, ~3.5 KiB of Python objects while the call is idle
    (bench/idle_call_memory.py); the reader needs none of it (nobody joins it; it ends when its socket closes).
    A daemon thread otherwise (tests, CLI)."""

    __slots__ = ("target", "name")

    def __init__(self, target: Callable[[], None]) -> None:
        self.target = target
        self.name = "websocket-reader"  # simple-websocket renames it

    def start(self) -> None:
        from gevent import monkey
        if monkey.is_module_patched("threading"):
            import gevent
            gevent.spawn_raw(self._run)
        else:
            threading.Thread(target=self._run, name=self.name, daemon=True).start()

    def _run(self) -> None:
        try:
            self.target()
        except Exception:  # a bare greenlet's error would reach the hub; a thread's would only be printed
            import structlog
            structlog.get_logger().exception("websocket_reader_failed")


class SocketEvent:
    """simple-websocket's `event_class` under gevent (its documented option, via SOCK_SERVER_OPTIONS): how the
    socket's handler waits for the next message (its reader sets it). gevent's Event waits through its link
    machinery and a Timeout object, several C frames deep; every idle call's request greenlet keeps that C stack
    saved while it waits (bench/idle_call_memory.py). This waits on one gevent Waiter and a timer, the documented
    low-level pair. One waiter at a time: simple-websocket's receive(), called by the socket's handler only."""

    __slots__ = ("_flag", "_waiter")  # one per live call

    def __init__(self) -> None:
        self._flag = False
        self._waiter = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None:  # woken from the hub, as a Waiter must be (the reader is another greenlet)
            import gevent
            gevent.get_hub().loop.run_callback(waiter.switch, True)

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        """True once set; False when `timeout` seconds pass first."""
        if self._flag:
            return True
        if timeout is not None and timeout <= 0:
            return False
        if self._waiter is not None:  # a second waiter would replace the first, which would then never wake
            raise RuntimeError("SocketEvent has one waiter at a time")
        import gevent
        from gevent.hub import Waiter
        waiter = self._waiter = Waiter()
        timer = None
        if timeout is not None:
            timer = gevent.get_hub().loop.timer(timeout)
            timer.start(waiter.switch, False)
        try:
            return waiter.get() or self._flag  # set() in the same loop turn as the timer: the message is there
        finally:
            if self._waiter is waiter:
                self._waiter = None
            if timer is not None:
                timer.close()


def socket_event_class() -> type:
    """SocketEvent once gevent has patched threading (production), else the standard threading.Event."""
    from gevent import monkey
    return SocketEvent if monkey.is_module_patched("threading") else threading.Event


class OsThreadWork:
    """CPU-bound work (imports, SDK clients) in a real OS thread, so the worker's gevent hub keeps answering while
    it runs: gevent's threadpool under gevent (waiters block cooperatively), a daemon thread otherwise.

    A greenlet would not do: an import in one greenlet holds the module's import lock, and another greenlet importing
    the same module blocks the whole hub on it (the first call's ring hung that way, tests/test_transport_limits.py)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        from gevent import monkey
        context = contextvars.copy_context()
        if monkey.is_module_patched("threading"):
            import gevent
            self._result = gevent.get_hub().threadpool.spawn(context.run, fn)
            self._thread = None
        else:
            self._result = None
            self._thread = threading.Thread(target=context.run, args=(fn,), daemon=True)
            self._thread.start()

    @property
    def done(self) -> bool:
        return self._result.ready() if self._result is not None else not self._thread.is_alive()

    def wait(self) -> None:
        """Until the work has finished (it logs its own failures, so this never raises)."""
        if self._result is not None:
            self._result.wait()
        else:
            self._thread.join()
