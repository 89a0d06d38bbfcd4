"""Safe on the public internet: toll-fraud destinations, rate limits, cross-site requests, fail-closed signatures,
the production public URL, operator surfaces, hostile input and log lines (issue 11, application level)."""
from __future__ import annotations

import base64
import contextlib
import json
import secrets
import time

import pytest

from callweaver import create_app
from callweaver.config import ConfigError, Settings
from callweaver.simulate.webhooks import twilio_signature
from tests.conftest import AUTH_TOKEN, PHONE, PUBLIC, Signer, base_env
from tests.fakes.redis_server import RedisServer
from tests.helpers import make_call_body

CALL_SID = "CA" + "b2" * 16


def _post_call(client, to: str, **extra):
    return client.post("/api/make-call-optimized", json=make_call_body(to=to, **extra))


# ---- 1. destination policy ------------------------------------------------------------------------------

@pytest.mark.parametrize("to, prefix", [("+19005550123", "+1900"), ("+18765550123", "+1876"),
                                        ("+18095550123", "+1809"), ("+12685550123", "+1268"),
                                        ("+14415550123", "+1441")])
def test_premium_and_caribbean_nanp_numbers_are_refused_naming_the_prefix(client, fake_twilio, to, prefix):
    resp = _post_call(client, to)
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert f"prefix {prefix} is blocked" in error and "BLOCKED_DESTINATION_PREFIXES" in error
    assert fake_twilio.creates() == []


def test_us_canada_and_us_territories_stay_callable(client, fake_twilio):
    for to in ("+14155550123", "+14165550123", "+17875550123"):  # US, Canada (Toronto), Puerto Rico
        assert _post_call(client, to).status_code == 200, to
    assert len(fake_twilio.creates()) == 3


def test_full_width_digits_are_not_a_phone_number(client, fake_twilio):
    resp = _post_call(client, "+1415555010\uff10")
    assert resp.status_code == 400 and "E.164" in resp.get_json()["error"]
    body = make_call_body()
    body["nodes"] = [*body["nodes"], {"id": "xfer", "type": "transferNode", "position": {"x": 0, "y": 0},
                                      "data": {"label": "Transfer", "destination": "+1415555010\u0660"}}]
    assert client.post("/api/make-call-optimized", json=body).status_code == 400
    assert fake_twilio.creates() == []


def test_transfer_node_to_a_premium_number_is_refused(client, fake_twilio):
    body = make_call_body()
    body["nodes"] = [*body["nodes"], {"id": "xfer", "type": "transferNode", "position": {"x": 0, "y": 0},
                                      "data": {"label": "Transfer", "destination": "+19005550199"}}]
    resp = client.post("/api/make-call-optimized", json=body)
    assert resp.status_code == 400 and "prefix +1900 is blocked" in resp.get_json()["error"]
    assert fake_twilio.creates() == []


def test_blocked_prefixes_are_configurable(env, fake_twilio):
    client = create_app({**env, "BLOCKED_DESTINATION_PREFIXES": "+1415"}).test_client()
    assert _post_call(client, "+14155550123").status_code == 400
    assert _post_call(client, "+18765550123").status_code == 200  # the operator chose to allow Jamaica
    with pytest.raises(ConfigError, match="BLOCKED_DESTINATION_PREFIXES"):
        Settings.from_env({"BLOCKED_DESTINATION_PREFIXES": "1900"})


def test_ring_timeout_is_capped_and_recording_follows_record_calls(env, fake_twilio):
    client = create_app(env).test_client()  # RECORD_CALLS unset: never record
    assert _post_call(client, "+14155550123", timeout=600, record=True).status_code == 200
    placed = fake_twilio.creates()[-1]
    assert placed.one("Timeout") == "60" and placed.one("Record") in (None, "false", "False")
    client = create_app({**env, "RECORD_CALLS": "1"}).test_client()
    assert _post_call(client, "+14155550123", record=False).status_code == 200
    assert fake_twilio.creates()[-1].one("Record") in (None, "false", "False")
    assert _post_call(client, "+14155550123", record=True).status_code == 200
    assert fake_twilio.creates()[-1].one("Record") in ("true", "True")


# ---- 2. rate limits and caps ----------------------------------------------------------------------------

