"""What one ended call keeps in Redis until retention purges it (README "Redis memory").

Stores `--calls` calls of the real-estate flow on a throwaway redis-server, each with `--turns` turns committed by the
engine's own turn commit (history, transcript, the turn row as the engine writes it, its time-index entry and
counters) and four status callbacks, then prints Redis' own `used_memory` growth per call and the share of each key
kind (`MEMORY USAGE`). The flow's snapshot is stored once per version and is not counted per call.

    python -m bench.redis_memory --calls 200 --turns 10
"""
from __future__ import annotations

import argparse
import logging
from types import SimpleNamespace

import redis
import structlog

from callweaver.engine.conversation import ConversationEngine, Turn, TurnControl, TurnResult
from callweaver.engine.tracing import NullTracer
from callweaver.engine.workflow import Workflow
from callweaver.store import CallRecord, build_store
from tests.fakes.redis_server import RedisServer
from tests.helpers import load_workflow

SAID = "I am looking for a two bedroom flat near the station, my budget is around five hundred thousand"
HEARD = "A two-bedroom near the station, around five hundred thousand. Do you need parking as well?"
STATUSES = ("initiated", "ringing", "in-progress", "completed")


def store_call(store, tracking_id: str, call_sid: str, workflow: dict, version: str, turns: int) -> None:
    """One call as the service writes it: created, its status callbacks, `turns` turns committed by the engine."""
    record = CallRecord(tracking_id=tracking_id, call_sid=call_sid, workflow=workflow, workflow_hash=version,
                        to="+15551234567", from_number="+15557654321", current_node="budget_node")
    store.create_call(record, workflow_id="wf_bench")
    for sequence, status in enumerate(STATUSES[:-1]):
        store.append_status(tracking_id, status, sequence, {"CallSid": call_sid, "CallStatus": status})
    # The engine's commit with only what it uses: the turn row, transcript entry and history are the service's own.
    engine = SimpleNamespace(store=store, record_transcripts=True, tracer=NullTracer(), cache=None)
    for _ in range(turns):
        result = TurnResult(node_id="budget_node", language="en-US", next_node="budget_node", provider="azure",
                            reply_text=HEARD, llm_requests=1, completed=True)
        record = ConversationEngine.commit_turn(engine, record, Turn(result, iter(()), SAID, TurnControl()),
                                                path="optimized",
                                                timings={"firstTokenMs": 420.5, "lastTokenMs": 910.2})
    store.append_status(tracking_id, STATUSES[-1], len(STATUSES) - 1,
                        {"CallSid": call_sid, "CallStatus": STATUSES[-1], "CallDuration": "120"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # no turn log lines
    workflow = Workflow.from_payload(load_workflow())
    snapshot, version = workflow.snapshot, workflow.version_hash
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        store = build_store("", server.url, key_prefix="bench:")
        store_call(store, "warm", "CA" + "0" * 32, snapshot, version, args.turns)  # the version, scripts, indexes
        before = admin.info("memory")["used_memory"]
        for number in range(1, args.calls + 1):
            store_call(store, f"call_{number}", f"CA{number:032d}", snapshot, version, args.turns)
        grown = admin.info("memory")["used_memory"] - before
        print(f"{args.calls} calls of {args.turns} turns: {grown / args.calls / 1024:.1f} KiB per call "
              f"(used_memory growth)")
        for kind, key in (("call", "call_1"), ("turns", "call_1"), ("statuses", "call_1"), ("sid", f"CA{1:032d}")):
            print(f"  {kind}:<id> {admin.memory_usage(f'bench:{kind}:{key}', samples=0) / 1024:.1f} KiB")
        by_time = admin.memory_usage("bench:turns:by_time", samples=0) / (args.calls + 1)
        print(f"  turns:by_time {by_time / 1024:.1f} KiB per call; workflow_version (once per flow version) "
              f"{admin.memory_usage(f'bench:workflow_version:{version}', samples=0) / 1024:.1f} KiB")
        store.close()
        admin.close()


if __name__ == "__main__":
    main()
