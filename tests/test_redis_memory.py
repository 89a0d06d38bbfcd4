"""A small Redis (Render Key Value's free plan: 25 MB) that fills up: with `noeviction` every write is refused once
`maxmemory` is reached, so the service must say so (503, a StoreError) without half-written calls, and the retention
job must still be able to free memory, or the store stays full for good."""
from __future__ import annotations

import time

import pytest
import redis

from callweaver.retention import purge_if_due
from callweaver.store import CallRecord, StoreError, build_store
from callweaver.units import SECONDS_PER_DAY
from tests.fakes.redis_server import RedisServer

# Headroom above the empty server's own use: room for a few dozen calls with their statuses.
HEADROOM_BYTES = 600_000
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
    with pytest.raises(StoreError):
        store.create_call(CallRecord(tracking_id="call_new", workflow=WORKFLOW))
    assert store.get_call("call_new") is None  # nothing half-written
    assert store.count_calls() == store.count_calls()  # reads still work while full

    # Every write is refused, the lease's too: the purge must still run, or Redis stays full for good.
    purged = purge_if_due(store, retention_days=30, interval_s=3600, holder="worker-1",
                          transcript_retention_days=30)
    assert purged == stored
    assert store.count_calls() == 0
    store.create_call(CallRecord(tracking_id="call_new", workflow=WORKFLOW))
    assert store.get_call("call_new").workflow == WORKFLOW
    store.close()
