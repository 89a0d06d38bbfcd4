"""A bare TCP listener on 127.0.0.1 for protocol-level stand-ins (scripted HTTP servers, proxies)."""
from __future__ import annotations

import socket
import threading
import time


class LoopbackServer:
    """Listens on a free loopback port and serves each accepted connection on its own daemon thread."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        """Serve one accepted connection (subclasses)."""
        conn.close()

    def stop(self) -> None:
        self.listener.close()


def read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP message's head (up to the blank line) and what came after it; (b"", b"") if the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return b"", b""
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy `source` into `sink` until either closes, then shut both down (the other direction's copy ends too)."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def splice(conn: socket.socket, upstream: socket.socket) -> None:
    """Forward both ways between an accepted connection and its upstream (a TCP proxy's body), until one closes."""
    threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
    pipe(conn, upstream)


class ReplyLosingProxy(LoopbackServer):
    """A TCP forwarder to a redis-server that, once armed (`lose_after`: bytes of the command), passes that command on
    and loses its reply (closes the connection instead): the write lands, its sender never hears so (a network cut,
    a failover at that moment). `lost` counts the replies lost."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.lose_after, self.lost = target_port, None, 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        dropping = threading.Event()

        def replies() -> None:
            try:
                while (data := upstream.recv(65536)) and not dropping.is_set():
                    conn.sendall(data)
            except OSError:
                pass

        threading.Thread(target=replies, daemon=True).start()
        try:
            while data := conn.recv(65536):
                if self.lose_after is not None and self.lose_after in data:
                    self.lose_after = None
                    dropping.set()  # whatever Redis answers from now on is never passed back
                    upstream.sendall(data)
                    time.sleep(0.2)  # Redis runs it
                    self.lost += 1
                    break
                upstream.sendall(data)
        except OSError:
            pass
        for sock in (conn, upstream):
            sock.close()
