"""Call lifecycle: validate a make-call request, record the call, place it through Twilio, track its status, end it.

It knows no HTTP: refusals are CallRequestError / NotConfigured, which errors.py turns into responses."""
from __future__ import annotations

import dataclasses
import re
import secrets
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit

import structlog

from .background import spawn
from .config import (E164_RE, MAX_RING_TIMEOUT_S, TWILIO_ACCOUNT_SID_RE, TWILIO_AUTH_TOKEN_RE, Settings,
                     to_e164)
from .engine.conversation import MAX_KEPT_MESSAGES, default_workflow
from .engine.languages import LanguageEntry, LanguageTable
from .engine.prometheus import CALLS_REFUSED_OVERLOADED, series_key
from .engine.workflow import Workflow, WorkflowError
from .engine.workflow.parse import ValidatedWorkflows
from .gather_turns import COMMIT_MARGIN_S, GATHER_META_KEYS, GatherTurns
from .overload import RETRY_AFTER_S
from .security import CredentialBox, is_bundle_fallback_credential, outbound_url_refusal
from .store import (API_END, CARRIED_OVER_META, END_CALL_META, END_CALL_POLL_S, ERROR_END, LLM_ACCOUNT_META,
                    SILENCE_END, TERMINAL_STATUSES, CallRecord, MetaChange, Store, end_call_answered,
                    end_call_claimed, end_call_lapsed, end_call_pending, end_call_refused, end_reason_claimed)
from .twilio_client import PlacedCall, TwilioGateway

log = structlog.get_logger()

CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")
MAX_RESUMES = 2  # reconnects of a broken relay socket per call
# Reconnects after a stopping worker handed the call over (a deploy each), per call: planned, so not counted
# against MAX_RESUMES; bounded all the same.
MAX_HANDOVERS = 10
RECONNECTS_META = "relayReconnects"  # meta counts of the call's reconnects by cause ("handover")
# <Connect action> ErrorCodes a reconnect can cure: the WebSocket connection to us failed (a deploy, a crashed
# worker). Any other code means the TwiML or its voices were refused, and a reconnect would repeat it.
RECONNECTABLE_ERROR_CODES = frozenset({"39001"})
# How often an ended call's report, waiting for a turn still to be committed (CallLifecycle._call_over), reads the
# store: first after RELAY_CLOSE_POLL_S (a socket closes within ~0.1 s of the final status), then each pause
# COMMIT_WAIT_GROWTH times longer, up to COMMIT_WAIT_MAX_POLL_S (a killed worker's socket is waited for its whole
# lease: 200 such calls read the store ~200 times a second, not 2000).
RELAY_CLOSE_POLL_S = 0.1
COMMIT_WAIT_GROWTH = 1.5
COMMIT_WAIT_MAX_POLL_S = 1.0
END_CALL_WAIT_MARGIN_S = 1.0  # past the Twilio request's deadline: the asking request has stored its answer by then
MIN_API_KEY_CHARS = 16  # shorter "keys" are placeholders left in an export, not an account
MIN_RING_TIMEOUT_S = 5  # shorter rings end before most people can answer
MAX_ERROR_TEXT_CHARS = 300  # a provider's or Twilio's error text is kept and logged up to this length
# meta: the call rang in (inbound_call): its TimeLimit is ours only once Twilio took watch_inbound's update, so its
# webhooks keep the cap too (past_time_limit)
INBOUND_META = "inbound"
# Meta that goes when the call ends: the call's own LLM account, words kept for a resume that never came, and a
# Gather call's latest answer and claims. When that final status is lost, the transcript purge drops the account and
# the words with the credentials instead (store.PURGED_META_KEYS).
ENDED_CALL_META = (LLM_ACCOUNT_META, CARRIED_OVER_META, *GATHER_META_KEYS)


class CallRequestError(Exception):
    """A call request that cannot be honoured as sent: the client can fix it (a 400 at the HTTP edge).

    `details` are extra fields for the client, such as the list of a workflow's `problems`."""

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details


class WorkerOverloaded(Exception):
    """This worker's event loop runs too late to take another call (overload.WorkerLoad): a 503 with Retry-After at
    the HTTP edge, before anything is stored or asked of Twilio, so the live calls keep their turns on time."""

    def __init__(self, lag_ms: float, retry_after_s: int) -> None:
        self.message = "This server is at capacity; try again shortly"
        super().__init__(self.message)
        self.lag_ms = lag_ms
        self.retry_after_s = retry_after_s


class NotConfigured(Exception):
    """The server lacks a setting this request needs: only the operator can fix it (a 503 at the HTTP edge)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def normalize_phone(raw: Any) -> str:
    """Normalise as the original did (strip formatting, +1 for 10 US digits, + otherwise), then require E.164."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise CallRequestError("Phone number (to) is required")
    if not isinstance(raw, (str, int)):
        raise CallRequestError("Invalid phone number format. Use E.164 format, e.g. +15551234567")
    number = to_e164(str(raw))
    if not number:
        raise CallRequestError("Invalid phone number format. Use E.164 format, e.g. +15551234567")
    return number


