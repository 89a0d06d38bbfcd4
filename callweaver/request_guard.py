"""Slow and huge request bodies: read every body whole, under a deadline and a size cap, before the app runs.

gunicorn gives a request body no time limit, so a client that declares 1 MB and sends a byte every few seconds
holds a worker connection slot for as long as it likes; a thousand of them fill every slot and /health stops
answering. This WSGI middleware reads the body itself first:
- a declared body over MAX_BODY_BYTES → 413 at once, nothing read;
- a body not complete within BODY_READ_TIMEOUT_S → 408;
- more than MAX_UPLOADS_PER_CLIENT bodies arriving at once from one client (this worker) → 429 at once.
These refusals also close the connection's reading side, so gunicorn does not keep the slot to drain the rest.
The app then reads the buffered body as usual. WebSocket upgrades carry no body and pass straight through.

Answers are bounded the other way (WriteDeadline, WriteWatch): gunicorn writes an answer with no time limit either,
so a client that asks and never reads held the connection, and the greenlet writing to it, for ever. Each piece of
an answer (at most WRITE_PIECE bytes) must be taken within RESPONSE_WRITE_TIMEOUT_S, else the connection is closed;
and a client with MAX_ANSWERS_PER_CLIENT answers being written at once (this worker) gets 429 at once. A relay
socket is served inside the app call itself (flask-sock under gunicorn ends it there), so neither applies to it.
"""
from __future__ import annotations

import errno
import io
import json
import socket
import time
from collections import Counter
from typing import Any, Callable, Iterable

import structlog

from .cors import CorsPolicy, cors_request_headers
from .rate_limits import client_address

log = structlog.get_logger()

READ_CHUNK = 64 * 1024
WRITE_PIECE = 64 * 1024  # each piece of an answer is written under a deadline of its own
LOGGED_PATH_CHARS = 120
REFUSAL_LOG_INTERVAL_S = 10.0


class _Refusal:
    """A small JSON answer; when the server is gunicorn, reading stops afterwards so the connection closes
    instead of waiting for (and draining) a body that the client may never finish (`shutdown`: SHUT_RDWR stops
    writing too, once the answer is queued)."""

    def __init__(self, environ: dict, status: str, error: str, headers: list[tuple[str, str]],
                 shutdown: int = socket.SHUT_RD):
        self.environ = environ
        self.status = status
        self.body = json.dumps({"success": False, "error": error}).encode()
        self.headers = headers
        self.shutdown = shutdown

    def __call__(self, start_response: Callable) -> Iterable[bytes]:
        start_response(self.status, [("Content-Type", "application/json"),
                                     ("Content-Length", str(len(self.body))), *self.headers])
        return self

    def __iter__(self):
        yield self.body

    def close(self) -> None:
        sock = self.environ.get("gunicorn.socket")
        if sock is not None:
            try:
                sock.shutdown(self.shutdown)
            except OSError:
                pass


class BodyDeadlineExceeded(Exception):
    """The client did not send its whole body in time."""


