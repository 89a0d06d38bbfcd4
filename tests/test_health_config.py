"""Health from real checks, configuration validation, and secrets kept out of logs and responses."""
from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from callweaver import create_app
from callweaver.config import ConfigError, Settings
from tests.conftest import AUTH_TOKEN, base_env


def test_health_keeps_the_original_fields_and_reports_checks(client):
    resp = client.get("/health")
    body = resp.get_json()
    assert resp.status_code == 200 and body["status"] == "healthy", body
    assert body["service"] == "Call Flow Weaver Backend" and isinstance(body["uptime"], float)
    env = body["environment"]
    assert env["hasTwilioSid"] and env["hasTwilioToken"] and env["hasTwilioPhone"] and env["hasTwilioConfig"]
    assert body["memory"]["used"].endswith(" MB")
    assert body["checks"]["store"]["ok"] is True and body["checks"]["store"]["pingMs"] >= 0
    assert [p["name"] for p in body["checks"]["llm"]["providers"]] == ["azure", "openai"]
    assert AUTH_TOKEN not in json.dumps(body)


def test_health_is_degraded_without_twilio_and_names_the_variables(tmp_path, fake_twilio):
    env = {**base_env(tmp_path, fake_twilio), "TWILIO_ACCOUNT_SID": "", "TWILIO_AUTH_TOKEN": "",
           "TWILIO_PHONE_NUMBER": ""}
    body = create_app(env).test_client().get("/health").get_json()
    assert body["status"] == "degraded"
    assert any("TWILIO_ACCOUNT_SID" in w for w in body["warnings"])
    assert any("No LLM provider" in w for w in body["warnings"])


def test_health_is_unhealthy_when_the_store_is_unreachable(tmp_path, fake_twilio):
    env = {**base_env(tmp_path, fake_twilio), "REDIS_URL": "redis://127.0.0.1:1/0"}
    resp = create_app(env).test_client().get("/health")
    assert resp.status_code == 503 and resp.get_json()["status"] == "unhealthy"


def test_health_optimized_shows_circuit_state_after_failures(client, fake_llm, fake_llm2):
    fake_llm.fault = "500"
    for _ in range(3):
        assert client.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    body = client.get("/api/health-optimized").get_json()
    states = {p["name"]: p["state"] for p in body["services"]["providers"]}
    assert states == {"azure": "open", "openai": "closed"}
    assert body["optimization"]["features"]["providerFailover"] == "degraded"
    assert body["status"] == "degraded"
    assert len(fake_llm.requests) == 3  # the open circuit is skipped: no 4th request to the failing provider


def test_ping_and_root(client):
    ping = client.get("/ping").get_json()
    assert ping["pong"] is True and isinstance(ping["timestamp"], int)
    root = client.get("/").get_json()
    assert root["version"] and "POST /api/make-call-optimized" in root["endpoints"]
    assert root["optimization"]["expectedLatency"] is None  # never a canned figure


def test_test_workflow_reports_flags_but_no_secrets(client):
    wd = json.dumps({"id": "w1", "ns": [{"id": "s", "type": "startNode", "data": {"firstMessage": "hi"}}],
                     "es": [], "gp": "be nice"})
    body = client.get("/api/test-workflow", query_string={"wd": wd}).get_json()
    assert body["success"] and body["workflow"]["nodeCount"] == 1 and body["workflow"]["hasGlobalPrompt"]
    assert body["azure"]["hardcodedApiKey"] is False
    assert "azure-test-key" not in json.dumps(body) and AUTH_TOKEN not in json.dumps(body)


@pytest.mark.parametrize("env,needle", [
    ({"TWILIO_ACCOUNT_SID": "not-a-sid"}, "TWILIO_ACCOUNT_SID"),
    ({"PORT": "eighty"}, "PORT"),
    ({"LLM_PROVIDERS": "azure,bard"}, "LLM_PROVIDERS"),
    ({"PUBLIC_BASE_URL": "ftp://x"}, "PUBLIC_BASE_URL"),
    ({"ALLOW_REQUEST_CREDENTIALS": "1"}, "SECRET_KEY"),
    ({"TWILIO_VALIDATE_SIGNATURES": "maybe"}, "TWILIO_VALIDATE_SIGNATURES"),
    # not numbers: NaN passed every lower bound (all its comparisons are false)
    ({"BODY_READ_TIMEOUT_S": "nan"}, "BODY_READ_TIMEOUT_S"),
    ({"LLM_FIRST_TOKEN_TIMEOUT_S": "-inf"}, "LLM_FIRST_TOKEN_TIMEOUT_S"),
    ({"RELAY_SETUP_TIMEOUT_S": "inf"}, "RELAY_SETUP_TIMEOUT_S"),
    ({"MAX_CALL_DURATION_S": "20000"}, "MAX_CALL_DURATION_S"),  # above Twilio's 4 hours
    ({"MAX_CALL_DURATION_S": "10"}, "MAX_CALL_DURATION_S"),
    ({"METRICS_WINDOW_S": "90000"}, "METRICS_WINDOW_S"),  # longer than a worker keeps: a store read per request
])
def test_bad_configuration_names_the_variable(env, needle):
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert needle in str(err.value)


def test_webhook_base_url_is_an_alias_and_signature_opt_out_warns():
    s = Settings.from_env({"WEBHOOK_BASE_URL": "https://example.test/", "TWILIO_VALIDATE_SIGNATURES": "0"})
    assert s.public_base_url == "https://example.test"
    assert any("NOT checked" in w for w in s.warnings)


def test_logs_are_json_with_secrets_redacted(capsys, env):
    client = create_app({**env, "LOG_LEVEL": "INFO"}).test_client()
    client.post("/api/make-call-optimized", json={"to": "+15551234567", "twilioAuthToken": AUTH_TOKEN,
                                                  "globalPrompt": "hi"})
    log = structlog.get_logger()
    log.info("probe", auth_token=AUTH_TOKEN, note=f"token is {AUTH_TOKEN}", api_key="azure-test-key-123",
             headers={"Authorization": "Basic abc"})
    out = capsys.readouterr().out
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    assert any(l.get("event") == "http_request" and l.get("path") == "/api/make-call-optimized" for l in lines)
    assert any(l.get("event") == "call_placed" and l.get("tracking_id") for l in lines)
    assert AUTH_TOKEN not in out and "azure-test-key-123" not in out and "Basic abc" not in out


def test_logs_never_carry_the_password_of_a_url_setting(capsys, env):
    """A password inside REDIS_URL, CALL_REPORT_URL and the like is a configured secret too: scrubbed from any log
    line that happens to hold it (it was not registered, and 'pw-…' matches no secret-looking pattern)."""
    settings = Settings.from_env({**env, "CALL_REPORT_URL": "https://hook:pw-Report2041@example.test/calls",
                                  "CALL_REPORT_SECRET": "s" * 16, "OPENAI_BASE_URL": "https://u:pw-Gateway77@gw.test/v1"})
    assert {"pw-Report2041", "pw-Gateway77"} <= set(settings.secrets)
    create_app({**env, "CALL_REPORT_URL": "https://hook:pw-Report2041@example.test/calls",
                "CALL_REPORT_SECRET": "s" * 16, "OPENAI_BASE_URL": "https://u:pw-Gateway77@gw.test/v1",
                "LOG_LEVEL": "INFO"})
    structlog.get_logger().warning("probe", note="posting to https://hook:pw-Report2041@example.test/calls",
                                   upstream="https://u:pw-Gateway77@gw.test/v1")
    out = capsys.readouterr().out
    assert "probe" in out and "pw-Report2041" not in out and "pw-Gateway77" not in out
