"""Relay benchmark: CallWeaver beside the naive baseline relay (bench/naive_relay.py), same load, same invocation.

Default: 200 calls on one gevent worker, set up first, then talking (starts over 5 s, 1–2 s pauses); prints added
first-token latency (server- and client-side), worker CPU per turn, set-up CPU per call, memory per idle call and
idle RSS for both servers with the ratio. Modes: `--arrival burst|steady` (calls placed through the real API while
earlier ones talk), `--sweep 200,400,800,1200` (highest N with p99 added ≤ 50 ms and no errors), `--workers 2`,
`--cpu-quota 0.1` (the server alone under a cgroup CPU quota, cold start included), `--variant-env KEY=VALUE` (a
third column: CallWeaver again with that environment, e.g. RELAY_TEXT_HOLD_MS=0, in the same invocation).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

from bench.common import (add_load_options, BenchStack, RelayLoadResult, fmt_ms, machine_summary,  # noqa: E402
                          markdown_table, parse_env_pairs, percentile, progress, run_relay_load)

SERVERS = ("naive", "callweaver")
VARIANT = "variant"  # CallWeaver again with --variant-env, a third column of the same invocation
LABELS = {"naive": "naive relay", "callweaver": "CallWeaver"}
CAPACITY_P99_MS = 50.0
# The callers and the fake LLM run ahead of the server (bench/stack.py set_apparatus_nice): their own scheduling
# delay would otherwise count in the client-side "added" the sweep judges.
APPARATUS_NICE = -10
WEB_APP_ORIGIN = "https://kimiya-ai.vercel.app"  # the deployed web app, one of CORS_ORIGINS' defaults
ColdStart = tuple[float | None, float | None, float | None]  # first /ping 200, app loaded, web app's /health 200


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


# ---------------------------------------------------------------------------------------------- CPU quota

CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


@contextmanager
def cpu_quota(cpus: float | None) -> Iterator[list[str]]:
    """A command prefix that runs the server in its own cgroup limited to `cpus` of one core (CFS quota per
    100 ms period), so its imports, workers and turns are all throttled the way Render's fractional CPUs are.
    cgroup v2 `cpu.max` when the cpu controller is there, else cgroup v1 `cpu.cfs_quota_us`."""
    if cpus is None:
        yield []
        return
    name = f"callweaver-bench-{os.getpid()}"
    period_us, quota_us = 100_000, max(1000, int(cpus * 100_000))
    if "cpu" in (CGROUP_V2 / "cgroup.controllers").read_text().split() if (CGROUP_V2 / "cgroup.controllers").exists() else False:
        group = CGROUP_V2 / name
        group.mkdir()
        (group / "cpu.max").write_text(f"{quota_us} {period_us}")
    elif (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        group = CGROUP_V1_CPU / name
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(period_us))
        (group / "cpu.cfs_quota_us").write_text(str(quota_us))
    else:
        raise SystemExit("no writable cgroup CPU controller here (neither cpu.max nor cpu.cfs_quota_us)")
    try:
        yield ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
    finally:
        for _ in range(50):  # the server has stopped; its cgroup is empty once the kernel reaped it
            try:
                group.rmdir()
                break
            except OSError:
                import gevent
                gevent.sleep(0.1)


# ---------------------------------------------------------------------------------------------- runs

def run_one(stack: BenchStack, kind: str, args: argparse.Namespace, calls: int, run_index: int,
            wrap: list[str]) -> tuple[RelayLoadResult, ColdStart]:
    """One server (fresh process), one load; returns the result and its cold start: process → first /ping 200,
    process → the app loaded (CallWeaver answers health checks while its app loads; the naive relay loads first),
    and process → the web app's cross-origin /health answered readably (CallWeaver; the naive relay has none)."""
    env = parse_env_pairs(args.server_env) if kind != "naive" else {}
    if kind == VARIANT:
        env.update(parse_env_pairs(args.variant_env))
    stagger_s = args.stagger_s if args.arrival != "steady" else max(args.stagger_s, calls / args.steady_rate)
    progress(f"{label(kind, args)}: {calls} calls × {args.turns} turns, {args.workers} worker(s)"
             + (f", arrival {args.arrival}" if args.arrival else "") + (f", {args.cpu_quota} CPU" if wrap else ""))
    browser_origin = None if kind == "naive" else WEB_APP_ORIGIN
    with stack.server(workers=args.workers, naive=kind == "naive", wrap=wrap, browser_origin=browser_origin,
                      **env) as server:
        result = run_relay_load(stack, server, calls=calls, turns=args.turns, stagger_s=stagger_s,
                                think_s=(args.think_min_s, args.think_max_s), seed=args.seed,
                                time_limit_s=args.time_limit_s, run_index=run_index, naive=kind == "naive",
                                arrival=bool(args.arrival))
        cold_start = (server.ready_s, server.loaded_s, server.browser_ready_s)
    if result.error_count:
        progress(f"{label(kind, args)} errors: {result.errors}")
    return result, cold_start


