"""What one ended call keeps in Redis until retention purges it (README "Redis memory").

Stores `--calls` calls of the real-estate flow on a throwaway redis-server, each with `--turns` turns as a live call
commits them (history, transcript, turn row and its time-index entry) and four status callbacks, then prints Redis'
own `used_memory` growth per call and the share of each key kind (`MEMORY USAGE`). The flow's snapshot is stored
once per version and is not counted per call.

    python -m bench.redis_memory --calls 200 --turns 10
"""
from __future__ import annotations

import argparse
import time

import redis

from callweaver.engine.workflow import Workflow
from callweaver.store import CallRecord, build_store
from tests.fakes.redis_server import RedisServer
from tests.helpers import load_workflow

SAID = "I am looking for a two bedroom flat near the station, my budget is around five hundred thousand"
HEARD = "A two-bedroom near the station, around five hundred thousand. Do you need parking as well?"
STATUSES = ("initiated", "ringing", "in-progress", "completed")


def store_call(store, tracking_id: str, call_sid: str, workflow: dict, version: str, turns: int) -> None:
    """One call as the service writes it: created, its status callbacks, `turns` committed turns."""
    store.create_call(CallRecord(tracking_id=tracking_id, call_sid=call_sid, workflow=workflow,
                                 workflow_hash=version, to="+15551234567", from_number="+15557654321"),
                      workflow_id="wf_bench")
    messages: list[dict] = []
    for sequence, status in enumerate(STATUSES[:-1]):
        store.append_status(tracking_id, status, sequence, {"CallSid": call_sid, "CallStatus": status})
    for index in range(turns):
        messages += [{"role": "user", "content": SAID}, {"role": "assistant", "content": HEARD}]
        turn = {"firstTokenMs": 420.5, "totalMs": 910.2, "provider": "azure", "cached": False, "index": index}
        store.commit_turn(tracking_id, {"messages": messages, "current_node": "budget_node"}, turn,
                          transcript_entry={"said": SAID, "heard": HEARD, "at": time.time()})
    store.append_status(tracking_id, STATUSES[-1], len(STATUSES) - 1,
                        {"CallSid": call_sid, "CallStatus": STATUSES[-1], "CallDuration": "120"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
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
            print(f"  {kind}:<id> {admin.memory_usage(f'bench:{kind}:{key}') / 1024:.1f} KiB")
        by_time = admin.memory_usage("bench:turns:by_time") / (args.calls + 1)
        print(f"  turns:by_time {by_time / 1024:.1f} KiB per call; workflow_version (once per flow version) "
              f"{admin.memory_usage(f'bench:workflow_version:{version}') / 1024:.1f} KiB")
        store.close()
        admin.close()


if __name__ == "__main__":
    main()