def test_make_call_is_limited_per_client_with_retry_after(env, fake_twilio, capsys):
    client = create_app({**env, "RATE_LIMIT_MAKE_CALL": "5 per minute"}).test_client()
    statuses = [_post_call(client, "+14155550123").status_code for _ in range(12)]
    assert statuses == [200] * 5 + [429] * 7
    assert len(fake_twilio.creates()) == 5
    resp = client.post("/api/make-call", json=make_call_body())  # the traditional path shares the budget
    assert resp.status_code == 429
    assert resp.get_json()["success"] is False and "RATE_LIMIT_MAKE_CALL" in resp.get_json()["error"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert '"rate_limited"' in capsys.readouterr().out
    other = client.post("/api/make-call-optimized", json=make_call_body(),
                        environ_base={"REMOTE_ADDR": "127.0.0.9"})
    assert other.status_code == 200  # per client


def test_forwarded_for_is_not_trusted_without_a_proxy(env, fake_twilio):
    client = create_app({**env, "RATE_LIMIT_MAKE_CALL": "2 per minute"}).test_client()
    codes = [client.post("/api/make-call-optimized", json=make_call_body(),
                         headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(4)]
    assert codes == [200, 200, 429, 429]


def test_behind_one_trusted_proxy_the_appended_address_is_the_client(env, fake_twilio):
    client = create_app({**env, "RATE_LIMIT_MAKE_CALL": "1 per minute", "TRUSTED_PROXY_HOPS": "1"}).test_client()

    def call(xff: str) -> int:
        return client.post("/api/make-call-optimized", json=make_call_body(),
                           headers={"X-Forwarded-For": xff}).status_code

    assert call("203.0.113.5") == 200
    assert call("1.2.3.4, 203.0.113.5") == 429   # a spoofed left part does not make a new client
    assert call("203.0.113.6") == 200


def test_calls_per_day_cap_holds_across_clients_and_counts_only_placed_calls(env, fake_twilio):
    client = create_app({**env, "MAX_CALLS_PER_DAY": "3"}).test_client()
    assert _post_call(client, "+19005550123").status_code == 400  # refused requests do not use the cap
    codes = [client.post("/api/make-call-optimized", json=make_call_body(),
                         environ_base={"REMOTE_ADDR": f"127.0.0.{i + 2}"}).status_code for i in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    resp = client.post("/api/make-call", json=make_call_body(), environ_base={"REMOTE_ADDR": "127.0.1.1"})
    assert resp.status_code == 429 and "MAX_CALLS_PER_DAY" in resp.get_json()["error"]
    assert len(fake_twilio.creates()) == 3


def test_chat_and_test_optimization_share_the_llm_limit(env, fake_llm):
    client = create_app({**env, "RATE_LIMIT_CHAT": "3 per minute"}).test_client()
    chat = {"messages": [{"role": "user", "content": "hello"}]}
    codes = [client.post("/api/chat", json=chat).status_code for _ in range(2)]
    codes.append(client.post("/api/test-optimization", json={"message": "hi"}).status_code)
    codes.append(client.post("/api/chat", json=chat).status_code)
    codes.append(client.post("/api/test-optimization", json={"message": "hi"}).status_code)
    assert codes == [200, 200, 200, 429, 429]


def test_end_call_is_limited(env, fake_twilio):
    client = create_app({**env, "RATE_LIMIT_END_CALL": "2 per minute"}).test_client()
    codes = [client.post(f"/api/end-call?callSid={CALL_SID}", data="", content_type="application/json").status_code
             for _ in range(3)]
    assert codes[2] == 429 and 429 not in codes[:2]


def test_call_status_poll_is_limited_in_its_own_window(env, fake_twilio):
    """Each poll asks Twilio's REST API with the server's credentials: unlimited, anyone could spend the account's
    API concurrency (and its workers' time) on it. Its window is its own, so polling never stops a hang-up."""
    client = create_app({**env, "RATE_LIMIT_END_CALL": "2 per minute"}).test_client()  # its default
    codes = [client.get(f"/api/call-status?callSid={CALL_SID}").status_code for _ in range(3)]
    assert codes[2] == 429 and 429 not in codes[:2]
    assert "RATE_LIMIT_CALL_STATUS" in client.get(f"/api/call-status?callSid={CALL_SID}").get_json()["error"]
    assert len([r for r in fake_twilio.requests if r.method == "GET"]) == 2
    end = client.post(f"/api/end-call?callSid={CALL_SID}", data="", content_type="application/json")
    assert end.status_code != 429
    own = create_app({**env, "RATE_LIMIT_END_CALL": "2 per minute", "RATE_LIMIT_CALL_STATUS": "5 per minute"})
    codes = [own.test_client().get(f"/api/call-status?callSid={CALL_SID}").status_code for _ in range(6)]
    assert codes.index(429) == 5  # its own variable, when set


def test_public_aggregate_metrics_are_limited_per_client(env):
    """An aggregate reads every turn of its window (up to a day's) and sorts them for each figure, on the worker
    that serves live calls: ~0.2 s of CPU per request at 20,000 turns a day. Unauthenticated and unlimited, anyone
    could keep the workers busy with it. A call's own metrics (its few turns) stay unlimited."""
    client = create_app({**env, "RATE_LIMIT_METRICS": "3 per minute"}).test_client()
    codes = [client.get(path).status_code
             for path in ("/api/performance-metrics", "/api/performance-comparison?window=600",
                          "/api/performance-metrics?window=86400", "/api/performance-comparison")]
    assert codes == [200, 200, 200, 429]
    refused = client.get("/api/performance-metrics")
    assert "RATE_LIMIT_METRICS" in refused.get_json()["error"] and refused.headers["Retry-After"]
    assert client.get("/api/performance-metrics", environ_base={"REMOTE_ADDR": "127.0.0.5"}).status_code == 200
    assert all(client.get("/api/performance-metrics/call_nope").status_code == 404 for _ in range(5))
    assert Settings.from_env({}).rate_limit_metrics == "30 per minute"


def test_signed_twilio_webhooks_are_never_limited(env, fake_twilio):
    app = create_app({**env, "RATE_LIMIT_MAKE_CALL": "1 per minute", "RATE_LIMIT_CHAT": "1 per minute",
                      "RATE_LIMIT_END_CALL": "1 per minute", "MAX_CALLS_PER_DAY": "1"})
    client = app.test_client()
    tid = _post_call(client, "+14155550123").get_json()["optimization"]["trackingId"]
    for seq in range(40):
        path = f"/api/call-status-optimized?trackingId={tid}"
        params = {"CallSid": CALL_SID, "CallStatus": "ringing", "SequenceNumber": str(seq)}
        resp = client.post(path, data=params,
                           headers={"X-Twilio-Signature": twilio_signature(AUTH_TOKEN, PUBLIC + path, params)})
        assert resp.status_code == 200


def test_limits_are_shared_by_apps_on_one_sqlite_file_and_on_one_redis(tmp_path, fake_twilio):
    """Two apps stand for two workers (same SQLite file) or two instances (same Redis)."""
    env = {**base_env(tmp_path, fake_twilio), "RATE_LIMIT_MAKE_CALL": "4 per minute"}
    first, second = create_app(env).test_client(), create_app(env).test_client()
    codes = [c.post("/api/make-call-optimized", json=make_call_body()).status_code for c in (first, second) * 3]
    assert codes == [200, 200, 200, 200, 429, 429]
    with RedisServer() as redis:
        env = {**env, "REDIS_URL": redis.url, "CALLWEAVER_DB": str(tmp_path / "other.sqlite3")}
        first, second = create_app(env).test_client(), create_app(env).test_client()
        codes = [c.post("/api/make-call-optimized", json=make_call_body()).status_code for c in (first, second) * 3]
        assert codes == [200, 200, 200, 200, 429, 429]


def test_a_make_call_refused_for_its_twiml_url_uses_no_slot_of_the_day(env, fake_twilio):
    """The TwiML URL was checked after the day's slot was taken: refused requests that cost nothing could use up
    the whole day's cap (review of the atomic cap)."""
    client = create_app({**env, "MAX_CALLS_PER_DAY": "1"}).test_client()
    resp = client.post("/api/make-call", json=make_call_body(twimlUrl="https://evil.example/x"))
    assert resp.status_code == 400
    assert client.post("/api/make-call", json=make_call_body(),
                       environ_base={"REMOTE_ADDR": "127.0.0.7"}).status_code == 200
    assert len(fake_twilio.creates()) == 1


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_calls_per_day_cap_holds_while_another_worker_places_the_last_call(tmp_path, fake_twilio, backend):
    """Two workers' make-calls in flight when one slot was left both saw room and both placed a call: the cap was
    read before the call and taken after it (review of issue 12s). The second now gets 429 and places nothing."""
    env = {**base_env(tmp_path, fake_twilio), "MAX_CALLS_PER_DAY": "2"}
    with RedisServer() if backend == "redis" else contextlib.nullcontext() as redis:
        if redis is not None:
            env["REDIS_URL"] = redis.url
        first_app, second_app = create_app(env), create_app(env)  # two workers sharing the limit storage
        first, second = first_app.test_client(), second_app.test_client()
        assert first.post("/api/make-call-optimized", json=make_call_body()).status_code == 200  # 1 slot left
        twilio = first_app.extensions["callweaver"].twilio
        create_call, answers = twilio.create_call, []

        def create_call_while_the_other_worker_asks(**kwargs):
            answers.append(second.post("/api/make-call-optimized", json=make_call_body(),
                                       environ_base={"REMOTE_ADDR": "127.0.0.9"}))
            return create_call(**kwargs)

        twilio.create_call = create_call_while_the_other_worker_asks
        assert first.post("/api/make-call-optimized", json=make_call_body()).status_code == 200
        assert [a.status_code for a in answers] == [429]
        assert "MAX_CALLS_PER_DAY" in answers[0].get_json()["error"] and int(answers[0].headers["Retry-After"]) >= 1
        assert len(fake_twilio.creates()) == 2


def test_bad_limit_notation_fails_at_start_naming_the_variable():
    with pytest.raises(ConfigError, match="RATE_LIMIT_MAKE_CALL"):
        Settings.from_env({"RATE_LIMIT_MAKE_CALL": "lots"})
    with pytest.raises(ConfigError, match="MAX_CALLS_PER_DAY"):
        Settings.from_env({"MAX_CALLS_PER_DAY": "0"})


# ---- 3. cross-site requests -----------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"])
def test_form_and_text_bodies_get_415(client, fake_twilio, content_type):
    for origin in ("https://evil.example", None):
        headers = {"Origin": origin} if origin else {}
        resp = client.post("/api/make-call-optimized", data="to=%2B14155550123", content_type=content_type,
                           headers=headers)
        assert resp.status_code == 415 and resp.get_json()["success"] is False
    resp = client.post("/api/chat", data='{"messages": [{"role": "user", "content": "hi"}]}',
                       content_type="text/plain")
    assert resp.status_code == 415
    resp = client.post(f"/api/end-call?callSid={CALL_SID}", data="", content_type="text/plain")
    assert resp.status_code == 415
    assert fake_twilio.creates() == [] and fake_twilio.updates() == []


def test_state_changing_request_from_a_foreign_origin_gets_403(client, fake_twilio):
    resp = client.post("/api/make-call-optimized", json=make_call_body(), headers={"Origin": "https://evil.example"})
    assert resp.status_code == 403 and "Origin" in resp.get_json()["error"]
    resp = client.post("/api/make-call-optimized", json=make_call_body(), headers={"Origin": "null"})
    assert resp.status_code == 403
    assert fake_twilio.creates() == []
    resp = client.post("/api/make-call-optimized", json=make_call_body(), headers={"Origin": "http://localhost:8080"})
    assert resp.status_code == 200
    assert client.get("/api/twilio-config", headers={"Origin": "https://evil.example"}).status_code == 200


# ---- 4. production public URL ---------------------------------------------------------------------------

@pytest.mark.parametrize("production", [{"NODE_ENV": "production"}, {"RENDER": "true"}])
def test_production_refuses_to_start_without_a_public_url(production):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**production, "OPS_TOKEN": "x" * 32})
    assert "PUBLIC_BASE_URL" in str(err.value) and "WEBHOOK_BASE_URL" in str(err.value)
    assert "RENDER_EXTERNAL_URL" in str(err.value)
    for name in ("PUBLIC_BASE_URL", "WEBHOOK_BASE_URL", "RENDER_EXTERNAL_URL"):
        assert Settings.from_env({**production, name: "https://cw.example"}).public_base_url == "https://cw.example"


def test_production_callbacks_never_follow_request_headers(env, fake_twilio):
    client = create_app({**env, "NODE_ENV": "production", "OPS_TOKEN": "o" * 32}).test_client()
    resp = client.post("/api/make-call-optimized", json=make_call_body(),
                       headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"})
    assert resp.status_code == 200
    placed = fake_twilio.creates()[-1]
    assert placed.one("StatusCallback").startswith(PUBLIC + "/")
    # The TwiML sent inline names only PUBLIC_BASE_URL's host: the relay socket and the <Connect action>.
    twiml = placed.one("Twiml")
    assert "evil" not in twiml and f'action="{PUBLIC}/api/connect-action?' in twiml
    assert f'url="{PUBLIC.replace("https://", "wss://").replace("http://", "ws://")}/api/conversationrelay-ws?' in twiml
    # A call placed with the TwiML URL (a relay TwiML too long to go inline, the Gather flow): PUBLIC_BASE_URL's too.
    long_greeting = make_call_body()
    next(n for n in long_greeting["nodes"] if n["type"] == "startNode")["data"]["firstMessage"] = "Welcome. " * 500
    for path, body in (("/api/make-call-optimized", long_greeting), ("/api/make-call", make_call_body())):
        assert client.post(path, json=body, headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
                           ).status_code == 200
        placed = fake_twilio.creates()[-1]
        assert placed.one("Twiml") is None and placed.one("Url").startswith(PUBLIC + "/")
        assert placed.one("StatusCallback").startswith(PUBLIC + "/")


# ---- 5. signatures fail closed --------------------------------------------------------------------------

def test_unsigned_webhook_with_no_auth_token_gets_403(tmp_path, fake_twilio):
    env = {**base_env(tmp_path, fake_twilio), "TWILIO_ACCOUNT_SID": "", "TWILIO_AUTH_TOKEN": ""}
    client = create_app(env).test_client()
    for path in ("/api/call-status", "/api/call-status-optimized?trackingId=x", "/api/twiml-ai?id=fallback",
                 "/api/twiml-optimized", "/api/twiml-default", "/api/connect-action"):
        resp = client.post(path, data={"CallSid": CALL_SID, "CallStatus": "completed"})
        assert resp.status_code == 403, path
    assert client.get("/api/conversationrelay-ws?trackingId=x").status_code == 403
    opened = create_app({**env, "TWILIO_VALIDATE_SIGNATURES": "0"}).test_client()
    assert opened.post("/api/twiml-default", data={"CallSid": CALL_SID}).status_code == 200


# ---- 6. operator surfaces -------------------------------------------------------------------------------

OPS = "ops-token-0123456789abcdef"


def test_operator_surfaces_need_ops_token(env):
    client = create_app({**env, "OPS_TOKEN": OPS}).test_client()
    for path in ("/dashboard", "/api/dashboard-data", "/metrics"):
        refused = client.get(path)
        assert refused.status_code == 401 and "Basic" in refused.headers["WWW-Authenticate"]
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {OPS}"}).status_code == 200
    basic = base64.b64encode(f"ops:{OPS}".encode()).decode()
    assert client.get("/dashboard", headers={"Authorization": f"Basic {basic}"}).status_code == 200


def test_a_short_ops_token_is_refused_at_start():
    with pytest.raises(ConfigError, match="OPS_TOKEN"):
        Settings.from_env({"OPS_TOKEN": "short"})


def test_operator_surfaces_are_off_in_production_without_a_token(env):
    client = create_app({**env, "NODE_ENV": "production"}).test_client()
    for path in ("/dashboard", "/api/dashboard-data", "/metrics"):
        resp = client.get(path, headers={"Authorization": "Bearer "})
        assert resp.status_code == 403 and "OPS_TOKEN" in resp.get_json()["error"]


OPERATOR_PATHS = ("/dashboard", "/api/dashboard-data", "/metrics", "/dashboard/calls", "/api/call-log",
                  "/api/call-latency", "/dashboard/calls/call_secret", "/api/call-log/call_secret")


def _app_with_a_secret_call(env):
    """An app whose store holds one ended call, "call_secret", with something private said on it ("4111")."""
    from callweaver.store import CallRecord
    app = create_app(env)
    app.extensions["callweaver"].store.create_call(CallRecord(
        tracking_id="call_secret", path="optimized", status="completed", to="+14155550123",
        created_at=time.time() - 60, ended_at=time.time(),
        transcript=[{"said": "my card number is 4111", "heard": "Thanks.", "spoken": "Thanks."}]))
    return app


def test_without_ops_token_a_development_server_answers_operator_surfaces_only_on_this_machine(env):
    """No NODE_ENV=production and no OPS_TOKEN (a VPS, a container, an ngrok tunnel to a laptop): the public URL
    must not serve the call log, where what callers said is. Only a request from this machine that no proxy or
    tunnel relayed (the simulator's and the demo's browser) is answered."""
    client = _app_with_a_secret_call(env).test_client()

    for path in OPERATOR_PATHS:
        for environ, headers in (({"REMOTE_ADDR": "203.0.113.7"}, {}),                      # straight from outside
                                 ({"REMOTE_ADDR": "127.0.0.1"}, {"X-Forwarded-For": "203.0.113.7"}),  # a tunnel
                                 ({"REMOTE_ADDR": "::1"}, {"Forwarded": "for=203.0.113.7"}),
                                 ({"REMOTE_ADDR": "10.0.0.5"}, {})):                       # a container's bridge
            resp = client.get(path, environ_base=environ, headers=headers)
            assert resp.status_code == 403, (path, environ, headers)
            assert "OPS_TOKEN" in resp.get_json()["error"] and "4111" not in resp.get_data(as_text=True)
    for path in OPERATOR_PATHS:
        assert client.get(path, environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 200, path
        assert client.get(path, environ_base={"REMOTE_ADDR": "::1"}).status_code == 200, path
    detail = client.get("/api/call-log/call_secret", environ_base={"REMOTE_ADDR": "127.0.0.1"}).get_json()
    assert detail["turns"] == [] and detail["call"]["to"] == "•••••••0123"


def test_operator_surfaces_refuse_other_sites_pages_in_this_machines_browser(env):
    """A loopback peer is not always the operator: any page open in this machine's browser can ask too. One from
    another site names its Origin (CORS_ORIGINS lets listed pages read API answers, with the browser's cached
    basic-auth password for the dashboard too); one that rebinds its own name to 127.0.0.1 (DNS rebinding) is
    same-origin to the browser, and names itself in Host."""
    client = _app_with_a_secret_call(env).test_client()
    local = {"REMOTE_ADDR": "127.0.0.1"}

    for path in OPERATOR_PATHS:
        for base_url, origin in (("http://localhost:3000", "http://localhost:8080"),   # a listed CORS origin
                                 ("http://127.0.0.1:3000", "https://kimiya-ai.vercel.app"),
                                 ("http://localhost:3000", "null"),                    # a sandboxed frame
                                 ("http://localhost:3000", "http://[::1"),             # no page's origin
                                 ("http://rebound.attacker.example:3000", None)):      # DNS rebinding
            resp = client.get(path, base_url=base_url, environ_base=local,
                              headers={"Origin": origin} if origin else {})
            assert resp.status_code == 403, (path, base_url, origin)
            assert "4111" not in resp.get_data(as_text=True)
        assert client.get(path, environ_base=local, headers={"Host": "[::1"}).status_code == 403, path
        for base_url in ("http://localhost:3000", "http://127.0.0.1:3000", "http://[::1]:3000",
                         "http://dev.localhost:3000"):
            assert client.get(path, base_url=base_url, environ_base=local).status_code == 200, (path, base_url)
        assert client.get(path, base_url="http://localhost:3000", environ_base=local,
                          headers={"Origin": "http://localhost:3000"}).status_code == 200, path  # its own page
    tokened = create_app({**env, "OPS_TOKEN": OPS}).test_client()
    authorized = {"Authorization": f"Bearer {OPS}"}
    other_site = {**authorized, "Origin": "https://kimiya-ai.vercel.app"}
    assert tokened.get("/api/call-log", headers=other_site).status_code == 403
    assert tokened.get("/api/call-log", base_url="https://cw.example", headers=authorized).status_code == 200
    assert tokened.get("/api/call-log", headers={**authorized, "Origin": PUBLIC}).status_code == 200  # behind a proxy


def test_operator_answers_are_never_cached_framed_or_given_scripts_from_elsewhere(env):
    """Transcripts and phone numbers must not stay in a browser's or proxy's cache, the pages must not be framed by
    another site, and only the app's own scripts may run in them (defence in depth behind textContent)."""
    client = create_app({**env, "OPS_TOKEN": OPS}).test_client()
    authorized = {"Authorization": f"Bearer {OPS}"}

    for path in OPERATOR_PATHS:
        resp = client.get(path, headers=authorized)
        assert resp.status_code in (200, 404), path  # 404: call_secret is not in this store
        assert resp.headers["Cache-Control"] == "no-store", path
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
        policy = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
    assert client.get("/api/call-log", headers={"Authorization": "Bearer wrong"}).headers["Cache-Control"] == "no-store"


def test_public_per_call_metrics_carry_no_call_sid_numbers_or_transcript(client, fake_twilio):
    data = _post_call(client, "+14155550123").get_json()
    body = client.get(f"/api/performance-metrics/{data['optimization']['trackingId']}").get_json()
    text = json.dumps(body)
    assert data["callSid"] not in text and "+1415555" not in text and PUBLIC not in text
    assert body["callData"]["callSid"] is None and "callSid" in body["reasons"]


# ---- 8 (part). workflow size ----------------------------------------------------------------------------

def test_oversized_workflows_get_a_clear_400(client, fake_twilio):
    body = make_call_body()
    body["nodes"] = [{"id": f"n{i}", "type": "conversationNode", "data": {"prompt": "p"}} for i in range(201)]
    resp = client.post("/api/make-call-optimized", json=body)
    assert resp.status_code == 400 and "nodes has 201 entries (at most 200)" in resp.get_json()["error"]
    body = make_call_body()
    body["nodes"][1]["data"]["prompt"] = "x" * 20_001
    resp = client.post("/api/make-call-optimized", json=body)
    assert resp.status_code == 400 and "20001 characters (at most 20000)" in resp.get_json()["error"]
    body = make_call_body(globalPrompt="y" * 20_001)
    assert client.post("/api/make-call-optimized", json=body).status_code == 400
    assert fake_twilio.creates() == []


def test_oversized_chat_requests_get_a_clear_400(client, fake_llm):
    too_many = [{"role": "user", "content": "hi"}] * 201
    resp = client.post("/api/chat", json={"messages": too_many})
    assert resp.status_code == 400 and "at most 200" in resp.get_json()["error"]
    resp = client.post("/api/chat", json={"messages": [{"role": "user", "content": "x" * 20_001}]})
    assert resp.status_code == 400 and "at most 20000" in resp.get_json()["error"]
    resp = client.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                          "globalPrompt": "g" * 20_001})
    assert resp.status_code == 400 and "globalPrompt" in resp.get_json()["error"]
    resp = client.post("/api/test-optimization", json={"message": "m" * 20_001})
    assert resp.status_code == 400 and "at most 20000" in resp.get_json()["error"]
    assert fake_llm.requests == []


def test_a_chat_request_spends_at_most_chat_max_chars_of_input(env, fake_llm):
    """/api/chat is open (the web app's playground) and bills the server's LLM account per input token. Each message
    was capped, not their sum: 200 messages of 20,000 characters, or as many as fit in MAX_BODY_BYTES (~1 MB,
    ~250k tokens: up to the model's whole context), went to the LLM in one request, 60 a minute per client. The
    client's messages and globalPrompt together now stay within CHAT_MAX_CHARS (found by the outbound audit)."""
    from callweaver import create_app

    client = create_app(env).test_client()
    words = "word " * 3_999
    many = [{"role": "user", "content": words}] * 5  # 5 x 19,995 = 99,975 characters, each message within its cap
    resp = client.post("/api/chat", json={"messages": many})
    assert resp.status_code == 400 and "CHAT_MAX_CHARS" in resp.get_json()["error"]
    resp = client.post("/api/chat", json={"messages": many[:4], "globalPrompt": "g" * 20_000})  # 79,980 + 20,000
    assert resp.status_code == 400 and resp.get_json()["success"] is False
    assert fake_llm.requests == []
    assert client.post("/api/chat", json={"messages": many[:4]}).status_code == 200  # 79,980: within the default
    small = create_app({**env, "CHAT_MAX_CHARS": "1000"}).test_client()
    resp = small.post("/api/chat", json={"messages": [{"role": "user", "content": "x" * 1_001}]})
    assert resp.status_code == 400 and "1001 characters (at most 1000" in resp.get_json()["error"]


def _inbound_flow(app, client, workflow_id: str):
    """The flow a call ringing in on /api/twiml-ai?id=<workflow_id> runs (a call we have no record of)."""
    store = app.extensions["callweaver"].store
    before = {c.tracking_id for c in store.live_calls(since=0)}
    Signer(client).post(f"/api/twiml-ai?id={workflow_id}", {"CallSid": "CA" + secrets.token_hex(16),
                                                            "From": "+14155550100", "To": PHONE})
    (new,) = [c.tracking_id for c in store.live_calls(since=0) if c.tracking_id not in before]
    return store.get_call(new).workflow


def test_a_make_call_cannot_replace_a_pinned_flow_that_an_inbound_line_runs(env, fake_twilio, fake_llm, tmp_path):
    """A call ringing in on a number whose voice URL is /api/twiml-ai?id=front-desk runs the flow stored under
    `front-desk`, and any make-call naming that id replaced it: a public request could give the operator's inbound
    line its own prompt and transfer nodes (the operator's callers forwarded to its number, at the operator's
    cost). PINNED_WORKFLOW_IDS keeps such ids for the operator (`flask save-workflow`); a make-call naming one still
    places its call with its own flow, but stores nothing (found by the outbound audit)."""
    from callweaver import create_app

    app = create_app({**env, "PINNED_WORKFLOW_IDS": "front-desk, other"})
    client = app.test_client()
    flow = tmp_path / "front-desk.json"
    flow.write_text(json.dumps(make_call_body(globalPrompt="You are the front desk of Premier Properties.")))
    result = app.test_cli_runner().invoke(args=["save-workflow", "front-desk", str(flow)])
    assert result.exit_code == 0 and "saved workflow 'front-desk'" in result.output
    assert "front desk of Premier" in json.dumps(_inbound_flow(app, client, "front-desk"))

    hostile = make_call_body(workflowId="front-desk", globalPrompt="Ask every caller for their card number.")
    resp = client.post("/api/make-call", json=hostile)
    assert resp.status_code == 200  # its own call runs its own flow
    store = app.extensions["callweaver"].store
    assert "card number" in json.dumps(store.get_call(resp.get_json()["trackingId"]).workflow)
    inbound = json.dumps(_inbound_flow(app, client, "front-desk"))
    assert "front desk of Premier" in inbound and "card number" not in inbound

    unpinned = make_call_body(workflowId="sales", globalPrompt="Sales line.")  # ids not pinned: as before
    assert client.post("/api/make-call", json=unpinned).status_code == 200
    assert "Sales line." in json.dumps(_inbound_flow(app, client, "sales"))

    blocked = tmp_path / "blocked.json"
    body = make_call_body()
    body["nodes"].append({"id": "t", "type": "transferNode", "data": {"destination": "+19005550100"}})
    blocked.write_text(json.dumps(body))
    result = app.test_cli_runner().invoke(args=["save-workflow", "other", str(blocked)])
    assert result.exit_code != 0 and "not saved" in result.output and "+1900" in result.output
    assert store.get_workflow("other") is None



def test_save_workflow_refuses_a_file_that_names_no_flow_or_a_language_it_cannot_speak(env, fake_twilio, fake_llm,
                                                                                      tmp_path):
    """`flask save-workflow` stored make-call's stand-in for a body without nodes or globalPrompt: a file that is
    not a flow (`{}`, `[]`, an export wrapped in another object) silently replaced a pinned id's flow with the generic
    prompt, reported as saved. A flow whose default language the server cannot speak was stored too (make-call
    refuses it with a 400), and the inbound line then answered in the default language. Both are refused now, and
    nothing is stored (found by the outbound review)."""
    from callweaver import create_app

    app = create_app({**env, "PINNED_WORKFLOW_IDS": "front-desk"})
    store = app.extensions["callweaver"].store
    runner = app.test_cli_runner()
    wrapped = {"workflow": make_call_body(globalPrompt="You are the front desk.")}
    for name, content in (("empty", {}), ("list", []), ("wrapped", wrapped)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        result = runner.invoke(args=["save-workflow", "front-desk", str(path)])
        assert result.exit_code != 0 and "not saved" in result.output and "no flow" in result.output, name
    assert store.get_workflow("front-desk") is None

    body = make_call_body(globalPrompt="You are the front desk.")
    body["config"]["globalSettings"]["defaultLanguage"] = "tlh-XX"
    path = tmp_path / "klingon.json"
    path.write_text(json.dumps(body))
    result = runner.invoke(args=["save-workflow", "front-desk", str(path)])
    assert result.exit_code != 0 and "not saved" in result.output and "defaultLanguage" in result.output
    assert store.get_workflow("front-desk") is None

# ---- 9. hostile input and log lines ---------------------------------------------------------------------

def test_deeply_nested_json_gets_400_not_500(client):
    for depth in (10_000, 200):
        raw = '{"to": "+14155550123", "x": ' + "[" * depth + "]" * depth + "}"
        for path in ("/api/make-call-optimized", "/api/chat", "/api/end-call"):
            resp = client.post(path, data=raw, content_type="application/json")
            assert resp.status_code == 400 and "nests deeper" in resp.get_json()["error"], (path, depth)


def test_json_nesting_is_refused_just_past_the_limit_wherever_the_deepest_branch_is(client):
    from callweaver.routes.common import MAX_JSON_DEPTH

    for depth in (MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1):  # the body's own object is the first level
        deep = "[" * (depth - 1) + "]" * (depth - 1)
        for raw in ('{"x": ' + deep + "}", '{"a": [1, {"b": []}], "c": {}, "x": ' + deep + ', "z": [[], {}]}'):
            resp = client.post("/api/end-call", data=raw, content_type="application/json")
            refused = resp.status_code == 400 and "nests deeper" in resp.get_json()["error"]
            assert refused == (depth > MAX_JSON_DEPTH), (depth, raw[:60])


def test_secret_query_parameters_and_control_characters_never_reach_a_log_line(env, capsys):
    from callweaver.logging import escape_control_chars
    import structlog
    app = create_app({**env, "LOG_LEVEL": "INFO"})
    app.test_client().get("/ping?twilioAuthToken=hunter2secret&apiKey=k123456&id=7")
    structlog.get_logger().warning("webhook_url", url="https://x.test/a?twilioAuthToken=hunter2secret&b=1")
    out = capsys.readouterr().out
    assert "hunter2secret" not in out and "k123456" not in out and "twilioAuthToken=[REDACTED]" in out
    assert escape_control_chars('/x\n{"event": "forged"}') == '/x\\x0a{"event": "forged"}'
    create_app({**env, "LOG_LEVEL": "INFO", "LOG_FORMAT": "console"})
    structlog.get_logger().warning("path_seen", path='/x\n{"event": "forged"}')
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith('{"event": "forged"') for line in lines)
    create_app(env)  # back to JSON logs for the tests that follow


def test_public_metrics_windows_stop_at_a_day_and_operator_ones_do_not(client):
    """A public figure over a window longer than a day is read from the store's rows on every request (~0.3–0.5 s of
    a worker's CPU for 60 000 turns over 30 days): anyone could keep the workers busy with a GET. The web app asks
    for no window; the operator's dashboard keeps its 30 days."""
    for path in ("/api/performance-metrics", "/api/performance-comparison"):
        refused = client.get(f"{path}?window={2 * 86400}")
        assert refused.status_code == 400 and refused.get_json()["success"] is False, path
        assert "86400" in refused.get_json()["error"]
        assert client.get(f"{path}?window=86400").status_code == 200
        assert client.get(path).status_code == 200
    assert client.get(f"/api/dashboard-data?window={30 * 86400}").status_code == 200  # operator-only (open to this machine in dev)


def test_repeated_public_metrics_requests_read_the_store_for_their_whole_window_once(app, client, monkeypatch):
    """The longest public window, and /api/health-optimized (public, polled by the web app), are served from the
    worker's kept turns after the first read: only the last few seconds are read again. Found by review: a window of
    exactly a day measured from a `since` taken a moment earlier counted as longer than kept and read the whole day
    on every request; the health route built a fresh reader (a whole window read) per request."""
    store = app.extensions["callweaver"].store
    reads: list[float] = []
    real = store.recent_turns
    monkeypatch.setattr(store, "recent_turns", lambda since: (reads.append(time.time() - since), real(since))[1])
    for _ in range(4):
        assert client.get("/api/performance-comparison?window=86400").status_code == 200
        assert client.get("/api/performance-metrics?window=86400").status_code == 200
        assert client.get("/api/health-optimized").status_code == 200
    whole = [age for age in reads if age > 60]
    assert len(whole) == 1, reads  # the first request's read of its day; every later one reads seconds


def test_a_forged_webhook_cannot_write_its_own_fields_at_length_into_the_log(env, capsys):
    """Unsigned webhooks are not rate limited and each refusal is logged with the ids it named: a 400 KB CallSid
    (or trackingId) was copied whole into that warning, so every forged request wrote as much log as it sent."""
    client = create_app({**env, "LOG_LEVEL": "INFO"}).test_client()
    capsys.readouterr()
    resp = client.post("/api/call-status-optimized?trackingId=" + "t" * 3000,
                       data={"CallSid": "CA" + "9" * 400_000, "CallStatus": "completed"})
    assert resp.status_code == 403
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "twilio_signature_rejected" in line]
    assert len(line) < 1000
    assert '"call_sid": "CA999' in line and '"tracking_id": "ttt' in line  # still says what was named
    assert json.loads(line)["unsigned"] is True  # a field the secret-name redaction leaves readable


