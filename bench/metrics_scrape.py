"""Scrape cost against stored history: /metrics and a dashboard poll with 10k and 100k stored turns.

Each store (SQLite, and Redis when redis-server is installed) is filled with turns spread over the last 20 hours
through the store's own append_turn (counters included, as the service writes them). Then the real app (Flask
test client, in this process) is asked for /metrics and /api/dashboard-data repeatedly. The same-run reference
is what a scrape used to cost: reading the last 24 hours of turns from the store (`recent_turns`).
"""
import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.common import fmt_ms, machine_summary, markdown_table, percentile, progress
from callweaver import create_app
from callweaver.engine.prometheus import turn_counters
from callweaver.store import CallRecord, build_store

TURNS_PER_CALL = 10


def fill(store, turns: int, seed: int) -> None:
    """`turns` turns in calls of TURNS_PER_CALL, spread over the last 20 hours, all calls ended."""
    rng = random.Random(seed)
    now = time.time()
    for c in range(turns // TURNS_PER_CALL):
        started = now - 20 * 3600 + c * (20 * 3600 / (turns // TURNS_PER_CALL))
        tracking_id = f"call_bench_{c}"
        store.create_call(CallRecord(tracking_id=tracking_id, created_at=started, ended_at=started + 120,
                                     status="completed"))
        for t in range(TURNS_PER_CALL):
            hit = rng.random() < 0.3
            turn = {"path": rng.choice(("optimized", "traditional")), "source": "cache" if hit else "llm",
                    "provider": None if hit else rng.choice(("azure", "openai")), "cacheHit": hit,
                    "firstTokenMs": rng.uniform(1, 5) if hit else rng.uniform(300, 900),
                    "providerTtftMs": None if hit else rng.uniform(295, 890), "at": started + t * 10,
                    "failovers": [{"provider": "azure", "reason": "timeout"}] if rng.random() < 0.02 else []}
            store.append_turn(tracking_id, turn, counters=turn_counters(turn))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def measure(backend: str, turns: int, args: argparse.Namespace, redis_url: str | None, work: Path) -> dict:
    db = str(work / f"{backend}-{turns}.sqlite3")
    store = build_store(db, redis_url if backend == "redis" else None)  # the service's own key prefix
    started = time.monotonic()
    fill(store, turns, args.seed)
    progress(f"{backend}: {turns} turns stored in {time.monotonic() - started:.1f}s")
    env = {"CALLWEAVER_DB": db, "REDIS_URL": redis_url if backend == "redis" else "", "LOG_LEVEL": "ERROR",
           "CACHE_TYPE": "NullCache", "CACHE_DIR": str(work / "cache"), "LLM_PROVIDERS": "openai"}
    client = create_app(env).test_client()
    client.get("/metrics")  # build the worker's services once, as a running worker has
    scrape = timed(lambda: client.get("/metrics"), args.repeats)
    first_poll = timed(lambda: client.get("/api/dashboard-data"), 1)
    polls = timed(lambda: client.get("/api/dashboard-data"), args.repeats)
    old_read = timed(lambda: store.recent_turns(time.time() - 86400), max(3, args.repeats // 10))
    body = client.get("/metrics").get_data(as_text=True)
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                  if line.startswith("callweaver_turns_total{"))
    store.close()
    if backend == "redis":
        redis.Redis.from_url(redis_url).flushdb()  # the bench's own redis-server: empty for the next size
    return {"backend": backend, "turns": turns, "counted": counted, "scrape": scrape, "first_poll": first_poll[0],
            "polls": polls, "old_read": old_read}


def report(rows: list[dict], args: argparse.Namespace) -> str:
    table = []
    for r in rows:
        table.append([
            r["backend"], f"{r['turns']:,}", f"{r['counted']:,.0f}",
            " / ".join(fmt_ms(percentile(r["scrape"], p), 2) for p in (50, 95)),
            fmt_ms(r["first_poll"], 1),
            " / ".join(fmt_ms(percentile(r["polls"], p), 2) for p in (50, 95)),
            " / ".join(fmt_ms(percentile(r["old_read"], p), 1) for p in (50, 95)),
        ])
    return "\n".join([
        f"### Scrape cost against stored history ({args.repeats} scrapes and polls per row)",
        "",
        f"Machine: {machine_summary()}. In-process Flask test client; turns spread over the last 20 hours in calls "
        f"of {TURNS_PER_CALL}; dashboard window 3600 s (the default).",
        "",
        markdown_table(["store", "stored turns", "turns counted by /metrics", "/metrics p50 / p95 ms",
                        "first dashboard poll ms", "later dashboard polls p50 / p95 ms",
                        "reference: reading 24 h of turns (the old scrape) p50 / p95 ms"], table),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--no-redis", action="store_true", help="SQLite only")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="callweaver-bench-scrape-") as tmp:
        work = Path(tmp)
        server = None
        if not args.no_redis:
            from tests.fakes.redis_server import RedisServer
            server = RedisServer().start()
        try:
            for backend in ("sqlite", "redis") if server else ("sqlite",):
                for size in args.sizes:
                    rows.append(measure(backend, size, args, server.url if server else None, work))
        finally:
            if server is not None:
                server.stop()
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
