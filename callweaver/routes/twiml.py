"""TwiML endpoints for Twilio, built with the SDK's VoiceResponse (never hand-written XML)."""
from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import structlog
from flask import Blueprint, request
from twilio.twiml.voice_response import VoiceResponse

from ..engine.conversation import default_workflow
from ..engine.languages import LanguageEntry
from ..engine.workflow import Workflow
from ..lifecycle import new_tracking_id
from ..security import websocket_url
from ..services import services
from ..store import CallRecord
from .common import base_url, twilio_params, twilio_webhook, twiml_response

bp = Blueprint("twiml", __name__)
log = structlog.get_logger()

MAX_RESUMES = 2
RELAY_PATH = "/api/conversationrelay-ws"


@bp.route("/api/twiml-default", methods=["GET", "POST"])
def twiml_default():
    vr = VoiceResponse()
    vr.say("Hello! This is a test call from CallWeaver. Your Twilio configuration is working.", voice="alice")
    vr.pause(length=1)
    vr.say("Goodbye!", voice="alice")
    return twiml_response(str(vr))


# ---- traditional <Gather> flow ---------------------------------------------------------------------

def _gather_url(record: CallRecord | None, workflow_id: str | None) -> str:
    query = {"id": workflow_id or (record.workflow_id if record else None) or "fallback"}
    if record:
        query["trackingId"] = record.tracking_id
    return f"{base_url()}/api/twiml-ai?{urlencode(query)}"


def _say_and_listen(vr: VoiceResponse, text: str, entry: LanguageEntry, action: str) -> None:
    """Say, listen; no speech → re-prompt once, then goodbye and hang up (the original's pattern)."""
    say = {"voice": entry.say_voice, "language": entry.say_language}
    vr.say(text, **say)
    g = vr.gather(input="speech", timeout=10, speech_timeout=2, action=action, method="POST",
                  language=entry.gather_language)
    g.say(entry.line("listening"), **say)
    vr.say(entry.line("reprompt"), **say)
    g2 = vr.gather(input="speech", timeout=8, speech_timeout=2, action=action, method="POST",
                   language=entry.gather_language)
    g2.say(entry.line("listening"), **say)
    vr.say(entry.line("goodbye"), **say)
    vr.hangup()


def _inbound_record(workflow_id: str | None, call_sid: str | None, params: dict) -> CallRecord | None:
    """A Gather-flow call we did not place (or placed by the old make-call URL): start a record for it."""
    svc = services()
    snapshot = svc.store.get_workflow(workflow_id) if workflow_id else None
    workflow = Workflow.from_snapshot(snapshot) if snapshot else default_workflow()
    entry = svc.languages.get(workflow.default_language)
    greeting = workflow.greeting or entry.line("fallbackGreeting")
    record = CallRecord(tracking_id=new_tracking_id(), path="traditional", call_sid=call_sid,
                        workflow_id=workflow_id, workflow=workflow.to_snapshot(),
                        workflow_hash=workflow.version_hash, language=entry.code, greeting=greeting,
                        to=params.get("To"), from_number=params.get("From"),
                        current_node=workflow.entry_node_id(),
                        messages=[{"role": "assistant", "content": greeting}])
    svc.store.create_call(record)
    return record


@bp.route("/api/twiml-ai", methods=["GET", "POST"])
@twilio_webhook
def twiml_ai(record=None):
    started = time.monotonic()
    svc = services()
    params = twilio_params()
    workflow_id = request.args.get("id")
    if record is None:
        record = _inbound_record(workflow_id if workflow_id != "fallback" else None, params.get("CallSid"), params)
    elif params.get("CallSid") and not record.call_sid:
        record = svc.store.update_call(record.tracking_id, call_sid=params["CallSid"]) or record
    entry = svc.languages.get(record.language)
    action = _gather_url(record, workflow_id)
    vr = VoiceResponse()
    speech = (params.get("SpeechResult") or "").strip()
    if not speech:
        _say_and_listen(vr, record.greeting or entry.line("fallbackGreeting"), entry, action)
        return twiml_response(str(vr))

    turn = svc.engine.start_turn(record, speech)
    text = "".join(turn).strip()
    elapsed_ms = round((time.monotonic() - started) * 1000, 3)
    # The whole reply must exist before <Say> can speak it: first and last "token" are the same moment.
    svc.engine.commit_turn(record, turn, path="traditional",
                           timings={"firstTokenMs": elapsed_ms, "lastTokenMs": elapsed_ms})
    result = turn.result
    entry = svc.languages.get(result.language)
    say = {"voice": entry.say_voice, "language": entry.say_language}
    if result.action == "end":
        vr.say(text or entry.line("goodbye"), **say)
        vr.hangup()
    elif result.action == "transfer" and result.destination:
        vr.say(text, **say)
        vr.dial(result.destination)
    else:
        _say_and_listen(vr, text or entry.line("apology"), entry, action)
    return twiml_response(str(vr))