def _read_with_deadline(stream: Any, limit: int, deadline_s: float) -> bytes:
    """Read to EOF (at most limit + 1 bytes); under gevent the whole read is bounded by `deadline_s`.

    Without gevent (the Flask test client, a debugger) reads come from memory or a local socket and no
    deadline is armed: only gevent can interrupt a blocked read without threads.
    """
    def read_all() -> bytes:
        chunks, size = [], 0
        while size <= limit:
            chunk = stream.read(min(READ_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    from gevent import monkey
    if not monkey.is_module_patched("socket"):
        return read_all()
    import gevent
    try:
        with gevent.Timeout(deadline_s):
            return read_all()
    except gevent.Timeout:
        raise BodyDeadlineExceeded() from None


class ResponseWriteTimeout(BrokenPipeError):
    """The client did not take a piece of its answer in time: the connection is given up as broken (errno EPIPE,
    so gunicorn closes it as it does for a client that left, without a traceback)."""

    def __init__(self) -> None:
        super().__init__(errno.EPIPE, "answer not taken by the client within RESPONSE_WRITE_TIMEOUT_S")


class WriteWatch:
    """The write deadlines of one worker's answers, checked by one repeating timer on gevent's hub every
    `deadline_s / 4` (at most every second): an answer whose piece has been with the server longer than `deadline_s`
    gets ResponseWriteTimeout thrown into the greenlet writing it, from the hub, as gevent's own Timeout does. A
    gevent Timeout per piece (made, started and cancelled, and one more for the server's closing write) cost ~15 µs
    of CPU per request (bench/request_guard_cost.py); marking a piece's hand-over costs a clock read. A deadline is
    met within a quarter of itself (at most 1 s) after it passes."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.period_s = min(1.0, deadline_s / 4)
        self.writing: dict["WriteDeadline", None] = {}  # answers handed to the server and not yet closed
        self.timer: Any = None

    def add(self, answer: "WriteDeadline") -> None:
        self.writing[answer] = None
        if self.timer is None:  # first answer of this worker (after the fork): start checking
            import gevent

            self.timer = gevent.get_hub().loop.timer(self.period_s, self.period_s)
            self.timer.ref = False  # never what keeps a process's hub running
            self.timer.start(self.check)

    def check(self) -> None:
        """On the hub: give up every answer whose piece is overdue."""
        now = time.monotonic()
        overdue = [a for a in self.writing if a.piece_since is not None and now - a.piece_since >= self.deadline_s]
        for answer in overdue:
            if answer.piece_since is not None and not answer.greenlet.dead:  # an earlier throw may have closed it
                answer.piece_since = None
                answer.timed_out = True
                answer.greenlet.throw(ResponseWriteTimeout)


class WriteDeadline:
    """The app's answer (its WSGI iterable), handed to the server in pieces of at most WRITE_PIECE bytes, each under
    the write deadline (WriteWatch): its clock starts as the piece is handed over and stops when the server asks for
    the next one, so it covers the server's write of that piece and never the app's time making the next. After the
    last piece it runs until the server closes the answer (gunicorn's closing write, the end of a chunked body,
    comes between). Counted as one of its client's answers being written until closed."""

    __slots__ = ("guard", "answer", "environ", "client", "greenlet", "piece_since", "timed_out", "pieces")

    def __init__(self, guard: "RequestBodyGuard", answer: Iterable[bytes], environ: dict, client: str):
        self.guard = guard
        self.answer = answer
        self.environ = environ
        self.client = client
        self.greenlet = guard.getcurrent()
        self.piece_since: float | None = None
        self.timed_out = False
        self.pieces: Any = None
        answers = guard.answers
        answers[client] = answers.get(client, 0) + 1
        guard.watch.add(self)

    def __iter__(self):
        """The pieces themselves: the server iterates them directly (no call through this object per piece)."""
        self.pieces = self._pieces()
        return self.pieces

    def _pieces(self):
        for item in self.answer:
            if len(item) <= WRITE_PIECE:
                self.piece_since = time.monotonic()
                yield item
                self.piece_since = None
                continue
            for start in range(0, len(item), WRITE_PIECE):
                self.piece_since = time.monotonic()
                yield item[start:start + WRITE_PIECE]
                self.piece_since = None
        self.piece_since = time.monotonic()

    def close(self) -> None:
        self.piece_since = None
        self.guard.watch.writing.pop(self, None)
        if self.timed_out:
            self.guard.log_throttled("response_write_timeout", self.environ, self.client)
        if self.pieces is not None:
            self.pieces.close()
        answers = self.guard.answers
        left = answers.get(self.client, 1) - 1
        if left > 0:
            answers[self.client] = left
        else:
            answers.pop(self.client, None)
        close = getattr(self.answer, "close", None)
        if close is not None:
            close()


class RequestBodyGuard:
    """WSGI middleware; one per worker app, so the per-client counts are this worker's. Its refusals never reach
    flask-cors, so they carry the app's CORS headers (`cors`, the app's policy) themselves: the web app reads their
    `error` as it reads the app's own. Only for a request naming an Origin: Twilio's never do."""

    def __init__(self, app: Callable, *, max_body_bytes: int, read_timeout_s: float, max_uploads_per_client: int,
                 trusted_proxy_hops: int, write_timeout_s: float = 10.0, max_answers_per_client: int = 20,
                 cors: CorsPolicy | None = None):
        import gevent
        from gevent import monkey

        self.app = app
        self.cors = cors
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.max_uploads_per_client = max_uploads_per_client
        self.trusted_proxy_hops = trusted_proxy_hops
        self.write_timeout_s = write_timeout_s
        self.max_answers_per_client = max_answers_per_client
        # Only gevent can interrupt a blocked write without threads, and only gunicorn is known to close every
        # answer (which ends its count): elsewhere (the Flask test client, even under gevent as in the in-process
        # benches; a debugger) answers are handed over as the app made them.
        self.bounds_answers = monkey.is_module_patched("socket")
        self.getcurrent = gevent.getcurrent
        self.watch = WriteWatch(write_timeout_s)
        self.uploads: Counter[str] = Counter()  # client → bodies being received right now
        self.answers: dict[str, int] = {}  # client → answers being written right now
        self.refusals_logged: dict[tuple[str, str], tuple[float, int]] = {}  # (event, client) → (logged at, since)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        declared = environ.get("CONTENT_LENGTH") or ""
        bodyless = declared in ("", "0") and "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not self.bounds_answers or "gunicorn.socket" not in environ:
            if bodyless:
                return self.app(environ, start_response)
            return self._body_first(environ, start_response, client_address(environ, self.trusted_proxy_hops))
        client = client_address(environ, self.trusted_proxy_hops)
        if self.max_answers_per_client and self.answers.get(client, 0) >= self.max_answers_per_client:
            # Its writing side is shut too, once the answer is queued: the requests such a client pipelined behind
            # this one (gunicorn has them buffered) are then never run, each for another refusal and access line.
            refusal = self._refuse(environ, "429 Too Many Requests", "client_answer_limit",
                                   "Too many answers to this client are still being written", client=client,
                                   shutdown=socket.SHUT_RDWR)
            return WriteDeadline(self, refusal(start_response), environ, client)
        # A bodyless request calls the app from here, one frame less: a relay socket's request greenlet keeps its
        # stack for the whole call (flask-sock serves the socket inside this call and ends it with StopIteration
        # under gunicorn, so a socket's answer is never wrapped).
        answer = (self.app(environ, start_response) if bodyless
                  else self._body_first(environ, start_response, client))
        return WriteDeadline(self, answer, environ, client)

    def _body_first(self, environ: dict, start_response: Callable, client: str) -> Iterable[bytes]:
        """The app's answer once the request's body is read whole (or the refusal)."""
        declared = environ.get("CONTENT_LENGTH") or ""
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._refuse(environ, "413 Request Entity Too Large", "request_body_too_large",
                                f"Request body too large (limit {self.max_body_bytes} bytes)",
                                client=client)(start_response)
        if self.max_uploads_per_client and self.uploads[client] >= self.max_uploads_per_client:
            return self._refuse(environ, "429 Too Many Requests", "client_upload_limit",
                                "Too many requests from this client are still sending their bodies",
                                client=client)(start_response)
        self.uploads[client] += 1
        try:
            body = _read_with_deadline(environ["wsgi.input"], self.max_body_bytes, self.read_timeout_s)
        except BodyDeadlineExceeded:
            return self._refuse(environ, "408 Request Timeout", "request_body_timeout",
                                f"Request body not received within {self.read_timeout_s:g} s",
                                client=client)(start_response)
        finally:
            self.uploads[client] -= 1
            if self.uploads[client] <= 0:
                del self.uploads[client]
        if len(body) > self.max_body_bytes:
            return self._refuse(environ, "413 Request Entity Too Large", "request_body_too_large",
                                f"Request body too large (limit {self.max_body_bytes} bytes)",
                                client=client)(start_response)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)

    def _refuse(self, environ: dict, status: str, event: str, error: str, client: str = "",
                shutdown: int = socket.SHUT_RD) -> _Refusal:
        """Answer and log (log_throttled)."""
        self.log_throttled(event, environ, client, status=int(status[:3]))
        cors = (self.cors.headers(environ.get("REQUEST_METHOD", ""), cors_request_headers(environ))
                if self.cors is not None and "HTTP_ORIGIN" in environ else [])
        return _Refusal(environ, status, error, cors, shutdown)

    def log_throttled(self, event: str, environ: dict, client: str, **fields: Any) -> None:
        """Log a refusal; one client's repeated ones are logged once per REFUSAL_LOG_INTERVAL_S with a count, so an
        attack costs neither log volume nor the CPU to write it."""
        now = time.monotonic()
        logged_at, suppressed = self.refusals_logged.get((event, client), (0.0, 0))
        if now - logged_at >= REFUSAL_LOG_INTERVAL_S:
            if len(self.refusals_logged) > 10_000:
                self.refusals_logged.clear()
            self.refusals_logged[(event, client)] = (now, 0)
            log.warning(event, **fields, method=environ.get("REQUEST_METHOD", "")[:10],
                        path=environ.get("PATH_INFO", "")[:LOGGED_PATH_CHARS], client=client or None,
                        suppressed_since_last=suppressed)
        else:
            self.refusals_logged[(event, client)] = (logged_at, suppressed + 1)
