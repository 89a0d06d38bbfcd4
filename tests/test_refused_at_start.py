"""A setting the app refuses stops the service before anything answers 200: Render switches traffic to a new deploy
once its `/health` answers 200, so a refusal after that (the worker's loader answers while the app loads) is an
outage, not a failed deploy. The refusal is one line naming the variable, never its value."""
from __future__ import annotations

import http.client
import os
import shlex
import subprocess
import sys
import time

import pytest
import yaml

from tests.fakes.live_server import REPO, free_port, stop_process

# A value an operator might have pasted into the wrong variable: it must never be printed.
PASTED = "sk-Pasted-Secret-4242"
START_TIMEOUT_S = 60.0


def server_env(tmp_path, port: int, **env: str) -> dict[str, str]:
    """The environment a test server starts with: one worker on `port`, its state under `tmp_path`, no Redis."""
    return {**os.environ, "PORT": str(port), "WEB_CONCURRENCY": "1", "CALLWEAVER_DB": str(tmp_path / "db"),
            "CACHE_DIR": str(tmp_path / "cache"), "PUBLIC_BASE_URL": "", "REDIS_URL": "", **env}


def ping_until_200(proc: subprocess.Popen, port: int) -> int | None:
    """GET /ping until it answers 200, the server ends or START_TIMEOUT_S passes; the last status (None: none)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    status = None
    while status != 200 and proc.poll() is None and time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/ping")
            status = conn.getresponse().status
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()
    return status


def serve_and_probe(env: dict[str, str], tmp_path, options: tuple[str, ...] = ()
                    ) -> tuple[list[int], subprocess.CompletedProcess]:
    """Starts the real `gunicorn -c gunicorn.conf.py wsgi:app` and asks /health as fast as it can until the process
    ends; returns every status it answered, and how it ended."""
    port = free_port()
    full = server_env(tmp_path, port, **env)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "-c",
                             "gunicorn.conf.py", *options, "wsgi:app"], cwd=REPO, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    statuses: list[int] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/health")
                statuses.append(conn.getresponse().status)
            except OSError:
                time.sleep(0.01)
            finally:
                conn.close()
    finally:
        stop_process(proc)
    out, err = proc.communicate()
    return statuses, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("name,value", [
    ("CALL_TIMEOUT_S", PASTED),                  # a number the app reads
    ("RATE_LIMIT_CHAT", f"{PASTED} per minute"),  # a rate limit
    ("CORS_ORIGINS", f"https://{PASTED}.example/path"),
    ("RESPONSE_WRITE_TIMEOUT_S", "301"),          # above its upper bound
])
def test_a_refused_setting_stops_the_service_before_any_200(tmp_path, name, value):
    """Before: gunicorn listened, the worker's loader answered /health 200 ("starting"), then the worker's app refused
    the setting and the worker exited (gunicorn halted): Render had already seen the deploy healthy."""
    statuses, done = serve_and_probe({name: value}, tmp_path)
    assert 200 not in statuses, f"/health answered {statuses.count(200)} 200(s) before the refusal"
    assert done.returncode not in (0, None)
    refusal = [line for line in done.stderr.splitlines() if name in line]
    assert len(refusal) == 1, done.stderr
    assert "Traceback" not in done.stderr and PASTED not in done.stdout + done.stderr, done.stderr


def test_a_setting_given_as_gunicorns_env_option_is_checked_before_it_listens(tmp_path):
    """gunicorn's `-e NAME=value` sets the variable after gunicorn.conf.py was read, for the workers only."""
    statuses, done = serve_and_probe({}, tmp_path, ("-e", f"CALL_TIMEOUT_S={PASTED}"))
    assert 200 not in statuses and done.returncode not in (0, None)
    assert len([line for line in done.stderr.splitlines() if "CALL_TIMEOUT_S" in line]) == 1, done.stderr
    assert "Traceback" not in done.stderr and PASTED not in done.stdout + done.stderr, done.stderr


