"""Call log: paged store queries on both backends, the API's rows and timeline, and the privacy settings."""
from __future__ import annotations

import json
import time

import pytest

from callweaver import create_app
from callweaver.call_log import NO_TRANSCRIPT_RECORDED, TRANSCRIPT_PURGED, call_detail, call_page, mask_phone
from callweaver.engine.metrics import percentile
from callweaver.retention import purge_if_due
from callweaver.store import CallRecord
from tests.conftest import Signer, base_env
from tests.test_gather_flow import GatherCall
from tests.scripted_brain import real_estate_brain
from tests.test_store import redis_server, store, store_spec  # noqa: F401  (both-backend fixtures)

NOW = 1_800_000_000.0


def seed_calls(store) -> list[CallRecord]:
    """Seven calls, one a second apart (newest last), on both paths and in two languages."""
    records = []
    for i in range(7):
        record = CallRecord(
            tracking_id=f"call_{i}", path="traditional" if i % 3 == 0 else "optimized",
            language="es-ES" if i == 4 else "en-US", status="completed" if i < 5 else "in-progress",
            to=f"+1555000000{i}", created_at=NOW + i, ended_at=NOW + i + 60 if i < 5 else None,
            workflow={"name": "big snapshot", "nodes": ["x"] * 100}, messages=[{"role": "user", "content": "hi"}])
        store.create_call(record)
        records.append(record)
    return records


# -- store --------------------------------------------------------------------------------------------


def test_call_page_is_newest_first_paged_and_counts_every_match(store):
    seed_calls(store)

    first, total = store.call_page(3)
    second, _ = store.call_page(3, 3)
    last, _ = store.call_page(3, 6)

    assert total == 7
    assert [r.tracking_id for r in first + second + last] == [f"call_{i}" for i in range(6, -1, -1)]
    # only the list's fields come back: never the workflow snapshot or the history
    assert first[0].workflow is None and first[0].messages == [] and first[0].to == "+15550000006"
    assert store.call_page(3, 7) == ([], 7)


def test_call_page_filters_in_the_store(store):
    seed_calls(store)

    traditional, total = store.call_page(10, path="traditional")
    live, live_total = store.call_page(1, status="in-progress")
    spanish, _ = store.call_page(10, language="es-ES", status="completed")

    assert [r.tracking_id for r in traditional] == ["call_6", "call_3", "call_0"] and total == 3
    assert [r.tracking_id for r in live] == ["call_6"] and live_total == 2
    assert [r.tracking_id for r in store.call_page(1, 1, status="in-progress")[0]] == ["call_5"]
    assert [r.tracking_id for r in spanish] == ["call_4"]
    assert store.call_page(10, path="optimized", language="fr-FR") == ([], 0)


def test_turns_of_reads_several_calls_at_once(store):
    seed_calls(store)
    for i in range(3):
        store.append_turn("call_1", {"firstTokenMs": 100.0 + i, "at": NOW + i})
    store.append_turn("call_2", {"firstTokenMs": 50.0, "at": NOW})

    turns = store.turns_of(["call_1", "call_2", "call_3"])

    assert [t["firstTokenMs"] for t in turns["call_1"]] == [100.0, 101.0, 102.0]
    assert len(turns["call_2"]) == 1 and turns["call_3"] == []


def test_purge_transcripts_empties_only_old_ended_calls_and_keeps_their_timings(store):
    seed_calls(store)
    store.update_call("call_0", transcript=[{"said": "hi", "heard": "hello"}])
    store.append_turn("call_0", {"firstTokenMs": 321.0, "at": NOW})

    emptied = store.purge_transcripts(NOW + 61.5)  # call_0 and call_1 ended before it; call_2 at NOW+62

    assert emptied == 2
    old = store.get_call("call_0")
    assert old.messages == [] and old.transcript == [] and old.meta["transcriptPurgedAt"] > 0
    assert store.turns("call_0")[0]["firstTokenMs"] == 321.0
    assert store.get_call("call_2").messages == [{"role": "user", "content": "hi"}]
    assert store.get_call("call_6").messages  # live calls are never touched
    assert store.purge_transcripts(NOW + 61.5) == 0


