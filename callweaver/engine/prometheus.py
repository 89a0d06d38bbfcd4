"""Prometheus metrics with Prometheus semantics, the same from every worker and instance.

Counters and histograms are cumulative since the store began: each turn adds its increments in the same store
write that records it (`turn_counters`), so they never go down when old turns leave a window or are purged, and a
scrape reads one row per series, whatever the stored history. Gauges (live calls, circuit state) are read now.
"""
from __future__ import annotations

import functools
import json
from collections import defaultdict
from typing import Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from ..store import CALLS_ENDED_COUNTER, counter_series
from .metrics import UNANSWERED, added_latency_ms

BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 750, 1000, 1500, 2500, 5000, 10000)
CIRCUIT_STATES = ("closed", "half_open", "open")
TURN_LABELS = ("path", "provider", "cache")
TURNS = "callweaver_turns"
PROVIDER_FAILURES = "callweaver_provider_failures"
SPECULATIONS = "callweaver_speculations"
SPECULATION_SIGNALS = "callweaver_speculations_by_signal"
CALLS_REFUSED_OVERLOADED = "callweaver_calls_refused_overloaded"
# Per-turn fields summed into plain counters: the cost of preemptive generation and hedged first tokens.
TURN_SUMS = {
    "callweaver_speculative_llm_requests": ("LLM requests of discarded speculations, with those of caller turns "
                                            "that never got a final transcript (extra cost)",
                                            "speculativeLlmRequests"),
    "callweaver_speculative_tokens": ("Streamed tokens of discarded speculations (extra cost)", "speculativeTokens"),
    "callweaver_hedged_llm_requests": ("Second requests started by hedged first tokens", "hedgedRequests"),
}
# histogram → (help, label names)
HISTOGRAMS = {
    "callweaver_turn_first_token_ms": ("Caller prompt received to first reply token sent (ms)", TURN_LABELS),
    "callweaver_turn_added_latency_ms": ("First token sent minus provider first token (ms)", TURN_LABELS),
    "callweaver_relay_final_to_first_token_ms": ("Relay turns: final prompt received to first reply token sent "
                                                 "(ms), by speculation outcome", ("speculation",)),
    "callweaver_speculation_saved_ms": ("Adopted speculations: their own time to first token minus the wait "
                                        "after the final prompt (ms)", ()),
}


def _parse_series(key: str) -> tuple[str, dict[str, str]] | None:
    try:
        name, labels = json.loads(key)
        return str(name), {str(k): str(v) for k, v in labels}
    except (ValueError, TypeError):
        return None


def _bucket(value: float) -> str:
    """The one bucket an observation is stored in; the exposition makes buckets cumulative."""
    return next((str(b) for b in BUCKETS_MS if value <= b), "+Inf")


def series_key(name: str, labels: Mapping[str, str]) -> str:
    """`counter_series`, remembered: a turn adds to ~10 series, and their names and labels repeat turn after turn."""
    return _series_key(name, tuple(labels.items()))


