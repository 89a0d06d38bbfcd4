"""Scaling benchmark: added latency and memory per call at 1, 50, 200 and 500 concurrent calls on one worker."""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import sys  # noqa: E402
import time  # noqa: E402

from bench.common import (add_load_options, DEFAULT_TOKEN_INTERVAL_MS, DEFAULT_TTFT_MS, BenchStack, RelayLoadResult,  # noqa: E402
                          client_added_ms, fmt_ms, machine_summary, markdown_table, parse_env_pairs, percentile,
                          progress, raise_open_files_limit, run_relay_load)


def row(result: RelayLoadResult, ttft_ms: float) -> list[str]:
    server, paired = result.server_added_ms, result.server_minus_delivered_ms
    client = client_added_ms(result, ttft_ms)
    memory = result.memory_per_call_kib
    return [str(result.calls), str(result.turns_per_call), str(len(server)),
            fmt_ms(percentile(server, 50), 2), fmt_ms(percentile(server, 99), 2),
            fmt_ms(percentile(paired, 50)), fmt_ms(percentile(paired, 99)),
            fmt_ms(percentile(client, 50)), fmt_ms(percentile(client, 99)),
            "—" if memory is None else f"{memory:.0f}", fmt_ms(result.turns_per_s),
            fmt_ms(result.core_share("worker"), 2), fmt_ms(result.worker_cpu_ms_per_turn, 2),
            str(result.error_count)]


def report(results: list[RelayLoadResult], args: argparse.Namespace, elapsed_s: float) -> str:
    lines = [
        "### Scaling: concurrent calls on one gevent worker",
        "",
        f"Machine: {machine_summary()}. Fake LLM (own process): TTFT {args.ttft_ms:g} ms, "
        f"{args.token_interval_ms:g} ms/token, ~25-token replies. Each level: a fresh server, calls start "
        f"within {args.stagger_s:g} s, pause {args.think_min_s:g}–{args.think_max_s:g} s between turns, every "
        f"utterance misses the cache. Total run {elapsed_s:.0f} s."
        + (f" Server environment extras: {', '.join(args.server_env)}." if args.server_env else ""),
        "",
        markdown_table(["calls", "turns/call", "LLM turns", "added p50 ms", "added p99 ms",
                        "server − fake TTFT p50 ms", "server − fake TTFT p99 ms", "client − TTFT p50",
                        "client − TTFT p99", "KiB per live call", "turns/s", "worker CPU (cores)",
                        "worker CPU ms/turn", "errors"],
                       [row(r, args.ttft_ms) for r in results]),
        "",
        "added = firstTokenMs − providerTtftMs (server clock); server − fake TTFT = firstTokenMs minus the TTFT "
        "the fake LLM delivered for the same request (its own clock); client − TTFT = first token seen by the "
        "caller minus the configured TTFT; worker CPU = its CPU time during the talk phase ÷ the phase's length. "
        "Reply cache backend, as the worker reported it: "
        + ", ".join(sorted({r.cache_backend or "—" for r in results})) + ".",
    ]
    for r in results:
        if r.errors:
            lines += ["", f"Errors at {r.calls} calls: " + ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items()))]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,50,200,500", help="comma-separated concurrent call counts")
    parser.add_argument("--turns", type=int, default=3, help="turns per call up to 200 calls")
    parser.add_argument("--large-turns", type=int, default=2, help="turns per call above 200 calls")
    parser.add_argument("--level-time-limit-s", type=float, default=90.0, help="give up on a level after this")
    add_load_options(parser, stagger_s=5.0, seed=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    limit = raise_open_files_limit()
    progress(f"scaling bench: levels {levels}, open-files limit {limit}")
    started = time.monotonic()
    results = []
    with BenchStack("scaling", args.ttft_ms, args.token_interval_ms) as stack:
        for index, calls in enumerate(levels):
            turns = args.turns if calls <= 200 else args.large_turns
            progress(f"level {calls} calls × {turns} turns")
            with stack.server(workers=1, **parse_env_pairs(args.server_env)) as server:
                results.append(run_relay_load(stack, server, calls=calls, turns=turns, stagger_s=args.stagger_s,
                                              think_s=(args.think_min_s, args.think_max_s), seed=args.seed + index,
                                              time_limit_s=args.level_time_limit_s, run_index=index))
    print(report(results, args, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