# -- rows and timeline ---------------------------------------------------------------------------------


def test_mask_phone_keeps_the_last_four_digits():
    assert mask_phone("+15551234567") == "•••••••4567"
    assert mask_phone("+15551234567", mask=False) == "+15551234567"
    assert mask_phone("123") == "•••" and mask_phone(None) is None


def test_rows_and_timeline_are_computed_from_the_stored_turns(store):
    seed_calls(store)
    turns = [
        {"firstTokenMs": 400.0, "lastTokenMs": 900.0, "source": "llm", "provider": "azure", "providerTtftMs": 380.0,
         "nodeId": "a", "nextNodeId": "b", "toolNames": ["transition"], "at": NOW + 1},
        {"firstTokenMs": 40.0, "lastTokenMs": 90.0, "source": "cache", "cacheHit": True, "nodeId": "b",
         "nextNodeId": "b", "interrupted": True, "at": NOW + 2},
        {"firstTokenMs": 1200.0, "source": "llm", "provider": "openai", "nodeId": "b", "nextNodeId": "end",
         "failovers": [{"provider": "azure", "reason": "first_token_timeout", "spoken_chars": 0}], "action": "end",
         "at": NOW + 3},
    ]
    for turn in turns:
        store.append_turn("call_1", turn)
    store.update_call("call_1", transcript=[
        {"said": "I want to buy", "heard": "Great.", "spoken": "Great.", "interrupted": False,
         "toolCalls": [{"name": "transition", "arguments": {"edge_id": "e1"}}]},
        {"said": "What about", "heard": "We have", "spoken": "We have three listings", "interrupted": True},
        {"said": "Bye", "heard": "Goodbye!", "spoken": "Goodbye!", "interrupted": False}])

    row = next(r for r in call_page(store, limit=10)["calls"] if r["trackingId"] == "call_1")
    detail = call_detail(store, "call_1")

    assert row["turns"] == 3 and row["failovers"] == 1 and row["cacheHits"] == 1
    assert row["firstTokenP50Ms"] == percentile([400.0, 40.0, 1200.0], 50) == 400.0
    assert row["outcome"] == "end_node" and row["durationS"] == 60.0 and row["to"] == "•••••••0001"
    assert detail["call"] == row
    second = detail["turns"][1]
    assert second["said"] == "What about" and second["heard"] == "We have" and second["interrupted"] is True
    assert second["cacheHit"] is True and second["nodeId"] == "b"
    assert detail["turns"][0]["toolCalls"] == [{"name": "transition", "arguments": {"edge_id": "e1"}}]
    assert detail["turns"][2]["provider"] == "openai" and detail["turns"][2]["failovers"]
    live = next(r for r in call_page(store, limit=10)["calls"] if r["trackingId"] == "call_6")
    assert live["outcome"] == "in_progress" and live["live"] is True


def test_a_row_says_how_the_call_ended_as_its_timeline_does(store):
    """The list reads only the list's fields; the outcome also needs the call's end reason (a silent caller)."""
    seed_calls(store)
    store.update_meta("call_2", {"endReason": "silence", "setup": {"from": "+15550000002"}})

    row = next(r for r in call_page(store, limit=10)["calls"] if r["trackingId"] == "call_2")

    assert row["outcome"] == "silence" == call_detail(store, "call_2")["call"]["outcome"]
    assert store.call_page(10)[0][4].meta == {"endReason": "silence"}  # only what the outcome reads


# -- the API and the privacy settings (signed <Gather> webhooks through the app) -------------------------------


def gather_call(app, fake_twilio, fake_llm, utterances: list[str]) -> GatherCall:
    fake_llm.responder = real_estate_brain
    client = app.test_client()
    call = GatherCall(app, client, Signer(client), fake_twilio)
    root = call.answer()
    for text in utterances:
        root = call.say(root, text)
    Signer(client).post(f"/api/call-status?trackingId={call.tracking_id}",
                        {"CallSid": call.call_sid, "CallStatus": "completed", "SequenceNumber": "9"})
    return call


