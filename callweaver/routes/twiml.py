"""TwiML endpoints for Twilio, built with the SDK's VoiceResponse (never hand-written XML)."""
from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import structlog
from flask import Blueprint, current_app, g, request
from twilio.twiml.voice_response import Language, VoiceResponse
from werkzeug.exceptions import HTTPException

from ..engine import relay_protocol
from ..engine.languages import LanguageEntry, LanguageTable
from ..engine.relay_session import HANDOVER
from ..errors import call_named_by_request, state_unavailable
from ..gather_turns import TURN_PARAM, turn_param
from ..security import websocket_url
from ..services import services
from ..store import CallRecord, call_is_live
from .common import RELAY_PATH, base_url, twilio_params, twilio_webhook, twiml_response, xml_text

bp = Blueprint("twiml", __name__)
log = structlog.get_logger()


@bp.errorhandler(Exception)
def _twiml_error(exc: Exception):
    """Twilio ends the call with "an application error has occurred" on any answer but 200 TwiML (a 503 for the
    store down, a 500 for a bug): every failure of these webhooks is answered with TwiML instead (`_error_answer`).
    A 4xx HTTP error is the request's own fault and stays one."""
    if isinstance(exc, HTTPException) and exc.code and exc.code < 500:
        return exc
    return twiml_response(_error_answer(exc))


def _error_answer(exc: Exception) -> str:
    """The language's apology, in the call's voice when the call was read (else the default), then: on a Gather turn
    whose call may go on, the listen again (`_may_listen_again`); otherwise <Hangup/>. The relay's TwiML hangs up
    too: its socket needs the call's state as much as a Gather turn does, so falling back to the Gather flow would
    only move the failure to the caller's first words. Logged with the error's class (a stack trace only for a
    bug, not for a store outage) and the ids the request named."""
    record: CallRecord | None = g.get("twilio_call")
    entry = services().languages.get(record.language if record else None)
    if record is not None and g.get("gather_turn") is not None and not state_unavailable(exc):
        services().gather_turns.abandoned(record.tracking_id, g.gather_turn)  # an ended call's report goes at once
    answer = None
    if _may_listen_again(record):
        try:
            vr = VoiceResponse()
            silence_url = _gather_url(record, request.args.get("id"), silence=True) if record else None
            _say_and_listen(vr, entry.line("apology"), entry, _apology_listen_url(record), _gather_timeout_s(record),
                            silence_url=silence_url)
            answer = str(vr)
        except Exception:  # noqa: BLE001  (whatever broke the turn may break this too: then hang up)
            log.exception("twiml_error_listen_failed")
    # `call_verified`: the request's signature was checked against its call (no field name with "signature" in it:
    # the log's secret-name redaction would hide the value).
    fields = {"path": request.path, "error": type(exc).__name__, "state_unavailable": state_unavailable(exc),
              "answer": "listen" if answer else "hangup", "call_verified": "twilio_call" in g,
              **call_named_by_request()}
    if state_unavailable(exc):
        log.error("twiml_error_answered", detail=str(exc)[:300], **fields)
    else:
        log.exception("twiml_error_answered", **fields)
    if answer is None and record is not None and call_is_live(record) and not state_unavailable(exc):
        # CallWeaver hangs up with an apology: the call log's outcome is error, not the caller's hang-up (the store
        # that just failed is not written to again).
        services().lifecycle.ended_by_error(record, f"TwiML webhook failed: {type(exc).__name__}")
    return answer or _hang_up(entry.line("apology"), entry)


def _may_listen_again(record: CallRecord | None) -> bool:
    """A failed Gather turn may listen again: not the silence goodbye, not a call known to have ended, and not a
    listen that already followed an apology (a fault that lasts ends the call rather than looping)."""
    return (request.path == TWIML_AI_PATH and request.args.get(SILENCE_PARAM) != "1"
            and request.args.get(APOLOGISED_PARAM) != "1" and (record is None or call_is_live(record)))


