"""CPU per turn of the LLM provider chain alone (`ProviderChain.stream`: llm_http, sse, providers), code beside code.

    python -m bench.llm_chain --root /tmp/main-export --root .     # another checkout (git archive) beside this one

Each root runs in its own gevent-patched process (like a gunicorn gevent worker): N greenlets each stream turns
one after another from the fake LLM (its own process, TTFT 300 ms, 20 ms per token, ~25 tokens: the relay
bench's), reading every token as it arrives. Only that process's CPU (utime+stime) is counted. Roots alternate
round by round against the same fake LLM, so machine load falls on both; loopback only, bounded in count.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ONE_ROUND = """
from gevent import monkey; monkey.patch_all()
import json, resource, sys, types
sys.path.insert(0, sys.argv[1])
import gevent
from callweaver.engine.providers import build_provider_chain

url, streams, turns = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
chain = build_provider_chain(types.SimpleNamespace(llm_providers=("openai",), openai_api_key="sk-bench",
                                                   openai_base_url=url, openai_model="gpt-4o-mini"))
chain.warm_up()
messages = [{"role": "system", "content": "You are a helpful phone agent."},
            {"role": "user", "content": "hello, what do you have available?"}]
done, failed = [0], [0]

def stream():
    for _ in range(turns):
        reply = chain.stream(messages)
        for _token in reply:
            pass
        done[0] += 1
        failed[0] += reply.provider is None

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

gevent.joinall([gevent.spawn(stream) for _ in range(10)])  # connections and code warm
done[0] = failed[0] = 0
started = cpu()
gevent.joinall([gevent.spawn(stream) for _ in range(streams)])
print(json.dumps({"us_per_turn": (cpu() - started) / max(done[0], 1) * 1e6, "turns": done[0],
                  "failed": failed[0]}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", action="append", default=[], help="a checkout to measure (repeatable)")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    roots = [str(Path(root).resolve()) for root in (args.root or [REPO])]
    sys.path.insert(0, str(REPO))
    from bench.report import markdown_table, percentile
    from bench.stack import FakeLLMProcess

    llm = FakeLLMProcess().start()
    results: dict[str, list[dict]] = {root: [] for root in roots}
    try:
        for _ in range(args.rounds):
            for root in roots:
                out = subprocess.run([sys.executable, "-c", ONE_ROUND, root, llm.url, str(args.streams),
                                      str(args.turns)], capture_output=True, text=True, timeout=600, check=True)
                results[root].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        llm.stop()
    print(f"{args.streams} concurrent streams × {args.turns} turns, {args.rounds} alternating rounds per root "
          f"(median shown); fake LLM TTFT {llm.ttft_ms:g} ms, {llm.token_interval_ms:g} ms/token\n")
    medians = {root: percentile([r["us_per_turn"] for r in rounds], 50) for root, rounds in results.items()}
    first = medians[roots[0]]
    print(markdown_table(["root", "CPU per turn (µs), median", "rounds (µs)", "turns", "failed"], [
        [root, f"{medians[root]:.0f} ({medians[root] / first:.2f}×)",
         ", ".join(f"{r['us_per_turn']:.0f}" for r in rounds), sum(r["turns"] for r in rounds),
         sum(r["failed"] for r in rounds)] for root, rounds in results.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
