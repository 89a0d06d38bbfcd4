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
