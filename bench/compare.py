"""Traditional (<Gather> webhooks) vs optimized (ConversationRelay) first reply latency, same LLM, same callers."""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent.pool  # noqa: E402

from bench.common import (add_load_options, DEFAULT_TOKEN_INTERVAL_MS, DEFAULT_TTFT_MS, BenchStack, GatherCall,  # noqa: E402
                          RelayCall, converse, describe, destination, fetch_turns, fmt_ms, machine_summary,
                          markdown_table, parse_env_pairs, percentile, progress, unique_utterance)


def set_up_all(calls: list, concurrency: int, errors: dict[str, int], limit_s: float) -> list:
    """Place and answer every call (bounded concurrency and time); returns the calls that are ready."""
    ready: list = []

    def one(call) -> None:
        try:
            call.set_up()
            ready.append(call)
        except Exception as exc:
            kind = f"setup: {describe(exc)}"
            errors[kind] = errors.get(kind, 0) + 1

    pool = gevent.pool.Pool(concurrency)
    for call in calls:
        pool.spawn(one, call)
    pool.join(timeout=limit_s)
    pool.kill()
    return sorted(ready, key=calls.index)


def run_path(stack: BenchStack, base_url: str, path: str, args: argparse.Namespace, run_index: int) -> dict:
    """One phase: the same scripted calls over one path; client- and server-measured first reply latency."""
    call_class = GatherCall if path == "traditional" else RelayCall
    calls = [call_class(stack, base_url, destination(i, run_index), "real_estate_property_dealer")
             for i in range(args.calls)]
    errors: dict[str, int] = {}
    deadline = time.monotonic() + args.time_limit_s
    ready = set_up_all(calls, 20, errors, args.time_limit_s)
    script_rng = random.Random(args.seed)  # the same seed for both paths: the very same caller lines
    scripts = [[unique_utterance(script_rng, i, t) for t in range(args.turns)] for i in range(args.calls)]
    scripts = [scripts[calls.index(call)] for call in ready]
    talk_s = converse(ready, scripts, rng=random.Random(args.seed + 1), stagger_s=args.stagger_s,
                      think_s=(args.think_min_s, args.think_max_s), deadline=deadline, errors=errors)
    for call in ready:
        call.hang_up()
    gevent.sleep(1.0)
    stored = fetch_turns(base_url, [c.tracking_id for c in ready if c.tracking_id])
    server_ms = [t["firstTokenMs"] for turns in stored.values() for t in turns
                 if t.get("source") == "llm" and t.get("firstTokenMs") is not None and t.get("path") == path]
    apologies = sum(1 for turns in stored.values() for t in turns if t.get("source") == "apology")
    if apologies:
        errors["server: apology turns"] = apologies
    client_ms = [s.first_token_ms for call in ready for s in call.samples if s.first_token_ms is not None]
    progress(f"{path}: {len(client_ms)} turns in {talk_s:.1f}s, errors {errors or 0}")
    return {"path": path, "client": client_ms, "server": server_ms, "errors": errors, "calls": len(ready)}


def report(results: list[dict], args: argparse.Namespace) -> str:
    what = {"traditional": "speech result posted → TwiML with the whole reply received",
            "optimized": "prompt sent → first text token received"}
    rows = []
    for r in results:
        rows.append([r["path"], what[r["path"]], len(r["client"]), fmt_ms(percentile(r["client"], 50)),
                     fmt_ms(percentile(r["client"], 95)), len(r["server"]), fmt_ms(percentile(r["server"], 50)),
                     fmt_ms(percentile(r["server"], 95)), sum(r["errors"].values())])
    by_path = {r["path"]: r for r in results}
    lines = [
        f"### Traditional vs optimized: {args.calls} concurrent calls × {args.turns} turns per path, one worker",
        "",
        f"Machine: {machine_summary()}. Fake LLM (own process): TTFT {args.ttft_ms:g} ms, "
        f"{args.token_interval_ms:g} ms/token, ~25-token replies. Reply cache off (NullCache) so both paths "
        f"reach the LLM on every turn; same caller lines on both paths.",
        "",
        markdown_table(["path", "client clock: what is timed", "samples", "client p50 ms", "client p95 ms",
                        "server samples", "server firstTokenMs p50", "server firstTokenMs p95", "errors"], rows),
    ]
    trad, opt = by_path.get("traditional"), by_path.get("optimized")
    if trad and opt and trad["client"] and opt["client"]:
        t50, o50 = percentile(trad["client"], 50), percentile(opt["client"], 50)
        t95, o95 = percentile(trad["client"], 95), percentile(opt["client"], 95)
        lines += ["", f"Client p50: optimized is {t50 - o50:.0f} ms sooner ({(t50 - o50) / t50 * 100:.0f} %); "
                      f"p95: {t95 - o95:.0f} ms sooner."]
    for r in results:
        if r["errors"]:
            lines += ["", f"Errors on the {r['path']} path: " + ", ".join(f"{k}: {v}" for k, v in r["errors"].items())]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20, help="concurrent calls per path")
    parser.add_argument("--turns", type=int, default=5, help="turns per call")
    parser.add_argument("--time-limit-s", type=float, default=120.0, help="per path")
    add_load_options(parser, stagger_s=3.0, seed=11)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress(f"compare bench: {args.calls} calls × {args.turns} turns per path")
    results = []
    with BenchStack("compare", args.ttft_ms, args.token_interval_ms) as stack:
        with stack.server(workers=1, **{"CACHE_TYPE": "NullCache", **parse_env_pairs(args.server_env)}) as server:
            for run_index, path in enumerate(("traditional", "optimized")):
                results.append(run_path(stack, server.url, path, args, run_index))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
