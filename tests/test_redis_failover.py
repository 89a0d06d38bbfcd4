"""A managed Redis failing over: its host name moves to the promoted replica, while connections already open stay
on the old primary, now a read-only replica that answers every write with READONLY. Without dropping those
connections every write would fail until the process restarts."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import redis

from callweaver.store import CallRecord, StoreError, build_store
from tests.fakes.loopback import LoopbackServer, splice
from tests.fakes.redis_server import RedisServer


class SwitchableProxy(LoopbackServer):
    """A TCP forwarder, as the managed service's host name: new connections go to `target_port`, open ones stay."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        splice(conn, socket.create_connection(("127.0.0.1", self.target_port)))


@pytest.fixture
def failover():
    old, new = RedisServer().start(), RedisServer().start()
    proxy = SwitchableProxy(old.port)
    yield old, new, proxy
    proxy.stop()
    old.close()
    new.close()


def make_replica(replica: RedisServer, primary: RedisServer) -> None:
    """`replica` becomes a read-only copy of `primary`, synced before this returns."""
    admin = redis.Redis(port=replica.port)
    admin.replicaof("127.0.0.1", primary.port)
    deadline = time.monotonic() + 10
    while admin.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.05)
    admin.close()


def fail_over(old: RedisServer, new: RedisServer, proxy: SwitchableProxy) -> None:
    """The old primary becomes a replica of the new one, and the name points at the new one."""
    make_replica(old, new)
    proxy.target_port = new.port


def test_the_store_writes_to_the_promoted_primary_after_a_failover(failover):
    old, new, proxy = failover
    store = build_store("", f"redis://127.0.0.1:{proxy.port}/0")
    store.create_call(CallRecord(tracking_id="before"))
    fail_over(old, new, proxy)
    # A WATCH/MULTI write (circuit breakers, meta) on the pooled connection, left on the old primary, is replayed
    # once on a new one.
    assert store.update_shared("breaker", lambda current: {"failures": 1}) == ({"failures": 1}, True)

    for number in range(3):
        try:
            store.create_call(CallRecord(tracking_id=f"after_{number}"))
        except StoreError as exc:
            assert "READONLY" in str(exc) or "read only" in str(exc).lower(), exc
    assert store.get_call("after_2") is not None, "writes still go to the old primary, now read-only"
    assert redis.Redis(port=new.port).exists("cw:call:after_2")
    store.close()


def test_make_call_works_again_after_a_failover(failover, tmp_path, fake_twilio):
    """The rate limits' windows and the reply cache live in the same Redis: their connections move too."""
    from callweaver import create_app
    from tests.conftest import base_env
    from tests.helpers import make_call_body

    old, new, proxy = failover
    client = create_app({**base_env(tmp_path, fake_twilio),
                         "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"}).test_client()
    assert client.post("/api/make-call-optimized", json=make_call_body()).status_code == 200
    assert client.get("/api/health-optimized").get_json()["services"]["cache"]["ok"] is True
    fail_over(old, new, proxy)

    answers = [client.post("/api/make-call-optimized", json=make_call_body()).status_code for _ in range(3)]
    assert answers[-1] == 200, answers
    health = [client.get("/api/health-optimized").get_json()["services"]["cache"]["ok"] for _ in range(3)]
    assert health[-1] is True, health


def test_a_read_only_redis_fails_watched_writes_instead_of_looping(failover):
    """A connection dropped under a WATCH (READONLY included) is a WatchError in redis-py, whose transaction() then
    replays forever: on a Redis that stays read-only (the name not moved yet, or a REDIS_URL naming a replica) the
    circuit breakers' update, a call's meta merge or change (END_REASON_RULE) and the transcript purge must fail as
    StoreError, as every other write does."""
    old, new, proxy = failover
    store = build_store("", f"redis://127.0.0.1:{proxy.port}/0")
    store.create_call(CallRecord(tracking_id="ended", ended_at=1.0, messages=[{"role": "user", "content": "hi"}]))
    make_replica(new, old)  # `new` is a read-only copy of the primary the proxy still names
    proxy.target_port = new.port
    store.close()  # the read-only copy only from now on
    outcomes: dict[str, str] = {}

    def attempt(name: str, write) -> None:
        try:
            write()
            outcomes[name] = "written"
        except StoreError as exc:
            outcomes[name] = str(exc)

    for name, write in (("update_shared", lambda: store.update_shared("breaker", lambda current: {"failures": 1})),
                        ("update_meta", lambda: store.update_meta("ended", {"note": 1})),
                        ("change_meta", lambda: store.change_meta("ended", lambda meta, ended: {**meta, "n": 1})),
                        ("purge_transcripts", lambda: store.purge_transcripts(time.time()))):
        worker = threading.Thread(target=attempt, args=(name, write), daemon=True)
        worker.start()
        worker.join(5)
        assert name in outcomes, f"{name} still retrying against a read-only Redis after 5 s"
        assert "ReadOnlyError" in outcomes[name], outcomes[name]
    store.close()
