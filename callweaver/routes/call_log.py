"""Call log on the ops dashboard: the paged list, one call's timeline, and first-token latency over time."""
from __future__ import annotations

from flask import Blueprint, jsonify, render_template, request

from .. import call_log
from ..engine.metrics import NO_SAMPLES
from ..errors import ApiError
from ..services import services
from ..store import CALL_STATUSES
from ..units import SECONDS_PER_HOUR, SECONDS_PER_MINUTE
from .common import MAX_WINDOW_S, operator_only, whole_number

bp = Blueprint("call_log", __name__)
LATENCY_POINTS = 360  # at most this many buckets across the chosen window
MIN_BUCKET_S = 10
PATHS = ("optimized", "traditional")


def _filter(name: str, allowed: tuple[str, ...] | None = None) -> str | None:
    value = (request.args.get(name) or "").strip() or None
    if value is not None and (len(value) > 64 or (allowed is not None and value not in allowed)):
        raise ApiError(400, f"{name} must be one of {', '.join(allowed)}" if allowed else f"{name} is too long")
    return value


def _language_filter() -> str | None:
    """The `language` filter as the table writes it (calls are stored under their table code: yue-HK is zh-HK)."""
    value = _filter("language")
    if value is None:
        return None
    languages = services().languages
    entry = languages.resolve(value)
    if entry is None:
        raise ApiError(400, languages.refusal(value))
    return entry.code


@bp.get("/api/call-log")
@operator_only
def call_log_page():
    limit = whole_number("limit", 25, 1, call_log.MAX_PAGE_SIZE)
    offset = whole_number("offset", 0, 0, 10_000_000)
    svc = services()
    page = call_log.call_page(svc.store, limit=limit, offset=offset, status=_filter("status", CALL_STATUSES),
                              path=_filter("path", PATHS), language=_language_filter(),
                              mask=svc.settings.mask_phone_numbers)
    return jsonify(success=True, **page)


@bp.get("/api/call-log/<tracking_id>")
@operator_only
def call_log_detail(tracking_id: str):
    svc = services()
    detail = call_log.call_detail(svc.store, tracking_id, mask=svc.settings.mask_phone_numbers,
                                  record_transcripts=svc.settings.record_transcripts)
    if detail is None:
        raise ApiError(404, "No call found for tracking ID", trackingId=tracking_id)
    return jsonify(success=True, **detail)


@bp.get("/api/call-latency")
@operator_only
def call_latency():
    """First-token p50/p95 across all calls' turns, bucketed over the window (default 1 h)."""
    window = whole_number("window", SECONDS_PER_HOUR, SECONDS_PER_MINUTE, MAX_WINDOW_S)
    bucket = max(MIN_BUCKET_S, window // LATENCY_POINTS // MIN_BUCKET_S * MIN_BUCKET_S)
    svc = services()
    # The worker's recent turns, topped up per poll like the dashboard's (not the whole window from the store).
    points = svc.metrics.timeline(window, bucket_s=bucket)
    return jsonify(success=True, windowSeconds=window, bucketSeconds=bucket,
                   points=[{"at": p["at"], "p50": p["p50"], "p95": p["p95"], "turns": p["turns"]} for p in points],
                   **({} if points else {"reason": NO_SAMPLES}))


@bp.get("/dashboard/calls")
@operator_only
def call_log_view():
    return render_template("call_log.html")


@bp.get("/dashboard/calls/<tracking_id>")
@operator_only
def call_detail_view(tracking_id: str):
    return render_template("call_detail.html", tracking_id=tracking_id)
