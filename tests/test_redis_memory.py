"""A small Redis (Render Key Value's free plan: 25 MB) that fills up: with `noeviction` every write is refused once
`maxmemory` is reached, so the service must say so (503, a StoreError) without half-written calls, and the retention
job must still be able to free memory, or the store stays full for good."""
from __future__ import annotations

import time

import pytest
import redis

from callweaver import create_app
from callweaver.retention import purge_if_due
from callweaver.store import CallRecord, StoreError, build_store
from callweaver.units import SECONDS_PER_DAY
from tests.conftest import Signer, base_env
from tests.fakes.redis_server import RedisServer
from tests.helpers import make_call_body

# Headroom above the empty server's own use: room for a few hundred calls with their statuses.
HEADROOM_BYTES = 2_000_000
# How far below Redis' use a test pins maxmemory to keep it full (its own use moves meanwhile: client buffers).
FULL_MARGIN_BYTES = 300_000
WORKFLOW = {"nodes": [{"id": f"n{i}", "prompt": "x" * 200} for i in range(40)]}


@pytest.fixture
def full_redis():
    """A redis-server with a `maxmemory` just above what it uses empty, `noeviction` (render.yaml's policy)."""
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    used = admin.info("memory")["used_memory"]
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", used + HEADROOM_BYTES)
    yield server, admin
    admin.close()
    server.close()


def fill_with_ended_calls(store, ended_days_ago: float) -> int:
    """Old ended calls (each with its own workflow, no version hash) until Redis refuses a write; how many fit."""
    ended_at = time.time() - ended_days_ago * SECONDS_PER_DAY
    count = 0
    while True:
        tracking_id = f"call_{count}"
        try:
            store.create_call(CallRecord(tracking_id=tracking_id, workflow=WORKFLOW, created_at=ended_at - 60,
                                         messages=[{"role": "user", "content": "hello"}]))
            store.append_status(tracking_id, "completed", 5, {"CallStatus": "completed"}, received_at=ended_at)
        except StoreError as exc:
            assert "maxmemory" in str(exc), exc
            return count
        count += 1
        assert count < 10_000, "maxmemory was never reached"


def test_a_full_redis_refuses_a_new_call_whole_and_the_retention_job_frees_it(full_redis):
    server, admin = full_redis
    store = build_store("", server.url)
    stored = fill_with_ended_calls(store, ended_days_ago=90)
    assert stored > 0
    pin_full(admin)  # however Redis' own use moves meanwhile
    with pytest.raises(StoreError):
        store.create_call(CallRecord(tracking_id="call_new", workflow=WORKFLOW))
    assert store.get_call("call_new") is None  # nothing half-written
    assert store.count_calls() >= stored  # reads still work while full

    # Every write is refused, the lease's too: the purge must still run, or Redis stays full for good.
    purged = purge_if_due(store, retention_days=30, interval_s=3600, holder="worker-1",
                          transcript_retention_days=30)
    assert purged >= stored  # (the last call may be stored without its status: it never ended)
    assert store.count_calls() == 0
    store.create_call(CallRecord(tracking_id="call_new", workflow=WORKFLOW))
    assert store.get_call("call_new").workflow == WORKFLOW
    store.close()


def fill_with_other_keys(admin: redis.Redis) -> None:
    """Whatever else fills the Redis (the reply cache, another app): 2 MB, then a maxmemory below what is used, so
    Redis stays full however its own use moves meanwhile, until those keys are deleted."""
    admin.config_set("maxmemory", 0)
    for index in range(200):
        admin.set(f"other:{index}", "x" * 10_000)
    pin_full(admin)


def pin_full(admin: redis.Redis) -> None:
    """maxmemory a little below what Redis uses now: every write is refused until something is deleted."""
    admin.config_set("maxmemory", admin.info("memory")["used_memory"] - FULL_MARGIN_BYTES)


