"""The call store: state that outlives one request (call records, statuses, turns, workflows)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

from callweaver.config import DEFAULT_REDIS_KEY_PREFIX
from callweaver.units import MAX_CALL_DURATION_LIMIT_S

__all__ = [
    "CALLS_ENDED_COUNTER",
    "TERMINAL_STATUSES",
    "CALL_STATUSES",
    "CALL_LOG_FIELDS",
    "CALL_LOG_META_KEYS",
    "END_REASON_META",
    "GATHER_REPLY_META",
    "CARRIED_OVER_META",
    "SAID_META_KEYS",
    "LLM_ACCOUNT_META",
    "PURGED_META_KEYS",
    "ERROR_END",
    "API_END",
    "END_CALL_META",
    "PENDING_ACTION_META",
    "QUEUED_END_REASON_META",
    "MetaChange",
    "end_reason_claimed",
    "end_call_pending",
    "end_call_abandoned",
    "closing_action_dropped",
    "END_CALL_POLL_S",
    "end_call_claimed",
    "end_call_answered",
    "end_call_lapsed",
    "end_call_refused",
    "SILENCE_END",
    "counter_series",
    "CallRecord",
    "ReportClaim",
    "Store",
    "StoreError",
    "StoreFull",
    "TURN_FIELDS",
    "WorkflowSnapshots",
    "build_store",
    "call_is_live",
    "merge_meta",
]

# Twilio CallStatus values after which no further audio happens on the call.
TERMINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
# Every CallStatus Twilio reports, in a call's order (the call log's status filter accepts these).
CALL_STATUSES = ("queued", "initiated", "ringing", "in-progress", "completed", "busy", "no-answer", "canceled", "failed")
# The cumulative counter of ended calls, by final status: the store adds 1 in the write that ends a call.
CALLS_ENDED_COUNTER = "callweaver_calls"


def counter_series(name: str, labels: Mapping[str, str]) -> str:
    """A stored counter's key: a metric sample's name and labels (order-free); opaque to the store."""
    return json.dumps([name, sorted(labels.items())], separators=(",", ":"))


class StoreError(Exception):
    """A backend failure (unreachable, locked, corrupt); callers degrade instead of dropping the call."""


class StoreFull(StoreError):
    """The backend refuses writes for want of space (Redis at `maxmemory` with `noeviction`, a full disk): unlike
    an outage it lasts until space is freed (retention, expiring cache entries, the operator); reads still work."""


@dataclass
class CallRecord:
    """One call as every worker sees it; any worker or instance may serve its next webhook."""

    tracking_id: str
    path: str = "optimized"  # "optimized" (ConversationRelay) | "traditional" (Gather)
    call_sid: str | None = None
    workflow_id: str | None = None
    # Normalised workflow snapshot, opaque to the store, shared by the records of one version: never mutate it.
    workflow: dict | None = None
    workflow_hash: str | None = None  # the snapshot's version hash: one hash, one snapshot (WorkflowSnapshots)
    language: str = "en-US"
    greeting: str | None = None
    to: str | None = None
    from_number: str | None = None
    status: str = "queued"  # the status with the highest SequenceNumber seen so far
    status_sequence: int = -1
    current_node: str | None = None
    variables: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)  # history as the caller heard it
    transcript: list[dict] = field(default_factory=list)  # per turn, in turn order: said / heard / tool calls
    resume_count: int = 0
    credentials: str | None = None  # opaque encrypted blob, never plain secrets
    created_at: float = field(default_factory=time.time)
    updated_at: float = 0.0  # 0.0 means "same as created_at"
    ended_at: float | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.updated_at:
            self.updated_at = self.created_at

    def to_dict(self) -> dict:
        """A JSON-safe deep copy; the stored form of the record."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CallRecord:
        """Rebuild from `to_dict` output; unknown keys are ignored so older workers read newer rows."""
        known = {key: value for key, value in data.items() if key in CALL_RECORD_FIELDS}
        return cls(**known)


@dataclass(frozen=True)
class ReportClaim:
    """A worker's hold on one call's due end-of-call report (the report outbox): the delivery attempts counted so far
    (a resumed delivery continues the count) and who held it before (None: nobody, it was just recorded)."""

    attempts: int
    holder_before: str | None = None


