"""The LLM streaming hot path (engine/llm_http.py): request built once, chunked SSE lines, pooled connections,
deadlines, and cancellation from another thread — against real sockets on 127.0.0.1."""
from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from pathlib import Path

import openai
import pytest

from callweaver.engine.llm_http import (MAX_LINE_BYTES, ConnectFailed, ConnectionDropped, ConnectionPool, Endpoint,
                                        Exchange, ReadTimedOut, StatusError)
from tests.fakes.loopback import LoopbackServer, read_head

REPO = Path(__file__).resolve().parents[1]


class ScriptedServer(LoopbackServer):
    """Accepts connections and answers each request with the next scripted list of byte pieces (sent one by one
    with a short pause, so chunk boundaries fall anywhere); None as a piece closes the connection."""

    def __init__(self, responses: list[list[bytes | None | float]]) -> None:
        self.responses = list(responses)
        self.requests: list[bytes] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            while self.responses:
                head, body = read_head(conn)
                if not head:
                    return
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                for piece in self.responses.pop(0):
                    if piece is None:
                        return
                    if isinstance(piece, float):
                        time.sleep(piece)
                        continue
                    try:
                        conn.sendall(piece)
                    except OSError:  # the client hung up mid-answer (as it should, on a line without an end)
                        return
                    time.sleep(0.005)