def start_command(options: list[str] = ()) -> list[str]:
    """render.yaml's startCommand, run by this interpreter (`gunicorn …` as `python -m gunicorn …`)."""
    words = shlex.split(yaml.safe_load((REPO / "render.yaml").read_text())["services"][0]["startCommand"])
    runner = {"gunicorn": [sys.executable, "-m", "gunicorn"], "python": [sys.executable]}[words[0]]
    return [*runner, *words[1:], *options]


@pytest.mark.parametrize("value", ["two", "4 workers", PASTED])
def test_the_start_command_names_a_non_numeric_web_concurrency_in_one_line(value):
    """gunicorn reads WEB_CONCURRENCY as it is imported, before gunicorn.conf.py can check it: `WEB_CONCURRENCY=two`
    stopped the service with gunicorn's traceback, which printed the value (`invalid literal for int()`)."""
    done = subprocess.run(start_command(), cwd=REPO, env={**os.environ, "WEB_CONCURRENCY": value, "PORT": "0"},
                          capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode not in (0, None)
    assert "Traceback" not in out and value not in out, out
    assert [line for line in out.splitlines() if line.strip()] == [
        line for line in out.splitlines() if "WEB_CONCURRENCY" in line] and "WEB_CONCURRENCY" in out, out


def test_the_start_command_serves(tmp_path):
    port = free_port()
    env = server_env(tmp_path, port)
    proc = subprocess.Popen(start_command(["--bind", f"127.0.0.1:{port}"]), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert ping_until_200(proc, port) == 200
    finally:
        stop_process(proc)


def test_the_masters_settings_check_imports_neither_limits_nor_flask():
    """gunicorn's master reads gunicorn.conf.py before it listens, so every module it imports delays the first
    /health 200 of a cold start (at 0.1 CPU, ~1 s for `limits`, which imports asyncio)."""
    probe = ("import runpy, sys; runpy.run_path('gunicorn.conf.py'); "
             "print(sorted(m for m in ('limits', 'asyncio', 'flask', 'werkzeug', 'openai', 'twilio', 'gevent') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name,value", [
    ("CALL_TIMEOUT_S", PASTED), ("MAX_BODY_BYTES", PASTED), ("RECORD_CALLS", PASTED),
    ("TWILIO_PHONE_NUMBER", PASTED), ("ALLOWED_DESTINATION_PREFIXES", f"+1,{PASTED}"),
    ("BLOCKED_DESTINATION_PREFIXES", f"+1900,{PASTED}"), ("LLM_PROVIDERS", f"openai,{PASTED}"),
    ("CACHE_TYPE", PASTED), ("CORS_ORIGINS", PASTED), ("CORS_ORIGINS", f"https://*.{PASTED}.example"),
    ("CORS_ORIGINS", ","), ("RATE_LIMIT_CHAT", PASTED), ("RATE_LIMIT_CHAT", "0 per minute"),
    ("RATE_LIMIT_CHAT", "1 per 9999 days"), ("WORKER_CONNECTIONS", PASTED), ("PORT", "4242424242"),
    # a whole number too large for a float: math.isfinite raised OverflowError, a traceback instead of one line
    ("MAX_CALLS_PER_DAY", "9" * 400), ("WORKER_CONNECTIONS", "9" * 400), ("CALL_TIMEOUT_S", "9" * 400),
    # settings the same change added
    ("REDIS_KEY_PREFIX", f"{PASTED}/app"), ("REDIS_KEY_PREFIX", PASTED * 4), ("CHAT_MAX_CHARS", PASTED),
    ("CHAT_MAX_CHARS", "9" * 400),
    ("RESPONSE_WRITE_TIMEOUT_S", PASTED), ("RESPONSE_WRITE_TIMEOUT_S", "9" * 400),
    ("MAX_ANSWERS_PER_CLIENT", PASTED), ("MAX_ANSWERS_PER_CLIENT", "-1"), ("RATE_LIMIT_OPS_AUTH", PASTED),
])
def test_a_refusal_names_the_variable_never_its_value(name, value):
    """A value pasted into the wrong variable (a key into a number) was printed back in the start-up log."""
    from callweaver.config import ConfigError, Settings
    from callweaver.server_config import server_settings

    check = server_settings if name in ("WORKER_CONNECTIONS",) else Settings.from_env
    with pytest.raises(ConfigError) as err:
        check({name: value})
    assert name in str(err.value)
    assert PASTED.lower() not in str(err.value).lower() and value.lower() not in str(err.value).lower()


def test_a_rate_limit_with_too_many_digits_is_refused_in_one_line():
    """Python refuses to read a number of more than 4300 digits (ValueError from int()): the start check let that
    escape as a plain ValueError, a traceback from gunicorn's master instead of the one line naming the variable
    (`limits` itself refuses the string, and main refused it with its usual message)."""
    from callweaver.config import ConfigError, Settings

    value = "1" * 5000 + " per minute"
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"RATE_LIMIT_CHAT": value})
    assert "RATE_LIMIT_CHAT" in str(err.value) and "1" * 50 not in str(err.value)


