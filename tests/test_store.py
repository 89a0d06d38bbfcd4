"""One behaviour suite for the call store, run against both backends (SQLite and a real Redis)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import redis

from callweaver.units import MAX_CALL_DURATION_LIMIT_S
from callweaver.store import CallRecord, Store, StoreError, build_store
from callweaver.store.redis import RedisStore
from callweaver.store.sqlite import SQLiteStore
from tests.fakes.redis_server import RedisServer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANTONESE = "你好，我想查詢一下旺角嘅兩房單位，唔該晒！"


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def store_spec(request, tmp_path) -> dict:
    """build_store arguments for a fresh, empty store: a new SQLite file or a new Redis key prefix."""
    if request.param == "sqlite":
        return {"db_path": str(tmp_path / "state" / "cw.sqlite3")}
    server = request.getfixturevalue("redis_server")
    return {
        "db_path": str(tmp_path / "unused.sqlite3"),
        "redis_url": server.url,
        "key_prefix": f"cwtest:{uuid.uuid4().hex}:",
    }


@pytest.fixture
def store(store_spec):
    built = build_store(**store_spec)
    yield built
    built.close()


def make_record(tracking_id: str = "call_1", **fields) -> CallRecord:
    return CallRecord(tracking_id=tracking_id, **fields)


# -- records -------------------------------------------------------------------


def test_both_backends_satisfy_the_store_protocol(store):
    assert isinstance(store, Store)


def test_created_call_reads_back_identically_including_cantonese_text(store):
    record = make_record(
        call_sid="CA" + "1" * 32,
        workflow_id="wf_real_estate",
        workflow={"nodes": [{"id": "start", "data": {"firstMessage": CANTONESE}}], "edges": []},
        workflow_hash="abc123",
        language="zh-HK",
        greeting=CANTONESE,
        to="+85291234567",
        from_number="+15005550006",
        variables={"區域": "旺角", "rooms": 2, "budget": 8.5, "ok": True, "none": None},
        messages=[{"role": "assistant", "content": CANTONESE}, {"role": "user", "content": "😀 係呀"}],
        credentials="gAAAAB-opaque",
        meta={"nested": {"list": [1, "二", 3.0]}},
    )
    store.create_call(record)

    assert store.get_call("call_1") == record


def test_record_dict_round_trip_is_json_safe_and_ignores_unknown_keys():
    record = make_record(greeting=CANTONESE, variables={"a": [1, 2]})
    data = json.loads(json.dumps(record.to_dict(), ensure_ascii=False))
    data["field_from_a_newer_worker"] = 1

    assert CallRecord.from_dict(data) == record


def test_new_record_starts_with_updated_at_equal_to_created_at():
    record = make_record(created_at=1000.0)

    assert record.updated_at == 1000.0


def test_unknown_call_reads_as_none(store):
    assert store.get_call("nope") is None


def test_creating_an_existing_tracking_id_raises_store_error_and_keeps_the_first(store):
    store.create_call(make_record(greeting="first"))

    with pytest.raises(StoreError):
        store.create_call(make_record(greeting="second"))
    assert store.get_call("call_1").greeting == "first"


def test_a_placed_call_is_stored_as_update_call_would_store_it(store_spec):
    """make-call's last write (record_placed) leaves the same record, SID look-up and call-log columns as
    update_call(call_sid=..., status=...), and keeps what others wrote meanwhile."""
    sid = "CA" + "7" * 32
    stores = [build_store(**store_spec), build_store(**{**store_spec, "db_path": store_spec["db_path"] + "-2",
                                                          **({"key_prefix": store_spec["key_prefix"] + "2:"}
                                                             if "key_prefix" in store_spec else {})})]
    try:
        for each in stores:
            each.create_call(make_record(to="+15551234567", meta={"homeLanguage": "en-US"}, created_at=1000.0))
            each.update_meta("call_1", {"error": "kept"})
        assert stores[0].record_placed("call_1", sid, "ringing") is True
        stores[1].update_call("call_1", call_sid=sid, status="ringing")
        placed, updated = (each.get_call("call_1") for each in stores)
        assert placed.updated_at > 1000.0 and updated.updated_at > 1000.0
        assert dataclasses.replace(placed, updated_at=0.0) == dataclasses.replace(updated, updated_at=0.0)
        assert placed.call_sid == sid and placed.status == "ringing" and placed.meta["error"] == "kept"
        assert [each.find_tracking_id(sid) for each in stores] == ["call_1", "call_1"]
        assert [[r.status for r in each.call_page(10, status="ringing")[0]] for each in stores] == [["ringing"]] * 2
        assert stores[0].record_placed("nope", sid, "ringing") is False and stores[0].get_call("nope") is None
    finally:
        for each in stores:
            each.close()


def test_a_status_callback_that_lands_before_make_calls_last_write_keeps_its_status(store):
    """Twilio can call the status callback (initiated, ringing, even a quick failure) before its REST answer
    reaches make-call: the answer's status ("queued") is older than any callback's and must not overwrite it.
    The CallSid is still recorded."""
    sid = "CA" + "8" * 32
    store.create_call(make_record(status="initiating", created_at=1000.0))
    assert store.append_status("call_1", "ringing", 1, {"CallStatus": "ringing"})

    assert store.record_placed("call_1", sid, "queued") is True

    record = store.get_call("call_1")
    assert record.status == "ringing" and record.call_sid == sid
    assert store.find_tracking_id(sid) == "call_1"
    assert [r.tracking_id for r in store.call_page(10, status="ringing")[0]] == ["call_1"]


def test_update_writes_only_named_fields_and_bumps_updated_at(store):
    store.create_call(make_record(greeting="hello", current_node="start", created_at=1000.0))

    updated = store.update_call("call_1", current_node="ask_budget", variables={"rooms": 2})

    assert updated.current_node == "ask_budget"
    assert updated.variables == {"rooms": 2}
    assert updated.greeting == "hello"
    assert updated.updated_at > 1000.0
    assert store.get_call("call_1") == updated


def test_update_of_unknown_call_returns_none_and_creates_nothing(store):
    assert store.update_call("ghost", current_node="x") is None
    assert store.get_call("ghost") is None
    assert store.list_calls() == []


def test_update_with_a_misspelt_field_is_rejected_before_writing(store):
    store.create_call(make_record())

    with pytest.raises(ValueError):
        store.update_call("call_1", curent_node="typo", greeting="written?")
    assert store.get_call("call_1").greeting is None


def test_returned_record_is_a_copy_not_a_live_view(store):
    store.create_call(make_record(variables={"a": 1}))
    record = store.get_call("call_1")
    record.variables["a"] = 99

    assert store.get_call("call_1").variables == {"a": 1}


def _update_own_field_repeatedly(spec: dict, tracking_id: str, field_name: str, iterations: int, barrier, results) -> None:
    """Child process: write one field over and over; count the times another writer clobbered it."""
    store = build_store(**spec)
    clobbered = 0
    try:
        barrier.wait(timeout=120)
        for i in range(iterations):
            value = {"writer": field_name, "n": i}
            if field_name == "meta":  # meta is only ever merged key by key
                store.update_meta(tracking_id, value)
            else:
                store.update_call(tracking_id, **{field_name: value})
            if getattr(store.get_call(tracking_id), field_name) != {"writer": field_name, "n": i}:
                clobbered += 1
        results.put((field_name, clobbered, None))
    except Exception as exc:  # reported to the parent, which fails the test with it
        results.put((field_name, -1, repr(exc)))


def test_two_processes_updating_different_fields_lose_nothing(store, store_spec):
    store.create_call(make_record("shared"))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    iterations = 150
    workers = [
        ctx.Process(target=_update_own_field_repeatedly, args=(store_spec, "shared", name, iterations, barrier, results))
        for name in ("variables", "meta")
    ]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=180) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)

    assert sorted(reports) == [("meta", 0, None), ("variables", 0, None)]
    final = store.get_call("shared")
    assert final.variables == {"writer": "variables", "n": iterations - 1}
    assert final.meta == {"writer": "meta", "n": iterations - 1}


def test_find_tracking_id_uses_the_call_sid_set_on_create_or_update(store):
    store.create_call(make_record("with_sid", call_sid="CA_created"))
    store.create_call(make_record("sid_later"))

    assert store.find_tracking_id("CA_created") == "with_sid"
    assert store.find_tracking_id("CA_later") is None
    store.update_call("sid_later", call_sid="CA_later")
    assert store.find_tracking_id("CA_later") == "sid_later"
    assert store.find_tracking_id("CA_unknown") is None


def test_a_replaced_call_sid_no_longer_finds_the_call(store):
    """SQLite finds a call by its current CallSid only; Redis kept the old CallSid's index entry (pointing at the
    call for ever, past its purge), so the same lookup answered differently by backend."""
    store.create_call(make_record("moved", call_sid="CA_first"))
    store.update_call("moved", call_sid="CA_second")
    assert store.find_tracking_id("CA_first") is None
    assert store.find_tracking_id("CA_second") == "moved"
    store.record_placed("moved", "CA_third", "queued")
    assert store.find_tracking_id("CA_second") is None
    assert store.find_tracking_id("CA_third") == "moved"


# -- status callbacks ---------------------------------------------------------------


def test_out_of_order_callbacks_leave_the_highest_sequence_current_and_history_sorted(store):
    store.create_call(make_record())
    deliveries = [(2, "in-progress"), (0, "initiated"), (3, "completed"), (1, "ringing")]

    became_current = [
        store.append_status("call_1", status, seq, {"CallStatus": status, "SequenceNumber": str(seq)}, received_at=1000.0 + seq)
        for seq, status in deliveries
    ]

    assert became_current == [True, False, True, False]
    record = store.get_call("call_1")
    assert (record.status, record.status_sequence) == ("completed", 3)
    history = store.status_history("call_1")
    assert [(item["sequence"], item["status"]) for item in history] == [
        (0, "initiated"), (1, "ringing"), (2, "in-progress"), (3, "completed"),
    ]
    assert history[3]["receivedAt"] == 1003.0
    assert history[3]["payload"] == {"CallStatus": "completed", "SequenceNumber": "3"}


def test_a_redelivered_sequence_is_ignored(store):
    store.create_call(make_record())
    store.append_status("call_1", "ringing", 1, {"try": 1})

    assert store.append_status("call_1", "ringing", 1, {"try": 2}) is False
    history = store.status_history("call_1")
    assert [item["payload"] for item in history] == [{"try": 1}]


def test_terminal_status_sets_ended_at_even_when_delivered_early(store):
    store.create_call(make_record())
    store.append_status("call_1", "in-progress", 2, {}, received_at=1000.0)
    assert store.get_call("call_1").ended_at is None

    store.append_status("call_1", "completed", 3, {}, received_at=1010.0)
    store.append_status("call_1", "ringing", 1, {}, received_at=1020.0)

    record = store.get_call("call_1")
    assert record.ended_at == 1010.0
    assert record.status == "completed"
    assert store.list_calls(active_only=True) == []


def test_status_without_sequence_becomes_the_next_one(store):
    store.create_call(make_record())
    store.append_status("call_1", "ringing", 4, {})

    assert store.append_status("call_1", "in-progress", None, {}) is True
    record = store.get_call("call_1")
    assert (record.status, record.status_sequence) == ("in-progress", 5)
    assert [item["sequence"] for item in store.status_history("call_1")] == [4, 5]


def test_status_for_an_unknown_call_is_not_recorded(store):
    assert store.append_status("ghost", "completed", 0, {}) is False
    assert store.status_history("ghost") == []
    assert store.get_call("ghost") is None


# -- turns ---------------------------------------------------------------------------


def test_turns_are_numbered_in_order_and_stamped_with_call_and_time(store):
    store.create_call(make_record())
    before = time.time()

    indexes = [store.append_turn("call_1", {"caller": CANTONESE, "n": n}) for n in range(3)]

    assert indexes == [0, 1, 2]
    turns = store.turns("call_1")
    assert [turn["n"] for turn in turns] == [0, 1, 2]
    assert all(turn["trackingId"] == "call_1" and turn["caller"] == CANTONESE for turn in turns)
    assert all(turn["at"] >= before - 1 for turn in turns)
    assert store.turns("other") == []


def test_amending_the_last_turn_changes_its_row_everywhere_turns_are_read(store):
    store.create_call(make_record())
    store.append_turn("call_1", {"n": 0, "at": 100.0})
    store.append_turn("call_1", {"n": 1, "action": "end", "interrupted": False, "at": 200.0}, counters={"a": 1})

    assert store.amend_last_turn("call_1", {"action": None, "interrupted": True}) is True

    assert [(t["n"], t.get("action"), t.get("interrupted")) for t in store.turns("call_1")] == [
        (0, None, None), (1, None, True)]
    assert [(t["n"], t["action"], t["index"]) for t in store.recent_turns(since=150.0)] == [(1, None, 1)]
    assert store.counters() == {"a": 1.0}  # a correction, not a new turn
    assert store.amend_last_turn("other", {"action": None}) is False


def test_an_amendment_expecting_another_row_leaves_the_last_row_alone(store):
    """The closing turn's own write failed, so the last row is an earlier turn's: an amendment that expects the
    closing turn's values (action "end", not interrupted) changes nothing (found by review)."""
    store.create_call(make_record())
    store.append_turn("call_1", {"n": 0, "action": None, "interrupted": False, "at": 100.0})

    assert store.amend_last_turn("call_1", {"action": None, "interrupted": True},
                                 expect={"action": "end", "interrupted": False}) is False
    assert store.turns("call_1")[-1]["interrupted"] is False
    store.append_turn("call_1", {"n": 1, "action": "end", "interrupted": False, "at": 200.0})
    assert store.amend_last_turn("call_1", {"action": None, "interrupted": True},
                                 expect={"action": "end", "interrupted": False}) is True
    assert store.turns("call_1")[-1]["interrupted"] is True


