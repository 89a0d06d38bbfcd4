"""The LLM hot path honours HTTP_PROXY/HTTPS_PROXY/NO_PROXY (and SSL_CERT_FILE) the way the openai SDK's own HTTP
stack does for the same endpoint: plain HTTP through the proxy in absolute form, HTTPS through a CONNECT tunnel,
NO_PROXY hosts directly. A proxy stand-in and a TLS LLM stand-in on 127.0.0.1 see what arrives."""
from __future__ import annotations

import base64
import socket
import ssl
import threading
import time

import openai
import pytest

from callweaver.engine.llm_http import ConnectFailed, ConnectionPool, Endpoint, Exchange
from callweaver.engine.providers import ChainSettings, ProviderChain
from callweaver.engine.vendors import ProviderConfig
from tests.fakes.loopback import LoopbackServer, read_head, splice
from tests.fakes.tls import localhost_tls

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                   "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


class ProxyStandIn(LoopbackServer):
    """A forward proxy: CONNECT opens a tunnel; an absolute-form request is passed on in origin form. Records each
    connection's first request line and Proxy-Authorization."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        head, rest = read_head(conn)
        if not head:
            conn.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        auth = next((line.split(":", 1)[1].strip() for line in lines[1:]
                     if line.lower().startswith("proxy-authorization:")), None)
        self.seen.append((lines[0], auth))
        method, target, version = lines[0].split(" ")
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            hostport, _, path = target.split("://", 1)[1].partition("/")
            host, _, port = hostport.partition(":")
            upstream = socket.create_connection((host, int(port or 80)))
            kept = [line for line in lines[1:] if not line.lower().startswith("proxy-")]
            upstream.sendall(("\r\n".join([f"{method} /{path} {version}", *kept]) + "\r\n\r\n").encode("latin-1")
                             + rest)
        splice(conn, upstream)



SSE_REPLY = (b'data: {"choices":[{"index":0,"delta":{"content":"Through"}}]}\n\n'
             b'data: {"choices":[{"index":0,"delta":{"content":" the tunnel."},"finish_reason":"stop"}]}\n\n'
             b"data: [DONE]\n\n")


class TlsLLMStandIn(LoopbackServer):
    """An HTTPS chat-completions endpoint for `localhost` with a self-signed certificate: every request gets the
    same short SSE stream."""

    def __init__(self, tmp_path) -> None:
        self.cert_file, self.context = localhost_tls(tmp_path)
        self.requests: list[str] = []
        self.raw_connections: list[socket.socket] = []
        super().__init__()

    def close_connections(self) -> None:
        """As a server closing its idle keep-alive connections (a FIN on each)."""
        for raw in self.raw_connections:
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle(self, raw: socket.socket) -> None:
        self.raw_connections.append(raw)
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                while True:
                    head, body = read_head(conn)
                    if not head:
                        return
                    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length:")))
                    while len(body) < length:
                        body += conn.recv(65536)
                    self.requests.append(head.split(b"\r\n")[0].decode())
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SSE_REPLY), SSE_REPLY))
        except (OSError, ssl.SSLError):
            pass


@pytest.fixture
def clean_env(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def proxy():
    stand_in = ProxyStandIn()
    yield stand_in
    stand_in.stop()


@pytest.fixture
def tls_llm(tmp_path):
    stand_in = TlsLLMStandIn(tmp_path)
    yield stand_in
    stand_in.stop()


def one_turn(base_url: str) -> str:
    chain = ProviderChain([ProviderConfig("only", "openai", "sk-test", "gpt-4o-mini", base_url=base_url)],
                          ChainSettings(first_token_timeout_s=5.0))
    try:
        reply = chain.complete([{"role": "user", "content": "hi"}])
        assert not reply.failovers, reply.failovers
        return reply.text
    finally:
        chain.close()


def sdk_turn(base_url: str) -> str:
    with openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0) as client:
        stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_plain_http_goes_through_http_proxy_with_its_credentials_like_the_sdk(clean_env, proxy, fake_llm):
    clean_env.setenv("HTTP_PROXY", f"http://us%40er:p%3Ass@127.0.0.1:{proxy.port}")
    assert sdk_turn(fake_llm.url)  # the SDK's own stack: the reference behaviour
    assert one_turn(fake_llm.url)
    expected_auth = "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    target = f"POST http://127.0.0.1:{fake_llm.port}/v1/chat/completions HTTP/1.1"
    assert proxy.seen == [(target, expected_auth), (target, expected_auth)]


def test_https_goes_through_a_connect_tunnel_and_trusts_ssl_cert_file_like_the_sdk(clean_env, proxy, tls_llm):
    clean_env.setenv("HTTPS_PROXY", f"127.0.0.1:{proxy.port}")  # no scheme: http:// as the SDK assumes
    clean_env.setenv("SSL_CERT_FILE", str(tls_llm.cert_file))
    base_url = f"https://localhost:{tls_llm.port}/v1"
    assert sdk_turn(base_url) == "Through the tunnel."
    assert one_turn(base_url) == "Through the tunnel."
    assert proxy.seen == [(f"CONNECT localhost:{tls_llm.port} HTTP/1.1", None)] * 2
    assert tls_llm.requests == ["POST /v1/chat/completions HTTP/1.1"] * 2  # origin form inside the tunnel


def test_no_proxy_hosts_are_reached_directly(clean_env, proxy, fake_llm):
    clean_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    clean_env.setenv("NO_PROXY", "example.org, 127.0.0.1")
    assert one_turn(fake_llm.url)
    assert proxy.seen == []


def test_a_proxy_for_the_other_scheme_is_not_used(clean_env, proxy, fake_llm):
    clean_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    assert one_turn(fake_llm.url)  # an http:// endpoint
    assert proxy.seen == []


def test_a_refused_connect_is_a_connect_failure(clean_env, tls_llm):
    refusing = socket.create_server(("127.0.0.1", 0))

    def answer_407() -> None:
        conn, _ = refusing.accept()
        read_head(conn)
        conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        conn.close()
    threading.Thread(target=answer_407, daemon=True).start()
    clean_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{refusing.getsockname()[1]}")
    pool = ConnectionPool(Endpoint(f"https://localhost:{tls_llm.port}/v1/chat/completions", {}))
    with pytest.raises(ConnectFailed):
        Exchange(pool).start(b"{}", time.monotonic() + 5, 2.0)
    refusing.close()


def test_an_unsupported_proxy_scheme_fails_the_connect_instead_of_going_direct(clean_env, fake_llm):
    clean_env.setenv("HTTP_PROXY", "socks5://127.0.0.1:9")
    pool = ConnectionPool(Endpoint(f"{fake_llm.url}/chat/completions", {}))
    with pytest.raises(ConnectFailed):
        Exchange(pool).start(b"{}", time.monotonic() + 5, 2.0)


def test_a_proxy_that_never_answers_the_connect_is_a_connect_failure_at_the_connect_deadline(clean_env, tls_llm):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) and never answers
    clean_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{silent.getsockname()[1]}")
    pool = ConnectionPool(Endpoint(f"https://localhost:{tls_llm.port}/v1/chat/completions", {}))
    with pytest.raises(ConnectFailed):
        Exchange(pool).start(b"{}", time.monotonic() + 30, 0.3)
    silent.close()


def test_a_second_turn_reuses_the_pooled_https_connection_without_a_failover(clean_env, tls_llm):
    """The pool's check that an idle connection is still open must work on TLS sockets: a peek with MSG_PEEK
    raises ValueError on an SSLSocket, which failed every turn that reused an HTTPS connection over to the next
    provider (found by the 12u review)."""
    clean_env.setenv("SSL_CERT_FILE", str(tls_llm.cert_file))
    chain = ProviderChain([ProviderConfig("only", "openai", "sk-test", "gpt-4o-mini",
                                          base_url=f"https://localhost:{tls_llm.port}/v1")],
                          ChainSettings(first_token_timeout_s=5.0))
    try:
        for _ in range(3):
            reply = chain.complete([{"role": "user", "content": "hi"}])
            assert not reply.failovers, reply.failovers
            assert reply.text == "Through the tunnel."
    finally:
        chain.close()
    assert tls_llm.requests == ["POST /v1/chat/completions HTTP/1.1"] * 3
    assert tls_llm.connections == 1  # the turns after the first reused the pooled connection


def test_a_pooled_https_connection_the_server_closed_is_not_reused(clean_env, tls_llm):
    clean_env.setenv("SSL_CERT_FILE", str(tls_llm.cert_file))
    pool = ConnectionPool(Endpoint(f"https://localhost:{tls_llm.port}/v1/chat/completions", {}))
    sock, reused = pool.take(time.monotonic() + 5)
    assert not reused
    pool.give_back(sock)
    tls_llm.close_connections()
    time.sleep(0.2)  # the FIN reaches the idle socket
    again, reused = pool.take(time.monotonic() + 5)
    assert not reused and again is not sock
    again.close()
    pool.close()


def test_a_pooled_https_connection_closed_here_is_not_reused(clean_env, tls_llm):
    clean_env.setenv("SSL_CERT_FILE", str(tls_llm.cert_file))
    pool = ConnectionPool(Endpoint(f"https://localhost:{tls_llm.port}/v1/chat/completions", {}))
    sock, _ = pool.take(time.monotonic() + 5)
    sock.close()
    pool.give_back(sock)
    again, reused = pool.take(time.monotonic() + 5)
    assert not reused and again is not sock
    again.close()
    pool.close()


def test_a_request_supplied_llm_host_is_checked_and_pinned_through_a_proxy_too(clean_env, proxy, tls_llm,
                                                                              monkeypatch):
    """With HTTPS_PROXY set, a request's own LLM account (public_only) skipped the connect-time address check: the
    proxy was asked for a tunnel to the host *name*, resolved it itself, and so reached whatever the name answered
    by then (DNS rebinding to 127.0.0.1 or 169.254.169.254, the server's own network as the proxy sees it). Now the
    name is checked here first and the tunnel asked for the address checked; TLS is still verified for the name
    (found by the outbound audit)."""
    from callweaver.engine import llm_http

    clean_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    clean_env.setenv("SSL_CERT_FILE", str(tls_llm.cert_file))
    endpoint = Endpoint(f"https://localhost:{tls_llm.port}/v1/chat/completions", {})
    with pytest.raises(ConnectFailed, match="non-public"):
        ConnectionPool(endpoint, public_only=True).take(time.monotonic() + 5)
    assert proxy.seen == [] and tls_llm.requests == []  # the proxy was never asked

    monkeypatch.setattr(llm_http, "is_public_address", lambda address: address == "127.0.0.1")  # as if public
    config = ProviderConfig("workflow-openai", "openai", "sk-test", "gpt-4o-mini",
                            base_url=f"https://localhost:{tls_llm.port}/v1", public_only=True)
    chain = ProviderChain([config], ChainSettings(first_token_timeout_s=5.0))
    try:
        reply = chain.complete([{"role": "user", "content": "hi"}])
    finally:
        chain.close()
    assert reply.text == "Through the tunnel." and not reply.failovers
    assert proxy.seen == [(f"CONNECT 127.0.0.1:{tls_llm.port} HTTP/1.1", None)]  # the address checked, not the name


def test_a_tunnel_to_a_checked_ipv6_address_is_asked_for_in_brackets():
    """The tunnel goes to the address just checked (a request's own LLM host), an IPv6 one written as RFC 9110's
    authority wants it: `[addr]:port` in the CONNECT line and its Host header; the name itself is left for TLS."""
    endpoint = Endpoint("https://llm.example.com/v1/chat/completions", {})
    assert endpoint.connect_request("2001:db8::1").split(b"\r\n")[:2] == [b"CONNECT [2001:db8::1]:443 HTTP/1.1",
                                                                          b"Host: [2001:db8::1]:443"]
    assert endpoint.connect_request().startswith(b"CONNECT llm.example.com:443 HTTP/1.1\r\n")
