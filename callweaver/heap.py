"""The C heap's free pages handed back to the OS once a burst of call set-ups is over (glibc's malloc_trim).

A call's set-up (make-call, TwiML, status callbacks, the relay socket's upgrade and `setup`) allocates and frees
far more than the live call keeps. With many set-ups at once, their short-lived blocks sit between the blocks the
live calls keep (the sockets' buffers, the greenlets' saved stacks), and glibc keeps the freed pages between them:
after 200 calls set up 25 at a time, ~1.7 KiB per idle call (docs/performance-history.md, "Issue 12t").
malloc_trim(0) returns every whole free page inside the heap (madvise), not only its top.

It costs CPU while the hub waits (it walks glibc's free lists: 0.24 ms on a worker after 200 set-ups, ~10 ms on a
heavily fragmented 100 MB heap), so it runs once set-ups have paused for QUIET_S, and at most once per
MIN_INTERVAL_S. Off glibc (musl, macOS, Windows) there is no
malloc_trim and this does nothing.
"""
from __future__ import annotations

import ctypes
import time
from typing import Callable

import structlog
import structlog.contextvars

log = structlog.get_logger()

QUIET_S = 0.5          # no call set up for this long: the burst is over
MIN_INTERVAL_S = 2.0  # calls trickling in (a pause after each) pay for at most one trim per this many seconds


def glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, TypeError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """One per worker process: told when a call's set-up finished; trims once the set-ups pause."""

    def __init__(self, spawn: Callable, trim: Callable[[int], int] | None = None,
                 quiet_s: float = QUIET_S, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.spawn = spawn
        self.trim = trim
        self.quiet_s = quiet_s
        self.min_interval_s = min_interval_s
        self.last_set_up = 0.0
        self.last_trim = float("-inf")
        self.pending = False
        self.trims = 0

    def call_set_up(self) -> None:
        """A call finished setting up: trim once set-ups have paused (a background task waits for that)."""
        if self.trim is None:
            return
        self.last_set_up = time.monotonic()
        if not self.pending:
            self.pending = True
            try:
                self.spawn(self._trim_when_quiet)
            except Exception:  # never the call's failure; the next set-up tries again
                self.pending = False
                log.exception("heap_trim_failed")

    def _trim_when_quiet(self) -> None:
        structlog.contextvars.clear_contextvars()  # the worker's, not the call's that happened to start it
        try:
            while True:
                wait = max(self.last_set_up + self.quiet_s, self.last_trim + self.min_interval_s) - time.monotonic()
                if wait <= 0:
                    break
                time.sleep(wait)  # cooperative under gevent
            self.pending = False
            cpu_before = time.process_time()
            released = self.trim(0)
            self.last_trim = time.monotonic()
            self.trims += 1
            log.info("heap_trimmed", released=bool(released),
                     cpu_ms=round((time.process_time() - cpu_before) * 1000, 2))
        except Exception:
            self.pending = False
            log.exception("heap_trim_failed")
