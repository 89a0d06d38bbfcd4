"""Signed Twilio webhooks over plain HTTP, exactly as Twilio sends them."""
from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """X-Twilio-Signature exactly as Twilio computes it (the SDK's own algorithm)."""
    return RequestValidator(auth_token).compute_signature(url, dict(params or {}))


def http(method: str, url: str, *, form: Mapping[str, str] | None = None, json_body: Any = None,
         headers: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> HttpResult:
    """Plain HTTP with urllib so the simulator needs nothing beyond the standard library and the SDK."""
    data = None
    hdrs = dict(headers or {})
    if form is not None:
        data = urlencode(form).encode()
        hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif json_body is not None:
        data = json.dumps(json_body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return HttpResult(resp.status, dict(resp.headers), resp.read().decode())
    except urllib.error.HTTPError as err:
        return HttpResult(err.code, dict(err.headers), err.read().decode())


class TwilioWebhooks:
    """Sends webhooks to CallWeaver the way Twilio does: form-encoded and signed with the auth token."""

    def __init__(self, base_url: str, auth_token: str, account_sid: str = "AC" + "0" * 32):
        self.base_url = base_url.rstrip("/")
        self.auth_token = auth_token
        self.account_sid = account_sid

    def url(self, path_and_query: str) -> str:
        return path_and_query if path_and_query.startswith(("http://", "https://")) else self.base_url + path_and_query

    def post(self, path_and_query: str, params: Mapping[str, str], *, sign: bool = True,
             signature: str | None = None) -> HttpResult:
        url = self.url(path_and_query)
        headers = {}
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        elif sign:
            headers["X-Twilio-Signature"] = twilio_signature(self.auth_token, url, params)
        return http("POST", url, form=params, headers=headers)

    def status_callback(self, path_and_query: str, call_sid: str, status: str, sequence: int, **extra: str) -> HttpResult:
        params = {"AccountSid": self.account_sid, "CallSid": call_sid, "CallStatus": status,
                  "SequenceNumber": str(sequence), "CallbackSource": "call-progress-events",
                  "ApiVersion": "2010-04-01", "Direction": "outbound-api", **extra}
        return self.post(path_and_query, params)


def new_call_sid() -> str:
    return "CA" + secrets.token_hex(16)