def _apology_listen_url(record: CallRecord | None) -> str:
    """The failed turn's action URL, naming the next turn (the failed one may have been claimed: its number again
    would wait for an answer that never comes) and that an apology was said. The turn is the one the request ran
    (`g.gather_turn`, set once claimed), else the one its URL names."""
    turn = g.get("gather_turn", turn_param(request.args.get(TURN_PARAM)))
    turn = services().gather_turns.next_turn(record) if turn is None else turn + 1
    return _gather_url(record, request.args.get("id"), turn, tracking_id=request.args.get("trackingId"),
                       apologised=True)


@bp.route("/api/twiml-default", methods=["GET", "POST"])
@twilio_webhook
def twiml_default(record=None):
    vr = VoiceResponse()
    vr.say("Hello! This is a test call from CallWeaver. Your Twilio configuration is working.", voice="alice")
    vr.pause(length=1)
    vr.say("Goodbye!", voice="alice")
    return twiml_response(str(vr))


# ---- traditional <Gather> flow ---------------------------------------------------------------------

TWIML_AI_PATH = "/api/twiml-ai"
SILENCE_PARAM = "silence"  # the Redirect after both listens stayed silent: the call ends on silence
APOLOGISED_PARAM = "apologised"  # a listen after an error answer (`_error_answer`): another error hangs up


def _gather_url(record: CallRecord | None, workflow_id: str | None, turn: int | None = None,
                silence: bool = False, tracking_id: str | None = None, apologised: bool = False) -> str:
    """The Gather's absolute action URL: the flow, the call (`tracking_id` when the call could not be read) and the
    turn it answers (gather_turns.py); with `silence`, the URL Twilio is sent to once the caller stayed silent
    through both listens; with `apologised`, a listen that followed an error answer."""
    query = {"id": workflow_id or (record.workflow_id if record else None) or "fallback"}
    tracking_id = record.tracking_id if record else tracking_id
    if tracking_id:
        query["trackingId"] = tracking_id
    if turn is not None:
        query[TURN_PARAM] = str(turn)
    if silence:
        query[SILENCE_PARAM] = "1"
    if apologised:
        query[APOLOGISED_PARAM] = "1"
    return f"{base_url()}{TWIML_AI_PATH}?{urlencode(query)}"


GATHER_TIMEOUT_S = 10  # <Gather timeout> when silence handling is off (SILENCE_TIMEOUT_S=0): the original's


def _gather_timeout_s(record: CallRecord | None) -> int:
    """Twilio's <Gather timeout>: the same silence as on a relay call (the flow's silenceTimeout, else
    SILENCE_TIMEOUT_S), in whole seconds, at least one."""
    svc = services()
    silence_s = svc.settings.silence_timeout_s
    if record is not None:
        silence_s = svc.engine.workflow_for(record).limits.silence_s(silence_s)
    return max(1, round(silence_s)) if silence_s > 0 else GATHER_TIMEOUT_S


def _say_and_listen(vr: VoiceResponse, text: str, entry: LanguageEntry, action: str, timeout_s: int,
                    silence_url: str | None = None) -> None:
    """Say, listen; `timeout_s` of silence → re-prompt once, then as long again → goodbye and hang up (the
    original's pattern). With `silence_url` (a call we have a record of), Twilio is sent there for the goodbye, so
    the call is known to have ended on silence (as a relay call's is)."""
    say = {"voice": entry.say_voice, "language": entry.say_language}
    vr.say(text, **say)
    g = vr.gather(input="speech", timeout=timeout_s, speech_timeout=2, action=action, method="POST",
                  language=entry.gather_language)
    g.say(entry.line("listening"), **say)
    vr.say(entry.line("reprompt"), **say)
    g2 = vr.gather(input="speech", timeout=timeout_s, speech_timeout=2, action=action, method="POST",
                   language=entry.gather_language)
    g2.say(entry.line("listening"), **say)
    if silence_url:
        vr.redirect(silence_url, method="POST")
        return
    vr.say(entry.line("goodbye"), **say)
    vr.hangup()


