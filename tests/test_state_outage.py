"""The shared state (Redis, or the instance's SQLite files) unavailable: the API says so with a 503 the web app can
show, never a bare 500, and the service works again once the state is back."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from callweaver import create_app
from callweaver.routes.relay import RelayClaim
from callweaver.store import build_store
from tests.conftest import base_env
from tests.fakes.redis_server import RedisServer
from tests.helpers import make_call_body

CALL_SID = "CA" + "1" * 32


def assert_state_unavailable(resp) -> None:
    assert resp.status_code == 503, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["success"] is False
    assert "unavailable" in body["error"] and "Internal server error" not in body["error"]
    assert resp.headers.get("Retry-After")


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()


def test_api_during_a_redis_outage_answers_503_and_recovers_when_redis_is_back(tmp_path, fake_twilio, redis_server):
    env = base_env(tmp_path, fake_twilio)
    env["REDIS_URL"] = redis_server.url
    client = create_app(env).test_client()
    assert client.post("/api/make-call-optimized", json=make_call_body()).status_code == 200
    redis_server.stop()
    assert_state_unavailable(client.post("/api/make-call-optimized", json=make_call_body()))
    assert_state_unavailable(client.post("/api/end-call", json={"callSid": CALL_SID}))
    assert_state_unavailable(client.get(f"/api/call-status?callSid={CALL_SID}"))
    redis_server.start()
    assert client.post("/api/make-call-optimized", json=make_call_body()).status_code == 200


def test_api_with_an_unusable_sqlite_directory_answers_503_not_500(tmp_path, fake_twilio):
    env = base_env(tmp_path, fake_twilio)
    client = create_app(env).test_client()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # the store's and the rate limits' files cannot be made under a file, even as root
    env["CALLWEAVER_DB"] = str(blocker / "cw.sqlite3")
    client = create_app(env).test_client()
    assert client.get("/health").status_code == 503  # what Render's health check sees: the deploy never goes live
    assert_state_unavailable(client.post("/api/make-call-optimized", json=make_call_body()))


def test_a_live_socket_keeps_its_call_when_redis_comes_back_empty(redis_server):
    """A Redis without persistence restarts empty: the claim is gone, and the socket holding the call must take it
    back rather than close as if another socket had replaced it (which hung up every live call)."""
    store = build_store("", redis_server.url, key_prefix="cwtest:claim-restart:")
    claim = RelayClaim(store, SimpleNamespace(tracking_id="call_1", resume_count=0), lease_s=30)
    assert claim.acquire()
    redis_server.stop()
    redis_server.start()  # empty
    claim.renew_at = 0.0  # its renewal is due
    assert claim.renew_if_due() is True
    resumed = RelayClaim(store, SimpleNamespace(tracking_id="call_1", resume_count=1), lease_s=30)
    assert resumed.acquire()  # a resume's new socket takes over at once, as before
    claim.renew_at = 0.0
    assert claim.renew_if_due() is False, "a resumed call's new socket still replaces the old one"
    store.close()


def test_a_status_callback_lost_to_a_redis_outage_is_logged_with_the_call(tmp_path, fake_twilio, redis_server):
    """Twilio does not retry a status callback: one refused while the store is down leaves the call live in the
    store, so the log must say which call and which status, for the operator to reconcile."""
    import structlog.testing

    env = base_env(tmp_path, fake_twilio)
    env["REDIS_URL"] = redis_server.url
    client = create_app(env).test_client()
    redis_server.stop()
    with structlog.testing.capture_logs() as logs:
        resp = client.post("/api/call-status-optimized?trackingId=call_1_abc",
                           data={"CallSid": CALL_SID, "CallStatus": "completed", "SequenceNumber": "4"})
    assert resp.status_code == 503
    [line] = [e for e in logs if e["event"] == "state_unavailable"]
    assert (line["tracking_id"], line["call_sid"], line["call_status"]) == ("call_1_abc", CALL_SID, "completed")


def test_health_names_no_file_path_of_an_unusable_store_but_the_log_does(tmp_path, fake_twilio):
    """/health is public: the store's error text (which names the SQLite file, or Redis' host) stays in the log."""
    import structlog.testing

    env = base_env(tmp_path, fake_twilio)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env["CALLWEAVER_DB"] = str(blocker / "cw.sqlite3")
    client = create_app(env).test_client()
    with structlog.testing.capture_logs() as logs:
        for path in ("/health", "/api/health-optimized"):
            resp = client.get(path)
            assert resp.status_code == 503
            body = resp.get_data(as_text=True)
            assert str(tmp_path) not in body and "not-a-directory" not in body, body
            assert resp.get_json()["status"] == "unhealthy"
    assert any("not-a-directory" in str(e.get("error")) for e in logs if e["event"] == "store_check_failed")


def test_a_503_for_unavailable_state_carries_the_web_apps_cors_headers(tmp_path, fake_twilio, redis_server):
    """The web app shows the 503's error text: the browser lets it read the answer only with CORS headers."""
    env = base_env(tmp_path, fake_twilio)
    env["REDIS_URL"] = redis_server.url
    client = create_app(env).test_client()
    origin = "https://kimiya-ai.vercel.app"
    redis_server.stop()
    resp = client.post("/api/make-call-optimized", json=make_call_body(), headers={"Origin": origin})
    assert_state_unavailable(resp)
    assert resp.headers.get("Access-Control-Allow-Origin") == origin


