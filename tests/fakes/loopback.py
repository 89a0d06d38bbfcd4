"""A bare TCP listener on 127.0.0.1 for protocol-level stand-ins (scripted HTTP servers, proxies)."""
from __future__ import annotations

import socket
import threading


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
