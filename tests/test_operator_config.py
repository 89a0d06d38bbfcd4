"""What an operator meets first: a bad setting stops the service at start with the variable named, no traceback and
no secret in the message; gunicorn.conf.py's own variables likewise; /health says what is misconfigured."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from callweaver import create_app
from callweaver.boot import WORKER_BOOT_ERROR, AppLoader
from callweaver.config import ConfigError, Settings
from tests.conftest import base_env
from tests.fakes.live_server import REPO, free_port

SECRET = "pw-Hunter2Secret"


@pytest.mark.parametrize("name,value", [
    ("REDIS_URL", f"redis//:{SECRET}@cache.internal:6379"),        # missing ':' after the scheme
    ("CACHE_REDIS_URL", f"http://:{SECRET}@cache.internal:6379"),  # wrong scheme
    ("OPENAI_BASE_URL", f"htps://u:{SECRET}@gw.example/v1"),
    ("AZURE_OPENAI_ENDPOINT", f"https://u:{SECRET}@x.openai.azure.com:99999/"),  # port out of range
    ("CALL_REPORT_URL", f"hooks.example/{SECRET}"),
    ("PUBLIC_BASE_URL", f"https://u:{SECRET}@"),
])
def test_a_bad_url_setting_is_named_without_its_password(name, value):
    env = {name: value, "CALL_REPORT_SECRET": "s" * 16}
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert name in str(err.value)
    assert SECRET not in str(err.value)


def test_a_url_setting_with_an_impossible_port_is_refused_at_start():
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:99999/v1"})
    assert "OPENAI_BASE_URL" in str(err.value) and "port" in str(err.value)


@pytest.mark.parametrize("value", ["70000", "0", "-1"])
def test_port_must_be_a_tcp_port(value):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"PORT": value})
    assert "PORT" in str(err.value)


@pytest.mark.parametrize("value", ["Production", "PRODUCTION", " production "])
def test_node_env_production_in_any_case_turns_on_the_production_rules(value):
    """NODE_ENV=Production used to count as development: no public URL required, operator pages open."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"NODE_ENV": value})
    assert "PUBLIC_BASE_URL is required in production" in str(err.value)
    settings = Settings.from_env({"NODE_ENV": value, "PUBLIC_BASE_URL": "https://cw.example"})
    assert settings.production and settings.node_env == "production"


@pytest.mark.parametrize("value", ["staging", "dev", "qa", "local"])
def test_a_node_env_a_node_deploy_carried_starts_read_as_node_read_it_with_a_warning(value):
    """The Node backend's environment is carried over on Render: NODE_ENV=staging stopped every worker after Render's
    health check had passed (the loader answers /health while loading), so the new deploy went live and crash-looped.
    Node reads any value but production as not production; so does CallWeaver, and says so."""
    s = Settings.from_env({"NODE_ENV": value})
    assert not s.production
    assert any("NODE_ENV" in w and "development" in w for w in s.warnings), s.warnings
    on_render = Settings.from_env({"NODE_ENV": value, "RENDER": "true",
                                   "RENDER_EXTERNAL_URL": "https://cw.onrender.com"})
    assert on_render.production


@pytest.mark.parametrize("value", ["", "test", "development", "Production"])
def test_the_known_node_envs_start_without_a_warning(value):
    s = Settings.from_env({"NODE_ENV": value, "PUBLIC_BASE_URL": "https://cw.example", "OPS_TOKEN": "o" * 16})
    assert not any("NODE_ENV" in w for w in s.warnings), s.warnings


