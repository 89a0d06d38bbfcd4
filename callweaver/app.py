"""The app factory: the only place the settings, logging, services and blueprints are wired together."""
from __future__ import annotations

import os
import re
import time
import uuid
from typing import Any, Mapping

import structlog
from flask import Flask, g, jsonify, request
from flask.sessions import SessionInterface
from flask_cors import CORS

from .background import SocketReader, socket_event_class
from .config import Settings
from .errors import init_errors, new_request_id
from .extensions import sock
from .logging import init_logging, register_secret
from .request_guard import RequestBodyGuard
from .services import Services

_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{8,64}")
# The call a request was about (bound by the routes), carried onto gunicorn's access line (gunicorn.conf.py).
ACCESS_LINE_CALL_FIELDS = ("tracking_id", "call_sid")
# Answered while the worker's SDK clients are still being built (Services.warm_up): they need none of them.
ANSWERED_DURING_WARM_UP = frozenset({"health.health", "health.ping", "health.health_optimized", "static"})
log = structlog.get_logger()


class NoCookieSessions(SessionInterface):
    """The API keeps no cookie sessions: no session is opened, signed or saved per request (any write to
    `flask.session` fails loudly on Flask's null session)."""

    def __init__(self) -> None:
        # One read-only empty session for every request (writes raise): nothing built per request, and nothing
        # kept by each live call's socket, whose request stays open as long as the call.
        self._empty = self.null_session_class()

    def open_session(self, app: Flask, request):  # noqa: ANN001  (Flask's signature)
        return self._empty

    def save_session(self, app: Flask, session, response) -> None:  # noqa: ANN001
        return None


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build one worker's app; `config` overrides environment variables by name (tests use it)."""
    settings = Settings.from_env(os.environ, overrides=config)
    init_logging(settings.log_level, settings.log_format, trace_ids=bool(settings.otel_exporter_otlp_endpoint))
    for secret in settings.secrets:
        register_secret(secret)
    for warning in settings.warnings:
        log.warning("config_warning", message=warning)
    if not settings.twilio_auth_token and settings.signatures_enforced:
        log.warning("config_warning", message="TWILIO_AUTH_TOKEN is not set: every Twilio webhook is refused (403)")

    app = Flask(__name__, instance_relative_config=True)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, JSON_SORT_KEYS=False,
                      SECRET_KEY=settings.secret_key or uuid.uuid4().hex)
    app.session_interface = NoCookieSessions()
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    app.extensions["callweaver"] = Services(settings)
    # The one CORS policy (callweaver/cors.py), which the worker's loader also answers with while the app loads.
    from .routes.common import BROWSERLESS_PATHS
    CORS(app, **settings.cors.flask_cors_options(BROWSERLESS_PATHS))
    # simple-websocket closes a socket with 1009 (message too big) past this size; its reader loop is a SocketReader,
    # which the relay's handler runs itself, and its event (SocketEvent under gevent) tells the handler of each
    # message (routes/relay.RelaySocket).
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.relay_max_message_bytes,
                                         "thread_class": SocketReader, "event_class": socket_event_class()}
    sock.init_app(app)
    _init_request_logging(app)
    _wait_for_warm_up(app)
    _refuse_cross_site(app, settings)
    init_errors(app)
    from .routes import register_blueprints
    register_blueprints(app)
    from .cli import register_cli
    register_cli(app)
    from .rate_limits import init_rate_limits
    init_rate_limits(app, settings, app.extensions["callweaver"].limit_windows)
    # Its bound __call__, not the instance: calling an instance re-enters the interpreter from C, and every live
    # call's request greenlet would keep that deeper C stack while it waits (bench/idle_call_memory.py).
    app.wsgi_app = RequestBodyGuard(  # type: ignore[method-assign]
        app.wsgi_app, max_body_bytes=settings.max_body_bytes, read_timeout_s=settings.body_read_timeout_s,
        max_uploads_per_client=settings.max_uploads_per_client, trusted_proxy_hops=settings.trusted_proxy_hops,
        write_timeout_s=settings.response_write_timeout_s, max_answers_per_client=settings.max_answers_per_client,
        cors=settings.cors,
    ).__call__
    # Last, once every route is compiled: warm_up starts an OS thread, and on CPython 3.11 `ast.parse` in two threads
    # at once (werkzeug compiles each URL rule with it; a traceback's caret anchors use it) raises "AST constructor
    # recursion depth mismatch" (python/cpython#106905), which tests/test_warm_up.py hit.
    app.extensions["callweaver"].warm_up()
    return app


def _init_request_logging(app: Flask) -> None:
    """One line per request. Under gunicorn that is gunicorn's access line (gunicorn.conf.py `access_log_format`:
    method, path, query, status, bytes, duration, request id, remote), to which the request hands the call it was
    about through the WSGI environ; gunicorn also writes it for requests the app never sees (refused bodies).
    The server is started with that configuration (`gunicorn -c gunicorn.conf.py`, README, render.yaml).
    Elsewhere (the Flask test client, `flask run`) the app writes it as `http_request`."""

    @app.before_request
    def _bind_request() -> None:
        structlog.contextvars.clear_contextvars()
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else new_request_id()
        request.request_id = g.request_id  # type: ignore[attr-defined]
        g.started = time.perf_counter()
        structlog.contextvars.bind_contextvars(request_id=g.request_id)

    @app.after_request
    def _log_request(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        response.headers["X-CallWeaver-Worker"] = str(os.getpid())  # which worker answered (multi-worker tests, ops)
        environ = request.environ
        call = structlog.contextvars.get_contextvars()
        if environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/"):
            for key in ACCESS_LINE_CALL_FIELDS:
                if call.get(key):
                    environ[f"callweaver.{key}"] = call[key]
            return response
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        log.info("http_request", method=request.method, path=request.path, status=response.status_code,
                 duration_ms=round(elapsed_ms, 2))
        return response


def _wait_for_warm_up(app: Flask) -> None:
    """Requests that may need the SDK clients wait until the worker has built them (health checks do not)."""

    @app.before_request
    def _wait() -> None:
        if request.endpoint not in ANSWERED_DURING_WARM_UP:
            app.extensions["callweaver"].wait_until_warm()


def _refuse_cross_site(app: Flask, settings: Settings) -> None:
    """What another site's page could make a visitor's browser send is refused before any view runs:
    - a state-changing request to the JSON API that is not application/json (415): forms and text/plain bodies
      need no CORS preflight, JSON does, so only JSON is accepted (Twilio's signed form webhooks are exempt);
    - a state-changing request naming an Origin outside CORS_ORIGINS (403). Twilio and server-to-server clients
      send no Origin and are unaffected."""

    @app.before_request
    def _check_cross_site():
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return None
        view = app.view_functions.get(request.endpoint or "")
        if view is not None and not getattr(view, "twilio_webhook", False) and not request.is_json:
            return jsonify(success=False, error="Content-Type must be application/json"), 415
        origin = request.headers.get("Origin")
        if origin is None or settings.cors.allows(origin):
            return None
        log.warning("origin_refused", method=request.method, path=request.path, origin=origin[:200])
        return jsonify(success=False,
                       error="Origin not allowed: requests from this site are refused (CORS_ORIGINS)"), 403
