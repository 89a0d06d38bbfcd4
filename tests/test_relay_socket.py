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
    def __init__(self) -> None:
        self.handled: list[str] = []

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
