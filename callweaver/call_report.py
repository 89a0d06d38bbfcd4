"""End-of-call report: when a call ends, POST a signed JSON summary to CALL_REPORT_URL, off the call's path.

Delivery runs on its own greenlet, retries with exponential backoff (bounded attempts and pending reports), and
never touches the call: a slow or dead receiver costs a sleeping greenlet, nothing more. A report is due in the
store (its outbox) from the write that ends the call (Store.append_status) until it is delivered, rejected or given
up, held by the worker delivering it under a lease that it renews before each attempt and each wait. A worker that
stops (a deploy's SIGTERM, a kill) leaves its reports there: once their lease runs out, any worker sharing the store
resumes them (`resume_due`, every CALL_REPORT_SWEEP_S), the attempt count going on. At least once: a report may
arrive twice (a retry after a lost answer, a worker stopped mid-POST): receivers treat `reportId` as an idempotency
key.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import requests
import structlog

from .engine.metrics import MetricsReader
from .store import (API_END, END_CALL_POLL_S, END_REASON_META, ERROR_END, SILENCE_END, ReportClaim, Store, StoreError,
                    end_call_abandoned, end_call_pending)

log = structlog.get_logger()

SIGNATURE_HEADER = "X-CallWeaver-Signature"
MAX_BACKOFF_S = 300.0
MAX_PENDING_REPORTS = 1000
ATTEMPT_TIMEOUT_S = 10.0
# A report's hold outlasts the next thing its worker does by this much (CALL_REPORT_LEASE_S): an attempt (at most a
# connect and a read timeout), or the wait before the next one. A worker stopped then leaves it to others that much
# later, so a live but busy worker is not taken over.
DEFAULT_LEASE_S = 60.0
DEFAULT_SWEEP_S = 30.0
ATTEMPT_HOLD_S = 2 * ATTEMPT_TIMEOUT_S
SWEEP_BATCH = 100  # due reports picked up per sweep at most (and never more than the pending cap leaves room for)
MAX_STORE_ERROR_CHARS = 300
SWEEP_FAILURE_LOG_S = 600.0  # while the store stays down, one call_report_sweep_failed line this often (per worker)
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
NOT_ANSWERED = frozenset({"busy", "no-answer", "canceled"})


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`: the timestamp is signed so a report cannot be replayed."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, *, tolerance_s: float = 300.0,
                     now: float | None = None) -> bool:
    """What a receiver does: recompute the HMAC over the raw body and reject stale timestamps."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), f"t={timestamp},v1={parts.get('v1', '')}")


def call_outcome(status: str, turns: list[dict], meta: dict | None = None) -> str:
    """How the call ended: end_node, transfer, hang_up (the caller left), silence, error or ended_by_api (ended on our
    side: the call's meta `endReason`; a failed call is an error too), or Twilio's not-answered status."""
    if status in NOT_ANSWERED:
        return status.replace("-", "_")
    if status == "failed":
        return ERROR_END
    end_reason = (meta or {}).get(END_REASON_META)
    if end_reason in (SILENCE_END, ERROR_END, API_END):
        return end_reason
    last_action = next((t.get("action") for t in reversed(turns) if t.get("action")), None)
    return {"end": "end_node", "transfer": "transfer"}.get(last_action or "", "hang_up")


def build_report(store: Store, tracking_id: str) -> dict[str, Any] | None:
    """The summary a receiver gets: transcript as heard, per-turn timings, outcome and the variables collected."""
    record = store.get_call(tracking_id)
    if record is None:
        return None
    view = MetricsReader(store).call(tracking_id) or {}
    turns = store.turns(tracking_id)
    return {
        "event": "call.ended", "reportId": tracking_id, "trackingId": tracking_id, "callSid": record.call_sid,
        "status": record.status, "outcome": call_outcome(record.status, turns, record.meta), "path": record.path,
        "language": record.language, "workflowId": record.workflow_id, "to": record.to,
        "from": record.from_number, "startedAt": record.created_at, "endedAt": record.ended_at,
        "endNode": record.current_node, "variables": dict(record.variables or {}),
        "transcript": [{"role": m.get("role"), "content": m.get("content")} for m in record.messages or []
                       if m.get("role") in ("user", "assistant")],
        "metrics": view.get("metrics"), "call": view.get("callData"),
    }


@dataclass
class Delivery:
    """How one report's delivery went (returned by `deliver`, logged as call_report_*)."""

    tracking_id: str
    delivered: bool = False
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None