def test_counters_added_without_a_turn_accumulate_with_the_turns_ones(store):
    store.create_call(make_record())
    store.append_turn("call_1", {"n": 0}, counters={"a": 1})
    store.add_counters({"a": 2, "b": 0.5})
    store.add_counters({})
    assert len(store.turns("call_1")) == 1  # no turn row was written
    assert store.counters() == {"a": 3.0, "b": 0.5}


def test_recent_turns_returns_only_the_window_across_calls_oldest_first(store):
    store.create_call(make_record("a"))
    store.create_call(make_record("b"))
    store.append_turn("a", {"n": "a0", "at": 100.0})
    store.append_turn("b", {"n": "b0", "at": 300.0})
    store.append_turn("a", {"n": "a1", "at": 200.0})
    store.append_turn("a", {"n": "a2", "at": 200.0})  # identical time: both kept

    recent = store.recent_turns(since=150.0)

    assert [(turn["trackingId"], turn["n"], turn["at"]) for turn in recent] == [
        ("a", "a1", 200.0), ("a", "a2", 200.0), ("b", "b0", 300.0),
    ]
    assert store.recent_turns(since=1000.0) == []


def test_commit_turn_sets_the_turn_fields_appends_transcript_and_turn_row_in_one_write(store):
    snapshot = {"nodes": [{"id": "n1", "data": {"prompt": CANTONESE}}], "edges": []}
    store.create_call(make_record(workflow=snapshot, workflow_hash="h1", status="in-progress",
                                  meta={"setup": {"direction": "outbound-api"}}, transcript=[{"said": "first"}]))
    store.append_status("call_1", "in-progress", 3, {})
    before = time.time()

    index = store.commit_turn(
        "call_1", {"messages": [{"role": "user", "content": CANTONESE}], "current_node": "n2",
                   "variables": {"name": "陳"}, "language": "zh-HK"},
        {"firstTokenMs": 12.5, "at": 500.0}, counters={"series_a": 1.0},
        transcript_entry={"said": CANTONESE, "heard": "好"})
    second = store.commit_turn("call_1", {"current_node": "n3"},
                               {"firstTokenMs": 7.0}, counters={"series_a": 2.0})

    assert (index, second) == (0, 1)
    record = store.get_call("call_1")
    assert record.messages == [{"role": "user", "content": CANTONESE}]
    assert (record.current_node, record.variables, record.language) == ("n3", {"name": "陳"}, "zh-HK")
    assert record.meta == {"setup": {"direction": "outbound-api"}}  # meta is merged by update_meta only
    assert record.transcript == [{"said": "first"}, {"said": CANTONESE, "heard": "好"}]  # no entry: unchanged
    # What the turn does not own is untouched: the snapshot, the status other writers set.
    assert (record.workflow, record.workflow_hash) == (snapshot, "h1")
    assert (record.status, record.status_sequence) == ("in-progress", 3)
    assert record.updated_at >= before
    turns = store.turns("call_1")
    assert [(t["firstTokenMs"], t["trackingId"]) for t in turns] == [(12.5, "call_1"), (7.0, "call_1")]
    assert turns[0]["at"] == 500.0 and turns[1]["at"] >= before
    assert store.counters()["series_a"] == 3.0
    assert [t["index"] for t in store.recent_turns(0.0)] == [0, 1]
    # The call log's language filter follows the language the turn switched to.
    assert [r.tracking_id for r in store.call_page(10, language="zh-HK")[0]] == ["call_1"]
    assert store.call_page(10, language="en-US")[1] == 0


