"""A stand-in LLM: a real loopback HTTP server speaking the OpenAI chat-completions API (SSE streaming).

The offline demo (`python -m callweaver.simulate --demo`) talks to it instead of a vendor; the tests script it
(`tests/fakes/fake_llm.py` re-exports it). It only ever binds 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import select
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

DEFAULT_REPLY_TEXT = "Hello there, how can I help you today?"
HANG_LIMIT_S = 60.0
DISCONNECT_POLL_S = 0.05

_OPENAI_PATH = re.compile(r"^(?:/v1)?/chat/completions/?$")
_AZURE_PATH = re.compile(r"^/openai/deployments/(?P<deployment>[^/]+)/chat/completions/?$")


# 400s a provider gives every request, whatever it says, as Azure and OpenAI word them: an api-version the resource
# does not serve, a parameter the configured model does not take.
CONFIGURATION_REFUSALS = {
    "400-api-version": {"code": "BadRequest", "message": "API version not supported"},
    "400-unsupported-parameter": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                             "Use 'max_completion_tokens' instead.",
                                  "type": "invalid_request_error", "param": "max_tokens",
                                  "code": "unsupported_parameter"},
}


@dataclass
class Reply:
    """One scripted answer; unset timings fall back to the server defaults."""

    text: str = DEFAULT_REPLY_TEXT
    tool_calls: list[tuple[str, dict]] = field(default_factory=list)
    ttft_s: float | None = None
    token_interval_s: float | None = None
    # After the text, before the first tool call (None: token_interval_s): a model that speaks, then decides to move
    # (to an end or transfer node) a while later, when Twilio may already have spoken its words.
    tool_call_delay_s: float | None = None
    # None | "500" | "429" | "400" (the request refused: a content filter) | a CONFIGURATION_REFUSALS key | "hang"
    # | "drop"
    fault: str | None = None
    drop_after_tokens: int = 3
    # Extra (not in the original brief): send SSE comment lines at this interval while waiting for the
    # first token (and during "hang"), the way real gateways keep idle streams alive.
    keepalive_interval_s: float | None = None


@dataclass
class RecordedRequest:
    """What the fake received and how far it got answering; fields are updated live by the server thread."""

    path: str
    headers: dict[str, str]  # keys lower-cased
    body: dict
    received_at: float
    first_token_at: float | None = None
    tokens_sent: int = 0
    finished: bool = False
    client_closed: bool = False

    @property
    def messages(self) -> list[dict]:
        return list(self.body.get("messages") or [])


def split_into_word_tokens(text: str) -> list[str]:
    """One token per word, each keeping its leading whitespace, so "".join(tokens) == text."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


class _ClientClosed(Exception):
    """The client went away while we were answering."""