@pytest.mark.parametrize("value, scrubbed", [
    ("key sk-abcdefghijkl here", "key [REDACTED] here"),
    ("x " + "0123456789abcdef" * 2 + " y", "x [REDACTED] y"),
    ("/a?twilioAuthToken=zzz&b=1", "/a?twilioAuthToken=[REDACTED]&b=1"),
    ("API-KEY=foo", "[REDACTED]"),
    # the credential after an auth scheme, not just the scheme's name
    ("Authorization: Bearer opsTokenValue12345 sent", "[REDACTED]"),  # unquoted: the rest of the line
    ("Authorization: Negotiate opsTokenValue12345\nnext line", "[REDACTED]\nnext line"),  # any scheme
    ("Headers([('Authorization', 'Bearer opsTokenValue12345'), ('X', 'y')])",
     "Headers([('[REDACTED]'), ('X', 'y')])"),  # werkzeug's repr
    ("{'Authorization': ['Bearer opsTokenValue12345']}", "{'[REDACTED]']}"),  # a list of values
    ('{"Authorization": "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/x, Signature=abc"}', '{"[REDACTED]"}'),
    ("authorization=Basic QUMxMjM6c2VjcmV0", "[REDACTED]"),
    ("{'Authorization': 'Bearer opsTokenValue12345'}", "{'[REDACTED]'}"),
    ('{"authorization": "Bearer opsTokenValue12345", "x": 1}', '{"[REDACTED]", "x": 1}'),
    ("call_8f3a9c2b1d greeting 301.2", "call_8f3a9c2b1d greeting 301.2"),
])
def test_log_values_are_scrubbed_by_pattern_and_field_names_by_name(value, scrubbed):
    from callweaver.logging import redact_secrets

    line = redact_secrets(None, "info", {"event": value, "twilioAuthToken": "abc", "apiKey": "", "node": "n1"})

    assert line == {"event": scrubbed, "twilioAuthToken": "[REDACTED]", "apiKey": "", "node": "n1"}