def test_commit_turn_of_an_unknown_call_writes_nothing(store):
    assert store.commit_turn("nobody", {"current_node": "n1"}, {"n": 1}, counters={"series_a": 1.0},
                             transcript_entry={"said": "hi"}) is None

    assert store.get_call("nobody") is None
    assert store.turns("nobody") == []
    assert store.counters() == {}


def test_commit_turn_rejects_fields_a_turn_does_not_own(store):
    store.create_call(make_record())

    for fields in ({"status": "completed"}, {"transcript": []}, {"ended_at": 1.0}, {"curent_node": "x"}):
        with pytest.raises(ValueError):
            store.commit_turn("call_1", fields, {"n": 1})
    assert store.turns("call_1") == []


def test_commit_turn_transcript_survives_a_purge_of_transcripts_and_appends_after_it(store):
    store.create_call(make_record(created_at=10.0))
    store.commit_turn("call_1", {}, {"n": 0}, transcript_entry={"said": "one"})
    store.update_call("call_1", ended_at=20.0)

    assert store.purge_transcripts(older_than=30.0) == 1
    assert store.get_call("call_1").transcript == []
    store.commit_turn("call_1", {}, {"n": 1}, transcript_entry={"said": "late"})
    assert store.get_call("call_1").transcript == [{"said": "late"}]


def test_emptying_transcripts_changes_only_history_transcript_and_the_purge_mark(store):
    """Both backends alike: the record's other fields, updated_at included (the call log's "last activity"),
    are what they were; emptying is one write, the purge mark with it."""
    store.create_call(make_record(created_at=10.0, messages=[{"role": "user", "content": CANTONESE}],
                                  transcript=[{"said": "hi"}], meta={"setup": {"direction": "inbound"}}))
    store.update_call("call_1", ended_at=20.0, status="completed")
    before = store.get_call("call_1")

    assert store.purge_transcripts(older_than=30.0) == 1

    after = store.get_call("call_1")
    assert after.messages == [] and after.transcript == []
    assert set(after.meta) == {"setup", "transcriptPurgedAt"}
    assert dataclasses.replace(after, messages=before.messages, transcript=before.transcript,
                               meta=before.meta) == before


# -- listing, workflows, health, purge ---------------------------------------------------


def test_list_calls_filters_by_creation_time_and_activity(store):
    store.create_call(make_record("old", created_at=100.0))
    store.create_call(make_record("ended", created_at=200.0))
    store.create_call(make_record("live", created_at=300.0))
    store.append_status("ended", "busy", 0, {}, received_at=250.0)

    assert [r.tracking_id for r in store.list_calls()] == ["old", "ended", "live"]
    assert [r.tracking_id for r in store.list_calls(since=150.0)] == ["ended", "live"]
    assert [r.tracking_id for r in store.list_calls(since=150.0, active_only=True)] == ["live"]
    store.update_call("live", ended_at=400.0)
    assert store.list_calls(since=150.0, active_only=True) == []


def test_live_calls_are_the_calls_created_since_that_have_not_ended(store):
    store.create_call(make_record("old", created_at=100.0))
    store.create_call(make_record("ended", created_at=200.0))
    store.create_call(make_record("live", created_at=300.0))
    store.append_status("ended", "completed", 1, {}, received_at=250.0)

    assert [r.tracking_id for r in store.live_calls()] == ["old", "live"]
    assert [r.tracking_id for r in store.live_calls(since=150.0)] == ["live"]
    assert (store.count_live_calls(), store.count_live_calls(since=150.0)) == (2, 1)  # counted without reading them

def test_workflows_round_trip_and_a_save_replaces_the_snapshot(store):
    fixture = os.path.join(REPO_ROOT, "tests", "fixtures", "workflows", "real_estate_property_dealer.json")
    with open(fixture, encoding="utf-8") as handle:
        snapshot = json.load(handle)
    snapshot["nodes"][0]["data"]["firstMessage"] = CANTONESE

    store.save_workflow("wf_1", snapshot)
    assert store.get_workflow("wf_1") == snapshot
    store.save_workflow("wf_1", {"version": 2})
    assert store.get_workflow("wf_1") == {"version": 2}
    assert store.get_workflow("unknown") is None


