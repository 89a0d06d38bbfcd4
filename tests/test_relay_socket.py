"""routes/relay.RelaySocket without a server: the handler runs the socket's reader loop, and the messages it
buffers are handled in order by one task that ends once nothing is due (an idle call holds no task). Without
gevent here (threads); tests/test_relay*.py run it under gevent on the real server."""
from __future__ import annotations

import json
import queue
import threading
import time
from types import SimpleNamespace

import pytest
from simple_websocket import ConnectionClosed

from callweaver.background import SocketReader, ThreadSocketEvent
from callweaver.routes import relay
from callweaver.routes.relay import CLOSE_POLICY_VIOLATION, RelaySocket

TRACKING_ID = "t-1"


class FakeServer:
    """What RelaySocket uses of simple-websocket's Server: its reader (a SocketReader running a loop that buffers
    each frame and sets the event), receive(timeout=0), connected, close(), sock.shutdown()."""

    def __init__(self) -> None:
        self.event = ThreadSocketEvent()
        self.frames: queue.Queue = queue.Queue()
        self.input_buffer: list[str] = []
        self.connected = True
        self.closed_with = None
        self.sock = SimpleNamespace(shutdown=lambda how: self.frames.put(None))
        self.thread = SocketReader(self._read)
        self.thread.start()

    def _read(self) -> None:
        while (frame := self.frames.get()) is not None:
            self.input_buffer.append(frame)
            self.event.set()
        self.connected = False
        self.event.set()

    def receive(self, timeout=None):
        assert timeout == 0
        if self.input_buffer:
            return self.input_buffer.pop(0)
        if not self.connected:
            raise ConnectionClosed(1000, None)
        return None

    def close(self, reason=None, message=None) -> None:
        self.closed_with = (reason, message)
        self.connected = False


class Session:
    """What RelaySocket uses of a RelaySession: its messages, and the caller-silence deadline it keeps."""

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.on_quiet = None
        self.silence_at: float | None = None  # on time.monotonic, as RelaySession's clock
        self.silence_checks: list[float] = []

    def silence_check_at(self) -> float | None:
        return self.silence_at

    def check_silence(self) -> None:
        if self.silence_at is not None and time.monotonic() >= self.silence_at:
            self.silence_checks.append(time.monotonic())
            self.silence_at = None

    def handle_message(self, message) -> None:
        self.handled.append(type(message).__name__)
        time.sleep(0.01)  # handling blocks a little (store I/O): frames arriving meanwhile wait in order


def frame(kind: str) -> str:
    if kind == "setup":
        return json.dumps({"type": "setup", "callSid": "CA" + "0" * 32,
                           "customParameters": {"trackingId": TRACKING_ID}})
    return json.dumps({"type": "prompt", "voicePrompt": kind, "lang": "en-US", "last": True})


def serve(ws: FakeServer, session: Session, setup_timeout_s: float = 30.0,
          set_ups: list | None = None) -> tuple[RelaySocket, threading.Thread]:
    claim = SimpleNamespace(tracking_id=TRACKING_ID, seconds_to_renewal=lambda: 60.0, renew_if_due=lambda: True)
    trimmer = SimpleNamespace(call_set_up=lambda: (set_ups if set_ups is not None else []).append(len(session.handled)))
    socket = RelaySocket(ws, session, claim, setup_timeout_s, trimmer)
    handler = threading.Thread(target=socket.serve, daemon=True)
    handler.start()
    return socket, handler


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_frames_are_handled_in_order_by_one_task_that_ends_when_the_call_is_idle(monkeypatch):
    monkeypatch.setattr(relay, "LINGER_S", 0.05)
    ws, session, set_ups = FakeServer(), Session(), []
    socket, handler = serve(ws, session, set_ups=set_ups)
    for kind in ("setup", "one", "two", "three"):
        ws.frames.put(frame(kind))
    wait_for(lambda: len(session.handled) == 4)
    assert session.handled == ["Setup", "Prompt", "Prompt", "Prompt"]
    wait_for(lambda: socket.worker is None)  # idle: no task left, only the handler reading
    assert set_ups == [4]  # the heap trimmer is told once the task that handled `setup` has ended
    ws.frames.put(frame("four"))
    wait_for(lambda: len(session.handled) == 5)
    assert set_ups == [4]
    ws.frames.put(None)  # the caller hangs up
    handler.join(5)
    assert not handler.is_alive() and socket.worker is None and ws.closed_with is None


