"""The deployed web app can reach the API (the original's CORS origins) and its make-call body places calls
with the server's own credentials (ALLOW_REQUEST_CREDENTIALS=1), never with the bundle's leaked fallback."""
from __future__ import annotations

import hashlib

import pytest

from callweaver import create_app
from callweaver import security
from callweaver.config import ConfigError
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.helpers import make_call_body, twiml_optimized_path

ORIGINAL_ORIGINS = ("http://localhost:8080", "http://localhost:3000", "https://kimiya-ai.vercel.app",
                    "https://kimiyi-ai.onrender.com")


@pytest.mark.parametrize("origin", ORIGINAL_ORIGINS)
def test_preflight_from_each_of_the_original_origins_gets_that_origin_back(client, origin):
    resp = client.options("/api/make-call-optimized", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert resp.status_code == 200
    assert resp.headers.get("Access-Control-Allow-Origin") == origin
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]


def test_default_origins_are_exactly_the_original_four(app):
    assert app.extensions["callweaver"].settings.cors_origins == ORIGINAL_ORIGINS
    other = app.test_client().options("/api/chat", headers={
        "Origin": "https://call-flow-weaver.vercel.app", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_wildcard_origins_are_served_without_credentials(env):
    client = create_app({**env, "CORS_ORIGINS": "*"}).test_client()
    resp = client.options("/api/chat", headers={"Origin": "https://anywhere.example",
                                                "Access-Control-Request-Method": "POST"})
    assert resp.headers.get("Access-Control-Allow-Origin") == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers
    got = client.get("/api/twilio-config", headers={"Origin": "https://anywhere.example"})
    assert got.headers.get("Access-Control-Allow-Origin") == "*"
    assert "Access-Control-Allow-Credentials" not in got.headers


def test_a_body_refused_before_the_app_runs_is_readable_by_the_web_app(client, fake_twilio):
    """A too-large make-call body is refused by the body guard in front of Flask (413): the web app must be able to
    read that answer's `error` like any other (flask-cors never sees it), and another site still must not."""
    origin = "https://kimiya-ai.vercel.app"
    too_large = b'{"to": "+15551234567", "globalPrompt": "' + b"x" * (1024 * 1024) + b'"}'
    resp = client.post("/api/make-call-optimized", data=too_large, content_type="application/json",
                       headers={"Origin": origin})
    assert resp.status_code == 413 and resp.get_json()["success"] is False and resp.get_json()["error"]
    assert resp.headers.get("Access-Control-Allow-Origin") == origin
    assert resp.headers.get("Access-Control-Allow-Credentials") == "true"
    foreign = client.post("/api/make-call-optimized", data=too_large, content_type="application/json",
                          headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 413 and "Access-Control-Allow-Origin" not in foreign.headers
    assert fake_twilio.creates() == []


def test_wildcard_mixed_with_named_origins_is_refused_at_start(env):
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        create_app({**env, "CORS_ORIGINS": "*,https://kimiya-ai.vercel.app"})


BUNDLE_TOKEN = "e" * 32  # stands in for the token built into the web app's bundle (never the real value here)


def _web_app_body() -> dict:
    """The Playground's make-call body (contract §2, §7): /api/twilio-config's accountSid and phoneNumber, and
    the bundle's fallback token because authToken came back empty."""
    return make_call_body(twilioAccountSid=ACCOUNT_SID, twilioAuthToken=BUNDLE_TOKEN, **{"from": "+15005550006"})


def test_web_app_body_with_the_servers_sid_places_the_call_with_the_servers_token(env, fake_twilio):
    app = create_app({**env, "ALLOW_REQUEST_CREDENTIALS": "1"})
    config = app.test_client().get("/api/twilio-config").get_json()["config"]
    assert config["accountSid"] == ACCOUNT_SID and config["authToken"] == ""
    resp = app.test_client().post("/api/make-call-optimized", json=_web_app_body())
    assert resp.status_code == 200, resp.get_json()
    created = fake_twilio.creates()[-1]
    assert created.account_sid == ACCOUNT_SID and created.auth_ok  # the server's own token
    record = app.extensions["callweaver"].store.get_call(resp.get_json()["optimization"]["trackingId"])
    assert record.credentials is None  # nothing of the body's kept


def test_bundle_fallback_credentials_are_recognised_by_fingerprint_and_treated_as_absent(env, fake_twilio,
                                                                                        monkeypatch):
    leaked_sid, leaked_token = "AC" + "d4" * 16, "9" * 32
    fingerprints = {hashlib.sha256(v.encode()).hexdigest() for v in (leaked_sid, leaked_token)}
    monkeypatch.setattr(security, "BUNDLE_FALLBACK_CREDENTIAL_SHA256",
                        security.BUNDLE_FALLBACK_CREDENTIAL_SHA256 | fingerprints)
    app = create_app({**env, "ALLOW_REQUEST_CREDENTIALS": "1"})
    client = app.test_client()
    for sid, token in ((leaked_sid, leaked_token), (leaked_sid, "a" * 32), ("AC" + "b2" * 16, leaked_token)):
        resp = client.post("/api/make-call-optimized", json=make_call_body(twilioAccountSid=sid,
                                                                          twilioAuthToken=token))
        assert resp.status_code == 200, resp.get_json()
        created = fake_twilio.creates()[-1]
        assert created.account_sid == ACCOUNT_SID and created.auth_ok


def test_the_shipped_fingerprints_name_the_bundles_values_without_containing_them():
    prints = security.BUNDLE_FALLBACK_CREDENTIAL_SHA256
    assert len(prints) >= 2 and all(len(p) == 64 and int(p, 16) >= 0 for p in prints)
    assert not security.is_bundle_fallback_credential(ACCOUNT_SID)
    assert not security.is_bundle_fallback_credential(AUTH_TOKEN)


def test_a_genuinely_different_account_is_used_for_that_call(env, fake_twilio):
    app = create_app({**env, "ALLOW_REQUEST_CREDENTIALS": "1"})
    other_sid, other_token = "AC" + "b2" * 16, "c" * 32
    fake_twilio.account_sid, fake_twilio.auth_token = other_sid, other_token
    resp = app.test_client().post("/api/make-call-optimized",
                                  json=make_call_body(twilioAccountSid=other_sid, twilioAuthToken=other_token))
    assert resp.status_code == 200, resp.get_json()
    assert fake_twilio.creates()[-1].account_sid == other_sid and fake_twilio.creates()[-1].auth_ok


def test_paths_only_twilio_requests_are_exactly_the_ones_served_only_to_twilio(app):
    """BROWSERLESS_PATHS (no CORS headers) lists every path whose every view is a signed Twilio webhook or the relay
    socket, and nothing else."""
    from callweaver.routes.common import BROWSERLESS_PATHS
    from callweaver.routes.common import RELAY_PATH

    views_by_path: dict[str, list] = {}
    for rule in app.url_map.iter_rules():
        views_by_path.setdefault(rule.rule, []).append(app.view_functions[rule.endpoint])
    only_twilio = {path for path, views in views_by_path.items()
                   if path == RELAY_PATH or all(getattr(view, "twilio_webhook", False) for view in views)}
    assert set(BROWSERLESS_PATHS) == only_twilio


def test_twilios_answers_carry_no_cors_headers_and_the_web_apps_still_do(client, twilio, fake_twilio):
    data = client.post("/api/make-call-optimized", json=make_call_body(),
                       headers={"Origin": "http://localhost:8080"})
    assert data.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"
    twiml = twilio.post(twiml_optimized_path(data.get_json()["optimization"]["trackingId"]),
                        {"CallSid": data.get_json()["callSid"]})
    assert twiml.status_code == 200 and b"<ConversationRelay" in twiml.data
    assert not [name for name in twiml.headers.keys() if name.startswith("Access-Control-") or name == "Vary"]
    poll = client.get("/api/call-status?callSid=" + data.get_json()["callSid"], headers={"Origin": "http://localhost:3000"})
    assert poll.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
