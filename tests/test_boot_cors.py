"""A browser's /health and /ping while the app loads (the web app wakes the service with a cross-origin
`fetch('/health')`): the loader answers them at once, with exactly the CORS headers the loaded app gives for the same
request — allowed, refused and absent origins, preflights too — for a list of origins, one origin and any origin."""
from __future__ import annotations

import http.client
import os
import threading
import time

import pytest
from werkzeug.test import Client

from callweaver import create_app
from callweaver.boot import APP_LOADED, AppLoader
from callweaver.config import ConfigError
from callweaver.cors import CorsPolicy
from tests.fakes.live_server import LiveServer

WEB_APP = "https://kimiya-ai.vercel.app"
WAIT_S = 30.0
CONFIGS = {"the original's four origins": "", "one origin": WEB_APP, "any origin": "*"}
PREFLIGHT = {"Origin": WEB_APP, "Access-Control-Request-Method": "GET"}
REQUESTS = [
    ("GET", "/health", {"Origin": WEB_APP}),  # what the web app sends (a simple GET: no preflight)
    ("GET", "/ping", {"Origin": WEB_APP}),
    ("GET", "/health", {"Origin": WEB_APP.upper()}),
    ("GET", "/health", {"Origin": "https://elsewhere.example"}),
    ("GET", "/ping", {"Origin": "https://elsewhere.example"}),
    ("GET", "/health", {}),
    ("GET", "/ping", {}),
    ("OPTIONS", "/health", PREFLIGHT),
    ("OPTIONS", "/ping", {**PREFLIGHT, "Access-Control-Request-Headers": "content-type, x-other, Authorization"}),
    ("OPTIONS", "/health", {**PREFLIGHT, "Access-Control-Request-Method": "PATCH"}),
    ("OPTIONS", "/health", {"Origin": WEB_APP}),
    ("OPTIONS", "/health", {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "GET"}),
    ("OPTIONS", "/health", {**PREFLIGHT, "Access-Control-Request-Private-Network": "true"}),
    ("OPTIONS", "/ping", {}),
]


def cors_headers(headers) -> list[tuple[str, str]]:
    return sorted((k.title(), v) for k, v in headers if k.lower().startswith("access-control-") or k.lower() == "vary")


def allowed(response) -> set[str]:
    return {m.strip() for m in response.headers["Allow"].split(",")}


def app_env(tmp_path, origins: str) -> dict[str, str]:
    return {"CALLWEAVER_DB": str(tmp_path / "cw.sqlite3"), "CACHE_DIR": str(tmp_path / "cache"),
            "LOG_LEVEL": "WARNING", "CACHE_PREWARM": "0", "CORS_ORIGINS": origins}


def held_loader(tmp_path, origins: str) -> tuple[AppLoader, threading.Event]:
    """A loader whose app is built only once the returned event is set."""
    env = app_env(tmp_path, origins)
    release = threading.Event()

    def build():
        assert release.wait(WAIT_S)
        return create_app(env)

    return AppLoader(modules=(), build=build, cors=CorsPolicy.from_env({**os.environ, **env})), release


@pytest.mark.parametrize("origins", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_loader_answers_with_the_loaded_apps_cors_headers(tmp_path, origins):
    loader, release = held_loader(tmp_path, origins)
    client = Client(loader.wsgi)
    starting = [client.open(path, method=method, headers=headers) for method, path, headers in REQUESTS]
    assert loader.app is None  # every answer above came from the loader
    release.set()
    assert loader.wait(WAIT_S)
    for (method, path, headers), early in zip(REQUESTS, starting):
        loaded = client.open(path, method=method, headers=headers)
        assert early.status_code == loaded.status_code == 200
        assert cors_headers(early.headers.items()) == cors_headers(loaded.headers.items()), (method, path, headers)
        if method == "OPTIONS":
            assert allowed(early) == allowed(loaded) and early.data == b""
        elif path == "/health":
            assert early.json["starting"] is True and early.json["status"] == "degraded"
    elsewhere = starting[3].headers.get("Access-Control-Allow-Origin")
    assert (starting[0].headers["Access-Control-Allow-Origin"], elsewhere) == (("*", "*") if origins == "*" else
                                                                               (WEB_APP, None))


def raw(server: LiveServer, method: str, path: str, headers: dict) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("origins", CONFIGS.values(), ids=CONFIGS.keys())
def test_under_gunicorn_a_browsers_health_is_answered_while_the_app_loads_as_the_app_answers_it(tmp_path, origins):
    """Real gunicorn, one gevent worker, wsgi.py's loader with its load held until the test releases it."""
    release = tmp_path / "release"
    env = {**app_env(tmp_path, origins), "HELD_WSGI_RELEASE": str(release)}
    server = LiveServer(env, workers=1, log_path=tmp_path / "gunicorn.log",
                        gunicorn_args=["-c", "gunicorn.conf.py", "tests.fakes.held_wsgi:app"])
    with server:
        starting = [raw(server, method, path, headers) for method, path, headers in REQUESTS]
        other = []
        waiting = threading.Thread(target=lambda: other.append(raw(server, "GET", "/api/twilio-config", {})))
        waiting.start()
        waiting.join(0.3)
        assert not other, "a request other than a health check was answered before the app had loaded"
        assert APP_LOADED not in server.logs()
        release.touch()
        deadline = time.monotonic() + WAIT_S
        while APP_LOADED not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        loaded = [raw(server, method, path, headers) for method, path, headers in REQUESTS]
        waiting.join(WAIT_S)
    assert other and other[0][0] == 200
    for request, (status, headers, body), (loaded_status, loaded_headers, _) in zip(REQUESTS, starting, loaded):
        assert status == loaded_status == 200, request
        assert cors_headers(headers) == cors_headers(loaded_headers), request
        if request[:2] == ("GET", "/health"):
            assert b'"starting":true' in body
    assert dict(starting[0][1])["Access-Control-Allow-Origin"] == ("*" if origins == "*" else WEB_APP)


@pytest.mark.parametrize("value", ["https://*.vercel.app", "https://app.example.com,(evil)", " , "])
def test_cors_origins_are_exact_origins_so_the_loader_and_flask_cors_match_alike(tmp_path, value):
    """flask-cors reads an origin with pattern characters as a regular expression; the one policy names exact
    origins, so such a value (or one naming no origin) stops the app at start, and the loader has no policy."""
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        create_app(app_env(tmp_path, value))
    assert CorsPolicy.from_env({"CORS_ORIGINS": value}) is None


def test_health_uptime_never_goes_back_when_the_app_takes_over(tmp_path):
    """/health's uptime is the process's: the loader's answer and the loaded app's count from the same start, so
    the figure a monitor plots does not drop by the load time when the app takes over."""
    loader, release = held_loader(tmp_path, WEB_APP)
    client = Client(loader.wsgi)
    time.sleep(0.3)
    early = client.get("/health").json
    release.set()
    assert loader.wait(WAIT_S) and early["starting"] is True
    loaded = client.get("/health").json
    assert "starting" not in loaded
    assert loaded["uptime"] >= early["uptime"]