def test_the_cheap_look_before_the_redaction_patterns_never_skips_a_value_they_would_change():
    """_scrub_text runs the secret-value patterns only on strings its first look flags (for ASCII text, the text
    lower-cased against plain words): on 4000 strings built from the patterns' own pieces, in every case, ASCII or
    not, it gives what running every pattern on every string gives."""
    import random

    from callweaver.logging import _SECRET_VALUE_PATTERNS, _scrub_text

    pieces = ["sk-", "SK-", "Sk-abcdefgh1234", "0123456789abcdef" * 2, "0123456789ABCDEF" * 2, "CA", "AC", "Token",
              "KEY", "api-key", "Api-Key:", "AUTHORIZATION", "authorization=", "Authorization: Bearer x", "?", "&",
              "=", ":", "trackingId", "call_17960_2c57", "secret", "PassWord", "signaTure", "Credential", " ", "x",
              "_", "-", "/", "\"", "\u017fecret", "\u212aey", "s\u0131gnature", "\u0130", "\u00e9", "\u2028"]
    rng = random.Random(12)
    for _ in range(4000):
        value = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
        expected = value
        for pattern, replacement, _needed in _SECRET_VALUE_PATTERNS:
            expected = pattern.sub(replacement, expected)
        assert _scrub_text(value) == expected, value


