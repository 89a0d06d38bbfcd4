"""Prometheus exposition built from the store at scrape time: the same figures from every worker and instance."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

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


SPECULATION_COUNTERS = {
    "callweaver_speculative_llm_requests": ("LLM requests of discarded speculations (extra cost)",
                                            "speculativeLlmRequests"),
    "callweaver_speculative_tokens": ("Streamed tokens of discarded speculations (extra cost)", "speculativeTokens"),
    "callweaver_hedged_llm_requests": ("Second requests started by hedged first tokens", "hedgedRequests"),
}


def speculation_observations(turn: dict) -> dict[str, Any]:
    """What one relay turn adds to the preemptive-generation metrics (PREEMPTIVE_GENERATION)."""
    outcome = turn.get("speculation") or "none"
    return {
        "speculations": {"adopted": 1 if outcome == "adopted" else 0,
                         "discarded": int(turn.get("speculationsDiscarded") or 0)},
        "counters": {name: int(turn.get(field) or 0) for name, (_doc, field) in SPECULATION_COUNTERS.items()},
        "final_to_first_token": ((outcome,), turn.get("firstTokenMs")) if turn.get("path") == "optimized" else None,
        "saved": turn.get("savedMs") if outcome == "adopted" else None,
    }


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
        yield from self._speculation_families(turns)
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


    @staticmethod
    def _speculation_families(turns: list[dict]) -> Iterable:
        speculations: dict[str, int] = defaultdict(int)
        counters: dict[str, int] = defaultdict(int)
        final_first: dict[tuple, list[float]] = defaultdict(list)
        saved: dict[tuple, list[float]] = defaultdict(list)
        for t in turns:
            seen = speculation_observations(t)
            for outcome, n in seen["speculations"].items():
                speculations[outcome] += n
            for name, n in seen["counters"].items():
                counters[name] += n
            if seen["final_to_first_token"] and seen["final_to_first_token"][1] is not None:
                final_first[seen["final_to_first_token"][0]].append(float(seen["final_to_first_token"][1]))
            if seen["saved"] is not None:
                saved[()].append(float(seen["saved"]))
        family = CounterMetricFamily("callweaver_speculations", "Speculative turns started on interim transcripts, "
                                     "by outcome", labels=["outcome"])
        for outcome in ("adopted", "discarded"):
            family.add_metric([outcome], speculations[outcome])
        yield family
        for name, (doc, _field) in SPECULATION_COUNTERS.items():
            family = CounterMetricFamily(name, doc)
            family.add_metric([], counters[name])
            yield family
        yield _histogram("callweaver_relay_final_to_first_token_ms", "Relay turns: final prompt received to first "
                         "reply token sent (ms), by speculation outcome", ["speculation"], final_first)
        yield _histogram("callweaver_speculation_saved_ms", "Adopted speculations: their own time to first token "
                         "minus the wait after the final prompt (ms)", [], saved)


def build_registry(collector: StoreCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
