"""Call lifecycle endpoints: make-call (traditional and optimized), end-call, call-status, twilio-config."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from twilio.base.exceptions import TwilioRestException

from ..call_log import mask_phone
from ..errors import ApiError, twilio_error_status
from ..services import services
from .common import FEATURES, base_url, bind_call, body_params, twilio_webhook
from .twiml import inline_relay_twiml

bp = Blueprint("calls", __name__)

@bp.post("/api/make-call")
def make_call():
    svc = services()
    started = svc.lifecycle.start_call(body_params(), path="traditional", base_url=base_url())
    bind_call(started.record.tracking_id, started.placed.sid)
    svc.prepare_call(started.record.tracking_id)
    return jsonify(success=True, callSid=started.placed.sid,
                   message=f"Call initiated successfully to {started.placed.to}",
                   status=started.placed.status, trackingId=started.record.tracking_id)


@bp.post("/api/make-call-optimized")
def make_call_optimized():
    svc = services()
    try:
        started = svc.lifecycle.start_call(body_params(), path="optimized", base_url=base_url(),
                                           relay_twiml=inline_relay_twiml)
    except TwilioRestException as exc:
        return jsonify(success=False, error=str(exc.msg), code=exc.code,
                       optimization={"enabled": False, "fallbackUsed": True}), twilio_error_status(exc)
    record, placed = started.record, started.placed
    bind_call(record.tracking_id, placed.sid)
    svc.prepare_call(record.tracking_id)  # cache warm-up while the phone rings; never blocks
    return jsonify(
        success=True, callSid=placed.sid, status=placed.status, to=placed.to, **{"from": placed.from_number},
        optimization={"enabled": True, "trackingId": record.tracking_id, "expectedLatency": None,
                      "language": record.language, "features": FEATURES},
        message=f"Optimized call initiated successfully to {placed.to}",
    )


@bp.post("/api/end-call")
def end_call():
    body = body_params()
    call_sid = body.get("callSid") or request.args.get("callSid")
    if not call_sid or not isinstance(call_sid, str):
        raise ApiError(400, "Call SID is required")
    status = services().lifecycle.end_call(call_sid.strip())
    return jsonify(success=True, message="Call ended successfully", callSid=call_sid.strip(), status=status)


@bp.get("/api/call-status")
def call_status_poll():
    call_sid = request.args.get("callSid")
    if not call_sid:
        raise ApiError(400, "Call SID is required")
    svc = services()
    call = svc.lifecycle.fetch_status(call_sid)
    # Public, and Twilio answers for any call on the account: numbers masked as in the call log.
    for field in ("to", "from"):
        call[field] = mask_phone(call.get(field), svc.settings.mask_phone_numbers)
    return jsonify(success=True, call=call)


# `jsonify(success=True)`'s bytes: up to four callbacks per call get this answer, and the JSON provider built it in
# ~28 µs against ~7 µs for the Response alone (docs/performance-history.md, "Branch p-setup2").
STATUS_RECORDED = b'{"success":true}\n'


def _status_callback(record, optimized: bool):
    if record is None:
        # A callback for a call we never placed (or already purged): acknowledge so Twilio stops retrying.
        return (jsonify(success=True, known=False) if optimized else Response("OK", mimetype="text/plain"))
    services().lifecycle.record_status(record, request.form)  # the routes are POST only: Twilio's fields
    return (Response(STATUS_RECORDED, mimetype="application/json") if optimized
            else Response("OK", mimetype="text/plain"))


@bp.post("/api/call-status")
@twilio_webhook
def call_status_callback(record=None):
    return _status_callback(record, optimized=False)


@bp.post("/api/call-status-optimized")
@twilio_webhook
def call_status_optimized(record=None):
    return _status_callback(record, optimized=True)


@bp.get("/api/twilio-config")
def twilio_config():
    s = services().settings
    return jsonify(success=True, config={
        "accountSid": s.twilio_account_sid, "authToken": "", "phoneNumber": s.twilio_phone_number,
        "recordCalls": s.record_calls, "callTimeout": s.call_timeout_s,
        "hasAuthToken": bool(s.twilio_auth_token)})
