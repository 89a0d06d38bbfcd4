"""Latency, cache and failover figures computed from the measured per-turn timings in the store.

Nothing here estimates: a figure with no samples is None, with a reason next to it.
"""
from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Iterable

from ..store import counter_series
from ..units import SECONDS_PER_DAY

NO_SAMPLES = "no measured turns in this window"
NO_FIRST_TOKEN = "no turn with a measured first token yet"


def null_reasons(figures: dict[str, Any], reason: str) -> dict[str, str]:
    """`reason` for each figure that is null (its distributions and sub-objects carry their own)."""
    return {name: reason for name, value in figures.items() if value is None}
# Live calls are counted now, whatever a report's window; a call whose terminal status never arrived stops
# counting as live after this long.
LIVE_CALL_HORIZON_S = SECONDS_PER_DAY
# The stored counter (by field) of speculations whose caller turn never got a final transcript; for the API only,
# /metrics exposes them as callweaver_speculations{outcome="unanswered"} and in the extra-cost sums.
UNANSWERED = "cw_unanswered_speculations"
UNANSWERED_FIELDS = ("speculations", "llmRequests", "tokens")

# Published figures, quoted with their source; measured elsewhere, on other set-ups (voice-to-voice, not our
# prompt-to-first-token), so they are context, never a "% slower than us" claim.
PUBLISHED_PEER_FIGURES = [
    {"name": "Vapi", "metric": "voice-to-voice latency p50 (third-party tests)", "valueMs": [720, 900],
     "source": "docs/peers.md (third-party tests summarised there)", "comparable": False},
    {"name": "Retell AI", "metric": "voice-to-voice latency p50 (third-party tests)", "valueMs": [620, 680],
     "source": "docs/peers.md (third-party tests summarised there)", "comparable": False},
    {"name": "Bland AI", "metric": "voice-to-voice latency p50 (third-party tests)", "valueMs": [850, 850],
     "source": "docs/peers.md (third-party tests summarised there)", "comparable": False},
    {"name": "Twilio latency guide", "metric": "LLM time to first token target / upper limit",
     "valueMs": [375, 750], "source": "docs/peers.md (Twilio blog 'A Guide to Core Latency in AI Voice Agents', 2025-11-17)",
     "comparable": False},
]


def elapsed_ms(since: float, now: float) -> float:
    """Milliseconds between two readings of one clock, rounded as every stored timing is."""
    return round((now - since) * 1000, 3)