def build_app(tmp_path, fake_twilio, fake_llm, **env):
    return create_app({**base_env(tmp_path, fake_twilio, fake_llm), **env})


def test_call_log_api_lists_the_call_with_masked_number_and_its_transcript(tmp_path, fake_twilio, fake_llm):
    app = build_app(tmp_path, fake_twilio, fake_llm)
    call = gather_call(app, fake_twilio, fake_llm, ["I want to buy a house", "A three bedroom house"])
    client = app.test_client()

    page = client.get("/api/call-log?limit=5").get_json()
    detail = client.get(f"/api/call-log/{call.tracking_id}").get_json()

    assert page["success"] and page["total"] == 1
    row = page["calls"][0]
    assert row["trackingId"] == call.tracking_id and row["path"] == "traditional" and row["turns"] == 2
    assert row["to"] == "•••••••4567" and row["status"] == "completed"
    said = [t["said"] for t in detail["turns"]]
    assert said == ["I want to buy a house", "A three bedroom house"]
    assert detail["turns"][0]["heard"].startswith("Wonderful, let's find you a home.")
    assert detail["turns"][0]["nodeId"] == "inquiry_type_node"
    assert detail["turns"][0]["nextNodeId"] == "buyer_requirements_node"
    assert detail["turns"][0]["toolCalls"] == [{"name": "transition", "arguments": {"edge_id": "edge_2"}}]
    assert client.get("/api/call-log?path=optimized").get_json()["total"] == 0
    assert client.get("/api/call-log?path=bogus").status_code == 400
    assert client.get("/api/call-log?limit=0").get_json() == {"success": False, "error": "limit must be between 1 and 200"}
    assert client.get("/api/call-log/nope").status_code == 404


def test_mask_phone_numbers_off_shows_the_whole_number(tmp_path, fake_twilio, fake_llm):
    app = build_app(tmp_path, fake_twilio, fake_llm, MASK_PHONE_NUMBERS="0")
    gather_call(app, fake_twilio, fake_llm, ["I want to buy a house"])

    assert app.test_client().get("/api/call-log").get_json()["calls"][0]["to"] == "+15551234567"


def test_record_transcripts_off_keeps_timings_only(tmp_path, fake_twilio, fake_llm):
    app = build_app(tmp_path, fake_twilio, fake_llm, RECORD_TRANSCRIPTS="0")
    call = gather_call(app, fake_twilio, fake_llm, ["I want to buy a house", "My name is Zebediah Quux"])
    store = app.extensions["callweaver"].store

    detail = app.test_client().get(f"/api/call-log/{call.tracking_id}").get_json()
    record = store.get_call(call.tracking_id)

    assert detail["transcript"] == {"kept": False, "reason": NO_TRANSCRIPT_RECORDED}
    assert [t["said"] for t in detail["turns"]] == [None, None]
    assert all(t["firstTokenMs"] is not None for t in detail["turns"])
    assert record.messages == [] and record.transcript == []  # the live call's history is emptied at its end
    stored = json.dumps([record.to_dict(), store.turns(call.tracking_id)])
    assert "Zebediah" not in stored and "buy a house" not in stored


def test_retention_job_empties_transcripts_after_transcript_retention_days(tmp_path, fake_twilio, fake_llm):
    app = build_app(tmp_path, fake_twilio, fake_llm, TRANSCRIPT_RETENTION_DAYS="2", RETENTION_DAYS="30")
    old = gather_call(app, fake_twilio, fake_llm, ["I want to buy a house"])
    recent = gather_call(app, fake_twilio, fake_llm, ["I want to sell"])
    svc = app.extensions["callweaver"]
    svc.store.update_call(old.tracking_id, ended_at=time.time() - 3 * 86400)
    svc.store.update_call(recent.tracking_id, ended_at=time.time() - 1 * 86400)

    s = svc.settings
    purged = purge_if_due(svc.store, retention_days=s.retention_days, interval_s=60, holder="test-worker",
                          transcript_retention_days=s.transcript_retention_days)

    assert purged == 0
    client = app.test_client()
    old_detail = client.get(f"/api/call-log/{old.tracking_id}").get_json()
    assert old_detail["transcript"] == {"kept": False, "reason": TRANSCRIPT_PURGED}
    assert old_detail["turns"][0]["said"] is None and old_detail["turns"][0]["firstTokenMs"] is not None
    assert client.get(f"/api/call-log/{recent.tracking_id}").get_json()["turns"][0]["said"] == "I want to sell"


