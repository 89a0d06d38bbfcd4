"""Request parsing and Twilio signature checks shared by the blueprints."""
from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any, Callable
from urllib.parse import urlsplit

import structlog
from flask import Response, after_this_request, g, jsonify, request

from ..engine import valid_json
from ..errors import LOGGED_ID_CHARS, ApiError, ids_named_by_request, twilio_request_form
from ..security import (SIGNATURE_SETTINGS_HEADER, public_base_url, request_public_url, signature_is_valid,
                        token_matches)
from ..rate_limits import client_address
from ..services import services
from ..units import SECONDS_PER_DAY

log = structlog.get_logger()

# What the optimized path offers, as the web app's make-call and comparison responses name it.
FEATURES = {"conversationRelay": True, "predictiveCache": True, "languageOptimization": True,
            "providerFailover": True}
# The ConversationRelay socket's path: the TwiML names it, the relay blueprint serves it.
RELAY_PATH = "/api/conversationrelay-ws"
# Paths only Twilio requests (its webhooks and the relay socket; /api/call-status is also the web app's poll, so it is
# not here): no browser page reads their answers, so they get no CORS headers (app.py, cors.py).
# tests/test_web_app_origins_and_credentials.py checks the list against the routes.
BROWSERLESS_PATHS = ("/api/twiml-default", "/api/twiml-ai", "/api/twiml-optimized", "/api/connect-action",
                     "/api/call-status-optimized", RELAY_PATH)
# The longest window a metrics or call-log query may ask for.
MAX_WINDOW_S = 30 * SECONDS_PER_DAY


WHOLE_NUMBER = re.compile(r"-?[0-9]+")


def whole_number(name: str, default: int, low: int, high: int, unit: str = "") -> int:
    """A whole-number query parameter in [low, high], or the default when absent or empty (`?limit=&offset=`, as an
    empty filter is no filter). ASCII digits only: int() would also read " +5", "1_0" and other scripts' digits,
    which nobody typing a URL means as a number."""
    raw = request.args.get(name)
    if not raw:
        return default
    if not WHOLE_NUMBER.fullmatch(raw):
        raise ApiError(400, f"{name} must be a whole number{unit and ' of ' + unit}")
    try:
        value = int(raw)
    except ValueError:  # more digits than int() converts
        raise ApiError(400, f"{name} must be between {low} and {high}{unit and ' ' + unit}")
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}{unit and ' ' + unit}")
    return value


def all_providers_failed(failovers: list[dict], **extra: Any) -> tuple[Response, int]:
    """Every LLM provider failed: the same honest JSON error (502, with the reason) from every endpoint."""
    return jsonify(success=False, error="Failed to generate AI response", status="failed",
                   details="every LLM provider failed", failovers=failovers, **extra), 502


def base_url() -> str:
    """Public origin for callback URLs: PUBLIC_BASE_URL, else the request as the proxy saw it."""
    return public_base_url(services().settings.public_base_url, request.headers, request.scheme, request.host)


MAX_JSON_DEPTH = 32  # the web app's deepest body (a workflow export) nests well under this