def test_a_call_created_with_its_workflow_id_saves_the_workflow_as_that_ids_latest(store):
    """make-call saves the flow with the call (one write in SQLite); a refused duplicate saves nothing."""
    snapshot, other = {"nodes": [{"id": "a"}], "version": 1}, {"nodes": [{"id": "b"}], "version": 2}
    store.create_call(CallRecord(tracking_id="wf_call", workflow=snapshot, workflow_hash="hash-1"), workflow_id="wf_9")
    assert store.get_workflow("wf_9") == snapshot and store.get_call("wf_call").workflow == snapshot
    with pytest.raises(StoreError):
        store.create_call(CallRecord(tracking_id="wf_call", workflow=other, workflow_hash="hash-2"), workflow_id="wf_9")
    assert store.get_workflow("wf_9") == snapshot
    store.create_call(CallRecord(tracking_id="wf_call_2", workflow=other, workflow_hash="hash-2"), workflow_id="wf_9")
    assert store.get_workflow("wf_9") == other
    store.create_call(CallRecord(tracking_id="no_id", workflow=snapshot, workflow_hash="hash-1"))
    assert store.get_workflow("wf_9") == other


# -- workflow snapshots: stored once per version, referenced by the call rows ------------------------


SNAPSHOT = {"name": "Flow", "nodes": [{"id": "start", "data": {"prompt": "x" * 2000, "firstMessage": CANTONESE}}],
            "edges": []}


