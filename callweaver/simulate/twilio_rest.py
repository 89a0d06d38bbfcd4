"""A stand-in for Twilio's REST API (Calls.json create/update/fetch) on loopback, recording what it received.

A call that rings in is made known to it with `ring_in` (Twilio knows every call on the account; an update of a
SID it does not know is a 404, as Twilio answers).

The simulator points CallWeaver at it (TWILIO_API_BASE_URL) so a call can be tried with no Twilio account;
the tests use it as their fake Twilio.
"""
from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class TwilioRequest:
    method: str
    path: str
    params: dict[str, list[str]]
    account_sid: str | None
    auth_ok: bool
    headers: dict[str, str] = field(default_factory=dict)  # as received (names as sent)
    body: str = ""                                          # the raw form body
    target: str = ""                                        # the request line's target, as sent
    client_port: int = 0                                    # one port for requests on one kept-alive connection

    def one(self, name: str) -> str | None:
        values = self.params.get(name)
        return values[0] if values else None


@dataclass
class TwilioError:
    status: int = 400
    code: int = 21211
    message: str = "The 'To' number is not a valid phone number."


MAX_TWIML_CHARS = 4000  # a create's `Twiml`: Twilio refuses a longer one (error 32018)


class TwilioRestStandIn:
    """Set `error` to make the next create fail the way Twilio does; read `requests` to assert parameters. Set
    `hold` (an Event) to keep every call update's answer back until it is set (a slow Twilio).

    A create needs `Url`, `Twiml` or `ApplicationSid`, as Twilio's does; a `Twiml` longer than `max_twiml_chars`
    (Twilio's 4000 characters; set it lower for a Twilio that counts a TwiML longer than CallWeaver does) is refused
    with Twilio's error 32018. `placed` maps each call created to its create request: what Twilio runs when
    the call is answered (`RelayCaller.answer_placed`) is that request's `Url`, else its `Twiml`, run as given
    (nothing fetched)."""

    def __init__(self, account_sid: str, auth_token: str):
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.requests: list[TwilioRequest] = []
        self.calls: dict[str, dict] = {}
        self.placed: dict[str, TwilioRequest] = {}
        self.max_twiml_chars = MAX_TWIML_CHARS
        self.error: TwilioError | None = None
        self.hold: threading.Event | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._tls = False

    @property
    def url(self) -> str:
        if self._tls:
            return f"https://localhost:{self._server.server_address[1]}"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def creates(self) -> list[TwilioRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/Calls.json")]

    def updates(self) -> list[TwilioRequest]:
        return [r for r in self.requests if r.method == "POST" and not r.path.endswith("/Calls.json")]

    def refusal(self, create: TwilioRequest) -> TwilioError | None:
        """Twilio's answer to a create that tells it no TwiML to run, or too long a `Twiml`."""
        if not (create.one("Url") or create.one("Twiml") or create.one("ApplicationSid")):
            return TwilioError(400, 21205, "A 'Url', 'Twiml' or 'ApplicationSid' parameter is required.")
        if create.one("Twiml") is not None and len(create.one("Twiml")) > self.max_twiml_chars:
            return TwilioError(400, 32018, "Twiml size exceeded maximum allowed value of 4000 characters")
        return None

    def ring_in(self, to: str, from_number: str) -> str:
        """A call ringing in on the account's number `to`: its SID, as Twilio's webhooks will name it."""
        call_sid = "CA" + secrets.token_hex(16)
        with self._lock:
            self.calls[call_sid] = {"sid": call_sid, "account_sid": self.account_sid, "to": to, "from": from_number,
                                    "status": "in-progress", "direction": "inbound", "duration": None,
                                    "price": None, "price_unit": "USD"}
        return call_sid

    def start(self, port: int = 0, tls: ssl.SSLContext | None = None) -> "TwilioRestStandIn":
        """Serve on 127.0.0.1 (`port` 0: a free one); over HTTPS for `localhost` with `tls` (a server context), as
        the real API is served."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                params = parse_qs(raw, keep_blank_values=True) if method == "POST" else parse_qs(parts.query)
                auth = self.headers.get("Authorization", "")
                sid, token = None, None
                if auth.startswith("Basic "):
                    sid, _, token = base64.b64decode(auth[6:]).decode().partition(":")
                auth_ok = sid == fake.account_sid and token == fake.auth_token
                req = TwilioRequest(method, parts.path, params, sid, auth_ok, headers=dict(self.headers.items()),
                                    body=raw, target=self.path, client_port=self.client_address[1])
                with fake._lock:
                    fake.requests.append(req)
                if not auth_ok:
                    return self._reply(401, {"code": 20003, "message": "Authenticate", "status": 401})
                segs = parts.path.strip("/").split("/")
                # 2010-04-01/Accounts/{sid}/Calls.json  or  .../Calls/{CallSid}.json
                if len(segs) == 4 and segs[3] == "Calls.json" and method == "POST":
                    err = fake.error or fake.refusal(req)
                    if err:
                        return self._reply(err.status, {"code": err.code, "message": err.message,
                                                        "more_info": f"https://www.twilio.com/docs/errors/{err.code}",
                                                        "status": err.status})
                    call_sid = "CA" + secrets.token_hex(16)
                    call = {"sid": call_sid, "account_sid": sid, "to": req.one("To"), "from": req.one("From"),
                            "status": "queued", "direction": "outbound-api", "duration": None,
                            "price": None, "price_unit": "USD"}
                    with fake._lock:
                        fake.calls[call_sid] = call
                        fake.placed[call_sid] = req
                    return self._reply(201, call)
                if len(segs) == 5 and segs[3] == "Calls" and segs[4].endswith(".json"):
                    call_sid = segs[4][:-5]
                    if method == "POST" and fake.hold is not None:
                        fake.hold.wait(10)
                    call = fake.calls.get(call_sid)
                    if call is None:
                        return self._reply(404, {"code": 20404, "message": f"The requested resource {parts.path} was not found", "status": 404})
                    if method == "POST" and req.one("Status"):
                        call["status"] = req.one("Status")
                    return self._reply(200, call)
                return self._reply(404, {"code": 20404, "message": "not found", "status": 404})

            def do_POST(self):
                self._handle("POST")

            def do_GET(self):
                self._handle("GET")

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024  # many calls placed at once (benchmarks) must not be reset
            daemon_threads = True

        self._server = Server(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        if tls is not None:  # the standard library's way to serve http.server over TLS
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self._tls = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