def label(kind: str, args: argparse.Namespace) -> str:
    return f"CallWeaver, {' '.join(args.variant_env)}" if kind == VARIANT else LABELS[kind]


def p(values: list[float], pct: float) -> float | None:
    return percentile(values, pct)


def ratio(naive: float | None, ours: float | None) -> str:
    if naive is None or ours is None or naive == 0:
        return "—"
    return f"{ours / naive:.2f}×"


def side_by_side(results: dict[str, RelayLoadResult], ready: dict[str, ColdStart],
                 variant: str | None = None) -> str:
    """One row per measure, naive | CallWeaver | CallWeaver ÷ naive (| the variant, when one ran)."""
    rows = []
    columns = SERVERS + ((VARIANT,) if variant else ())

    def row(label: str, values: dict[str, float | None], digits: int = 1) -> None:
        cells = [fmt_ms(values.get(k), digits) for k in columns]
        rows.append([label, *cells[:2], ratio(values["naive"], values["callweaver"]), *cells[2:]])

    for side, attr in (("server", "server_minus_delivered_ms"), ("client", "client_minus_delivered_ms")):
        for pct in (50, 95, 99):
            row(f"added first token, {side}-side p{pct} (ms)", {k: p(getattr(r, attr), pct) for k, r in results.items()})
    for pct in (50, 99):
        row(f"  prompt sent → LLM has the request, p{pct} (ms)", {k: p(r.to_llm_ms, pct) for k, r in results.items()})
    for pct in (50, 99):
        row(f"  client- minus server-side first token, same turn, p{pct} (ms)",
            {k: p(r.client_minus_server_ms, pct) for k, r in results.items()})
    row("  fake LLM wrote the first token → the caller read it, p99 (ms)",
        {k: p(r.from_llm_ms, 99) for k, r in results.items()})
    for pct in (50, 99):
        row(f"load generator loop lag p{pct} (ms)", {k: p(r.generator_lag_ms, pct) for k, r in results.items()})
    row("fake LLM loop lag p99 (ms)", {k: p(r.fake_llm_lag_ms, 99) for k, r in results.items()})
    row("load generator CPU (share of one core)", {k: r.core_share("load generator") for k, r in results.items()}, 2)
    row("fake LLM CPU (share of one core)", {k: r.core_share("fake LLM") for k, r in results.items()}, 2)
    row("worker CPU per turn (ms)", {k: r.worker_cpu_ms_per_turn for k, r in results.items()}, 2)
    row("worker CPU per call set-up (ms)", {k: r.setup_cpu_ms_per_call for k, r in results.items()}, 2)
    row("memory per idle call (KiB)", {k: r.memory_per_call_kib for k, r in results.items()})
    row("idle worker RSS before calls (MiB)", {k: r.rss_before_kib / 1024 if r.rss_before_kib else None
                                               for k, r in results.items()})
    row("turns/s", {k: r.turns_per_s for k, r in results.items()})
    row("text frames per turn (mean)", {k: sum(r.text_frames) / len(r.text_frames) if r.text_frames else None
                                        for k, r in results.items()})
    for pct in (50, 95, 99):
        row(f"prompt sent → end of the first sentence at the caller, p{pct} (ms)",
            {k: p(r.first_sentence_ms, pct) for k, r in results.items()})
    for pct in (50, 99):
        row(f"prompt sent → the reply's closing frame at the caller, p{pct} (ms)",
            {k: p(r.reply_end_ms, pct) for k, r in results.items()})
    row("cold start: process → first /ping 200 (s)", {k: v[0] for k, v in ready.items()}, 2)
    row("cold start: process → the web app's cross-origin /health 200 (s)", {k: v[2] for k, v in ready.items()}, 2)
    row("cold start: process → app loaded (s)", {k: v[1] for k, v in ready.items()}, 2)
    done = [f"{results[k].turns_completed} / {results[k].error_count}" for k in columns]
    rows.append(["turns completed / errors", *done[:2], "", *done[2:]])
    return markdown_table(["measure", LABELS["naive"], LABELS["callweaver"], "CallWeaver ÷ naive",
                           *([variant] if variant else [])], rows)


