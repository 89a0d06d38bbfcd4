"""How late the measuring apparatus itself runs: a probe that asks to wake every few ms and records how much
later than asked it woke up (scheduled wake-up vs actual, in ms).

In the load generator (gevent-patched) the probe is a greenlet, so its lag is the time a frame that has arrived
waits before its caller's greenlet runs and timestamps it. In the fake LLM (threads) the probe is a thread, so its
lag is the wait for the GIL and a core. When these lags are high, the client-side "added" figure measures the
apparatus, not the server. Both processes read time.monotonic() (CLOCK_MONOTONIC, one clock machine-wide), so a
bench keeps only the samples inside its talk phase.
"""

from __future__ import annotations

import threading
import time
from collections import deque

PROBE_INTERVAL_S = 0.01
MAX_SAMPLES = 200_000  # ~33 min at 100 samples a second; older samples fall off


class LoopLagProbe:
    """Sleeps PROBE_INTERVAL_S in a loop and keeps (woke_at, lag_ms) per wake-up. `start()` runs it as a
    daemon thread, which under gevent's monkey-patching is a greenlet of the hub it measures."""

    def __init__(self, interval_s: float = PROBE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "LoopLagProbe":
        self._thread = threading.Thread(target=self._run, name="loop-lag-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval_s, samples, clock, sleep = self.interval_s, self.samples, time.monotonic, time.sleep
        while not self._stop.is_set():
            due = clock() + interval_s
            sleep(interval_s)
            woke = clock()
            samples.append((woke, (woke - due) * 1000))

    def lags_between(self, start: float, end: float) -> list[float]:
        """Lags (ms) of the wake-ups between two time.monotonic() instants."""
        return [lag for woke, lag in list(self.samples) if start <= woke <= end]