@pytest.mark.parametrize("variables", [
    # the reply cache's directory cannot be made (on Render: a disk path with no disk mounted)
    {"CACHE_TYPE": "FileSystemCache", "CACHE_DIR": "/proc/callweaver-no-such-dir/cache"},
    {"CACHE_TYPE": "FileSystemCache", "CACHE_DIR": "/etc/hostname"},
    # OpenTelemetry SDK variables its tracer provider refuses (read by the SDK, not by Settings)
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_BSP_SCHEDULE_DELAY": "0"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "many"},
])
def test_what_the_masters_check_accepts_never_stops_the_worker(tmp_path, monkeypatch, variables):
    """What Settings.from_env (gunicorn's master) accepts must not make create_app raise in the worker: by then the
    worker's loader has answered /health 200, and Render has switched traffic to a deploy that then crash-loops.
    An optional part that cannot be built (the reply cache's directory, the tracer) is reported, and the worker
    serves without it, as the SQLite store and SQLiteCache already do with a directory they cannot make."""
    from callweaver.app import create_app
    from callweaver.config import Settings

    env = {"CALLWEAVER_DB": str(tmp_path / "cw.sqlite3"), "CACHE_DIR": str(tmp_path / "cache"), "REDIS_URL": "",
           "PUBLIC_BASE_URL": "", "LOG_LEVEL": "WARNING", **variables}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the OTEL_* variables are read by the SDK from the environment
    Settings.from_env(env)  # accepted by the master's check
    app = create_app()
    assert app.test_client().get("/health").status_code in (200, 503)
    cache = app.extensions["callweaver"].reply_cache.health()
    assert cache["ok"] is ("CACHE_TYPE" not in variables), cache  # the cache that could not be built is reported


REDIS_URLS = [
    "redis://127.0.0.1:6379", "redis://127.0.0.1:6379/2", "redis://h/abc", "rediss://:pw@h:6380/0?ssl_cert_reqs=none",
    "redis://h/0?socket_timeout=abc", "redis://h/0?socket_timeout=1.5", "redis://h/0?socket_timeout=nan",
    "redis://h/0?socket_timeout=", "redis://h/0?db=abc", "redis://h/0?db=3", "redis://h/0?db=%C3%A9",
    "redis://h/0?db=\u0663", "redis://h/0?db=+1", "redis://h/0?db=1_0", "redis://h/0?db=" + "1" * 5000,
    "redis://h/0?max_connections=ten", "redis://h/0?health_check_interval=1.5", "redis://h/0?protocol=three",
    "redis://h/0?socket_connect_timeout=1e3", "redis://h/0?timeout=x", "redis://h/0?socket_read_size=1k",
    "redis://h/0?ssl_min_version=x", "redis://h/0?retry_on_timeout=maybe", "redis://h/0?socket_keepalive=x",
    "redis://h/0?db=1&db=x", "redis://h/0?db=x&db=1", "redis://h/0?foo=bar",
    "rediss://h/0?ssl_include_verify_flags=VERIFY_X509_STRICT", "rediss://h/0?ssl_include_verify_flags=NOPE",
    "rediss://h/0?ssl_exclude_verify_flags=[VERIFY_X509_STRICT,%20VERIFY_X509_PARTIAL_CHAIN]",
    "rediss://h/0?ssl_exclude_verify_flags=[VERIFY_X509_STRICT,]", "unix://localhost/tmp/r.sock?db=x",
]


