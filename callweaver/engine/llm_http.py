"""The LLM streaming hot path: one prebuilt HTTP/1.1 request per turn, a keep-alive socket pool, SSE lines as bytes.

Built on the stdlib `socket`/`ssl` only (cooperative once gevent has patched them), so every read carries the
turn's own wall-clock deadline — no private attributes of any HTTP library. Under gevent the deadline is one event
loop timer per exchange (`ExchangeDeadline`), re-armed only when it fires early, instead of a socket timeout per
read (gevent starts and stops a `Timeout` for every blocking read of a socket with a timeout: measured at ~7 µs per
wake-up, one wake-up per token); without gevent, `settimeout` before each read. A pooled connection is checked
only when it is taken (one non-blocking peek), never the whole pool per request.
The openai SDK stays the configuration surface: `Endpoint.from_sdk_client` reads its public base URL, headers
and query (Azure api-version, keys) once per provider. The network around it is the SDK's too: HTTP_PROXY /
HTTPS_PROXY / ALL_PROXY / NO_PROXY pick a forward proxy per endpoint (urllib.request's reading of them; HTTPS
through a CONNECT tunnel), and TLS trusts what the SDK's HTTP stack trusts (`httpcore2.default_ssl_context`:
SSL_CERT_FILE / SSL_CERT_DIR, else the system store).
The same pool carries the twilio SDK's REST requests (callweaver/twilio_client.py: `Endpoint.head` for any method
and target, `Exchange.send` and `read_body` for a whole, non-streamed answer), with the TLS trust that SDK's stack
uses (`ConnectionPool(tls_context=...)`).

geventhttpclient (a C parser made for gevent) was measured as the replacement for the parsing here and kept out:
`python -m bench.llm_client` (docs/performance-history.md) shows it using more CPU per streamed turn, and its per-request
deadlines and cross-thread cancellation would need a `gevent.Timeout` per read and its private socket.
"""
from __future__ import annotations

import base64
import re
import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import quote, unquote, urlencode, urlsplit
from urllib.request import getproxies, proxy_bypass

from .addresses import is_public_address

RECV_BYTES = 65536
MAX_HEAD_BYTES = 65536
# The longest body line (an SSE event line) held while waiting for its end: a chat-completions chunk is a few KB at
# most, and a server that never ends a line (a request's own LLM server may be hostile) must not fill the worker.
MAX_LINE_BYTES = 1 << 20
# The most of an error answer's body read to learn why a request was refused (an OpenAI-style error object is a few
# hundred bytes).
MAX_ERROR_BODY_BYTES = 8192
# The deadline timer may fire this much before the deadline (libev's clock is the loop's cached time).
DEADLINE_SLACK_S = 0.001
# A deadline noticed later than this after it passed (its timer fired late, or the read began late) was missed by this
# worker's busy event loop, not by the provider: the attempt still ends if nothing came, but is not the provider's
# failure (providers.py leaves its circuit breaker alone). An idle worker's timers run late by a few ms at most.
LOOP_LAG_MARGIN_S = 0.25
# How long the one read past a deadline may take: its bytes are already readable (a TLS record may need the rest).
LATE_READ_BUDGET_S = 0.05
# How long a pool keeps what its host (or proxy) resolved to. Under gevent every lookup is a job for the hub's small
# threadpool (getaddrinfo blocks): on a busy worker a burst of new connections queued there for over a second each,
# which counted against the turns' first-token deadlines and opened a healthy provider's circuit. `python -m bench.relay
# --only callweaver --arrival steady --steady-rate 150 --calls 1500 --turns 3`: 2786-3198 of 4500 turns failed over or
# ended in the apology with a lookup per connection, none in three runs with one lookup per pool (2026-12-02).
ADDRESS_CACHE_S = 30.0


class UpstreamError(Exception):
    """The exchange failed; subclasses say how (providers.py maps them to failover reasons)."""


# How long the end of a finished reply (`[DONE]`, the body's last chunk) may take before the turn goes on without it.
FINISH_BUDGET_S = 0.25


class ConnectFailed(UpstreamError):
    """No connection (refused, DNS, TLS, or the connect deadline passed)."""