def test_a_socket_without_setup_is_closed_when_its_deadline_passes():
    ws, session = FakeServer(), Session()
    socket, handler = serve(ws, session, setup_timeout_s=0.05)
    handler.join(5)
    assert not handler.is_alive()
    assert ws.closed_with == (CLOSE_POLICY_VIOLATION, "setup not received in time")
    assert session.handled == []


def test_a_setup_naming_another_call_closes_the_socket_and_nothing_after_it_is_handled():
    ws, session = FakeServer(), Session()
    socket, handler = serve(ws, session)
    ws.frames.put(json.dumps({"type": "setup", "customParameters": {"trackingId": "someone-else"}}))
    ws.frames.put(frame("one"))
    handler.join(5)
    assert not handler.is_alive()
    assert ws.closed_with == (CLOSE_POLICY_VIOLATION, "setup trackingId does not match the signed URL")
    assert session.handled == []


def test_the_reader_must_be_a_socket_reader():
    ws = SimpleNamespace(thread=threading.Thread(target=lambda: None))
    socket = RelaySocket(ws, Session(), SimpleNamespace(), 30.0, SimpleNamespace())
    with pytest.raises(TypeError):
        socket.serve()


def test_only_a_talking_call_keeps_its_task_waiting_for_the_next_frame(monkeypatch):
    """After `setup` and after a wake with no message (the claim's renewal) the task ends at once; after a prompt it
    waits LINGER_S for the turn's next frame."""
    monkeypatch.setattr(relay, "LINGER_S", 30.0)
    ws, session = FakeServer(), Session()
    socket, handler = serve(ws, session)
    ws.frames.put(frame("setup"))
    wait_for(lambda: session.handled == ["Setup"] and socket.worker is None, timeout_s=2)
    socket.wake()  # as the renewal alarm does
    wait_for(lambda: socket.worker is None, timeout_s=2)
    ws.frames.put(frame("one"))
    wait_for(lambda: session.handled == ["Setup", "Prompt"])
    time.sleep(0.1)
    assert socket.worker is not None  # waiting for the turn's next frame
    ws.frames.put(None)
    handler.join(5)
    assert not handler.is_alive() and socket.worker is None


def test_frames_buffered_before_the_handler_hooks_the_event_are_handled_at_once():
    """The reader can buffer `setup` (and more) before serve() hooks the socket's event: they are handled when
    serve() starts, not when the setup deadline's alarm fires (found by the 12x review)."""
    ws, session = FakeServer(), Session()
    ws.frames.put(frame("setup"))
    ws.frames.put(frame("one"))
    wait_for(lambda: len(ws.input_buffer) == 2)
    socket, handler = serve(ws, session, setup_timeout_s=30.0)
    wait_for(lambda: session.handled == ["Setup", "Prompt"], timeout_s=2)
    ws.frames.put(None)
    handler.join(5)
    assert not handler.is_alive()


def test_a_failure_while_handling_what_is_due_is_logged_and_closes_the_socket(capsys):
    """Before 12x an error in the handler's loop ended the handler (Flask logged it, the socket closed); the task
    that now handles messages and deadlines must not swallow it and leave the call without renewals or deadline."""
    ws, session = FakeServer(), Session()
    failures = []

    def renew_if_due() -> bool:
        failures.append(1)
        raise RuntimeError("store exploded")

    claim = SimpleNamespace(tracking_id=TRACKING_ID, seconds_to_renewal=lambda: 60.0, renew_if_due=renew_if_due)
    socket = RelaySocket(ws, session, claim, 30.0, SimpleNamespace(call_set_up=lambda: None))
    handler = threading.Thread(target=socket.serve, daemon=True)
    handler.start()
    ws.frames.put(frame("setup"))
    handler.join(5)
    assert not handler.is_alive() and failures == [1]
    assert ws.closed_with is not None
    assert "relay_socket_task_failed" in capsys.readouterr().out


