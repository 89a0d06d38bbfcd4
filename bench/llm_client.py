"""CPU of the LLM streaming client alone: engine/llm_http.py beside geventhttpclient, in one invocation.

    python -m bench.llm_client                       # 100 concurrent streams × 5 turns × ~25 SSE chunks, 3 rounds
    python -m bench.llm_client --reference-rev main  # plus llm_http.py as committed on main: before/after

geventhttpclient is not a dependency (measured, not adopted): install geventhttpclient==2.6.1 to see its rows.
The fake LLM runs in its own process (bench/fake_llm_server.py); this process is gevent-patched like a gunicorn
gevent worker and runs N greenlets, each streaming turns one after another through one client. Only this
process's CPU (utime+stime) is counted, per stream (turn) and per SSE chunk. Both clients do the same work per
turn: send the prebuilt JSON body, read the body's lines with the turn's wall-clock deadline on every read, stop
at `data: [DONE]`, read to the body's end so the connection goes back to the pool. The clients alternate round by
round, so machine load falls on both; the table shows the median round. Loopback only, bounded in time.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Callable  # noqa: E402

import gevent  # noqa: E402
import orjson  # noqa: E402

from bench.report import median_round  # noqa: E402
from bench.stack import FakeLLMProcess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GEVENTHTTPCLIENT = "2.6.1"  # the release measured (latest on PyPI, 2026-11)
DEADLINE_S = 10.0
BODY = orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                     "messages": [{"role": "system", "content": "You are a helpful phone agent."},
                                  {"role": "user", "content": "hello, what do you have available?"}]})
HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json", "Accept": "application/json"}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def llm_http_at(revision: str) -> ModuleType:
    """engine/llm_http.py as committed at `revision`, loaded beside today's (a before/after in one invocation)."""
    source = subprocess.run(["git", "show", f"{revision}:callweaver/engine/llm_http.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = ModuleType(f"llm_http_at_{revision}")
    exec(compile(source, f"llm_http.py@{revision}", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module


def llm_http_client(url: str, llm_http: ModuleType | None = None) -> tuple[Callable[[], int], Callable[[], None]]:
    """One turn through callweaver/engine/llm_http.py (the code under test, or `llm_http` of another
    revision); returns (turn, close)."""
    if llm_http is None:
        from callweaver.engine import llm_http
    ConnectionPool, Endpoint, Exchange = llm_http.ConnectionPool, llm_http.Endpoint, llm_http.Exchange

    pool = ConnectionPool(Endpoint(url, HEADERS))

    def turn() -> int:
        deadline = time.monotonic() + DEADLINE_S
        exchange = Exchange(pool)
        try:
            exchange.start(BODY, deadline, 2.0)
            chunks = 0
            while (line := exchange.next_line(deadline)) is not None:
                if line.startswith(b"data: "):
                    if line == b"data: [DONE]":
                        break
                    chunks += 1
            exchange.finish()
            return chunks
        finally:
            exchange.close()
    return turn, pool.close


def geventhttpclient_client(url: str, concurrency: int, per_read_deadline: bool = True
                            ) -> tuple[Callable[[], int], Callable[[], None]]:
    """The same turn through geventhttpclient's public API (HTTPClient.post, response.readline/release), each
    blocking call under a gevent.Timeout for the turn's deadline; without `per_read_deadline` only the client's
    fixed socket timeout applies (a lower bound: the turn's first-token/stall deadlines are then not kept)."""
    from geventhttpclient import URL, HTTPClient

    parsed = URL(url)
    client = HTTPClient.from_url(parsed, concurrency=concurrency, headers=HEADERS, connection_timeout=2.0,
                                 network_timeout=DEADLINE_S)
    path = parsed.request_uri

    def turn() -> int:
        deadline = time.monotonic() + DEADLINE_S
        with gevent.Timeout(deadline - time.monotonic()):
            response = client.post(path, body=BODY)
        try:
            chunks = 0
            while True:
                if per_read_deadline:
                    with gevent.Timeout(deadline - time.monotonic()):
                        line = response.readline(b"\n")
                else:
                    line = response.readline(b"\n")
                if not line:
                    break
                if line.startswith(b"data: "):
                    if line.startswith(b"data: [DONE]"):
                        with gevent.Timeout(0.25):
                            while response.readline(b"\n"):
                                pass
                        break
                    chunks += 1
            return chunks
        finally:
            response.release()
    return turn, client.close


def run_round(turn: Callable[[], int], streams: int, turns: int) -> dict:
    counts: list[int] = []
    errors: list[str] = []

    def stream() -> None:
        for _ in range(turns):
            try:
                counts.append(turn())
            except BaseException as error:  # noqa: BLE001 - counted and shown
                errors.append(type(error).__name__)
    started_cpu, started = cpu_s(), time.monotonic()
    gevent.joinall([gevent.spawn(stream) for _ in range(streams)])
    cpu, wall = cpu_s() - started_cpu, time.monotonic() - started
    return {"cpu_s": cpu, "wall_s": wall, "turns": len(counts), "chunks": sum(counts), "errors": len(errors),
            "error_kinds": sorted(set(errors))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams (greenlets)")
    parser.add_argument("--turns", type=int, default=5, help="turns per stream, one after another")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client, alternating")
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--token-interval-ms", type=float, default=5.0)
    parser.add_argument("--reference-rev", action="append", default=[],
                        help="also measure engine/llm_http.py as committed at this git revision (repeatable)")
    args = parser.parse_args()

    fake = FakeLLMProcess(ttft_ms=args.ttft_ms, token_interval_ms=args.token_interval_ms).start()
    try:
        url = f"{fake.url}/chat/completions"
        clients = {"engine/llm_http.py (stdlib sockets)": llm_http_client(url)}
        for revision in args.reference_rev:
            clients[f"engine/llm_http.py at {revision}"] = llm_http_client(url, llm_http_at(revision))
        try:
            clients["geventhttpclient, gevent.Timeout per read"] = geventhttpclient_client(url, args.streams * 2)
            clients["geventhttpclient, no per-read deadline (lower bound)"] = geventhttpclient_client(
                url, args.streams * 2, per_read_deadline=False)
        except ImportError:  # measured and not adopted, so not in requirements.txt
            print(f"geventhttpclient is not installed: `pip install geventhttpclient=={GEVENTHTTPCLIENT}` "
                  "to compare", file=sys.stderr)
        for turn, _ in clients.values():  # warm-up: connections opened, imports done
            run_round(turn, min(args.streams, 10), 1)
        rounds: dict[str, list[dict]] = {name: [] for name in clients}
        for _ in range(args.rounds):
            for name, (turn, _) in clients.items():
                rounds[name].append(run_round(turn, args.streams, args.turns))
        for _, close in clients.values():
            close()
    finally:
        fake.stop()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, commit {commit}. "
          f"{args.streams} concurrent streams × {args.turns} turns, {args.rounds} alternating rounds per client "
          f"(median round shown); fake LLM TTFT {args.ttft_ms:g} ms, {args.token_interval_ms:g} ms/token. "
          f"Command: `python -m bench.llm_client {' '.join(sys.argv[1:])}`\n")
    print("| client | CPU per stream (µs) | CPU per SSE chunk (µs) | rounds' CPU per stream (µs) | turns | chunks/turn "
          "| errors |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    for name, results in rounds.items():
        per_turn = [r["cpu_s"] / max(1, r["turns"]) * 1e6 for r in results]
        median, index = median_round(per_turn)
        middle = results[index]
        per_chunk = middle["cpu_s"] / max(1, middle["chunks"]) * 1e6
        reference = reference or median
        errors = sum(r["errors"] for r in results)
        kinds = sorted({kind for r in results for kind in r["error_kinds"]})
        print(f"| {name} | {median:.0f} ({median / reference:.2f}×) | {per_chunk:.1f} | "
              f"{', '.join(f'{v:.0f}' for v in per_turn)} | {sum(r['turns'] for r in results)} | "
              f"{middle['chunks'] / max(1, middle['turns']):.1f} | {errors}{' ' + str(kinds) if kinds else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