class ReadTimedOut(UpstreamError):
    """The turn's read deadline passed while waiting for bytes. `late_s`: how long after it passed this was noticed;
    `worker_late` when that is more than LOOP_LAG_MARGIN_S (this worker's loop was busy), so nothing proves the
    provider slow."""

    def __init__(self, message: str = "", *, late_s: float = 0.0) -> None:
        super().__init__(message)
        self.worker_late = late_s > LOOP_LAG_MARGIN_S


class ConnectionDropped(UpstreamError):
    """The connection closed or broke before the response was complete."""


class StatusError(UpstreamError):
    """The provider answered with an HTTP error status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@dataclass(frozen=True)
class Proxy:
    """The forward proxy the environment names for one endpoint, as the SDK's HTTP stack would pick it."""

    scheme: str
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value, from credentials in the proxy URL

    @classmethod
    def from_environment(cls, scheme: str, host_and_port: str) -> "Proxy | None":
        """HTTP(S)_PROXY for the endpoint's scheme, else ALL_PROXY; None when unset or NO_PROXY names the host
        (urllib.request.getproxies/proxy_bypass). A proxy URL without a scheme means http://, as in the SDK."""
        proxies = getproxies()
        url = proxies.get(scheme) or proxies.get("all")
        if not url or proxy_bypass(host_and_port):
            return None
        parts = urlsplit(url if "://" in url else f"http://{url}")
        authorization = None
        if parts.username is not None or parts.password is not None:
            credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
        return cls(parts.scheme.lower(), parts.hostname or "localhost",
                   parts.port or (443 if parts.scheme.lower() == "https" else 80), authorization)


