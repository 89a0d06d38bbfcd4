"""The one module that talks to Twilio's REST API, through the twilio SDK.

The SDK builds every request (URL, auth, the SDK's headers, the form) and parses every answer (TwilioRestException
included); only its transport is ours, through the SDK's documented extension point (`Client(http_client=...)`):
`PooledTwilioHttpClient` sends on the keep-alive socket pool of `engine/llm_http.py` instead of a requests Session,
whose per-request environment merging, `email.feedparser` header parsing and charset guessing were most of the
27 % of set-up CPU that placing a call cost (docs/performance-history.md).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import time
import zlib
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import quote, urlencode, urlsplit

import requests
import structlog
from requests import certs
from requests.structures import CaseInsensitiveDict
from twilio.http import HttpClient
from twilio.base.exceptions import TwilioRestException
from twilio.http.response import Response
from twilio.rest import Client

from .engine.llm_http import ConnectFailed, ConnectionPool, Endpoint, Exchange, ReadTimedOut, UpstreamError

log = structlog.get_logger()
_sdk_logger = logging.getLogger("twilio.http_client")  # the SDK's own client logs here (request/response lines)

STATUS_CALLBACK_EVENTS = ["initiated", "ringing", "answered", "completed"]
# What requests leaves unescaped in a URL (requests.utils.requote_uri): control characters, spaces and non-ASCII
# in a path the SDK formatted from a caller-supplied call SID are escaped, never written raw into the request line.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
_IDLE_CONNECTIONS_PER_ORIGIN = 32
# A create's `Twiml` parameter: at most 4000 characters (Twilio's Call resource; error 32018 beyond). Counted in
# UTF-16 code units (a character outside the BMP is two), stricter than code points; Twilio does not document its
# count (UTF-8 bytes would be stricter still for non-ASCII text), so a create it refuses with 32018 is placed again
# with the URL (`TwilioGateway.create_call`).
MAX_INLINE_TWIML_CHARS = 4000
TWIML_TOO_LONG = 32018  # Twilio's error for a create's `Twiml` over its limit: no call was created


@dataclass(frozen=True)
class PlacedCall:
    sid: str
    status: str
    to: str
    from_number: str
    inline_twiml: bool = False  # Twilio was given the call's TwiML itself, not the URL to fetch it from


def fits_inline(twiml: str) -> bool:
    """Twilio takes `twiml` as a create's `Twiml` parameter (MAX_INLINE_TWIML_CHARS)."""
    return len(twiml.encode("utf-16-le")) // 2 <= MAX_INLINE_TWIML_CHARS


def _requests_trust() -> ssl.SSLContext:
    """The CA bundle requests would use: REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE (a file or a directory), else
    the bundle requests ships with (certifi's)."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certs.where()
    if os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


def _form(values: Mapping[str, Any]) -> str:
    """application/x-www-form-urlencoded as requests encodes a dict: a list value repeats its key, None is left
    out, everything else is its str()."""
    pairs = []
    for key, value in values.items():
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            if item is not None:
                pairs.append((key, item))
    return urlencode(pairs)


def _basic_auth(username: str, password: str) -> str:
    """The Authorization value requests sends for `auth=(username, password)` (latin-1, as requests encodes)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode("latin-1")).decode("ascii")


