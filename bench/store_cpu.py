"""Store CPU per call, SQLite, the real-estate flow's workflow snapshot: what one call's set-up and three turns ask of
the store (create, six reads as the webhooks and the relay socket do, four status callbacks, three turn commits),
on the thread's CPU clock. Each `--root` is a checkout (e.g. `git archive <commit> | tar -x -C DIR`), measured in its
own process, the roots alternating round by round, so a reference revision runs in the same invocation.

    python -m bench.store_cpu --calls 300                              # this checkout
    python -m bench.store_cpu --calls 300 --root /tmp/ref --root .     # a reference beside this checkout
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

STEPS = ("create", "6 reads", "4 status callbacks", "3 turn commits")


def measure(calls: int) -> dict[str, float]:
    """In this process, with the callweaver found first on sys.path: CPU ms per call for each step."""
    from callweaver.engine.workflow import Workflow
    from callweaver.store import CallRecord
    from callweaver.store.sqlite import SQLiteStore

    fixture = Path("tests/fixtures/workflows/real_estate_property_dealer.json").resolve()
    workflow = Workflow.from_payload(json.loads(fixture.read_text(encoding="utf-8")))
    store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "store_cpu.sqlite3"))
    spent = dict.fromkeys(STEPS, 0.0)
    clock = time.thread_time
    greeting = [{"role": "assistant", "content": "Hello, how can I help you today?"}]
    for i in range(calls):
        tracking_id = f"call_{i}"
        started = clock()
        store.create_call(CallRecord(tracking_id=tracking_id, workflow=workflow.snapshot,
                                     workflow_hash=workflow.version_hash, messages=list(greeting),
                                     current_node="start"))
        spent["create"] += clock() - started
        started = clock()
        for _ in range(6):
            store.get_call(tracking_id)
        spent["6 reads"] += clock() - started
        started = clock()
        for sequence, status in enumerate(("initiated", "ringing", "answered", "in-progress")):
            store.append_status(tracking_id, status, sequence, {"CallStatus": status})
        spent["4 status callbacks"] += clock() - started
        messages = list(greeting)
        for turn in range(3):
            messages = messages + [{"role": "user", "content": f"question {turn} about a flat"},
                                   {"role": "assistant", "content": "x" * 200}]
            started = clock()
            store.commit_turn(tracking_id, {"messages": messages, "current_node": "next"}, {"ttft_ms": 300},
                              transcript_entry={"said": "question", "heard": "answer"})
            spent["3 turn commits"] += clock() - started
    return {step: seconds / calls * 1000 for step, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the roots")
    parser.add_argument("--root", action="append", default=[], help="a checkout to measure (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.calls)))
        return
    from bench.report import compare_checkouts  # this checkout's; the children import the measured one's

    compare_checkouts(str(Path(__file__).resolve()), args.root or [str(Path.cwd())], args.calls, args.rounds, STEPS,
                      f"ms per call, {args.calls} calls, SQLite", digits=3)

if __name__ == "__main__":
    main()