def _listening(record: CallRecord, workflow_id: str | None, text: str, entry: LanguageEntry, turn: int | None,
               vr: VoiceResponse | None = None, apologised: bool = False) -> str:
    """`text`, then the Gather pattern answering `turn` (after what `vr` already holds); `apologised`: still the
    listen after an error answer (`_error_answer`)."""
    vr = vr or VoiceResponse()
    _say_and_listen(vr, text, entry, _gather_url(record, workflow_id, turn, apologised=apologised),
                    _gather_timeout_s(record), silence_url=_gather_url(record, workflow_id, silence=True))
    return str(vr)


def _hang_up(text: str | None = None, entry: LanguageEntry | None = None) -> str:
    """`text` said in `entry`'s voice (if any), then <Hangup>."""
    vr = VoiceResponse()
    if text and entry:
        vr.say(text, voice=entry.say_voice, language=entry.say_language)
    vr.hangup()
    return str(vr)


def _apologise_and_hang_up(record: CallRecord | None, entry: LanguageEntry, reason: str) -> str:
    """The apology, then <Hangup>: a call CallWeaver could not carry on, recorded as ended by an error (`reason`)."""
    services().lifecycle.ended_by_error(record, reason)
    return _hang_up(entry.line("apology"), entry)


@bp.route(TWIML_AI_PATH, methods=["GET", "POST"])
@twilio_webhook
def twiml_ai(record=None):
    svc = services()
    received_at = svc.engine.clock()  # the turn's timings start when Twilio's webhook arrives
    params = twilio_params()
    workflow_id = request.args.get("id")
    call_sid = params.get("CallSid")
    turn = turn_param(request.args.get(TURN_PARAM))
    if record is None:
        record = svc.lifecycle.inbound_call(workflow_id if workflow_id != "fallback" else None,
                                            call_sid, params.get("To"), params.get("From"), base_url())
        g.twilio_call = record  # an error answer from here on speaks its language and names it (`_error_answer`)
    elif call_sid and record.call_sid and call_sid != record.call_sid:
        # A signed URL of one call requested for another: neither call's state may be touched.
        log.error("gather_webhook_refused", reason="CallSid is not the call's", record_call_sid=record.call_sid)
        entry = svc.languages.get(record.language)
        return twiml_response(_hang_up(entry.line("apology"), entry))
    elif not call_is_live(record):
        # A late delivery (a retry) after the call ended: nobody is listening, nothing is run or stored.
        log.warning("gather_webhook_refused", reason="the call has ended", status=record.status)
        return twiml_response(_hang_up())
    else:
        record = svc.lifecycle.attach_call_sid(record, call_sid)
    entry = svc.languages.get(record.language)
    if svc.lifecycle.past_time_limit(record, svc.engine.workflow_for(record)):
        log.info("gather_call_time_limit", duration_s=round(time.time() - record.created_at))
        return twiml_response(_hang_up(entry.line("goodbye"), entry))
    if request.args.get(SILENCE_PARAM) == "1":
        svc.lifecycle.ended_on_silence(record)
        return twiml_response(_hang_up(entry.line("goodbye"), entry))
    speech = (params.get("SpeechResult") or "").strip()
    if not speech:
        if turn is not None or any(m.get("role") == "user" for m in record.messages or ()):
            # A Gather that heard nothing it could transcribe, mid-call: ask again, never greet again (a listen after
            # an apology stays one: a failure next still hangs up).
            return twiml_response(_listening(record, workflow_id, entry.line("reprompt"), entry, turn,
                                             apologised=request.args.get(APOLOGISED_PARAM) == "1"))
        return twiml_response(_listening(record, workflow_id, record.greeting or entry.line("fallbackGreeting"),
                                         entry, svc.gather_turns.next_turn(record)))

    gather = svc.gather_turns
    budget_s = svc.settings.gather_reply_timeout_s
    if turn is not None:
        start = gather.start(record, turn, speech, until=received_at + budget_s)
        turn = g.gather_turn = start.turn  # may be past the URL's (turn_for): an error answer listens after it
        if start.sent is not None:
            return twiml_response(start.sent)
        if start.busy:  # the first attempt is still running: ask again, never run the turn twice
            return twiml_response(_listening(record, workflow_id, entry.line("apology"), entry, turn + 1))

    text, result = svc.engine.answer_whole_turn(record, speech, path="traditional", received_at=received_at,
                                                budget_s=budget_s)
    entry = svc.languages.get(result.language)
    if result.action == "end":
        xml = _hang_up(text or entry.line("goodbye"), entry)
    elif result.action == "transfer" and svc.lifecycle.destination_allowed(result.destination):
        vr = VoiceResponse()
        vr.say(text, voice=entry.say_voice, language=entry.say_language)
        vr.dial(result.destination)
        xml = str(vr)
    elif result.action == "transfer":
        log.error("transfer_blocked", destination_allowed=False)
        xml = _apologise_and_hang_up(record, entry, "transfer refused")
    else:
        next_turn = gather.next_turn(record) if turn is None else turn + 1
        xml = _listening(record, workflow_id, text or entry.line("apology"), entry, next_turn)
    if turn is not None:
        gather.remember(record.tracking_id, turn, speech, xml)
    return twiml_response(xml)


