"""Two instances (two apps) on one Redis: Twilio's webhooks for one call may land on either, and a retried
callback on the other one than the first delivery. What one instance recorded, the other sees, and a call's end
is acted on once across both."""
from __future__ import annotations

import threading
import time

import pytest

from callweaver import create_app
from tests.conftest import Signer, base_env
from tests.fakes.redis_server import RedisServer
from tests.helpers import make_call_body

SECRET = "report-secret-0123456789"


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def instances(tmp_path, fake_twilio, redis_server, receiver):
    """Two apps with their own disks (CALLWEAVER_DB, CACHE_DIR), sharing only REDIS_URL."""
    apps = []
    for name in ("a", "b"):
        env = {**base_env(tmp_path / name, fake_twilio), "REDIS_URL": redis_server.url,
               "CALL_REPORT_URL": receiver.url, "CALL_REPORT_SECRET": SECRET, "MAX_CALLS_PER_DAY": "3"}
        apps.append(create_app(env).test_client())
    return apps


def test_a_terminal_callback_delivered_to_both_instances_at_once_ends_the_call_once(instances, receiver):
    instance_a, instance_b = instances
    placed = instance_a.post("/api/make-call", json=make_call_body()).get_json()
    path = f"/api/call-status-optimized?trackingId={placed['trackingId']}"
    form = {"CallSid": placed["callSid"], "CallStatus": "completed", "SequenceNumber": "3", "CallDuration": "42"}
    answers: list[int] = []
    start = threading.Barrier(2)

    def deliver(client) -> None:
        start.wait()
        answers.append(Signer(client).post(path, form).status_code)

    threads = [threading.Thread(target=deliver, args=(client,)) for client in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert answers == [200, 200]
    assert len(receiver.wait_for(1)) == 1
    time.sleep(0.5)  # a second report would have been sent by now
    assert len(receiver.reports) == 1
    history = instance_b.application.extensions["callweaver"].store.status_history(placed["trackingId"])
    assert [(entry["status"], entry["sequence"]) for entry in history] == [("completed", 3)]


def test_the_calls_per_day_cap_counts_both_instances_calls(instances):
    instance_a, instance_b = instances
    answers = [client.post("/api/make-call", json=make_call_body()).status_code
               for client in (instance_a, instance_b, instance_a, instance_b)]
    assert answers == [200, 200, 200, 429]


def test_two_deployments_with_their_own_key_prefix_on_one_redis_see_nothing_of_each_other(
        tmp_path, fake_twilio, fake_llm, redis_server):
    """Staging and production on one Render Key Value instance (REDIS_KEY_PREFIX): neither sees the other's calls,
    uses the other's rate limits or calls-per-day cap, or reads the other's reply cache, and every key either
    writes starts with its own prefix."""
    import redis

    from callweaver.engine.cache import CachedReply

    apps = []
    for name in ("production", "staging"):
        env = {**base_env(tmp_path / name, fake_twilio, fake_llm), "REDIS_URL": redis_server.url,
               "REDIS_KEY_PREFIX": f"{name}:", "MAX_CALLS_PER_DAY": "1", "RATE_LIMIT_CHAT": "1 per minute"}
        apps.append(create_app(env).test_client())
    production, staging = apps
    services = [client.application.extensions["callweaver"] for client in apps]

    placed = production.post("/api/make-call", json=make_call_body()).get_json()
    assert placed["success"] is True
    assert services[1].store.get_call(placed["trackingId"]) is None and services[1].store.count_calls() == 0
    assert services[1].store.find_tracking_id(placed["callSid"]) is None
    # Each has its own calls-per-day cap (1) and per-client windows.
    assert production.post("/api/make-call", json=make_call_body()).status_code == 429
    assert staging.post("/api/make-call", json=make_call_body()).status_code == 200
    chat = {"messages": [{"role": "user", "content": "hello"}]}
    assert [client.post("/api/chat", json=chat).status_code for client in (production, production, staging)] == [
        200, 429, 200]

    caches = [each.reply_cache for each in services]
    key_args = {"workflow_hash": "v1", "node_id": "start", "language": "en-US", "heard_before": "Hi",
                "utterance": "I want to buy a house"}
    assert caches[0].put(caches[0].key(**key_args), CachedReply("Great!", "azure", time.time(), "en-US", "start"))
    assert caches[0].get(caches[0].key(**key_args)) is not None
    assert caches[1].get(caches[1].key(**key_args)) is None
    assert [cache.claim_prewarm("flow:en-US", 600) for cache in caches] == [True, True]

    admin = redis.Redis.from_url(redis_server.url, decode_responses=True)
    keys = admin.keys("*")
    admin.close()
    assert keys and not [key for key in keys if not key.startswith(("production:", "staging:"))], keys
    for prefix in ("production:", "staging:"):  # calls, limits and the cache, under each prefix
        mine = [key for key in keys if key.startswith(prefix)]
        assert any(key.startswith(prefix + "call:") for key in mine), mine
        assert any("calls-per-day" in key for key in mine) and any(key.startswith(prefix + "reply:") for key in mine)