def chunked(*parts: bytes) -> list[bytes]:
    """A chunked SSE response, each part its own chunk, then split at awkward places."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    raw = head + body
    return [raw[i:i + 7] for i in range(0, len(raw), 7)]


SSE = [b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
       b': keep-alive\n\ndata: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\n',
       b'\ndata: [DONE]\n\n']


def read_lines(exchange: Exchange, deadline_s: float = 5.0) -> list[bytes]:
    lines, deadline = [], time.monotonic() + deadline_s
    while (line := exchange.next_line(deadline)) is not None:
        lines.append(line)
    return lines


@pytest.fixture
def server_factory():
    servers = []

    def make(*responses):
        server = ScriptedServer(list(responses))
        servers.append(server)
        return server
    yield make
    for server in servers:
        server.stop()


def pool_for(server: ScriptedServer) -> ConnectionPool:
    return ConnectionPool(Endpoint(f"http://127.0.0.1:{server.port}/v1/chat/completions",
                                   {"Authorization": "Bearer sk-test"}))


def test_chunked_sse_split_anywhere_comes_back_as_whole_lines_and_the_connection_is_pooled(server_factory):
    server = server_factory(chunked(*SSE), chunked(*SSE))
    pool = pool_for(server)
    for _ in range(2):
        exchange = Exchange(pool)
        exchange.start(b'{"stream":true}', time.monotonic() + 5, 2.0)
        assert exchange.status == 200 and exchange.written_at is not None
        lines = [line for line in read_lines(exchange) if line]
        assert lines == [b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}', b": keep-alive",
                         b'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}', b"data: [DONE]"]
        exchange.finish()
    assert server.connections == 1  # the second turn reused the first turn's connection
    request = server.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer sk-test\r\n" in request and request.endswith(b'\r\n\r\n{"stream":true}')


def test_sse_lines_ended_by_cr_crlf_or_lf_come_back_split_as_they_arrive(server_factory):
    """The SSE spec ends a line with CR, LF or CRLF. A server ending lines with a bare CR had its whole stream held
    back until the body ended and then handed over as one unparseable line (a first-token timeout or a malformed
    chunk); a CRLF split between two reads must still be one line end."""
    first = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\r\r'
    rest = [b': keep-alive\r\ndata: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\r',
            b'\n\r\ndata: [DONE]\n\n']
    pieces = chunked(first, *rest)
    head_and_first = b"".join(pieces)[:b"".join(pieces).index(b"\r\r") + 4]
    server = server_factory([head_and_first, 0.3, b"".join(pieces)[len(head_and_first):]])
    exchange = Exchange(pool_for(server))
    deadline = time.monotonic() + 5
    exchange.start(b'{"stream":true}', deadline, 2.0)
    assert exchange.next_lines(deadline) == [first[:-2]]  # the first event, before the rest was even sent
    lines = []
    while (more := exchange.next_lines(deadline)) is not None:
        lines += more
    # exactly: the blank lines are the SSE event boundaries (the first event's own, held as a possible CRLF half)
    assert lines == [b"", b": keep-alive", b'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}', b"",
                     b"data: [DONE]", b""]
    assert b"\r" not in b"".join(lines)


def test_a_pooled_connection_the_server_closed_is_replaced_without_failing_the_turn(server_factory):
    server = server_factory(chunked(*SSE) + [None], chunked(*SSE))  # closes after the first response
    pool = pool_for(server)
    exchange = Exchange(pool)
    exchange.start(b"{}", time.monotonic() + 5, 2.0)
    read_lines(exchange)
    exchange.finish()
    time.sleep(0.1)
    exchange = Exchange(pool)
    exchange.start(b"{}", time.monotonic() + 5, 2.0)
    assert [line for line in read_lines(exchange) if line][-1] == b"data: [DONE]"
    assert server.connections == 2


def test_content_length_error_status_raises_status_error(server_factory):
    body = b'{"error":{"message":"slow down"}}'
    server = server_factory([b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)])
    exchange = Exchange(pool_for(server))
    with pytest.raises(StatusError) as raised:
        exchange.start(b"{}", time.monotonic() + 5, 2.0)
    assert raised.value.status == 429
    exchange.close()



def test_an_error_answers_body_is_read_briefly_and_capped(server_factory):
    """Why a provider refused a request is in its error body (a content filter, or an api-version every request
    gets refused for): read what comes within a short budget, never more than MAX_ERROR_BODY_BYTES, and drop the
    connection (found by the outbound review)."""
    from callweaver.engine.llm_http import FINISH_BUDGET_S, MAX_ERROR_BODY_BYTES

    body = b'{"error":{"code":"BadRequest","message":"API version not supported"}}'
    whole = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    never = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 500\r\n\r\n"
    huge = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n" + b"x" * 0x100000
    server = server_factory([whole[:30], whole[30:60], whole[60:]], [never, 5.0], [huge, 5.0])
    for expected in (body, b"", b"x" * MAX_ERROR_BODY_BYTES):
        pool = pool_for(server)
        exchange = Exchange(pool)
        with pytest.raises(StatusError):
            exchange.start(b"{}", time.monotonic() + 5, 2.0)
        started = time.monotonic()
        assert exchange.error_body() == expected
        assert time.monotonic() - started < FINISH_BUDGET_S + 0.2
        sock, reused = pool.take(time.monotonic() + 2)
        assert not reused  # the refused request's connection was dropped, not pooled
        sock.close()
        pool.close()

@pytest.mark.parametrize("length", [b"abc", b"-5", b"5, 6"])
def test_an_invalid_content_length_is_a_broken_response_not_a_value_error_or_a_body_read_forever(server_factory,
                                                                                               length):
    """RFC 9112 §6.3: an invalid Content-Length cannot frame the body. It raised a bare ValueError (the socket left
    open, outside the UpstreamError family the callers map) or, negative, made the body never end."""
    server = server_factory([b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nhello", 0.5])
    exchange = Exchange(pool_for(server))
    with pytest.raises(ConnectionDropped):
        exchange.start(b"{}", time.monotonic() + 5, 2.0)
        exchange.read_body(time.monotonic() + 1)


def test_no_head_before_the_deadline_is_a_read_timeout(server_factory):
    server = server_factory([2.0])
    exchange = Exchange(pool_for(server))
    with pytest.raises(ReadTimedOut):
        exchange.start(b"{}", time.monotonic() + 0.3, 2.0)
    exchange.close()


def test_a_body_cut_off_mid_stream_is_a_dropped_connection(server_factory):
    server = server_factory(chunked(*SSE)[:12] + [None])
    exchange = Exchange(pool_for(server))
    exchange.start(b"{}", time.monotonic() + 5, 2.0)
    with pytest.raises(ConnectionDropped):
        read_lines(exchange)
    exchange.close()


ENDLESS_LINE = b"data: " + b"x" * (4 * MAX_LINE_BYTES)  # no line end: what a hostile LLM server may send


@pytest.mark.parametrize("framing", ["close-delimited", "chunked", "chunk size"])
def test_a_line_that_never_ends_is_dropped_at_the_line_cap_not_buffered_until_the_deadline(server_factory, framing):
    """A request may bring its own LLM server (ALLOW_REQUEST_CREDENTIALS=1): one that streams bytes with no line end
    had every byte held in the worker's memory until the turn's deadline (several seconds at link speed is
    gigabytes: the worker, with every call on it, was killed for memory). Now at most MAX_LINE_BYTES wait for a line
    end (a chunk size line for one: a few bytes) before the connection is dropped (found by the outbound audit)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    pieces = {"close-delimited": [head + b"\r\n", ENDLESS_LINE],
              "chunked": [head + b"Transfer-Encoding: chunked\r\n\r\n", b"%x\r\n" % len(ENDLESS_LINE), ENDLESS_LINE],
              "chunk size": [head + b"Transfer-Encoding: chunked\r\n\r\n", b"f" * len(ENDLESS_LINE)]}[framing]
    server = server_factory(pieces + [3.0])
    exchange = Exchange(pool_for(server))
    exchange.start(b"{}", time.monotonic() + 5, 2.0)
    started = time.monotonic()
    with pytest.raises(ConnectionDropped, match="too long"):
        exchange.next_lines(time.monotonic() + 2.5)
    assert time.monotonic() - started < 1.5  # at the cap, not at the deadline (a ReadTimedOut before)
    exchange.close()
    exchange = Exchange(pool_for(server_factory(pieces + [3.0])))
    exchange.start(b"{}", time.monotonic() + 5, 2.0)
    with pytest.raises(ConnectionDropped, match="too long"):
        exchange.next_line(time.monotonic() + 2.5)
    exchange.close()