def test_call_log_pages_and_api_are_operator_only(tmp_path, fake_twilio):
    token = "ops-token-for-tests-0123"
    client = create_app({**base_env(tmp_path, fake_twilio), "OPS_TOKEN": token}).test_client()
    paths = ("/dashboard/calls", "/dashboard/calls/call_x", "/api/call-log", "/api/call-log/call_x",
             "/api/call-latency")

    for path in paths:
        assert client.get(path).status_code == 401, path
    authorized = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/call-log", headers=authorized).get_json()["total"] == 0
    assert client.get("/dashboard/calls", headers=authorized).status_code == 200
    assert client.get("/api/call-log/call_x", headers=authorized).status_code == 404


def test_a_sqlite_store_made_before_the_call_log_gets_its_filter_columns(tmp_path):
    import sqlite3

    from callweaver.store.sqlite import SQLiteStore
    path = str(tmp_path / "old.sqlite3")
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE cw_calls (tracking_id TEXT PRIMARY KEY, call_sid TEXT, created_at REAL NOT NULL,"
                " ended_at REAL, data TEXT NOT NULL)")
    record = CallRecord(tracking_id="old_1", path="traditional", status="completed", created_at=NOW)
    old.execute("INSERT INTO cw_calls VALUES (?, NULL, ?, NULL, ?)", ("old_1", NOW, json.dumps(record.to_dict())))
    old.commit()
    old.close()

    store = SQLiteStore(path)
    assert [r.tracking_id for r in store.call_page(5, path="traditional", status="completed")[0]] == ["old_1"]
    assert store.call_page(5, path="optimized") == ([], 0)
    store.close()


def _relay_call_ending_with(client, twilio, *sessions: dict) -> str:
    """A relay call whose session(s) end as Twilio reports them at the action URL, then Twilio's final status."""
    from tests.helpers import make_call_body
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    tracking_id = data["optimization"]["trackingId"]
    for session in sessions:
        twilio.post(f"/api/connect-action?trackingId={tracking_id}", {"CallSid": data["callSid"], **session})
    twilio.post(f"/api/call-status-optimized?trackingId={tracking_id}",
                {"CallSid": data["callSid"], "CallStatus": "completed", "SequenceNumber": "5"})
    return tracking_id


def test_calls_we_ended_with_an_apology_are_errors_not_hang_ups(app, client, twilio):
    """Twilio reports these calls `completed`; the caller did not leave, CallWeaver apologised and hung up: the
    session ended with an error, a broken socket could not be reconnected, a transfer was refused."""
    errored = _relay_call_ending_with(client, twilio, {"SessionStatus": "ended", "HandoffData": json.dumps(
        {"reason": "error", "detail": "repeated Twilio errors"})})
    broken = _relay_call_ending_with(client, twilio, *[{"SessionStatus": "failed"}] * 3)  # MAX_RESUMES is 2
    refused = _relay_call_ending_with(client, twilio, {"SessionStatus": "ended", "HandoffData": json.dumps(
        {"reason": "transfer", "destination": "+882345678901"}), "SessionDuration": "9"})
    left = _relay_call_ending_with(client, twilio, {"SessionStatus": "completed", "SessionDuration": "42"})
    resumed_then_left = _relay_call_ending_with(client, twilio, {"SessionStatus": "failed"},
                                                {"SessionStatus": "completed"})

    rows = {r["trackingId"]: r["outcome"] for r in client.get("/api/call-log").get_json()["calls"]}
    assert rows == {errored: "error", broken: "error", refused: "error", left: "hang_up",
                    resumed_then_left: "hang_up"}
    for tracking_id, outcome in rows.items():
        assert client.get(f"/api/call-log/{tracking_id}").get_json()["call"]["outcome"] == outcome


