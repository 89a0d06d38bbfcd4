"""Work off the request path, in whichever concurrency the process runs: greenlets once gevent has patched the
standard library (production), threads otherwise (tests, CLI commands). Import-light (wsgi.py's loader uses it
before Flask is imported)."""
from __future__ import annotations

import contextvars
import threading
import time
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
        # (`is not None`: a greenlet that has finished is false, and a dead reply is joined when the socket closes)
        (self._greenlet if self._greenlet is not None else self._thread).join(timeout=timeout)

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
    reader loop (it reads frames, buffers the messages and sets the socket's event for each).

    Under gevent the loop gets no greenlet of its own when the socket's handler runs it: start() only schedules it
    for the hub's next turn, and the handler, which lives as long as the socket anyway (gunicorn's request
    greenlet), takes it over first with run_here_or_wait() (routes/relay.py). An idle call then holds one greenlet
    instead of two: a greenlet's frame-stack page (4 KiB), its saved C stack (~2.5 KiB) and the greenlet itself
    (docs/performance-history.md, "Issue 12x"). A socket whose handler does not take it over is read by a greenlet
    of its own, as before; without gevent (tests, CLI) by a daemon thread, started at once."""

    __slots__ = ("target", "name", "_runner")

    def __init__(self, target: Callable[[], None]) -> None:
        self.target = target
        self.name = "websocket-reader"  # simple-websocket renames it
        self._runner: Any = None  # None until started; then _TAKEN_OVER, or the greenlet or thread running it

    def start(self) -> None:
        from gevent import monkey
        if monkey.is_module_patched("threading"):
            import gevent
            self._runner = _SCHEDULED
            gevent.get_hub().loop.run_callback(self._start_unless_taken_over)
        else:
            self._runner = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._runner.start()

    def run_here_or_wait(self) -> None:
        """Run the loop in the calling greenlet unless it already runs elsewhere; return once the socket has
        closed either way."""
        if self._runner is _SCHEDULED:
            self._runner = _TAKEN_OVER
            self._run()
        elif self._runner is not None and self._runner is not _TAKEN_OVER:
            self._runner.join()

    def _start_unless_taken_over(self) -> None:
        if self._runner is _SCHEDULED:
            import gevent
            self._runner = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            self.target()
        except Exception:  # a greenlet's error would only reach the hub; a thread's would only be printed
            import structlog
            structlog.get_logger().exception("websocket_reader_failed")


_SCHEDULED, _TAKEN_OVER = object(), object()


class SocketEvent:
    """simple-websocket's `event_class` under gevent (its documented option, via SOCK_SERVER_OPTIONS): set by the
    socket's reader loop for each message it buffers. `on_set`, when given, is called on every set() (the relay
    handles messages as they arrive: routes/relay.py); wait() is for simple-websocket's receive(). gevent's Event
    waits through its link machinery and a Timeout object, several C frames deep, which a waiting greenlet keeps
    saved; this waits on one gevent Waiter and a timer, the documented low-level pair. One waiter at a time:
    simple-websocket's receive(), called by the socket's handler only."""

    __slots__ = ("_flag", "_waiter", "on_set")  # one per live call

    def __init__(self) -> None:
        self._flag = False
        self._waiter = None
        self.on_set: Callable[[], None] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None:  # woken from the hub, as a Waiter must be (the reader is another greenlet)
            import gevent
            gevent.get_hub().loop.run_callback(waiter.switch, True)
        if self.on_set is not None:
            self.on_set()

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


class ThreadSocketEvent(threading.Event):
    """The standard threading.Event with SocketEvent's `on_set` (without gevent: tests, CLI)."""

    on_set: Callable[[], None] | None = None

    def set(self) -> None:
        super().set()
        if self.on_set is not None:
            self.on_set()


def socket_event_class() -> type:
    """SocketEvent once gevent has patched threading (production), else ThreadSocketEvent."""
    from gevent import monkey
    return SocketEvent if monkey.is_module_patched("threading") else ThreadSocketEvent


class Alarm:
    """`fn()` once, `seconds` from now, unless cancelled first. `fn` must not block: under gevent it runs in the
    hub (a loop timer, nothing else per waiting call); otherwise in a timer thread."""

    __slots__ = ("_timer", "_fn", "at", "fired")

    def __init__(self, seconds: float, fn: Callable[[], None]) -> None:
        from gevent import monkey
        self._fn = fn
        self.at = time.monotonic() + max(0.0, seconds)  # when it is due
        self.fired = False
        if monkey.is_module_patched("threading"):
            import gevent
            self._timer = gevent.get_hub().loop.timer(max(0.0, seconds))
            self._timer.start(self._fire)
        else:
            self._timer = threading.Timer(max(0.0, seconds), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        self._fn()

    def pending_by(self, at: float) -> bool:
        """Still to fire, no later than `at` (monotonic)."""
        return not self.fired and self.at <= at

    def cancel(self) -> None:
        if isinstance(self._timer, threading.Timer):
            self._timer.cancel()
        else:
            self._timer.close()


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