def _text(body: bytes, headers: Mapping[str, str]) -> str:
    """The body as text: decompressed if the server compressed it anyway, decoded with its declared charset
    (JSON without one is UTF-8)."""
    encoding = headers.get("content-encoding", "").lower()
    if encoding in ("gzip", "x-gzip"):
        body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    charset = "utf-8"
    for param in headers.get("content-type", "").split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "charset" and value:
            charset = value.strip('"')
    try:
        return body.decode(charset, errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


class PooledTwilioHttpClient(HttpClient):
    """A twilio SDK `HttpClient` on stdlib keep-alive sockets (`engine/llm_http.py`).

    Honours what the SDK's requests-based client honours: HTTP(S)_PROXY / ALL_PROXY / NO_PROXY (read once per
    origin), REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, the timeout (here one deadline for the whole exchange), and it
    raises requests' own exceptions when Twilio cannot be reached, so callers see the same errors. Redirects are
    never followed (the SDK asks for none). A request that must not repeat (anything but GET/HEAD/DELETE) is never
    re-sent on a new connection. No credentials are held: the SDK passes them with each request."""

    def __init__(self, timeout: float | None = None, logger: logging.Logger = _sdk_logger) -> None:
        super().__init__(logger, is_async=False, timeout=timeout)
        self._pools: dict[tuple[str, str], ConnectionPool] = {}
        self._trust: ssl.SSLContext | None = None

    def warm_up(self, url: str) -> None:
        """Open nothing, but build the origin's pool and its TLS trust (loading the CA bundle) now."""
        pool = self._pool(urlsplit(url))
        if pool.endpoint.tls:
            self._tls()

    def request(self, method: str, url: str, params: dict[str, object] | None = None,
                data: dict[str, object] | None = None, headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None, timeout: float | None = None,
                allow_redirects: bool = False) -> Response:
        """Send one request the SDK built and hand its answer back for the SDK to parse."""
        if timeout is None:
            timeout = self.timeout
        elif timeout <= 0:
            raise ValueError(timeout)
        method = method.upper()
        headers = dict(headers or {})
        if self.logger.isEnabledFor(logging.INFO):
            self.log_request({"method": method, "url": url, "params": params, "headers": headers})
        parts = urlsplit(url)
        query = "&".join(q for q in (parts.query, _form(params) if params else "") if q)
        target = quote((parts.path or "/") + (f"?{query}" if query else ""), safe=_URL_SAFE)
        if auth is not None:
            headers["Authorization"] = _basic_auth(*auth)
        content_type = headers.get("Content-Type", "")
        if data and content_type in ("application/json", "application/scim+json"):
            body = json.dumps(data, allow_nan=False).encode()
        elif data:
            body = _form(data).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        else:
            body = b""
        for name, value in headers.items():
            if any(c in f"{name}{value}" for c in "\r\n\0"):
                raise requests.exceptions.InvalidHeader(f"invalid header {name!r}")
        head = self._pool(parts).endpoint.head(method, target, headers)
        if body or method not in ("GET", "HEAD"):
            head += b"Content-Length: %d\r\n" % len(body)
        response = self._exchange(parts, head + b"\r\n" + body, method, timeout)
        if self.logger.isEnabledFor(logging.INFO):
            self.log_response(response.status_code, response)
        return response

    def _exchange(self, parts: Any, request: bytes, method: str, timeout: float | None) -> Response:
        timeout_s = timeout if timeout is not None else 60.0
        deadline = time.monotonic() + timeout_s
        exchange = Exchange(self._pool(parts))
        try:
            exchange.send(request, deadline, timeout_s, retry_stale=method in ("GET", "HEAD", "DELETE"),
                          raise_for_status=False)
            body = b"" if method == "HEAD" else exchange.read_body(deadline)
        except ReadTimedOut as error:
            exchange.close()
            raise requests.exceptions.ReadTimeout(f"Twilio did not answer in time ({error})") from None
        except ConnectFailed as error:
            exchange.close()
            raise requests.exceptions.ConnectionError(f"could not connect to Twilio ({error})") from None
        except UpstreamError as error:
            exchange.close()
            raise requests.exceptions.ConnectionError(f"the connection to Twilio failed ({error})") from None
        headers = exchange.headers
        return Response(exchange.status, _text(body, headers), CaseInsensitiveDict(headers))

    def _pool(self, parts: Any) -> ConnectionPool:
        key = (parts.scheme, parts.netloc)
        pool = self._pools.get(key)
        if pool is None:
            pool = ConnectionPool(Endpoint(f"{parts.scheme}://{parts.netloc}/", {}),
                                  max_idle=_IDLE_CONNECTIONS_PER_ORIGIN, tls_context=self._tls)
            self._pools[key] = pool
        return pool

    def _tls(self) -> ssl.SSLContext:
        if self._trust is None:
            self._trust = _requests_trust()
        return self._trust


class TwilioGateway:
    """Creates, ends and fetches calls; clients are built lazily so each gunicorn worker owns its own. Every client
    (the server's and one-off clients for request-supplied credentials) sends through one pooled transport."""

    def __init__(self, account_sid: str, auth_token: str, api_base_url: str | None = None,
                 timeout_s: float = 10.0):
        self._account_sid = account_sid
        self._auth_token = auth_token
        self._api_base_url = api_base_url
        self.timeout_s = timeout_s  # one request's deadline (the whole exchange)
        self._http = PooledTwilioHttpClient(timeout=timeout_s)
        self._client: Client | None = None

    @property
    def configured(self) -> bool:
        return bool(self._account_sid and self._auth_token)

    def _build(self, account_sid: str, auth_token: str) -> Client:
        client = Client(account_sid, auth_token, http_client=self._http)
        if self._api_base_url:
            client.api.base_url = self._api_base_url
        return client

    def client(self, credentials: tuple[str, str] | None = None) -> Client:
        """The server's client, or a one-off client for request-supplied credentials."""
        if credentials:
            return self._build(*credentials)
        if self._client is None:
            self._client = self._build(self._account_sid, self._auth_token)
        return self._client

    def warm_up(self) -> None:
        """Build the server's client, load the SDK's call resources and the transport's TLS trust now (worker
        start), not in the first make-call."""
        if self.configured:
            client = self.client()
            client.calls  # noqa: B018  (the SDK imports its API modules on first access)
            self._http.warm_up(client.api.base_url)

    def create_call(self, *, to: str, from_number: str, url: str, status_callback: str,
                    timeout_s: int, time_limit_s: int, record: bool,
                    credentials: tuple[str, str] | None = None, twiml: str | None = None) -> PlacedCall:
        """`time_limit_s`: Twilio hangs up after this long, whatever the call does (a caller keeping the line open
        would otherwise be billed for up to Twilio's default of 4 hours). `twiml`: the call's TwiML when it is known
        now; sent inline when it fits Twilio's limit (`fits_inline`), so Twilio runs it on answer without
        requesting `url` (sent only otherwise: Twilio ignores `Twiml` beside a `Url`); placed with `url` after all
        when Twilio refuses the TwiML as too long (32018, which creates no call)."""
        inline = twiml is not None and fits_inline(twiml)
        common = {"to": to, "from_": from_number, "status_callback": status_callback,
                  "status_callback_method": "POST", "status_callback_event": STATUS_CALLBACK_EVENTS,
                  "timeout": timeout_s, "time_limit": time_limit_s, "record": record}
        calls = self.client(credentials).calls
        try:
            call = calls.create(twiml=twiml, **common) if inline else calls.create(url=url, method="POST", **common)
        except TwilioRestException as exc:
            # Twilio documents "4000 characters", not how it counts them: a TwiML it counts as longer (32018)
            # places no call, so place it with the URL, as a TwiML over our own count is.
            if not inline or exc.code != TWIML_TOO_LONG:
                raise
            log.warning("inline_twiml_refused", code=exc.code, twiml_chars=len(twiml),
                        twiml_utf8_bytes=len(twiml.encode()))
            inline = False
            call = calls.create(url=url, method="POST", **common)
        return PlacedCall(sid=call.sid, status=call.status or "queued", to=to, from_number=from_number,
                          inline_twiml=inline)

    def watch_call(self, call_sid: str, *, status_callback: str, time_limit_s: int) -> str:
        """Ask Twilio to send the final status of a call we did not place (it rang in) to `status_callback` and to
        hang it up after `time_limit_s`: what create_call asks of a placed call. The server's account (a call that
        rang in has no request credentials). Twilio sends such a callback its `completed` event only."""
        call = self.client().calls(call_sid).update(status_callback=status_callback, status_callback_method="POST",
                                                   time_limit=time_limit_s)
        return call.status or ""

    def end_call(self, call_sid: str, credentials: tuple[str, str] | None = None) -> str:
        call = self.client(credentials).calls(call_sid).update(status="completed")
        log.info("twilio_call_ended", call_sid=call_sid, status=call.status)
        return call.status or "completed"

    def fetch_call(self, call_sid: str) -> dict:
        call = self.client().calls(call_sid).fetch()
        return {
            "sid": call.sid, "status": call.status, "direction": call.direction,
            "from": call._from, "to": call.to, "duration": call.duration,
            "price": call.price, "priceUnit": call.price_unit,
        }
