"""A real loopback HTTP receiver (end-of-call reports, OTLP/HTTP traces): records every POST, answers scripted statuses."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class ReceivedReport:
    headers: dict[str, str]  # keys lower-cased
    body: bytes
    path: str = "/"


class ReportReceiver:
    """Answers `statuses` in order (then 200); `hold` makes each request wait until released."""

    def __init__(self, port: int = 0, statuses: list[int] | None = None, hold: bool = False):
        self.port = port
        self.statuses = list(statuses or [])
        self.reports: list[ReceivedReport] = []
        self.request_started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + "/hooks/call-ended"

    def start(self) -> "ReportReceiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.request_started.set()
                receiver.release.wait(timeout=30)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == 200:
                    receiver.reports.append(ReceivedReport({k.lower(): v for k, v in self.headers.items()}, body,
                                                          self.path))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[ReceivedReport]:
        deadline = time.monotonic() + timeout_s
        while len(self.reports) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.reports

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