def test_a_hung_redis_refuses_a_make_call_as_quickly_as_the_store_does(tmp_path, fake_twilio, redis_server):
    """A frozen Redis (a failover, a stalled host) accepts connections and never answers: the rate limits' check,
    the first thing a make-call does, must give up within the store's own socket timeout (it waited redis-py's
    default 5 s), so the web app hears 503 rather than waiting."""
    import os
    import signal
    import time

    from callweaver.store.redis import SOCKET_TIMEOUT_S

    env = base_env(tmp_path, fake_twilio)
    env["REDIS_URL"] = redis_server.url
    client = create_app(env).test_client()
    assert client.post("/api/make-call-optimized", json=make_call_body()).status_code == 200
    os.kill(redis_server._process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert_state_unavailable(client.post("/api/make-call-optimized", json=make_call_body()))
        waited = time.monotonic() - started
    finally:
        os.kill(redis_server._process.pid, signal.SIGCONT)
    assert waited < 2 * SOCKET_TIMEOUT_S + 0.5, waited
    assert client.post("/api/make-call-optimized", json=make_call_body()).status_code == 200


def _twiml(resp):
    """Twilio's webhooks must answer 200 TwiML: anything else is "an application error has occurred" and a hang-up."""
    import xml.etree.ElementTree as ET

    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("text/xml")
    return ET.fromstring(resp.data)


def test_twiml_webhooks_during_an_outage_apologise_in_twiml_and_a_gather_call_is_listened_to_again(
        tmp_path, fake_twilio, redis_server):
    """The store down on a live call: the caller hears the apology (never Twilio's "application error"), a Gather
    turn listens once more (a short outage, a Redis restarting, need not end the call), and the log names the call."""
    from urllib.parse import parse_qsl, urlsplit

    import structlog.testing

    from tests.conftest import PUBLIC, Signer

    env = base_env(tmp_path, fake_twilio)
    env["REDIS_URL"] = redis_server.url
    app = create_app(env)
    client = app.test_client()
    twilio = Signer(client)
    gather_call = client.post("/api/make-call", json=make_call_body()).get_json()
    gather_url = fake_twilio.creates()[-1].one("Url")[len(PUBLIC):]
    greeting = _twiml(twilio.post(gather_url, {"CallSid": gather_call["callSid"], "CallStatus": "in-progress"}))
    action = greeting.find("Gather").get("action")
    relay_call = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    relay_id = relay_call["optimization"]["trackingId"]
    apology = app.extensions["callweaver"].languages.get(None).line("apology")
    redis_server.stop()

    with structlog.testing.capture_logs() as logs:
        root = _twiml(twilio.post(action[len(PUBLIC):], {"CallSid": gather_call["callSid"],
                                                         "SpeechResult": "I want to buy a house"}))
    assert [c.tag for c in root][:2] == ["Say", "Gather"] and root.find("Say").text == apology
    listen = root.find("Gather").get("action")
    asked, again = dict(parse_qsl(urlsplit(action).query)), dict(parse_qsl(urlsplit(listen).query))
    assert (again["id"], again["trackingId"], int(again["turn"])) == (asked["id"], asked["trackingId"],
                                                                     int(asked["turn"]) + 1)
    [line] = [e for e in logs if e["event"] == "twiml_error_answered"]
    assert line["state_unavailable"] is True and line["answer"] == "listen" and line["error"].endswith("Error")
    assert line["tracking_id"] == gather_call["trackingId"] and line["call_verified"] is False
    assert "Traceback" not in str(line)  # an outage is no bug: no stack trace per webhook

    # Still down at the next turn: the apology again, then the call ends rather than looping.
    ended = _twiml(twilio.post(listen[len(PUBLIC):], {"CallSid": gather_call["callSid"], "SpeechResult": "hello"}))
    assert [c.tag for c in ended] == ["Say", "Hangup"]

    for path, form in ((f"/api/twiml-optimized?id=wf_x&trackingId={relay_id}", {"CallSid": relay_call["callSid"]}),
                       (f"/api/connect-action?trackingId={relay_id}", {"CallSid": relay_call["callSid"],
                                                                       "SessionStatus": "failed"}),
                       (gather_url, {"CallSid": gather_call["callSid"], "CallStatus": "in-progress"})):
        root = _twiml(twilio.post(path, form))
        assert root.find("Say").text == apology, path
        if "twiml-ai" not in path:
            assert [c.tag for c in root] == ["Say", "Hangup"], path  # neither relay nor Gather works without state

    # Status callbacks are no TwiML: they keep the 503 (test_a_status_callback_lost_to_a_redis_outage_is_logged...).
    assert client.post(f"/api/call-status-optimized?trackingId={relay_id}",
                       data={"CallSid": relay_call["callSid"], "CallStatus": "completed"}).status_code == 503