def test_the_calls_log_bindings_made_at_setup_reach_the_handler_after_the_socket_closes():
    """session.close() at hang-up and the claim's release log from the handler's context: they must carry the
    call's ids bound at `setup` (the task handles setup in the socket's own context)."""
    import structlog

    ws = FakeServer()
    seen = {}

    class BindingSession(Session):
        def handle_message(self, message) -> None:
            super().handle_message(message)
            structlog.contextvars.bind_contextvars(call_sid="CA" + "0" * 32)

    socket, _ = RelaySocket(ws, BindingSession(), SimpleNamespace(
        tracking_id=TRACKING_ID, seconds_to_renewal=lambda: 60.0, renew_if_due=lambda: True), 30.0,
        SimpleNamespace(call_set_up=lambda: None)), None

    def handler() -> None:
        structlog.contextvars.clear_contextvars()
        socket.serve()
        seen.update(structlog.contextvars.get_contextvars())

    thread = threading.Thread(target=handler, daemon=True)
    thread.start()
    ws.frames.put(frame("setup"))
    wait_for(lambda: socket.worker is None and ws.input_buffer == [] and socket.setup_deadline is None)
    ws.frames.put(None)
    thread.join(5)
    assert seen.get("call_sid") == "CA" + "0" * 32


def test_a_pending_alarm_is_kept_across_message_batches_and_renewals_keep_coming(monkeypatch):
    """The alarm is rebuilt only when the next deadline moves earlier or it has fired, not after every batch; the
    claim's renewals still come one after another (each fired alarm is replaced)."""
    monkeypatch.setattr(relay, "LINGER_S", 0.01)
    ws, session = FakeServer(), Session()
    socket, handler = serve(ws, session, setup_timeout_s=30.0)
    wait_for(lambda: socket.alarm is not None)
    first = socket.alarm
    for kind in ("setup", "one", "two"):
        ws.frames.put(frame(kind))
    wait_for(lambda: len(session.handled) == 3 and socket.worker is None)
    assert socket.alarm is first  # the setup deadline's alarm (30 s) comes before the renewal (60 s): kept
    ws.frames.put(None)
    handler.join(5)

    renewals: list[float] = []
    renew_at = [time.monotonic() + 0.05]

    def renew_if_due() -> bool:
        if time.monotonic() >= renew_at[0]:
            renewals.append(time.monotonic())
            renew_at[0] = time.monotonic() + 0.05
        return True

    ws, session = FakeServer(), Session()
    claim = SimpleNamespace(tracking_id=TRACKING_ID, renew_if_due=renew_if_due,
                            seconds_to_renewal=lambda: max(0.0, renew_at[0] - time.monotonic()))
    socket = RelaySocket(ws, session, claim, 30.0, SimpleNamespace(call_set_up=lambda: None))
    handler = threading.Thread(target=socket.serve, daemon=True)
    handler.start()
    ws.frames.put(frame("setup"))
    wait_for(lambda: len(renewals) >= 4)
    ws.frames.put(None)
    handler.join(5)
    assert not handler.is_alive()


def test_the_callers_silence_deadline_shares_the_sockets_one_alarm_and_a_closed_talk_cycle_moves_it():
    ws, session = FakeServer(), Session()
    socket, handler = serve(ws, session)
    ws.frames.put(frame("setup"))
    wait_for(lambda: session.handled == ["Setup"] and socket.worker is None)
    assert session.on_quiet == socket.wake  # a reply's task tells the socket its talk cycle closed
    renewal_alarm = socket.alarm
    session.silence_at = time.monotonic() + 0.2  # as a closed talk cycle would set it
    session.on_quiet()
    wait_for(lambda: socket.alarm is not renewal_alarm)  # one alarm, now for the earlier deadline
    silence_alarm = socket.alarm
    assert silence_alarm.at <= session.silence_at + 0.01
    wait_for(lambda: session.silence_checks)  # the alarm woke the task, which handled the silence
    assert silence_alarm.fired
    wait_for(lambda: socket.worker is None)  # and ended: an idle call holds no task
    ws.frames.put(None)
    handler.join(5)
    assert session.on_quiet is None