def test_a_webhook_form_is_signed_and_checked_as_the_sdk_checks_werkzeugs_form():
    """signature_is_valid hands the SDK the form as a SignedForm; on forms with repeated, empty and non-ASCII fields
    it accepts exactly the signatures the SDK's own check of werkzeug's form accepts."""
    from twilio.request_validator import RequestValidator
    from werkzeug.datastructures import ImmutableMultiDict

    from callweaver.security import signature_is_valid

    token, url = "f" * 32, "https://cw.test/api/call-status-optimized?trackingId=t1"
    forms = [ImmutableMultiDict([("CallSid", "CA" + "1" * 32), ("CallStatus", "ringing")]),
             ImmutableMultiDict([("B", "y"), ("A", "1"), ("B", "x"), ("B", "x"), ("C", ""), ("語", "值")]),
             ImmutableMultiDict()]
    for form in forms:
        signed = RequestValidator(token).compute_signature(url, form)
        for signature in (signed, signed[:-2] + "A=", RequestValidator(token).compute_signature(url, {})):
            assert signature_is_valid(token, url, form, signature) == RequestValidator(token).validate(
                url, form, signature), (form, signature)
        assert signature_is_valid(token, url, form, signed)


def _access_lines(logger_class, access_log_format: str, requests) -> list[str]:
    """The access lines a gunicorn logger of `logger_class` writes for (response, request, environ) triples."""
    import datetime
    import io
    import logging

    from gunicorn.config import Config

    cfg = Config()
    cfg.set("accesslog", "-")
    cfg.set("access_log_format", access_log_format)
    logger = logger_class(cfg)
    out = io.StringIO()
    logger.access_log.handlers[:] = [logging.StreamHandler(out)]
    for response, request, environ in requests:
        logger.access(response, request, environ, datetime.timedelta(seconds=1, microseconds=2345))
    return out.getvalue().splitlines()


