"""The production server path: gunicorn -c gunicorn.conf.py wsgi:app with 2 gevent workers on loopback."""
from __future__ import annotations

import pytest

from callweaver.simulate.webhooks import TwilioWebhooks, http
from tests.conftest import AUTH_TOKEN, base_env
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body


@pytest.fixture
def live(tmp_path, fake_twilio, fake_llm, fake_llm2):
    env = base_env(tmp_path, fake_twilio, fake_llm, fake_llm2)
    env.pop("PUBLIC_BASE_URL")
    server = LiveServer(env, workers=2).start()
    yield server
    server.stop()


def test_make_call_status_callbacks_and_poll_across_two_gevent_workers(live):
    hooks = TwilioWebhooks(live.url, AUTH_TOKEN)
    resp = http("POST", live.url + "/api/make-call-optimized", json_body=make_call_body())
    assert resp.status == 200, resp.text
    data = resp.json()
    tid, sid = data["optimization"]["trackingId"], data["callSid"]
    workers = {resp.headers["X-CallWeaver-Worker"]}
    statuses = ["initiated", "ringing", "in-progress"]
    for seq, status in enumerate(statuses):
        r = hooks.status_callback(f"/api/call-status-optimized?trackingId={tid}", sid, status, seq)
        assert r.status == 200, r.text
        workers.add(r.headers["X-CallWeaver-Worker"])
    # keep polling until both workers have answered for this call: state must be in the store, not a worker
    seen_status = set()
    for _ in range(200):
        r = http("GET", f"{live.url}/api/call-status?callSid={sid}")
        assert r.status == 200, r.text
        body = r.json()
        assert body["success"] is True and body["call"]["sid"] == sid
        assert body["call"]["trackingId"] == tid
        assert body["call"]["statusHistory"] == statuses
        workers.add(r.headers["X-CallWeaver-Worker"])
        seen_status.add(r.headers["X-CallWeaver-Worker"])
        if len(seen_status) >= 2 and len(workers) >= 2:
            break
    assert len(set(live.worker_pids())) == 2
    assert len(seen_status) == 2, "both gevent workers must answer from the shared store"
    r = hooks.status_callback(f"/api/call-status-optimized?trackingId={tid}", sid, "completed", 3,
                              CallDuration="12")
    assert r.status == 200
    r = hooks.status_callback(f"/api/call-status-optimized?trackingId={tid}", sid, "completed", 3)
    assert r.status == 200  # a duplicate delivery is accepted and ignored


def test_live_server_rejects_unsigned_callback_and_answers_health(live):
    resp = http("POST", live.url + "/api/make-call-optimized", json_body=make_call_body())
    tid, sid = resp.json()["optimization"]["trackingId"], resp.json()["callSid"]
    hooks = TwilioWebhooks(live.url, AUTH_TOKEN)
    r = hooks.post(f"/api/call-status-optimized?trackingId={tid}", {"CallSid": sid, "CallStatus": "completed"},
                   sign=False)
    assert r.status == 403
    health = http("GET", live.url + "/health")
    assert health.status == 200 and health.json()["status"] in {"healthy", "degraded"}
    assert health.json()["checks"]["store"]["ok"] is True


def test_each_gevent_worker_probes_its_loop_and_admits_calls_while_responsive(live):
    """The lag probe starts on each worker's own loop once it is warm (OVERLOAD_LOOP_LAG_MS, callweaver/overload.py):
    after a make-call (which waits for the warm-up), the answering worker reports its lag and admits calls."""
    import time

    assert http("POST", live.url + "/api/make-call-optimized", json_body=make_call_body()).status == 200
    for _ in range(100):
        worker = http("GET", live.url + "/api/health-optimized").json()["worker"]
        if worker["probing"]:
            break
        time.sleep(0.05)
    assert worker["probing"] is True and worker["admittingCalls"] is True
    assert worker["overloadLoopLagMs"] == 500.0 and worker["loopLagMs"] >= 0