def nearest_rank(values: list[float], pct: float) -> float | None:
    """The nearest-rank percentile (a measured sample, never an interpolation); None for no samples.

    The one definition: the API's figures and the benchmarks' tables both use it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def percentile(values: list[float], pct: float) -> float | None:
    """`nearest_rank`, rounded as the API reports milliseconds."""
    value = nearest_rank(values, pct)
    return None if value is None else round(value, 3)


def distribution(values: Iterable[float | None]) -> dict[str, Any]:
    samples = [float(v) for v in values if v is not None]
    if not samples:
        return {"samples": 0, "p50": None, "p95": None, "p99": None, "mean": None, "reason": NO_SAMPLES}
    return {"samples": len(samples), "p50": percentile(samples, 50), "p95": percentile(samples, 95),
            "p99": percentile(samples, 99), "mean": round(sum(samples) / len(samples), 3)}


def ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def added_latency_ms(turn: dict) -> float | None:
    """Our own overhead on an LLM turn: first token sent to the caller minus the provider's first token. Relay turns
    only: a <Gather> turn's first "token" is its whole reply, so the difference there is mostly the model writing
    the rest. None for an adopted speculation: its request went out before the final prompt the first token is
    timed from."""
    if turn.get("source") != "llm" or turn.get("firstTokenMs") is None or turn.get("providerTtftMs") is None:
        return None
    if turn.get("path") != "optimized":
        return None
    if turn.get("speculation") == "adopted":
        return None
    return max(0.0, turn["firstTokenMs"] - turn["providerTtftMs"])


def turn_view(turn: dict) -> dict[str, Any]:
    """One turn as the metrics API shows it (no caller text: only its length)."""
    return {
        "index": turn.get("index"), "at": turn.get("at"), "path": turn.get("path"),
        "nodeId": turn.get("nodeId"), "nextNodeId": turn.get("nextNodeId"),
        "callerTextChars": turn.get("callerTextChars"), "source": turn.get("source"),
        "provider": turn.get("provider"), "providerTtftMs": turn.get("providerTtftMs"),
        "firstTokenMs": turn.get("firstTokenMs"), "lastTokenMs": turn.get("lastTokenMs"),
        "addedLatencyMs": added_latency_ms(turn), "interrupted": bool(turn.get("interrupted")),
        "cacheHit": bool(turn.get("cacheHit")), "failovers": turn.get("failovers") or [],
        "language": turn.get("language"), "action": turn.get("action"),
        "speculation": turn.get("speculation"), "speculationsStarted": turn.get("speculationsStarted") or 0,
        "speculativeLlmRequests": turn.get("speculativeLlmRequests") or 0, "savedMs": turn.get("savedMs"),
        "speculationSignal": turn.get("speculationSignal"), "speculationSignals": turn.get("speculationSignals") or {},
        "llmRequests": turn.get("llmRequests"), "hedgedRequests": turn.get("hedgedRequests") or 0,
    }


def unanswered_speculations(counters: dict[str, float]) -> dict[str, int]:
    """The cumulative cost of unanswered speculations since the store began, from the store's counters."""
    return {field: int(counters.get(counter_series(UNANSWERED, {"field": field}), 0)) for field in UNANSWERED_FIELDS}


def speculations_by_signal(turns: list[dict]) -> dict[str, dict[str, int]]:
    """Speculations started and adopted, by what started them (clientSpeaking off, a sentence mark, a stable
    transcript); unanswered speculations (no turn row) are not in it."""
    out: dict[str, dict[str, int]] = {}
    for turn in turns:
        for signal, started in (turn.get("speculationSignals") or {}).items():
            out.setdefault(signal, {"started": 0, "adopted": 0})["started"] += int(started)
        if turn.get("speculation") == "adopted" and turn.get("speculationSignal"):
            out.setdefault(turn["speculationSignal"], {"started": 0, "adopted": 0})["adopted"] += 1
    return out


def preemption_summary(turns: list[dict], unanswered: dict[str, Any]) -> dict[str, Any]:
    """Speculative turns (PREEMPTIVE_GENERATION): how often a speculation was adopted, what it saved, what it cost.

    Over relay turns only (the one path with interim transcripts). `savedMs` is measured per adopted turn: the
    speculation's own time to first token minus the wait after the final prompt. Extra requests and tokens are
    those of discarded speculations (tokens = streamed text chunks, about one model token each). `unanswered` is
    the cost of speculations whose caller turn never got a final transcript (no turn row holds it), over its own
    `window`: a call's own, or since the store began for the aggregate (counters have no window); when it is
    this call's, the per-turn extra-cost figures include it."""
    relay = [t for t in turns if t.get("path") == "optimized"]
    n = len(relay)
    speculated = [t for t in relay if t.get("speculationsStarted")]
    adopted = [t for t in relay if t.get("speculation") == "adopted"]
    same_window = unanswered.get("window") == "call"
    extra_requests = sum(t.get("speculativeLlmRequests") or 0 for t in relay) + (
        unanswered.get("llmRequests", 0) if same_window else 0)
    extra_tokens = sum(t.get("speculativeTokens") or 0 for t in relay) + (
        unanswered.get("tokens", 0) if same_window else 0)
    turn_requests = sum(t.get("llmRequests") or 0 for t in relay)
    return {
        "turns": n, "turnsSpeculated": len(speculated), "adopted": len(adopted),
        "discarded": sum(1 for t in relay if t.get("speculation") == "discarded"),
        "speculationsStarted": sum(t.get("speculationsStarted") or 0 for t in relay),
        "speculationsDiscarded": sum(t.get("speculationsDiscarded") or 0 for t in relay),
        "adoptionRate": ratio(len(adopted), len(speculated)),
        "bySignal": speculations_by_signal(relay),
        "savedMs": distribution(t.get("savedMs") for t in adopted),
        "finalToFirstTokenMs": {
            "adopted": distribution(t.get("firstTokenMs") for t in adopted),
            "notAdopted": distribution(t.get("firstTokenMs") for t in relay if t.get("speculation") != "adopted"),
        },
        "extraLlmRequests": extra_requests,
        "extraLlmRequestsPerTurn": ratio(extra_requests, n),
        "extraTokensPerTurn": ratio(extra_tokens, n),
        "llmRequestsPerTurn": ratio(turn_requests + extra_requests, n),
        "unanswered": unanswered,
        "hedgedRequests": sum(t.get("hedgedRequests") or 0 for t in relay),
        **({} if n else {"reason": "no relay turns in this window"}),
    }