def test_access_lines_build_only_the_atoms_the_format_reads_with_gunicorns_values():
    """The access logger builds only the atoms its format names; each line is the one gunicorn's own atoms give."""
    from types import SimpleNamespace

    from gunicorn import glogging

    from callweaver.logging import AccessLogger, _JsonSafeAtoms

    namespace: dict = {}
    exec(open("gunicorn.conf.py").read(), namespace)  # noqa: S102  (the repository's own configuration)

    class GunicornAtoms(glogging.Logger):
        atoms_wrapper_class = _JsonSafeAtoms

    call_sid = "CA" + "ab" * 16
    requests = [
        (SimpleNamespace(status="200 OK", sent=321, headers=[("Content-Type", "text/xml"), ("X-Request-Id", "req_1")]),
         SimpleNamespace(headers=[("HOST", "example.test"), ("X-REQUEST-ID", "incoming")]),
         {"REQUEST_METHOD": "POST", "RAW_URI": "/api/twiml-optimized?id=&trackingId=t1", "SERVER_PROTOCOL": "HTTP/1.1",
          "PATH_INFO": "/api/twiml-optimized", "QUERY_STRING": "id=&trackingId=t1", "REMOTE_ADDR": "10.0.0.1",
          "callweaver.tracking_id": "t1", "callweaver.call_sid": call_sid}),
        (SimpleNamespace(status=404, sent=None, headers=[("x-request-id", "a"), ("X-Request-Id", 'b"\\\n')]),
         [("USER-AGENT", "x")],
         {"REQUEST_METHOD": "GET", "RAW_URI": "/x", "SERVER_PROTOCOL": "HTTP/1.0", "PATH_INFO": '/p"\\\n\u2028é',
          "QUERY_STRING": "twilioAuthToken=hunter2secret&id=7", "CALLWEAVER.TRACKING_ID": "upper"}),
    ]
    configured = namespace["access_log_format"]
    assert _access_lines(AccessLogger, configured, requests) == _access_lines(GunicornAtoms, configured, requests)
    # a format naming atoms outside the cheap set (time, user agent, pid) gets gunicorn's own atoms
    other = '%(h)s %(l)s %(u)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(D)s %(p)s'
    assert _access_lines(AccessLogger, other, requests) == _access_lines(GunicornAtoms, other, requests)
    assert "hunter2secret" not in "".join(_access_lines(AccessLogger, configured, requests))


