"""Relay benchmark: added latency, turns/s and memory per call for N concurrent optimized calls on one worker."""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import sys  # noqa: E402

from bench.common import (add_load_options, DEFAULT_TOKEN_INTERVAL_MS, DEFAULT_TTFT_MS, BenchStack, RelayLoadResult,  # noqa: E402
                          client_added_ms, distribution_cells, fmt_ms, machine_summary, markdown_table,
                          parse_env_pairs, percentile, progress, run_relay_load)

TARGET_P50_MS = 2.0
TARGET_P99_MS = 10.0
TARGET_MEMORY_KIB = 1024.0


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def report(result: RelayLoadResult, args: argparse.Namespace) -> str:
    """The Markdown report of one run: latency, throughput, memory, errors, and the targets."""
    server = result.server_added_ms
    client = client_added_ms(result, args.ttft_ms)
    p50, p99 = percentile(server, 50), percentile(server, 99)
    memory = result.memory_per_call_kib
    llm_after, llm_before = result.llm_stats.get("after", {}), result.llm_stats.get("before", {})
    delivered = llm_after.get("deliveredTtftMs", {})
    lines = [
        f"### Relay: {args.calls} concurrent calls × {args.turns} turns on one gevent worker",
        "",
        f"Machine: {machine_summary()}. Fake LLM (own process): TTFT {args.ttft_ms:g} ms, "
        f"{args.token_interval_ms:g} ms/token, ~25-token replies. Calls start within {args.stagger_s:g} s, "
        f"pause {args.think_min_s:g}–{args.think_max_s:g} s between turns; every utterance misses the cache."
        + (f" Server environment extras: {', '.join(args.server_env)}." if args.server_env else ""),
        "",
        markdown_table(["measure (ms)", "samples", "p50", "p95", "p99"], [
            ["added latency, server (firstTokenMs − providerTtftMs)", len(server), *distribution_cells(server)],
            ["server first token − TTFT the fake delivered, same request", len(result.server_minus_delivered_ms),
             *distribution_cells(result.server_minus_delivered_ms)],
            ["client first token − TTFT the fake delivered, same request", len(result.client_minus_delivered_ms),
             *distribution_cells(result.client_minus_delivered_ms)],
            ["  of which: prompt sent → fake LLM has read the request", len(result.to_llm_ms),
             *distribution_cells(result.to_llm_ms)],
            ["  of which: fake LLM writes first token → caller reads it", len(result.from_llm_ms),
             *distribution_cells(result.from_llm_ms)],
            ["added latency, client (first token seen − configured TTFT)", len(client), *distribution_cells(client)],
            ["first token, server (prompt received → first token sent)", len(result.server_first_token_ms),
             *distribution_cells(result.server_first_token_ms)],
            ["provider TTFT, server (request written → first content chunk)", len(result.provider_ttft_ms),
             *distribution_cells(result.provider_ttft_ms)],
            ["TTFT the fake LLM delivered (its own clock, whole run)", delivered.get("samples", 0),
             fmt_ms(delivered.get("p50")), fmt_ms(delivered.get("p95")), fmt_ms(delivered.get("p99"))],
        ]),
        "",
        markdown_table(["measure", "value"], [
            ["calls connected", f"{result.calls_connected}/{result.calls}"],
            ["turns completed (client) / stored (server) / LLM turns", f"{result.turns_completed} / "
             f"{result.turns_stored} / {result.llm_turns}"],
            ["LLM requests received by the fake", llm_after.get("requests", 0) - llm_before.get("requests", 0)],
            ["talk phase", f"{result.talk_s:.1f} s"],
            ["turns/s (completed turns ÷ talk phase)", fmt_ms(result.turns_per_s, 1)],
            ["CPU during the talk phase, share of one core: worker / fake LLM / load generator",
             " / ".join(fmt_ms(result.core_share(name), 2) for name in ("worker", "fake LLM", "load generator"))],
            ["worker CPU per completed turn", f"{fmt_ms(result.worker_cpu_ms_per_turn, 2)} ms"],
            ["call set-up (make-call + TwiML + socket + setup)", f"{result.setup_s:.1f} s"],
            ["worker RSS before calls → all calls connected and idle",
             f"{result.rss_before_kib / 1024:.1f} → {result.rss_connected_kib / 1024:.1f} MiB"],
            ["memory per live call", "—" if memory is None else f"{memory:.1f} KiB"],
            ["reply cache backend (as the worker reports it)", result.cache_backend or "—"],
            ["errors", result.error_count],
            *[[f"  {kind}", count] for kind, count in sorted(result.errors.items())],
        ]),
        "",
        markdown_table(["target", "measured", "verdict"], [
            [f"added latency p50 ≤ {TARGET_P50_MS:g} ms", fmt_ms(p50, 2),
             verdict(None if p50 is None else p50 <= TARGET_P50_MS)],
            [f"added latency p99 ≤ {TARGET_P99_MS:g} ms", fmt_ms(p99, 2),
             verdict(None if p99 is None else p99 <= TARGET_P99_MS)],
            ["memory per live call ≤ 1 MiB", "—" if memory is None else f"{memory:.1f} KiB",
             verdict(None if memory is None else memory <= TARGET_MEMORY_KIB)],
            ["no errors", result.error_count, verdict(result.error_count == 0)],
        ]),
    ]
    if args.calls != 200:
        lines += ["", f"(The targets are stated for 200 calls; this run had {args.calls}.)"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200, help="concurrent calls")
    parser.add_argument("--turns", type=int, default=5, help="turns per call")
    parser.add_argument("--time-limit-s", type=float, default=240.0, help="give up on calls still talking after this")
    add_load_options(parser, stagger_s=5.0, seed=7)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress(f"relay bench: {args.calls} calls × {args.turns} turns")
    with BenchStack("relay", args.ttft_ms, args.token_interval_ms) as stack:
        with stack.server(workers=1, **parse_env_pairs(args.server_env)) as server:
            result = run_relay_load(stack, server, calls=args.calls, turns=args.turns, stagger_s=args.stagger_s,
                                    think_s=(args.think_min_s, args.think_max_s), seed=args.seed,
                                    time_limit_s=args.time_limit_s)
        if result.error_count:
            tail = "\n".join(stack.last_server_log.splitlines()[-15:])
            progress(f"server log tail:\n{tail}")
    print(report(result, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
