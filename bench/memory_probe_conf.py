"""gunicorn config for bench/idle_call_memory.py: the server's own config (MEMORY_PROBE_BASE_CONFIG, or none for the
naive relay) plus a probe each worker serves on 127.0.0.1:MEMORY_PROBE_PORT + worker age - 1, so the harness can ask a
worker, between phases, for its RSS, its objects by type, and a tracemalloc snapshot of what it allocated since.

One JSON command per line, one JSON answer per line: {"cmd": "counts"} | {"cmd": "trace_start", "frames": 30} |
{"cmd": "trace_top", "calls": N, "limit": 40}. Bench-only: never part of the service."""
import json
import os
from pathlib import Path

_base = os.environ.get("MEMORY_PROBE_BASE_CONFIG")
if _base:
    exec(compile(Path(_base).read_text(), _base, "exec"))  # noqa: S102 (the repository's own gunicorn.conf.py)

_base_post_worker_init = globals().get("post_worker_init")


def post_worker_init(worker):
    if _base_post_worker_init is not None:
        _base_post_worker_init(worker)
    from gevent.server import StreamServer

    from bench.memory_probe import answer
    port = int(os.environ["MEMORY_PROBE_PORT"]) + worker.age - 1

    def handle(sock, _address):
        reader = sock.makefile("rb")
        for line in reader:
            sock.sendall(json.dumps(answer(json.loads(line))).encode() + b"\n")

    StreamServer(("127.0.0.1", port), handle).start()