def _stored_call_fields(store, tracking_id: str) -> dict:
    """The call as the backend holds it, undecoded by the store: its JSON row (SQLite) or hash (Redis)."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            (data,) = conn.execute("SELECT data FROM cw_calls WHERE tracking_id = ?", (tracking_id,)).fetchone()
        return json.loads(data)
    client = store._redis()
    return {key: json.loads(value) for key, value in client.hgetall(store._key("call", tracking_id)).items()}


def _embed_snapshot_as_older_workers_did(store, tracking_id: str, snapshot: dict) -> None:
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            (data,) = conn.execute("SELECT data FROM cw_calls WHERE tracking_id = ?", (tracking_id,)).fetchone()
            data = {**json.loads(data), "workflow": snapshot}
            conn.execute("UPDATE cw_calls SET data = ? WHERE tracking_id = ?", (json.dumps(data), tracking_id))
    else:
        store._redis().hset(store._key("call", tracking_id), "workflow", json.dumps(snapshot))


def test_calls_of_one_workflow_version_keep_only_a_reference_and_every_reader_sees_the_snapshot(store, store_spec):
    for tracking_id in ("call_a", "call_b"):
        store.create_call(make_record(tracking_id, workflow=SNAPSHOT, workflow_hash="v1"))

    for tracking_id in ("call_a", "call_b"):
        stored = _stored_call_fields(store, tracking_id)
        assert "workflow" not in stored and stored["workflow_hash"] == "v1"
    other_worker = build_store(**store_spec)  # nothing cached: resolves the reference from the store
    try:
        assert other_worker.get_call("call_a").workflow == SNAPSHOT
        assert [r.workflow for r in other_worker.list_calls()] == [SNAPSHOT, SNAPSHOT]
        assert [r.workflow for r in other_worker.live_calls()] == [SNAPSHOT, SNAPSHOT]
    finally:
        other_worker.close()
    assert store.update_call("call_a", current_node="next").workflow == SNAPSHOT
    store.append_status("call_a", "in-progress", 1, {})
    store.commit_turn("call_a", {"current_node": "other"}, {"n": 1}, transcript_entry={"said": "hi"})
    record = store.get_call("call_a")
    assert (record.workflow, record.workflow_hash, record.current_node) == (SNAPSHOT, "v1", "other")
    assert "workflow" not in _stored_call_fields(store, "call_a")


def test_calls_without_a_version_hash_or_workflow_read_back_as_written(store):
    store.create_call(make_record("no_hash", workflow={"nodes": []}))
    store.create_call(make_record("no_workflow", workflow_hash="v9"))

    assert store.get_call("no_hash").workflow == {"nodes": []}
    assert store.get_call("no_workflow").workflow is None


def test_rows_that_embed_the_snapshot_still_read_and_keep_it(store):
    store.create_call(make_record("old", workflow=SNAPSHOT, workflow_hash="v_old"))
    embedded = {**SNAPSHOT, "name": "Embedded"}
    _embed_snapshot_as_older_workers_did(store, "old", embedded)

    assert store.get_call("old").workflow == embedded
    store.append_status("old", "ringing", 1, {})
    store.commit_turn("old", {"current_node": "n2"}, {"n": 1})
    assert store.update_call("old", variables={"a": 1}).workflow == embedded
    assert store.get_call("old").workflow == embedded


def test_purging_calls_keeps_the_snapshot_that_live_and_later_calls_of_the_version_read(store, store_spec):
    store.create_call(make_record("ended", workflow=SNAPSHOT, workflow_hash="v1", created_at=10.0))
    store.create_call(make_record("live", workflow=SNAPSHOT, workflow_hash="v1", created_at=20.0))
    store.append_status("ended", "completed", 1, {}, received_at=100.0)

    assert store.purge(older_than=150.0) == 1

    fresh = build_store(**store_spec)
    try:
        assert fresh.get_call("live").workflow == SNAPSHOT
        fresh.create_call(make_record("later", workflow=SNAPSHOT, workflow_hash="v1"))
        assert fresh.get_call("later").workflow == SNAPSHOT
    finally:
        fresh.close()


def test_ping_reports_a_round_trip_in_ms(store):
    round_trip_ms = store.ping()

    assert isinstance(round_trip_ms, float)
    assert round_trip_ms >= 0.0


def test_purge_deletes_only_calls_ended_before_the_cutoff_with_their_turns_and_statuses(store):
    store.create_call(make_record("gone", call_sid="CA_gone", created_at=10.0))
    store.create_call(make_record("recent", call_sid="CA_recent", created_at=20.0))
    store.create_call(make_record("live", call_sid="CA_live", created_at=30.0))
    for tracking_id in ("gone", "recent", "live"):
        store.append_turn(tracking_id, {"n": tracking_id, "at": 50.0})
    store.append_status("gone", "completed", 1, {}, received_at=100.0)
    store.append_status("recent", "completed", 1, {}, received_at=200.0)

    assert store.purge(older_than=150.0) == 1

    assert store.get_call("gone") is None
    assert store.turns("gone") == []
    assert store.status_history("gone") == []
    assert store.find_tracking_id("CA_gone") is None
    assert {turn["trackingId"] for turn in store.recent_turns(0.0)} == {"recent", "live"}
    assert [r.tracking_id for r in store.list_calls()] == ["recent", "live"]
    assert store.get_call("recent").ended_at == 200.0
    assert store.purge(older_than=150.0) == 0


def test_a_call_whose_end_was_never_recorded_is_purged_once_no_call_could_still_be_running(store):
    """A lost terminal status callback (Twilio does not retry one refused during a store outage, or sent to an
    instance that died) left the call unended for ever: never purged and its transcript never emptied, whatever
    RETENTION_DAYS and TRANSCRIPT_RETENTION_DAYS say. Twilio ends every call within MAX_CALL_DURATION_LIMIT_S."""
    said = [{"role": "user", "content": CANTONESE}]
    store.create_call(make_record("lost", call_sid="CA_lost", created_at=10.0, messages=said))
    store.create_call(make_record("running", created_at=1000.0, messages=said))
    store.append_turn("lost", {"n": 0, "at": 20.0})
    cutoff = 10.0 + MAX_CALL_DURATION_LIMIT_S + 1.0  # "running" may still be on the line at that time

    assert store.purge_transcripts(older_than=cutoff) == 1
    assert store.get_call("lost").messages == [] and store.get_call("running").messages == said
    assert store.purge(older_than=cutoff) == 1
    assert store.get_call("lost") is None and store.turns("lost") == [] and store.find_tracking_id("CA_lost") is None
    assert [r.tracking_id for r in store.list_calls()] == ["running"]
    assert store.count_live_calls() == 1


def test_emptying_a_transcript_also_empties_the_words_kept_in_the_calls_meta(store):
    """A Gather call's last answer (the TwiML the caller heard) and words carried over a handover (what the caller
    said) live in the call's meta until its terminal status removes them; when that callback was lost, emptying the
    transcript must empty them too, or what the caller said and heard outlives TRANSCRIPT_RETENTION_DAYS."""
    store.create_call(make_record("lost", created_at=10.0, messages=[{"role": "user", "content": CANTONESE}], meta={
        "gatherReply": {"turn": 0, "twiml": "<Response><Say>your card ends in 4111</Say></Response>"},
        "carriedOver": {"text": CANTONESE, "lang": "yue-HK"}, "setup": {"direction": "inbound"}}))

    assert store.purge_transcripts(older_than=10.0 + MAX_CALL_DURATION_LIMIT_S + 1.0) == 1
    assert set(store.get_call("lost").meta) == {"setup", "transcriptPurgedAt"}


@pytest.mark.parametrize("said", [[{"role": "user", "content": CANTONESE}], []])
def test_emptying_transcripts_drops_the_secrets_of_a_call_whose_end_was_never_recorded(store, said):
    """A call's request Twilio credentials and its own LLM account (meta "llm") went only with its terminal status
    callback; when that was lost they outlived the call's transcript until RETENTION_DAYS. The transcript purge
    drops them too, also for a call with no transcript to empty (RECORD_TRANSCRIPTS=0, or emptied before), and
    leaves a call that may still be live alone."""
    secrets = {"credentials": "gAAAAB-opaque", "meta": {"llm": "gAAAAB-sealed", "setup": {"direction": "inbound"}}}
    store.create_call(make_record("lost", created_at=10.0, messages=said, **secrets))
    store.create_call(make_record("running", created_at=1000.0, messages=said, **secrets))

    emptied = store.purge_transcripts(older_than=10.0 + MAX_CALL_DURATION_LIMIT_S + 1.0)

    assert emptied == (1 if said else 0)  # the count is of transcripts emptied
    lost = store.get_call("lost")
    assert lost.credentials is None and "llm" not in lost.meta
    assert lost.meta["setup"] == {"direction": "inbound"}
    assert ("transcriptPurgedAt" in lost.meta) == bool(said)  # no purge mark where there was nothing to empty
    running = store.get_call("running")
    assert running.credentials == secrets["credentials"] and running.meta == secrets["meta"]
    assert running.messages == said


def test_a_purge_of_a_backlog_larger_than_one_batch_deletes_all_of_it_in_several_transactions(store, monkeypatch):
    """SQLite purges PURGE_BATCH calls per write transaction (a backlog in one held the write lock and the worker's
    loop for its whole length); every ended call older than the cut-off still goes, and only those."""
    from callweaver.store import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "PURGE_BATCH", 3)
    for n in range(8):
        store.create_call(make_record(f"old{n}", created_at=10.0 + n))
        store.append_turn(f"old{n}", {"n": n, "at": 20.0})
        store.append_status(f"old{n}", "completed", 1, {}, received_at=100.0)
    store.create_call(make_record("live", created_at=30.0))

    assert store.purge(older_than=150.0) == 8
    assert [r.tracking_id for r in store.list_calls()] == ["live"]
    assert all(store.turns(f"old{n}") == [] for n in range(8))


# -- workflow versions outlive no call -----------------------------------------------------------------------------


def stored_versions(store) -> set[str]:
    """The workflow versions the store keeps (its own table or keys), read past any per-worker cache."""
    if isinstance(store, RedisStore):
        prefix = store._key("workflow_version", "")
        with store._backend() as client:
            return {key[len(prefix):] for key in client.scan_iter(match=prefix + "*")}
    with store._connection() as conn:
        return {row[0] for row in conn.execute("SELECT version_hash FROM cw_workflow_versions")}


def test_purge_deletes_the_workflow_versions_no_remaining_call_references(store):
    """A version (11-15 KB) is stored once per edited flow: kept for ever, a small Redis (Render Key Value's free
    plan, 25 MB) filled up with the versions of flows no call used any more. Retention deletes a version with the
    last call that references it, and keeps every version a remaining call (live or not yet expired) reads, and the
    flow saved under its id (what an inbound call to `?id=` and the chat playground read)."""
    edited, kept = {"nodes": [{"id": "before_the_edit"}]}, {"nodes": [{"id": "after_the_edit"}]}
    store.create_call(make_record("old_a", workflow=edited, workflow_hash="v_edited", created_at=10.0),
                      workflow_id="wf_1")
    store.create_call(make_record("old_b", workflow=edited, workflow_hash="v_edited", created_at=11.0))
    store.create_call(make_record("old_c", workflow=kept, workflow_hash="v_kept", created_at=12.0),
                      workflow_id="wf_1")
    store.create_call(make_record("live", workflow=kept, workflow_hash="v_kept", created_at=30.0))
    for tracking_id in ("old_a", "old_b", "old_c"):
        store.append_status(tracking_id, "completed", 1, {}, received_at=100.0)
    assert stored_versions(store) == {"v_edited", "v_kept"}

    assert store.purge(older_than=150.0) == 3

    assert stored_versions(store) == {"v_kept"}
    assert store.get_workflow("wf_1") == kept
    store.create_call(make_record("later", workflow=edited, workflow_hash="v_edited", created_at=200.0))
    assert stored_versions(store) == {"v_edited", "v_kept"}  # a later call of that version stores it again
    assert store.purge(older_than=150.0) == 0 and stored_versions(store) == {"v_edited", "v_kept"}
    fresh = build_store(**store_spec_of(store))  # no per-worker copy of any version
    try:
        assert fresh.get_call("live").workflow == kept and fresh.get_call("later").workflow == edited
    finally:
        fresh.close()


def store_spec_of(store) -> dict:
    """build_store arguments for another handle on the same store (another worker)."""
    if isinstance(store, RedisStore):
        return {"db_path": "", "redis_url": store.url, "key_prefix": store.key_prefix}
    return {"db_path": store.path}


def test_purge_also_deletes_versions_left_by_calls_purged_before(store):
    """Versions whose calls were purged by an earlier release (which kept every version) go with the next purge."""
    store.create_call(make_record("old", workflow={"nodes": []}, workflow_hash="v_orphan", created_at=10.0))
    store.append_status("old", "completed", 1, {}, received_at=100.0)
    store.purge(older_than=150.0)
    if isinstance(store, RedisStore):  # as that release left it
        with store._backend() as client:
            client.set(store._key("workflow_version", "v_orphan"), '{"nodes":[]}')
    else:
        with store._write() as conn:
            conn.execute("INSERT OR IGNORE INTO cw_workflow_versions VALUES ('v_orphan', '{\"nodes\":[]}', 0)")
    assert stored_versions(store) == {"v_orphan"}

    assert store.purge(older_than=150.0) == 0
    assert stored_versions(store) == set()


def test_a_call_created_while_the_purge_drops_its_version_keeps_its_workflow(redis_server):
    """Redis: the purge finds the versions no call references (reads), then deletes them in one script that looks
    again at every call. A call of such a version created between the two (another instance) must still read its
    workflow: either the script sees the call and keeps the version, or the call's own write stores it again."""
    flow = {"nodes": [{"id": "only"}]}
    prefix = f"cwtest:{uuid.uuid4().hex}:"
    purger, creator = (RedisStore(redis_server.url, key_prefix=prefix) for _ in range(2))
    try:
        purger.create_call(make_record("old", workflow=flow, workflow_hash="v_1", created_at=10.0))
        purger.append_status("old", "completed", 1, {}, received_at=100.0)
        purger._redis()
        drop = purger._scripts["drop_workflow_versions"]

        def racing(*args, **kwargs):
            creator.create_call(make_record("new", workflow=flow, workflow_hash="v_1"))
            return drop(*args, **kwargs)

        purger._scripts["drop_workflow_versions"] = racing
        assert purger.purge(older_than=150.0) == 1
        assert stored_versions(purger) == {"v_1"}
        assert RedisStore(redis_server.url, key_prefix=prefix).get_call("new").workflow == flow
    finally:
        purger.close()
        creator.close()