@pytest.mark.parametrize("query, error", [
    ("status=bogus", "status must be one of queued, initiated, ringing, in-progress, completed, busy, no-answer, "
                     "canceled, failed"),
    ("status=in_progress", "status must be one of"),
    ("limit=%D9%A3", "limit must be a whole number"),          # Arabic-Indic 3: int() reads it, a person does not
    ("limit=1_0", "limit must be a whole number"),
    ("limit=%20%2B5", "limit must be a whole number"),
    ("offset=-1", "offset must be between 0 and"),
])
def test_call_log_refuses_filters_and_numbers_it_would_misread(client, query, error):
    """An unknown status used to answer 200 with no calls (a typo looked like a quiet day); numbers are ASCII
    digits only, as everywhere else."""
    resp = client.get(f"/api/call-log?{query}")

    assert resp.status_code == 400 and resp.get_json()["success"] is False
    assert resp.get_json()["error"].startswith(error)


def test_empty_query_values_mean_their_defaults_as_the_readme_writes_them(client):
    """README: `GET /api/call-log?limit=&offset=&status=&path=&language=`: an empty filter is no filter, and an empty
    number its default (as the call log always read them), not a 400."""
    resp = client.get("/api/call-log?limit=&offset=&status=&path=&language=")

    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["limit"] == 25 and resp.get_json()["offset"] == 0
    assert client.get("/api/call-latency?window=").get_json()["windowSeconds"] == 3600


def test_window_numbers_are_ascii_digits_only(client):
    for path in ("/api/call-latency", "/api/dashboard-data", "/api/performance-metrics", "/api/performance-comparison"):
        for raw in ("%D9%A3%D9%A6%D9%A0%D9%A0", "3_600", "+3600", " 3600"):
            resp = client.get(f"{path}?window={raw}")
            assert resp.status_code == 400 and "whole number" in resp.get_json()["error"], (path, raw)
        assert client.get(f"{path}?window=3600").status_code == 200, path


def test_a_call_whose_final_status_never_came_is_not_live_for_ever(store):
    """The dashboard stops counting a call as live LIVE_CALL_HORIZON_S after it started with no final status from
    Twilio (a lost callback); the call log said it was still in progress, its duration growing by the day."""
    from callweaver.engine.metrics import LIVE_CALL_HORIZON_S
    now = time.time()
    store.create_call(CallRecord(tracking_id="lost", path="optimized", status="in-progress",
                                 created_at=now - LIVE_CALL_HORIZON_S - 5))
    store.create_call(CallRecord(tracking_id="live", path="optimized", status="in-progress", created_at=now - 30))

    rows = {r["trackingId"]: r for r in call_page(store, limit=10)["calls"]}

    lost = rows["lost"]
    assert lost["live"] is False and lost["outcome"] == "unknown" and lost["durationS"] is None
    assert "final status" in lost["reasons"]["durationS"] and lost["endedAt"] is None
    assert rows["live"]["live"] is True and rows["live"]["outcome"] == "in_progress" and rows["live"]["durationS"] >= 30
    assert [c.tracking_id for c in store.live_calls(since=now - LIVE_CALL_HORIZON_S)] == ["live"]


def test_a_call_hung_up_through_end_call_is_not_the_callers_hang_up(app, client, twilio):
    """POST /api/end-call (the web app's end button) ends the call; Twilio then reports it `completed` like a caller
    hanging up. The call log and the report say who ended it."""
    from tests.helpers import make_call_body
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    tracking_id = data["optimization"]["trackingId"]

    assert client.post("/api/end-call", json={"callSid": data["callSid"]}).status_code == 200
    twilio.post(f"/api/call-status-optimized?trackingId={tracking_id}",
                {"CallSid": data["callSid"], "CallStatus": "completed", "SequenceNumber": "5"})

    assert client.get(f"/api/call-log/{tracking_id}").get_json()["call"]["outcome"] == "ended_by_api"
    assert client.get("/api/call-log").get_json()["calls"][0]["outcome"] == "ended_by_api"


