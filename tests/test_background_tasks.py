"""Work off the request path has one surface (join, dead, kill) whether it runs on a greenlet or a thread."""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

from callweaver.engine.languages import LanguageTable
from callweaver.engine.relay_session import RelaySession
from callweaver.services import spawn


def test_spawn_without_gevent_gives_a_task_that_can_be_joined_checked_and_stopped():
    release = threading.Event()
    task = spawn(release.wait, 10)
    assert task.dead is False
    task.kill(timeout=0.05)  # a thread cannot be interrupted: kill waits (bounded) for its cooperative end
    release.set()
    task.join(timeout=5)
    assert task.dead is True


class _SlowTurn:
    """Streams one token, then waits until cancelled (a reply still streaming when the caller barges in)."""

    def __init__(self) -> None:
        self.result = SimpleNamespace(language_switched=False, action=None, completed=False, entered_audio=None,
                                      language="en-US")
        self.utterance = "hi"
        self.stopped = threading.Event()

    def __iter__(self):
        yield "Hello"
        self.stopped.wait(10)

    def cancel(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        self.stopped.set()


class _Engine:
    languages = LanguageTable.load()  # a barge-in's heard text is estimated at the reply language's speaking rate

    def __init__(self) -> None:
        self.committed: list[dict] = []

    def start_turn(self, record, utterance, lang=None):
        return _SlowTurn()

    def commit_turn(self, record, turn, **kwargs):
        self.committed.append(kwargs)
        return record


def test_barge_in_cancels_a_reply_running_on_a_thread():
    sent: list[dict] = []
    engine = _Engine()
    session = RelaySession(engine, SimpleNamespace(send_json=lambda *messages: sent.extend(messages)), spawn=spawn)
    session.record = SimpleNamespace(tracking_id="call_1", messages=[], meta={}, language="en-US")
    session.handle(json.dumps({"type": "prompt", "voicePrompt": "hi", "last": True}))
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    session.handle(json.dumps({"type": "interrupt", "utteranceUntilInterrupt": "Hello"}))
    assert engine.committed == [{"path": "optimized", "timings": engine.committed[0]["timings"],
                                 "heard_text": "Hello", "interrupted": True,
                                 "speculation": engine.committed[0]["speculation"]}]
    assert engine.committed[0]["speculation"]["speculation"] is None  # no interim transcripts, no speculation


def test_socket_reader_runs_its_loop_off_the_request_path_and_logs_a_failure(capsys):
    """simple-websocket's reader (SOCK_SERVER_OPTIONS thread_class): a daemon thread without gevent; an unexpected
    error in the loop is logged, not lost."""
    from callweaver.background import SocketReader
    ran = threading.Event()
    reader = SocketReader(ran.set)
    reader.name = reader.name.replace("(_thread)", "")  # what simple-websocket does to its reader's name
    reader.start()
    assert ran.wait(5)

    def broken() -> None:
        raise RuntimeError("frame parser broke")

    failed = SocketReader(broken)
    failed.start()
    deadline, logged = time.monotonic() + 5, ""
    while "websocket_reader_failed" not in logged:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        captured = capsys.readouterr()
        logged += captured.out + captured.err


def test_socket_event_wakes_its_waiter_when_set_and_times_out_otherwise():
    """simple-websocket's event_class under gevent (SOCK_SERVER_OPTIONS): the socket's handler waits on it in
    receive(), its reader greenlet sets it."""
    import gevent

    from callweaver.background import SocketEvent

    event = SocketEvent()
    assert event.wait(timeout=0) is False and event.wait(timeout=0.01) is False and not event.is_set()
    waiting = gevent.spawn(event.wait, 30)
    gevent.sleep(0)  # it waits now
    gevent.spawn(event.set).join()  # another greenlet sets it, as the reader does
    assert waiting.get(timeout=5) is True
    assert event.wait() is True and event.wait(timeout=0) is True  # set stays set until cleared
    event.clear()
    assert not event.is_set() and event.wait(timeout=0.01) is False
    late = gevent.spawn(event.wait, 0.01)
    assert late.get(timeout=5) is False
    event.set()  # nobody waits: nothing to wake
    assert event.wait(timeout=0) is True
    killed = gevent.spawn(SocketEvent().wait)
    gevent.sleep(0)
    killed.kill(timeout=5)  # a handler stopped mid-wait (worker shutdown) leaves no timer behind
    assert killed.dead


def test_a_socket_event_set_as_its_wait_times_out_reports_set():
    """The reader's set() and the wait's timer can land in the same loop turn: the wait must then say True (the
    message is buffered), or the handler takes a message that arrived as a timeout (found in review: ~4 % of tries)."""
    import time

    import gevent

    from callweaver.background import SocketEvent

    results = []
    for _ in range(200):
        event = SocketEvent()
        waiting = gevent.spawn(event.wait, 0.001)
        gevent.sleep(0)  # it waits now
        started = time.perf_counter()
        while time.perf_counter() - started < 0.0015:
            pass  # the timer expires while this greenlet keeps the loop from running
        event.set()
        results.append(waiting.get(timeout=5))
    assert all(results), f"{results.count(False)} of {len(results)} waits said False after set()"


def test_a_second_waiter_on_a_socket_event_is_refused_not_left_hanging():
    import gevent
    import pytest

    from callweaver.background import SocketEvent

    event = SocketEvent()
    first = gevent.spawn(event.wait, 5)
    gevent.sleep(0)
    with pytest.raises(RuntimeError):
        event.wait(5)
    event.set()
    assert first.get(timeout=5) is True


def test_the_socket_event_is_the_standard_one_without_gevent_and_tells_its_listener():
    from callweaver.background import socket_event_class
    event_class = socket_event_class()
    assert issubclass(event_class, threading.Event)  # tests and CLI run unpatched
    event, told = event_class(), []
    event.on_set = lambda: told.append(event.is_set())
    event.set()
    assert told == [True] and event.wait(timeout=0)


def test_an_idle_relay_session_holds_no_per_turn_machinery():
    """A live call waits most of its life: its session has slots and no Event or cadence until a turn needs them
    (bench/idle_call_memory.py measures what that saves)."""
    session = RelaySession(_Engine(), SimpleNamespace(send_json=lambda *messages: None), spawn=spawn)
    assert not hasattr(session, "__dict__")
    assert (session._fell_silent_event, session._reply_stopped_event, session._speech_cadence) == (None, None, None)


GEVENT_SOCKET_READER_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import time
import gevent
from greenlet import getcurrent
from callweaver.background import Alarm, SocketReader

ran_in = []
reader = SocketReader(lambda: ran_in.append(getcurrent()))
reader.start()  # as simple-websocket does while the handler builds its Server
reader.run_here_or_wait()  # the handler takes the loop over before the hub's next turn
gevent.sleep(0.01)
assert ran_in == [getcurrent()], ran_in  # ran here, once: no greenlet of its own

ended = []
unclaimed = SocketReader(lambda: (gevent.sleep(0.05), ended.append(getcurrent())))
unclaimed.start()
gevent.sleep(0)  # the hub's turn passes first: the loop starts in a greenlet of its own
unclaimed.run_here_or_wait()  # and the handler waits until it ends
assert len(ended) == 1 and ended[0] is not getcurrent()

fired = []
alarm = Alarm(0.01, lambda: fired.append(1))
assert alarm.pending_by(alarm.at)
Alarm(0.01, lambda: fired.append(2)).cancel()
gevent.sleep(0.1)
assert fired == [1], fired
assert not alarm.pending_by(alarm.at + 60)  # fired in the hub: no longer pending
print("ok")
"""


def test_under_gevent_the_socket_reader_runs_in_the_handler_that_takes_it_over():
    """An idle relay socket holds one greenlet: its handler runs simple-websocket's reader loop itself
    (routes/relay.RelaySocket). A reader nobody takes over within the hub's turn gets a greenlet of its own, and
    run_here_or_wait then waits for it. gevent's patching is process-wide, hence the subprocess."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", GEVENT_SOCKET_READER_SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_without_gevent_the_socket_reader_is_a_thread_the_handler_waits_for_and_alarms_fire_once():
    from callweaver.background import Alarm, SocketReader
    ran_in = []
    reader = SocketReader(lambda: (time.sleep(0.05), ran_in.append(threading.current_thread())))
    reader.start()
    reader.run_here_or_wait()
    assert len(ran_in) == 1 and ran_in[0] is not threading.current_thread()
    fired = threading.Event()
    cancelled = []
    alarm = Alarm(0.01, fired.set)
    assert alarm.pending_by(alarm.at) and not alarm.pending_by(alarm.at - 0.001)
    Alarm(0.01, lambda: cancelled.append(1)).cancel()
    assert fired.wait(5)
    time.sleep(0.05)
    assert cancelled == [] and not alarm.pending_by(alarm.at + 60)  # fired: no longer pending