def status_callback_url(base_url: str, path: str, tracking_id: str) -> str:
    """Where Twilio sends a call's status callbacks: one route per path ("optimized" or the Gather flow), naming
    the call."""
    status_path = "/api/call-status-optimized" if path == "optimized" else "/api/call-status"
    return f"{base_url}{status_path}?{urlencode({'trackingId': tracking_id})}"


def new_tracking_id() -> str:
    return f"call_{int(time.time() * 1000)}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class StartedCall:
    record: CallRecord
    placed: PlacedCall


def event_time(timestamp: str | None) -> float | None:
    """A status callback's `Timestamp` (RFC 2822: when the event happened) in epoch seconds; None if absent or
    unreadable."""
    if not timestamp:
        return None
    try:
        return parsedate_to_datetime(timestamp).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


class CallLifecycle:
    """Everything make-call, status callbacks and end-call do, with no Flask in sight."""

    def __init__(self, settings: Settings, store: Store, twilio: TwilioGateway, languages: LanguageTable,
                 on_call_ended: Callable[[str], Any] | None = None, take_call_slot: Callable[[], None] | None = None,
                 report_holder: str | None = None, overloaded: Callable[[], float | None] | None = None):
        self.settings = settings
        # This worker in the end-of-call report outbox (call_report.py); None: no reports (CALL_REPORT_URL unset).
        self.report_holder = report_holder
        # The calls-per-day cap (rate_limits.CallsPerDay): raises when no call may be placed today.
        self.take_call_slot = take_call_slot
        # This worker's admission check (overload.WorkerLoad.overloaded): the loop lag (ms) when a new call is refused.
        self.overloaded = overloaded
        self.on_call_ended = on_call_ended  # call span and end-of-call report (services.py); returns at once
        self.store = store
        self.twilio = twilio
        self.languages = languages
        self.credential_box = CredentialBox(settings.secret_key or "callweaver-dev-only")
        self.workflows = ValidatedWorkflows()  # the flows of recent make-calls, parsed once per flow

    # ---- credentials -------------------------------------------------------------------
    def request_credentials(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        """Another Twilio account's credentials for this call, or None: use the server's own.

        Body credentials count only when allowed and well-formed. The web app echoes /api/twilio-config's
        accountSid (the server's) with the token built into its bundle, so "body SID = TWILIO_ACCOUNT_SID" means
        the server's account, and the bundle's fallback values are treated as absent.
        """
        if not self.settings.allow_request_credentials:
            return None
        sid, token = body.get("twilioAccountSid"), body.get("twilioAuthToken")
        if not (isinstance(sid, str) and TWILIO_ACCOUNT_SID_RE.fullmatch(sid.strip())
                and isinstance(token, str) and TWILIO_AUTH_TOKEN_RE.fullmatch(token.strip())):
            return None
        sid, token = sid.strip(), token.strip()
        if sid == self.settings.twilio_account_sid:
            return None
        if is_bundle_fallback_credential(sid) or is_bundle_fallback_credential(token):
            log.warning("request_credentials_ignored", reason="the web app bundle's built-in fallback credentials")
            return None
        return sid, token

    def workflow_llm_credentials(self, body: Mapping[str, Any]) -> dict | None:
        """A workflow's own LLM account (config.llm), used for that call only when ALLOW_REQUEST_CREDENTIALS=1.

        Placeholder keys from exported samples ("YOUR_API_KEY") are ignored; the server's providers stay behind
        it for failover.
        """
        if not self.settings.allow_request_credentials:
            return None
        llm = ((body.get("config") or {}) if isinstance(body.get("config"), dict) else {}).get("llm") or {}
        if not isinstance(llm, dict):
            return None

        def real(key: Any) -> bool:
            return isinstance(key, str) and len(key.strip()) >= MIN_API_KEY_CHARS and "YOUR" not in key.upper()

        azure = llm.get("azure") if isinstance(llm.get("azure"), dict) else None
        if llm.get("provider") in ("azure_openai", "azure") and azure and real(azure.get("apiKey")) \
                and isinstance(azure.get("endpoint"), str) and azure["endpoint"].startswith(("https://", "http://")):
            self._check_llm_url("config.llm.azure.endpoint", azure["endpoint"])
            return {"kind": "azure", "apiKey": azure["apiKey"].strip(), "endpoint": azure["endpoint"],
                    "deployment": azure.get("deploymentName"), "apiVersion": azure.get("apiVersion")}
        openai_cfg = llm.get("openai") if isinstance(llm.get("openai"), dict) else None
        if llm.get("provider") == "openai" and openai_cfg and real(openai_cfg.get("apiKey")):
            base_url = openai_cfg.get("baseUrl")
            if base_url is not None:
                if not isinstance(base_url, str):
                    raise CallRequestError("config.llm.openai.baseUrl must be a URL")
                self._check_llm_url("config.llm.openai.baseUrl", base_url)
            return {"kind": "openai", "apiKey": openai_cfg["apiKey"].strip(), "model": openai_cfg.get("model"),
                    "baseUrl": base_url}
        return None

    def _check_llm_url(self, field: str, url: str) -> None:
        refusal = outbound_url_refusal(url, allow_private=self.settings.allow_private_llm_urls)
        if refusal:
            raise CallRequestError(f"{field} is refused: {refusal}")

    def credentials_for(self, record: CallRecord | None) -> tuple[str, str] | None:
        return self.credential_box.open(record.credentials) if record and record.credentials else None

    def auth_token_for(self, record: CallRecord | None) -> str:
        """The token a webhook of this call is signed with: the call's own, else the server's."""
        creds = self.credentials_for(record)
        return creds[1] if creds else self.settings.twilio_auth_token

    # ---- make-call -----------------------------------------------------------------------
    def start_call(self, body: Mapping[str, Any], *, path: str, base_url: str,
                   relay_twiml: Callable[[CallRecord], str | None] | None = None) -> StartedCall:
        """`relay_twiml`: builds an optimized call's TwiML from its record now (None when it cannot), for Twilio to
        run on answer without our TwiML webhook; a call placed with a request's `twimlUrl` keeps that URL."""
        if self.overloaded is not None:
            self.refuse_if_overloaded(path)
        to = normalize_phone(body.get("to"))
        refusal = self.destination_refusal(to)
        if refusal:
            raise CallRequestError(f"Destination {to} is not allowed: {refusal}")
        workflow = self.callable_workflow(body)
        creds = self.request_credentials(body)
        if creds is None and not self.twilio.configured:
            raise NotConfigured("Twilio is not configured on the server: set TWILIO_ACCOUNT_SID, "
                                "TWILIO_AUTH_TOKEN and TWILIO_PHONE_NUMBER")
        from_number = self._from_number(body, creds)
        timeout_s = self._timeout(body.get("timeout"))
        time_limit_s = self.time_limit_s(workflow)
        # RECORD_CALLS is the operator's ceiling: a request may turn recording off, never on.
        record = self.settings.record_calls and body.get("record") is not False
        language = self._call_language(body, workflow)

        greeting = workflow.greeting or language.line("fallbackGreeting")
        tracking_id = new_tracking_id()
        workflow_id = body.get("workflowId") if isinstance(body.get("workflowId"), str) else None
        llm_credentials = self.workflow_llm_credentials(body)
        meta: dict[str, Any] = {"llm": self.credential_box.seal_json(llm_credentials)} if llm_credentials else {}
        twiml_url = self._twiml_url(body.get("twimlUrl"), base_url)
        # Everything the call needs from the body is taken: the decoded body (the whole flow, ~24 KB of objects
        # for a 12 KB body) is not kept through the Twilio request, when other calls' set-ups run. The route
        # passes it straight in, so this was its last reference (docs/performance-history.md, "Issue 12t").
        del body
        if path == "optimized":
            # What its relay TwiML will declare, stored with the call, so the TwiML webhook has nothing to write.
            meta.update(self.languages.relay_language_meta(language, language, self.languages.switch_targets(language)))
        call = CallRecord(
            tracking_id=tracking_id, path=path, workflow_id=workflow_id,
            workflow=workflow.snapshot, workflow_hash=workflow.version_hash,
            language=language.code, greeting=greeting,
            messages=[{"role": "assistant", "content": greeting}],
            to=to, from_number=from_number, current_node=workflow.entry_node_id(),
            credentials=self.credential_box.seal(*creds) if creds else None,
            meta=meta,
        )
        query = {"id": workflow_id or "", "trackingId": tracking_id}
        twiml_path = "/api/twiml-optimized" if path == "optimized" else "/api/twiml-ai"
        url = twiml_url or f"{base_url}{twiml_path}?{urlencode(query)}"
        status_callback = status_callback_url(base_url, path, tracking_id)
        twiml = relay_twiml(call) if relay_twiml is not None and path == "optimized" and not twiml_url else None
        if self.take_call_slot is not None:  # last, once nothing can refuse the request: refusals use no slot
            self.take_call_slot()
        # The flow is saved as the id's latest in the same write, unless the operator pinned the id: a public request
        # must not replace the flow an inbound line runs (its prompt, its transfer numbers).
        pinned = workflow_id in self.settings.pinned_workflow_ids
        if pinned:
            log.info("workflow_not_saved", workflow_id=workflow_id, reason="pinned (PINNED_WORKFLOW_IDS)")
        self.store.create_call(call, workflow_id=None if pinned else workflow_id)
        try:
            placed = self.twilio.create_call(to=to, from_number=from_number, url=url,
                                             status_callback=status_callback, timeout_s=timeout_s,
                                             time_limit_s=time_limit_s,
                                             record=record, credentials=creds, twiml=twiml)
        except Exception as exc:
            self.store.update_meta(tracking_id, {"error": str(getattr(exc, "msg", exc))[:MAX_ERROR_TEXT_CHARS]},
                                   remove=["llm"])
            self.store.update_call(tracking_id, status="failed", ended_at=time.time(), credentials=None)
            raise
        status = placed.status or "queued"
        self.store.record_placed(tracking_id, placed.sid, status)  # writes, reads nothing back
        log.info("call_placed", tracking_id=tracking_id, call_sid=placed.sid, status=placed.status, path=path,
                 language=language.code, nodes=len(workflow.nodes), twiml="inline" if placed.inline_twiml else "url")
        return StartedCall(record=dataclasses.replace(call, call_sid=placed.sid, status=status), placed=placed)

    def refuse_if_overloaded(self, path: str) -> None:
        """First of all (a few dozen floats read, nothing stored, no Twilio request): WorkerOverloaded while this
        worker's loop lags past OVERLOAD_LOOP_LAG_MS. Logged `call_refused_overloaded` and counted in /metrics."""
        lag_ms = self.overloaded() if self.overloaded is not None else None
        if lag_ms is None:
            return
        log.warning("call_refused_overloaded", path=path, loop_lag_ms=round(lag_ms, 1),
                    threshold_ms=self.settings.overload_loop_lag_ms)
        try:
            self.store.add_counters({series_key(CALLS_REFUSED_OVERLOADED, {"path": path}): 1})
        except Exception as exc:  # the refusal stands whatever the counter's storage says
            log.warning("refusal_count_failed", error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT_CHARS])
        raise WorkerOverloaded(lag_ms, RETRY_AFTER_S)

    def _call_language(self, body: Mapping[str, Any], workflow: Workflow) -> LanguageEntry:
        """The body's `language`, else the flow's default; one the table cannot speak is refused (a 400), never
        placed as an English call."""
        requested, field = body.get("language"), "language"
        if requested is None or isinstance(requested, str) and not requested.strip():
            requested, field = workflow.default_language, "config.globalSettings.defaultLanguage"
        entry = self.languages.resolve(requested)
        if entry is None:
            raise CallRequestError(self.languages.refusal(requested, field))
        return entry

    def callable_workflow(self, body: Mapping[str, Any]) -> Workflow:
        """The body's flow, validated, with every transfer destination allowed (CallRequestError otherwise): what
        make-call places and what `flask save-workflow` stores."""
        workflow = self._workflow_from(body)
        blocked = [f"transfer node '{n.id}' destination {n.destination} is not allowed: "
                   f"{self.destination_refusal(n.destination)}" for n in workflow.nodes.values()
                   if n.kind == "transfer" and not self.destination_allowed(n.destination)]
        if blocked:
            raise CallRequestError("Invalid workflow: " + "; ".join(blocked), problems=blocked)
        return workflow

    def storable_workflow(self, body: Any) -> Workflow:
        """What `flask save-workflow` stores under an id for calls ringing in: a callable flow that is really there
        (make-call's generic stand-in for a body without nodes or globalPrompt would silently replace the id's flow)
        in a language the server speaks (make-call refuses any other; an inbound call would hear the default one)."""
        if not isinstance(body, Mapping) or not self._names_a_flow(body):
            raise CallRequestError("the file names no flow: no nodes and no globalPrompt at its top level (the web "
                                   "app's export or a make-call body)")
        workflow = self.callable_workflow(body)
        if self.languages.resolve(workflow.default_language) is None:
            raise CallRequestError(self.languages.refusal(workflow.default_language,
                                                          "config.globalSettings.defaultLanguage"))
        return workflow

    @staticmethod
    def _names_a_flow(body: Mapping[str, Any]) -> bool:
        return bool(body.get("nodes") or str(body.get("globalPrompt") or "").strip())

    def _workflow_from(self, body: Mapping[str, Any]) -> Workflow:
        if not self._names_a_flow(body):
            return default_workflow()  # the original placed such calls with a generic prompt
        try:
            workflow = self.workflows.get(body)
        except WorkflowError as exc:
            raise CallRequestError("Invalid workflow: " + "; ".join(exc.problems), problems=exc.problems)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise CallRequestError(f"Invalid workflow: {exc}")
        return workflow

    def _from_number(self, body: Mapping[str, Any], creds: tuple[str, str] | None) -> str:
        server_number = self.settings.twilio_phone_number
        body_from = body.get("from")
        if isinstance(body_from, str) and body_from.strip():
            candidate = normalize_phone(body_from)
            # With server credentials only the server's own number can call; a different `from` is a stale
            # value baked into the web app's bundle, so the configured number wins.
            if creds or not server_number:
                return candidate
            if candidate != server_number:
                log.warning("from_number_ignored", reason="differs from TWILIO_PHONE_NUMBER")
            return server_number
        if server_number:
            return server_number
        raise NotConfigured("No caller number: set TWILIO_PHONE_NUMBER or send `from`")

    def _timeout(self, raw: Any) -> int:
        """Ring timeout: the request's, clamped to MIN_RING_TIMEOUT_S..MAX_RING_TIMEOUT_S; CALL_TIMEOUT_S when absent."""
        try:
            value = int(raw) if raw not in (None, "", 0) else self.settings.call_timeout_s
        except (TypeError, ValueError, OverflowError):
            raise CallRequestError("timeout must be a number of seconds")
        return max(MIN_RING_TIMEOUT_S, min(MAX_RING_TIMEOUT_S, value))

    def _twiml_url(self, raw: Any, base_url: str) -> str | None:
        """The original let callers pick any TwiML URL; only our own TwiML endpoints are accepted now, so a
        request cannot make the server's account run foreign TwiML (e.g. <Dial> a premium-rate number)."""
        if raw in (None, ""):
            return None
        path = raw
        configured = self.settings.public_base_url
        if isinstance(raw, str) and configured and raw.startswith(configured + "/"):
            path = raw[len(configured):]
        if not isinstance(path, str) or not re.fullmatch(r"/api/twiml-(ai|optimized|default)(\?[^#\s]*)?", path):
            raise CallRequestError("twimlUrl must be one of this service's TwiML endpoints "
                                "(/api/twiml-ai, /api/twiml-optimized, /api/twiml-default)")
        # Twilio signs whatever URL it is given: a query naming another call (trackingId) would make this call's
        # webhooks act on that call's record. Only the workflow (`id`) may be named.
        if any(name != "id" for name, _value in parse_qsl(urlsplit(path).query, keep_blank_values=True)):
            raise CallRequestError("twimlUrl's query may only name the workflow (id=...)")
        return base_url + path

    def destination_refusal(self, number: str | None) -> str | None:
        """Why a destination may not be called (None when it may): outside ALLOWED_DESTINATION_PREFIXES, or
        under a BLOCKED_DESTINATION_PREFIXES entry (premium-rate and non-US/Canada NANP codes by default)."""
        allowed = self.settings.allowed_destination_prefixes
        if not number or not E164_RE.fullmatch(number):
            return "not an E.164 number"
        if "*" not in allowed and not any(number.startswith(p) for p in allowed):
            return f"only numbers starting with {', '.join(allowed)} can be called (ALLOWED_DESTINATION_PREFIXES)"
        blocked = next((p for p in self.settings.blocked_destination_prefixes if number.startswith(p)), None)
        if blocked:
            return f"prefix {blocked} is blocked (BLOCKED_DESTINATION_PREFIXES: premium-rate or toll-fraud destination)"
        return None

    def destination_allowed(self, number: str | None) -> bool:
        return self.destination_refusal(number) is None

    # ---- status callbacks and end-call ------------------------------------------------------
    def find(self, tracking_id: str | None, call_sid: str | None) -> CallRecord | None:
        record = self.store.get_call(tracking_id) if tracking_id else None
        if record is None and call_sid:
            tid = self.store.find_tracking_id(call_sid)
            record = self.store.get_call(tid) if tid else None
        return record

    def record_status(self, record: CallRecord, form: Mapping[str, str]) -> bool:
        """Store a status callback in SequenceNumber order; a terminal status drops per-call credentials."""
        status = (form.get("CallStatus") or "").strip()
        if not status:
            raise CallRequestError("CallStatus is required")
        raw_seq = form.get("SequenceNumber")
        try:
            sequence = int(raw_seq) if raw_seq not in (None, "") else None
        except ValueError:
            raise CallRequestError("SequenceNumber must be a whole number")
        payload = {k: form.get(k) for k in ("CallSid", "CallStatus", "CallDuration", "Timestamp",
                                             "SequenceNumber", "AnsweredBy", "Duration") if form.get(k) is not None}
        # The write that ends the call also records its report as due (the outbox), so a worker stopped from here
        # on cannot lose it: held by this worker through the waits before its first attempt (_call_over).
        reported = self.report_holder is not None and status in TERMINAL_STATUSES
        current = self.store.append_status(record.tracking_id, status, sequence, payload,
                                           report_holder=self.report_holder if reported else None,
                                           report_lease_s=self.report_hold_s if reported else 0.0)
        if record.call_sid is None and form.get("CallSid"):
            self.store.update_call(record.tracking_id, call_sid=form["CallSid"])
        meta = record.meta or {}
        if status in TERMINAL_STATUSES and (record.credentials or any(key in meta for key in ENDED_CALL_META)):
            # Only the secrets (and a Gather call's last answer, what was said) go: the meta keys other writers
            # set meanwhile stay (merged inside the store).
            self.store.update_meta(record.tracking_id, remove=ENDED_CALL_META)
            if record.credentials:
                self.store.update_call(record.tracking_id, credentials=None)
        # The call's end and any callback out of order are an operator's business; the steps on the way
        # (initiated, ringing, in-progress) are in the status history and each has its access line.
        report = log.info if status in TERMINAL_STATUSES or not current else log.debug
        report("call_status", tracking_id=record.tracking_id, call_sid=form.get("CallSid"),
               status=status, sequence=sequence, current=current)
        if status in TERMINAL_STATUSES and end_call_pending(meta):
            # Before the report: an end-call whose request died has its answer in when Twilio says the call ended.
            self._change_end(record.tracking_id, end_call_lapsed(event_time(form.get("Timestamp"))),
                             why="Twilio ended the call after the hang-up's deadline")
        if current and status in TERMINAL_STATUSES and record.status not in TERMINAL_STATUSES and self.on_call_ended:
            self._call_over(record)
        return current

    @property
    def report_hold_s(self) -> float:
        """How long the worker that saw a call end holds its report before the first attempt: the longest wait for
        a turn's commit (_turn_still_due_s) and for an end-call's answer (the reporter's settle), and the lease."""
        s = self.settings
        return (max(s.relay_socket_lease_s, s.gather_reply_timeout_s + COMMIT_MARGIN_S) + self.end_call_wait_s
                + s.call_report_lease_s)

    def _call_over(self, record: CallRecord) -> None:
        """The call's final status is in: its span and report (on_call_ended) once no turn of it is still to be
        committed (`_turn_still_due_s`). Twilio's final callback may come before a relay socket's close, which
        commits the reply the hang-up cut (RelaySession.close), or while a <Gather> turn's reply is still being
        made: built before that commit, the report would lack the turn, and with RECORD_TRANSCRIPTS=0 the commit
        would write back the history just emptied. Waited for off the request path, for at most the socket's lease
        or the turn's budget (a killed worker never closes its socket nor finishes its turn). The first look takes
        a Gather turn in flight from `record`, read by this callback (a turn is claimed before Twilio's final
        status; no read more for every call's end)."""
        tracking_id = record.tracking_id
        due_s = self._turn_still_due_s(tracking_id, record)
        if due_s > 0:
            spawn(self._call_over_once_committed, tracking_id, time.monotonic() + due_s)
        else:
            self.on_call_ended(tracking_id)

    def _call_over_once_committed(self, tracking_id: str, deadline: float) -> None:
        pause = RELAY_CLOSE_POLL_S
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(pause, left))
            pause = min(pause * COMMIT_WAIT_GROWTH, COMMIT_WAIT_MAX_POLL_S)
            if self._turn_still_due_s(tracking_id) <= 0:
                break
        self.on_call_ended(tracking_id)

    def _turn_still_due_s(self, tracking_id: str, read: CallRecord | None = None) -> float:
        """How long a turn of this call may still be committed, on any worker (0: none will be): a live relay
        socket's lease (its close commits the reply a hang-up cut), else what is left of the budget of a Gather
        turn still being answered (GatherTurns.due, in `read` when given, else read now; at most a turn's budget,
        whatever a clock says)."""
        try:
            if self.store.relay_socket_held(tracking_id):
                return self.settings.relay_socket_lease_s
            due = GatherTurns.due(read if read is not None else self.store.get_call(tracking_id))
        except Exception:  # noqa: BLE001  (the store is out: the report goes now, as before)
            log.warning("turn_commit_read_failed", tracking_id=tracking_id)
            return 0.0
        if due is None:
            return 0.0
        return min(due - time.time(), self.settings.gather_reply_timeout_s + COMMIT_MARGIN_S)

    def time_limit_s(self, workflow: Workflow) -> int:
        """Twilio's TimeLimit for a call of this flow: the flow's maxCallDuration shortens the operator's
        MAX_CALL_DURATION_S, never lengthens it."""
        return workflow.limits.time_limit_s(self.settings.max_call_duration_s)

    def inbound_call(self, workflow_id: str | None, call_sid: str | None, to: str | None,
                     from_number: str | None, base_url: str) -> CallRecord:
        """A Gather-flow webhook for a call we have no record of (it rang in, or was placed by an old URL): start one
        for it, and ask Twilio, off the request path (the caller waits for the greeting), for its status callbacks
        and our TimeLimit (watch_inbound)."""
        snapshot = self.store.get_workflow(workflow_id) if workflow_id else None
        workflow = Workflow.from_snapshot(snapshot) if snapshot else default_workflow()
        language = self.languages.resolve(workflow.default_language)
        if language is None:  # a flow stored before its language was checked: the caller hears the default one
            log.warning("call_language_unknown", workflow_id=workflow_id, language=workflow.default_language[:40],
                        spoken=self.languages.default.code)
            language = self.languages.default
        greeting = workflow.greeting or language.line("fallbackGreeting")
        record = CallRecord(tracking_id=new_tracking_id(), path="traditional", call_sid=call_sid,
                            workflow_id=workflow_id, workflow=workflow.to_snapshot(),
                            workflow_hash=workflow.version_hash, language=language.code, greeting=greeting,
                            to=to, from_number=from_number, current_node=workflow.entry_node_id(),
                            messages=[{"role": "assistant", "content": greeting}], meta={INBOUND_META: True})
        self.store.create_call(record)
        if call_sid:
            spawn(self.watch_inbound, record, base_url, self.time_limit_s(workflow))
        return record

    def watch_inbound(self, record: CallRecord, base_url: str, time_limit_s: int) -> bool:
        """Ask Twilio to send a call that rang in its final status to our status callback (so its end is recorded:
        the call log's outcome, the live calls, the ended call's meta cleanup) and to hang it up at `time_limit_s`,
        as a placed call is. A failure is logged (its class, no secrets) and False: the call goes on, its end
        unrecorded, its duration capped by its webhooks only (past_time_limit)."""
        try:
            if not self.twilio.configured:
                raise NotConfigured("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are not set")
            status = self.twilio.watch_call(record.call_sid,
                                            status_callback=status_callback_url(base_url, record.path,
                                                                                record.tracking_id),
                                            time_limit_s=time_limit_s)
        except Exception as exc:  # noqa: BLE001  (whatever Twilio or the network answered, the call goes on)
            log.warning("inbound_call_watch_failed", tracking_id=record.tracking_id, call_sid=record.call_sid,
                        error=type(exc).__name__, code=getattr(exc, "code", None))
            return False
        log.info("inbound_call_watched", tracking_id=record.tracking_id, call_sid=record.call_sid,
                 time_limit_s=time_limit_s, status=status)
        return True

    def ended_on_silence(self, record: CallRecord) -> None:
        """The caller stayed silent through a Gather call's re-prompt: the call ends (goodbye, hang-up) on silence,
        recorded as a relay call's is (meta endReason; the call log's outcome). A failed write is logged, and the
        goodbye is said all the same (never the apology)."""
        log.info("gather_silence_ending", tracking_id=record.tracking_id)
        self._write_end_reason(record, SILENCE_END, "silent through the re-prompt")

    def past_time_limit(self, record: CallRecord, workflow: Workflow) -> bool:
        """Whether a call that rang in has lasted past the cap a placed call of its flow gets (MAX_CALL_DURATION_S,
        shortened by the flow's maxCallDuration): the fallback for when Twilio did not take watch_inbound's
        TimeLimit."""
        if not (record.meta or {}).get(INBOUND_META):
            return False  # a placed call: Twilio keeps its TimeLimit
        return time.time() - record.created_at >= self.time_limit_s(workflow)

    def attach_call_sid(self, record: CallRecord, call_sid: str | None) -> CallRecord:
        if call_sid and record.call_sid != call_sid:
            return self.store.update_call(record.tracking_id, call_sid=call_sid) or record
        return record

    def try_resume(self, record: CallRecord | None, greeting: str, error_code: str | None = None,
                   error_message: str | None = None, handover: bool = False) -> CallRecord | None:
        """A relay session failed, or a stopping worker handed it over (`handover`): reconnect when that can help,
        with `greeting` spoken and kept in the history.

        Only a broken socket is worth a reconnect (no ErrorCode, or a network error); after a configuration
        error (bad voice, refused TwiML...) the same TwiML would fail again, so None: end with an apology.
        At most MAX_RESUMES reconnects of broken sockets per call, and MAX_HANDOVERS handovers besides. Every
        reconnect bumps `resume_count`, the new socket's claim generation (routes/relay.py RelayClaim).
        """
        if record is None:
            return None
        if error_code and error_code not in RECONNECTABLE_ERROR_CODES:
            log.error("relay_not_resumed", tracking_id=record.tracking_id, reason="configuration error",
                      error_code=error_code, error_message=(error_message or "")[:MAX_ERROR_TEXT_CHARS])
            return None
        handovers = int(((record.meta or {}).get(RECONNECTS_META) or {}).get("handover") or 0)
        if handover and handovers >= MAX_HANDOVERS:
            log.error("relay_not_resumed", tracking_id=record.tracking_id, reason="handover limit reached")
            return None
        if not handover and record.resume_count - handovers >= MAX_RESUMES:
            log.error("relay_not_resumed", tracking_id=record.tracking_id, reason="resume limit reached",
                      error_code=error_code)
            return None
        if handover:
            self.store.update_meta(record.tracking_id, add={RECONNECTS_META: {"handover": 1}})
        # The caller hears the greeting: it belongs in the history, so a barge-in trims it, not an older turn.
        messages = [*(record.messages or []), {"role": "assistant", "content": greeting}]
        resumed = self.store.update_call(record.tracking_id, resume_count=record.resume_count + 1,
                                         messages=messages[-MAX_KEPT_MESSAGES:]) or record
        log.warning("relay_resuming", tracking_id=record.tracking_id, attempt=resumed.resume_count,
                    handover=handover, error_code=error_code)
        return resumed

    def ended_by_error(self, record: CallRecord | None, why: str) -> None:
        """CallWeaver is ending this call with an apology (`why`): Twilio's final status will say only `completed`,
        so the call's meta says it ended on an error (call_report.call_outcome), never a caller's hang-up. A failed
        write is logged; the call ends anyway."""
        if record is not None:
            self._write_end_reason(record, ERROR_END, why)

    def _write_end_reason(self, record: CallRecord, reason: str, why: str) -> None:
        """Record the call's end reason unless one was recorded first (store.END_REASON_RULE). It only labels the
        call: a failed write (a full disk, a locked file) is logged, and the hang-up goes on."""
        self._change_end(record.tracking_id, end_reason_claimed(reason), reason=reason, why=why)

    def _change_end(self, tracking_id: str, change: MetaChange, **context: Any) -> tuple[dict | None, bool]:
        """One END_REASON_RULE write; a failed one is logged and (None, False): the call's end goes on without it."""
        try:
            return self.store.change_meta(tracking_id, change)
        except Exception:
            log.exception("end_reason_write_failed", tracking_id=tracking_id, **context)
            return None, False

    def fetch_status(self, call_sid: str) -> dict:
        """Twilio's view of a call plus, when we placed it, our tracking id and stored status history."""
        self._require_call_sid(call_sid)
        if not self.twilio.configured:
            raise NotConfigured("Twilio is not configured on the server: set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
        call = self.twilio.fetch_call(call_sid)
        record = self.find(None, call_sid)
        if record:
            call["trackingId"] = record.tracking_id
            call["statusHistory"] = [h["status"] for h in self.store.status_history(record.tracking_id)]
        return call

    @staticmethod
    def _require_call_sid(call_sid: str) -> None:
        if not CALL_SID.fullmatch(call_sid):
            raise CallRequestError("Invalid Call SID: expected CA followed by 32 hex characters")

    @property
    def end_call_wait_s(self) -> float:
        """How long an end-call's hang-up may be pending: a Twilio request's deadline, and the answer's write."""
        return self.twilio.timeout_s + END_CALL_WAIT_MARGIN_S

    def end_call(self, call_sid: str) -> str:
        """Hang up a call through Twilio (POST /api/end-call), with the call's own credentials when it has them;
        a call we placed is labelled ended_by_api (its end reason), since Twilio will report it `completed`.

        One hang-up per call (store.END_REASON_RULE): a request finding another one's hang-up answers as Twilio
        answered that one, waiting while it is asked; one asking for longer than a Twilio request's deadline died
        with its worker, and its hang-up is taken over."""
        self._require_call_sid(call_sid)
        record = self.find(None, call_sid)
        creds = self.credentials_for(record)
        if creds is None and not self.twilio.configured:
            raise NotConfigured("Twilio is not configured on the server: set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
        if record is None:
            return self.twilio.end_call(call_sid, credentials=creds)
        token = secrets.token_hex(8)
        while True:
            # Said before Twilio is asked: its final status callback (which reports the call) may come before its
            # answer. A call that already ended, or that our side is ending for a reason of its own, keeps its reason.
            meta, claimed = self._change_end(record.tracking_id,
                                             end_call_claimed(token, time.time(), self.end_call_wait_s),
                                             reason=API_END, why="POST /api/end-call")
            hang_up = (meta or {}).get(END_CALL_META)
            if claimed or not isinstance(hang_up, dict):
                break  # ours, or the store could not say: Twilio is asked
            if hang_up.get("status"):
                log.info("end_call_repeated", tracking_id=record.tracking_id, status=hang_up["status"])
                return str(hang_up["status"])
            time.sleep(END_CALL_POLL_S)  # another request is asking Twilio: its answer is this one's
        try:
            # The call's own credentials stay until Twilio's terminal status callback (signed with them) arrives.
            status = self.twilio.end_call(call_sid, credentials=creds)
        except Exception:
            if claimed:
                self._change_end(record.tracking_id, end_call_refused(token), why="Twilio refused the hang-up")
            raise
        if claimed:
            self._change_end(record.tracking_id, end_call_answered(token, status), why="Twilio took the hang-up")
        return status
