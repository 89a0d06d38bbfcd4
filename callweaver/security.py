"""Twilio webhook signatures, the public URL Twilio used, and encryption of request-supplied credentials."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
from typing import Mapping
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken
from twilio.request_validator import (SIGNATURE_SETTINGS_HEADER, RequestValidator,
                                      get_signature_algorithm)

from .engine.addresses import is_public_address


def public_base_url(configured: str | None, headers: Mapping[str, str], scheme: str, host: str) -> str:
    """The https origin Twilio sees: configured PUBLIC_BASE_URL, else rebuilt from proxy headers."""
    if configured:
        return configured.rstrip("/")
    proto = (headers.get("X-Forwarded-Proto") or scheme or "http").split(",")[0].strip()
    fwd_host = (headers.get("X-Forwarded-Host") or host or "localhost").split(",")[0].strip()
    return f"{proto}://{fwd_host}"


def request_public_url(base: str, path: str, raw_query: str) -> str:
    """The exact URL Twilio requested: public origin + path + the raw (not re-encoded) query."""
    url = base.rstrip("/") + path
    return f"{url}?{raw_query}" if raw_query else url


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def websocket_url(base: str, path: str) -> str:
    """ws(s) URL for ConversationRelay: always wss://, except ws:// for an http base on this machine.

    Twilio only connects to wss://; a proxy that forgets X-Forwarded-Proto must not turn a public
    host's relay URL into ws://, so plain ws:// is reserved for local runs (tests, the simulator).
    """
    parts = urlsplit(base)
    local = parts.scheme == "http" and (parts.hostname or "") in LOOPBACK_HOSTS
    scheme = "ws" if local else "wss"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{path}"


class SignedForm(dict):
    """A multi-valued form (name → list of values) in the shape the SDK's RequestValidator reads first
    (`RequestValidator.get_values` asks for `getall`, then `getlist`): werkzeug's forms have only `getlist`, so the
    SDK raised and caught an AttributeError per field per HMAC, two HMACs per check (a 7-field webhook's check
    46–54 → 27–33 µs; docs/performance-history.md, "Issue 12w"). The values the SDK signs are the same."""

    getall = dict.__getitem__


def signature_is_valid(auth_token: str, url: str, params: Mapping | str | None, signature: str | None,
                       settings_header: str | None = None) -> bool:
    """Check X-Twilio-Signature with the SDK; for WebSocket upgrades also try the https/wss twin."""
    if not signature or not auth_token:
        return False
    if hasattr(params, "getlist"):  # a werkzeug form
        params = SignedForm(params.lists())  # type: ignore[union-attr]  # (name, every value), in order
    validator = RequestValidator(auth_token)
    algorithm = get_signature_algorithm(settings_header)
    candidates = [url]
    if url.startswith("wss://"):
        candidates.append("https://" + url[len("wss://"):])
    elif url.startswith("ws://"):
        candidates.append("http://" + url[len("ws://"):])
    elif url.startswith("https://"):
        candidates.append("wss://" + url[len("https://"):])
    elif url.startswith("http://"):
        candidates.append("ws://" + url[len("http://"):])
    return any(validator.validate(u, params if params is not None else {}, signature, algorithm)
               for u in candidates)



def outbound_url_refusal(url: str, *, allow_private: bool = False) -> str | None:
    """Why the server must not fetch a request-supplied URL (None when it may): it must be https and every
    address its host resolves to must be public, so a request cannot aim the server at its own network (SSRF).
    `allow_private` (ALLOW_PRIVATE_LLM_URLS, development only) lifts both rules for a local LLM server."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError:  # also an unclosed "[" of an IPv6 host
        return "must be an absolute https URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an absolute https URL"
    if allow_private:
        return None
    if parts.scheme != "https":
        return "must use https"
    # One answer whether the name has no address or a private one: which names the server's own DNS knows (an
    # internal network's) is not the request's business.
    refusal = f"host {parts.hostname!r} must resolve to public addresses only (it has none, or a non-public address)"
    try:
        infos = socket.getaddrinfo(parts.hostname, port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return refusal
    if not infos or not all(is_public_address(info[4][0]) for info in infos):
        return refusal
    return None


def token_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison of a configured token with what a request presented."""
    return bool(expected) and presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


class CredentialBox:
    """Fernet encryption (key derived from SECRET_KEY) for per-call Twilio credentials kept at rest."""

    def __init__(self, secret_key: str):
        digest = hashlib.sha256(("callweaver-credentials:" + secret_key).encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    def seal_json(self, value: dict) -> str:
        return self._fernet.encrypt(json.dumps(value).encode()).decode()

    def open_json(self, blob: str | None) -> dict | None:
        if not blob:
            return None
        try:
            value = json.loads(self._fernet.decrypt(blob.encode()))
        except (InvalidToken, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def seal(self, account_sid: str, auth_token: str) -> str:
        return self.seal_json({"sid": account_sid, "token": auth_token})

    def open(self, blob: str | None) -> tuple[str, str] | None:
        data = self.open_json(blob)
        return (data["sid"], data["token"]) if data and "sid" in data and "token" in data else None


# SHA-256 of the Twilio account SID and auth tokens built into the Call Flow Weaver web app's bundle as fallbacks
# (Darken11011/call-flow-weaver, src/services/twilioService.ts and PlaygroundModal.tsx, current and earlier
# versions). They are another account's leaked credentials: a make-call body carrying them means "the web app had
# nothing better", never "use this account". Only fingerprints are kept, so the secrets are not copied here.
BUNDLE_FALLBACK_CREDENTIAL_SHA256 = frozenset({
    "881a23b6f3ff2b49fd940fe272126fa1e5d0b68b193a856c46560565ef09f1a9",  # account SID AC64208c…
    "b7ae93eabbc75a8753c2e8b7edce9638ec80d13d27b947e017744a9eb9484e50",  # auth token 587e27…
    "011138b49782844fc7e28083b386aa7af23627dfcd73e7120b0498e301007e16",  # auth token ab3924… (earlier)
    "beee68c47526abae91d00abff94a9ba288e841d6d857e00cc334c572c23c2524",  # auth token 6322a7… (earlier)
})


def is_bundle_fallback_credential(value: str) -> bool:
    """True for a value built into the web app's bundle (recognised by its SHA-256, never by the value)."""
    return hashlib.sha256(value.encode()).hexdigest() in BUNDLE_FALLBACK_CREDENTIAL_SHA256
