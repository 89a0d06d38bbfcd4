"""The one module that talks to Twilio's REST API, through the twilio SDK."""
from __future__ import annotations

from dataclasses import dataclass

import structlog
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

log = structlog.get_logger()

STATUS_CALLBACK_EVENTS = ["initiated", "ringing", "answered", "completed"]


@dataclass(frozen=True)
class PlacedCall:
    sid: str
    status: str
    to: str
    from_number: str


class TwilioGateway:
    """Creates, ends and fetches calls; clients are built lazily so each gunicorn worker owns its own."""

    def __init__(self, account_sid: str, auth_token: str, api_base_url: str | None = None,
                 timeout_s: float = 10.0):
        self._account_sid = account_sid
        self._auth_token = auth_token
        self._api_base_url = api_base_url
        self._timeout_s = timeout_s
        self._client: Client | None = None

    @property
    def configured(self) -> bool:
        return bool(self._account_sid and self._auth_token)

    def _build(self, account_sid: str, auth_token: str) -> Client:
        client = Client(account_sid, auth_token,
                        http_client=TwilioHttpClient(timeout=self._timeout_s, max_retries=0))
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
        """Build the server's client and load the SDK's call resources now (worker start), not in the first make-call."""
        if self.configured:
            self.client().calls  # noqa: B018  (the SDK imports its API modules on first access)

    def create_call(self, *, to: str, from_number: str, url: str, status_callback: str,
                    timeout_s: int, record: bool, credentials: tuple[str, str] | None = None) -> PlacedCall:
        call = self.client(credentials).calls.create(
            to=to, from_=from_number, url=url, method="POST",
            status_callback=status_callback, status_callback_method="POST",
            status_callback_event=STATUS_CALLBACK_EVENTS,
            timeout=timeout_s, record=record,
        )
        return PlacedCall(sid=call.sid, status=call.status or "queued", to=to, from_number=from_number)

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