# ---- ConversationRelay -------------------------------------------------------------------------------

def _connect_relay(vr: VoiceResponse, record: CallRecord, entry: LanguageEntry, greeting: str,
                   resumed: bool = False) -> None:
    base = base_url()
    connect = vr.connect(action=f"{base}/api/connect-action?{urlencode({'trackingId': record.tracking_id})}",
                         method="POST")
    relay = connect.conversation_relay(
        url=websocket_url(base, RELAY_PATH) + "?" + urlencode({"trackingId": record.tracking_id}),
        welcome_greeting=greeting, welcome_greeting_interruptible="any", interruptible="any",
        dtmf_detection=True, **entry.relay_kwargs())
    relay.parameter(name="trackingId", value=record.tracking_id)
    if resumed:
        relay.parameter(name="resumed", value="1")


@bp.route("/api/twiml-optimized", methods=["GET", "POST"])
@twilio_webhook
def twiml_optimized(record=None):
    svc = services()
    params = twilio_params()
    vr = VoiceResponse()
    if record is None:
        # The original's fallback: no call state → the Gather flow, never an error.
        log.warning("twiml_optimized_unknown_call", tracking_id=request.args.get("trackingId"))
        entry = svc.languages.get(None)
        _say_and_listen(vr, entry.line("fallbackGreeting"), entry, _gather_url(None, request.args.get("id")))
        return twiml_response(str(vr))
    if params.get("CallSid") and record.call_sid != params["CallSid"]:
        record = svc.store.update_call(record.tracking_id, call_sid=params["CallSid"]) or record
    entry = svc.languages.get(record.language)
    _connect_relay(vr, record, entry, record.greeting or entry.line("fallbackGreeting"))
    return twiml_response(str(vr))


@bp.route("/api/connect-action", methods=["GET", "POST"])
@twilio_webhook
def connect_action(record=None):
    svc = services()
    params = twilio_params()
    status = (params.get("SessionStatus") or params.get("ConnectStatus") or "").lower()
    duration = params.get("SessionDuration") or params.get("ConnectDuration")
    handoff = {}
    if params.get("HandoffData"):
        try:
            handoff = json.loads(params["HandoffData"])
        except ValueError:
            handoff = {"raw": params["HandoffData"][:200]}
    entry = svc.languages.get(record.language if record else None)
    say = {"voice": entry.say_voice, "language": entry.say_language}
    log.info("connect_action", session_status=status, duration_s=duration, handoff=handoff.get("reason"),
             error_code=params.get("ErrorCode"))
    vr = VoiceResponse()
    if handoff.get("reason") == "transfer" and handoff.get("destination"):
        vr.dial(handoff["destination"])
    elif status == "failed" and record is not None and record.resume_count < MAX_RESUMES:
        # The socket broke (deploy, crashed worker): reconnect and carry on from the store.
        record = svc.store.update_call(record.tracking_id, resume_count=record.resume_count + 1) or record
        log.warning("relay_resuming", tracking_id=record.tracking_id, attempt=record.resume_count,
                    error_code=params.get("ErrorCode"))
        _connect_relay(vr, record, entry, entry.line("resumed"), resumed=True)
    elif status == "failed":
        vr.say(entry.line("apology"), **say)
        vr.hangup()
    elif handoff.get("reason") == "end":
        vr.hangup()
    else:
        vr.say(entry.line("callEnded"), **say)
        vr.hangup()
    return twiml_response(str(vr))
