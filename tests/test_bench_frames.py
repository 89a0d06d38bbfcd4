"""The load generator's frame reader (bench/callers.py ServerFrames): every server frame the relay bench reads becomes
the same message websocket-client would have returned, applied to the caller's Twilio model the same way, however the
bytes arrive (split across reads, several per read, fragmented, with pings between)."""
from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from bench.callers import ServerFrames
from bench.loop_lag import LoopLagProbe
from callweaver.simulate.relay_model import TwilioRelayModel


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """A server frame (unmasked, RFC 6455 §5.2), with the 16- and 64-bit length forms when needed."""
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        return bytes([first, len(payload)]) + payload
    if len(payload) < 1 << 16:
        return bytes([first, 126]) + struct.pack(">H", len(payload)) + payload
    return bytes([first, 127]) + struct.pack(">Q", len(payload)) + payload


def text(message: dict) -> bytes:
    return frame(json.dumps(message).encode())


class StubWebSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pongs: list[bytes] = []

    def pong(self, payload: bytes) -> None:
        self.pongs.append(payload)


class StubCaller:
    """What ServerFrames uses of a RelayCaller: its socket, its Twilio model, send, closed_by_server."""

    def __init__(self, sock: socket.socket) -> None:
        self.ws = StubWebSocket(sock)
        self.twilio = TwilioRelayModel.from_twiml({"debug": "speaker-events"}, [], rate_cps=1.0)
        self.sent: list[dict] = []
        self.closed_by_server = False

    def send(self, message: dict) -> None:
        self.sent.append(message)


@pytest.fixture
def pair():
    ours, server = socket.socketpair()
    yield ours, server
    ours.close()
    server.close()


def read_all(frames: ServerFrames, count: int) -> list[dict]:
    deadline = time.monotonic() + 5
    out = []
    for _ in range(count):
        read = frames.next(deadline)
        assert read is not None
        out.append(read[1])
    return out


def test_frames_split_across_reads_and_packed_into_one_read(pair):
    ours, server = pair
    caller = StubCaller(ours)
    frames = ServerFrames(caller)
    first = text({"type": "text", "token": "Hello", "last": False})
    server.sendall(first[:3])
    server.sendall(first[3:] + text({"type": "text", "token": " there.", "last": False})
                   + text({"type": "text", "token": "", "last": True}))
    messages = read_all(frames, 3)
    assert [m["token"] for m in messages] == ["Hello", " there.", ""]
    assert messages[2]["last"] is True
    # The Twilio model heard the reply start, as with RelayCaller.recv: agentSpeaking on went back to the server.
    assert caller.sent == [{"type": "info", "name": "agentSpeaking", "value": "on"}]


def test_long_fragmented_and_ping_frames(pair):
    ours, server = pair
    caller = StubCaller(ours)
    frames = ServerFrames(caller)
    long_token = "word " * 20_000  # > 65535 bytes: the 64-bit length form
    body = json.dumps({"type": "text", "token": long_token, "last": False}).encode()
    server.sendall(frame(b"are you there", opcode=0x9) + frame(body[:10], fin=False)
                   + frame(body[10:500], opcode=0x0, fin=False) + frame(body[500:], opcode=0x0))
    server.sendall(text({"type": "text", "token": "x" * 300, "last": True}))  # the 16-bit length form
    messages = read_all(frames, 2)
    assert messages[0]["token"] == long_token and messages[1]["token"] == "x" * 300
    assert caller.ws.pongs == [b"are you there"]


def test_end_stops_playback_and_close_ends_reading(pair):
    ours, server = pair
    caller = StubCaller(ours)
    frames = ServerFrames(caller)
    server.sendall(text({"type": "end", "handoffData": "{}"}) + frame(b"\x03\xe8", opcode=0x8))
    (end,) = read_all(frames, 1)
    assert end["type"] == "end" and end["unheard"] == ""
    assert frames.next(time.monotonic() + 5) is None
    assert caller.closed_by_server


def test_invalid_json_is_reported_like_recv_does(pair):
    ours, server = pair
    caller = StubCaller(ours)
    frames = ServerFrames(caller)
    server.sendall(frame(b"not json"))
    (message,) = read_all(frames, 1)
    assert message == {"type": "invalid", "raw": "not json"}
    assert caller.sent[0]["type"] == "error"  # Twilio's answer to a malformed message


def test_deadline_without_frames_returns_none(pair):
    ours, _ = pair
    frames = ServerFrames(StubCaller(ours))
    assert frames.next(time.monotonic() + 0.05) is None


def test_loop_lag_probe_keeps_only_the_window():
    probe = LoopLagProbe(interval_s=0.001)
    probe.samples.extend([(1.0, 0.5), (2.0, 3.0), (3.0, 7.0)])
    assert probe.lags_between(1.5, 3.0) == [3.0, 7.0]


def test_a_benchmarks_median_round_is_a_round_that_ran():
    """Benchmarks report the service's percentile (nearest rank): with an even number of rounds an interpolated
    median (statistics.median) is no round's figure, and bench/llm_client then showed round 0's other columns."""
    from bench.report import median_round
    per_turn = [40.0, 10.0, 30.0, 20.0]

    assert median_round(per_turn) == (20.0, 3)
    assert median_round([5.0]) == (5.0, 0)
