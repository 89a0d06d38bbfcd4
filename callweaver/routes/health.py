"""/, /health, /ping, /api/health-optimized, /api/test-workflow: answers from real checks, never canned."""
from __future__ import annotations

import json
import os
import platform

import structlog
from flask import Blueprint, jsonify, request

from .. import __version__
from ..engine.vendors import unconfigured_providers
from ..engine.workflow import Workflow
from ..health_facts import SERVICE_NAME, memory_body, memory_mb, now_iso, ping_body, uptime_s
from ..lifecycle import MAX_ERROR_TEXT_CHARS
from ..services import services
from ..store import StoreError
from .common import body_params

log = structlog.get_logger()
bp = Blueprint("health", __name__)
# Language optimisation is "active" when the language table holds at least this many entries (it ships ~60).
MIN_LANGUAGES_FOR_ACTIVE = 50
# /health warns once Redis uses this share of its maxmemory (at the limit, noeviction refuses every write).
REDIS_FULL_FRACTION = 0.9
STORE_CHECK_FAILED = {"sqlite": "the SQLite store cannot be opened or written (details in the server log)",
                      "redis": "Redis cannot be reached (details in the server log)"}


def _checks() -> dict:
    svc = services()
    s = svc.settings
    checks: dict = {}
    backend = "redis" if s.redis_url else "sqlite"
    try:
        checks["store"] = {"ok": True, "backend": backend, "pingMs": round(svc.store.ping(), 3)}
    except StoreError as exc:
        # The error names the SQLite file or the Redis host: the log has it, the public answer only what failed.
        log.error("store_check_failed", backend=backend, error=str(exc)[:MAX_ERROR_TEXT_CHARS])
        checks["store"] = {"ok": False, "backend": backend, "error": STORE_CHECK_FAILED[backend]}
    if checks["store"]["ok"]:
        try:
            memory = svc.store.memory()
        except StoreError as exc:  # it answered the ping: a failed memory read is no unreachable store
            log.warning("store_memory_check_failed", backend=backend, error=str(exc)[:MAX_ERROR_TEXT_CHARS])
            memory = None
        if memory is not None:
            checks["store"]["memory"] = memory
    checks["twilio"] = {"ok": bool(s.twilio_account_sid and s.twilio_auth_token and s.twilio_phone_number),
                        "hasAccountSid": bool(s.twilio_account_sid), "hasAuthToken": bool(s.twilio_auth_token),
                        "hasPhoneNumber": bool(s.twilio_phone_number),
                        "signatureValidation": bool(s.signatures_enforced and s.twilio_auth_token)}
    providers = svc.providers.health()
    # Circuit records live in the store, so this is every worker's (with Redis: every instance's) view;
    # `worker` only says which process answered.
    # `unconfigured`: each provider LLM_PROVIDERS lists that was left out, with the variables it lacks (names only).
    checks["llm"] = {"ok": any(p["state"] != "open" for p in providers), "providers": providers,
                     "unconfigured": unconfigured_providers(s), "worker": os.getpid()}
    return checks


def _store_memory_warnings(memory: dict | None) -> list[str]:
    """A Redis that is full, or that may evict what the service keeps (README "Redis memory")."""
    if not memory:
        return []
    warnings = []
    if memory["maxBytes"] and memory["usedBytes"] >= memory["maxBytes"] * REDIS_FULL_FRACTION:
        warnings.append(f"Redis memory is {'full' if memory['usedBytes'] >= memory['maxBytes'] else 'nearly full'}"
                        f" ({memory['usedBytes']} of {memory['maxBytes']} bytes): writes are refused at the limit")
    if memory["policy"] != "noeviction":
        warnings.append(f"Redis maxmemory-policy {memory['policy']} may evict call state, rate-limit windows or "
                        "socket claims when full: set noeviction")
    return warnings


def _status(checks: dict) -> tuple[str, list[str]]:
    warnings = []
    if not checks["store"]["ok"]:
        return "unhealthy", ["store unreachable: " + checks["store"].get("error", "")]
    warnings += _store_memory_warnings(checks["store"].get("memory"))
    if not checks["twilio"]["ok"]:
        missing = [n for n, k in (("TWILIO_ACCOUNT_SID", "hasAccountSid"), ("TWILIO_AUTH_TOKEN", "hasAuthToken"),
                                  ("TWILIO_PHONE_NUMBER", "hasPhoneNumber")) if not checks["twilio"][k]]
        warnings.append("Missing Twilio configuration: " + ", ".join(missing))
    if not checks["llm"]["providers"]:
        warnings.append("No LLM provider configured: " + "; ".join(
            f"LLM_PROVIDERS lists {name}, which needs {what}" for name, what in checks["llm"]["unconfigured"].items()))
    else:
        for p in checks["llm"]["providers"]:
            if p["state"] != "closed":
                warnings.append(f"LLM provider {p['name']} circuit is {p['state']}")
    return ("degraded" if warnings else "healthy"), warnings


def _advice(checks: dict) -> list[str]:
    """What an operator should change though nothing fails (the status stays as the checks say): the settings' own
    warnings as logged at start (no public URL, an unknown NODE_ENV, ...; not the exposure warnings, which would tell
    anyone what is open), and a listed LLM provider left out while another one answers (no failover). Variable names
    only, never secrets."""
    advice = list(services().settings.public_warnings)
    if checks["llm"]["providers"]:
        advice += [f"LLM provider {name} is listed in LLM_PROVIDERS but left out (no failover to it): it needs {what}"
                   for name, what in checks["llm"]["unconfigured"].items()]
    return advice