def test_a_sqlite_file_from_before_the_workflow_hash_column_gets_it_filled_once_and_keeps_its_versions(tmp_path):
    path = str(tmp_path / "cw.sqlite3")
    store = SQLiteStore(path)
    store.create_call(make_record("live", workflow={"nodes": []}, workflow_hash="v_1", created_at=10.0))
    with store._write() as conn:  # as an earlier release left the file
        conn.execute("DROP INDEX cw_calls_workflow_hash")
        conn.execute("ALTER TABLE cw_calls DROP COLUMN workflow_hash")
    store.close()

    reopened = SQLiteStore(path)
    try:
        with reopened._connection() as conn:
            assert conn.execute("SELECT workflow_hash FROM cw_calls").fetchall() == [("v_1",)]
        assert reopened.purge(older_than=150.0) == 0 and stored_versions(reopened) == {"v_1"}
    finally:
        reopened.close()

def test_sqlite_keeps_a_version_referenced_by_a_row_an_older_worker_wrote(tmp_path):
    """During a reload, a worker of the previous release may still insert calls without the workflow_hash column:
    the purge reads such a row's hash from its JSON, so its version stays."""
    store = SQLiteStore(str(tmp_path / "cw.sqlite3"))
    try:
        store.create_call(make_record("old", workflow={"nodes": []}, workflow_hash="v_1", created_at=10.0))
        store.append_status("old", "completed", 1, {}, received_at=100.0)
        with store._write() as conn:
            conn.execute("INSERT INTO cw_calls (tracking_id, created_at, data) VALUES ('by_old_worker', 200.0, ?)",
                         (json.dumps({"tracking_id": "by_old_worker", "workflow_hash": "v_1", "created_at": 200.0}),))
        assert store.purge(older_than=150.0) == 1
        assert stored_versions(store) == {"v_1"}
        assert SQLiteStore(store.path).get_call("by_old_worker").workflow == {"nodes": []}
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork, as gunicorn does")
def test_a_store_used_before_a_fork_keeps_working_in_parent_and_child(store):
    store.create_call(make_record())  # the parent now holds an open connection
    store.append_turn("call_1", {"by": "parent"})

    child_pid = os.fork()
    if child_pid == 0:  # the forked "worker": must open its own connection
        exit_code = 1
        try:
            store.append_turn("call_1", {"by": "child"})
            store.update_meta("call_1", {"child": True})
            exit_code = 0 if store.get_call("call_1").meta == {"child": True} else 2
        finally:
            os._exit(exit_code)
    _, wait_status = os.waitpid(child_pid, 0)

    assert os.waitstatus_to_exitcode(wait_status) == 0
    store.append_turn("call_1", {"by": "parent again"})
    assert [turn["by"] for turn in store.turns("call_1")] == ["parent", "child", "parent again"]
    assert store.get_call("call_1").meta == {"child": True}


# -- concurrency under gevent --------------------------------------------------------------

GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()
    import json, sys
    import gevent
    from callweaver.store import CallRecord, build_store

    store = build_store(**json.loads(sys.argv[1]))
    store.create_call(CallRecord(tracking_id="g"))

    def converse(caller):
        for n in range(20):
            store.append_turn("g", {"caller": caller, "n": n})
            store.update_meta("g", {"last": caller})
            gevent.sleep(0)

    gevent.joinall([gevent.spawn(converse, caller) for caller in range(10)], raise_error=True)
    turns = store.turns("g")
    print(json.dumps({"turns": len(turns), "ping_ms": store.ping()}))
    """
)


def test_store_serves_many_greenlets_under_gevent_monkey_patching(store_spec):
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, json.dumps(store_spec)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["turns"] == 200


# -- backend specifics -----------------------------------------------------------------------


def test_build_store_picks_redis_only_when_a_url_is_given(tmp_path):
    assert isinstance(build_store(str(tmp_path / "a.sqlite3")), SQLiteStore)
    assert isinstance(build_store(str(tmp_path / "a.sqlite3"), redis_url=""), SQLiteStore)
    redis_store = build_store(str(tmp_path / "a.sqlite3"), redis_url="redis://127.0.0.1:1/0", key_prefix="x:")
    assert isinstance(redis_store, RedisStore)
    assert redis_store.key_prefix == "x:"


def test_sqlite_opens_lazily_in_wal_mode_and_creates_the_parent_directory(tmp_path):
    path = tmp_path / "nested" / "dir" / "cw.sqlite3"
    store = SQLiteStore(str(path))
    assert not path.exists()  # nothing opened before first use (i.e. never before a fork)

    store.create_call(make_record())

    assert path.exists()
    with sqlite3.connect(str(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_sqlite_stores_text_as_readable_utf8(tmp_path):
    path = tmp_path / "cw.sqlite3"
    store = SQLiteStore(str(path))
    store.create_call(make_record(greeting=CANTONESE))
    store.close()

    with sqlite3.connect(str(path)) as conn:
        (data,) = conn.execute("SELECT data FROM cw_calls").fetchone()
    assert CANTONESE in data


def test_sqlite_failure_to_open_is_a_store_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    store = SQLiteStore(str(blocker / "cw.sqlite3"))

    with pytest.raises(StoreError):
        store.get_call("call_1")


def test_redis_store_connects_lazily_so_building_it_never_fails():
    store = RedisStore("redis://127.0.0.1:1/0")  # nothing listens on port 1

    with pytest.raises(StoreError):
        store.ping()


def test_redis_prefixes_keep_stores_apart(redis_server):
    first = RedisStore(redis_server.url, key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    second = RedisStore(redis_server.url, key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    first.create_call(make_record())

    assert second.get_call("call_1") is None
    second.create_call(make_record())  # no clash with the first prefix's record


def redis_values(store: RedisStore) -> list[str]:
    """Every string the store keeps in Redis: values, list items, hash values, set and sorted-set members."""
    admin = redis.Redis.from_url(store.url, decode_responses=True)
    read = {"string": admin.get, "list": lambda key: admin.lrange(key, 0, -1), "hash": admin.hvals,
            "set": admin.smembers, "zset": lambda key: admin.zrange(key, 0, -1)}
    values: list[str] = []
    for key in admin.scan_iter(match=store.key_prefix + "*"):
        found = read[admin.type(key)](key)
        values += [found] if isinstance(found, str) else list(found)
    admin.close()
    return values


def test_redis_stores_each_turn_row_once(redis_server):
    """The time index (recent_turns) held a second whole copy of every turn row, beside the call's turn list: a
    turn row (~0.6 KB) twice per turn. It now names the row; every reader returns what it did."""
    store = RedisStore(redis_server.url, key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    store.create_call(make_record("call_1"))
    store.create_call(make_record("call_2"))
    store.commit_turn("call_1", {"current_node": "n1"}, {"note": "row-one", "at": 50.0},
                      transcript_entry={"said": "hello"})
    store.append_turn("call_2", {"note": "row-two", "at": 50.0})
    store.append_turn("call_1", {"note": "row-three", "action": "end", "at": 60.0})
    store.amend_last_turn("call_1", {"action": None})

    values = redis_values(store)
    assert [sum(note in value for value in values) for note in ("row-one", "row-two", "row-three")] == [1, 1, 1]
    assert [(t["trackingId"], t["note"], t["index"], t.get("action")) for t in store.recent_turns(0.0)] == [
        ("call_1", "row-one", 0, None), ("call_2", "row-two", 0, None), ("call_1", "row-three", 1, None)]
    store.close()


def test_redis_reads_amends_and_purges_turn_rows_an_earlier_release_indexed(redis_server):
    """Calls stored before turn rows were kept once: their time-index members hold the whole row. They are still
    read, amended and purged."""
    from callweaver.store import stored_turn
    from callweaver.store.redis import _dumps

    store = RedisStore(redis_server.url, key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    store.create_call(make_record("old", created_at=10.0))
    row = _dumps(stored_turn("old", {"n": 0, "action": "end", "at": 50.0}))
    admin = redis.Redis.from_url(redis_server.url, decode_responses=True)
    admin.rpush(store._key("turns", "old"), row)  # as that release wrote it
    admin.zadd(store._key("turns", "by_time"), {"0000000000:" + row: 50.0})

    assert store.amend_last_turn("old", {"action": None}) is True
    store.append_turn("old", {"n": 1, "at": 60.0})
    assert [(t["n"], t.get("action"), t["index"]) for t in store.recent_turns(0.0)] == [(0, None, 0), (1, None, 1)]
    store.append_status("old", "completed", 1, {}, received_at=100.0)
    assert store.purge(older_than=150.0) == 1
    assert admin.zcard(store._key("turns", "by_time")) == 0 and store.recent_turns(0.0) == []
    admin.close()
    store.close()


def test_redis_writes_whose_reply_was_lost_are_applied_once(redis_server):
    """redis-py sends a command again when its connection fails before the reply (one retry, so a restart or
    failover heals). For a write that had landed, a script ran twice: the turn row, its counters and transcript
    entry twice; a new call refused as "already exists" (make-call failed though the call was stored); the terminal
    status reported as a duplicate (not current), so the end of the call was never acted on."""
    from tests.fakes.loopback import ReplyLosingProxy

    proxy = ReplyLosingProxy(redis_server.port)
    store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    try:
        store.create_call(make_record("warm"))  # every script below is loaded: a lost reply is the script's own
        store.commit_turn("warm", {"current_node": "n"}, {"n": 0})
        store.append_turn("warm", {"n": 1})
        store.append_status("warm", "ringing", 1, {})

        writes = [lambda: store.create_call(make_record("c", created_at=1000.0)),
                  lambda: store.commit_turn("c", {"current_node": "n1"}, {"n": 0}, {"s": 1.0},
                                            transcript_entry={"said": "hi"}),
                  lambda: store.append_turn("c", {"n": 1}, {"s": 1.0}),
                  lambda: store.append_status("c", "completed", 5, {"CallStatus": "completed"})]
        answers = []
        for write in writes:
            proxy.lose_after = b"EVALSHA"
            answers.append(write())
        assert proxy.lost == 4
        assert answers == [None, 0, 1, True]
        assert [turn["n"] for turn in store.turns("c")] == [0, 1]
        assert [turn["n"] for turn in store.recent_turns(0.0) if turn["trackingId"] == "c"] == [0, 1]
        assert store.counters()["s"] == 2.0
        record = store.get_call("c")
        assert record.transcript == [{"said": "hi"}] and record.current_node == "n1" and record.status == "completed"
        assert [entry["sequence"] for entry in store.status_history("c")] == [5]
        # Writes that are no retry are refused or reported as before.
        with pytest.raises(StoreError):
            store.create_call(make_record("c", created_at=2000.0))
        assert store.append_status("c", "completed", 5, {"CallStatus": "completed"}) is False
    finally:
        store.close()
        proxy.stop()


def test_stopped_redis_raises_store_error_quickly_and_recovers_after_restart():
    with RedisServer() as server:
        store = RedisStore(server.url, key_prefix="cwtest:outage:")
        store.create_call(make_record())
        server.stop()

        started = time.monotonic()
        with pytest.raises(StoreError):
            store.ping()
        with pytest.raises(StoreError):
            store.get_call("call_1")
        with pytest.raises(StoreError):
            store.append_turn("call_1", {"caller": "hello"})
        assert time.monotonic() - started < 20  # seconds: a failure, not a hang (timeouts are 1 s)

        server.start()
        assert store.ping() >= 0.0
        assert store.get_call("call_1") is None  # the server kept nothing on disk
        store.create_call(make_record())
        assert store.get_call("call_1").tracking_id == "call_1"
        store.close()


def test_relay_socket_claim_one_owner_newer_generation_takes_over_and_leases_expire(store):
    store.create_call(make_record("call_claim"))
    assert store.claim_relay_socket("call_claim", "socket-a", 0, 30)
    assert not store.claim_relay_socket("call_claim", "socket-b", 0, 30)   # a second socket for the same call
    assert store.renew_relay_socket("call_claim", "socket-a", 30)
    assert not store.renew_relay_socket("call_claim", "socket-b", 30)
    assert store.claim_relay_socket("call_claim", "socket-c", 1, 30)       # resumed: Twilio said a failed
    assert not store.renew_relay_socket("call_claim", "socket-a", 30)      # the old socket learns it lost
    store.release_relay_socket("call_claim", "socket-a")                   # not the owner: no effect
    assert not store.claim_relay_socket("call_claim", "socket-d", 1, 30)
    store.release_relay_socket("call_claim", "socket-c")
    assert store.claim_relay_socket("call_claim", "socket-d", 1, 0.2)      # released: free again
    deadline = time.monotonic() + 10
    while not store.claim_relay_socket("call_claim", "socket-e", 1, 30):   # a killed worker's lease runs out
        assert time.monotonic() < deadline, "an expired lease must free the call"
        time.sleep(0.05)


def test_relay_socket_held_while_claimed_within_its_lease(store):
    """What an ended call's report waits on (lifecycle._call_over): a live socket, not a released or lapsed claim."""
    store.create_call(make_record("call_held"))
    assert not store.relay_socket_held("call_held")
    assert store.claim_relay_socket("call_held", "socket-a", 0, 30)
    assert store.relay_socket_held("call_held")
    store.release_relay_socket("call_held", "socket-b")  # not the owner: still held
    assert store.relay_socket_held("call_held")
    store.release_relay_socket("call_held", "socket-a")
    assert not store.relay_socket_held("call_held")
    assert store.claim_relay_socket("call_held", "socket-c", 0, 0.2)
    deadline = time.monotonic() + 10
    while store.relay_socket_held("call_held"):  # a killed worker's socket: its lease runs out
        assert time.monotonic() < deadline, "a lapsed lease must not hold the call"
        time.sleep(0.05)


