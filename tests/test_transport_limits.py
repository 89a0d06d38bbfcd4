"""Transport-level abuse on the real production server (gunicorn, gevent workers): relay sockets that never set
up, replayed or re-pointed upgrades, huge frames; request bodies that are slow, huge or too many at once."""
from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
import websocket

from callweaver.simulate import RelayCaller
from callweaver.simulate.webhooks import twilio_signature
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body

ATTACKER = "127.0.0.2"  # all of 127/8 is loopback: a second client address on the same machine
WAIT_S = 15.0           # generous bound on waiting for an event; never a speed assertion


@pytest.fixture(scope="module")
def fakes():
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    llm = FakeLLM("primary").start()
    yield twilio, llm
    twilio.stop()
    llm.stop()


def start_server(tmp_path, fakes, workers: int, **limits: str) -> LiveServer:
    twilio, llm = fakes
    env = base_env(tmp_path, twilio, llm)
    env.pop("PUBLIC_BASE_URL")
    env.update(limits)
    return LiveServer(env, workers=workers).start()


@pytest.fixture(scope="module")
def relay_server(tmp_path_factory, fakes):
    server = start_server(tmp_path_factory.mktemp("relay-limits"), fakes, 2, LOG_LEVEL="DEBUG",
                          RELAY_SETUP_TIMEOUT_S="1", RELAY_MAX_MESSAGE_BYTES="4096")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def body_server(tmp_path_factory, fakes):
    """One worker with few connection slots, so a handful of slow clients could fill them all."""
    server = start_server(tmp_path_factory.mktemp("body-limits"), fakes, 1, BODY_READ_TIMEOUT_S="1",
                          MAX_UPLOADS_PER_CLIENT="3", WORKER_CONNECTIONS="20", MAX_BODY_BYTES="65536")
    yield server
    server.stop()


def new_call(server: LiveServer, twilio: FakeTwilio) -> RelayCaller:
    caller = RelayCaller(server.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=WAIT_S)
    caller.place_call(make_call_body())
    caller.answer_placed(twilio.creates()[-1])
    return caller