class CallReporter:
    """Sends one report per ended call; `call_ended` returns at once, delivery happens on a spawned greenlet.

    `holder` names this worker in the report outbox (unique per worker process); `lease_s` is CALL_REPORT_LEASE_S."""

    def __init__(self, store: Store, url: str, secret: str, *, spawn: Callable, max_attempts: int = 10,
                 backoff_s: float = 2.0, sleep: Callable[[float], None] = time.sleep, settle_s: float = 0.0,
                 holder: str | None = None, lease_s: float = DEFAULT_LEASE_S):
        self.store = store
        # Up to how long a report waits for an end-call asking Twilio to hang up (lifecycle.end_call_wait_s): the
        # final status may come first, and the outcome stands or falls with Twilio's answer (store.END_REASON_RULE).
        self.settle_s = settle_s
        self.url = url
        self.secret = secret
        self.spawn = spawn
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.holder = holder or default_holder()
        self.lease_s = lease_s
        self._pending = threading.BoundedSemaphore(MAX_PENDING_REPORTS)
        self._delivering: set[str] = set()  # tracking ids this worker is delivering (a sweep leaves them alone)
        self._waiting: set[str] = set()  # those of them waiting to try again (hand_back_waiting)
        self._stopping = False  # SIGTERM seen (hand_back_waiting): take no report over, hold none through a wait
        self._session = requests.Session()

    def call_ended(self, tracking_id: str):
        """Queue the report, which the write that ended the call recorded as due (lifecycle.record_status). When too
        many are already waiting for a dead receiver it is left due (logged): its hold runs out and a sweep with room
        (this worker's or another's) resumes it, rather than losing a report the store keeps."""
        if not self._pending.acquire(blocking=False):
            log.warning("call_report_deferred", tracking_id=tracking_id, reason="too many pending reports")
            return None
        self._delivering.add(tracking_id)
        return self.spawn(self._deliver_and_release, tracking_id, None, True)

    def _deliver_and_release(self, tracking_id: str, resumed: ReportClaim | None,
                             recorded: bool = False) -> Delivery:
        try:
            return self.deliver(tracking_id, resumed=resumed, recorded=recorded)
        finally:
            self._delivering.discard(tracking_id)
            self._pending.release()

    def resume_due(self, now: float | None = None) -> int:
        """Pick up the due reports whose lease ran out (their worker stopped, on this instance or, with Redis, any):
        each is claimed in one atomic write, so exactly one worker resumes it. Never more than the pending cap
        leaves room for; the rest wait for a later sweep. Returns how many were resumed: none once the worker is
        stopping (it would hold them past its exit)."""
        if self._stopping:
            return 0
        free = 0
        while free < SWEEP_BATCH and self._pending.acquire(blocking=False):
            free += 1
        resumed = 0
        try:
            if not free:
                return 0
            for tracking_id in self.store.due_reports(time.time() if now is None else now, free):
                if tracking_id in self._delivering:
                    continue
                claim = self.store.claim_report(tracking_id, self.holder, ATTEMPT_HOLD_S + self.lease_s)
                if claim is None:
                    continue  # another worker was first
                log.warning("call_report_resumed", tracking_id=tracking_id, attempts=claim.attempts,
                            left_by=claim.holder_before)
                self._delivering.add(tracking_id)
                free -= 1
                resumed += 1
                self.spawn(self._deliver_and_release, tracking_id, claim)
        finally:
            for _ in range(free):
                self._pending.release()
        return resumed

    def hand_back_waiting(self) -> int:
        """The worker is stopping (SIGTERM): the reports it is only waiting to retry are left to other workers at
        once (their hold ends now) rather than when it would have run out. Should this worker still wake before
        it exits, it goes on only if no other worker took the report meanwhile (its next hold is refused then).
        Returns how many were handed back. From then on this worker takes no report over (resume_due), and one of
        its attempts that fails is handed back at once rather than held through its wait."""
        self._stopping = True
        handed = 0
        for tracking_id in list(self._waiting):
            try:
                if self.store.claim_report(tracking_id, self.holder, 0.0) is not None:
                    handed += 1
            except Exception as exc:  # noqa: BLE001  (its hold runs out as it would have)
                log.warning("call_report_outbox_failed", tracking_id=tracking_id,
                            error=str(exc)[:MAX_STORE_ERROR_CHARS])
        return handed

    def run_sweeps(self, interval_s: float = DEFAULT_SWEEP_S, sleep: Callable[[float], None] = time.sleep) -> None:
        """The worker's sweep loop (a background greenlet, started once the app is loaded): at start, then every
        interval (jittered, so workers do not sweep in step), one indexed read of the due reports whose lease ran
        out. Forever. A store outage is logged when it starts, then once every SWEEP_FAILURE_LOG_S while it lasts
        (`failed_sweeps` since the last line), not at every sweep."""
        failed, logged_at = 0, None
        while True:
            try:
                self.resume_due()
                failed, logged_at = 0, None
            except Exception as exc:  # noqa: BLE001  (the loop outlives any one sweep)
                failed += 1
                if logged_at is None or time.monotonic() - logged_at >= SWEEP_FAILURE_LOG_S:
                    logged_at = time.monotonic()
                    if isinstance(exc, StoreError):
                        log.error("call_report_sweep_failed", error=str(exc)[:MAX_STORE_ERROR_CHARS],
                                  failed_sweeps=failed)
                    else:
                        log.exception("call_report_sweep_failed", failed_sweeps=failed)
                    failed = 0
            sleep(interval_s * random.uniform(0.8, 1.0))

    def backoff(self, attempt: int) -> float:
        """Exponential (backoff_s · 2^(attempt-1), capped) with jitter, so many reports don't retry in lockstep."""
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.75, 1.0)

    def _await_end_call(self, tracking_id: str) -> None:
        """Until an end-call asking Twilio to hang the call up has its answer (at most settle_s): the report says
        ended_by_api only if Twilio took it; never for a request past its deadline, which died with its worker.
        Polled at the store's pace, not the retries' injected sleep."""
        deadline = time.monotonic() + self.settle_s
        while time.monotonic() < deadline:
            record = self.store.get_call(tracking_id)
            if record is None or not end_call_pending(record.meta) or end_call_abandoned(record.meta, time.time()):
                return
            time.sleep(END_CALL_POLL_S)

    def _hold(self, tracking_id: str, lease_s: float, *, attempt: bool = False,
              create: bool = False) -> ReportClaim | bool:
        """Renew this worker's hold on the report in the outbox (counting an attempt when `attempt`): the claim; or
        False when another worker has taken it over (this worker stalled past its lease) or it is no longer due;
        or True when the store cannot be written (the delivery goes on from memory, as before the outbox)."""
        try:
            claim = self.store.claim_report(tracking_id, self.holder, lease_s, attempt=attempt, create=create)
        except Exception as exc:  # noqa: BLE001
            log.warning("call_report_outbox_failed", tracking_id=tracking_id, error=str(exc)[:MAX_STORE_ERROR_CHARS])
            return True
        return False if claim is None else claim

    def _finish(self, tracking_id: str) -> None:
        try:
            self.store.finish_report(tracking_id)
        except Exception as exc:  # noqa: BLE001  (left due: a worker resumes it later, the receiver dedupes it)
            log.warning("call_report_outbox_failed", tracking_id=tracking_id, error=str(exc)[:MAX_STORE_ERROR_CHARS])

    def deliver(self, tracking_id: str, resumed: ReportClaim | None = None, *, recorded: bool = False) -> Delivery:
        """POST the report until the receiver answers 2xx, a non-retryable status, or attempts run out (counted in
        the outbox across workers: `resumed` is the claim of a delivery another worker left). `recorded`: the write
        that ended the call recorded it as due (call_ended), so an entry gone means it was delivered or given up
        already (the call seen ending twice, by two callbacks read before either wrote) or purged: nothing is sent.
        Otherwise (a direct call) the first hold records it."""
        create = resumed is None and not recorded
        result = Delivery(tracking_id, attempts=resumed.attempts if resumed is not None else 0)
        try:
            self._await_end_call(tracking_id)
            report = build_report(self.store, tracking_id)
        except Exception:
            log.exception("call_report_failed", tracking_id=tracking_id, reason="could not read the call")
            # Left due: a later sweep tries again, counted as an attempt so that a call that can never be read
            # is given up too.
            held = self._hold(tracking_id, self.backoff(result.attempts + 1) + self.lease_s, attempt=True,
                              create=create)
            if isinstance(held, ReportClaim) and held.attempts >= self.max_attempts:
                log.error("call_report_gave_up", tracking_id=tracking_id, attempts=held.attempts,
                          error="could not read the call")
                self._finish(tracking_id)
            return result
        if report is None:
            log.warning("call_report_failed", tracking_id=tracking_id, reason="unknown call")
            self._finish(tracking_id)
            return result
        body = json.dumps(report, ensure_ascii=False, separators=(",", ":")).encode()
        while result.attempts < self.max_attempts:
            held = self._hold(tracking_id, ATTEMPT_HOLD_S + self.lease_s, attempt=True, create=create)
            create = False
            if held is False:
                log.info("call_report_handed_off", tracking_id=tracking_id, attempts=result.attempts)
                return result
            result.attempts = held.attempts if isinstance(held, ReportClaim) else result.attempts + 1
            if result.attempts > self.max_attempts:
                break
            headers = {"Content-Type": "application/json", "X-CallWeaver-Event": "call.ended",
                       "X-CallWeaver-Delivery": tracking_id, "X-CallWeaver-Attempt": str(result.attempts),
                       SIGNATURE_HEADER: sign(self.secret, body, int(time.time()))}
            retry_after = None
            try:
                # Only the answer's status and Retry-After are read: its body (which a receiver could drip forever)
                # never is, and a redirect is an answer, not followed (it would re-send the transcript elsewhere).
                status, retry_after = self._post(body, headers)
                result.last_status, result.last_error = status, None
                if 200 <= status < 300:
                    result.delivered = True
                    log.info("call_report_delivered", tracking_id=tracking_id, attempts=result.attempts,
                             status=status)
                    self._finish(tracking_id)
                    return result
                if status not in RETRYABLE_STATUS:
                    log.error("call_report_rejected", tracking_id=tracking_id, status=status,
                              attempts=result.attempts, **({"reason": "redirects are not followed"}
                                                           if 300 <= status < 400 else {}))
                    self._finish(tracking_id)
                    return result
            except requests.RequestException as exc:
                result.last_status, result.last_error = None, type(exc).__name__
            if result.attempts < self.max_attempts:
                delay = self.backoff(result.attempts)
                if retry_after and retry_after.isdigit():
                    delay = min(MAX_BACKOFF_S, max(delay, float(retry_after)))
                log.warning("call_report_retrying", tracking_id=tracking_id, attempt=result.attempts,
                            status=result.last_status, error=result.last_error, retry_in_s=round(delay, 3))
                # Held through the wait: a worker stopped meanwhile leaves it to others lease_s after it was due.
                if not self._stopping and self._hold(tracking_id, delay + self.lease_s) is False:
                    log.info("call_report_handed_off", tracking_id=tracking_id, attempts=result.attempts)
                    return result
                if self._stopping:  # SIGTERM came during the attempt (or that hold): left to running workers at once
                    if self._hold(tracking_id, 0.0) is not False:
                        log.info("call_report_handed_back", tracking_id=tracking_id, attempts=result.attempts)
                    return result
                self._waiting.add(tracking_id)  # (no switch since the check: a hand-back now sees it)
                try:
                    self.sleep(delay)
                finally:
                    self._waiting.discard(tracking_id)
        log.error("call_report_gave_up", tracking_id=tracking_id, attempts=result.attempts,
                  status=result.last_status, error=result.last_error)
        self._finish(tracking_id)
        return result


    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
        """One attempt: the answer's status and Retry-After. requests' timeout bounds each socket operation, not the
        request, so a receiver sending its answer a byte at a time could hold the attempt past the report's hold
        (another worker would then take it over and send it again): under gevent (production) the whole attempt is
        bounded by ATTEMPT_HOLD_S, and ends as a requests.Timeout. Without gevent (tests, CLI) only per operation."""
        def post() -> tuple[int, str | None]:
            with self._session.post(self.url, data=body, headers=headers, timeout=ATTEMPT_TIMEOUT_S,
                                    allow_redirects=False, stream=True) as resp:
                return resp.status_code, resp.headers.get("Retry-After")

        from gevent import monkey
        if not monkey.is_module_patched("socket"):
            return post()
        import gevent
        bound = gevent.Timeout(ATTEMPT_HOLD_S)  # a BaseException: no library on the way turns it into another
        try:
            with bound:
                return post()
        except gevent.Timeout as exc:
            if exc is not bound:
                raise
            raise requests.Timeout(f"no answer within {ATTEMPT_HOLD_S:g} s") from None


def default_holder() -> str:
    """This worker process's name in the report outbox: its host and pid, and a random part (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