def test_lines_up_to_the_cap_still_come_back_whole(server_factory):
    line = b"data: " + b"y" * (MAX_LINE_BYTES - 6)
    server = server_factory([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(line) + 1), line + b"\n"])
    exchange = Exchange(pool_for(server))
    exchange.start(b"{}", time.monotonic() + 5, 2.0)
    assert exchange.next_lines(time.monotonic() + 5) == [line]
    exchange.close()


def test_a_burst_of_new_connections_looks_the_host_up_once(monkeypatch):
    """Under gevent every address lookup is a job for the hub's small threadpool: on a busy worker a burst of new
    provider connections queued there for over a second each (bench.relay, 1500 calls arriving at 150/s), which
    counted against the turns' first-token deadlines and opened a healthy provider's circuit. The pool keeps what
    its host resolved to for a while; a failed connect looks it up again."""
    lookups = []
    real_getaddrinfo = socket.getaddrinfo

    def counting_getaddrinfo(host, *args, **kwargs):
        lookups.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting_getaddrinfo)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pool = ConnectionPool(Endpoint(f"http://localhost:{listener.getsockname()[1]}/v1/chat/completions", {}))
        taken = [pool.take(time.monotonic() + 5) for _ in range(3)]  # none given back: three new connections
        assert [reused for _sock, reused in taken] == [False, False, False]
        for sock, _reused in taken:
            sock.close()
        assert lookups == ["localhost"]
        port = listener.getsockname()[1]
    with pytest.raises(ConnectFailed):  # the listener is gone: the connect fails...
        pool.take(time.monotonic() + 5)
    with socket.create_server(("127.0.0.1", port)):
        pool.take(time.monotonic() + 5)[0].close()  # ...and the next one looks the host up again
    assert lookups[1:] == ["localhost"] * (len(lookups) - 1) and len(lookups) >= 2
    pool.close()


def _answers_for(*addresses: tuple[str, int]) -> list:
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address) for address in addresses]


def test_a_cached_address_whose_connect_times_out_is_looked_up_again(monkeypatch):
    """A host with several addresses whose first one went dark (connects hang): the attempt's deadline runs out on
    it, and the pool must not keep that answer for ADDRESS_CACHE_S, or every turn for 30 s waits on the same dead
    address and fails over (the name meanwhile points elsewhere)."""
    lookups: list[str] = []
    answers: list = []

    def fake_getaddrinfo(host, *args, **kwargs):
        lookups.append(host)
        return list(answers)

    with socket.socket() as dark, socket.create_server(("127.0.0.1", 0)) as good:
        dark.bind(("127.0.0.1", 0))
        dark.listen(0)
        fillers = [socket.socket() for _ in range(4)]  # fill the accept queue: further SYNs are dropped
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(dark.getsockname())
        time.sleep(0.1)
        answers[:] = _answers_for(dark.getsockname(), good.getsockname())
        monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
        pool = ConnectionPool(Endpoint("http://provider.test:8080/v1/chat/completions", {}))
        with pytest.raises(ConnectFailed):
            pool.take(time.monotonic() + 0.3)
        answers[:] = _answers_for(good.getsockname())  # the name now resolves to the working address only
        pool.take(time.monotonic() + 0.3)[0].close()
        assert lookups == ["provider.test", "provider.test"]
        for filler in fillers:
            filler.close()
        pool.close()


def test_a_tls_handshake_failing_at_a_cached_address_looks_the_host_up_again(monkeypatch):
    """The TCP connect succeeded but the address no longer serves the provider (the handshake fails): that is a
    failed connect too, so the next connection looks the host up afresh instead of retrying it for 30 s."""
    lookups: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as wrong:
        def serve() -> None:
            for _ in range(2):
                try:
                    conn, _ = wrong.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=serve, daemon=True).start()

        def fake_getaddrinfo(host, *args, **kwargs):
            lookups.append(host)
            return _answers_for(wrong.getsockname())

        monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
        pool = ConnectionPool(Endpoint("https://provider.test/v1/chat/completions", {}),
                              tls_context=ssl.create_default_context)
        for _ in range(2):
            with pytest.raises(ConnectFailed):
                pool.take(time.monotonic() + 2)
        assert lookups == ["provider.test", "provider.test"]


