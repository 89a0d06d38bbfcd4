"""Twilio webhook signatures, the public URL Twilio used, and encryption of request-supplied credentials."""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
from typing import Mapping
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken
from twilio.request_validator import (SIGNATURE_SETTINGS_HEADER, RequestValidator,
                                      get_signature_algorithm)


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


def websocket_url(base: str, path: str) -> str:
    """ws(s) URL for ConversationRelay: wss:// for an https base, ws:// for local http runs."""
    parts = urlsplit(base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{path}"


def signature_is_valid(auth_token: str, url: str, params: Mapping | str | None, signature: str | None,
                       settings_header: str | None = None) -> bool:
    """Check X-Twilio-Signature with the SDK; for WebSocket upgrades also try the https/wss twin."""
    if not signature or not auth_token:
        return False
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
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an absolute https URL"
    if allow_private:
        return None
    if parts.scheme != "https":
        return "must use https"
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return f"host {parts.hostname!r} does not resolve"
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not address.is_global or address.is_multicast:
            return f"host {parts.hostname!r} resolves to a non-public address"
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
