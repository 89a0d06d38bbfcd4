"""A traditional (<Gather>) call's turns as Twilio delivers them: at least once, not exactly once.

Twilio retries a webhook whose answer it did not get (its connection overrides: a retry count and a policy that may
include read timeouts and 5xx answers), with the same URL and the same form. Each <Gather action> therefore names the
turn it will answer (`turn=N`, signed with the URL): the first request for a turn claims it, and its TwiML is kept
with the call, so a retry is answered with exactly what Twilio missed instead of running the turn again (a second
LLM request, the caller's words stored twice, the flow moved on twice). A retry that arrives while the first attempt
is still running waits for that answer.

Only the latest turn's answer is kept (Twilio never retries an older one: the next turn exists only because it got
the answer), in the call's meta, until the call ends (the terminal status callback removes it with the other
per-call secrets, lifecycle.record_status; an answer finished after that goes at once, `remember`). A claim also
says by when its turn will be committed (IN_FLIGHT_META): that outlives the final status, whose report waits for it."""
from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from .store import GATHER_REPLY_META, CallRecord, Store, StoreError, call_is_live

log = structlog.get_logger()

TURN_PARAM = "turn"          # the action URL's query parameter naming the turn a Gather answers
REPLY_META = GATHER_REPLY_META  # meta: {"turn": N, "said": digest, "twiml": "<Response>…"} — the latest answer
# meta: {"N": the mark of the request that claimed turn N}, written only where turn N has none (Store.update_meta's
# `first`): a claim written again after its reply was lost (redis-py sends a write once more when its connection
# fails) is still that request's, where a count would have said 2 and sent it waiting for itself.
CLAIMS_META = "gatherTurnClaims"
ANSWERED_CLAIM = "answered"  # the claim `remember` leaves: no request's mark, so a request still claiming waits
# An earlier release's claims (counts): a turn one of its instances counted is taken (a rolling deploy on one Redis
# runs both releases at once), and a call that spans the upgrade still has them removed when it ends.
COUNTED_CLAIMS_META = "gatherClaims"
GATHER_META_KEYS = (REPLY_META, CLAIMS_META, COUNTED_CLAIMS_META)
# meta: {"N": epoch by which the request that claimed turn N has committed it or given up}, written with the claim
# (the first request's time only, as the claim) and removed with the turn's answer (`remember`): a turn in flight,
# which an ended call's report waits for (lifecycle.CallLifecycle._call_over). Not among GATHER_META_KEYS: the final
# status, which drops those, may come while the turn is still being answered, on this worker or another.
IN_FLIGHT_META = "gatherTurnsDue"
COMMIT_MARGIN_S = 1.0  # past a turn's budget: its apology is committed and its answer kept by then
WAIT_POLL_S = 0.1  # how often a retry waiting for the first attempt's answer reads the call again


def _digest(speech: str) -> str:
    return hashlib.sha256(speech.encode("utf-8", "replace")).hexdigest()


def turn_param(raw: Any) -> int | None:
    """The turn named by a Gather action URL; None for a URL without one (the call's first webhook, an older URL)."""
    if not isinstance(raw, str) or not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        return None
    return int(raw)


@dataclass(frozen=True)
class TurnStart:
    """What a webhook naming a turn does: run `turn`; answer `sent` (a retry of an answered turn); or, `busy`, neither
    (a retry whose first attempt is still running past the deadline)."""

    turn: int
    sent: str | None = None
    busy: bool = False