def test_refused_connection_is_a_connect_failure():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    exchange = Exchange(ConnectionPool(Endpoint(f"http://127.0.0.1:{port}/v1/chat/completions", {})))
    with pytest.raises(ConnectFailed):
        exchange.start(b"{}", time.monotonic() + 5, 2.0)


def test_abort_from_another_thread_wakes_a_blocked_read(server_factory):
    server = server_factory(chunked(*SSE)[:14] + [5.0])
    exchange = Exchange(pool_for(server))
    exchange.start(b"{}", time.monotonic() + 10, 2.0)
    threading.Timer(0.3, exchange.abort).start()
    started = time.monotonic()
    with pytest.raises(ConnectionDropped):
        read_lines(exchange, deadline_s=10)
    assert time.monotonic() - started < 4.0
    exchange.close()


def test_endpoints_come_from_the_sdk_clients_public_configuration():
    azure = openai.AzureOpenAI(azure_endpoint="https://res.openai.azure.com", api_key="az-key",
                               api_version="2024-10-21")
    request = Endpoint.from_sdk_client(azure, "my deployment").request(b"{}").decode()
    assert request.startswith("POST /openai/deployments/my%20deployment/chat/completions?api-version=2024-10-21 "
                              "HTTP/1.1\r\nHost: res.openai.azure.com\r\n")
    assert "api-key: az-key\r\n" in request
    plain = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="sk-x")
    request = Endpoint.from_sdk_client(plain).request(b"{}").decode()
    assert request.startswith("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:9\r\n")
    assert "Authorization: Bearer sk-x\r\n" in request and "Omit" not in request


def test_no_private_http_library_attributes_are_touched():
    source = (REPO / "callweaver" / "engine" / "providers.py").read_text()
    source += (REPO / "callweaver" / "engine" / "llm_http.py").read_text()
    for private in ("._transport", "._mounts", "._pool._network_backend", "_network_backend"):
        assert private not in source


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_prebuilt_relay_frames_decode_as_the_same_message_for_a_websocket_client(size):
    """relay_protocol.frame writes frames itself; a standard client (wsproto) must read them back unchanged."""
    from wsproto import ConnectionType
    from wsproto.connection import Connection
    from wsproto.events import TextMessage

    from callweaver.engine import relay_protocol

    message = relay_protocol.text("é" + "x" * max(0, size - 40), last=False)
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(relay_protocol.frame(message))
    events = list(client.events())
    assert len(events) == 1 and isinstance(events[0], TextMessage) and events[0].message_finished
    assert __import__("json").loads(events[0].data) == message


def test_live_calls_of_one_flow_share_one_workflow_snapshot():
    """Each call's record arrives with its own parsed copy of the workflow; the engine keeps one per version hash
    (an idle call's memory was mostly that copy)."""
    from callweaver.engine.conversation import ConversationEngine
    from callweaver.engine.languages import LanguageTable
    from callweaver.store import CallRecord

    engine = ConversationEngine(None, None, LanguageTable.load())
    snapshot = {"nodes": [{"id": "start"}], "edges": []}
    first = engine.sharing_snapshot(CallRecord(tracking_id="a", workflow=dict(snapshot), workflow_hash="h1"))
    second = engine.sharing_snapshot(CallRecord(tracking_id="b", workflow=dict(snapshot), workflow_hash="h1"))
    other = engine.sharing_snapshot(CallRecord(tracking_id="c", workflow={"nodes": []}, workflow_hash="h2"))
    assert first.workflow is second.workflow and second.workflow == snapshot
    assert other.workflow == {"nodes": []} and other.workflow is not first.workflow
    assert engine.sharing_snapshot(None) is None


GEVENT_RUN = """
from gevent import monkey; monkey.patch_all()
import sys, pytest
from callweaver.engine import llm_http
assert llm_http.cooperative_loop() is not None  # the exchanges below run on the event-loop deadline timer
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_deadlines_pooling_and_cancellation_hold_under_gevent():
    """A gunicorn gevent worker bounds reads with one event-loop timer per exchange, not a socket timeout per read:
    this module's exchange tests, the provider chain's deadline, failover, cancellation and continuation tests and
    the proxy/TLS tests (a read waits for readability first, except while the SSL object holds decrypted bytes)
    run again in a gevent-patched interpreter (the SDK-configuration test is left out: it needs no sockets)."""
    import subprocess
    import sys

    finished = subprocess.run(
        [sys.executable, "-c", GEVENT_RUN, "-q", "-p", "no:cacheprovider", "-p", "no:anyio",
         "tests/test_llm_http.py", "tests/test_providers.py", "tests/test_llm_proxy.py",
         "-k", "not sdk_clients_public_configuration and not under_gevent"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-2000:]
    assert " passed" in finished.stdout and "failed" not in finished.stdout
