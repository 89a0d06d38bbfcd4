"""What an idle live call holds in the worker, naive relay beside CallWeaver (issue 12, goal 7).

For each server (one gevent worker, the same fake LLM and Twilio stand-in as bench/relay.py): one warm-up call,
then N calls set up (CallWeaver: make-call, TwiML, signed socket, `setup`; naive relay: socket and `setup`) and
left idle. Measured in the worker by a probe (bench/memory_probe_conf.py): RSS, greenlets, threads and gc-tracked
objects by type, before and with the N calls idle, ÷ N. Then those calls hang up, tracemalloc starts, N new calls
are set up, and what they still hold is grouped by allocation site: the innermost app frame (callweaver/… or
bench/naive_relay.py) and the first frame outside the standard library (the library, or our code, that asked).

    python -m bench.idle_call_memory [--calls 200] [--only callweaver] [--frames 30] [--limit 25]
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

from bench.callers import NaiveCall, RelayCall, destination  # noqa: E402
from bench.report import describe, machine_summary, markdown_table, progress  # noqa: E402
from bench.relay import commit  # noqa: E402
from bench.stack import BenchStack  # noqa: E402
from tests.fakes.live_server import free_port  # noqa: E402

SERVERS = ("naive", "callweaver")
LABELS = {"naive": "naive relay", "callweaver": "CallWeaver"}
PROBE_CONFIG = "bench/memory_probe_conf.py"
SETTLE_S = 1.5  # after the last set-up: let the worker read every `setup` message before measuring


class Probe:
    """One JSON line out, one back, to the worker's probe."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.reader = self.sock.makefile("rb")

    def ask(self, **command) -> dict:
        self.sock.sendall(json.dumps(command).encode() + b"\n")
        return json.loads(self.reader.readline())

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def set_up_all(calls: list[RelayCall], concurrency: int = 25) -> list[RelayCall]:
    connected, errors = [], {}

    def one(call: RelayCall) -> None:
        try:
            call.set_up()
            connected.append(call)
        except Exception as exc:
            errors[describe(exc)] = errors.get(describe(exc), 0) + 1

    pool = gevent.pool.Pool(concurrency)
    for call in calls:
        pool.spawn(one, call)
    pool.join(timeout=300)
    pool.kill()
    if errors:
        progress(f"set-up errors: {errors}")
    gevent.sleep(SETTLE_S)
    return connected


def measure(stack: BenchStack, kind: str, calls: int, frames: int, limit: int, env: dict[str, str]) -> dict:
    naive = kind == "naive"
    call_class = NaiveCall if naive else RelayCall
    probe_port = free_port()
    base = {} if naive else {"MEMORY_PROBE_BASE_CONFIG": "gunicorn.conf.py"}
    with stack.server(workers=1, naive=naive, config=PROBE_CONFIG, MEMORY_PROBE_PORT=str(probe_port),
                      **base, **env) as server:
        warm = call_class(stack, server.url, destination(999_999), "real_estate_property_dealer")
        warm.set_up()
        warm.say("Warm-up turn before the measured calls start.")
        warm.hang_up()
        gevent.sleep(1.0)
        probe = Probe(probe_port)
        before = probe.ask(cmd="counts")
        progress(f"{kind}: setting up {calls} idle calls")
        idle = set_up_all([call_class(stack, server.url, destination(i, 1), "real_estate_property_dealer")
                           for i in range(calls)])
        during = probe.ask(cmd="counts")
        sockets = probe.ask(cmd="sockets")["sockets"]
        for call in idle:
            call.hang_up()
        gevent.sleep(2.0)
        progress(f"{kind}: {len(idle)} calls hung up; tracing {calls} more")
        probe.ask(cmd="trace_start", frames=frames)
        traced = set_up_all([call_class(stack, server.url, destination(i, 2), "real_estate_property_dealer")
                             for i in range(calls)])
        top = probe.ask(cmd="trace_top", calls=len(traced), limit=limit)
        for call in traced:
            call.hang_up()
        probe.close()
    return {"connected": len(idle), "traced": len(traced), "before": before, "during": during, "top": top,
            "sockets": sockets}