def test_node_env_prod_is_production_with_a_warning():
    """`prod` is what an operator writes for production: reading it as development would drop the production rules."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"NODE_ENV": "prod"})
    assert "PUBLIC_BASE_URL is required in production" in str(err.value)
    s = Settings.from_env({"NODE_ENV": "PROD", "PUBLIC_BASE_URL": "https://cw.example"})
    assert s.production and s.node_env == "production"
    assert any("NODE_ENV" in w for w in s.warnings)


@pytest.mark.parametrize("value", ["kimiya-ai.vercel.app", "https://app.example.com/dashboard", "ftp://app.example",
                                   "https://", "https://app.example.com,app2.example.com"])
def test_a_cors_origin_that_is_no_origin_is_refused_at_start(value):
    """An origin without its scheme (or with a path) never matches a browser's Origin: every request from the web
    app would be refused later (403) with nothing said at start."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"CORS_ORIGINS": value})
    assert "CORS_ORIGINS" in str(err.value)


def test_cors_origins_with_ports_and_the_wildcard_still_read():
    s = Settings.from_env({"CORS_ORIGINS": "http://localhost:8080, https://App.Example.com/"})
    assert s.cors_origins == ("http://localhost:8080", "https://App.Example.com")
    assert Settings.from_env({"CORS_ORIGINS": "*"}).cors_origins == ("*",)


@pytest.mark.parametrize("value", ["abc", "0123456789abcdef0123456789abcdeg", "f" * 31, "f" * 33,
                                   '"' + "f" * 32 + '"'])
def test_a_malformed_twilio_auth_token_is_refused_and_not_printed(value):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"TWILIO_AUTH_TOKEN": value})
    assert "TWILIO_AUTH_TOKEN" in str(err.value)
    assert value not in str(err.value)


@pytest.mark.parametrize("value", ["(415) 555-1212", "415-555-1212", "+1 415 555 1212", "14155551212",
                                   "+1.415.555.1212"])
def test_the_twilio_phone_number_is_read_as_the_original_read_a_number(value):
    """Twilio takes a US number formatted for people as From, so a Node deploy with TWILIO_PHONE_NUMBER=(415) 555-1212
    placed calls; it was refused at start. It is normalised as a request's number is (and so `from` round-trips)."""
    assert Settings.from_env({"TWILIO_PHONE_NUMBER": value}).twilio_phone_number == "+14155551212"


@pytest.mark.parametrize("value", ["call me", "+0155512",
                                   "+1\uff14\uff11\uff15\uff15\uff15\uff15\uff11\uff12\uff11\uff12"])  # full-width
def test_a_twilio_phone_number_that_is_no_number_is_refused(value):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"TWILIO_PHONE_NUMBER": value})
    assert "TWILIO_PHONE_NUMBER" in str(err.value)


def test_a_malformed_account_sid_is_named_with_what_was_wrong():
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"TWILIO_ACCOUNT_SID": "SK" + "0" * 32})
    assert "TWILIO_ACCOUNT_SID" in str(err.value)


def test_a_worker_with_a_bad_setting_logs_one_error_naming_it_and_no_traceback(monkeypatch, caplog):
    """gunicorn's error log got the ConfigError with a full traceback from the worker's loader."""
    ended_with: list[BaseException] = []
    import threading
    monkeypatch.setattr(threading, "excepthook", lambda args: ended_with.append(args.exc_value))

    def build():
        return Settings.from_env({"CALL_TIMEOUT_S": "abc", "OPS_TOKEN": "short"})

    with caplog.at_level(logging.INFO, logger="gunicorn.error"):
        loader = AppLoader(modules=(), build=build)
        assert loader.wait(10) is False
        loader._task.join(10)
    records = [r for r in caplog.records if r.name == "gunicorn.error"]
    assert records, "the failure is reported"
    assert all(r.exc_info is None for r in records), "no traceback for a configuration error"
    text = "\n".join(r.getMessage() for r in records)
    assert "CALL_TIMEOUT_S" in text and "OPS_TOKEN" in text
    assert len(ended_with) == 1 and getattr(ended_with[0], "code", None) == WORKER_BOOT_ERROR