class _ServerStopping(Exception):
    """stop() was called while an answer was still being written."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # 200+ concurrent streams connect at once

    def __init__(self, fake: "FakeLLM") -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can stall without a network.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        pass  # a client hanging up mid-answer is expected here, not noise for the test log


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.fake._track_connection(self.connection, add=True)

    def finish(self) -> None:
        self.server.fake._track_connection(self.connection, add=False)
        try:
            super().finish()
        except OSError:
            pass

    # ---------------------------------------------------------------- request entry

    def do_GET(self) -> None:
        self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        path_only = urlsplit(self.path).path
        azure_match = _AZURE_PATH.match(path_only)
        if not (azure_match or _OPENAI_PATH.match(path_only)):
            self._send_json(404, {"error": {"message": f"unknown path {path_only}", "type": "invalid_request_error"}})
            return
        try:
            body = json.loads(raw_body or b"{}")
        except ValueError:
            self._send_json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        record = RecordedRequest(
            path=self.path,
            headers={key.lower(): value for key, value in self.headers.items()},
            body=body,
            received_at=time.monotonic(),
        )
        reply = fake._next_reply(body)
        fake._record(record)
        model = body.get("model") or (azure_match.group("deployment") if azure_match else fake.name)
        try:
            self._answer(record, reply, model, streaming=bool(body.get("stream")))
        except _ClientClosed:
            record.client_closed = True
            self.close_connection = True
        except _ServerStopping:
            self.close_connection = True

    # ---------------------------------------------------------------- answers

    def _answer(self, record: RecordedRequest, reply: Reply, model: str, streaming: bool) -> None:
        fake = self.server.fake
        if reply.fault == "500":
            self._send_json(500, {"error": {"message": "fake upstream error", "type": "server_error"}})
            return
        if reply.fault == "400":  # as Azure's content filter or a parameter out of range refuses a request
            self._send_json(400, {"error": {"message": "The request was refused", "type": "invalid_request_error",
                                            "code": "content_filter"}})
            return
        if reply.fault in CONFIGURATION_REFUSALS:  # refusals every request gets: the provider's configuration
            self._send_json(400, {"error": CONFIGURATION_REFUSALS[reply.fault]})
            return
        if reply.fault == "429":
            self._send_json(
                429,
                {"error": {"message": "Rate limit exceeded", "type": "rate_limit_error"}},
                extra_headers={"Retry-After": "1"},
            )
            return
        ttft_s = reply.ttft_s if reply.ttft_s is not None else fake.ttft_s
        token_interval_s = reply.token_interval_s if reply.token_interval_s is not None else fake.token_interval_s
        if reply.fault == "hang":
            self._start_event_stream()
            self._wait_watching(HANG_LIMIT_S, keepalive_interval_s=reply.keepalive_interval_s)
            self.close_connection = True
            return
        if not streaming:
            self._wait_watching(ttft_s)
            record.first_token_at = time.monotonic()
            record.tokens_sent = len(split_into_word_tokens(reply.text))
            record.finished = True
            try:
                self._send_json(200, _completion_body(reply, model, fake.name))
            except _ClientClosed:
                record.first_token_at, record.tokens_sent, record.finished = None, 0, False
                raise
            return
        self._stream(record, reply, model, ttft_s, token_interval_s)

    def _stream(self, record: RecordedRequest, reply: Reply, model: str, ttft_s: float, token_interval_s: float) -> None:
        completion_id = self.server.fake._next_completion_id()
        created = int(time.time())

        def event(delta: dict, finish_reason: str | None = None) -> bytes:
            chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        self._start_event_stream()
        self._wait_watching(ttft_s, keepalive_interval_s=reply.keepalive_interval_s)
        role_sent = False
        tokens = split_into_word_tokens(reply.text)
        for index, token in enumerate(tokens):
            if reply.fault == "drop" and index >= reply.drop_after_tokens:
                self._drop_connection()
                return
            if index > 0:
                self._wait_watching(token_interval_s)
            delta = {"content": token}
            if not role_sent:
                delta = {"role": "assistant", "content": token}
                role_sent = True
            # Counters move before the write so a client that has read a token always sees it counted.
            first_token_at_before = record.first_token_at
            record.first_token_at = first_token_at_before or time.monotonic()
            record.tokens_sent += 1
            try:
                self._write_chunk(event(delta))
            except _ClientClosed:
                record.first_token_at = first_token_at_before
                record.tokens_sent -= 1
                raise
        if reply.fault == "drop":
            self._drop_connection()
            return
        for call_index, (name, arguments) in enumerate(reply.tool_calls):
            if call_index == 0 and tokens and reply.tool_call_delay_s is not None:
                self._wait_watching(reply.tool_call_delay_s)
            elif tokens or call_index > 0:
                self._wait_watching(token_interval_s)
            opening = {"index": call_index, "id": f"call_{completion_id[-8:]}_{call_index}", "type": "function",
                       "function": {"name": name, "arguments": ""}}
            delta = {"tool_calls": [opening]}
            if not role_sent:
                delta = {"role": "assistant", "content": None, "tool_calls": [opening]}
                role_sent = True
            if record.first_token_at is None:
                record.first_token_at = time.monotonic()
            self._write_chunk(event(delta))
            for piece in _split_in_pieces(json.dumps(arguments), 3):
                self._write_chunk(event({"tool_calls": [{"index": call_index, "function": {"arguments": piece}}]}))
        finish_delta: dict = {} if role_sent else {"role": "assistant", "content": ""}
        self._write_chunk(event(finish_delta, "tool_calls" if reply.tool_calls else "stop"))
        record.finished = True  # before the write: a client that read [DONE] must see finished
        try:
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_raw(b"0\r\n\r\n")
        except _ClientClosed:
            record.finished = False
            raise

    # ---------------------------------------------------------------- wire helpers

    def _send_json(self, status: int, payload: dict, extra_headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (extra_headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError as exc:
            raise _ClientClosed() from exc

    def _start_event_stream(self) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        except OSError as exc:
            raise _ClientClosed() from exc

    def _write_chunk(self, data: bytes) -> None:
        self._write_raw(b"%X\r\n%s\r\n" % (len(data), data))

    def _write_raw(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as exc:  # BrokenPipe / ConnectionReset: the client hung up
            raise _ClientClosed() from exc

    def _drop_connection(self) -> None:
        """Cut the TCP connection mid-body (no terminating chunk), like an upstream crash."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _wait_watching(self, seconds: float, keepalive_interval_s: float | None = None) -> None:
        """Sleep for `seconds` while watching the socket, so a client that hangs up is noticed at once."""
        if not seconds or seconds <= 0:
            return
        fake = self.server.fake
        deadline = time.monotonic() + seconds
        next_keepalive = time.monotonic() + keepalive_interval_s if keepalive_interval_s else None
        while not fake._stopping.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            wake_at = min(deadline, now + DISCONNECT_POLL_S)
            if next_keepalive is not None:
                if now >= next_keepalive:
                    self._write_chunk(b": keep-alive\n\n")
                    next_keepalive = now + keepalive_interval_s
                wake_at = min(wake_at, next_keepalive)
            try:
                readable, _, _ = select.select([self.connection], [], [], max(0.0, wake_at - now))
                if readable:
                    peeked = self.connection.recv(1, socket.MSG_PEEK)
                    if not peeked:
                        raise _ClientClosed()
                    time.sleep(DISCONNECT_POLL_S)  # unexpected bytes (pipelining); don't spin on them
            except (OSError, ValueError) as exc:
                raise _ClientClosed() from exc
        raise _ServerStopping()