class GatherTurns:
    """Claims, keeps and replays the answers of a Gather call's turns (the store is shared by every worker)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.store, self.clock, self.sleep = store, clock, sleep

    @staticmethod
    def next_turn(record: CallRecord | None) -> int | None:
        """The turn the call's next Gather answers: one after the latest answered (0 before any); None without a
        record (nothing to claim against)."""
        if record is None:
            return None
        reply = (record.meta or {}).get(REPLY_META)
        return reply["turn"] + 1 if isinstance(reply, dict) and isinstance(reply.get("turn"), int) else 0

    @staticmethod
    def answered(record: CallRecord, turn: int, speech: str) -> str | None:
        """The TwiML already sent for `turn` answering these same words (a retry), else None. Other words under
        an answered turn are no retry (an action URL used again): they are a new turn (`turn_for`)."""
        reply = (record.meta or {}).get(REPLY_META)
        if isinstance(reply, dict) and reply.get("turn") == turn and reply.get("said") == _digest(speech):
            return reply.get("twiml")
        return None

    def turn_for(self, record: CallRecord, turn: int) -> int:
        """The turn a request that is no retry answers: the one its URL names, or the call's next one if that was
        answered already (the URL was used again)."""
        return max(turn, self.next_turn(record) or 0)

    def start(self, record: CallRecord, turn: int, speech: str, until: float) -> TurnStart:
        """A webhook for `turn` with these words: the answer already sent (a retry), the turn to run (this request
        claimed it), or busy (another request claimed it and kept no answer by `until`, this object's clock)."""
        sent = self.answered(record, turn, speech)
        if sent is None:
            turn = self.turn_for(record, turn)
            due = time.time() + max(0.0, until - self.clock()) + COMMIT_MARGIN_S
            if self.claim(record.tracking_id, turn, due):
                return TurnStart(turn)
            sent = self.wait_for_answer(record.tracking_id, turn, speech, until)
            if sent is None:
                return TurnStart(turn, busy=True)
        log.info("gather_retry_answered", turn=turn)
        return TurnStart(turn, sent)

    def claim(self, tracking_id: str, turn: int, due: float | None = None) -> bool:
        """Whether this request is the first for `turn`: its own mark written where the turn has none, in one
        atomic write in the store (whichever worker took it), and read back. With `due` (epoch), the same write
        says by when the turn will be committed (IN_FLIGHT_META), unless an earlier request for it said so."""
        mark = uuid.uuid4().hex
        first: dict[str, dict[str, Any]] = {CLAIMS_META: {str(turn): mark}}
        if due is not None:
            first[IN_FLIGHT_META] = {str(turn): round(due, 3)}
        try:
            meta = self.store.update_meta(tracking_id, first=first)
        except StoreError:
            # Degrade, never drop the call: a retry may then run twice, the caller is answered either way.
            log.warning("gather_claim_failed", tracking_id=tracking_id, turn=turn)
            return True
        if meta is None:
            return True
        return ((meta.get(CLAIMS_META) or {}).get(str(turn)) == mark
                and not (meta.get(COUNTED_CLAIMS_META) or {}).get(str(turn)))

    def remember(self, tracking_id: str, turn: int, speech: str, twiml: str) -> None:
        """Keep `turn`'s answer to `speech` for a retry (the words as a digest: only a retry's equality matters);
        the claims of earlier turns go (a retry of `turn` from now on finds the answer before it claims, and one
        already claiming finds no mark of its own)."""
        try:
            self.store.update_meta(tracking_id, {REPLY_META: {"turn": turn, "said": _digest(speech), "twiml": twiml},
                                                 CLAIMS_META: {str(turn): ANSWERED_CLAIM}}, remove=(IN_FLIGHT_META,))
            # The caller may have hung up while the turn ran: the terminal status callback dropped these keys
            # before this write. Read after it, the end is seen either way, and the answer goes with the call.
            if not call_is_live(self.store.get_call(tracking_id)):
                self.store.update_meta(tracking_id, remove=GATHER_META_KEYS)
        except StoreError:
            log.warning("gather_answer_not_kept", tracking_id=tracking_id, turn=turn)  # a retry gets the apology

    def abandoned(self, tracking_id: str, turn: int) -> None:
        """The request that claimed `turn` failed (its webhook answered with the apology): nothing will commit the
        turn, so an ended call's report need not wait for it (IN_FLIGHT_META). A failed write leaves it to lapse."""
        try:
            self.store.update_meta(tracking_id, remove=(IN_FLIGHT_META,))
        except Exception:  # noqa: BLE001  (called while answering an error: the apology goes whatever fails here)
            log.warning("gather_turn_due_not_dropped", tracking_id=tracking_id, turn=turn)

    @staticmethod
    def due(record: CallRecord | None) -> float | None:
        """The epoch by which the call's claimed turn still being answered (on any worker) is committed, or None
        when no turn is in flight. A request that died with its worker leaves its time behind: past it, none is."""
        dues = [v for v in ((record.meta or {}).get(IN_FLIGHT_META) or {}).values()
                if isinstance(v, (int, float)) and not isinstance(v, bool)] if record is not None else []
        return max(dues) if dues and max(dues) > time.time() else None

    def wait_for_answer(self, tracking_id: str, turn: int, speech: str, until: float) -> str | None:
        """A retry of a turn still being answered: the first attempt's TwiML once it is kept, or None by `until`
        (this object's clock)."""
        while True:
            try:
                record = self.store.get_call(tracking_id)
            except StoreError:
                record = None  # read again until `until`
            found = self.answered(record, turn, speech) if record is not None else None
            if found is not None or self.clock() >= until:
                log.info("gather_retry_waited", turn=turn, answered=found is not None)
                return found
            self.sleep(WAIT_POLL_S)
