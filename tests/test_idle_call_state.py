"""What a live call keeps while it waits (issue 12, goal 7: memory per idle call, bench/idle_call_memory.py): the
values every call of a flow repeats are one shared object, and the socket's upgrade builds no request form."""
from __future__ import annotations

import orjson

from callweaver.engine.conversation import ConversationEngine
from callweaver.engine.languages import LanguageTable
from callweaver.store import CallRecord

GREETING = "Hello! Thank you for calling Premier Properties. How may I assist you today?"


def stored_record(tracking_id: str, to: str) -> CallRecord:
    """A record as the store hands it out: freshly decoded JSON, so no string is shared with another record."""
    data = CallRecord(
        tracking_id=tracking_id, workflow={"nodes": []}, workflow_hash="d02d880a" * 8,
        workflow_id="wf_real_estate", greeting=GREETING, to=to, current_node="inquiry_type_node",
        messages=[{"role": "assistant", "content": GREETING}],
        meta={"homeLanguage": "en-US", "relayLanguages": ["en-US", "de-DE", "fr-FR"],
              "setup": {"direction": "outbound-api", "callType": "PSTN", "to": to}}).to_dict()
    return CallRecord.from_dict(orjson.loads(orjson.dumps(data)))


def test_live_calls_of_one_flow_share_the_values_they_all_repeat():
    engine = ConversationEngine(None, None, LanguageTable.load())
    first, second = stored_record("a", "+15551000001"), stored_record("b", "+15551000002")
    assert first.greeting is not second.greeting  # decoded apart
    expected = [first.to_dict(), second.to_dict()]

    first, second = engine.sharing_snapshot(first), engine.sharing_snapshot(second)

    assert [first.to_dict(), second.to_dict()] == expected  # values unchanged
    assert first.greeting is second.greeting
    assert first.messages[0]["content"] is first.greeting  # the greeting, also as the history's first line
    assert first.messages[0]["role"] is second.messages[0]["role"]
    for name in ("workflow_hash", "workflow_id", "current_node", "language", "status", "path"):
        assert getattr(first, name) is getattr(second, name), name
    assert all(a is b for a, b in zip(first.meta["relayLanguages"], second.meta["relayLanguages"]))
    assert first.meta["homeLanguage"] is second.meta["homeLanguage"]
    assert first.meta["setup"]["direction"] is second.meta["setup"]["direction"]
    assert first.meta["setup"]["to"] != second.meta["setup"]["to"]  # what is the call's own stays its own


def test_a_record_without_a_workflow_snapshot_is_shared_too():
    engine = ConversationEngine(None, None, LanguageTable.load())
    first, second = (CallRecord.from_dict(orjson.loads(orjson.dumps({"tracking_id": t, "greeting": GREETING})))
                     for t in ("a", "b"))
    assert engine.sharing_snapshot(first).greeting is engine.sharing_snapshot(second).greeting


def test_the_sockets_get_upgrade_builds_no_form(app):
    """verify_twilio reads form fields only from a POST: on the relay's GET upgrade, request.form would build an
    empty form, files and input stream that the call's request keeps for as long as the call lives."""
    from flask import request

    from callweaver.routes.common import verify_twilio

    with app.test_request_context("/relay?trackingId=call_1", method="GET"):
        verify_twilio()
        assert "form" not in request.__dict__ and "files" not in request.__dict__
    with app.test_request_context("/twilio/status", method="POST", data={"CallSid": "CA" + "0" * 32}):
        verify_twilio()
        assert request.form["CallSid"] == "CA" + "0" * 32


def test_a_record_whose_history_is_null_is_shared_without_failing():
    """A stored record may carry `"messages": null` (CallRecord.from_dict keeps it); sharing must not raise."""
    from callweaver.engine.conversation import share_repeated_values

    record = CallRecord.from_dict({"tracking_id": "call_null", "messages": None, "greeting": "Hi"})
    share_repeated_values(record)
    assert record.messages is None and record.greeting == "Hi"


def test_make_call_keeps_no_decoded_body_through_the_twilio_request(app, client, fake_twilio, monkeypatch):
    """The decoded make-call body (the whole flow) is released before the Twilio request: while that request
    waits, other calls' set-ups run, and 25 concurrent bodies left free gaps between the live calls' long-lived
    objects (~1.4 KiB per idle call at 200 calls; docs/performance-history.md, "Issue 12t")."""
    import gc
    import json

    from tests.helpers import make_call_body

    gateway = app.extensions["callweaver"].twilio
    place = gateway.create_call
    marker = "+15557654321"
    bodies_alive = []

    def create_call(**kwargs):
        bodies_alive.append(sum(1 for obj in gc.get_objects()
                                if type(obj) is dict and obj.get("to") == marker and "nodes" in obj))
        return place(**kwargs)

    monkeypatch.setattr(gateway, "create_call", create_call)
    raw = json.dumps(make_call_body(to=marker))  # the test's own dict is gone: only the server's decoded copy counts
    resp = client.post("/api/make-call-optimized", data=raw, content_type="application/json")
    assert resp.status_code == 200, resp.get_json()
    assert bodies_alive == [0]