CALL_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(CallRecord))
# What a call-log row needs: never the workflow snapshot, history, transcript or credentials (large or private).
CALL_LOG_FIELDS = ("tracking_id", "path", "call_sid", "workflow_id", "language", "to", "from_number", "status",
                   "current_node", "created_at", "updated_at", "ended_at")
# The call meta key saying why CallWeaver ended an answered call itself, and its values: Twilio reports such a call
# `completed`, like one the caller hung up.
END_REASON_META = "endReason"
SILENCE_END = "silence"  # the caller stayed silent after a re-prompt
# An apology, then a hang-up: the session failed and was not reconnected, a refused transfer, a failed TwiML webhook.
ERROR_END = "error"
API_END = "ended_by_api"  # POST /api/end-call hung it up (the web app's end button)
# A committed closing turn's action (its end or transfer), removed only if the caller talks over its line (the
# action then never fires): the call is ending on its own, at its end node or in a transfer (call_report.call_outcome
# reads the turn), which end-call leaves as it is.
PENDING_ACTION_META = "pendingAction"
# The call's one hang-up through Twilio (POST /api/end-call): {"by": the asking request's token, "at": when} while
# Twilio is asked, then with "status": Twilio's answer. A second end-call answers from it instead of asking Twilio
# again.
END_CALL_META = "endCall"
# An end reason recorded while API_END stood but Twilio had not yet taken the hang-up: it takes API_END's place if
# Twilio refuses (END_REASON_RULE).
QUEUED_END_REASON_META = "endReasonQueued"
# Meta keys holding words said on the call: a Gather call's latest answer (its TwiML, gather_turns.py) and what the
# caller said while the call was handed over (relay_session.py). The call's end removes them (lifecycle); emptying its
# transcript (purge_transcripts) does too, for a call whose end was never recorded.
GATHER_REPLY_META = "gatherReply"
CARRIED_OVER_META = "carriedOver"
SAID_META_KEYS = (GATHER_REPLY_META, CARRIED_OVER_META)
LLM_ACCOUNT_META = "llm"  # the call's own LLM account from its request, sealed like its credentials
# What emptying a transcript (purge_transcripts) drops from the meta of an expired call, with its request
# credentials: the words kept there and its own LLM account. The call's end removes them (lifecycle); a call whose
# end was never recorded keeps them until the purge, which drops them even where there is no transcript to empty.
PURGED_META_KEYS = (*SAID_META_KEYS, LLM_ACCOUNT_META)
# The meta keys a call-log row also carries: how the call ended depends on them (call_report.call_outcome).
CALL_LOG_META_KEYS = (END_REASON_META,)
# Fields update_call may write: the tracking id is the identity, never rewritten; `meta` has several writers at
# once (turns, hang-up accounting, the terminal status), so it is only ever merged key by key (update_meta).
UPDATABLE_FIELDS = CALL_RECORD_FIELDS - {"tracking_id", "meta"}
# Fields commit_turn may write: what a turn changes. Never the ones other writers own or that move indexes and
# counters (status, call sid, times), and never the transcript, which a turn appends to instead.
TURN_FIELDS = frozenset({"messages", "current_node", "variables", "language"})
# A meta key update_meta may name: one top-level name, never a path.
META_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_update_fields(fields: dict[str, Any], allowed: frozenset[str] = UPDATABLE_FIELDS) -> None:
    """Reject misspelt field names up front, so a typo never silently writes nothing."""
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"not updatable CallRecord fields: {sorted(unknown)}")