class Endpoint:
    """Where a provider's chat completions go, with the request head (request line + fixed headers) prebuilt,
    and the proxy (if any) the environment routes it through."""

    def __init__(self, url: str, headers: Mapping[str, str]) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rsplit("@", 1)[-1]
        self.proxy = Proxy.from_environment(parts.scheme, self.host_header)
        self._head = self.head("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers)

    def head(self, method: str, target: str, headers: Mapping[str, str]) -> bytes:
        """A request head to this endpoint's origin: request line, Host, `headers`, keep-alive; no Content-Length
        line and no blank line (`request` and the twilio client add them). `target` is the path and query."""
        extra = []
        if self.proxy is not None and not self.tls:
            # a plain-HTTP proxy is the request's recipient: absolute-form target, and the proxy's credentials
            target = f"http://{self.host_header}{target}"
            if self.proxy.authorization:
                extra.append(f"Proxy-Authorization: {self.proxy.authorization}")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()
                  if name.lower() not in ("host", "content-length", "connection", "accept-encoding")]
        lines += ["Accept-Encoding: identity", "Connection: keep-alive", *extra]
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    def connect_request(self, address: str | None = None) -> bytes:
        """The CONNECT request that opens a tunnel to this endpoint through its proxy (HTTPS endpoints); to `address`
        instead of the host name when given (one already checked, so the proxy cannot resolve the name otherwise)."""
        host = address or self.host
        authority = f"{host}:{self.port}" if ":" not in host else f"[{host}]:{self.port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self.proxy is not None and self.proxy.authorization:
            lines.append(f"Proxy-Authorization: {self.proxy.authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @classmethod
    def from_sdk_client(cls, client: Any, deployment: str | None = None) -> "Endpoint":
        """The chat-completions endpoint of a configured `openai.OpenAI`/`openai.AzureOpenAI` client, read through
        its public `base_url`, `default_headers`, `auth_headers` and `default_query`; `deployment` for Azure."""
        path = f"deployments/{quote(deployment, safe='')}/chat/completions" if deployment else "chat/completions"
        url = str(client.base_url) + path
        query = {key: value for key, value in client.default_query.items() if isinstance(value, str)}
        if query:
            url += "?" + urlencode(query)
        headers = {name: value for name, value in {**client.default_headers, **client.auth_headers}.items()
                   if isinstance(value, str)}  # the SDK marks unset optional headers with an Omit object
        return cls(url, headers)

    def request(self, body: bytes) -> bytes:
        return b"%sContent-Length: %d\r\n\r\n%s" % (self._head, len(body), body)


def _public_address(host: str, port: int) -> tuple[str, int]:
    """The first address `host` resolves to, once every one of them is known to be public."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    if not infos or not all(is_public_address(info[4][0]) for info in infos):
        raise ConnectFailed("host resolves to a non-public address")
    return infos[0][4][0], port


class ConnectionPool:
    """Idle keep-alive sockets of one endpoint, newest first; only the socket being taken is checked."""

    def __init__(self, endpoint: Endpoint, max_idle: int = 500,
                 tls_context: Callable[[], ssl.SSLContext] | None = None, public_only: bool = False) -> None:
        """`tls_context` builds the TLS trust on first use (default: the openai SDK's, `httpcore2`).
        `public_only` (a URL a request supplied): every address the host resolves to when a connection is made must
        be public, and the connection goes to the address checked, so a name that resolved to a public address when
        the URL was accepted cannot later point the server at its own network (DNS rebinding)."""
        self.endpoint = endpoint
        self.public_only = public_only
        self.max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._tls_context: ssl.SSLContext | None = None
        self._build_tls_context = tls_context or _openai_sdk_tls_context
        # (host, port) → (looked up at, getaddrinfo's answer); one tuple swapped whole (OS threads may share a pool)
        self._addresses: tuple[tuple[str, int], float, list] | None = None

    def take(self, connect_deadline: float) -> tuple[socket.socket, bool]:
        """(socket, reused): an idle connection the server has not closed, or a new one."""
        while True:
            try:
                sock = self._idle.pop()  # atomic: OS threads may share a pool too (the twilio transport)
            except IndexError:
                return self._connect(connect_deadline), False
            if _still_open(sock):
                return sock, True
            sock.close()

    def give_back(self, sock: socket.socket) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(sock)
        else:
            sock.close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _connect(self, deadline: float) -> socket.socket:
        endpoint, proxy = self.endpoint, self.endpoint.proxy
        if proxy is not None and proxy.scheme != "http":
            raise ConnectFailed("unsupported proxy scheme")  # never silently around the proxy
        address = (proxy.host, proxy.port) if proxy is not None else (endpoint.host, endpoint.port)
        checked = None  # public_only: the address just found public, the one connected to or tunnelled to
        sock = None
        try:
            if self.public_only:
                if proxy is not None and not endpoint.tls:  # the proxy would resolve the name itself
                    raise ConnectFailed("a plain-http URL from a request cannot go through a proxy")
                checked = _public_address(endpoint.host, endpoint.port)[0]
                if proxy is None:
                    address = (checked, endpoint.port)
            sock = (socket.create_connection(address, timeout=_remaining(deadline, ConnectFailed)) if self.public_only
                    else self._connect_to(address, deadline))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if endpoint.tls:
                if proxy is not None:
                    _open_tunnel(sock, endpoint.connect_request(checked), deadline)
                sock.settimeout(_remaining(deadline, ConnectFailed))
                sock = self._tls().wrap_socket(sock, server_hostname=endpoint.host)
        except UpstreamError:
            self._addresses = None  # a connect that timed out, or a tunnel refused: look the host up afresh
            if sock is not None:
                sock.close()
            raise
        except (OSError, ssl.SSLError) as error:
            self._addresses = None  # the address no longer serves the host (e.g. its TLS handshake fails)
            if sock is not None:
                sock.close()
            raise ConnectFailed(type(error).__name__) from None
        return sock

    def _connect_to(self, address: tuple[str, int], deadline: float) -> socket.socket:
        """A connection to `address` at the first of its resolved addresses that answers (as create_connection
        does), with the lookup kept ADDRESS_CACHE_S; any failed connect (refused, timed out, or its TLS handshake or
        tunnel failing in _connect) forgets it, so the next one looks up afresh.
        Not for public_only pools: those check the addresses of every connection (DNS rebinding)."""
        now = time.monotonic()
        cached = self._addresses
        if cached is not None and cached[0] == address and now - cached[1] < ADDRESS_CACHE_S:
            infos = cached[2]
        else:
            infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)
            self._addresses = (address, now, infos)
        error: OSError = OSError("no address to connect to")
        for family, kind, proto, _name, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(_remaining(deadline, ConnectFailed))
                sock.connect(sockaddr)
                return sock
            except UpstreamError:
                sock.close()
                raise
            except OSError as failed:
                sock.close()
                error = failed
        self._addresses = None
        raise error

    def _tls(self) -> ssl.SSLContext:
        if self._tls_context is None:
            self._tls_context = self._build_tls_context()
        return self._tls_context


def _openai_sdk_tls_context() -> ssl.SSLContext:
    import httpcore2  # the openai SDK's HTTP stack: trust what it trusts (SSL_CERT_FILE/SSL_CERT_DIR)

    return httpcore2.default_ssl_context()


def _open_tunnel(sock: socket.socket, connect_request: bytes, deadline: float) -> None:
    """Ask the proxy for a tunnel and read its answer head; anything but 2xx fails the connect."""
    sock.settimeout(_remaining(deadline, ConnectFailed))
    sock.sendall(connect_request)
    answer = b""
    while b"\r\n\r\n" not in answer:
        if len(answer) > MAX_HEAD_BYTES:
            raise ConnectFailed("proxy answer too large")
        sock.settimeout(_remaining(deadline, ConnectFailed))
        more = sock.recv(4096)
        if not more:
            raise ConnectFailed("proxy closed the connection")
        answer += more
    head, _, rest = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(status) < 2 or not status[1].startswith(b"2") or rest:
        raise ConnectFailed(f"proxy refused the tunnel ({status[1][:3].decode('latin-1') if len(status) > 1 else '?'})")


def _still_open(sock: socket.socket) -> bool:
    """A non-blocking look: b"" (closed by the server) or stray bytes mean the socket cannot be reused. A TLS
    socket cannot be peeked (MSG_PEEK raises ValueError on it): decrypted bytes it already holds, or anything
    readable on its connection (a close_notify, a FIN, stray bytes) mean the same there."""
    if _is_tls(sock):
        if sock.fileno() < 0:  # closed here already (poll would refuse the -1)
            return False
        return not sock.pending() and not _readable_now(sock.fileno())
    try:
        sock.settimeout(0.0)
        return not sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False


def _is_tls(sock: socket.socket) -> bool:
    """An ssl.SSLSocket, the standard library's or gevent's (both hold decrypted bytes: `pending()`)."""
    return hasattr(sock, "pending")


def _has_bytes(sock: socket.socket) -> bool:
    """Bytes (or the end of the stream) wait on `sock` now: decrypted ones in a TLS socket, or readable ones on its
    connection. Never blocks."""
    try:
        if _is_tls(sock) and sock.pending():
            return True
        fd = sock.fileno()
        return fd >= 0 and _readable_now(fd)
    except (OSError, ValueError):
        return False


def _readable_now(fd: int) -> bool:
    """Whether `fd` has anything to read (or hung up), without waiting: the standard library's poll with timeout 0
    (gevent's cooperative one is not needed for a look that never blocks)."""
    from gevent import monkey
    poller = monkey.get_original("select", "poll")()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _remaining(deadline: float, error: type[UpstreamError]) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise error("deadline passed")
    return remaining



def cooperative_loop() -> Any:
    """The gevent event loop of this thread when gevent has patched `socket` (a gunicorn gevent worker), else None."""
    from gevent import monkey
    if not monkey.is_module_patched("socket"):
        return None
    import gevent
    return gevent.get_hub().loop


class ExchangeDeadline:
    """One exchange's read/write deadline under gevent: a single event-loop timer (`loop.timer`, gevent's public
    ILoop API) instead of a gevent `Timeout` per blocking socket call.

    The deadline moves with every token (the stall deadline), so the timer is not restarted each time: when it
    fires before the current deadline it is re-armed for the rest. When it fires past the deadline while the
    exchange is blocked on its socket, the socket is shut down (as `Exchange.abort` does), which wakes the
    blocked call; the exchange then raises ReadTimedOut. Outside a blocking call it does nothing: the next call
    checks the deadline itself before blocking, exactly as a per-call socket timeout would. A read whose socket
    already holds bytes when the timer fires is not cut: a busy worker's loop was late to run it, the provider was
    not late to answer (Exchange.may_read_late). It also holds the exchange's readable watcher (`wait_readable`), on
    the same loop."""

    __slots__ = ("_loop", "_wait", "_timer", "_armed_for", "deadline", "blocked_on", "expired", "_readable",
                 "_readable_on", "_tls", "late_s", "reading")

    def __init__(self, loop: Any) -> None:
        from gevent.socket import wait  # gevent's documented "block until this watcher is ready"

        self._loop = loop
        self._wait = wait
        self._timer = None
        self._readable = None  # an io watcher on the exchange's socket (`wait_readable`), made once per socket
        self._readable_on: socket.socket | None = None
        self._tls = False
        self._armed_for = float("inf")  # the deadline the running timer was started for
        self.deadline = float("inf")
        self.blocked_on: socket.socket | None = None  # the socket a call is blocked on, while it is
        self.expired = False
        self.late_s = 0.0  # how long after the deadline the timer that expired it fired
        self.reading = False  # the blocked call is a read (not a write)

    def set(self, deadline: float) -> None:
        """The deadline of the blocking call about to start (ReadTimedOut at once if it has passed)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:  # long past: this worker's loop got to the call late (ReadTimedOut.worker_late)
            raise ReadTimedOut("deadline passed", late_s=-remaining)
        self.deadline = deadline
        if deadline < self._armed_for:  # first call, or an earlier deadline (finish()'s short budget)
            self._arm(remaining)

    def _arm(self, after: float) -> None:
        if self._timer is not None:
            self._timer.close()
        self._timer = self._loop.timer(after)
        self._armed_for = self.deadline
        self._timer.start(self._fired)

    def _fired(self) -> None:
        self._armed_for = float("inf")
        remaining = self.deadline - time.monotonic()
        if remaining > DEADLINE_SLACK_S:
            self._arm(remaining)  # the deadline moved on since the timer was started
            return
        sock = self.blocked_on
        if sock is not None:
            if self.reading and _has_bytes(sock):
                # The answer is here; this worker's loop is late to read it. The blocked read wakes on its own
                # readiness (the deadline's one late read: Exchange._recv), bounded by a short budget in case it
                # needs more than what came (the rest of a TLS record).
                self.deadline = time.monotonic() + LATE_READ_BUDGET_S
                self._arm(LATE_READ_BUDGET_S)
                return
            self.expired = True
            self.late_s = -remaining
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_readable(self, sock: socket.socket) -> None:
        """Wait until `sock` has bytes to read (or was shut down) before reading it. gevent's own recv first tries
        the read and waits only when it fails: one failed system call (EAGAIN) and one exception more for each
        token, which arrives alone 20-50 ms after the one before. Uses the loop's io watcher and gevent.socket.wait
        (both public); the deadline's shutdown and an abort make the socket readable, so they end this wait too."""
        watcher = self._readable
        if watcher is None or self._readable_on is not sock:
            self._close_readable()
            watcher = self._readable = self._loop.io(sock.fileno(), 1)
            self._readable_on, self._tls = sock, _is_tls(sock)
        if self._tls and sock.pending():
            return  # TLS: decrypted bytes are already waiting in the SSL object, not on the socket
        self._wait(watcher)

    def _close_readable(self) -> None:
        if self._readable is not None:
            self._readable.close()
            self._readable, self._readable_on = None, None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._armed_for = float("inf")
        self._close_readable()


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _take_lines_with_cr(body: bytearray, at_end: bool) -> list[bytes]:
    """The complete lines at the front of `body` (taken out of it), ended by CRLF, CR or LF: the SSE spec allows
    all three. A CR that ends the buffer may be the first half of a CRLF, so it waits for the next byte (or the
    body's end)."""
    last = max(body.rfind(b"\n"), body.rfind(b"\r", 0, len(body) - (0 if at_end else 1)))
    if last < 0:
        return []
    text = bytes(body[:last + 1])
    del body[:last + 1]
    return _LINE_END.split(text[:-2] if text.endswith(b"\r\n") else text[:-1])


class Exchange:
    """One streamed POST: send it, read the head, then the body's lines; abort() works from another greenlet."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._sock: socket.socket | None = None
        self._aborted = False
        self.written_at: float | None = None  # when the request's last byte was written (provider TTFT starts)
        self.status = 0
        self.headers: dict[str, str] = {}  # the response's headers, names lowercased
        self._raw = bytearray()    # bytes read, not yet decoded from the transfer encoding
        self._body = bytearray()   # decoded body, not yet returned as lines
        self._chunked = False
        self._chunk_left = 0       # chunked: bytes of the current chunk still to decode
        self._chunk_state = "size"  # size | data | crlf | trailer | done
        self._length_left: int | None = None  # Content-Length bodies
        self._keep_alive = True
        self._complete = False
        self._late_read_for: float | None = None  # the deadline whose one late read was taken (may_read_late)
        self.late_reads = 0  # reads past their deadline of bytes already there: this worker's loop lag
        loop = cooperative_loop()
        self._deadline = ExchangeDeadline(loop) if loop is not None else None

    # ---- request and head -----------------------------------------------------------------------
    def start(self, body: bytes, deadline: float, connect_timeout_s: float) -> None:
        """Send the endpoint's POST with `body` and read the status line and headers (StatusError on >= 400); a
        reused connection the server had already closed (nothing came back at all) is retried once on a new one."""
        self.send(self._pool.endpoint.request(body), deadline, connect_timeout_s)

    def send(self, request: bytes, deadline: float, connect_timeout_s: float, *, retry_stale: bool = True,
             raise_for_status: bool = True) -> None:
        """Send a whole request and read the response head. `retry_stale=False` never sends it twice (a request
        that must not repeat: a reused connection found closed fails instead); `raise_for_status=False` keeps an
        error status's body readable (`read_body`)."""
        for _ in range(2):
            connect_deadline = min(deadline, time.monotonic() + connect_timeout_s)
            sock, reused = self._pool.take(connect_deadline)
            self._sock = sock
            if self._aborted:
                raise ConnectionDropped("cancelled")
            if self._deadline is not None:
                sock.settimeout(None)  # blocking (cooperatively): the exchange's timer bounds every call
            try:
                self._blocking_call(sock, deadline, sock.sendall, request)
            except socket.timeout:
                self.close()
                raise ReadTimedOut("write deadline passed") from None
            except OSError:
                self.close()
                if self._deadline is not None and self._deadline.expired:
                    raise ReadTimedOut("write deadline passed") from None
                if reused and retry_stale and not self._aborted:
                    continue
                raise ConnectionDropped("write failed") from None
            self.written_at = time.monotonic()
            try:
                self._read_head(deadline, raise_for_status)
                return
            except ConnectionDropped:
                self.close()
                if reused and retry_stale and not self._raw and not self._aborted:
                    continue
                raise
        raise ConnectionDropped("reused connections closed")

    def _read_head(self, deadline: float, raise_for_status: bool = True) -> None:
        while True:
            end = self._raw.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._raw) > MAX_HEAD_BYTES:
                raise ConnectionDropped("response head too large")
            self._recv(deadline)
        head = bytes(self._raw[:end]).decode("latin-1").split("\r\n")
        del self._raw[:end + 4]
        try:
            version, status = head[0].split(" ", 2)[:2]
            self.status = int(status)
        except ValueError:
            raise ConnectionDropped("malformed status line") from None
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if self.status in (204, 304) or self.status < 200:
            self._chunked, self._length_left = False, 0  # no body, whatever the headers say (RFC 9112 §6.3)
        elif not self._chunked and "content-length" in headers:
            length = headers["content-length"]
            if not (length.isascii() and length.isdigit()):  # cannot frame the body (RFC 9112 §6.3)
                raise ConnectionDropped("invalid Content-Length")
            self._length_left = int(length)
        connection = headers.get("connection", "").lower()
        self._keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
        if not self._chunked and self._length_left is None:
            self._keep_alive = False  # the body ends when the server closes
        self._decode()
        if self.status >= 400 and raise_for_status:
            raise StatusError(self.status)

    # ---- body -------------------------------------------------------------------------------------
    def next_line(self, deadline: float) -> bytes | None:
        """The next body line without its line ending; None once the body is complete."""
        while True:
            newline = self._body.find(b"\n")
            if newline >= 0:
                line = bytes(self._body[:newline])
                del self._body[:newline + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if self._complete:
                if self._body:
                    line = bytes(self._body)
                    self._body.clear()
                    return line
                return None
            self._read_more_of_a_line(deadline)

    def next_lines(self, deadline: float) -> list[bytes] | None:
        """Every complete body line already received (at least one; read from the network only when none is),
        without line endings; None once the body is complete. One call per network read, not per line."""
        while True:
            body = self._body
            if b"\r" in body:  # CR or CRLF line ends
                lines = _take_lines_with_cr(body, self._complete)
                if lines:
                    return lines
            end = body.rfind(b"\n")
            if end >= 0:
                lines = bytes(body[:end]).split(b"\n")
                del body[:end + 1]
                return lines
            if self._complete:
                if body:
                    line = bytes(body)
                    body.clear()
                    return [line]
                return None
            self._read_more_of_a_line(deadline)

    def _read_more_of_a_line(self, deadline: float) -> None:
        """Read and decode more of the body while no line end has come; a line past MAX_LINE_BYTES drops the
        connection, so a server that never ends one holds at most that much here, not all it sends by the deadline."""
        if len(self._body) > MAX_LINE_BYTES:
            raise ConnectionDropped("body line too long")
        if self._recv(deadline, eof_ends_body=not self._chunked and self._length_left is None):
            self._decode()

    def read_body(self, deadline: float) -> bytes:
        """The whole (rest of the) body, then the connection goes back to the pool; errors close it."""
        try:
            while not self._complete:
                if self._recv(deadline, eof_ends_body=not self._chunked and self._length_left is None):
                    self._decode()
        except UpstreamError:
            self.close()
            raise
        body = bytes(self._body)
        self._body.clear()
        self._release()
        return body

    def error_body(self, budget_s: float = FINISH_BUDGET_S) -> bytes:
        """The start of an error answer's body (at most MAX_ERROR_BODY_BYTES), read for at most `budget_s`: why the
        provider refused the request, never waited on for long; the connection is then dropped (not pooled)."""
        deadline = time.monotonic() + budget_s
        try:
            while not self._complete and len(self._body) < MAX_ERROR_BODY_BYTES:
                if self._recv(deadline, eof_ends_body=not self._chunked and self._length_left is None):
                    self._decode()
        except UpstreamError:
            pass  # what came is all there is
        body = bytes(self._body[:MAX_ERROR_BODY_BYTES])
        self.close()
        return body

    def finish(self, budget_s: float = FINISH_BUDGET_S) -> None:
        """Read to the body's end (the chunked terminator after `[DONE]`) and pool the connection; a slow or
        broken tail is not worth waiting for."""
        deadline = time.monotonic() + budget_s
        try:
            while self.next_line(deadline) is not None:
                pass
        except UpstreamError:
            self.close()
            return
        self._release()

    def _release(self) -> None:
        """Pool the connection when the response ended cleanly on a keep-alive connection, else close it."""
        sock, self._sock = self._sock, None
        if self._deadline is not None:
            self._deadline.close()
        if sock is not None:
            if self._keep_alive and not self._raw and not self._aborted:
                self._pool.give_back(sock)
            else:
                sock.close()

    def _recv(self, deadline: float, eof_ends_body: bool = False) -> bool:
        """Read more bytes into the raw buffer; False when the body ended at EOF (close-delimited bodies)."""
        sock = self._sock
        if sock is None or self._aborted:
            raise ConnectionDropped("cancelled")
        read_until = deadline
        now = time.monotonic()
        if now >= deadline:  # passed before this read began: only bytes already here are read
            if not self.may_read_late(deadline):
                raise ReadTimedOut("read deadline passed", late_s=now - deadline)
            read_until = now + LATE_READ_BUDGET_S
        try:
            data = self._blocking_call(sock, read_until, sock.recv, RECV_BYTES, wait_readable=True)
        except socket.timeout:
            raise ReadTimedOut("read deadline passed") from None
        except OSError as error:
            if self._deadline is not None and self._deadline.expired:
                raise self._expired() from None
            raise ConnectionDropped(type(error).__name__) from None
        if self._deadline is not None and self._deadline.expired:
            raise self._expired()
        if time.monotonic() > deadline:  # read after its deadline, the bytes there already (else it had expired)
            self._late_read_for = deadline
            self.late_reads += 1
        if not data:
            if eof_ends_body:
                self._complete = True
                return False
            raise ConnectionDropped("connection closed mid-response")
        self._raw += data
        return True

    def may_read_late(self, deadline: float) -> bool:
        """`deadline` has passed, but bytes are already waiting on the socket and this deadline has not had its one
        late read: this worker's loop was late to read them, the provider was not late to send them. One read per
        deadline only, so a provider trickling bytes without a token still times out (providers.py)."""
        sock = self._sock
        return sock is not None and self._late_read_for != deadline and not self._aborted and _has_bytes(sock)

    def _expired(self) -> ReadTimedOut:
        late_s = self._deadline.late_s if self._deadline is not None else 0.0
        return ReadTimedOut("read deadline passed", late_s=late_s)

    def _blocking_call(self, sock: socket.socket, deadline: float, call: Callable, argument: Any,
                       wait_readable: bool = False) -> Any:
        """`call(argument)` on the socket, bounded by `deadline`: the exchange's timer under gevent, else a socket
        timeout for this call. `wait_readable`: a read, which waits for the socket to be readable first."""
        watch = self._deadline
        if watch is None:
            sock.settimeout(_remaining(deadline, ReadTimedOut))
            return call(argument)
        watch.set(deadline)
        watch.blocked_on, watch.reading = sock, wait_readable
        try:
            if wait_readable:
                watch.wait_readable(sock)
            return call(argument)
        finally:
            watch.blocked_on = None

    def _decode(self) -> None:
        """Move what the raw buffer holds of the body into the body buffer (chunked, Content-Length, or raw)."""
        raw = self._raw
        if not self._chunked:
            if self._length_left is None:
                self._body += raw
                raw.clear()
                return
            take = min(len(raw), self._length_left)
            self._body += raw[:take]
            del raw[:take]
            self._length_left -= take
            self._complete = self._length_left == 0
            return
        while raw:
            state = self._chunk_state
            if state == "data":
                take = min(len(raw), self._chunk_left)
                self._body += raw[:take]
                del raw[:take]
                self._chunk_left -= take
                if self._chunk_left:
                    return
                self._chunk_state = "crlf"
            elif state == "crlf":
                if len(raw) < 2:
                    return
                del raw[:2]
                self._chunk_state = "size"
            elif state in ("size", "trailer"):
                end = raw.find(b"\r\n")
                if end < 0:
                    if len(raw) > MAX_HEAD_BYTES:  # a chunk size or trailer line: a few bytes, never megabytes
                        raise ConnectionDropped("chunk size line too long")
                    return
                line = bytes(raw[:end])
                del raw[:end + 2]
                if state == "trailer":
                    if not line:
                        self._chunk_state, self._complete = "done", True
                    continue
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ConnectionDropped("malformed chunk size") from None
                if size == 0:
                    self._chunk_state = "trailer"
                else:
                    self._chunk_left, self._chunk_state = size, "data"
            else:  # done: bytes after the terminator mean the connection cannot be reused
                return

    # ---- ending ------------------------------------------------------------------------------------
    def abort(self) -> None:
        """Hang up from another greenlet/thread: shutting the socket down wakes the read blocked on it."""
        self._aborted = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Drop the connection (not pooled): the provider sees the hang-up and stops generating."""
        sock, self._sock = self._sock, None
        if self._deadline is not None:
            self._deadline.close()
        if sock is not None:
            sock.close()
