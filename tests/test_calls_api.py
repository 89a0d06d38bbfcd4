"""The drop-in call API: make-call, status callbacks, end-call, call-status, twilio-config, bad input."""
from __future__ import annotations

import json
from urllib.parse import urlsplit

import flask

from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PHONE, PUBLIC
from tests.helpers import make_call_body


def _services(app):
    return app.extensions["callweaver"]


def test_make_call_optimized_sends_exact_twilio_parameters_and_stores_the_call(app, client, fake_twilio):
    resp = client.post("/api/make-call-optimized", json=make_call_body())
    assert resp.status_code == 200, resp.get_json()
    data = resp.get_json()
    assert data["success"] is True and data["callSid"].startswith("CA")
    assert data["status"] == "queued" and data["to"] == "+15551234567" and data["from"] == PHONE
    tracking_id = data["optimization"]["trackingId"]
    assert tracking_id.startswith("call_") and isinstance(data["message"], str)

    (create,) = fake_twilio.creates()
    assert create.auth_ok and create.account_sid == ACCOUNT_SID  # server creds, stale body creds ignored
    assert create.one("To") == "+15551234567" and create.one("From") == PHONE
    # The relay TwiML goes inline (tests/test_inline_twiml.py): no Url, no Method for Twilio to fetch it with.
    assert create.one("Twiml").count("<ConversationRelay ") == 1
    assert create.one("Url") is None and create.one("Method") is None
    assert create.one("StatusCallback") == f"{PUBLIC}/api/call-status-optimized?trackingId={tracking_id}"
    assert create.one("StatusCallbackMethod") == "POST"
    assert create.params["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
    assert create.one("Timeout") == "30" and create.one("Record") == "false"
    # the flow's maxCallDuration (30 min), under MAX_CALL_DURATION_S: a line kept open is not billed for 4 hours
    assert create.one("TimeLimit") == "1800"

    record = _services(app).store.get_call(tracking_id)
    assert record.call_sid == data["callSid"] and record.path == "optimized"
    assert record.workflow_hash and record.greeting.startswith("Hello! Thank you for calling Premier Properties")
    assert "YOUR_API_KEY" not in json.dumps(record.to_dict())


def test_make_call_traditional_points_twilio_at_twiml_ai(client, fake_twilio):
    resp = client.post("/api/make-call", json=make_call_body(timeout=2))
    data = resp.get_json()
    assert resp.status_code == 200 and data["success"] and data["message"] == "Call initiated successfully to +15551234567"
    (create,) = fake_twilio.creates()
    assert urlsplit(create.one("Url")).path == "/api/twiml-ai"
    assert create.one("Timeout") == "5"  # clamped to [5, 600] as the original did
    assert urlsplit(create.one("StatusCallback")).path == "/api/call-status"


def test_end_call_with_empty_json_body_reads_callsid_from_query(client, fake_twilio):
    sid = client.post("/api/make-call-optimized", json=make_call_body()).get_json()["callSid"]
    resp = client.post(f"/api/end-call?callSid={sid}", data="", content_type="application/json")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json() == {"success": True, "message": "Call ended successfully", "callSid": sid,
                               "status": "completed"}
    (update,) = fake_twilio.updates()
    assert update.path.endswith(f"/Calls/{sid}.json") and update.one("Status") == "completed"


def test_end_call_with_json_body(client, fake_twilio):
    sid = client.post("/api/make-call-optimized", json=make_call_body()).get_json()["callSid"]
    resp = client.post("/api/end-call", json={"callSid": sid})
    assert resp.status_code == 200 and resp.get_json()["success"] is True


def test_signed_status_callbacks_update_the_record_in_sequence_order(app, client, twilio):
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    tid, sid = data["optimization"]["trackingId"], data["callSid"]
    path = f"/api/call-status-optimized?trackingId={tid}"
    for seq, status in [(1, "ringing"), (0, "initiated"), (3, "completed"), (2, "in-progress")]:
        resp = twilio.post(path, {"CallSid": sid, "CallStatus": status, "SequenceNumber": str(seq),
                                  "AccountSid": ACCOUNT_SID})
        assert resp.status_code == 200 and resp.get_json() == {"success": True}
        with app.app_context():  # the answer's bytes and type are jsonify's, though built without it
            expected = flask.jsonify(success=True)
        assert (resp.data, resp.content_type) == (expected.data, expected.content_type)
    store = _services(app).store
    assert store.get_call(tid).status == "completed"
    assert [h["status"] for h in store.status_history(tid)] == ["initiated", "ringing", "in-progress", "completed"]
    assert store.get_call(tid).ended_at is not None


def test_unsigned_or_wrongly_signed_callback_is_403_and_changes_nothing(app, client, twilio):
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    tid, sid = data["optimization"]["trackingId"], data["callSid"]
    path = f"/api/call-status-optimized?trackingId={tid}"
    params = {"CallSid": sid, "CallStatus": "completed", "SequenceNumber": "5"}
    assert twilio.post(path, params, sign=False).status_code == 403
    assert twilio.post(path, params, signature="bm90IGEgc2lnbmF0dXJl").status_code == 403
    # a signature for other params (tampered body) is rejected too
    from callweaver.simulate.webhooks import twilio_signature
    forged = twilio_signature(AUTH_TOKEN, PUBLIC + path, {**params, "CallStatus": "ringing"})
    assert twilio.post(path, params, signature=forged).status_code == 403
    assert twilio.post("/api/call-status", params, sign=False).status_code == 403
    store = _services(app).store
    assert store.status_history(tid) == [] and store.get_call(tid).status == "queued"


def test_traditional_status_callback_answers_plain_ok(client, twilio):
    data = client.post("/api/make-call", json=make_call_body()).get_json()
    tid = data["trackingId"]
    resp = twilio.post(f"/api/call-status?trackingId={tid}", {"CallSid": data["callSid"], "CallStatus": "ringing",
                                                              "SequenceNumber": "1"})
    assert resp.status_code == 200 and resp.data == b"OK"


def test_call_status_poll_returns_the_call(client):
    sid = client.post("/api/make-call-optimized", json=make_call_body()).get_json()["callSid"]
    resp = client.get(f"/api/call-status?callSid={sid}")
    body = resp.get_json()
    assert resp.status_code == 200 and body["success"] is True
    assert body["call"]["sid"] == sid and body["call"]["status"] == "queued"
    assert set(body["call"]) >= {"sid", "status", "direction", "from", "to", "duration", "price", "priceUnit"}


def test_call_status_poll_masks_phone_numbers_as_the_call_log_does(env, client):
    """The poll is public and answers for any call SID on the server's Twilio account (an inbound caller's too): its
    numbers are masked like the operator's own call log, unless MASK_PHONE_NUMBERS=0."""
    from callweaver import create_app
    sid = client.post("/api/make-call-optimized", json=make_call_body()).get_json()["callSid"]

    call = client.get(f"/api/call-status?callSid={sid}").get_json()["call"]
    whole = create_app({**env, "MASK_PHONE_NUMBERS": "0"}).test_client().get(f"/api/call-status?callSid={sid}")

    assert call["to"] == "•••••••4567" and "+1555" not in json.dumps(call) and call["from"].startswith("•")
    assert whole.get_json()["call"]["to"] == "+15551234567"


def test_twilio_config_never_returns_the_token(client):
    body = client.get("/api/twilio-config").get_json()
    assert body["success"] is True
    assert body["config"]["authToken"] == "" and body["config"]["hasAuthToken"] is True
    assert body["config"]["accountSid"] == ACCOUNT_SID and body["config"]["phoneNumber"] == PHONE
    assert AUTH_TOKEN not in json.dumps(body)


def test_twilio_error_maps_to_4xx_with_twilio_message_and_code(client, fake_twilio):
    from tests.fakes.fake_twilio import TwilioError
    fake_twilio.error = TwilioError(400, 21211, "The 'To' number +15551234567 is not a valid phone number.")
    resp = client.post("/api/make-call-optimized", json=make_call_body())
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["success"] is False and body["code"] == 21211 and "not a valid phone number" in body["error"]
    resp = client.post("/api/make-call", json=make_call_body())
    assert resp.status_code == 400 and resp.get_json()["code"] == 21211


def test_twilio_server_error_is_502_not_500(client, fake_twilio):
    from tests.fakes.fake_twilio import TwilioError
    fake_twilio.error = TwilioError(503, 20500, "Internal Server Error")
    resp = client.post("/api/make-call-optimized", json=make_call_body())
    assert resp.status_code == 502 and resp.get_json()["success"] is False


# ---- bad input (point 8) -------------------------------------------------------------------------

def test_missing_to_is_400(client, fake_twilio):
    resp = client.post("/api/make-call-optimized", json=make_call_body(to=None))
    assert resp.status_code == 400
    assert resp.get_json() == {"success": False, "error": "Phone number (to) is required"}
    assert fake_twilio.creates() == []


def test_unparseable_to_is_400(client, fake_twilio):
    for bad in ("call me maybe", "+0123", "12", {"n": 1}):
        resp = client.post("/api/make-call", json=make_call_body(to=bad))
        assert resp.status_code == 400, bad
        assert resp.get_json()["success"] is False and "E.164" in resp.get_json()["error"]
    assert fake_twilio.creates() == []


def test_phone_numbers_are_normalised_like_the_original(client, fake_twilio):
    resp = client.post("/api/make-call-optimized", json=make_call_body(to="(555) 123-4567"))
    assert resp.status_code == 200 and resp.get_json()["to"] == "+15551234567"


def test_destination_outside_allowed_prefixes_is_400(client, fake_twilio):
    resp = client.post("/api/make-call-optimized", json=make_call_body(to="+882345678901"))
    assert resp.status_code == 400 and "ALLOWED_DESTINATION_PREFIXES" in resp.get_json()["error"]
    assert fake_twilio.creates() == []


def test_malformed_json_is_400(client):
    resp = client.post("/api/make-call-optimized", data="{not json", content_type="application/json")
    assert resp.status_code == 400
    assert resp.get_json() == {"success": False, "error": "Malformed JSON body"}


def test_body_over_1_mib_is_413(client):
    resp = client.post("/api/make-call-optimized", data="{" + " " * (1024 * 1024 + 10) + "}",
                       content_type="application/json")
    assert resp.status_code == 413
    assert resp.get_json()["success"] is False and "too large" in resp.get_json()["error"]


def test_unknown_path_is_json_404(client):
    resp = client.get("/api/nope")
    assert resp.status_code == 404
    assert resp.get_json() == {"success": False, "error": "Endpoint not found", "path": "/api/nope"}


def test_unexpected_error_is_json_500_with_request_id(app, client, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaboom secret")
    monkeypatch.setattr(_services(app).lifecycle, "start_call", boom)
    resp = client.post("/api/make-call-optimized", json=make_call_body())
    assert resp.status_code == 500
    body = resp.get_json()
    assert body["success"] is False and body["error"] == "Internal server error" and body["requestId"]
    assert "kaboom" not in json.dumps(body)


def test_invalid_workflow_is_400_with_problems(client, fake_twilio):
    body = make_call_body()
    body["edges"] = body["edges"] + [{"id": "bad", "source": "start_node", "target": "ghost_node",
                                      "type": "conditional", "data": {"type": "none"}}]
    resp = client.post("/api/make-call-optimized", json=body)
    assert resp.status_code == 400
    data = resp.get_json()
    assert data["success"] is False and any("ghost_node" in p for p in data["problems"])
    assert fake_twilio.creates() == []


def test_end_call_without_sid_is_400(client):
    resp = client.post("/api/end-call", json={})
    assert resp.status_code == 400 and resp.get_json() == {"success": False, "error": "Call SID is required"}


def test_request_credentials_ignored_by_default_and_used_when_allowed(tmp_path, fake_twilio, monkeypatch):
    from callweaver import create_app
    from tests.conftest import base_env
    other_sid, other_token = "AC" + "b2" * 16, "c" * 32
    env = {**base_env(tmp_path, fake_twilio), "TWILIO_ACCOUNT_SID": "", "TWILIO_AUTH_TOKEN": "",
           "ALLOW_REQUEST_CREDENTIALS": "1"}
    app = create_app(env)
    fake_twilio.account_sid, fake_twilio.auth_token = other_sid, other_token
    body = make_call_body(twilioAccountSid=other_sid, twilioAuthToken=other_token)
    resp = app.test_client().post("/api/make-call-optimized", json=body)
    assert resp.status_code == 200, resp.get_json()
    assert fake_twilio.creates()[0].account_sid == other_sid
    tid = resp.get_json()["optimization"]["trackingId"]
    record = app.extensions["callweaver"].store.get_call(tid)
    assert record.credentials and other_token not in record.credentials  # encrypted at rest
    # that call's webhooks validate with its own token
    from tests.conftest import Signer
    signer = Signer(app.test_client(), token=other_token)
    ok = signer.post(f"/api/call-status-optimized?trackingId={tid}",
                     {"CallSid": resp.get_json()["callSid"], "CallStatus": "completed", "SequenceNumber": "3"})
    assert ok.status_code == 200
    assert app.extensions["callweaver"].store.get_call(tid).credentials is None  # deleted when the call ends

    # without the flag and without server creds: a clear error naming the env vars
    env2 = {**env, "ALLOW_REQUEST_CREDENTIALS": "0"}
    resp = create_app(env2).test_client().post("/api/make-call-optimized", json=body)
    assert resp.status_code == 503 and "TWILIO_ACCOUNT_SID" in resp.get_json()["error"]


def test_cors_preflight_allows_the_web_app(client):
    resp = client.options("/api/make-call-optimized", headers={
        "Origin": "http://localhost:8080", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()
    got = client.get("/api/twilio-config", headers={"Origin": "http://localhost:8080"})
    assert got.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"


def test_without_public_base_url_callbacks_follow_forwarded_headers_and_signatures_use_them(env, fake_twilio):
    from callweaver import create_app
    from callweaver.simulate.webhooks import twilio_signature
    app = create_app({**env, "PUBLIC_BASE_URL": ""})
    client = app.test_client()
    proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "cw.onrender.example"}
    data = client.post("/api/make-call-optimized", json=make_call_body(), headers=proxy).get_json()
    tid = data["optimization"]["trackingId"]
    callback = fake_twilio.creates()[-1].one("StatusCallback")
    assert callback == f"https://cw.onrender.example/api/call-status-optimized?trackingId={tid}"
    params = {"CallSid": data["callSid"], "CallStatus": "ringing", "SequenceNumber": "1"}
    good = twilio_signature(AUTH_TOKEN, callback, params)
    assert client.post(callback[len("https://cw.onrender.example"):], data=params,
                       headers={**proxy, "X-Twilio-Signature": good}).status_code == 200
    # the same signature over the internal http:// URL does not validate
    internal = twilio_signature(AUTH_TOKEN, "http://localhost" + callback[len("https://cw.onrender.example"):], params)
    assert client.post(callback[len("https://cw.onrender.example"):], data=params,
                       headers={**proxy, "X-Twilio-Signature": internal}).status_code == 403


def test_foreign_twiml_url_and_premium_transfer_destinations_are_refused(client, fake_twilio):
    resp = client.post("/api/make-call-optimized", json=make_call_body(twimlUrl="https://evil.example/x"),
                       headers={"X-Forwarded-Host": "evil.example"})
    assert resp.status_code == 400 and "twimlUrl" in resp.get_json()["error"]
    body = make_call_body()
    for node in body["nodes"]:
        if node["type"] == "transferCall":
            node["data"]["destination"] = "+882345678901"
    resp = client.post("/api/make-call-optimized", json=body)
    assert resp.status_code == 400 and "ALLOWED_DESTINATION_PREFIXES" in resp.get_json()["error"]
    assert fake_twilio.creates() == []


def test_a_twiml_url_naming_another_calls_tracking_id_is_refused(app, client, twilio, fake_twilio):
    """Twilio signs whatever URL it was given, so a twimlUrl query naming another call's trackingId made this call's
    webhooks act on that call: its record took this call's CallSid and its TwiML (history, workflow) served it."""
    victim = client.post("/api/make-call-optimized", json=make_call_body()).get_json()["optimization"]["trackingId"]
    store = app.extensions["callweaver"].store
    victim_sid = store.get_call(victim).call_sid
    for query in (f"trackingId={victim}", f"id=wf&trackingId={victim}", f"id=wf&TRACKINGID={victim}&x=1"):
        resp = client.post("/api/make-call-optimized",
                           json=make_call_body(to="+14155550123", twimlUrl=f"/api/twiml-optimized?{query}"))
        assert resp.status_code == 400, query
        assert resp.get_json()["success"] is False and "twimlUrl" in resp.get_json()["error"]
    assert len(fake_twilio.creates()) == 1 and store.get_call(victim).call_sid == victim_sid
    # naming the workflow, as the original's URLs do, stays accepted
    resp = client.post("/api/make-call", json=make_call_body(twimlUrl="/api/twiml-ai?id=wf_other"))
    assert resp.status_code == 200
    assert fake_twilio.creates()[-1].one("Url") == f"{PUBLIC}/api/twiml-ai?id=wf_other"


def test_twiml_route_failure_answers_an_apology_in_twiml(app, client, twilio, monkeypatch):
    data = client.post("/api/make-call", json=make_call_body()).get_json()
    store = app.extensions["callweaver"].store

    def broken(*a, **k):
        raise RuntimeError("store down")
    monkeypatch.setattr(store, "update_call", broken)
    resp = twilio.post(f"/api/twiml-ai?id=wf&trackingId={data['trackingId']}",
                       {"CallSid": "CA" + "9" * 32, "SpeechResult": "hello"})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/xml")
    assert b"<Say" in resp.data and b"<Hangup" in resp.data
