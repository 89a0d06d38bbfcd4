"""Prometheus exposition built from the store at scrape time: the same figures from every worker and instance."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from .metrics import added_latency_ms

BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 750, 1000, 1500, 2500, 5000, 10000)
CIRCUIT_STATES = ("closed", "half_open", "open")


def _histogram(name: str, doc: str, labels: list[str], series: dict[tuple, list[float]]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for key, values in sorted(series.items()):
        buckets = [(str(b), sum(1 for v in values if v <= b)) for b in BUCKETS_MS]
        buckets.append(("+Inf", len(values)))
        fam.add_metric(list(key), buckets, sum_value=sum(values))
    return fam


class StoreCollector:
    """Turn latency histograms, calls by status, provider failures and circuit state, read from the store."""

    def __init__(self, store, provider_health: Callable[[], list[dict]], since: Callable[[], float] = lambda: 0.0):
        self.store = store
        self.provider_health = provider_health
        self.since = since

    def collect(self) -> Iterable:
        turns = self.store.recent_turns(self.since())
        first: dict[tuple, list[float]] = defaultdict(list)
        added: dict[tuple, list[float]] = defaultdict(list)
        failures: dict[tuple, int] = defaultdict(int)
        for t in turns:
            key = (t.get("path") or "unknown", t.get("provider") or "none", "hit" if t.get("cacheHit") else "miss")
            if t.get("firstTokenMs") is not None:
                first[key].append(float(t["firstTokenMs"]))
            extra = added_latency_ms(t)
            if extra is not None:
                added[key].append(extra)
            for f in t.get("failovers") or []:
                failures[(f.get("provider") or "unknown", f.get("reason") or "unknown")] += 1
        yield _histogram("callweaver_turn_first_token_ms", "Caller prompt received to first reply token sent (ms)",
                         ["path", "provider", "cache"], first)
        yield _histogram("callweaver_turn_added_latency_ms", "First token sent minus provider first token (ms)",
                         ["path", "provider", "cache"], added)
        fail = CounterMetricFamily("callweaver_provider_failures", "LLM provider attempts that failed over",
                                   labels=["provider", "reason"])
        for (provider, reason), n in sorted(failures.items()):
            fail.add_metric([provider, reason], n)
        yield fail
        calls = GaugeMetricFamily("callweaver_calls", "Calls in the store by current status", labels=["status"])
        counts: dict[str, int] = defaultdict(int)
        for c in self.store.list_calls(since=self.since()):
            counts[c.status] += 1
        for status, n in sorted(counts.items()):
            calls.add_metric([status], n)
        yield calls
        circuit = GaugeMetricFamily("callweaver_provider_circuit_state",
                                    "1 for the provider's current circuit state", labels=["provider", "state"])
        for p in self.provider_health():
            for state in CIRCUIT_STATES:
                circuit.add_metric([p["name"], state], 1.0 if p["state"] == state else 0.0)
        yield circuit


def build_registry(collector: StoreCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