@bp.get("/health")
def health():
    svc = services()
    s = svc.settings
    checks = _checks()
    status, warnings = _status(checks)
    body = {
        "status": status,
        "timestamp": now_iso(),
        "uptime": uptime_s(),
        "service": SERVICE_NAME,
        "environment": {
            "nodeEnv": s.node_env, "port": s.port,
            "hasTwilioSid": bool(s.twilio_account_sid), "hasTwilioToken": bool(s.twilio_auth_token),
            "hasTwilioPhone": bool(s.twilio_phone_number),
            "hasAzureKey": bool(s.azure_openai_api_key), "hasAzureEndpoint": bool(s.azure_openai_endpoint),
            "hasTwilioConfig": checks["twilio"]["ok"],
            "hasAzureConfig": bool(s.azure_openai_api_key and s.azure_openai_endpoint),
        },
        "memory": memory_body(),
        "checks": checks,
    }
    warnings = [*warnings, *_advice(checks)]
    if warnings:
        body["warnings"] = warnings
    return jsonify(body), (503 if status == "unhealthy" else 200)


@bp.get("/ping")
def ping():
    return jsonify(ping_body())


@bp.get("/")
def index():
    from flask import current_app
    endpoints = sorted({f"{','.join(sorted(r.methods - {'HEAD', 'OPTIONS'}))} {r.rule}"
                        for r in current_app.url_map.iter_rules() if r.endpoint != "static"})
    return jsonify(message="CallWeaver: AI phone calls for Call Flow Weaver", version=__version__,
                   optimization={"enabled": True,
                                 "expectedLatency": None,
                                 "improvement": None,
                                 "reason": "latency figures are measured per call: see /api/performance-metrics "
                                           "and /api/performance-comparison"},
                   endpoints=endpoints)


@bp.get("/api/health-optimized")
def health_optimized():
    svc = services()
    checks = _checks()
    status, warnings = _status(checks)
    providers = checks["llm"]["providers"]
    usable = [p for p in providers if p["state"] != "open"]
    failover = "active" if len(usable) >= 2 else "degraded"
    relay = "active" if checks["twilio"]["ok"] and checks["store"]["ok"] else "degraded"
    cache_state = svc.reply_cache.health()
    summary = svc.metrics.summary(window_s=svc.settings.metrics_window_s) if checks["store"]["ok"] else None
    used, _total = memory_mb()
    load = svc.worker_load
    return jsonify(
        status=status,
        timestamp=now_iso(),
        optimization={"enabled": True, "features": {
            "conversationRelay": relay,
            "predictiveCache": "active" if cache_state.get("ok") else "degraded",
            "languageOptimization": "active" if len(svc.languages) >= MIN_LANGUAGES_FOR_ACTIVE else "degraded",
            "providerFailover": failover}},
        services={"performanceOrchestrator": "active" if status != "unhealthy" else "degraded",
                  "store": checks["store"], "providers": providers, "cache": cache_state},
        performance=summary,
        warnings=[*warnings, *_advice(checks)],
        environment={"nodeVersion": f"python-{platform.python_version()}",
                     "uptime": uptime_s(),
                     "memoryUsage": {"rssMB": round(used, 1)}},
        # the answering worker's event-loop lag and whether its make-call admits new calls (OVERLOAD_LOOP_LAG_MS)
        worker={"loopLagMs": round(load.lag_ms(), 1), "overloadLoopLagMs": load.threshold_ms,
                "admittingCalls": load.overloaded() is None, "probing": load.probing},
    ), (503 if status == "unhealthy" else 200)


@bp.route("/api/test-workflow", methods=["GET", "POST"])
def test_workflow():
    """Diagnostics the original exposed, minus every secret: only whether things are set."""
    s = services().settings
    params = {**request.args.to_dict(), **(body_params() if request.method == "POST" else {})}
    workflow_info = None
    raw = params.get("wd")
    if raw:
        try:
            data = json.loads(raw) if isinstance(raw, str) else raw
            payload = {"nodes": data.get("ns") or data.get("nodes"), "edges": data.get("es") or data.get("edges"),
                       "globalPrompt": data.get("gp") or data.get("globalPrompt")}
            wf = Workflow.from_payload({k: v for k, v in payload.items() if v is not None})
            workflow_info = {"hasId": bool(data.get("id")), "hasNodes": bool(payload["nodes"]),
                             "hasEdges": bool(payload["edges"]), "hasGlobalPrompt": bool(payload["globalPrompt"]),
                             "nodeCount": len(payload["nodes"] or []), "edgeCount": len(payload["edges"] or []),
                             "problems": wf.problems()}
        except Exception as exc:  # diagnostics endpoint: report, don't fail
            workflow_info = {"error": f"could not parse wd: {exc}"[:MAX_ERROR_TEXT_CHARS]}
    return jsonify(
        success=True, timestamp=now_iso(),
        environment={"hasTwilioSid": bool(s.twilio_account_sid), "hasTwilioToken": bool(s.twilio_auth_token),
                     "hasTwilioPhone": bool(s.twilio_phone_number), "hasAzureKey": bool(s.azure_openai_api_key),
                     "hasAzureEndpoint": bool(s.azure_openai_endpoint), "hasOpenAIKey": bool(s.openai_api_key),
                     "llmProviders": list(s.llm_providers), "nodeEnv": s.node_env, "port": s.port},
        workflow=workflow_info,
        azure={"hasApiKey": bool(s.azure_openai_api_key), "hasEndpoint": bool(s.azure_openai_endpoint),
               "hardcodedApiKey": False, "hardcodedEndpoint": False},
        requestInfo={"method": request.method, "hasQuery": bool(request.args),
                     "hasBody": bool(request.get_data()), "queryKeys": sorted(request.args.keys()),
                     "bodyKeys": sorted(body_params().keys()) if request.method == "POST" else []},
    )
