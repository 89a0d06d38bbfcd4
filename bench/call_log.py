"""Call-log benchmark: what one page of the call log costs as the store grows, on SQLite and on Redis.

For each backend and store size it seeds calls (each with a workflow snapshot, history and turns, like real
ones), then times `call_log.call_page` (first page, a deep page, a filtered page) and `call_log.call_detail`.
The same-run reference is `store.list_calls()`, an unpaged read of every call, which is what a call log
without paging would cost. Everything runs on 127.0.0.1 (a private redis-server) and is bounded in size.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from bench.report import median_round
from callweaver import call_log
from callweaver.store import CallRecord, build_store
from tests.fakes.redis_server import RedisServer

SNAPSHOT = {"name": "bench flow", "nodes": [{"id": f"n{i}", "prompt": "x" * 400} for i in range(12)]}


def seed(store, calls: int, turns: int, now: float) -> None:
    for i in range(calls):
        tracking_id = f"call_{i:07d}"
        store.create_call(CallRecord(
            tracking_id=tracking_id, path="traditional" if i % 4 == 0 else "optimized",
            status="completed" if i % 10 else "in-progress", language="es-ES" if i % 7 == 0 else "en-US",
            to="+15551230000", created_at=now - calls + i, ended_at=now - calls + i + 30 if i % 10 else None,
            workflow=SNAPSHOT, messages=[{"role": "user", "content": "hello " * 20}] * (2 * turns)))
        for t in range(turns):
            store.append_turn(tracking_id, {"path": "optimized", "source": "llm", "provider": "openai",
                                            "firstTokenMs": 300.0 + (i * 7 + t) % 200, "lastTokenMs": 900.0,
                                            "nodeId": "n0", "nextNodeId": "n1", "at": now - calls + i + t})


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return median_round(samples)[0]


def run(backend: str, store, calls: int, args: argparse.Namespace) -> dict:
    seed(store, calls, args.turns, time.time())
    deep = max(0, calls - args.limit)
    return {
        "backend": backend, "calls": calls,
        "first page": median_ms(lambda: call_log.call_page(store, limit=args.limit), args.repeats),
        "deep page": median_ms(lambda: call_log.call_page(store, limit=args.limit, offset=deep), args.repeats),
        "filtered page": median_ms(lambda: call_log.call_page(store, limit=args.limit, path="traditional",
                                                              status="completed"), args.repeats),
        "one call's timeline": median_ms(lambda: call_log.call_detail(store, f"call_{calls // 2:07d}"),
                                         args.repeats),
        "reference: list_calls() (unpaged)": median_ms(lambda: store.list_calls(), max(1, args.repeats // 4)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="500,5000", help="store sizes in calls (default %(default)s)")
    p.add_argument("--turns", type=int, default=4, help="turns per seeded call (default %(default)s)")
    p.add_argument("--limit", type=int, default=25, help="page size (default %(default)s, the page's)")
    p.add_argument("--repeats", type=int, default=20, help="timed repetitions, median reported (default %(default)s)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > 50_000:
        p.error("sizes are capped at 50000 calls (bounded benchmark)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis_server:
        for calls in sizes:
            sqlite_store = build_store(str(Path(tmp) / f"cw-{calls}.sqlite3"))
            rows.append(run("SQLite", sqlite_store, calls, args))
            sqlite_store.close()
            redis_store = build_store("", redis_url=redis_server.url, key_prefix=f"bench:{uuid.uuid4().hex}:")
            rows.append(run("Redis", redis_store, calls, args))
            redis_store.close()
    columns = list(rows[0])
    print(f"### Call log: one page of {args.limit} calls ({args.turns} turns each), median of {args.repeats}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) if isinstance(row[c], (str, int)) else f"{row[c]:.2f} ms"
                                 for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
