"""/metrics behaves like Prometheus metrics: cumulative counters that never go down, cumulative histogram
buckets, written with the turn in the same store write (SQLite and Redis); windowed JSON reads only new rows."""
from __future__ import annotations

import sqlite3
import time

from prometheus_client.parser import text_string_to_metric_families

from callweaver.engine.metrics import RecentTurns
from callweaver.engine.prometheus import series_key, turn_counters
from callweaver.store import CallRecord, build_store
from tests.test_gather_flow import GatherCall
from tests.scripted_brain import real_estate_brain
from tests.test_store import redis_server, store_spec  # noqa: F401  (fixtures: both backends)

DAY = 86400


def _samples(client) -> dict[tuple, float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _counting(samples: dict[tuple, float]) -> dict[tuple, float]:
    """Counter, histogram bucket, count and sum samples: the ones that must never decrease."""
    return {k: v for k, v in samples.items() if k[0].endswith(("_total", "_bucket", "_count", "_sum"))}


def _age_every_turn(db_path: str, by_s: float) -> None:
    """Pre-aged rows: as if the turns had been taken `by_s` earlier (time passing, without waiting)."""
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE cw_turns SET at = at - ?", (by_s,))


def test_counters_never_decrease_while_turns_age_out_of_every_window_and_are_purged(
        app, client, twilio, fake_twilio, fake_llm, env):
    fake_llm.responder = real_estate_brain
    call = GatherCall(app, client, twilio, fake_twilio)
    root = call.answer()
    for speech in ("I want to buy a house", "Sorry?"):
        root = call.say(root, speech)
    first = _counting(_samples(client))
    turns = {k: v for k, v in first.items() if k[0] == "callweaver_turns_total"}
    assert sum(turns.values()) == 2

    _age_every_turn(env["CALLWEAVER_DB"], 2 * DAY)  # older than the old 24 h scrape window
    second = _counting(_samples(client))
    assert second == first

    call2 = GatherCall(app, client, twilio, fake_twilio)
    call2.say(call2.answer(), "I want to sell my flat")
    _age_every_turn(env["CALLWEAVER_DB"], 40 * DAY)
    store = app.extensions["callweaver"].store
    for tracking_id in (call.tracking_id, call2.tracking_id):
        store.update_call(tracking_id, ended_at=time.time() - 40 * DAY, status="completed")
    assert store.purge(time.time() - 30 * DAY) == 2  # retention removed every turn
    third = _counting(_samples(client))
    assert all(third.get(k, 0) >= v for k, v in first.items())
    assert sum(v for k, v in third.items() if k[0] == "callweaver_turns_total") == 3


def test_histogram_buckets_are_cumulative(app, client, twilio, fake_twilio, fake_llm):
    fake_llm.responder = real_estate_brain
    call = GatherCall(app, client, twilio, fake_twilio)
    root = call.answer()
    for speech in ("Hello?", "I want to buy a house", "A three bedroom house"):
        root = call.say(root, speech)
    samples = _samples(client)
    buckets = sorted(((dict(labels)["le"], v) for (name, labels), v in samples.items()
                      if name == "callweaver_turn_first_token_ms_bucket"),
                     key=lambda item: float(item[0]))
    values = [v for _, v in buckets]
    assert values == sorted(values) and buckets[-1][0] == "+Inf"
    count = sum(v for (name, _), v in samples.items() if name == "callweaver_turn_first_token_ms_count")
    assert buckets[-1][1] == count == 3


def test_the_store_adds_counters_in_the_same_write_as_the_turn(store_spec):
    store = build_store(**store_spec)
    try:
        store.create_call(CallRecord(tracking_id="call_1"))
        turn = {"path": "optimized", "provider": "azure", "firstTokenMs": 7.5, "providerTtftMs": 5.0,
                "source": "llm", "failovers": [{"provider": "openai", "reason": "timeout"}]}
        for _ in range(3):
            store.append_turn("call_1", turn, counters=turn_counters(turn))
        labels = {"path": "optimized", "provider": "azure", "cache": "miss"}
        counters = store.counters()
        assert counters[series_key("callweaver_turns", labels)] == 3
        assert counters[series_key("callweaver_turn_first_token_ms_bucket", {**labels, "le": "10"})] == 3
        assert counters[series_key("callweaver_turn_first_token_ms_sum", labels)] == 22.5
        assert counters[series_key("callweaver_provider_failures", {"provider": "openai", "reason": "timeout"})] == 3
        store.update_call("call_1", ended_at=1.0)
        counters = {k: v for k, v in store.counters().items() if not k.startswith('["callweaver_calls",')}
        store.purge(time.time())
        assert store.turns("call_1") == [] and {
            k: v for k, v in store.counters().items() if not k.startswith('["callweaver_calls",')} == counters  # cumulative: purge keeps them
        store.create_call(CallRecord(tracking_id="call_2"))
        store.append_status("call_2", "completed", 3, {})
        store.append_status("call_2", "completed", 3, {})  # a retried callback: counted once
        store.create_call(CallRecord(tracking_id="call_3"))
        store.update_call("call_3", status="failed", ended_at=time.time())  # Twilio refused the call
        store.update_call("call_3", ended_at=time.time())
        ended = {k: v for k, v in store.counters().items() if k.startswith('["callweaver_calls",')}
        assert ended == {series_key("callweaver_calls", {"status": "queued"}): 1,  # call_1, ended while queued
                         series_key("callweaver_calls", {"status": "completed"}): 1,
                         series_key("callweaver_calls", {"status": "failed"}): 1}
    finally:
        store.close()


class _CountingStore:
    """The real store, counting the turn rows each read returns."""

    def __init__(self, store):
        self.store, self.rows_read = store, []

    def recent_turns(self, since: float) -> list[dict]:
        rows = self.store.recent_turns(since)
        self.rows_read.append(len(rows))
        return rows


def test_windowed_figures_read_only_new_rows_on_each_poll(tmp_path):
    store = build_store(str(tmp_path / "cw.sqlite3"))
    now = time.time()
    store.create_call(CallRecord(tracking_id="call_1"))
    for i in range(200):  # the last half hour, all older than the poll overlap
        store.append_turn("call_1", {"path": "optimized", "firstTokenMs": 10.0, "at": now - 1800 + i * 8})
    counting = _CountingStore(store)
    recent = RecentTurns(counting)
    assert len(recent.since(time.time() - 3600)) == 200
    store.append_turn("call_1", {"path": "optimized", "firstTokenMs": 12.0})
    turns = recent.since(time.time() - 3600)
    assert len(turns) == 201 and turns[-1]["firstTokenMs"] == 12.0
    assert counting.rows_read == [200, 1]  # the second poll read the new turn, not the window again
    store.close()
