"""Issue 11 against the real server (gunicorn, 2 gevent workers): limits hold across workers, the access log
redacts and escapes, and the web app's own requests from an allowed origin still work end to end."""
from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from callweaver.simulate.webhooks import http
from tests.conftest import base_env
from tests.fakes.fake_llm import Reply
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body

WEB_APP = "http://localhost:8080"  # where the Call Flow Weaver web app runs in development (a default origin)


@pytest.fixture
def live(tmp_path, fake_twilio, fake_llm):
    env = {**base_env(tmp_path, fake_twilio, fake_llm), "LOG_LEVEL": "INFO"}
    server = LiveServer(env, workers=2).start()
    yield server
    server.stop()


def test_100_make_calls_in_a_burst_place_at_most_the_limit_across_workers(live, fake_twilio):
    def make_call(_i: int):
        return http("POST", live.url + "/api/make-call-optimized", json_body=make_call_body())

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(make_call, range(100)))
    placed = [r for r in results if r.status == 200]
    limited = [r for r in results if r.status == 429]
    unexpected = [(r.status, r.text) for r in results if r.status not in (200, 429)]
    assert not unexpected, f"{len(placed)} placed, {len(limited)} limited, other answers: {unexpected}"
    assert len(placed) == 30 and len(limited) == 70  # RATE_LIMIT_MAKE_CALL default: 30 per minute per client
    assert len(fake_twilio.creates()) == 30
    assert {r.headers["X-CallWeaver-Worker"] for r in results} == {str(p) for p in live.worker_pids()}
    for r in limited:
        assert r.json()["success"] is False and int(r.headers["Retry-After"]) >= 1
    assert live.logs().count('"rate_limited"') == 70


def _raw_request(port: int, request_line: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{request_line}\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        while sock.recv(4096):
            pass


def test_access_log_redacts_secret_query_parameters_and_cannot_be_forged(live):
    _raw_request(live.port, "GET /ping?twilioAuthToken=hunter2secret&authToken=t0ps3cret&id=7 HTTP/1.1")
    _raw_request(live.port, 'GET /ping%0A%7B%22event%22%3A%22forged%22%7D%5C%22 HTTP/1.1')
    live.stop()  # flush every worker's output
    logs = live.logs()
    assert "hunter2secret" not in logs and "t0ps3cret" not in logs
    access = [json.loads(line) for line in logs.splitlines() if line.startswith('{"event": "access"')]
    assert any(a["query"] == "twilioAuthToken=[REDACTED]&authToken=[REDACTED]&id=7" for a in access)
    assert any(a["path"].startswith('/ping\n{"event":"forged"}') for a in access)  # one line, escaped
    assert not any(line.lstrip().startswith('{"event":"forged"') for line in logs.splitlines())


def test_each_request_writes_one_access_line_naming_its_call(live):
    """Under gunicorn the access line is the request's only line (no second `http_request` line from the app),
    and it names the call the request placed."""
    call = http("POST", live.url + "/api/make-call-optimized", json_body=make_call_body())
    assert call.status == 200, call.text
    http("GET", live.url + "/ping")
    live.stop()
    lines = [json.loads(line) for line in live.logs().splitlines() if line.startswith("{")]
    assert not [line for line in lines if line.get("event") == "http_request"]
    (placed,) = [a for a in lines if a.get("event") == "access" and a["path"] == "/api/make-call-optimized"]
    assert placed["call_sid"] == call.json()["callSid"] and placed["status"] == "200"
    assert placed["tracking_id"] == call.json()["optimization"]["trackingId"]
    ping = [a for a in lines if a.get("event") == "access" and a["path"] == "/ping"][-1]  # LiveServer pings too
    assert ping["call_sid"] == "-" and ping["request_id"].startswith("req_")


def test_the_web_apps_own_requests_work_from_an_allowed_origin(live, fake_twilio, fake_llm):
    """Replays what the web app does in a browser (load, twilio-config, chat, make-call, end-call), preflights
    included, against the real server with every protection at its default."""
    origin = {"Origin": WEB_APP}

    def preflight(path: str) -> None:
        r = http("OPTIONS", live.url + path, headers={**origin, "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "content-type"})
        assert r.status == 200, (path, r.status, r.text)
        assert r.headers["Access-Control-Allow-Origin"] == WEB_APP
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "content-type" in r.headers["Access-Control-Allow-Headers"].lower()

    health = http("GET", live.url + "/health", headers=origin)  # the wake-up call
    assert health.status == 200 and health.headers["Access-Control-Allow-Origin"] == WEB_APP
    config = http("GET", live.url + "/api/twilio-config", headers=origin)
    assert config.status == 200 and config.headers["Access-Control-Allow-Origin"] == WEB_APP
    phone = config.json()["config"]["phoneNumber"]

    preflight("/api/chat")
    fake_llm.push(Reply(text="Hello from the playground."))
    chat = http("POST", live.url + "/api/chat", headers=origin,
                json_body={"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}], "globalPrompt": "Be brief."})
    assert chat.status == 200 and chat.json()["response"] == "Hello from the playground.", chat.text
    assert chat.headers["Access-Control-Allow-Origin"] == WEB_APP

    preflight("/api/make-call-optimized")
    body = make_call_body(**{"from": phone})
    call = http("POST", live.url + "/api/make-call-optimized", headers=origin, json_body=body)
    assert call.status == 200 and call.json()["success"] is True, call.text
    assert call.headers["Access-Control-Allow-Origin"] == WEB_APP
    sid = call.json()["callSid"]

    preflight(f"/api/end-call?callSid={sid}")
    end = http("POST", f"{live.url}/api/end-call?callSid={sid}",
               headers={**origin, "Content-Type": "application/json"})  # an empty JSON body, as the app sends
    assert end.status == 200 and end.json()["success"] is True, end.text
    assert end.headers["Access-Control-Allow-Origin"] == WEB_APP
    assert [u.one("Status") for u in fake_twilio.updates()] == ["completed"]


def _raw_status(port: int, request_line: str, *headers: str) -> int:
    """The status of one raw HTTP/1.1 request (headers exactly as given)."""
    extra = "".join(f"{h}\r\n" for h in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{request_line}\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_a_request_header_cannot_move_the_apps_root(live):
    """gunicorn maps a SCRIPT_NAME (or PATH_INFO) request header into the WSGI environ for peers in
    FORWARDED_ALLOW_IPS (`*` by default: every client): a header would have moved the app's root, so the same routes
    answered under any prefix a client chose and URLs built from the root followed it (gunicorn.conf.py
    forwarder_headers)."""
    assert _raw_status(live.port, "GET /moved/ping HTTP/1.1", "SCRIPT_NAME: /moved") == 404
    assert _raw_status(live.port, "GET /ping HTTP/1.1", "SCRIPT_NAME: /elsewhere") == 200
    assert _raw_status(live.port, "GET /ping HTTP/1.1", "PATH_INFO: /health") == 200
