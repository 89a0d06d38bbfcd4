"""The worker's WSGI application from its first instant (wsgi.py): the app loads in the background while /ping and
/health answer that it is starting, and every other request waits until it has loaded.

Why: on Render's free plan (0.1 CPU) a worker's imports (Flask, the SDKs, the app's own modules) take seconds, and
the web app's wake-up `GET /health` (a browser's cross-origin request) and Render's health check need only an
honest 200, with the CORS headers the app would give (callweaver/cors.py, the policy both use). So the imports run
in an OS thread (the gevent hub keeps answering meanwhile), then the app is built on the hub itself (Flask's route
compilation and the store's clients belong to the worker's own thread), then its SDK clients as before
(Services.warm_up).
Nothing is deferred into a call: a call's first request waits here until the app has loaded.

Import-light on purpose: it must answer before Flask is imported."""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable

from .background import OsThreadWork, spawn
from .cors import CorsPolicy, cors_request_headers
from .health_facts import SERVICE_NAME, memory_body, now_iso, ping_body, uptime_s

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
# gunicorn's exit status for "worker failed to boot": its master then stops instead of respawning the worker, as it
# did when a bad setting made create_app raise while gunicorn itself loaded the app.
WORKER_BOOT_ERROR = 3
STARTING_WARNING = ("Starting: the app is still loading, so its checks (store, Twilio, LLM providers) have not run "
                    "yet; every request except /health and /ping waits until it has loaded")
HEALTH_PATHS = ("/health", "/ping")
# What Flask answers to OPTIONS on those routes (its automatic OPTIONS), with the CORS headers of a preflight.
HEALTH_METHODS_ALLOWED = "GET, OPTIONS, HEAD"
APP_LOADED = "app_loaded"  # the event of the line each worker writes once loaded (test and bench servers wait for it)
# gunicorn's error log (its handlers are set up in the worker); a failed load is reported there.
log = logging.getLogger("gunicorn.error")


class AppLoader:
    """Loads a Flask app off the request path and serves it once loaded; answers health checks meanwhile."""

    def __init__(self, modules: tuple[str, ...], build: Callable[[], Any], cors: CorsPolicy | None = None) -> None:
        """`modules` are imported in an OS thread; then `build()` (which returns the Flask app) runs in a greenlet.
        `cors` is the app's own CORS policy (from the same environment); without one, a browser's request (it names
        an Origin) waits for the app."""
        self.started_at = time.time()
        self._cors = cors
        self.app: Any = None  # the Flask app once built
        self._serve: WSGIApp | None = None
        self._loaded = threading.Event()  # gevent's Event once wsgi.py has patched threading
        self._lock = threading.Lock()
        self._when_loaded: list[Callable[[Any], None]] = []
        self._task = spawn(self._load, modules, build)

    def wsgi(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """The WSGI entry (wsgi.py's `app`). A bound method rather than `__call__`, and the app's own `wsgi_app`
        behind it: Python-to-Python calls, so no request greenlet holds a deeper C stack than before."""
        serve = self._serve
        if serve is None:
            if self._answers_while_starting(environ):
                return self._starting(environ, start_response)
            self._loaded.wait()
            serve = self._serve
            if serve is None:
                return _json(start_response, "503 Service Unavailable",
                             {"success": False, "error": "The server failed to start; it is restarting"})
        return serve(environ, start_response)

    def when_loaded(self, fn: Callable[[Any], None]) -> None:
        """Run `fn(app)` once the app is built, before any waiting request is let through (now, if it is built)."""
        with self._lock:
            if self.app is None:
                self._when_loaded.append(fn)
                return
        fn(self.app)

    def wait(self, timeout: float | None = None) -> bool:
        """Until the app is built or failed to build (tests); True when it is built."""
        self._loaded.wait(timeout)
        return self._serve is not None

    def _load(self, modules: tuple[str, ...], build: Callable[[], Any]) -> None:
        _after_pending_requests()
        OsThreadWork(lambda: _import_all(modules)).wait()
        try:
            app = build()
        except BaseException as exc:
            _report_failed_load(exc)
            self._loaded.set()  # waiting requests get a 503 rather than hanging until the worker is gone
            raise SystemExit(WORKER_BOOT_ERROR)  # under gevent, propagated to the worker's main greenlet
        with self._lock:
            self.app = app
            callbacks, self._when_loaded = self._when_loaded, []
        for fn in callbacks:
            fn(app)
        self._serve = app.wsgi_app
        self._loaded.set()
        _announce_loaded(time.time() - self.started_at)

    def _answers_while_starting(self, environ: dict) -> bool:
        """Health checks only: GET, and a browser's preflight (OPTIONS) of one. With no CORS policy, a browser's
        request (it names an Origin) waits for the app, whose CORS settings decide what may read the answer."""
        if environ.get("PATH_INFO") not in HEALTH_PATHS:
            return False
        if self._cors is None:
            return environ.get("REQUEST_METHOD") == "GET" and "HTTP_ORIGIN" not in environ
        return environ.get("REQUEST_METHOD") in ("GET", "OPTIONS")

    def _starting(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        cors = self._cors.headers(method, cors_request_headers(environ)) if self._cors else []
        if method == "OPTIONS":
            start_response("200 OK", [("Allow", HEALTH_METHODS_ALLOWED), ("Content-Length", "0"), *cors])
            return [b""]
        if environ["PATH_INFO"] == "/ping":
            return _json(start_response, "200 OK", ping_body(), cors)
        # The contract's shape; `degraded` with the reason, and no figure the app has not measured yet.
        return _json(start_response, "200 OK", {
            "status": "degraded",
            "starting": True,
            "timestamp": now_iso(),
            "uptime": uptime_s(),
            "service": SERVICE_NAME,
            "environment": None,
            "memory": memory_body(),
            "warnings": [STARTING_WARNING],
        }, cors)


def _after_pending_requests() -> None:
    """Under gevent, first let the hub serve what is already pending (a health check that queued while the worker
    started): once the import thread runs, every step of a request waits its turn for the GIL (measured at 0.1 CPU:
    first health check 2.45 s after process start with this, 2.75 s without)."""
    from gevent import monkey
    if monkey.is_module_patched("socket"):
        import gevent
        gevent.idle()


def _report_failed_load(exc: BaseException) -> None:
    """A bad setting is the operator's to fix, not a bug: one line naming every bad variable (config.py says what is
    wrong without printing secrets), no traceback. Anything else is logged with its traceback."""
    from .server_config import ConfigError  # the standard library only
    if isinstance(exc, ConfigError):
        log.error("The app failed to load, this worker exits. %s", exc)
    else:
        log.exception("The app failed to load; this worker exits")


def _announce_loaded(seconds: float) -> None:
    """One JSON line per worker start, whatever LOG_LEVEL says (like gunicorn's "Booting worker"): when this worker
    began serving every request, and how long its load took."""
    print(json.dumps({"event": APP_LOADED, "seconds": round(seconds, 3), "pid": os.getpid()}), file=sys.stderr,
          flush=True)


def _import_all(modules: tuple[str, ...]) -> None:
    """Runs in the OS thread. A module that fails to import is imported again by `build` on the hub, which reports
    the error and stops the worker; here it is only skipped."""
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001  (reported by build)
            return


def _json(start_response: Callable, status: str, body: dict,
          extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    data = json.dumps(body, separators=(",", ":")).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                            ("Cache-Control", "no-store"), *extra])
    return [data]