@functools.lru_cache(maxsize=1024)
def _series_key(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    return counter_series(name, dict(labels))


def turn_counters(turn: Mapping) -> dict[str, float]:
    """What one turn adds to the cumulative metrics; written by the store together with the turn itself."""
    labels = {"path": turn.get("path") or "unknown", "provider": turn.get("provider") or "none",
              "cache": "hit" if turn.get("cacheHit") else "miss"}
    out: dict[str, float] = defaultdict(float)
    out[series_key(TURNS, labels)] += 1
    speculation = turn.get("speculation") or "none"
    relay = turn.get("path") == "optimized"
    observed = [("callweaver_turn_first_token_ms", labels, turn.get("firstTokenMs")),
                ("callweaver_turn_added_latency_ms", labels, added_latency_ms(dict(turn))),
                ("callweaver_relay_final_to_first_token_ms", {"speculation": speculation},
                 turn.get("firstTokenMs") if relay else None),
                ("callweaver_speculation_saved_ms", {}, turn.get("savedMs") if speculation == "adopted" else None)]
    for name, series_labels, value in observed:
        if value is None:
            continue
        out[series_key(name + "_bucket", {**series_labels, "le": _bucket(float(value))})] += 1
        out[series_key(name + "_count", series_labels)] += 1
        out[series_key(name + "_sum", series_labels)] += float(value)
    if speculation == "adopted":
        out[series_key(SPECULATIONS, {"outcome": "adopted"})] += 1
    if turn.get("speculationsDiscarded"):
        out[series_key(SPECULATIONS, {"outcome": "discarded"})] += int(turn["speculationsDiscarded"])
    for signal, started in (turn.get("speculationSignals") or {}).items():
        adopted = 1 if speculation == "adopted" and turn.get("speculationSignal") == signal else 0
        for outcome, count in (("adopted", adopted), ("discarded", int(started) - adopted)):
            if count:
                out[series_key(SPECULATION_SIGNALS, {"signal": signal, "outcome": outcome})] += count
    for name, (_doc, field) in TURN_SUMS.items():
        if turn.get(field):
            out[series_key(name, {})] += float(turn[field])
    for failover in turn.get("failovers") or []:
        out[series_key(PROVIDER_FAILURES, {"provider": failover.get("provider") or "unknown",
                                           "reason": failover.get("reason") or "unknown"})] += 1
    return dict(out)


def unanswered_speculation_counters(cost: Mapping[str, int]) -> dict[str, float]:
    """What speculations of a caller turn that never got a final transcript add: no turn row carries them. Exposed
    as speculations{outcome="unanswered"} and in the extra-cost sums; UNANSWERED keeps the parts for the API."""
    out = {series_key(SPECULATIONS, {"outcome": "unanswered"}): float(cost["speculations"])}
    for name, field in (("callweaver_speculative_llm_requests", "llmRequests"),
                        ("callweaver_speculative_tokens", "tokens")):
        if cost.get(field):
            out[series_key(name, {})] = float(cost[field])
    for field, value in cost.items():
        out[series_key(UNANSWERED, {"field": field})] = float(value)
    return out


class StoreCollector:
    """Cumulative counters and histograms from the store's counter rows; live calls and circuit state now."""

    def __init__(self, store, provider_health: Callable[[], list[dict]],
                 live_since: Callable[[], float] = lambda: 0.0):
        self.store = store
        self.provider_health = provider_health
        self.live_since = live_since

    def collect(self) -> Iterable:
        turns = CounterMetricFamily(TURNS, "Caller turns answered, by path, provider and cache",
                                    labels=list(TURN_LABELS))
        failures = CounterMetricFamily(PROVIDER_FAILURES, "LLM provider attempts that failed over",
                                       labels=["provider", "reason"])
        calls = CounterMetricFamily(CALLS_ENDED_COUNTER, "Calls that ended, by final Twilio status",
                                    labels=["status"])
        speculations = CounterMetricFamily(SPECULATIONS, "Speculative turns started on interim transcripts, by "
                                           "outcome", labels=["outcome"])
        by_signal = CounterMetricFamily(SPECULATION_SIGNALS, "Speculative turns with a final transcript, by what "
                                        "started them and outcome", labels=["signal", "outcome"])
        refused = CounterMetricFamily(CALLS_REFUSED_OVERLOADED, "make-call requests refused (503) because the "
                                      "worker's event loop lagged past OVERLOAD_LOOP_LAG_MS, by path",
                                      labels=["path"])
        sums = {name: CounterMetricFamily(name, doc) for name, (doc, _field) in TURN_SUMS.items()}
        sum_values = dict.fromkeys(TURN_SUMS, 0.0)  # always exposed, 0 until the first such turn
        # histogram name → label values → {"buckets": {le: n}, "count": n, "sum": s}
        histograms: dict[str, dict[tuple, dict]] = {name: defaultdict(lambda: {"buckets": {}, "count": 0.0,
                                                                               "sum": 0.0})
                                                    for name in HISTOGRAMS}
        for key, value in sorted(self.store.counters().items()):
            parsed = _parse_series(key)
            if parsed is None:
                continue
            name, labels = parsed
            if name == TURNS:
                turns.add_metric([labels.get(k, "") for k in TURN_LABELS], value)
            elif name == PROVIDER_FAILURES:
                failures.add_metric([labels.get("provider", ""), labels.get("reason", "")], value)
            elif name == CALLS_ENDED_COUNTER:
                calls.add_metric([labels.get("status", "")], value)
            elif name == SPECULATIONS:
                speculations.add_metric([labels.get("outcome", "")], value)
            elif name == SPECULATION_SIGNALS:
                by_signal.add_metric([labels.get("signal", ""), labels.get("outcome", "")], value)
            elif name == CALLS_REFUSED_OVERLOADED:
                refused.add_metric([labels.get("path", "")], value)
            elif name in sums:
                sum_values[name] = value
            else:
                base, _, part = name.rpartition("_")
                if base not in histograms:
                    continue
                series = histograms[base][tuple(labels.get(k, "") for k in HISTOGRAMS[base][1])]
                if part == "bucket":
                    series["buckets"][labels.get("le", "+Inf")] = value
                elif part in ("count", "sum"):
                    series[part] = value
        yield turns
        yield failures
        yield calls
        yield speculations
        yield by_signal
        yield refused
        for name, family in sums.items():
            family.add_metric([], sum_values[name])
            yield family
        for name, (doc, label_names) in HISTOGRAMS.items():
            family = HistogramMetricFamily(name, doc, labels=list(label_names))
            for label_values, series in sorted(histograms[name].items()):
                running, buckets = 0.0, []
                for le in [*map(str, BUCKETS_MS), "+Inf"]:
                    running += series["buckets"].get(le, 0.0)
                    buckets.append((le, running))
                family.add_metric(list(label_values), buckets, sum_value=series["sum"])
            yield family
        live = GaugeMetricFamily("callweaver_live_calls", "Calls placed and not yet ended")
        live.add_metric([], self.store.count_live_calls(since=self.live_since()))
        yield live
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