def test_a_log_value_found_clean_is_scrubbed_again_once_a_secret_it_holds_is_registered():
    from callweaver.logging import redact_secrets, register_secret

    sid = "CA" + "0123456789abcdef" * 2  # a Call SID: 32 hex after "CA" is no bare token
    text = "retry with zq7-remembered-secret-x9"
    first = [redact_secrets(None, "info", {"event": value})["event"] for value in (sid, text, sid, text)]
    register_secret("zq7-remembered-secret-x9")
    again = [redact_secrets(None, "info", {"event": value})["event"] for value in (sid, text, text)]
    leaky = "key sk-abcdefghijkl here"
    twice = [redact_secrets(None, "info", {"event": leaky})["event"] for _ in range(2)]

    assert first == [sid, text, sid, text]
    assert again == [sid, "retry with [REDACTED]", "retry with [REDACTED]"]
    assert twice == ["key [REDACTED] here"] * 2


def _hold_a_write_on_a_fresh_file(path: str, for_s: float) -> None:
    """Another worker inside its first write to a file still in rollback-journal mode, committing after for_s."""
    import sqlite3
    import threading

    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE other_worker (x)")
    threading.Timer(for_s, lambda: (other.execute("COMMIT"), other.close())).start()


def test_a_worker_opening_the_limit_file_while_another_writes_it_waits_instead_of_failing(tmp_path):
    """Two workers' first make-calls in a burst open the fresh window file at once: switching it to WAL met the
    other's lock and raised 'database is locked' at once (the busy timeout does not cover that switch), a 500."""
    from callweaver.rate_limits import SQLITE_SCHEME, SQLiteLimitStorage

    path = str(tmp_path / "cw-ratelimits.sqlite3")
    _hold_a_write_on_a_fresh_file(path, 0.3)
    assert SQLiteLimitStorage(f"{SQLITE_SCHEME}://{path}").acquire_entry("k", 30, 60) is True


