"""Request parsing and Twilio signature checks shared by the blueprints."""
from __future__ import annotations

import functools
import json
from typing import Any, Callable

import structlog
from flask import Response, jsonify, request

from ..api_errors import ApiError
from ..security import SIGNATURE_SETTINGS_HEADER, public_base_url, request_public_url, signature_is_valid
from ..services import services

log = structlog.get_logger()


def all_providers_failed(failovers: list[dict], **extra: Any) -> tuple[Response, int]:
    """Every LLM provider failed: the same honest JSON error (502, with the reason) from every endpoint."""
    return jsonify(success=False, error="Failed to generate AI response", status="failed",
                   details="every LLM provider failed", failovers=failovers, **extra), 502


def base_url() -> str:
    """Public origin for callback URLs: PUBLIC_BASE_URL, else the request as the proxy saw it."""
    return public_base_url(services().settings.public_base_url, request.headers, request.scheme, request.host)


def body_params() -> dict[str, Any]:
    """JSON or form body as a dict; an empty body is {} (the web app posts end-call with an empty JSON body)."""
    raw = request.get_data(cache=True)
    if request.is_json or (raw[:1] in (b"{", b"[") and not request.form):
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "Malformed JSON body")
        if not isinstance(data, dict):
            raise ApiError(400, "JSON body must be an object")
        return data
    return request.form.to_dict()


def twilio_params() -> dict[str, str]:
    """Twilio webhook fields: the form on POST, the query on GET."""
    return request.form.to_dict() if request.method == "POST" else request.args.to_dict()


def signature_ok(auth_token: str, url: str | None = None, params: Any = None) -> bool:
    settings = services().settings
    if not settings.signatures_enforced or not (auth_token or settings.twilio_auth_token):
        return True
    url = url or request_public_url(base_url(), request.path, request.query_string.decode("latin-1"))
    if params is None:
        params = request.form if request.method == "POST" else {}
    return signature_is_valid(auth_token, url, params, request.headers.get("X-Twilio-Signature"),
                              request.headers.get(SIGNATURE_SETTINGS_HEADER))


def verify_twilio(*, url: str | None = None, params: Any = None):
    """Find the call a Twilio request is about and check its signature with that call's token.

    Returns (ok, record); a failure is logged with what is known about the request, never the token.
    """
    svc = services()
    tracking_id = request.args.get("trackingId") or request.form.get("trackingId")
    call_sid = request.form.get("CallSid") or request.args.get("CallSid")
    record = svc.lifecycle.find(tracking_id, call_sid) if (tracking_id or call_sid) else None
    ok = signature_ok(svc.lifecycle.auth_token_for(record), url=url, params=params)
    if not ok:
        log.warning("twilio_signature_rejected", path=request.path, tracking_id=tracking_id, call_sid=call_sid,
                    has_signature=bool(request.headers.get("X-Twilio-Signature")))
    elif tracking_id or call_sid:
        structlog.contextvars.bind_contextvars(tracking_id=tracking_id or (record and record.tracking_id),
                                               call_sid=call_sid)
    return ok, record


def forbidden() -> Response:
    return Response('{"success": false, "error": "Invalid Twilio signature"}', status=403,
                    mimetype="application/json")


def twilio_webhook(view: Callable) -> Callable:
    """Reject a webhook whose X-Twilio-Signature does not validate (403, logged, nothing stored)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        ok, record = verify_twilio()
        if not ok:
            return forbidden()
        return view(*args, record=record, **kwargs)

    return wrapper


def twiml_response(xml: str) -> Response:
    resp = Response(xml, status=200, mimetype="text/xml")
    resp.headers["Content-Type"] = "text/xml; charset=utf-8"
    resp.headers["Cache-Control"] = "no-cache"
    return resp