def close_code(ws: websocket.WebSocket) -> int | None:
    """Read until the server's close frame; its status code (None if the socket stayed open)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            frame = ws.recv_frame()
        except websocket.WebSocketTimeoutException:
            return None
        except (websocket.WebSocketConnectionClosedException, OSError):
            return -1  # dropped without a close frame
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(frame.data[:2], "big")
    return None


def replay(caller: RelayCaller, url: str | None = None) -> websocket.WebSocket:
    """The captured upgrade again: same URL, same valid signature."""
    url = url or caller.twiml.url
    return websocket.create_connection(url, header=[f"X-Twilio-Signature: {twilio_signature(AUTH_TOKEN, url, {})}"],
                                       timeout=WAIT_S)


# ---- relay socket ----------------------------------------------------------------------------------

def test_socket_that_never_sends_setup_is_closed(relay_server, fakes):
    caller = new_call(relay_server, fakes[0])
    caller.connect(setup=False)
    assert close_code(caller.ws) == 1008
    assert "relay_setup_timeout" in relay_server.logs()


def test_replayed_upgrade_is_refused_on_every_worker_while_the_call_has_its_socket(relay_server, fakes):
    twilio, llm = fakes
    caller = new_call(relay_server, twilio)
    caller.connect()
    holder = relay_server.worker_serving(caller.ws.sock.getsockname()[1])
    refused_by: set[str] = set()
    # The kernel does not spread accepts evenly over gunicorn's workers: under load one worker can take dozens in a
    # row, so keep replaying (bounded in time) until both workers have refused one.
    deadline = time.monotonic() + WAIT_S * 4
    while time.monotonic() < deadline:
        with pytest.raises(websocket.WebSocketBadStatusException) as err:
            replay(caller)
        assert err.value.status_code == 409
        refused_by.add(err.value.resp_headers.get("x-callweaver-worker"))
        if str(holder) in refused_by and len(refused_by) >= 2:
            break
        time.sleep(0.01)
    assert len(refused_by) >= 2, "the claim must hold on the worker that does not hold the socket too"
    llm.push(Reply(text="Still here."))
    assert caller.say("Are you there?").text == "Still here."  # the real call is untouched
    caller.hangup()
    deadline = time.monotonic() + WAIT_S
    while True:  # released when the socket closed: the call may connect again (e.g. after a resume)
        try:
            replay(caller).close()
            break
        except websocket.WebSocketBadStatusException as exc:
            assert exc.status_code == 409 and time.monotonic() < deadline


def test_upgrade_naming_no_live_call_is_refused(relay_server, fakes):
    caller = new_call(relay_server, fakes[0])
    url = caller.twiml.url.replace(caller.tracking_id, "trk_does_not_exist")
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        replay(caller, url)
    assert err.value.status_code == 403
    assert caller.status("completed", 5).status == 200
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        replay(caller)
    assert err.value.status_code == 403


def test_setup_naming_another_call_closes_the_socket(relay_server, fakes):
    twilio, _llm = fakes
    victim = new_call(relay_server, twilio)
    attacker = new_call(relay_server, twilio)
    attacker.connect(setup=False)
    attacker.send({"type": "setup", "callSid": attacker.call_sid,
                   "customParameters": {"trackingId": victim.tracking_id}})
    assert close_code(attacker.ws) == 1008
    assert "relay_setup_refused" in relay_server.logs()


def test_oversized_frame_closes_with_1009_and_caller_text_is_not_logged_at_length(relay_server, fakes):
    twilio, _llm = fakes
    caller = new_call(relay_server, twilio)
    caller.connect()
    marker = "CallerControlledText"
    caller.send({"type": "info", "name": marker * 5, "value": marker * 150})  # under the limit, logged short
    caller.send({"type": "prompt", "voicePrompt": "x" * 100_000, "last": True})
    assert close_code(caller.ws) == 1009
    deadline = time.monotonic() + WAIT_S
    while "relay_info" not in relay_server.logs():  # the 1009 may overtake the handling of the info message
        assert time.monotonic() < deadline, "the info message must be logged"
        time.sleep(0.05)
    logs = relay_server.logs()
    assert marker * 10 not in logs and "x" * 1000 not in logs


# ---- request bodies --------------------------------------------------------------------------------

def slow_upload(server: LiveServer, declared: int = 60_000, source: str = ATTACKER) -> socket.socket:
    """Headers of a JSON POST declaring `declared` bytes, and the first byte of the body."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S, source_address=(source, 0))
    sock.sendall((f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {declared}\r\n\r\n{{").encode())
    return sock


def complete(data: bytes) -> bool:
    """A whole HTTP answer: headers and as many body bytes as its Content-Length says."""
    head, sep, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:] if sep else []:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def answer(sock: socket.socket, trickle: bool = False) -> tuple[int, dict]:
    """Read the server's answer (sending one more body byte every 0.2 s while waiting, if `trickle`)."""
    data = b""
    deadline = time.monotonic() + WAIT_S
    while not complete(data):
        assert time.monotonic() < deadline, f"no answer: {data[:200]!r}"
        sock.settimeout(0.2)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            if trickle:
                sock.sendall(b" ")
            continue
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body or b"{}")


def health_ok(server: LiveServer) -> bool:
    with urllib.request.urlopen(server.url + "/health", timeout=WAIT_S) as resp:
        return resp.status == 200


def test_body_not_received_within_the_deadline_gets_408(body_server):
    sock = slow_upload(body_server)
    status, body = answer(sock, trickle=True)
    sock.close()
    assert status == 408 and body["success"] is False and "not received" in body["error"]


def test_declared_body_over_the_cap_gets_413_before_it_is_sent(body_server):
    sock = slow_upload(body_server, declared=10 * 1024 * 1024)
    status, body = answer(sock)
    sock.close()
    assert status == 413 and body["success"] is False


def test_slow_uploads_from_one_client_cannot_take_every_connection_slot(body_server):
    """20 connection slots; 30 slow uploads from one client: beyond 3 at once they are refused and closed."""
    uploads = [slow_upload(body_server) for _ in range(30)]
    assert health_ok(body_server)  # another client is served while they are pending
    statuses = [answer(sock)[0] for sock in uploads]
    assert sorted(statuses) == [408] * 3 + [429] * 27  # 3 waited for their bodies until the deadline
    other = slow_upload(body_server, source="127.0.0.3")
    assert answer(other, trickle=True)[0] == 408  # each client has its own count
    for sock in uploads + [other]:
        sock.close()


# ---- answers the client does not read ----------------------------------------------------------------

STATIC = "/static/uplot/uPlot.iife.min.js"  # ~50 KB, public: a few dozen unread fill the socket's buffers


@pytest.fixture(scope="module")
def reader_server(tmp_path_factory, fakes):
    """One worker with few connection slots, so a handful of clients that never read could hold them all."""
    server = start_server(tmp_path_factory.mktemp("write-limits"), fakes, 1, RESPONSE_WRITE_TIMEOUT_S="1",
                          MAX_ANSWERS_PER_CLIENT="3", WORKER_CONNECTIONS="20")
    yield server
    server.stop()


def unread_requests(server: LiveServer, count: int = 200, source: str = ATTACKER) -> socket.socket:
    """`count` pipelined GETs of a static file on one connection whose receive buffer is small and never read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT_S)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET {STATIC} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() * count)
    return sock


def drain(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed the connection (bounded by WAIT_S per read)."""
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_an_answer_the_client_does_not_read_is_given_up_after_the_deadline(reader_server):
    """A client that asks and never reads held its connection (and the greenlet writing to it) for ever: each piece
    of an answer must be taken within RESPONSE_WRITE_TIMEOUT_S, else the connection is closed."""
    size = len(urllib.request.urlopen(reader_server.url + STATIC, timeout=WAIT_S).read())
    sock = unread_requests(reader_server, count=200)
    time.sleep(3)  # the deadline (1 s) passes while nothing is read
    received = drain(sock)
    sock.close()
    assert 0 < len(received) < 100 * size, "the server kept writing to a client that did not read"
    deadline = time.monotonic() + WAIT_S
    while "response_write_timeout" not in reader_server.logs():
        assert time.monotonic() < deadline, "the abandoned answer must be logged"
        time.sleep(0.05)


def test_clients_that_do_not_read_cannot_take_every_connection_slot(reader_server):
    """20 connection slots; 30 connections from one client that never read: beyond 3 answers being written at once
    the client's requests are refused (429) and their connections closed, and another client is served."""
    readers = [unread_requests(reader_server, count=100) for _ in range(30)]
    time.sleep(0.5)
    assert health_ok(reader_server)
    firsts = []
    for sock in readers:
        firsts.append(drain(sock)[:12])
        sock.close()
    assert firsts.count(b"HTTP/1.1 429") >= 20, firsts
    other = unread_requests(reader_server, count=1, source="127.0.0.3")  # a client of its own
    assert drain(other).startswith(b"HTTP/1.1 200")
    other.close()


def test_answers_are_bounded_only_where_gunicorn_writes_them():
    """The answer cap counts an answer until the server closes it, as gunicorn always does. Another WSGI caller
    under gevent (the in-process benches drive the app through Flask's test client, which closes an answer only
    when its response is closed) must not run up a count that refuses its 21st request (found by
    bench/turn_cpu.py: 'Too many answers to this client are still being written')."""
    from flask import Flask

    from callweaver.request_guard import RequestBodyGuard

    app = Flask(__name__)
    app.add_url_rule("/ping", "ping", lambda: "pong")
    guard = RequestBodyGuard(app.wsgi_app, max_body_bytes=1024, read_timeout_s=5, max_uploads_per_client=3,
                             trusted_proxy_hops=0, max_answers_per_client=2)
    guard.bounds_answers = True  # as under gevent's patched sockets
    app.wsgi_app = guard
    client = app.test_client()
    statuses = [client.get("/ping", buffered=False).status_code for _ in range(5)]
    assert statuses == [200] * 5
    assert guard.answers == {}