def per_call(result: dict, key: str) -> float | None:
    n = result["connected"]
    return (result["during"][key] - result["before"][key]) / n if n else None


def summary_table(results: dict[str, dict]) -> str:
    def cell(kind: str, fn) -> str:
        return fn(results[kind]) if kind in results else "—"

    rows = [
        ["calls idle (connected)", *(cell(k, lambda r: str(r["connected"])) for k in SERVERS)],
        ["worker RSS before the calls (MiB)", *(cell(k, lambda r: f"{r['before']['rss_kib'] / 1024:.1f}") for k in SERVERS)],
        ["worker RSS with the calls idle (MiB)", *(cell(k, lambda r: f"{r['during']['rss_kib'] / 1024:.1f}") for k in SERVERS)],
        ["**RSS per idle call (KiB)**", *(cell(k, lambda r: f"**{per_call(r, 'rss_kib'):.1f}**") for k in SERVERS)],
        ["RSS per idle call once glibc returned its free memory (malloc_trim; KiB)",
         *(cell(k, lambda r: f"{per_call(r, 'rss_trimmed_kib'):.1f}" if r["during"]["rss_trimmed_kib"] else "—")
           for k in SERVERS)],
        ["  pymalloc arenas (1 MiB each) per call (KiB)", *(cell(k, lambda r: pym(r, "arenas", 1024)) for k in SERVERS)],
        ["  in them: live small objects per call (KiB)", *(cell(k, lambda r: pym(r, "allocated")) for k in SERVERS)],
        ["  in them: free blocks of partly used pools per call (KiB)",
         *(cell(k, lambda r: pym(r, "available")) for k in SERVERS)],
        ["  in them: unused pools per call (KiB)", *(cell(k, lambda r: pym(r, "unused_pools")) for k in SERVERS)],
        ["  RSS in glibc's heap per call (KiB)", *(cell(k, lambda r: grown(r, "kinds", "heap")) for k in SERVERS)],
        ["    in it: glibc blocks in use per call (KiB, mallinfo2)", *(cell(k, lambda r: grown(r, "malloc", "in_use"))
                                                                    for k in SERVERS)],
        ["    in it: glibc free blocks per call (KiB)", *(cell(k, lambda r: grown(r, "malloc", "free")) for k in SERVERS)],
        ["  RSS in other anonymous memory per call (KiB: pymalloc arenas, glibc's mmapped blocks, greenlets' frame "
         "stacks)", *(cell(k, lambda r: grown(r, "kinds", "anon")) for k in SERVERS)],
        ["    in it: glibc's mmapped blocks per call (KiB)", *(cell(k, lambda r: grown(r, "malloc", "mmapped"))
                                                             for k in SERVERS)],
        ["Python allocations still held per call (KiB, tracemalloc)",
         *(cell(k, lambda r: f"{r['top']['total_bytes_per_call'] / 1024:.1f}") for k in SERVERS)],
        ["greenlets per call", *(cell(k, lambda r: f"{per_call(r, 'greenlets'):.2f}") for k in SERVERS)],
        ["threads (OS) per call", *(cell(k, lambda r: f"{per_call(r, 'threads'):.2f}") for k in SERVERS)],
        ["cyclic garbage the probe's collection freed just before measuring, per call (objects)",
         *(cell(k, lambda r: f"{r['during'].get('garbage', 0) / r['connected']:.1f}") for k in SERVERS)],
        ["gc-tracked objects per call", *(cell(k, lambda r: f"{sum_types(r) / r['connected']:.0f}") for k in SERVERS)],
    ]
    return markdown_table(["per idle call", *(LABELS[k] for k in SERVERS)], rows)


def pym(result: dict, key: str, scale_kib: float = 1 / 1024) -> str:
    """A pymalloc figure's growth per idle call, in KiB (`scale_kib`: KiB per unit)."""
    before, during = result["before"]["pymalloc"].get(key), result["during"]["pymalloc"].get(key)
    if before is None or during is None or not result["connected"]:
        return "—"
    return f"{(during - before) * scale_kib / result['connected']:.1f}"