# ---- ConversationRelay -------------------------------------------------------------------------------

class RelayLanguageDeclarations:
    """The languages a relay call starting in each home language may switch to, with their <Language> elements
    built once per worker: the SDK's own TwiML objects, nested into every such call's <ConversationRelay> and
    serialised by the SDK with it (they are only read then). Building ten of them was ~40 % of a TwiML answer.
    At most one entry per language of the table."""

    def __init__(self, languages: LanguageTable) -> None:
        self.languages = languages
        self._by_home: dict[str, tuple[list[LanguageEntry], tuple[Language, ...]]] = {}

    def for_home(self, home: LanguageEntry) -> tuple[list[LanguageEntry], tuple[Language, ...]]:
        found = self._by_home.get(home.code)
        if found is None:
            targets = self.languages.switch_targets(home)
            found = self._by_home[home.code] = (
                targets, tuple(Language(**target.language_element_kwargs()) for target in targets))
        return found


def _language_declarations() -> RelayLanguageDeclarations:
    """This app's declarations (the app's extensions hold them: no module-level state)."""
    found = current_app.extensions.get("callweaver.relay_languages")
    if found is None:
        found = current_app.extensions["callweaver.relay_languages"] = RelayLanguageDeclarations(
            services().languages)
    return found


def _connect_relay(vr: VoiceResponse, record: CallRecord, entry: LanguageEntry, greeting: str,
                   resumed: bool = False) -> dict:
    """<Connect><ConversationRelay> in the call's current language, declaring every language it may switch to.

    Returns the relay's language keys when the call's meta does not hold them yet (else {}): the caller merges them
    into meta key by key (never a whole copy of meta, which other writers change at the same time)."""
    base = base_url()
    svc = services()
    connect = vr.connect(action=f"{base}/api/connect-action?{urlencode({'trackingId': record.tracking_id})}",
                         method="POST")
    meta = record.meta or {}
    home = svc.languages.get(meta.get("homeLanguage") or record.language)
    targets, language_elements = _language_declarations().for_home(home)
    multilingual = len(targets) > 1
    relay = connect.conversation_relay(
        url=websocket_url(base, RELAY_PATH) + "?" + urlencode({"trackingId": record.tracking_id}),
        welcome_greeting=greeting, welcome_greeting_interruptible="any", interruptible="any",
        dtmf_detection=True, debug=relay_protocol.DEBUG_EVENTS, **entry.relay_kwargs(),
        # interim transcripts (`prompt` with last:false) let a turn start before the caller finishes
        partial_prompts=True if svc.engine.speculation.enabled else None,
        hints=",".join(svc.engine.workflow_for(record).speech_hints) or None,
        # Deepgram `multi` reports the language the caller actually speaks (prompt.lang), so a switch is seen.
        transcription_language="multi" if multilingual else None)
    if multilingual:
        # A `language` message must name a language Twilio has configured: declare every possible target,
        # the home language included, so switching back (es-ES → en-GB) lands on a configured voice too.
        for element in language_elements:
            relay.nest(element)
    relay.parameter(name="trackingId", value=record.tracking_id)
    if resumed:
        relay.parameter(name="resumed", value="1")
    wanted = svc.languages.relay_language_meta(home, entry, targets)
    # make-call already stored them for the call's own language (CallLifecycle.start_call): usually nothing to write
    return wanted if any(meta.get(key) != value for key, value in wanted.items()) else {}