def test_a_full_redis_answers_the_api_with_a_503_that_says_it_is_full_and_health_says_so(
        full_redis, tmp_path, fake_twilio):
    """Not "try again shortly": a full Redis stays full until the operator (or retention, or the cache's expiry)
    frees it. The web app shows the error; /health tells the operator; nothing is half-written."""
    import structlog.testing

    server, admin = full_redis
    env = {**base_env(tmp_path, fake_twilio), "REDIS_URL": server.url}
    client = create_app(env).test_client()
    first = client.post("/api/make-call", json=make_call_body()).get_json()
    store = client.application.extensions["callweaver"].store
    calls_before = store.count_calls()
    fill_with_other_keys(admin)

    with structlog.testing.capture_logs() as logs:
        placed = client.post("/api/make-call-optimized", json=make_call_body())
        status = Signer(client).post(f"/api/call-status-optimized?trackingId={first['trackingId']}",
                                     {"CallSid": first["callSid"], "CallStatus": "completed", "SequenceNumber": "4"})
    for resp in (placed, status):
        assert resp.status_code == 503, resp.get_data(as_text=True)
        assert resp.get_json()["success"] is False and "full" in resp.get_json()["error"]
        assert resp.headers.get("Retry-After")
    assert [line.get("full") for line in logs if line["event"] == "state_unavailable"] == [True, True]

    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["status"] == "degraded"
    memory = health.get_json()["checks"]["store"]["memory"]
    assert memory["policy"] == "noeviction" and memory["usedBytes"] >= memory["maxBytes"] > 0
    assert any("full" in warning for warning in health.get_json()["warnings"])

    admin.delete(*admin.keys("other:*"))
    assert client.post("/api/make-call-optimized", json=make_call_body()).status_code == 200
    assert store.count_calls() == calls_before + 1
    assert store.get_call(first["trackingId"]).ended_at is None  # the refused callback wrote nothing
    assert not [warning for warning in client.get("/health").get_json()["warnings"] if "Redis" in warning]


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_health_warns_when_redis_may_evict_what_the_service_keeps(policy, full_redis, tmp_path, fake_twilio):
    """allkeys-*: a live call's record or an index may vanish; volatile-*: the rate-limit windows (the daily cap
    restarts) and relay-socket claims. Only noeviction loses nothing silently."""
    server, admin = full_redis
    admin.config_set("maxmemory-policy", policy)
    client = create_app({**base_env(tmp_path, fake_twilio), "REDIS_URL": server.url}).test_client()
    body = client.get("/health").get_json()
    assert body["checks"]["store"]["memory"]["policy"] == policy
    assert any(f"maxmemory-policy {policy}" in warning and "noeviction" in warning for warning in body["warnings"])


def test_a_redis_that_refuses_info_is_still_healthy_without_memory_facts(tmp_path, fake_twilio):
    """Some managed Redis services disable INFO: /health must not turn that into an unhealthy store (a deploy whose
    health check fails never goes live)."""
    with RedisServer(extra_args=("--rename-command", "INFO", "")) as server:
        client = create_app({**base_env(tmp_path, fake_twilio), "REDIS_URL": server.url}).test_client()
        health = client.get("/health")
    assert health.status_code == 200, health.get_data(as_text=True)
    store = health.get_json()["checks"]["store"]
    assert store["ok"] is True and "memory" not in store