def capacity_table(sweep: dict[int, dict[str, RelayLoadResult]]) -> str:
    """p99 added (client-side, the caller's view) and errors per N; per server, the highest N that is within the
    limit together with every smaller N swept (a pass above a failure is noise, not capacity). The last two columns
    say how late the apparatus itself ran in each run (bench/loop_lag.py): a client-side p99 far above the
    server-side one with a high load generator lag is the generator's delay, not the server's."""
    rows, best, failed = [], {k: None for k in SERVERS}, {k: False for k in SERVERS}
    for calls, results in sorted(sweep.items()):
        cells, lags = [], []
        for attr in ("generator_lag_ms", "fake_llm_lag_ms"):  # the apparatus's own lateness, per server's run
            lags.append(" / ".join(fmt_ms(p(getattr(results[k], attr), 99)) if k in results else "—" for k in SERVERS))
        for kind in SERVERS:
            r = results.get(kind)
            if r is None:
                cells.append("—")
                continue
            p99 = p(r.client_minus_delivered_ms, 99)
            ok = p99 is not None and p99 <= CAPACITY_P99_MS and r.error_count == 0
            failed[kind] = failed[kind] or not ok
            if not failed[kind]:
                best[kind] = calls
            cells.append(f"{fmt_ms(p99)} ms, {r.error_count} errors, {fmt_ms(r.worker_cpu_ms_per_turn, 2)} ms CPU/turn"
                         + (" ✓" if ok else ""))
        rows.append([calls, *cells, "", *lags])
    rows.append(["highest N with p99 added ≤ 50 ms and 0 errors (and at every smaller N)", *(str(best[k]) for k in SERVERS),
                 ratio(best["naive"], best["callweaver"]), "", ""])
    return markdown_table(["calls", LABELS["naive"], LABELS["callweaver"], "CallWeaver ÷ naive",
                           "load generator loop lag p99 (ms), naive / CallWeaver run",
                           "fake LLM loop lag p99 (ms), naive / CallWeaver run"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="concurrent calls")
    parser.add_argument("--turns", type=int, default=5, help="turns per call")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn gevent workers for both servers")
    parser.add_argument("--arrival", choices=("burst", "steady"), default=None,
                        help="place calls while earlier ones talk: burst = all within --stagger-s, "
                             "steady = --steady-rate calls per second")
    parser.add_argument("--steady-rate", type=float, default=10.0, help="calls per second in steady arrival")
    parser.add_argument("--sweep", default=None, help="comma-separated call counts, e.g. 200,400,800,1200")
    parser.add_argument("--cpu-quota", type=float, default=None, help="run the servers under this many CPUs")
    parser.add_argument("--only", choices=SERVERS, default=None, help="run one server only")
    parser.add_argument("--variant-env", action="append", default=[], metavar="KEY=VALUE",
                        help="also run CallWeaver with this environment (repeatable), as a third column")
    parser.add_argument("--time-limit-s", type=float, default=240.0, help="give up on calls still talking after this")
    parser.add_argument("--apparatus-nice", type=int, default=APPARATUS_NICE,
                        help="nice offset for the load generator and the fake LLM (the servers run at 0); "
                             "0 = everything at the same priority")
    add_load_options(parser, stagger_s=5.0, seed=7)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = ([args.only] if args.only else list(SERVERS)) + ([VARIANT] if args.variant_env else [])
    counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.calls]
    sweep: dict[int, dict[str, RelayLoadResult]] = {}
    ready: dict[str, ColdStart] = {k: (None, None, None) for k in (*SERVERS, VARIANT)}
    run_index = 0
    with BenchStack("relay", args.ttft_ms, args.token_interval_ms, apparatus_nice=args.apparatus_nice) as stack, \
            cpu_quota(args.cpu_quota) as wrap:
        for calls in counts:
            sweep[calls] = {}
            for kind in kinds:  # interleaved per N, so both servers see the same machine state
                run_index += 1
                sweep[calls][kind], ready_s = run_one(stack, kind, args, calls, run_index, wrap)
                ready[kind] = ready_s if ready[kind][0] is None else ready[kind]
    mode = (f"calls placed while others talk ({args.arrival})" if args.arrival else "calls set up first, then talking")
    print(f"### Relay, side by side: {', '.join(map(str, counts))} calls × {args.turns} turns, "
          f"{args.workers} gevent worker(s){f', {args.cpu_quota} CPU quota' if args.cpu_quota else ''}, {mode}\n")
    print(f"{machine_summary()}; commit {commit()}. Fake LLM (own process): TTFT {args.ttft_ms:g} ms, "
          f"{args.token_interval_ms:g} ms/token. Load generator and fake LLM at nice {stack.apparatus_nice}, "
          f"servers at 0. Command: `python -m bench.relay {' '.join(argv or sys.argv[1:])}`\n")
    if len(counts) > 1 or args.cpu_quota:
        print(capacity_table(sweep))
        print()
    variant = label(VARIANT, args) if args.variant_env else None
    for calls in counts:
        if len(counts) > 1:
            print(f"\n#### {calls} calls\n")
        results = {k: sweep[calls].get(k) or RelayLoadResult(calls, args.turns) for k in SERVERS}
        if variant:
            results[VARIANT] = sweep[calls][VARIANT]
        print(side_by_side(results, ready, variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
