"""The call log: one row per call (paged, filtered in the store) and one call's turn-by-turn timeline.

Every figure comes from the store's measured turns; a row is built from one page of calls and their turns, read
in two round trips whatever the page size. Phone numbers are masked unless MASK_PHONE_NUMBERS=0.
"""
from __future__ import annotations

import time
from typing import Any

from .call_report import call_outcome
from .engine.metrics import LIVE_CALL_HORIZON_S, NO_FIRST_TOKEN, percentile, turn_view
from .store import CallRecord, Store
from .units import SECONDS_PER_HOUR

MAX_PAGE_SIZE = 200
IN_PROGRESS = "in_progress"
UNKNOWN = "unknown"  # no final status from Twilio within LIVE_CALL_HORIZON_S: the call is no longer counted as live
NO_FINAL_STATUS = (f"no final status from Twilio within {LIVE_CALL_HORIZON_S // SECONDS_PER_HOUR} h of the start "
                   "(a lost status callback)")
NO_TRANSCRIPT_RECORDED = "RECORD_TRANSCRIPTS=0: timings only"
TRANSCRIPT_PURGED = "transcript purged after TRANSCRIPT_RETENTION_DAYS"


def mask_phone(number: str | None, mask: bool = True) -> str | None:
    """`+15551234567` → `•••••••4567`: enough to tell calls apart, not enough to dial."""
    if not number or not mask:
        return number
    digits = sum(ch.isdigit() for ch in number)
    if digits <= 4:
        return "•" * len(number)
    return "•" * (digits - 4) + "".join(ch for ch in number if ch.isdigit())[-4:]


def outcome_of(record: CallRecord, turns: list[dict], now: float | None = None) -> str:
    """How the call ended (call_report.call_outcome); in_progress while it has not, or unknown once it is too old
    to be live (the dashboard's LIVE_CALL_HORIZON_S) and Twilio never said how it ended."""
    if record.ended_at is None:
        return UNKNOWN if lost_track(record, now) else IN_PROGRESS
    return call_outcome(record.status, turns, record.meta)


def lost_track(record: CallRecord, now: float | None = None) -> bool:
    """Not ended, yet started longer ago than a call stays live: its final status callback never arrived."""
    return record.ended_at is None and record.created_at < (time.time() if now is None else now) - LIVE_CALL_HORIZON_S


def call_row(record: CallRecord, turns: list[dict], *, mask: bool, now: float | None = None) -> dict[str, Any]:
    """One call-log row: status, path, language, duration, turns, p50 first token, failovers, cache hits, outcome."""
    now = time.time() if now is None else now
    lost = lost_track(record, now)
    end = record.ended_at if record.ended_at is not None else now
    first_token = [float(t["firstTokenMs"]) for t in turns if t.get("firstTokenMs") is not None]
    reasons = {"durationS": NO_FINAL_STATUS} if lost else {}
    if not first_token:
        reasons["firstTokenP50Ms"] = NO_FIRST_TOKEN if turns else "no caller turns"
    return {
        "trackingId": record.tracking_id, "callSid": record.call_sid, "status": record.status,
        "path": record.path, "language": record.language, "workflowId": record.workflow_id,
        "to": mask_phone(record.to, mask), "from": mask_phone(record.from_number, mask),
        "startedAt": record.created_at, "endedAt": record.ended_at,
        "durationS": None if lost else round(max(0.0, end - record.created_at), 3),
        "live": record.ended_at is None and not lost,
        **({"reasons": reasons} if reasons else {}),
        "currentNode": record.current_node, "turns": len(turns),
        "firstTokenP50Ms": percentile(first_token, 50),
        "failovers": sum(len(t.get("failovers") or []) for t in turns),
        "cacheHits": sum(1 for t in turns if t.get("cacheHit")),
        "outcome": outcome_of(record, turns, now),
    }


def call_page(store: Store, *, limit: int = 25, offset: int = 0, status: str | None = None,
              path: str | None = None, language: str | None = None, mask: bool = True) -> dict[str, Any]:
    """Newest calls first; the filters run in the store, and only this page's turns are read."""
    records, total = store.call_page(limit, offset, status=status, path=path, language=language)
    turns = store.turns_of([r.tracking_id for r in records])
    now = time.time()
    return {"total": total, "limit": limit, "offset": offset,
            "filters": {"status": status, "path": path, "language": language},
            "calls": [call_row(r, turns.get(r.tracking_id, []), mask=mask, now=now) for r in records]}


def timeline_turn(turn: dict, said: dict | None) -> dict[str, Any]:
    """A measured turn with what the caller said and heard next to it (when the transcript is kept)."""
    view = turn_view(turn)
    view["toolNames"] = list(turn.get("toolNames") or [])
    view["said"] = said.get("said") if said else None
    view["heard"] = said.get("heard") if said else None
    view["spoken"] = said.get("spoken") if said else None
    view["toolCalls"] = said.get("toolCalls") if said else None
    return view


def call_detail(store: Store, tracking_id: str, *, mask: bool = True,
                record_transcripts: bool = True) -> dict[str, Any] | None:
    """One call's row, its status history and its timeline, turn by turn."""
    record = store.get_call(tracking_id)
    if record is None:
        return None
    turns = store.turns(tracking_id)
    for index, turn in enumerate(turns):
        turn.setdefault("index", index)
    transcript = list(record.transcript or [])
    reason = None
    if not transcript and turns:
        if (record.meta or {}).get("transcriptPurgedAt"):
            reason = TRANSCRIPT_PURGED
        elif not record_transcripts:
            reason = NO_TRANSCRIPT_RECORDED
        else:
            reason = "no transcript was recorded for this call"
    return {
        "call": call_row(record, turns, mask=mask),
        "workflowName": record.workflow.get("name") if isinstance(record.workflow, dict) else None,
        "statusHistory": [{"status": h["status"], "sequence": h["sequence"], "receivedAt": h["receivedAt"]}
                          for h in store.status_history(tracking_id)],
        "transcript": {"kept": bool(transcript), "reason": reason},
        "turns": [timeline_turn(t, transcript[i] if i < len(transcript) else None) for i, t in enumerate(turns)],
    }