def _answer_relay(vr: VoiceResponse, record: CallRecord, entry: LanguageEntry, greeting: str,
                  resumed: bool = False) -> str:
    """`_connect_relay`'s TwiML, with the language keys it declares stored first (only these keys: meta has other
    writers)."""
    missing = _connect_relay(vr, record, entry, greeting, resumed=resumed)
    if missing:
        services().store.update_meta(record.tracking_id, missing)
    return str(vr)


def inline_relay_twiml(record: CallRecord) -> str | None:
    """The relay TwiML of a call make-call-optimized is placing, for Twilio to run on answer without fetching
    /api/twiml-optimized (`TwilioGateway.create_call` sends it inline when it fits Twilio's limit): the same text
    the webhook would answer for this record. None when that answer would have to store something first (the
    language keys declared are not yet in the call's meta): then the call is placed with the webhook's URL."""
    entry = services().languages.get(record.language)
    vr = VoiceResponse()
    if _connect_relay(vr, record, entry, record.greeting or entry.line("fallbackGreeting")):
        return None
    return xml_text(str(vr))


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
        _say_and_listen(vr, entry.line("fallbackGreeting"), entry, _gather_url(None, request.args.get("id")),
                        _gather_timeout_s(None))
        return twiml_response(str(vr))
    record = svc.lifecycle.attach_call_sid(record, params.get("CallSid"))
    entry = svc.languages.get(record.language)
    return twiml_response(_answer_relay(vr, record, entry, record.greeting or entry.line("fallbackGreeting")))


@bp.route("/api/connect-action", methods=["GET", "POST"])
@twilio_webhook
def connect_action(record=None):
    svc = services()
    params = twilio_params()
    status = (params.get("SessionStatus") or params.get("ConnectStatus") or "").lower()
    duration = params.get("SessionDuration") or params.get("ConnectDuration")
    handoff: dict = {}
    if params.get("HandoffData"):
        try:
            parsed = json.loads(params["HandoffData"])
            handoff = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            handoff = {}
    entry = svc.languages.get(record.language if record else None)
    say = {"voice": entry.say_voice, "language": entry.say_language}
    log.info("connect_action", session_status=status, duration_s=duration, handoff=handoff.get("reason"),
             error_code=params.get("ErrorCode"))
    vr = VoiceResponse()
    # The socket broke (crashed worker) or a stopping worker handed the call over (a deploy): reconnect.
    handover = handoff.get("reason") == HANDOVER
    reconnect = status == "failed" or handover
    resumed = svc.lifecycle.try_resume(record, entry.line("resumed"), params.get("ErrorCode"),
                                       params.get("ErrorMessage"), handover=handover) if reconnect else None
    if handoff.get("reason") == "transfer" and svc.lifecycle.destination_allowed(handoff.get("destination")):
        vr.dial(handoff["destination"])
    elif resumed is not None:
        # Carry on from the store, on whichever instance took this request.
        return twiml_response(_answer_relay(vr, resumed, entry, entry.line("resumed"), resumed=True))
    elif reconnect or handoff.get("reason") == "transfer":
        return twiml_response(_apologise_and_hang_up(record, entry,
                                                     "not reconnected" if reconnect else "transfer refused"))
    elif handoff.get("reason") in ("end", "error", "silence"):
        if handoff.get("reason") == "error":
            svc.lifecycle.ended_by_error(record, str(handoff.get("detail") or "relay error")[:100])
        vr.hangup()  # the closing line or the apology was already spoken on the relay
    else:
        vr.say(entry.line("callEnded"), **say)
        vr.hangup()
    return twiml_response(str(vr))