def merge_meta(meta: Mapping[str, Any] | None, changes: Mapping[str, Any] | None = None,
               remove: Iterable[str] = (), add: Mapping[str, Mapping[str, float]] | None = None,
               first: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """`meta` with `changes` set, `remove` deleted, `add[key][name]` added to the counts in `meta[key]` and
    `first[key][name]` set in `meta[key]` only where it has no `name` yet (the first writer keeps it: writing the same
    again, as a write retried after its reply was lost, changes nothing); the backends apply it inside one atomic
    write, so writers of different keys never undo each other."""
    merged = dict(meta or {})
    for key in merged.keys() & set(remove):
        del merged[key]
    merged.update(changes or {})
    for key, increments in (add or {}).items():
        counts = dict(merged.get(key) or {})
        for name, value in increments.items():
            counts[name] = (counts.get(name) or 0) + value
        merged[key] = counts
    for key, values in (first or {}).items():
        merged[key] = {**values, **(merged.get(key) or {})}
    return merged


# END_REASON_RULE: how a call's end is recorded when several things end it at once. Each writer applies its change
# below inside one atomic write (Store.change_meta), so no interleaving of workers or instances breaks it.
# - The first end reason recorded wins: a later one (an error after the end button, a silence goodbye after an
#   apology) never overwrites it. A closing turn (goodbye, transfer) whose line is playing (PENDING_ACTION_META)
#   came first too: end-call then records nothing, and the outcome is the turn's; but if the caller talks over that
#   line (its action never fires), end-call's hang-up is what ends the call: API_END (closing_action_dropped).
# - POST /api/end-call records API_END (if no reason stands and the call has not ended) before asking Twilio, whose
#   final status callback may come before its answer; and it holds the call's one hang-up (END_CALL_META). Only the
#   request holding it withdraws it, and only when Twilio refused: the reason recorded meanwhile
#   (QUEUED_END_REASON_META) then takes API_END's place. Once Twilio took the hang-up, API_END stands. A request
#   still asking past Twilio's deadline (end_call_abandoned) died with its worker: a call still live then was never
#   hung up by it, so the next end reason withdraws API_END as a refusal would, and the next end-call takes over;
#   so does Twilio's final status saying the call ended after that deadline (end_call_lapsed).
# - Twilio's final status is the caller's truth: busy, no-answer, canceled and failed outrank any end reason
#   (call_report.call_outcome), and an ended call stays ended: a late non-terminal callback, whatever its
#   SequenceNumber, is kept in the history but never becomes the call's status (append_status).
END_CALL_POLL_S = 0.05  # how often a reader waiting on a pending end-call's hang-up (end_call_pending) reads the store
MetaChange = Callable[[dict, bool], "dict | None"]  # (meta, whether the call has ended) -> new meta, or None: no write


def end_call_pending(meta: Mapping[str, Any] | None) -> bool:
    """Whether an end-call request is asking Twilio to hang the call up: its API_END stands or falls with the
    answer (END_REASON_RULE), so the call's outcome is not settled yet."""
    hang_up = (meta or {}).get(END_CALL_META)
    return isinstance(hang_up, dict) and not hang_up.get("status")


def end_call_abandoned(meta: Mapping[str, Any] | None, now: float) -> bool:
    """Whether a pending end-call's request is past its deadline (Twilio's, and the answer's write) at `now` (epoch
    seconds): it died with its worker and will never record Twilio's answer (END_REASON_RULE)."""
    return end_call_pending(meta) and now > float((meta or {})[END_CALL_META].get("until") or 0)


def end_reason_claimed(reason: str, now: float | None = None) -> MetaChange:
    """Record `reason` as how our side ended the call, unless a reason was recorded first (END_REASON_RULE).
    `now`: epoch seconds, for an abandoned end-call (the clock when None)."""
    def change(meta: dict, ended: bool) -> dict | None:
        current = meta.get(END_REASON_META)
        if current is None:
            return {**meta, END_REASON_META: reason}
        if current == API_END and end_call_pending(meta):
            if not ended and end_call_abandoned(meta, time.time() if now is None else now):
                # The call went on past the hang-up's deadline: Twilio never took it. Withdrawn as if refused.
                freed = end_call_refused(str(meta[END_CALL_META].get("by")))(meta, ended)
                if freed is not None:
                    return freed if freed.get(END_REASON_META) is not None else {**freed, END_REASON_META: reason}
            if QUEUED_END_REASON_META not in meta:
                return {**meta, QUEUED_END_REASON_META: reason}  # Twilio may yet refuse end-call's hang-up
        return None
    return change


def closing_action_dropped(now: float | None = None) -> MetaChange:
    """The caller talked over a closing line: its end or transfer never fires (PENDING_ACTION_META and its
    destination go). An end-call that left the call to that line (its hang-up held or taken, no reason recorded)
    is then what ends the live call: API_END, withdrawn if Twilio refuses it (END_REASON_RULE). `now`: epoch
    seconds, for an abandoned end-call (the clock when None)."""
    def change(meta: dict, ended: bool) -> dict | None:
        dropped = {key: value for key, value in meta.items() if key not in (PENDING_ACTION_META, "destination")}
        if (meta.get(END_CALL_META) is not None and meta.get(END_REASON_META) is None and not ended
                and not end_call_abandoned(meta, time.time() if now is None else now)):
            dropped[END_REASON_META] = API_END
        return dropped
    return change


def end_call_claimed(token: str, now: float, abandoned_s: float) -> MetaChange:
    """End-call's request `token` takes the call's one hang-up at `now` (epoch seconds), and records API_END when the
    call has not ended and is not ending for a reason of its own (an end reason, a closing line playing); no write
    while another request holds the hang-up, unless that request has been asking for over `abandoned_s` (it died
    with its worker: its hang-up is taken over). END_REASON_RULE."""
    def change(meta: dict, ended: bool) -> dict | None:
        hang_up = meta.get(END_CALL_META)
        if isinstance(hang_up, dict) and hang_up.get("by") == token:
            # Its own claim: the write was sent again after its reply was lost (a Redis reconnect replays the WATCH
            # and this change on what it wrote), so it is still this request's.
            return meta
        if hang_up is not None and not end_call_abandoned(meta, now):
            return None
        claimed = {**meta, END_CALL_META: {"by": token, "at": now, "until": now + abandoned_s}}
        if not ended and meta.get(END_REASON_META) is None and meta.get(PENDING_ACTION_META) is None:
            claimed[END_REASON_META] = API_END
        return claimed
    return change


def end_call_lapsed(ended_at: float | None) -> MetaChange:
    """Twilio's final status says the call ended at `ended_at` (epoch seconds; None: it did not say): after a pending
    end-call's deadline, that request died with its worker and its hang-up is not what ended the call. Withdrawn as
    a refusal would be (END_REASON_RULE)."""
    def change(meta: dict, ended: bool) -> dict | None:
        if ended_at is None or not end_call_abandoned(meta, ended_at):
            return None
        return end_call_refused(str(meta[END_CALL_META].get("by")))(meta, ended)
    return change


def end_call_answered(token: str, status: str) -> MetaChange:
    """Twilio took the hang-up `token` asked for: its answer is kept for a repeated end-call, and API_END stands."""
    def change(meta: dict, ended: bool) -> dict | None:
        hang_up = meta.get(END_CALL_META)
        if not (isinstance(hang_up, dict) and hang_up.get("by") == token):
            return None
        answered = {key: value for key, value in meta.items() if key != QUEUED_END_REASON_META}
        answered[END_CALL_META] = {**hang_up, "status": status}
        return answered
    return change


def end_call_refused(token: str) -> MetaChange:
    """Twilio refused the hang-up `token` asked for: the hang-up is free again, and API_END gives way to the reason
    recorded meanwhile, or to none (the caller's own hang-up)."""
    def change(meta: dict, ended: bool) -> dict | None:
        hang_up = meta.get(END_CALL_META)
        if not (isinstance(hang_up, dict) and hang_up.get("by") == token):
            return None
        refused = {key: value for key, value in meta.items() if key not in (END_CALL_META, QUEUED_END_REASON_META)}
        if meta.get(END_REASON_META) == API_END:
            refused.pop(END_REASON_META)
            if meta.get(QUEUED_END_REASON_META) is not None:
                refused[END_REASON_META] = meta[QUEUED_END_REASON_META]
        return refused
    return change


def check_meta_keys(changes: Mapping[str, Any] | None, remove: Iterable[str],
                    add: Mapping[str, Mapping[str, float]] | None,
                    first: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Reject a meta key that is not one plain top-level name before writing anything."""
    bad = [key for key in [*(changes or {}), *remove, *(add or {}), *(first or {})]
           if not META_KEY.fullmatch(str(key))]
    if bad:
        raise ValueError(f"meta keys must be plain top-level names: {bad}")


def unended_created_before(older_than: float) -> float:
    """Calls with no recorded end created before this time had ended by `older_than` all the same: Twilio ends
    every call within MAX_CALL_DURATION_LIMIT_S. Their terminal status callback was lost (Twilio does not retry one
    refused during a store outage), and without this they would never be purged nor their transcripts emptied."""
    return older_than - MAX_CALL_DURATION_LIMIT_S


def stored_turn(tracking_id: str, turn: dict) -> dict:
    """A turn row as stored: stamped with its call and its time."""
    stored = dict(turn)
    stored["trackingId"] = tracking_id
    stored["at"] = float(stored.get("at") or time.time())
    return stored


class WorkflowSnapshots:
    """Workflow snapshots stored once per version, so a call's stored form holds only the version hash.

    A snapshot is 11-15 KB and every call of a flow carries the same one; embedded in each call it was decoded and
    re-encoded by every webhook of the call and rewritten by every turn commit. A version hash names exactly one
    snapshot (sha256 of its canonical form), so each store instance (one per worker) keeps the encoded text and the
    decoded snapshot by hash: a worker encodes and decodes a version once. A call whose stored form still embeds its
    snapshot (written before this, or without a hash) reads as it is."""

    LIMIT = 256  # versions kept per worker; a miss costs one read of the store

    def __init__(self, dumps: Callable[[Any], str], loads: Callable[[str | bytes], Any]) -> None:
        self._dumps, self._loads = dumps, loads
        self._encoded: OrderedDict[str, str] = OrderedDict()
        self._decoded: OrderedDict[str, dict] = OrderedDict()

    def detach(self, data: dict) -> tuple[dict, tuple[str, str] | None]:
        """A record's dict as stored, without its snapshot when it has a version hash; and (hash, snapshot JSON)
        for the backend to store once (insert-if-absent, in the same write as the call)."""
        version, snapshot = data.get("workflow_hash"), data.get("workflow")
        if not version or not isinstance(snapshot, dict):
            return data, None
        encoded = self._encoded.get(version)
        if encoded is None:
            encoded = self._remember(self._encoded, version, self._dumps(snapshot))
        return {name: value for name, value in data.items() if name != "workflow"}, (version, encoded)

    def attach(self, data: dict, fetch: Callable[[str], str | bytes | None]) -> dict:
        """Put the snapshot back into a stored dict that references one; `fetch` reads a version's JSON on a miss."""
        version = data.get("workflow_hash")
        if "workflow" in data or not version:
            return data
        snapshot = self._decoded.get(version)
        if snapshot is None:
            encoded = self._encoded.get(version) or fetch(version)
            snapshot = None if encoded is None else self._remember(self._decoded, version, self._loads(encoded))
        data["workflow"] = snapshot
        return data

    def _remember(self, cache: OrderedDict, version: str, value: Any) -> Any:
        cache[version] = value
        while len(cache) > self.LIMIT:
            cache.popitem(last=False)
        return value


@runtime_checkable
class Store(Protocol):
    """What the engine and the routes need from persistent state; SQLite and Redis both provide it."""

    def create_call(self, record: CallRecord, workflow_id: str | None = None) -> None:
        """Insert a new call; StoreError if the tracking id already exists. With `workflow_id`, the call's workflow
        snapshot is also saved as that id's latest (as save_workflow does), in the same write."""
        ...

    def get_call(self, tracking_id: str) -> CallRecord | None: ...

    def find_tracking_id(self, call_sid: str) -> str | None:
        """Map a Twilio CallSid to our tracking id (webhooks may carry only the CallSid)."""
        ...

    def update_call(self, tracking_id: str, **fields: Any) -> CallRecord | None:
        """Write only the named fields, atomically; returns the new record or None if unknown."""
        ...

    def record_placed(self, tracking_id: str, call_sid: str, status: str) -> bool:
        """Twilio accepted the call: store its CallSid and status (as update_call would) in one write that reads
        nothing back, make-call's last write. The status only while no status callback has been recorded (Twilio
        may call back before its REST answer arrives; the callback's status is newer). False (nothing written)
        when the call is unknown."""
        ...

    def update_meta(self, tracking_id: str, changes: Mapping[str, Any] | None = None, *,
                    remove: Iterable[str] = (), add: Mapping[str, Mapping[str, float]] | None = None,
                    first: Mapping[str, Mapping[str, Any]] | None = None) -> dict | None:
        """Merge into the call's `meta` in ONE atomic write (see merge_meta): set `changes`, delete `remove`, add
        to counts in `add`, set `first`'s entries where absent; other keys, whoever wrote them, are kept. With
        change_meta, the only way meta changes after creation.
        Returns the meta now stored, or None (and writes nothing) when the call is unknown."""
        ...

    def change_meta(self, tracking_id: str, change: MetaChange) -> tuple[dict | None, bool]:
        """Apply `change` to the call's meta atomically (no other writer in between), given the meta and whether the
        call has ended; `change` returns the new meta, or None to leave it. Returns (meta now, whether `change`
        wrote it); (None, False) when the call is unknown. For writes that depend on what is stored
        (END_REASON_RULE)."""
        ...

    def append_status(
        self,
        tracking_id: str,
        status: str,
        sequence: int | None,
        payload: dict,
        received_at: float | None = None,
        report_holder: str | None = None,
        report_lease_s: float = 0.0,
    ) -> bool:
        """Record a status callback; the highest SequenceNumber wins, except that once the call has ended only a
        terminal status may become current (END_REASON_RULE). True if it became current. With `report_holder`, the
        write that ends the call also records its end-of-call report as due in the report outbox (no attempt yet,
        held by `report_holder` for `report_lease_s`): a worker stopped before it could deliver cannot lose it."""
        ...

    def status_history(self, tracking_id: str) -> list[dict]: ...

    def append_turn(self, tracking_id: str, turn: dict, counters: Mapping[str, float] | None = None) -> int:
        """Append one conversation turn and add `counters` (series key → increment) in the same write, so the
        cumulative metrics always agree with the turns stored; returns the turn's index (0, 1, 2, ...)."""
        ...

    def commit_turn(self, tracking_id: str, fields: dict[str, Any], turn: dict,
                    counters: Mapping[str, float] | None = None, transcript_entry: dict | None = None) -> int | None:
        """A finished turn in ONE write that never reads the record back: set `fields` (TURN_FIELDS only), append
        `transcript_entry` to the transcript, append the turn row and add `counters`. The record's other fields
        (its workflow snapshot above all) are neither decoded nor re-encoded by Python. Returns the turn's index,
        or None (and writes nothing) when the call is unknown."""
        ...

    def amend_last_turn(self, tracking_id: str, changes: Mapping[str, Any],
                        expect: Mapping[str, Any] | None = None) -> bool:
        """Correct the call's last turn row with `changes` (e.g. a closing action dropped after its turn was
        written), wherever turns are read; its counters stay. False when the call has no turn, or when the last row
        does not hold `expect`'s values (it is not the turn meant: that turn's own write failed)."""
        ...

    def add_counters(self, counters: Mapping[str, float]) -> None:
        """Add to cumulative counters in one write, for a cost no turn row carries (e.g. unanswered speculations)."""
        ...

    def counters(self) -> dict[str, float]:
        """Every cumulative counter since the store began (series key → value); never decreases. Besides what
        append_turn adds, the write that ends a call (terminal status or ended_at set) counts it by status."""
        ...

    def turns(self, tracking_id: str) -> list[dict]: ...

    def recent_turns(self, since: float) -> list[dict]:
        """All calls' turns with at >= since, oldest first, each with its `index` in its call (rolling windows)."""
        ...

    def list_calls(self, since: float = 0.0, active_only: bool = False) -> list[CallRecord]: ...

    def call_page(self, limit: int, offset: int = 0, *, status: str | None = None, path: str | None = None,
                  language: str | None = None) -> tuple[list[CallRecord], int]:
        """Newest calls first, one page, with only CALL_LOG_FIELDS and CALL_LOG_META_KEYS filled; and how many calls
        match in all."""
        ...

    def turns_of(self, tracking_ids: list[str]) -> dict[str, list[dict]]:
        """Several calls' turns in one round trip (a call-log page)."""
        ...

    def live_calls(self, since: float = 0.0) -> list[CallRecord]:
        """Calls created at or after `since` that have not ended; reads only those, not every call."""
        ...

    def count_calls(self, since: float = 0.0) -> int:
        """How many calls were created at or after `since`, without reading them."""
        ...

    def count_live_calls(self, since: float = 0.0) -> int:
        """How many of `live_calls(since)` there are, without reading them (public figures count them per request)."""
        ...

    def save_workflow(self, workflow_id: str, snapshot: dict) -> None: ...

    def get_workflow(self, workflow_id: str) -> dict | None: ...

    def read_shared(self, key: str) -> dict | None:
        """A small record every worker (SQLite) or instance (Redis) sees, e.g. a provider's circuit; one read."""
        ...

    def update_shared(self, key: str, change: Callable[[dict | None], dict | None]) -> tuple[dict | None, bool]:
        """Apply `change` to the record atomically (no other writer in between); `change` returns the new
        record, or None to leave it as it is. Returns (record now, whether `change` wrote it)."""
        ...

    def claim_relay_socket(self, tracking_id: str, owner: str, generation: int, lease_s: float) -> bool:
        """Make `owner` the one live relay socket of a call, for `lease_s`; False while another owner holds it.

        A claim from a newer `generation` (the call's resume count: Twilio reported the old socket failed)
        replaces an older one at once; otherwise a claim frees only when released or when its lease runs out
        (a killed worker never releases).
        """
        ...

    def renew_relay_socket(self, tracking_id: str, owner: str, lease_s: float) -> bool:
        """Extend the owner's lease; False if the claim is no longer this owner's."""
        ...

    def release_relay_socket(self, tracking_id: str, owner: str) -> None:
        """Drop the claim if `owner` still holds it."""
        ...

    def relay_socket_held(self, tracking_id: str) -> bool:
        """Whether a live relay socket holds the call: a claim not released and within its lease."""
        ...

    def claim_report(self, tracking_id: str, holder: str, lease_s: float, *, attempt: bool = False,
                     create: bool = False) -> ReportClaim | None:
        """Hold the call's due report for `holder` until `lease_s` from now, counting one more delivery attempt when
        `attempt`, in one atomic write: only while `holder` already holds it or its lease has run out (a stopped
        worker's). None when another holder's lease runs, or no report is due (delivered, given up, purged with its
        call; `create` records it then instead, with this claim)."""
        ...

    def due_reports(self, now: float, limit: int) -> list[str]:
        """Up to `limit` tracking ids of due reports whose lease ran out by `now` (epoch seconds), oldest first:
        what a worker picks up from a stopped one. An indexed read of those only."""
        ...

    def finish_report(self, tracking_id: str) -> None:
        """The report was delivered, rejected or given up: it is no longer due."""
        ...

    def ping(self) -> float:
        """Round trip to the backend in ms; StoreError when it is unreachable."""
        ...

    def memory(self) -> dict | None:
        """A memory-bound backend's use, limit and eviction policy (Redis: usedBytes, maxBytes with 0 for none,
        policy), for /health; None for one bound by its disk (SQLite)."""
        ...

    def purge(self, older_than: float) -> int:
        """Delete calls that ended before this epoch (or never recorded an end and were created more than
        MAX_CALL_DURATION_LIMIT_S before it: unended_created_before), with their turns, statuses and any report
        still due (a report is built from its call: none is sent for a call no longer stored); returns the
        count. Then the workflow versions no remaining call references go; a call created meanwhile never ends up
        without its version (it is seen and keeps it, or stores it again). The flow saved under each id stays."""
        ...

    def purge_transcripts(self, older_than: float) -> int:
        """Empty the history and transcript of calls that ended before this epoch (or never recorded an end: as
        purge), timings staying; returns the count. Those calls also lose their request credentials and
        PURGED_META_KEYS, transcript or not (their terminal status, which removes them, may have been lost)."""
        ...

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the named lease for ttl_s if nobody holds it: True for exactly one taker per period, across every
        worker and instance sharing the store (periodic jobs run once per store, not once per worker)."""
        ...


def build_store(db_path: str, redis_url: str | None = None, key_prefix: str = DEFAULT_REDIS_KEY_PREFIX) -> Store:
    """Redis when a URL is configured (shared by many instances), else SQLite (shared by one machine's workers)."""
    # Imported here: the backends import this module, and a SQLite-only deploy never loads redis.
    if redis_url:
        from callweaver.store.redis import RedisStore

        return RedisStore(redis_url, key_prefix=key_prefix)
    from callweaver.store.sqlite import SQLiteStore

    return SQLiteStore(db_path)


def call_is_live(record: CallRecord | None) -> bool:
    """Whether a call may still have audio: known, not ended, no terminal status."""
    return record is not None and record.ended_at is None and record.status not in TERMINAL_STATUSES


def row_holds(row: Mapping[str, Any], expect: Mapping[str, Any] | None) -> bool:
    """Whether a stored row has each of `expect`'s values (no expectation: any row)."""
    return not expect or all(row.get(key) == value for key, value in expect.items())