def run_gunicorn_conf(env: dict[str, str]) -> subprocess.CompletedProcess:
    """gunicorn.conf.py as gunicorn's master reads it (a module executed once)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PORT", "WEB_CONCURRENCY", "WORKER_CONNECTIONS", "GUNICORN_TIMEOUT",
                          "GUNICORN_GRACEFUL_TIMEOUT", "LOG_LEVEL")}
    return subprocess.run([sys.executable, "-c", "import runpy; runpy.run_path('gunicorn.conf.py')"],
                          cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("name,value", [
    ("PORT", "70000"), ("PORT", "0"), ("PORT", "eighty"),
    ("WEB_CONCURRENCY", "0"),            # gunicorn ran a master with no worker: listening, never answering
    ("WORKER_CONNECTIONS", "abc"), ("WORKER_CONNECTIONS", "0"),
    ("GUNICORN_TIMEOUT", "1.5"), ("GUNICORN_GRACEFUL_TIMEOUT", "soon"), ("GUNICORN_GRACEFUL_TIMEOUT", "-1"),
])
def test_gunicorn_conf_names_a_bad_variable_without_a_traceback(name, value):
    done = run_gunicorn_conf({name: value})
    assert done.returncode != 0
    assert name in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_gunicorn_conf_reads_the_documented_variables():
    done = run_gunicorn_conf({})
    assert done.returncode == 0, done.stderr
    probe = ("import runpy; c = runpy.run_path('gunicorn.conf.py'); "
             "print(c['bind'], c['workers'], c['worker_connections'], c['timeout'], c['graceful_timeout'], "
             "c['loglevel'])")
    env = {"PORT": "4123", "WEB_CONCURRENCY": "3", "WORKER_CONNECTIONS": "50", "GUNICORN_TIMEOUT": "0",
           "GUNICORN_GRACEFUL_TIMEOUT": "10", "LOG_LEVEL": "warning"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.split() == ["0.0.0.0:4123", "3", "50", "0", "10", "warning"], out.stderr


@pytest.mark.parametrize("value,level", [("warn", "WARNING"), ("WARN", "WARNING"), ("fatal", "ERROR"),
                                         ("critical", "ERROR"), ("trace", "DEBUG")])
def test_node_loggers_level_names_are_read(value, level):
    """LOG_LEVEL=warn (pino's and winston's name) carried over from the Node deploy was refused at start."""
    assert Settings.from_env({"LOG_LEVEL": value}).log_level == level
    probe = "import runpy; print(runpy.run_path('gunicorn.conf.py')['loglevel'])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**os.environ, "LOG_LEVEL": value},
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == level.lower(), out.stderr


def test_an_unknown_log_level_is_read_as_info_with_a_warning():
    """A log level no logger here knows (winston's verbose, silly) would not misbehave: it is not worth a service that
    does not start."""
    s = Settings.from_env({"LOG_LEVEL": "verbose"})
    assert s.log_level == "INFO" and any("LOG_LEVEL" in w for w in s.warnings)
    assert run_gunicorn_conf({"LOG_LEVEL": "verbose"}).returncode == 0


@pytest.mark.parametrize("value", ["combined", "dev", "tiny"])
def test_a_node_log_format_is_read_as_json_with_a_warning(value):
    """LOG_FORMAT=combined (morgan's format names) carried over from the Node deploy was refused at start."""
    s = Settings.from_env({"LOG_FORMAT": value})
    assert s.log_format == "json" and any("LOG_FORMAT" in w for w in s.warnings)
    assert Settings.from_env({"LOG_FORMAT": "Console"}).log_format == "console"


def test_the_service_started_with_a_bad_setting_stops_naming_it_without_a_traceback(tmp_path):
    """README: "A bad value stops the service at start with every bad variable named"; the operator's first view."""
    env = {**os.environ, "PORT": str(free_port()), "WEB_CONCURRENCY": "1", "CALLWEAVER_DB": str(tmp_path / "db"),
           "CACHE_DIR": str(tmp_path / "cache"), "CALL_TIMEOUT_S": "abc",
           "REDIS_URL": f"redis//:{SECRET}@cache.internal:6379"}
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "CALL_TIMEOUT_S" in out and "REDIS_URL" in out and "Traceback" not in out, out
    assert SECRET not in out


def test_health_tells_the_operator_about_settings_that_weaken_the_service(tmp_path, fake_twilio):
    """The start-up warnings (no public URL, an unknown NODE_ENV) were only in the start-up log."""
    env = {**base_env(tmp_path, fake_twilio), "NODE_ENV": "staging", "PUBLIC_BASE_URL": ""}
    body = create_app(env).test_client().get("/health").get_json()
    text = " ".join(body.get("warnings", []))
    assert "NODE_ENV" in text and "PUBLIC_BASE_URL" in text


@pytest.mark.parametrize("setting,said", [
    ({"TWILIO_VALIDATE_SIGNATURES": "0"}, "TWILIO_VALIDATE_SIGNATURES"),
    ({"OPS_TOKEN": ""}, "answer only this machine"),
])
def test_health_does_not_tell_anyone_which_door_is_open(tmp_path, fake_twilio, capsys, setting, said):
    """/health answers anyone (Render's check, the web app's wake-up): "webhook signatures are NOT checked" or "the
    dashboard and call log are open to anyone" there told a stranger on the tunnel's public URL what to forge or
    read. The operator reads them in the start-up log."""
    env = {**base_env(tmp_path, fake_twilio), **setting}
    capsys.readouterr()
    app = create_app(env)
    logged = [line for line in capsys.readouterr().out.splitlines() if "config_warning" in line]
    assert any(said in line for line in logged), logged
    body = app.test_client().get("/health").get_json()
    assert said not in " ".join(body.get("warnings", []))
    body = app.test_client().get("/api/health-optimized").get_json()
    assert said not in " ".join(body.get("warnings", []))


def test_health_names_what_each_listed_llm_provider_lacks(tmp_path, fake_twilio):
    """LLM_PROVIDERS=azure with only OPENAI_API_KEY set said 'set AZURE_OPENAI_* or OPENAI_API_KEY' although the
    OpenAI key was set; a listed provider left out (no failover) was said only in the start-up log."""
    env = {**base_env(tmp_path, fake_twilio), "LLM_PROVIDERS": "azure", "OPENAI_API_KEY": "sk-test-openai-000000",
           "AZURE_OPENAI_API_KEY": "azure-test-key-123"}
    body = create_app(env).test_client().get("/health").get_json()
    text = " ".join(body["warnings"])
    assert body["status"] == "degraded"
    assert "LLM_PROVIDERS" in text and "AZURE_OPENAI_ENDPOINT" in text
    assert "AZURE_OPENAI_API_KEY and" not in text  # it is set
    assert "azure-test-key-123" not in text

    env = {**env, "LLM_PROVIDERS": "azure,openai"}
    body = create_app(env).test_client().get("/health").get_json()
    assert [p["name"] for p in body["checks"]["llm"]["providers"]] == ["openai"]
    assert any("azure" in w and "AZURE_OPENAI_ENDPOINT" in w for w in body["warnings"])


def run_simulator(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "callweaver.simulate", *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_the_simulator_without_a_running_server_says_so_without_a_traceback():
    """README's simulator section: terminal 2 before terminal 1 (or a wrong CALLWEAVER_URL) printed a traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    done = run_simulator(["--script", "tests/fixtures/scripts/real_estate_buyer.txt",
                          "--twilio-port", str(free_port())],
                         {"CALLWEAVER_URL": url, "TWILIO_AUTH_TOKEN": "0123456789abcdef" * 2})
    assert done.returncode != 0
    assert url in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_simulator_names_a_bad_twilio_port_without_a_traceback():
    done = run_simulator(["--help"], {"SIMULATOR_TWILIO_PORT": "twilio"})
    assert done.returncode != 0
    assert "SIMULATOR_TWILIO_PORT" in done.stderr and "Traceback" not in done.stderr, done.stderr
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_simulator(["--twilio-port", str(port)], {"TWILIO_AUTH_TOKEN": "0123456789abcdef" * 2})
    assert done.returncode != 0
    assert str(port) in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_demo_on_a_busy_port_says_so_without_a_traceback():
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_simulator(["--demo", "--exit", "--port", str(port)], {})
    assert done.returncode != 0
    assert f"--port {port}" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_demo_that_fails_to_start_says_why_without_a_traceback(tmp_path):
    """The demo's server inherits the shell's variables: a bad one stops it, named, as it stops the service."""
    done = run_simulator(["--demo", "--exit", "--db", str(tmp_path / "demo.sqlite3")], {"CALL_TIMEOUT_S": "soon"})
    assert done.returncode != 0
    assert "CALL_TIMEOUT_S" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_redis_reply_cache_without_a_redis_url_is_refused_at_start():
    """CACHE_TYPE=RedisCache with neither CACHE_REDIS_URL nor REDIS_URL passed the settings and then stopped the
    worker with a ValueError traceback from the cache backend."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"CACHE_TYPE": "RedisCache"})
    assert "CACHE_TYPE" in str(err.value) and "REDIS_URL" in str(err.value)
    assert Settings.from_env({"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": "redis://127.0.0.1:6379/1"})


def test_the_retention_job_logs_an_unreachable_store_without_a_traceback(tmp_path):
    """Every interval the purge against a store that is down logged purge_failed with a whole traceback."""
    from structlog.testing import capture_logs

    from callweaver.retention import run_periodically
    from callweaver.store import StoreError

    class DownStore:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise StoreError("redis store: ConnectionError: Error 111 connecting to 127.0.0.1:1.")
            return fail

    class Stop(Exception):
        pass

    def sleep(_s):
        raise Stop

    with capture_logs() as logs, pytest.raises(Stop):
        run_periodically(DownStore(), retention_days=30, interval_s=60, holder="w", sleep=sleep)
    failed = [e for e in logs if e["event"] == "purge_failed"]
    assert failed and "exc_info" not in failed[0] and "Error 111" in failed[0]["error"]


@pytest.mark.parametrize("public", ["http://127.0.0.1:3000", "https://localhost", "https://10.0.0.5",
                                   "https://[::1]:8443",
                                   "https://100.100.7.1",  # shared address space (a Tailscale node): not public
                                   "https://[fd7a:115c:a1e0::1]"])
def test_a_public_url_twilio_cannot_reach_is_refused_in_production(public):
    """The simulator section's PUBLIC_BASE_URL=http://127.0.0.1:3000 carried into production: every call placed,
    then every webhook lost (Twilio cannot reach this machine's loopback), with nothing said."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"NODE_ENV": "production", "PUBLIC_BASE_URL": public})
    assert "PUBLIC_BASE_URL" in str(err.value) and "Twilio" in str(err.value)


def test_on_render_an_unreachable_public_url_gives_way_to_renders_own():
    """A development .env imported into Render's dashboard carries WEBHOOK_BASE_URL=http://localhost:3000: refusing it
    there is an outage (a worker refuses its settings after Render's health check passed, so the deploy goes live and
    restarts in a loop), while RENDER_EXTERNAL_URL is certainly a URL Twilio reaches."""
    env = {"RENDER": "true", "RENDER_EXTERNAL_URL": "https://cw.onrender.com",
           "WEBHOOK_BASE_URL": "http://localhost:3000"}
    s = Settings.from_env(env)
    assert s.public_base_url == "https://cw.onrender.com"
    assert any("WEBHOOK_BASE_URL" in w and "RENDER_EXTERNAL_URL" in w for w in s.warnings), s.warnings
    with pytest.raises(ConfigError):  # not on Render: nothing certain to fall back on
        Settings.from_env({"NODE_ENV": "production", "WEBHOOK_BASE_URL": "http://localhost:3000"})


def test_a_loopback_public_url_with_real_twilio_is_a_warning_in_development():
    s = Settings.from_env({"PUBLIC_BASE_URL": "http://127.0.0.1:3000"})
    assert any("PUBLIC_BASE_URL" in w and "Twilio" in w for w in s.warnings)
    # the simulator's set-up: Twilio is the local stand-in, which reaches loopback
    s = Settings.from_env({"PUBLIC_BASE_URL": "http://127.0.0.1:3000", "TWILIO_API_BASE_URL": "http://127.0.0.1:3099"})
    assert not any("PUBLIC_BASE_URL" in w for w in s.warnings)


@pytest.mark.parametrize("public", ["https://cw.example/?x=1", "https://cw.example/#top"])
def test_a_public_url_with_a_query_or_fragment_is_refused(public):
    """Every callback URL is the public URL plus a path: a query or fragment in it would break them all."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"PUBLIC_BASE_URL": public})
    assert "PUBLIC_BASE_URL" in str(err.value)


def test_request_credentials_need_a_secret_key_long_enough_to_encrypt_them():
    """SECRET_KEY=abc was accepted as the key other accounts' Twilio and LLM credentials are kept encrypted with."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"ALLOW_REQUEST_CREDENTIALS": "1", "SECRET_KEY": "abc"})
    assert "SECRET_KEY" in str(err.value) and "abc" not in str(err.value).split("SECRET_KEY", 1)[1]
    assert Settings.from_env({"ALLOW_REQUEST_CREDENTIALS": "1", "SECRET_KEY": "k" * 16}).allow_request_credentials


@pytest.mark.parametrize("name", ["RELAY_SOCKET_LEASE_S", "RETENTION_INTERVAL_S", "CACHE_TTL_S"])
def test_a_store_expiry_too_long_for_the_store_is_refused_at_start(name):
    """These become store expiries (Redis PEXPIRE, the retention lease): 1e17 s passed the settings, then every relay
    socket claim (or retention run, or cache write) failed with "value is not an integer or out of range"."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: "100000000000000000"})
    assert name in str(err.value)


def run_flask_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_the_purge_command_names_a_bad_setting_without_a_traceback(tmp_path):
    """README's `flask --app wsgi purge-calls`: a bad setting printed create_app's whole traceback."""
    env = {"CALLWEAVER_DB": str(tmp_path / "db.sqlite3"), "CACHE_DIR": str(tmp_path / "cache"),
           "LOG_LEVEL": "WARNING"}
    done = run_flask_cli(["purge-calls"], env)
    assert done.returncode == 0 and "purged 0 call(s)" in done.stdout, done.stderr
    done = run_flask_cli(["purge-calls"], {**env, "CALL_TIMEOUT_S": "abc"})
    assert done.returncode != 0
    assert "CALL_TIMEOUT_S" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("production", [{"NODE_ENV": "production"}, {"RENDER": "true"}])
def test_signature_checks_cannot_be_turned_off_in_production(production):
    """TWILIO_VALIDATE_SIGNATURES=0 (local tunnels) was only a warning in production: anyone could then post status
    callbacks and TwiML requests as Twilio."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**production, "PUBLIC_BASE_URL": "https://cw.example", "TWILIO_VALIDATE_SIGNATURES": "0"})
    assert "TWILIO_VALIDATE_SIGNATURES" in str(err.value)


def test_an_empty_blocked_prefixes_value_keeps_the_default_blocklist():
    """Every other variable reads empty as unset; BLOCKED_DESTINATION_PREFIXES read empty as 'block nothing', so a
    blank left in Render's dashboard prompt (render.yaml declares it `sync: false`) turned the toll-fraud blocklist
    off without a word. Turning it off takes `none`."""
    default = Settings.from_env({}).blocked_destination_prefixes
    assert "+1900" in default
    assert Settings.from_env({"BLOCKED_DESTINATION_PREFIXES": ""}).blocked_destination_prefixes == default
    assert Settings.from_env({"BLOCKED_DESTINATION_PREFIXES": "  "}).blocked_destination_prefixes == default
    assert Settings.from_env({"BLOCKED_DESTINATION_PREFIXES": "none"}).blocked_destination_prefixes == ()
    assert Settings.from_env({"BLOCKED_DESTINATION_PREFIXES": "+1415"}).blocked_destination_prefixes == ("+1415",)


def test_public_url_and_its_alias_that_differ_are_a_warning():
    s = Settings.from_env({"PUBLIC_BASE_URL": "https://a.example", "WEBHOOK_BASE_URL": "https://b.example/"})
    assert s.public_base_url == "https://a.example"
    assert any("WEBHOOK_BASE_URL" in w and "PUBLIC_BASE_URL" in w for w in s.warnings)
    same = Settings.from_env({"PUBLIC_BASE_URL": "https://a.example", "WEBHOOK_BASE_URL": "https://a.example/"})
    assert not any("WEBHOOK_BASE_URL" in w for w in same.warnings)


@pytest.mark.parametrize("value", ["0 per minute", "10/second;0/minute", "5 per 99999999999 year"])
def test_a_rate_limit_that_refuses_everything_or_outlives_the_store_is_refused_at_start(value):
    """'0 per minute' parsed, then every make-call got 429 with nothing said at start; a window of 10^11 years is no
    expiry a store can keep."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"RATE_LIMIT_MAKE_CALL": value})
    assert "RATE_LIMIT_MAKE_CALL" in str(err.value)
    assert Settings.from_env({"RATE_LIMIT_MAKE_CALL": "100 per day;10/minute"}).rate_limit_make_call


def test_the_purge_command_against_an_unreachable_store_says_so_without_a_traceback(tmp_path):
    env = {"CACHE_DIR": str(tmp_path / "cache"), "LOG_LEVEL": "WARNING", "REDIS_URL": "redis://127.0.0.1:1/0"}
    done = run_flask_cli(["purge-calls"], env)
    assert done.returncode != 0
    assert "redis store" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_open_operator_pages_behind_a_public_url_are_a_warning_in_development():
    """Deployed somewhere other than Render without NODE_ENV=production: the dashboard, call log and transcripts were
    open to anyone reaching the public URL, and nothing said so (they now answer only this machine: the warning says
    how to reach them)."""
    s = Settings.from_env({"PUBLIC_BASE_URL": "https://cw.example.com"})
    assert any("OPS_TOKEN" in w and "NODE_ENV" in w for w in s.warnings)
    assert not any("OPS_TOKEN" in w for w in Settings.from_env({"PUBLIC_BASE_URL": "https://cw.example.com",
                                                                 "OPS_TOKEN": "o" * 16}).warnings)
    assert not any("OPS_TOKEN" in w for w in Settings.from_env({}).warnings)


@pytest.mark.parametrize("value", ["staging prod:", "x" * 65, "café:", "a*b:"])
def test_a_redis_key_prefix_that_is_no_plain_name_is_refused_at_start(value):
    """REDIS_KEY_PREFIX starts every key: spaces, glob characters or a very long one are a typo, not a namespace."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"REDIS_KEY_PREFIX": value})
    assert "REDIS_KEY_PREFIX" in str(err.value)


def test_redis_key_prefix_defaults_to_cw_and_an_empty_value_means_the_default():
    assert Settings.from_env({}).redis_key_prefix == "cw:"
    assert Settings.from_env({"REDIS_KEY_PREFIX": " "}).redis_key_prefix == "cw:"
    assert Settings.from_env({"REDIS_KEY_PREFIX": "staging:"}).redis_key_prefix == "staging:"
