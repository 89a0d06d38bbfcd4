"""Retention is a periodic job that purges once per store (not once per worker), and an operator command."""
from __future__ import annotations

import time

from callweaver import create_app
from callweaver.retention import purge_if_due
from callweaver.store import CallRecord, build_store
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.test_store import redis_server, store_spec  # noqa: F401  (fixtures: both backends)

DAY = 86400


def _aged_and_fresh_calls(store) -> None:
    old = time.time() - 40 * DAY
    store.create_call(CallRecord(tracking_id="call_old", created_at=old, ended_at=old + 60, status="completed"))
    store.create_call(CallRecord(tracking_id="call_new", ended_at=time.time(), status="completed"))


def test_workers_sharing_a_store_purge_once_per_interval(store_spec):
    workers = [build_store(**store_spec) for _ in range(3)]
    try:
        _aged_and_fresh_calls(workers[0])
        results = [purge_if_due(store, retention_days=30, interval_s=0.5, holder=f"worker-{i}")
                   for i, store in enumerate(workers)]
        assert results == [1, None, None]  # one worker purged; the others found the period taken
        assert workers[1].get_call("call_old") is None and workers[1].get_call("call_new") is not None
        time.sleep(0.7)  # the next period
        again = [purge_if_due(store, retention_days=30, interval_s=0.5, holder=f"worker-{i}")
                 for i, store in enumerate(reversed(workers))]
        assert again == [0, None, None]
    finally:
        for store in workers:
            store.close()


def test_operator_command_purges_at_once(env):
    app = create_app(env)
    _aged_and_fresh_calls(app.extensions["callweaver"].store)
    result = app.test_cli_runner().invoke(args=["purge-calls"])
    assert result.exit_code == 0, result.output
    assert "purged 1 call(s) that ended more than 30 day(s) ago" in result.output
    store = app.extensions["callweaver"].store
    assert store.get_call("call_old") is None and store.get_call("call_new") is not None
    result = app.test_cli_runner().invoke(args=["purge-calls", "--older-than-days", "0"])
    assert result.exit_code != 0  # at least one day


def test_the_production_server_purges_on_its_own_without_any_call(tmp_path):
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    env = {**base_env(tmp_path, twilio), "RETENTION_INTERVAL_S": "1"}
    env.pop("PUBLIC_BASE_URL")
    store = build_store(env["CALLWEAVER_DB"])
    _aged_and_fresh_calls(store)
    server = LiveServer(env, workers=2).start()
    try:
        deadline = time.monotonic() + 20
        while store.get_call("call_old") is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.get_call("call_old") is None and store.get_call("call_new") is not None
    finally:
        server.stop()
        twilio.stop()
        store.close()