@pytest.mark.parametrize("url", REDIS_URLS)
def test_a_redis_url_is_refused_at_start_exactly_when_redis_py_refuses_it(url):
    """The worker's rate limiter builds its Redis client from REDIS_URL as the app is built (limits' storage calls
    redis-py's from_url): a query value redis-py refuses (`?socket_timeout=abc`) stopped the worker after its /health
    200. The master's check reads the query as redis-py does, never refusing a URL it reads."""
    from redis.connection import parse_url

    from callweaver.config import ConfigError, Settings

    try:
        parse_url(url)
        redis_refuses = False
    except ValueError:
        redis_refuses = True
    for name in ("REDIS_URL", "CACHE_REDIS_URL"):
        try:
            Settings.from_env({name: url})
            refused = None
        except ConfigError as err:
            refused = str(err)
        assert (refused is not None) == redis_refuses, (name, url, refused)
        if refused:
            assert name in refused and "abc" not in refused and "pw" not in refused


def test_the_start_command_survives_gunicorns_usr2_upgrade(tmp_path):
    """gunicorn's USR2 re-executes its master as `sys.executable` + the master's `sys.argv`. Run through runpy, that
    argv[0] was gunicorn/__main__.py: re-executed as a script, its own folder came first on sys.path, where its
    `http` package hides the standard library's, and the new master stopped ("class uri 'gevent' invalid"), so an
    upgrade in place never happened (it did with the `gunicorn` command the start command replaced)."""
    import re
    import signal

    port = free_port()
    stderr = tmp_path / "stderr"
    env = server_env(tmp_path, port)
    with stderr.open("w") as log:
        proc = subprocess.Popen(start_command(["--bind", f"127.0.0.1:{port}"]), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    new_masters: set[int] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Booting worker" not in stderr.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)
        booted = False
        while not booted and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            after = stderr.read_text().split("Handling signal: usr2", 1)[-1]
            new_masters = {int(pid) for pid in re.findall(r"Listening at: \S+ \((\d+)\)", after)} - {proc.pid}
            booted = bool(new_masters) and "Booting worker" in after.split("Listening at:", 1)[-1]
        assert booted, stderr.read_text()[-2000:]
        for pid in new_masters:
            os.kill(pid, 0)  # the new master runs
    finally:
        stop_process(proc)
        for pid in new_masters:  # not this test's child: signalled, then waited for by polling
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(300):
                    time.sleep(0.1)
                    os.kill(pid, 0)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_value_gunicorns_env_option_replaces_is_not_refused(tmp_path):
    """`-e NAME=value` wins over the environment in every worker (gunicorn puts it in os.environ before it forks):
    the check must read the environment the workers get. It read os.environ as gunicorn.conf.py was loaded, before
    gunicorn applied `-e`, and so refused a value no worker would ever see."""
    port = free_port()
    env = server_env(tmp_path, port, CALL_TIMEOUT_S=PASTED)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "-c", "gunicorn.conf.py",
                             "-e", "CALL_TIMEOUT_S=30", "wsgi:app"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        status = ping_until_200(proc, port)
    finally:
        stop_process(proc)
    err = proc.stderr.read()
    assert status == 200, err[-2000:]
    assert PASTED not in err
