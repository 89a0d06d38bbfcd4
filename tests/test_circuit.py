"""Circuit breaker records shared through the store: two breakers stand for two workers (or two instances)."""
from __future__ import annotations

import pytest

from callweaver.engine.circuit import CircuitBreaker, LocalCircuitStates
from callweaver.store import StoreError
from callweaver.store.sqlite import SQLiteStore
from tests.fakes.redis_server import RedisServer

COOLDOWN_S = 30.0


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request, tmp_path):
    if request.param == "sqlite":
        yield SQLiteStore(str(tmp_path / "cw.sqlite3"))
        return
    from callweaver.store.redis import RedisStore
    with RedisServer() as redis:
        store = RedisStore(redis.url)
        yield store
        store.close()


def breakers(store, count: int = 2) -> list[CircuitBreaker]:
    return [CircuitBreaker("azure", store, failures=3, cooldown_s=COOLDOWN_S) for _ in range(count)]


def test_failures_from_every_worker_add_up_to_one_open_circuit(shared_store):
    a, b = breakers(shared_store)
    now = 1000.0
    assert a.acquire(now) is not None and b.acquire(now) is not None
    a.record_failure(now)
    b.record_failure(now)
    assert a.snapshot(now)["state"] == "closed" and b.snapshot(now)["consecutiveFailures"] == 2
    b.record_failure(now + 1)
    assert a.acquire(now + 2) is None and b.acquire(now + 2) is None
    assert a.snapshot(now + 2) == {"state": "open", "consecutiveFailures": 3, "openedAt": now + 1}


def test_one_worker_holds_the_half_open_probe_and_its_result_counts_for_all(shared_store):
    a, b = breakers(shared_store)
    for _ in range(3):
        a.record_failure(1000.0)
    later = 1000.0 + COOLDOWN_S + 1
    probe = b.acquire(later)
    assert probe is not None and probe.probe_until is not None
    assert a.acquire(later) is None  # the probe is taken
    assert a.snapshot(later)["state"] == "half_open"
    b.record_failure(later)  # the probe failed: open for another cooldown
    assert a.acquire(later + 1) is None and a.snapshot(later + 1)["state"] == "open"

    again = later + COOLDOWN_S + 1
    probe = a.acquire(again)
    assert probe is not None and b.acquire(again) is None
    a.record_success(probe)
    assert b.snapshot(again) == {"state": "closed", "consecutiveFailures": 0, "openedAt": None}
    assert b.acquire(again) is not None


def test_a_cancelled_probe_lets_another_worker_probe(shared_store):
    a, b = breakers(shared_store)
    for _ in range(3):
        a.record_failure(1000.0)
    later = 1000.0 + COOLDOWN_S + 1
    assert a.acquire(later) is not None and b.acquire(later) is None
    a.release_probe()
    assert b.acquire(later) is not None


def test_a_success_after_some_failures_resets_the_shared_count(shared_store):
    a, b = breakers(shared_store)
    a.record_failure(1000.0)
    a.record_failure(1000.0)
    b.record_success(b.acquire(1001.0))
    a.record_failure(1002.0)
    assert a.acquire(1003.0) is not None and a.snapshot(1003.0)["consecutiveFailures"] == 1


class BrokenStore:
    def read_shared(self, key):
        raise StoreError("redis store: ConnectionError")

    def update_shared(self, key, change):
        raise StoreError("redis store: ConnectionError")


def test_a_store_outage_falls_back_to_this_workers_own_breaker():
    breaker = CircuitBreaker("azure", BrokenStore(), failures=2, cooldown_s=COOLDOWN_S)
    assert breaker.acquire(1000.0) is not None
    breaker.record_failure(1000.0)
    breaker.record_failure(1000.0)
    assert breaker.acquire(1001.0) is None and breaker.snapshot(1001.0)["state"] == "open"


def test_the_common_turn_reads_once_and_writes_nothing():
    class CountingStates(LocalCircuitStates):
        reads = writes = 0

        def read_shared(self, key):
            CountingStates.reads += 1
            return super().read_shared(key)

        def update_shared(self, key, change):
            CountingStates.writes += 1
            return super().update_shared(key, change)

    breaker = CircuitBreaker("azure", CountingStates(), failures=3, cooldown_s=COOLDOWN_S)
    for _ in range(5):
        breaker.record_success(breaker.acquire(1000.0))
    assert (CountingStates.reads, CountingStates.writes) == (5, 0)


def test_a_request_sent_before_the_circuit_opened_that_fails_later_does_not_extend_it(shared_store):
    a, b = breakers(shared_store)
    for _ in range(3):
        a.record_failure(1000.0)
    b.record_failure(1010.0)  # b's request was in flight when a opened the circuit
    assert b.snapshot(1010.0) == {"state": "open", "consecutiveFailures": 4, "openedAt": 1000.0}
    assert b.acquire(1000.0 + COOLDOWN_S + 1) is not None  # the cooldown still ends on time
