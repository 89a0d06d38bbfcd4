"""One error path: every failure of the HTTP API becomes {"success": false, "error": ...} JSON.

ApiError is what routes raise; the lifecycle's domain exceptions are mapped to statuses here, and only here."""
from __future__ import annotations

import secrets
from typing import Any

import requests
import structlog
from flask import Flask, jsonify, request
from limits.errors import StorageError
from twilio.base.exceptions import TwilioException, TwilioRestException
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .lifecycle import CallRequestError, NotConfigured, WorkerOverloaded
from .rate_limits import LimitReached, storage_full
from .store import StoreError, StoreFull

# How much of an id an unsigned request named is logged (tracking ids are ~30 characters, call SIDs 34).
LOGGED_ID_CHARS = 64

log = structlog.get_logger()
STATE_FULL = "Call state storage is full; try again once the operator has freed space"
STATE_RETRY_AFTER_S = 5  # a 503 for unavailable state: Redis restarting, a locked or full SQLite file


class ApiError(Exception):
    """A client-visible failure with its HTTP status: {"success": false, "error": message, **extra}."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def new_request_id() -> str:
    """A request's id when the client sent no usable X-Request-Id: `req_` and 24 hex digits."""
    return "req_" + secrets.token_hex(12)


def twilio_error_status(exc: TwilioRestException) -> int:
    """Twilio's 4xx (bad number, unverified caller id…) stay 4xx; anything else is a bad gateway."""
    status = getattr(exc, "status", None) or 502
    if status in (401, 403):
        return 502  # our credentials are wrong: not the client's fault
    return status if 400 <= status < 500 else 502


def twilio_request_form() -> Any:
    """A Twilio request's form, or {} for a request with no body type (the relay socket's upgrade): werkzeug would
    still build an empty form (~12 µs), so it is not asked (`want_form_data_parsed` is werkzeug's own test for a form
    to parse). On the socket the request lives as long as the call: an empty form, files and input stream kept per
    idle call, too."""
    return request.form if request.want_form_data_parsed else {}


def ids_named_by_request(form: Any) -> tuple[str | None, str | None]:
    """The (trackingId, CallSid) a Twilio request names, in the query or its form: unverified until its signature
    is checked against that call."""
    return (request.args.get("trackingId") or form.get("trackingId"),
            form.get("CallSid") or request.args.get("CallSid"))


def call_named_by_request() -> dict[str, str]:
    """The call a failed request named, for its log line when the call could not be read (the store down): as much
    of each id as an id can be, since the request may be unsigned (its signature is checked against the call)."""
    form = twilio_request_form()
    tracking_id, call_sid = ids_named_by_request(form)
    named = {"tracking_id": tracking_id, "call_sid": call_sid, "call_status": form.get("CallStatus")}
    return {key: value[:LOGGED_ID_CHARS] for key, value in named.items() if value}


def state_unavailable(e: Exception) -> bool:
    """The call store or the rate limits' storage failed (an operator's matter, not a bug)."""
    return isinstance(e, (StoreError, StorageError))


def init_errors(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return jsonify(success=False, error=e.message, **e.extra), e.status

    @app.errorhandler(CallRequestError)
    def _call_request_error(e: CallRequestError):
        return jsonify(success=False, error=e.message, **e.details), 400

    @app.errorhandler(LimitReached)
    def _limit_reached(e: LimitReached):
        log.warning("rate_limited", path=request.path, limit=e.limit, key=e.key)
        response = jsonify(success=False, error=e.message)
        response.headers["Retry-After"] = str(e.retry_after_s)
        return response, 429

    @app.errorhandler(StoreError)
    @app.errorhandler(StorageError)
    def _state_unavailable(e: Exception):
        # The call store or the rate limits' storage (Redis, or the instance's SQLite files) failed: a state the
        # operator fixes, not a bug, and nothing was done for the request. Details in the log only, with the call
        # the request named (Twilio does not retry a status callback: this line is what is left of it). Unverified
        # (its signature could not be checked without the call), so only as much as an id can be.
        # Full (Redis at maxmemory, a full disk) is no passing outage: it lasts until space is freed.
        full = isinstance(e, StoreFull) or (isinstance(e, StorageError) and storage_full(e))
        log.error("state_unavailable", path=request.path, error=f"{type(e).__name__}: {e}"[:300], full=full,
                  **call_named_by_request())
        response = jsonify(success=False, error=STATE_FULL if full else "Call state storage is unavailable; "
                                                                         "try again shortly")
        response.headers["Retry-After"] = str(STATE_RETRY_AFTER_S)
        return response, 503

    @app.errorhandler(WorkerOverloaded)
    def _overloaded(e: WorkerOverloaded):
        response = jsonify(success=False, error=e.message)
        response.headers["Retry-After"] = str(e.retry_after_s)
        return response, 503

    @app.errorhandler(NotConfigured)
    def _not_configured(e: NotConfigured):
        return jsonify(success=False, error=e.message), 503

    @app.errorhandler(TwilioRestException)
    def _twilio_error(e: TwilioRestException):
        log.warning("twilio_error", status=e.status, code=e.code, message=e.msg)
        return jsonify(success=False, error=str(e.msg), code=e.code), twilio_error_status(e)

    @app.errorhandler(TwilioException)
    def _twilio_generic(e: TwilioException):
        log.warning("twilio_error", message=str(e))
        return jsonify(success=False, error=f"Twilio request failed: {e}"), 502

    @app.errorhandler(requests.exceptions.RequestException)
    def _twilio_unreachable(e):
        log.warning("twilio_unreachable", error=type(e).__name__)
        return jsonify(success=False, error="Could not reach Twilio; try again"), 502

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e):
        return jsonify(success=False, error="Request body too large (limit 1 MiB)"), 413

    @app.errorhandler(404)
    def _not_found(e):
        return jsonify(success=False, error="Endpoint not found", path=request.path), 404

    @app.errorhandler(405)
    def _method(e):
        return jsonify(success=False, error=f"Method {request.method} not allowed on {request.path}"), 405

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        return jsonify(success=False, error=e.description or e.name), e.code or 500

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        request_id = getattr(request, "request_id", None) or new_request_id()
        log.exception("unhandled_error", request_id=request_id, path=request.path)
        return jsonify(success=False, error="Internal server error", requestId=request_id), 500
