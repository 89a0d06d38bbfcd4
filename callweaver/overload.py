"""Admission control: a worker past its CPU capacity refuses new calls instead of degrading every live one.

A gevent worker has one event loop; when its greenlets want more CPU than it gets (≈500–600 live calls on a 2-core
machine, ≈20 on a 0.1-CPU instance), every callback runs late, every live call's turns with it. The probe measures
exactly that: a timer asked to fire every PROBE_INTERVAL_S, and how much later than asked it fires. make-call reads
the worst lateness of the last WINDOW_S (a few dozen floats) and refuses a new call above OVERLOAD_LOOP_LAG_MS.
Nothing here runs on a turn's path.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

from .engine.llm_http import cooperative_loop

PROBE_INTERVAL_S = 0.1
WINDOW_S = 3.0
# What a refused make-call's Retry-After says: about the window's length, after which the probe has fresh samples.
RETRY_AFTER_S = 5


class WorkerLoad:
    """This worker's event-loop lag and the make-call admission decision (one per worker, on Services).

    `threshold_ms`: refuse new calls while the lag is above it (0: never). `clock`: injectable for tests, which feed
    samples with `record` instead of running the probe.
    """

    def __init__(self, threshold_ms: float, *, interval_s: float = PROBE_INTERVAL_S, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold_ms = threshold_ms
        self._interval_s = interval_s
        self._window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=int(window_s / interval_s) + 2)  # (at, lag_s)
        self._loop: Any = None
        self._timer: Any = None
        self._due: float | None = None  # when the running probe timer should fire

    def start(self) -> bool:
        """Probe this thread's gevent loop from now on (a gunicorn gevent worker, after the fork); False without
        gevent (nothing to measure: a threaded server has no single loop to fall behind)."""
        if self._loop is not None:
            return True
        loop = cooperative_loop()
        if loop is None:
            return False
        self._loop = loop
        self._arm()
        return True

    @property
    def probing(self) -> bool:
        """Whether the probe runs (a gevent worker, once warm): without it the lag reads 0 and every call is admitted."""
        return self._loop is not None

    def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()
        self._loop, self._due = None, None

    def _arm(self) -> None:
        self._due = self._clock() + self._interval_s
        # ref=False: the probe alone never keeps the loop running (gevent's public ILoop.timer)
        self._timer = self._loop.timer(self._interval_s, ref=False)
        self._timer.start(self._fired)

    def _fired(self) -> None:
        now = self._clock()
        self.record(now, max(0.0, now - (self._due or now)))
        if self._timer is not None:
            self._timer.close()
        if self._loop is not None:
            self._arm()

    def record(self, at: float, lag_s: float) -> None:
        """One probe sample: at `at` (the clock's time) the timer fired `lag_s` late."""
        self._samples.append((at, lag_s))

    def lag_ms(self) -> float:
        """The worst lateness of the last WINDOW_S, or of the probe timer overdue right now (a loop held this
        moment), in ms; 0 before any sample."""
        now = self._clock()
        since = now - self._window_s
        worst = max((lag for at, lag in self._samples if at >= since), default=0.0)
        if self._due is not None and now > self._due:
            worst = max(worst, now - self._due)
        return worst * 1000.0

    def overloaded(self) -> float | None:
        """The lag (ms) when it is above the threshold, so a new call should be refused; None to admit it."""
        if self.threshold_ms <= 0:
            return None
        lag = self.lag_ms()
        return lag if lag > self.threshold_ms else None