def grown(result: dict, group: str, key: str) -> str:
    """A probe figure's growth per idle call, in KiB (`group`: "kinds" or "malloc", already in KiB)."""
    before, during = (result[phase].get(group) or {} for phase in ("before", "during"))
    if key not in before or key not in during or not result["connected"]:
        return "—"
    return f"{(during[key] - before[key]) / result['connected']:.1f}"


def type_deltas(result: dict) -> dict[str, float]:
    before, during, n = result["before"]["types"], result["during"]["types"], result["connected"] or 1
    return {name: (during.get(name, 0) - before.get(name, 0)) / n for name in set(before) | set(during)}


def sum_types(result: dict) -> int:
    return sum(result["during"]["types"].values()) - sum(result["before"]["types"].values())


def types_table(results: dict[str, dict], limit: int) -> str:
    deltas = {k: type_deltas(r) for k, r in results.items()}
    names = sorted({n for d in deltas.values() for n, v in d.items() if abs(v) >= 0.5},
                   key=lambda n: -max(abs(d.get(n, 0)) for d in deltas.values()))[:limit]
    rows = [[f"`{n}`", *(f"{deltas[k].get(n, 0):.1f}" if k in deltas else "—" for k in SERVERS)] for n in names]
    return markdown_table(["gc-tracked objects per idle call, by type", *(LABELS[k] for k in SERVERS)], rows)


def sites_table(result: dict) -> str:
    rows = [[f"`{app}`", f"`{owner}`", f"{size / 1024:.2f}", f"{blocks:.1f}"]
            for app, owner, size, blocks in result["top"]["sites"]]
    return markdown_table(["innermost app frame", "first frame outside the stdlib", "KiB per call", "blocks per call"], rows)


def packages_table(results: dict[str, dict]) -> str:
    sizes = {k: dict(r["top"]["packages"]) for k, r in results.items()}
    names = sorted({n for s in sizes.values() for n in s}, key=lambda n: -max(s.get(n, 0) for s in sizes.values()))
    rows = [[f"`{n}`", *(f"{sizes[k].get(n, 0) / 1024:.2f}" if k in sizes else "—" for k in SERVERS)]
            for n in names if max(s.get(n, 0) for s in sizes.values()) >= 50]
    return markdown_table(["who asked (first frame outside the stdlib)", *(f"{LABELS[k]}, KiB per call" for k in SERVERS)], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--only", choices=SERVERS, default=None)
    parser.add_argument("--frames", type=int, default=30, help="tracemalloc frames per allocation")
    parser.add_argument("--limit", type=int, default=25, help="rows per table")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for CallWeaver (repeatable)")
    args = parser.parse_args(argv)
    env = dict(pair.split("=", 1) for pair in args.server_env)
    results = {}
    with BenchStack("idle-memory") as stack:
        for kind in ([args.only] if args.only else SERVERS):
            results[kind] = measure(stack, kind, args.calls, args.frames, args.limit, env if kind != "naive" else {})
    print(f"### Idle call memory: {args.calls} idle calls on one gevent worker\n")
    print(f"{machine_summary()}; commit {commit()}. Command: "
          f"`python -m bench.idle_call_memory {' '.join(argv or sys.argv[1:])}`\n")
    print(summary_table(results) + "\n")
    print(packages_table(results) + "\n")
    print(types_table(results, args.limit) + "\n")
    for kind, result in results.items():
        print(f"Open sockets in the {LABELS[kind]} worker with the calls idle: "
              + ", ".join(f"{n} × {where}" for where, n in sorted(result["sockets"].items(), key=lambda i: -i[1])[:4])
              + "\n")
        print(f"#### {LABELS[kind]}: the largest allocation sites still held per idle call (tracemalloc, "
              f"{args.frames} frames)\n")
        print(sites_table(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