def test_end_call_hangs_up_even_when_its_end_reason_cannot_be_written(app, client, fake_twilio, monkeypatch):
    """The end reason labels the call; hanging it up is what the operator asked for. A store that reads but cannot
    write (a full disk, a locked SQLite file) must not keep the caller on the line, and Twilio's own refusal must
    reach the client rather than the failed write of taking the reason back."""
    from callweaver.store import StoreError
    from tests.helpers import make_call_body
    first = client.post("/api/make-call-optimized", json=make_call_body()).get_json()["callSid"]
    second = client.post("/api/make-call-optimized", json=make_call_body()).get_json()["callSid"]
    store = app.extensions["callweaver"].store

    writes, marked = store.change_meta, []

    def full_disk(*args, **kwargs):
        raise StoreError("database or disk is full")

    def full_disk_once_marked(tracking_id, change):
        if marked:
            full_disk()
        marked.append(tracking_id)
        return writes(tracking_id, change)

    monkeypatch.setattr(store, "change_meta", full_disk)
    ended = client.post("/api/end-call", json={"callSid": first})
    monkeypatch.setattr(store, "change_meta", full_disk_once_marked)
    del fake_twilio.calls[second]  # Twilio no longer knows the call: it refuses with 404
    refused = client.post("/api/end-call", json={"callSid": second})

    assert ended.status_code == 200 and ended.get_json()["success"] is True
    assert [u.path.rsplit("/", 1)[-1] for u in fake_twilio.updates()] == [f"{first}.json", f"{second}.json"]
    assert refused.status_code == 404 and "not found" in refused.get_json()["error"]


def test_a_refused_end_call_takes_its_end_reason_back(app, client, twilio, fake_twilio):
    """Twilio refused (the call had already gone): the caller's hang-up stays the caller's."""
    from tests.helpers import make_call_body
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    tracking_id = data["optimization"]["trackingId"]
    del fake_twilio.calls[data["callSid"]]

    assert client.post("/api/end-call", json={"callSid": data["callSid"]}).status_code == 404
    twilio.post(f"/api/call-status-optimized?trackingId={tracking_id}",
                {"CallSid": data["callSid"], "CallStatus": "completed", "SequenceNumber": "5"})

    assert client.get(f"/api/call-log/{tracking_id}").get_json()["call"]["outcome"] == "hang_up"


def test_unmeasured_call_log_figures_are_null_with_their_reason(store, client):
    """Every null figure says why, as the metrics APIs do (engine/metrics.py null_reasons)."""
    from callweaver.engine.metrics import NO_FIRST_TOKEN
    seed_calls(store)
    store.append_turn("call_2", {"firstTokenMs": None, "source": "apology", "at": NOW + 3})

    rows = {r["trackingId"]: r for r in call_page(store, limit=10)["calls"]}
    latency = client.get("/api/call-latency?window=900").get_json()

    assert rows["call_1"]["firstTokenP50Ms"] is None and rows["call_1"]["reasons"]["firstTokenP50Ms"] == "no caller turns"
    assert rows["call_2"]["firstTokenP50Ms"] is None and rows["call_2"]["reasons"]["firstTokenP50Ms"] == NO_FIRST_TOKEN
    assert latency["points"] == [] and latency["reason"] == "no measured turns in this window"


def test_filtered_pages_are_the_same_whatever_the_redis_scan_chunk(store, monkeypatch):
    """Redis filters the created-at index a chunk at a time: pages that straddle chunks (and the total) are the
    ones SQLite's single query gives."""
    monkeypatch.setattr("callweaver.store.redis.PAGE_SCAN_CHUNK", 3)
    for i in range(11):
        store.create_call(CallRecord(tracking_id=f"call_{i:02d}", created_at=NOW + i,
                                     status="completed" if i % 3 else "busy", path="optimized"))
    completed = [f"call_{i:02d}" for i in reversed(range(11)) if i % 3]

    pages = [store.call_page(2, offset, status="completed") for offset in range(0, 9)]

    for offset, (page, total) in enumerate(pages):
        assert total == len(completed) == 7
        assert [r.tracking_id for r in page] == completed[offset:offset + 2]
    assert store.call_page(0, 0, status="busy") == ([], 4)
