"""Retention: calls that ended more than RETENTION_DAYS ago are deleted with their turns and statuses.

It runs as a periodic job in every worker, but a store-wide lease lets exactly one worker (of every instance
sharing the store) purge per RETENTION_INTERVAL_S; operators can also run it at once (`flask purge-calls`).
"""
from __future__ import annotations

import time
from typing import Callable

import structlog

from .store import Store, StoreError
from .units import SECONDS_PER_DAY

log = structlog.get_logger()
MAX_STORE_ERROR_CHARS = 300  # a store error's text as logged (it names the file or Redis host, never a password)

RETENTION_LEASE = "retention"


def purge_ended_calls(store: Store, retention_days: float, transcript_retention_days: float | None = None) -> int:
    """Delete every call that ended more than retention_days ago, and empty the transcripts (what callers said
    and heard; the timings stay) of calls that ended more than transcript_retention_days ago; returns how many
    calls were deleted."""
    now = time.time()
    purged = store.purge(now - retention_days * SECONDS_PER_DAY)
    emptied = None
    if transcript_retention_days is not None:
        emptied = store.purge_transcripts(now - transcript_retention_days * SECONDS_PER_DAY)
    log.info("store_purged", calls=purged, retention_days=retention_days, transcripts=emptied,
             transcript_retention_days=transcript_retention_days)
    return purged


def purge_if_due(store: Store, *, retention_days: float, interval_s: float, holder: str,
                 transcript_retention_days: float | None = None) -> int | None:
    """Purge when this worker takes the store-wide lease for the next interval; None when another already has."""
    if not store.try_lease(RETENTION_LEASE, holder, interval_s):
        return None
    return purge_ended_calls(store, retention_days, transcript_retention_days)


def run_periodically(store: Store, *, retention_days: float, interval_s: float, holder: str,
                     transcript_retention_days: float | None = None,
                     sleep: Callable[[float], None] = time.sleep) -> None:
    """The worker's retention loop (a background greenlet): try at start, then every interval, forever."""
    while True:
        try:
            purge_if_due(store, retention_days=retention_days, interval_s=interval_s, holder=holder,
                         transcript_retention_days=transcript_retention_days)
        except StoreError as exc:  # the store is down: what /health reports too; no traceback every interval
            log.error("purge_failed", error=str(exc)[:MAX_STORE_ERROR_CHARS])
        except Exception:
            log.exception("purge_failed")
        sleep(interval_s)
