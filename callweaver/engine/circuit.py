"""Circuit breakers whose state (failures, open-until, the half-open probe) is shared by every worker.

A provider that is down must be skipped by the whole service after LLM_CIRCUIT_FAILURES failures, not after that
many failures in each worker. The record lives in the store (SQLite for one machine's workers, Redis for every
instance); the hot path reads it once per provider per turn and writes only when something changes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Protocol

import structlog

log = structlog.get_logger()

# A shared-state failure is logged at most once per this many seconds per worker.
ERROR_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class CircuitRecord:
    """One provider's breaker. Closed while open_until is None; open until then; half-open after it, when
    the one worker holding the probe lease (probe_until) may try the provider."""

    failures: int = 0
    opened_at: float | None = None  # epoch seconds
    open_until: float | None = None
    probe_until: float | None = None

    def state(self, now: float) -> str:
        if self.open_until is None:
            return "closed"
        return "open" if now < self.open_until else "half_open"

    @classmethod
    def from_dict(cls, data: dict | None) -> "CircuitRecord":
        if not data:
            return cls()
        return cls(failures=int(data.get("failures", 0)), opened_at=data.get("opened_at"),
                   open_until=data.get("open_until"), probe_until=data.get("probe_until"))


CLOSED = CircuitRecord()


class CircuitStates(Protocol):
    """Where the records live: read once, update atomically (see Store.read_shared / update_shared)."""

    def read_shared(self, key: str) -> dict | None: ...

    def update_shared(self, key: str, change: Callable[[dict | None], dict | None]) -> tuple[dict | None, bool]: ...


class LocalCircuitStates:
    """Records in this process only: unit tests, a call's own LLM account, and the fallback on a store outage."""

    def __init__(self) -> None:
        self._records: dict[str, dict] = {}
        self._lock = threading.Lock()

    def read_shared(self, key: str) -> dict | None:
        return self._records.get(key)

    def update_shared(self, key: str, change: Callable[[dict | None], dict | None]) -> tuple[dict | None, bool]:
        with self._lock:
            current = self._records.get(key)
            new = change(dict(current) if current else None)
            if new is None:
                return current, False
            self._records[key] = new
            return new, True


class CircuitBreaker:
    """closed → (N failures, counted by every worker together) open → (cooldown) half_open with one probe,
    claimed atomically by one worker → closed on success | open again on failure.

    A failing shared store never fails a turn: the breaker falls back to this worker's own record until the
    store answers again.
    """

    def __init__(self, name: str, states: CircuitStates, *, failures: int, cooldown_s: float) -> None:
        self.name = name
        self._key = f"circuit:{name}"
        self._states = states
        self._local = states if isinstance(states, LocalCircuitStates) else LocalCircuitStates()
        self._failures = failures
        self._cooldown_s = cooldown_s
        self._last_error_logged_at = 0.0

    def acquire(self, now: float) -> CircuitRecord | None:
        """May this turn use the provider? The record seen (pass it back to record_success), or None to skip.
        One read when closed or cooling down; a write only to claim the half-open probe."""
        record = CircuitRecord.from_dict(self._read())
        state = record.state(now)
        if state == "closed":
            return record
        if state == "open" or (record.probe_until is not None and now < record.probe_until):
            return None

        def claim(data: dict | None) -> dict | None:
            current = CircuitRecord.from_dict(data)
            if current.state(now) != "half_open" or (current.probe_until is not None and now < current.probe_until):
                return None  # closed meanwhile, reopened, or another worker holds the probe
            # The lease outlives any sane attempt; if its holder died, the next probe waits one more cooldown.
            return asdict(replace(current, probe_until=now + self._cooldown_s))

        data, claimed = self._update(claim)
        after = CircuitRecord.from_dict(data)
        if claimed or after.state(now) == "closed":
            return after
        return None

    def record_success(self, seen: CircuitRecord) -> None:
        """Close the circuit; no write when the record seen at acquire was already clean (the common turn)."""
        if seen == CLOSED:
            return
        self._update(lambda current: asdict(CLOSED) if current and current != asdict(CLOSED) else None)
        if seen.open_until is not None:
            log.info("provider_circuit_closed", provider=self.name)

    def record_failure(self, now: float) -> None:
        opened: list[int] = []

        def count(data: dict | None) -> dict:
            opened.clear()  # Redis replays this function when another instance wrote in between
            current = CircuitRecord.from_dict(data)
            failures = current.failures + 1
            # Opens on the N-th failure, or when the probe fails (open for another cooldown). A request sent
            # before the circuit opened that fails afterwards only counts.
            if (current.open_until is None and failures >= self._failures) or current.probe_until is not None:
                opened.append(failures)
                return asdict(CircuitRecord(failures=failures, opened_at=now, open_until=now + self._cooldown_s))
            return asdict(replace(current, failures=failures))

        self._update(count)
        if opened:
            log.warning("provider_circuit_opened", provider=self.name, consecutive_failures=opened[0])

    def release_probe(self) -> None:
        """The probing turn was cancelled before the provider proved anything: let the next turn probe."""
        self._update(lambda data: asdict(replace(CircuitRecord.from_dict(data), probe_until=None))
                     if data and data.get("probe_until") is not None else None)

    def snapshot(self, now: float) -> dict[str, Any]:
        record = CircuitRecord.from_dict(self._read())
        return {"state": record.state(now), "consecutiveFailures": record.failures, "openedAt": record.opened_at}

    # -- the shared place, with this worker's own record as the fallback -------------------------------------

    def _read(self) -> dict | None:
        if self._states is not self._local:
            try:
                return self._states.read_shared(self._key)
            except Exception as exc:
                self._log_error("read", exc)
        return self._local.read_shared(self._key)

    def _update(self, change: Callable[[dict | None], dict | None]) -> tuple[dict | None, bool]:
        if self._states is not self._local:
            try:
                return self._states.update_shared(self._key, change)
            except Exception as exc:
                self._log_error("update", exc)
        return self._local.update_shared(self._key, change)

    def _log_error(self, operation: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_logged_at >= ERROR_LOG_INTERVAL_S or not self._last_error_logged_at:
            self._last_error_logged_at = now
            log.warning("circuit_state_unavailable", provider=self.name, operation=operation,
                        error=f"{type(exc).__name__}: {exc}"[:300])