def _split_in_pieces(text: str, count: int) -> list[str]:
    size = max(1, -(-len(text) // count))
    return [text[start:start + size] for start in range(0, len(text), size)] or [""]


def _completion_body(reply: Reply, model: str, name: str) -> dict:
    message: dict = {"role": "assistant", "content": reply.text if reply.text or not reply.tool_calls else None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{name}_{index}", "type": "function",
             "function": {"name": tool_name, "arguments": json.dumps(arguments)}}
            for index, (tool_name, arguments) in enumerate(reply.tool_calls)
        ]
    completion_tokens = len(split_into_word_tokens(reply.text))
    return {
        "id": f"chatcmpl-{name}-sync",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": "tool_calls" if reply.tool_calls else "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": completion_tokens, "total_tokens": 1 + completion_tokens},
    }


class FakeLLM:
    """Scriptable OpenAI/Azure-compatible chat-completions server on 127.0.0.1 (a fresh free port)."""

    def __init__(self, name: str = "fake", ttft_s: float = 0.0, token_interval_s: float = 0.0) -> None:
        self.name = name
        self._default_ttft_s = ttft_s
        self._default_token_interval_s = token_interval_s
        self.ttft_s = ttft_s
        self.token_interval_s = token_interval_s
        self.fault: str | None = None
        self.responder: Callable[[dict], Reply] | None = None
        self.requests: list[RecordedRequest] = []
        self._queue: list[Reply] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self.connections_opened = 0  # TCP connections accepted: shows whether clients reuse keep-alive connections
        self._completion_counter = 0
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "FakeLLM":
        self._stopping.clear()
        self._server = _Server(self)
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"fake-llm-{self.name}", daemon=True
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end hanging answers and cut open keep-alive connections."""
        self._stopping.set()
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            open_connections = list(self._connections)
        for connection in open_connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server = None

    def __enter__(self) -> "FakeLLM":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeLLM is not started")
        return self._server.server_address[1]

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root_url}/v1"

    def azure_full_endpoint(self, deployment: str = "gpt4omini", api_version: str = "2025-01-01-preview") -> str:
        """The original backend's AZURE_OPENAI_ENDPOINT form: the whole chat-completions URL."""
        return f"{self.root_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}"

    # ---------------------------------------------------------------- scripting

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.fault = None
            self.responder = None
            self.ttft_s = self._default_ttft_s
            self.token_interval_s = self._default_token_interval_s

    def wait_for_requests(self, n: int, timeout_s: float = 5) -> list[RecordedRequest]:
        """Block until at least `n` requests arrived; raises TimeoutError so a test fails with a reason."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.requests) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name}: expected {n} requests, got {len(self.requests)}")
                self._changed.wait(remaining)
            return list(self.requests)

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5) -> bool:
        """Poll `predicate` (e.g. lambda: fake.requests[0].client_closed) until true or timeout; returns its last value."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return bool(predicate())

    # ---------------------------------------------------------------- used by the handler threads

    def _next_reply(self, body: dict) -> Reply:
        with self._lock:
            if self.fault is not None:
                return Reply(fault=self.fault)
            if self._queue:
                return self._queue.pop(0)
            responder = self.responder
        return responder(body) if responder is not None else Reply()

    def _record(self, record: RecordedRequest) -> None:
        with self._changed:
            self.requests.append(record)
            self._changed.notify_all()

    def _next_completion_id(self) -> str:
        with self._lock:
            self._completion_counter += 1
            return f"chatcmpl-{self.name}-{self._completion_counter:06d}"

    def _track_connection(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
                self.connections_opened += 1
            else:
                self._connections.discard(connection)
