"""Measured performance: per-call and aggregate metrics, comparison, pipeline test, Prometheus, dashboard."""
from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, render_template
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import ApiError
from ..engine.conversation import probe_turn
from ..engine.metrics import LIVE_CALL_HORIZON_S, PUBLISHED_PEER_FIGURES, RecentTurns
from ..engine.prometheus import StoreCollector, build_registry
from ..engine.workflow import MAX_PROMPT_CHARS
from ..services import services
from .common import FEATURES, MAX_WINDOW_S, all_providers_failed, body_params, operator_only, whole_number

bp = Blueprint("metrics", __name__)


# The longest window a public figure may ask for: the longest one a worker keeps (longer ones are read from the
# store's rows on every request, which an unauthenticated GET must not be able to make a worker do at will).
MAX_PUBLIC_WINDOW_S = int(RecentTurns.MAX_KEPT_S)


def _window(longest: int = MAX_PUBLIC_WINDOW_S) -> int:
    return whole_number("window", services().settings.metrics_window_s, 1, longest, unit="seconds")


@bp.get("/api/performance-metrics/<tracking_id>")
def call_metrics(tracking_id: str):
    data = services().metrics.call(tracking_id)
    if data is None:
        raise ApiError(404, "No call found for tracking ID", trackingId=tracking_id)
    return jsonify(success=True, **data)


@bp.get("/api/performance-metrics")
def aggregate_metrics():
    svc = services()
    aggregated = services().metrics.aggregate(_window())
    # The contract's `expectedLatency` is what the web app reads; here it is the measured first-token p50.
    measured_first_token_p50_ms = aggregated["firstTokenMs"]["optimized"]["p50"]
    providers = svc.providers.health()
    status = "operational" if any(p["state"] != "open" for p in providers) else "degraded"
    return jsonify(success=True, aggregatedMetrics=aggregated,
                   optimization={"enabled": True, "systemStatus": status,
                                 "expectedLatency": measured_first_token_p50_ms,
                                 "providers": providers})


@bp.get("/api/performance-comparison")
def performance_comparison():
    comparison = services().metrics.comparison(_window())
    return jsonify(success=True, comparison=comparison,
                   competitors={"note": "published figures measured elsewhere on other set-ups; not comparable "
                                        "with CallWeaver's prompt-to-first-token and not measured here",
                                "entries": PUBLISHED_PEER_FIGURES},
                   features={**FEATURES, "measuredOnly": True})


@bp.post("/api/test-optimization")
def test_optimization():
    body = body_params()
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise ApiError(400, "Message is required")
    if len(message) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"message has {len(message)} characters (at most {MAX_PROMPT_CHARS})")
    language = body.get("language") or "en-US"
    engine = services().engine
    if engine.languages.resolve(language) is None:
        raise ApiError(400, engine.languages.refusal(language))
    result = probe_turn(engine, message.strip(), language)
    if result["providersFailed"]:  # no provider answered: the apology is no answer, say the pipeline failed
        return all_providers_failed(result["failovers"], optimization={"enabled": False, "fallbackUsed": True})
    return jsonify(success=True, test={
        "message": message, "language": result["language"], "processingTime": result["totalMs"],
        "optimization": {"enabled": True, "cacheUsed": result["cacheHit"],
                         "languageOptimized": result["languageKnown"], "performance": result["stages"]}},
        result={"response": result["text"], "source": result["source"], "provider": result["provider"],
                "confidence": None,
                "processingTime": result["totalMs"], "failovers": result["failovers"]},
        comparison={"traditional": None, "optimized": result["firstTokenMs"], "improvement": None,
                    "reason": "a single probe has no traditional counterpart; see /api/performance-comparison"})


@bp.get("/metrics")
@operator_only
def prometheus_metrics():
    svc = services()
    # Cumulative counters read from the store's counter rows: one row per series, whatever the history.
    registry = build_registry(StoreCollector(svc.store, svc.providers.health,
                                             live_since=lambda: time.time() - LIVE_CALL_HORIZON_S))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})


@bp.get("/api/dashboard-data")
@operator_only
def dashboard_data():
    svc = services()
    window = _window(MAX_WINDOW_S)
    reader = svc.metrics
    live = [{"trackingId": c.tracking_id, "status": c.status, "path": c.path, "language": c.language,
             "currentNode": c.current_node, "startedAt": c.created_at}
            for c in svc.store.live_calls(since=time.time() - LIVE_CALL_HORIZON_S)]
    return jsonify(success=True, generatedAt=time.time(), aggregated=reader.aggregate(window),
                   timeline=reader.timeline(window), liveCalls=live, providers=svc.providers.health(),
                   cache=svc.reply_cache.health())


@bp.get("/dashboard")
@operator_only
def dashboard():
    return render_template("dashboard.html")