def test_relay_socket_lease_that_ran_out_unclaimed_is_still_renewed_by_its_owner(store):
    """A renewal that comes late (a store outage or a stalled worker longer than the lease) while no other socket
    took the call keeps the live call on both backends; it used to end it on Redis only ("another socket took
    over this call"), whose claim vanished with its lease, while SQLite's row outlives it."""
    store.create_call(make_record("call_late"))
    assert store.claim_relay_socket("call_late", "socket-a", 2, 0.05)
    time.sleep(0.3)  # past the lease; nobody claims meanwhile
    assert store.renew_relay_socket("call_late", "socket-a", 30)
    assert not store.claim_relay_socket("call_late", "socket-b", 2, 30)  # held again, with its generation
    assert store.claim_relay_socket("call_late", "socket-c", 3, 30)      # a resume still replaces it at once
    assert not store.renew_relay_socket("call_late", "socket-a", 30)


def test_values_the_fast_encoder_refuses_are_still_stored(store):
    """Integers beyond 64 bits (orjson refuses them) and integer keys round-trip like the standard library's JSON."""
    big = 2 ** 70 + 1  # not a float's exact value: read back as a float it would come back changed
    store.create_call(CallRecord(tracking_id="call_big", variables={"n": big, "nested": {1: "one"}}))
    store.update_meta("call_big", {"huge": [big, -big]})
    record = store.get_call("call_big")
    assert record.variables == {"n": big, "nested": {"1": "one"}}
    assert record.meta == {"huge": [big, -big]}
    store.commit_turn("call_big", {"variables": {"n": big, "m": -big}}, {"n": 1},
                      transcript_entry={"role": "user", "content": str(big)})
    record = store.get_call("call_big")
    assert record.variables == {"n": big, "m": -big}
    assert record.meta == {"huge": [big, -big]}
    assert type(record.variables["n"]) is int
    below_int64 = -2 ** 63 - 1  # only 19 digits after its minus sign
    store.update_meta("call_big", {"low": below_int64})
    assert store.get_call("call_big").meta["low"] == below_int64


def test_rows_written_with_nan_by_the_standard_library_still_read(tmp_path):
    path = str(tmp_path / "calls.db")
    store = SQLiteStore(path)
    store.create_call(CallRecord(tracking_id="call_nan"))
    with sqlite3.connect(path) as conn:
        data = json.loads(conn.execute("SELECT data FROM cw_calls WHERE tracking_id = 'call_nan'").fetchone()[0])
        data["variables"] = {"x": float("nan")}
        conn.execute("UPDATE cw_calls SET data = ? WHERE tracking_id = 'call_nan'", (json.dumps(data),))
    value = store.get_call("call_nan").variables["x"]
    assert value != value  # NaN


def test_a_worker_opening_the_store_while_another_writes_its_fresh_file_waits_instead_of_failing(tmp_path):
    """Switching a fresh file to WAL while another worker writes it raised 'database is locked' at once (the busy
    timeout does not cover that switch)."""
    import threading

    path = str(tmp_path / "cw.sqlite3")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE other_worker (x)")
    threading.Timer(0.3, lambda: (other.execute("COMMIT"), other.close())).start()
    assert SQLiteStore(path).get_call("call_unknown") is None


def test_a_full_sqlite_file_is_store_full_and_reads_still_work(tmp_path):
    """A full disk lasts until space is freed: StoreFull (a StoreError), which the API words as "full"."""
    from callweaver.store import StoreFull

    store = SQLiteStore(str(tmp_path / "cw.sqlite3"))
    store.create_call(make_record("first"))
    with store._connection() as conn:  # the file may not grow: as a full disk would refuse it
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(StoreFull):
        for number in range(1000):
            store.create_call(make_record(f"call_{number}", messages=[{"content": "x" * 4000}]))
    assert store.get_call("first") is not None
    store.close()


def test_redis_counts_whose_reply_was_lost_are_added_once(redis_server):
    """A WATCH/MULTI write whose EXEC landed but whose reply was lost is replayed (_transaction: a connection that
    fails under the WATCH is retried once). For a merge that sets values that is harmless; for one that ADDS, the
    replay added again: a handover counted two reconnects, a speculation's cost twice, a circuit breaker charged two
    failures for one (found by the session's final review)."""
    from tests.fakes.loopback import ReplyLosingProxy

    proxy = ReplyLosingProxy(redis_server.port)
    store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    try:
        store.create_call(make_record("c"))
        store.update_meta("c", add={"counts": {"relayReconnects": 1}})
        proxy.lose_after = b"EXEC"
        meta = store.update_meta("c", add={"counts": {"relayReconnects": 1}})
        assert proxy.lost == 1
        assert store.get_call("c").meta["counts"] == {"relayReconnects": 2}
        assert meta["counts"] == {"relayReconnects": 2}

        def charge(current):
            return {"failures": (current or {}).get("failures", 0) + 1}

        store.update_shared("breaker", charge)
        proxy.lose_after = b"EXEC"
        assert store.update_shared("breaker", charge) == ({"failures": 2}, True)
        assert proxy.lost == 2
        assert store.read_shared("breaker") == {"failures": 2}
    finally:
        store.close()
        proxy.stop()
