"""REDIS_URL as a managed Redis gives it from outside its network: `rediss://` (TLS) with a password. Every user of
Redis (the call store, the rate limits, the reply cache) connects through it, and the password never shows in a
log line, /health, or an error, whether it is right or wrong."""
from __future__ import annotations

import pytest
import redis
import structlog.testing

from callweaver import create_app
from tests.conftest import base_env
from tests.fakes.redis_server import RedisServer, _free_port
from tests.fakes.tls import localhost_tls
from tests.helpers import make_call_body

PASSWORD = "Pa55-word-of-the-key-value-store"


@pytest.fixture
def tls_redis(tmp_path, monkeypatch):
    """A redis-server with a password, on a TLS port presenting a self-signed `localhost` certificate that the
    clients trust through SSL_CERT_FILE (as they trust a real CA in production)."""
    cert_file, _context = localhost_tls(tmp_path)
    tls_port = _free_port()
    server = RedisServer(extra_args=("--tls-port", str(tls_port), "--tls-cert-file", str(cert_file),
                                     "--tls-key-file", str(tmp_path / "localhost-key.pem"),
                                     "--tls-ca-cert-file", str(cert_file), "--tls-auth-clients", "no",
                                     "--requirepass", PASSWORD)).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    yield server, tls_port
    server.close()


def secret_free(text: str, secret: str) -> None:
    assert secret not in text, f"{secret!r} leaked: {text[:500]}"


def tls_client(tmp_path, fake_twilio, tls_port: int, password: str):
    """An app whose store, rate limits and cache reach the TLS redis-server with `password`."""
    env = {**base_env(tmp_path, fake_twilio), "REDIS_URL": f"rediss://:{password}@localhost:{tls_port}/0",
           "LOG_LEVEL": "INFO"}
    return create_app(env).test_client()


def test_a_rediss_url_with_a_password_serves_the_store_the_rate_limits_and_the_cache(tls_redis, tmp_path,
                                                                                      fake_twilio, capsys):
    server, tls_port = tls_redis
    client = tls_client(tmp_path, fake_twilio, tls_port, PASSWORD)
    with structlog.testing.capture_logs() as logs:
        placed = client.post("/api/make-call-optimized", json=make_call_body())
        health = client.get("/health")
        cache = client.get("/api/health-optimized")
    assert placed.status_code == 200, placed.get_data(as_text=True)
    assert health.get_json()["checks"]["store"]["ok"] is True
    assert cache.get_json()["services"]["cache"]["ok"] is True
    plain = redis.Redis(port=server.port, password=PASSWORD, decode_responses=True)
    keys = plain.keys("*")
    plain.close()
    assert any(key.startswith("cw:call:") for key in keys) and any("calls-per-day" in key for key in keys)
    output = capsys.readouterr()
    for text in (placed.get_data(as_text=True), health.get_data(as_text=True), cache.get_data(as_text=True),
                 repr(logs), output.out, output.err):
        secret_free(text, PASSWORD)


def test_a_wrong_password_is_a_503_that_names_no_password(tls_redis, tmp_path, fake_twilio, capsys):
    _server, tls_port = tls_redis
    wrong = "Wrong-pa55word-typed-in-the-dashboard"
    client = tls_client(tmp_path, fake_twilio, tls_port, wrong)
    with structlog.testing.capture_logs() as logs:
        placed = client.post("/api/make-call-optimized", json=make_call_body())
        health = client.get("/health")
    assert placed.status_code == 503 and health.status_code == 503
    assert [line["event"] for line in logs if line.get("log_level") == "error"] == ["state_unavailable",
                                                                                   "store_check_failed"]
    output = capsys.readouterr()
    for text in (placed.get_data(as_text=True), health.get_data(as_text=True), repr(logs), output.out, output.err):
        secret_free(text, wrong)
        secret_free(text, PASSWORD)
