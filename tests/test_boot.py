"""wsgi.py's loader: while the app loads in the background, /ping and /health answer (honestly: starting) and every
other request waits; a failed load answers the waiting requests and stops the worker."""
from __future__ import annotations

import sys
import threading

from flask import Flask
from werkzeug.test import Client

from callweaver.boot import AppLoader, STARTING_WARNING

SETTLE_S = 0.3      # how long a request is given to (wrongly) get past the loader
WAIT_S = 15.0       # generous bound on a request that may proceed


class SlowBuild:
    """A build that returns a tiny Flask app once released; records where the imports ran."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self) -> Flask:
        self.started.set()
        assert self.release.wait(WAIT_S)
        app = Flask("loaded")
        app.add_url_rule("/health", "health", lambda: {"status": "healthy"})
        app.add_url_rule("/api/calls", "calls", lambda: {"success": True}, methods=["GET", "POST"])
        return app


def request_in_thread(loader: AppLoader, method: str, path: str, **kwargs) -> tuple[threading.Thread, list]:
    answered: list = []

    def run() -> None:
        answered.append(Client(loader.wsgi).open(path, method=method, **kwargs))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answered


def test_health_checks_answer_while_the_app_loads_and_everything_else_waits_for_it():
    build = SlowBuild()
    loader = AppLoader(modules=("json",), build=build)
    assert build.started.wait(WAIT_S)
    client = Client(loader.wsgi)

    ping = client.get("/ping")
    assert ping.status_code == 200 and ping.json["pong"] is True
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json
    assert body["status"] == "degraded" and body["starting"] is True and body["warnings"] == [STARTING_WARNING]
    assert body["service"] == "Call Flow Weaver Backend" and body["memory"]["used"].endswith(" MB")
    assert body["environment"] is None  # not read yet: nothing is reported that the app has not determined

    waiting = [request_in_thread(loader, "POST", "/api/calls", json={}),
               request_in_thread(loader, "GET", "/health", headers={"Origin": "http://localhost:8080"}),
               request_in_thread(loader, "HEAD", "/health")]
    for thread, _answered in waiting:
        thread.join(SETTLE_S)
    assert not any(answered for _thread, answered in waiting), "answered before the app had loaded"

    loaded_first: list[bool] = []
    loader.when_loaded(lambda app: loaded_first.append(not any(answered for _t, answered in waiting)))
    build.release.set()
    assert loader.wait(WAIT_S)
    for thread, answered in waiting:
        thread.join(WAIT_S)
        assert answered and answered[0].status_code == 200
    assert waiting[0][1][0].json == {"success": True}
    assert waiting[1][1][0].json == {"status": "healthy"}  # the app's own /health from now on
    assert loaded_first == [True]  # gunicorn.conf.py's app_loaded runs before any waiting request goes through
    assert client.get("/health").json == {"status": "healthy"}
    ran_late: list = []
    loader.when_loaded(ran_late.append)
    assert ran_late == [loader.app]


def test_the_imports_run_in_an_os_thread_of_their_own_then_the_app_is_built():
    built_by: list = []

    def build() -> Flask:
        built_by.append(threading.current_thread())
        return Flask("probe")

    sys.modules.pop("tests.boot_probe_module", None)
    loader = AppLoader(modules=("tests.boot_probe_module",), build=build)
    assert loader.wait(WAIT_S)
    imported_by = sys.modules["tests.boot_probe_module"].IMPORTED_BY
    assert built_by and imported_by is not built_by[0] and imported_by is not threading.main_thread()


def test_a_failed_load_answers_the_waiting_requests_and_stops_the_worker(monkeypatch):
    build = SlowBuild()
    ended_with: list[BaseException] = []
    # Without gevent (here) the loader runs in a thread; under gevent its SystemExit reaches the worker's main
    # greenlet and gunicorn's master halts on exit status 3 ("worker failed to boot").
    monkeypatch.setattr(threading, "excepthook", lambda args: ended_with.append(args.exc_value))

    def broken() -> Flask:
        build()
        raise RuntimeError("bad setting")

    loader = AppLoader(modules=(), build=broken)
    assert build.started.wait(WAIT_S)
    thread, answered = request_in_thread(loader, "GET", "/api/calls")
    thread.join(SETTLE_S)
    assert not answered
    build.release.set()
    assert loader.wait(WAIT_S) is False
    thread.join(WAIT_S)
    assert answered and answered[0].status_code == 503 and answered[0].json["success"] is False
    loader._task.join(WAIT_S)
    assert len(ended_with) == 1 and isinstance(ended_with[0], SystemExit) and ended_with[0].code == 3