def body_params() -> dict[str, Any]:
    """The JSON object body; an empty body is {} (the web app posts end-call with an empty JSON body).

    Anything but application/json was already refused (415) by the app's cross-site check.
    """
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        data = valid_json.loads(raw)  # every string valid Unicode: a lone surrogate never reaches the store or an LLM
    except RecursionError:
        raise ApiError(400, f"JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "Malformed JSON body")
    if not isinstance(data, dict):
        raise ApiError(400, "JSON body must be an object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, f"JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, level by level without recursion (deep input must not exhaust the stack), up to
    MAX_JSON_DEPTH + 1 (deeper levels are not visited). json.loads builds only exact dicts and lists, so exact type
    checks suffice, and only containers are kept. Level by level, no (child, level) pair is built per container:
    the bench's 12.7 KB make-call body 40 → 15 µs (docs/performance-history.md, "p-setup")."""
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level and depth <= MAX_JSON_DEPTH:
        depth += 1
        below = []
        for item in level:
            for child in (item.values() if type(item) is dict else item):
                if type(child) is dict or type(child) is list:
                    below.append(child)
        level = below
    return depth


def twilio_params() -> dict[str, str]:
    """Twilio webhook fields: the form on POST, the query on GET."""
    return request.form.to_dict() if request.method == "POST" else request.args.to_dict()


def signature_ok(auth_token: str, url: str | None = None, params: Any = None) -> bool:
    """Fail closed: with no auth token nothing validates, unless TWILIO_VALIDATE_SIGNATURES=0 was set."""
    settings = services().settings
    if not settings.signatures_enforced:
        return True
    if not auth_token:
        return False
    url = url or request_public_url(base_url(), request.path, request.query_string.decode("latin-1"))
    if params is None:
        params = request.form if request.method == "POST" else {}
    return signature_is_valid(auth_token, url, params, request.headers.get("X-Twilio-Signature"),
                              request.headers.get(SIGNATURE_SETTINGS_HEADER))


def verify_twilio(*, url: str | None = None, params: Any = None):
    """Find the call a Twilio request is about and check its signature with that call's token.

    Returns (ok, record); a failure is logged with what is known about the request, never the token.
    """
    svc = services()
    tracking_id, call_sid = ids_named_by_request(twilio_request_form())
    record = svc.lifecycle.find(tracking_id, call_sid) if (tracking_id or call_sid) else None
    ok = signature_ok(svc.lifecycle.auth_token_for(record), url=url, params=params)
    if not ok:
        # Unsigned, so the sender's own text: only as much of it as an id can be (forged requests are not limited).
        log.warning("twilio_signature_rejected", path=request.path,
                    tracking_id=tracking_id and tracking_id[:LOGGED_ID_CHARS],
                    call_sid=call_sid and call_sid[:LOGGED_ID_CHARS],
                    # not "has_signature": a field named like a secret is redacted (logging._SECRET_KEY_RE)
                    unsigned=not request.headers.get("X-Twilio-Signature"))
    elif tracking_id or call_sid:
        bind_call(tracking_id or (record and record.tracking_id), call_sid)
    return ok, record


def bind_call(tracking_id: str | None, call_sid: str | None) -> None:
    """Every later log line of this request, and its access line, names the call it is about."""
    structlog.contextvars.bind_contextvars(tracking_id=tracking_id, call_sid=call_sid)


def forbidden() -> Response:
    return Response('{"success": false, "error": "Invalid Twilio signature"}', status=403,
                    mimetype="application/json")


def twilio_webhook(view: Callable) -> Callable:
    """Reject a webhook whose X-Twilio-Signature does not validate (403, logged, nothing stored)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        ok, record = verify_twilio()
        if not ok:
            return forbidden()
        g.twilio_call = record  # the verified call (None: none yet), for the TwiML error answer's language
        return view(*args, record=record, **kwargs)

    wrapper.twilio_webhook = True  # type: ignore[attr-defined]  # form bodies allowed (app._refuse_cross_site)
    return wrapper


# Headers a proxy or tunnel adds when it relays a request: a loopback peer that sent one is not this machine's user.
RELAYED_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Host")


def _loopback(address: str) -> bool:
    """An address of this machine's loopback interface (IPv4-mapped IPv6 and a zone id included)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _names_this_machine(host: str) -> bool:
    """A Host header naming this machine: a loopback address, or localhost and its subdomains (browsers resolve
    those to loopback themselves, RFC 6761). A page that rebinds its own name to 127.0.0.1 sends its own name."""
    try:
        name = (urlsplit("//" + host).hostname or "").rstrip(".")  # lowercased, without brackets or port
    except ValueError:  # an unclosed "[" of an IPv6 host
        return False
    return name == "localhost" or name.endswith(".localhost") or _loopback(name)


def from_this_machine() -> bool:
    """The request came from this machine itself: a loopback peer, relayed by no proxy or tunnel (ngrok, a reverse
    proxy on the same host and Render's router all connect from nearby and say whom they relay), for a host named
    as this machine (not a name rebound to 127.0.0.1 by another site, DNS rebinding)."""
    return (_loopback(request.remote_addr or "") and not any(request.headers.get(name) for name in RELAYED_HEADERS)
            and _names_this_machine(request.host))


def from_another_sites_page() -> bool:
    """A browser page of another origin sent this request: its Origin names neither the request's host nor
    PUBLIC_BASE_URL's (a proxy may pass on another Host), or is "null" (an opaque origin). Same-origin GETs
    usually send no Origin; Prometheus and curl send none."""
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    own = {request.host.casefold(), urlsplit(services().settings.public_base_url or "").netloc.casefold()} - {""}
    try:
        return urlsplit(origin).netloc.casefold() not in own
    except ValueError:  # an unclosed "[" of an IPv6 host: no page's origin
        return True


# Operator answers hold transcripts and phone numbers: never stored by a browser or proxy, never framed by another
# site, and their pages run only the app's own scripts (every text goes in through textContent; this is the backstop).
OPERATOR_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
}


def _operator_headers(response: Response) -> Response:
    response.headers.update(OPERATOR_HEADERS)
    return response


def operator_only(view: Callable) -> Callable:
    """Operator surfaces (the dashboard, the call log and their APIs, /metrics) need OPS_TOKEN, sent as a bearer
    token or as the basic-auth password (what a browser can send). With no OPS_TOKEN they are off in production and
    elsewhere answer only requests from this machine (`from_this_machine`): a development server reached through
    its public URL or a tunnel must not serve what callers said. Another site's page is refused either way."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        after_this_request(_operator_headers)  # on every answer, a refusal or a 404 too
        # CORS_ORIGINS lets listed pages read API answers, and a browser sends the dashboard's cached basic-auth
        # password with their requests too: operator answers are for the operator's own pages only.
        if from_another_sites_page():
            log.warning("operator_auth_refused", path=request.path, reason="another site's page",
                        origin=request.headers.get("Origin", "")[:200])
            raise ApiError(403, "Operator pages answer only their own pages, not another site's")
        settings = services().settings
        if not settings.ops_token:
            if settings.production:
                raise ApiError(403, "Operator pages are off: set OPS_TOKEN to enable them")
            if not from_this_machine():
                log.warning("operator_auth_refused", path=request.path, reason="no OPS_TOKEN, not from this machine")
                raise ApiError(403, "Operator pages answer only this machine without OPS_TOKEN: set OPS_TOKEN to "
                                    "reach them from elsewhere")
            return view(*args, **kwargs)
        auth = request.authorization
        presented = None if auth is None else (auth.token if auth.type == "bearer" else auth.password)
        right = token_matches(settings.ops_token, presented)
        if presented is not None:  # a guess at OPS_TOKEN: counted per client before it is answered (429 past it)
            services().ops_token_guesses.presented(
                client_address(request.environ, settings.trusted_proxy_hops), presented, right)
        if right:
            return view(*args, **kwargs)
        log.warning("operator_auth_refused", path=request.path, scheme=auth.type if auth else None)
        response = Response('{"success": false, "error": "OPS_TOKEN required (Authorization: Bearer <token>)"}',
                            status=401, mimetype="application/json")
        response.headers["WWW-Authenticate"] = 'Basic realm="CallWeaver operations", charset="UTF-8"'
        return response

    return wrapper


# Characters XML 1.0 cannot carry at all, escaped or not (C0 controls but tab/LF/CR, lone surrogates, U+FFFE/U+FFFF).
# The SDK escapes markup, not these: one in a model's reply or a flow's text made the whole TwiML unparsable (Twilio
# error 12100: the call ends with "an application error has occurred").
_NOT_XML_CHARS = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# ElementTree writes a lone surrogate (it has no UTF-8 form) as a decimal reference (`&#55357;`), just as unparsable.
_DECIMAL_REFS = re.compile(r"&#(\d{5});")


def _drop_surrogate_ref(match: re.Match) -> str:
    return "" if 0xD800 <= int(match[1]) <= 0xDFFF else match[0]


def xml_text(xml: str) -> str:
    """The SDK's TwiML with only characters XML allows (the others are dropped: none of them is spoken): what Twilio
    is given, answered by a webhook or sent inline with a call."""
    return _DECIMAL_REFS.sub(_drop_surrogate_ref, _NOT_XML_CHARS.sub("", xml))


def twiml_response(xml: str) -> Response:
    """The SDK's TwiML as Twilio needs it: 200, text/xml, never cached, and only characters XML allows (xml_text)."""
    resp = Response(xml_text(xml), status=200, mimetype="text/xml")
    resp.headers["Content-Type"] = "text/xml; charset=utf-8"
    resp.headers["Cache-Control"] = "no-cache"
    return resp