class _Clock:
    """time.time() for the limit storage, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_the_sqlite_moving_window_agrees_with_counting_every_hit(tmp_path, monkeypatch):
    """The window is checked from hit numbers, not by counting rows: it must refuse and report exactly what
    counting the hits of the last `expiry` seconds would, for several keys, limits and costs."""
    import random

    from callweaver import rate_limits

    clock = _Clock(1_000_000.0)
    monkeypatch.setattr(rate_limits, "time", clock)
    storage = rate_limits.SQLiteLimitStorage(f"{rate_limits.SQLITE_SCHEME}://{tmp_path / 'w-ratelimits.sqlite3'}")
    windows = {"a": (3, 10), "b": (5, 60), "c": (1, 5)}  # key: (limit, expiry s)
    taken: dict[str, list[float]] = {key: [] for key in windows}
    rng = random.Random(12)
    for _ in range(600):
        clock.now += rng.choice((0.0, 0.2, 1.0, 3.0, 7.0))
        key = rng.choice(list(windows))
        limit, expiry = windows[key]
        amount = rng.choice((1, 1, 1, 2))
        inside = [at for at in taken[key] if at > clock.now - expiry]
        expected = len(inside) + amount <= limit
        assert storage.acquire_entry(key, limit, expiry, amount) is expected
        if expected:
            taken[key] += [clock.now] * amount
            inside += [clock.now] * amount
        assert storage.get_moving_window(key, limit, expiry) == ((min(inside), len(inside)) if inside
                                                                 else (clock.now, 0))


def test_a_limit_file_from_before_numbered_hits_keeps_its_live_windows(tmp_path):
    """Today's calls-per-day count survives the upgrade: the old table's unexpired hits are adopted."""
    import sqlite3
    import time

    from callweaver.rate_limits import SQLITE_SCHEME, SQLiteLimitStorage

    path = tmp_path / "old-ratelimits.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE hits (key TEXT NOT NULL, at REAL NOT NULL, expires_at REAL NOT NULL)")
    now = time.time()
    old.executemany("INSERT INTO hits VALUES (?, ?, ?)", [("day", now - 50, now + 1000), ("day", now - 40, now + 1000),
                                                         ("day", now - 5000, now - 1)])
    old.commit()
    old.close()
    storage = SQLiteLimitStorage(f"{SQLITE_SCHEME}://{path}")
    assert storage.get_moving_window("day", 3, 86400)[1] == 2
    assert storage.acquire_entry("day", 3, 86400) is True
    assert storage.acquire_entry("day", 3, 86400) is False


def test_a_window_read_while_another_worker_sweeps_it_is_one_snapshot(tmp_path, monkeypatch):
    """The window was read in two statements: another worker's sweep between them left no newest hit, and the
    refusal's Retry-After raised a TypeError (a 500) instead (review of issue 12s)."""
    from callweaver import rate_limits

    clock = _Clock(1_000_000.0)
    monkeypatch.setattr(rate_limits, "time", clock)
    uri = f"{rate_limits.SQLITE_SCHEME}://{tmp_path / 'w-ratelimits.sqlite3'}"
    writer, reader, sweeper = (rate_limits.SQLiteLimitStorage(uri) for _ in range(3))  # three workers
    for _ in range(5):
        assert writer.acquire_entry("k", 5, 60)
    clock.now += 59.9  # the hits are still in the window when the read starts…
    swept = []

    def sweep_while_reading(sql: str) -> None:
        if "MAX(seq)" in sql and not swept:  # …and another worker sweeps them out while it reads
            clock.now += 0.2
            swept.append(sweeper.acquire_entry("other", 5, 60))

    reader._connection().set_trace_callback(sweep_while_reading)
    at, count = reader.get_moving_window("k", 5, 60)
    assert swept == [True] and count in (0, 5)


@pytest.mark.parametrize("text", [
    "CA11491ec7a71171e6093d09b488b45e22", "0123456789abcdef0123456789abcdef", "call_1796060057001_4f352013",
    "https://x.test/hook?a=1&twilioAuthToken=abc123&b=2", "api_key=sk-abcdefghijkl", "Authorization: Bearer x",
    "key=value", "plain words", "sk-abcdefgh12345 and token=zzz", "?signature=abc", "=",
])
def test_each_secret_pattern_is_skipped_only_when_it_cannot_match(text):
    from callweaver.logging import _SECRET_VALUE_PATTERNS, _scrub_text
    unconditional = text
    for pattern, replacement, _needed in _SECRET_VALUE_PATTERNS:
        unconditional = pattern.sub(replacement, unconditional)
    assert _scrub_text(text) == unconditional
