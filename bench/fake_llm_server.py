"""Runs the tests' FakeLLM as its own process, so the LLM never shares a CPU-bound process with the load generator.

Prints one JSON line ({"ready": true, "port": …, "statsPort": …}) on stdout once it listens, then serves until
SIGTERM/SIGINT, until its parent process goes away, or until --max-lifetime-s passes. GET /stats on the stats
port reports what the fake received (request counts and the TTFT the fake actually delivered); GET
/requests?since=N lists each request's last caller line and delivered TTFT, so a bench can pair them with its turns;
GET /loop-lag?start=T0&end=T1 lists how late (ms) this process's lag probe woke between two time.monotonic() instants
(bench/loop_lag.py): a thread late for the GIL or a core is a fake LLM that reads requests and writes tokens late.
"""
import argparse
import json
import math
import os
import signal
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from bench.loop_lag import LoopLagProbe
from callweaver.simulate import llm_standin as fake_llm
from callweaver.simulate.llm_standin import FakeLLM

# ~25 word tokens: the fake streams one word per chunk.
DEFAULT_REPLY_TEXT = ("Thanks for calling, I can certainly help with that. Let me check what we have available "
                      "for you and walk you through the best options.")
PARENT_POLL_S = 0.5


class _FixedPortServer(fake_llm._Server):
    """The fake's own server class, bound to the port we were given instead of a random one."""

    bind_port = 0

    def server_bind(self) -> None:
        self.server_address = ("127.0.0.1", self.bind_port)
        super().server_bind()


class PortFakeLLM(FakeLLM):
    """FakeLLM listening on a chosen port (0 = any free port)."""

    def __init__(self, port: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._bind_port = port

    def start(self) -> "PortFakeLLM":
        server_class = type("_BoundServer", (_FixedPortServer,), {"bind_port": self._bind_port})
        self._stopping.clear()
        self._server = server_class(self)
        self._serve_thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                              name=f"fake-llm-{self.name}", daemon=True)
        self._serve_thread.start()
        return self


def nearest_rank(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1], 3)


def stats_of(fake: FakeLLM) -> dict:
    """Counts and the delivered time to first token, as the fake itself measured it (its own monotonic clock)."""
    requests = list(fake.requests)
    ttft_ms = [(r.first_token_at - r.received_at) * 1000 for r in requests if r.first_token_at is not None]
    return {
        "requests": len(requests),
        "streaming": sum(1 for r in requests if r.body.get("stream")),
        "finished": sum(1 for r in requests if r.finished),
        "clientClosed": sum(1 for r in requests if r.client_closed),
        "deliveredTtftMs": {"samples": len(ttft_ms), "p50": nearest_rank(ttft_ms, 50),
                            "p95": nearest_rank(ttft_ms, 95), "p99": nearest_rank(ttft_ms, 99)},
    }


def last_user_text(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def requests_of(fake: FakeLLM, since: int) -> list[dict]:
    """Per request from index `since`: the caller's last line and the TTFT delivered, to pair with the bench's turns."""
    return [{"lastUser": last_user_text(r.body), "stream": bool(r.body.get("stream")),
             "ttftMs": None if r.first_token_at is None else (r.first_token_at - r.received_at) * 1000,
             # time.monotonic() is CLOCK_MONOTONIC, one clock for every process on the machine
             "receivedAt": r.received_at, "firstTokenAt": r.first_token_at}
            for r in list(fake.requests)[since:]]


def start_stats_server(fake: FakeLLM, port: int, lag: LoopLagProbe) -> ThreadingHTTPServer:
    class StatsHandler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:
            pass

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            payload = None
            if path == "/stats":
                payload = stats_of(fake)
            elif path == "/requests":
                since = int(parse_qs(query).get("since", ["0"])[0])
                payload = requests_of(fake, since)
            elif path == "/loop-lag":
                window = parse_qs(query)
                payload = lag.lags_between(float(window["start"][0]), float(window["end"][0]))
            body = json.dumps(payload).encode()
            self.send_response(200 if payload is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class StatsServer(ThreadingHTTPServer):
        daemon_threads = True

        def server_bind(self) -> None:  # no reverse DNS lookup (HTTPServer.server_bind does one)
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = self.server_address[:2]

    server = StatsServer(("127.0.0.1", port), StatsHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="LLM port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--stats-port", type=int, default=0, help="stats port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--ttft-ms", type=float, default=300.0, help="time to first token")
    parser.add_argument("--token-interval-ms", type=float, default=20.0, help="gap between streamed tokens")
    parser.add_argument("--reply-text", default=DEFAULT_REPLY_TEXT, help="text of every reply (one token per word)")
    parser.add_argument("--max-lifetime-s", type=float, default=1800.0, help="stop by itself after this long")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fake = PortFakeLLM(args.port, name="bench", ttft_s=args.ttft_ms / 1000,
                       token_interval_s=args.token_interval_ms / 1000)
    reply = fake_llm.Reply(text=args.reply_text)
    fake.responder = lambda body: reply
    fake.start()
    lag = LoopLagProbe().start()
    stats_server = start_stats_server(fake, args.stats_port, lag)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    parent_pid = os.getppid()
    print(json.dumps({"ready": True, "port": fake.port, "statsPort": stats_server.server_address[1]}), flush=True)
    deadline = time.monotonic() + args.max_lifetime_s
    # Bounded wait: a parent that died without cleaning up must not leave this process behind.
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != parent_pid or time.monotonic() > deadline:
            break
    lag.stop()
    stats_server.shutdown()
    stats_server.server_close()
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