def summarize_turns(turns: list[dict]) -> dict[str, Any]:
    n = len(turns)
    hits = sum(1 for t in turns if t.get("cacheHit"))
    errors = sum(1 for t in turns if t.get("source") == "apology")
    with_failover = sum(1 for t in turns if t.get("failovers"))
    first = distribution(t.get("firstTokenMs") for t in turns)
    return {
        "turns": n, "firstTokenMs": first, "lastTokenMs": distribution(t.get("lastTokenMs") for t in turns),
        "providerTtftMs": distribution(t.get("providerTtftMs") for t in turns),
        "addedLatencyMs": distribution(added_latency_ms(t) for t in turns),
        "cacheHits": hits, "cacheHitRate": ratio(hits, n), "errors": errors, "errorRate": ratio(errors, n),
        "failovers": sum(len(t.get("failovers") or []) for t in turns), "providerFailoverRate": ratio(with_failover, n),
        "interrupted": sum(1 for t in turns if t.get("interrupted")),
    }


class RecentTurns:
    """The turns of the recent windows, kept by one worker and topped up with only what is new.

    A dashboard polls every 2 s: the first poll reads its window from the store, later ones read the last few
    seconds (plus OVERLAP_S, so a turn committed a moment after its timestamp is not missed); turns that leave
    every window are dropped. Windows longer than MAX_KEPT_S are read from the store each time (rare, by hand).
    """

    # Turns re-read on each top-up: a turn committed a moment after its timestamp, and a turn row amended after it
    # was written (a goodbye the caller talked over, up to relay_session.PLAYBACK_WAIT_MAX_S later), are seen.
    OVERLAP_S = 30.0
    MAX_KEPT_S = float(SECONDS_PER_DAY)
    SLACK_S = 60.0  # a window of MAX_KEPT_S measured from a `since` taken a moment earlier still counts as kept

    def __init__(self, store, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._turns: dict[tuple, dict] = {}  # (trackingId, index) → turn
        self._kept_s = 0.0                   # the widest window asked for: everything newer is held
        self._read_at: float | None = None   # when the store was last read

    def since(self, since: float) -> list[dict]:
        """Turns with at >= since, oldest first; the same rows the store would return."""
        now = self.clock()
        if now - since > self.MAX_KEPT_S + self.SLACK_S:
            return self.store.recent_turns(since)
        with self._lock:
            if self._read_at is None or now - since > self._kept_s:
                # A margin: the same window asked again a moment later must not count as wider.
                self._kept_s = now - since + self.SLACK_S
                self._turns = {}
                fresh = self.store.recent_turns(now - self._kept_s)
            else:
                fresh = self.store.recent_turns(self._read_at - self.OVERLAP_S)
            self._read_at = now
            for turn in fresh:
                self._turns[(turn.get("trackingId"), turn.get("index"))] = turn
            horizon = now - self._kept_s
            self._turns = {k: t for k, t in self._turns.items() if (t.get("at") or 0) >= horizon}
            kept = [t for t in self._turns.values() if (t.get("at") or 0) >= since]
        kept.sort(key=lambda t: t.get("at") or 0)
        return kept


class MetricsReader:
    """Aggregates over the store's turns, so every worker and instance reports the same figures."""

    def __init__(self, store, clock: Callable[[], float] = time.time, recent: RecentTurns | None = None):
        self.store = store
        self.clock = clock
        self.recent = recent or RecentTurns(store, clock)

    def summary(self, window_s: int = 3600) -> dict[str, Any]:
        turns = self.recent.since(self.clock() - window_s)
        s = summarize_turns(turns)
        return {"windowSeconds": window_s, "turns": s["turns"], "firstTokenMs": s["firstTokenMs"],
                "cacheHitRate": s["cacheHitRate"]}

    def call(self, tracking_id: str) -> dict[str, Any] | None:
        """One call's measurements, safe to serve publicly: no callSid, phone numbers or caller text."""
        record = self.store.get_call(tracking_id)
        if record is None:
            return None
        turns = self.store.turns(tracking_id)
        history = self.store.status_history(tracking_id)
        s = summarize_turns(turns)
        end = record.ended_at or self.clock()
        duration_s = round(end - record.created_at, 3)
        first = s["firstTokenMs"]
        metrics = {
            "averageLatency": first["mean"], "p50Latency": first["p50"], "p95Latency": first["p95"],
            "p99Latency": first["p99"], "errorRate": s["errorRate"], "cacheHitRate": s["cacheHitRate"],
            "languageOptimizationRate": None, "providerFailoverRate": s["providerFailoverRate"],
            "totalProcessedRequests": s["turns"], "uptime": duration_s,
            "currentThroughput": round(s["turns"] / (duration_s / 60), 3) if duration_s > 0 and turns else None,
            "addedLatency": s["addedLatencyMs"], "providerTtft": s["providerTtftMs"],
            "lastTokenLatency": s["lastTokenMs"], "failovers": s["failovers"], "interrupted": s["interrupted"],
            "preemption": preemption_summary(turns, {
                **dict.fromkeys(UNANSWERED_FIELDS, 0),
                **((record.meta or {}).get("unansweredSpeculations") or {}), "window": "call"}),
        }
        measured_first = [t["firstTokenMs"] for t in turns if t.get("firstTokenMs") is not None]
        # Every null figure says why, named as the field it explains.
        reasons = null_reasons(metrics, "no caller turns yet" if not turns else NO_FIRST_TOKEN)
        reasons["languageOptimizationRate"] = "not a measured quantity; see callData.language"
        if not measured_first:
            reasons["totalLatency"] = NO_FIRST_TOKEN
        call_duration = next((h["payload"].get("CallDuration") for h in reversed(history)
                              if h.get("payload", {}).get("CallDuration")), None)
        return {
            "trackingId": tracking_id,
            "metrics": metrics,
            "callData": {
                "callSid": None, "status": record.status, "path": record.path,
                "language": record.language, "workflowId": record.workflow_id,
                "duration": int(call_duration) if call_duration else duration_s,
                "totalLatency": round(sum(measured_first), 3) if measured_first else None,
                "cacheHits": s["cacheHits"], "qualityScore": None, "currentNode": record.current_node,
                "createdAt": record.created_at, "endedAt": record.ended_at,
                "statusHistory": [{"status": h["status"], "sequence": h["sequence"], "receivedAt": h["receivedAt"]}
                                  for h in history],
                "turns": [turn_view(t) for t in turns],
            },
            "reasons": {**reasons, "qualityScore": "no call-quality measurement is taken",
                        "callSid": "withheld: this endpoint is public and a callSid is what end-call acts on"},
            "optimization": {"enabled": record.path == "optimized", "path": record.path,
                             "conversationRelay": record.path == "optimized",
                             "cacheable": any(t.get("cacheable") for t in turns)},
        }

    def aggregate(self, window_s: int) -> dict[str, Any]:
        now = self.clock()
        turns = self.recent.since(now - window_s)
        by_path: dict[str, list[dict]] = defaultdict(list)
        by_provider: dict[str, list[dict]] = defaultdict(list)
        for t in turns:
            by_path[t.get("path") or "unknown"].append(t)
            if t.get("provider"):
                by_provider[t["provider"]].append(t)
        s = summarize_turns(turns)
        active_calls = self.store.count_live_calls(since=now - LIVE_CALL_HORIZON_S)  # a terminal status ends a call
        return {
            "windowSeconds": window_s,
            "activeCalls": active_calls, "calls": self.store.count_calls(since=now - window_s),
            "totalProcessedRequests": s["turns"], "turns": s["turns"],
            "averageLatency": s["firstTokenMs"]["mean"],
            "cacheHitRate": s["cacheHitRate"], "errorRate": s["errorRate"],
            "errors": s["errors"], "failovers": s["failovers"],
            "firstTokenMs": {p: distribution(t.get("firstTokenMs") for t in by_path.get(p, []))
                             for p in ("optimized", "traditional")},
            "addedLatencyMs": distribution(added_latency_ms(t) for t in by_path.get("optimized", [])),
            "cache": {"hits": s["cacheHits"], "turns": s["turns"], "hitRate": s["cacheHitRate"],
                      "hitFirstTokenMs": distribution(t.get("firstTokenMs") for t in turns if t.get("cacheHit")),
                      "missFirstTokenMs": distribution(t.get("firstTokenMs") for t in turns
                                                       if not t.get("cacheHit") and t.get("source") == "llm")},
            "providers": {name: {"turns": len(ts), "ttftMs": distribution(t.get("providerTtftMs") for t in ts)}
                          for name, ts in sorted(by_provider.items())},
            "preemption": preemption_summary(
                turns, {**unanswered_speculations(self.store.counters()), "window": "since the store began"}),
            "reasons": null_reasons({"averageLatency": s["firstTokenMs"]["mean"], "cacheHitRate": s["cacheHitRate"],
                                     "errorRate": s["errorRate"]}, NO_SAMPLES if not turns else NO_FIRST_TOKEN),
        }

    def comparison(self, window_s: int) -> dict[str, Any]:
        turns = self.recent.since(self.clock() - window_s)
        trad = distribution(t.get("firstTokenMs") for t in turns if t.get("path") == "traditional")
        opt = distribution(t.get("firstTokenMs") for t in turns if t.get("path") == "optimized")
        improvement: dict[str, Any]
        if trad["samples"] and opt["samples"]:
            improvement = {"p50Ms": round(trad["p50"] - opt["p50"], 3),
                           "p50Percent": round((trad["p50"] - opt["p50"]) / trad["p50"] * 100, 2) if trad["p50"] else None,
                           "basis": "caller speech received → first reply text on its way to TTS, measured per turn"}
        else:
            missing = [name for name, d in (("traditional", trad), ("optimized", opt)) if not d["samples"]]
            improvement = {"p50Ms": None, "p50Percent": None,
                           "reason": f"no measured {' or '.join(missing)} turns in the last {window_s} s"}
        return {"windowSeconds": window_s, "traditional": trad, "optimized": opt, "improvement": improvement}

    def timeline(self, window_s: int, bucket_s: int = 60) -> list[dict[str, Any]]:
        """Per-bucket first-token latency: p50 by path (dashboard chart), p50/p95 over all calls (call log)."""
        now = self.clock()
        turns = self.recent.since(now - window_s)
        buckets: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for t in turns:
            if t.get("firstTokenMs") is None:
                continue
            b = int((t.get("at") or now) // bucket_s * bucket_s)
            buckets[b][t.get("path") or "unknown"].append(t["firstTokenMs"])
        out = []
        for b, v in sorted(buckets.items()):
            every = [ms for values in v.values() for ms in values]
            out.append({"at": b, "optimizedP50": percentile(v.get("optimized", []), 50),
                        "traditionalP50": percentile(v.get("traditional", []), 50),
                        "p50": percentile(every, 50), "p95": percentile(every, 95), "turns": len(every)})
        return out