def test_purging_every_call_leaves_only_what_is_kept_by_design():
    """No index entry, CallSid entry, turn-time member or claim outlives its call (each would grow for ever)."""
    with RedisServer() as server:
        store = build_store("", server.url, key_prefix="cw:")
        now = time.time()
        for number in range(20):
            tracking_id = f"call_{number}"
            store.create_call(CallRecord(tracking_id=tracking_id, call_sid=f"CA{number:032d}", workflow=WORKFLOW,
                                         workflow_hash="v1", created_at=now - 100), workflow_id="wf_1")
            store.record_placed(tracking_id, f"CB{number:032d}", "queued")  # a second CallSid replaces the first
            store.claim_relay_socket(tracking_id, "owner", 0, 30)
            for turn in range(3):
                store.commit_turn(tracking_id, {"current_node": "n1"}, {"n": turn}, {"series": 1.0},
                                  transcript_entry={"said": "hi"})
            store.amend_last_turn(tracking_id, {"closing": None})
            store.append_status(tracking_id, "ringing", 1, {})
            if number % 2:
                store.append_status(tracking_id, "completed", 2, {}, received_at=now - 50)
            # the others' end is never recorded: retention takes them once no call could still run
        assert store.purge(now + 4 * 3600) == 20

        admin = redis.Redis.from_url(server.url, decode_responses=True)
        left = sorted(admin.keys("*"))
        admin.close()
        store.close()
    # The version went with its last call; the flow saved under its id stays (an inbound call to `?id=` reads it).
    assert left == ["cw:counters", "cw:workflow:wf_1"], left


def test_a_full_redis_drops_the_workflow_versions_of_the_calls_it_purges(full_redis):
    """Each edited flow stores its version once (11-15 KB): on a full Redis the purge must free those of the calls
    it deletes too, with the delete-only script, while the version of a remaining call stays."""
    server, admin = full_redis
    store = build_store("", server.url)
    now = time.time()
    store.create_call(CallRecord(tracking_id="live", workflow=WORKFLOW, workflow_hash="v_live"))
    count = 0
    while True:
        ended_at = now - 90 * SECONDS_PER_DAY
        flow = {**WORKFLOW, "edit": count}
        try:
            store.create_call(CallRecord(tracking_id=f"call_{count}", workflow=flow, workflow_hash=f"v_{count}",
                                         created_at=ended_at - 60))
            store.append_status(f"call_{count}", "completed", 5, {}, received_at=ended_at)
        except StoreError as exc:
            assert "maxmemory" in str(exc), exc
            break
        count += 1
        assert count < 10_000, "maxmemory was never reached"
    assert count > 0
    pin_full(admin)
    with pytest.raises(StoreError):
        store.create_call(CallRecord(tracking_id="refused", workflow=WORKFLOW, workflow_hash="v_refused"))

    assert store.purge(now - 30 * SECONDS_PER_DAY) >= count
    assert sorted(admin.keys("cw:workflow_version:*")) == [b"cw:workflow_version:v_live"]
    assert store.get_call("live").workflow == WORKFLOW
    store.close()


def test_a_full_redis_refuses_an_end_reason_change_as_full(full_redis):
    """change_meta (END_REASON_RULE's writes: end-call's claim, an end reason) at `maxmemory` is a StoreFull, as
    every other write: the API's 503 says the store is full, and the call's meta is left as it was."""
    from callweaver.store import StoreFull, end_call_claimed

    server, admin = full_redis
    store = build_store("", server.url)
    store.create_call(CallRecord(tracking_id="call_1"))
    fill_with_other_keys(admin)
    with pytest.raises(StoreFull):
        store.change_meta("call_1", end_call_claimed("a", time.time(), 11.0))
    assert store.get_call("call_1").meta == {}
    store.close()


def test_a_full_redis_refusal_never_carries_what_the_write_held(full_redis):
    """redis-py names a refused pipelined command with its arguments (`Command # 1 (HSET cw:call:… meta {…})`): the
    StoreFull of a meta write at `maxmemory` carried the call's meta (a Gather call's last answer, what the caller
    said) into the `state_unavailable` log line."""
    from callweaver.store import StoreFull

    server, admin = full_redis
    store = build_store("", server.url)
    store.create_call(CallRecord(tracking_id="call_1"))
    fill_with_other_keys(admin)
    for write in (lambda: store.update_meta("call_1", {"said": "my card number is 4242"}),
                  lambda: store.change_meta("call_1", lambda meta, ended: {**meta, "said": "my card number is 4242"})):
        with pytest.raises(StoreFull) as refused:
            write()
        assert "maxmemory" in str(refused.value) and "4242" not in str(refused.value), refused.value
    store.close()
