"""Shares of a py-spy profile of the worker, by component: the figures in docs/performance.md, "Where the time goes".

    py-spy record --nonblocking -r 200 -d 12 -p <worker pid> -f raw -o worker.raw   # during a bench.relay run
    python -m bench.profile_shares worker.raw --rate 200 --turns-per-s 60
    python -m bench.profile_shares before.raw after.raw --label before --label after --rate 200 --turns-per-s 60
    python -m bench.profile_shares worker.raw --talk-only    # only the talking calls (no set-up, no metrics reads)

A component's share is the share of samples whose stack contains one of its frames (so components overlap: the
reply-cache write is inside the turn commit). Samples of the gevent threadpool's threads (the DNS resolver) are
counted apart and left out of the total, and so are samples whose stack is empty. With --rate and --turns-per-s
the table adds an estimate of the component's time per turn: samples ÷ rate ÷ (turns/s × the profile's seconds).
py-spy takes a sample whenever the thread is runnable, also while it waits for a core, so these estimates are
upper bounds of CPU time; the waits land mostly in the hub row (the worker resumes in the hub's loop).
"""
import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# (label, frame pattern, optional pattern of a frame that must come earlier in the same stack); each pattern is a
# regular expression matched against frames "function (file:line)". Indented labels are parts of the row above.
# py-spy names a method either plainly or as Class.method, depending on its version.
ENGINE_COMMIT = r"^(ConversationEngine\.)?commit_turn \(callweaver/engine/conversation\.py:"
COMPONENTS: list[tuple[str, str, str | None]] = [
    ("turn commit (`ConversationEngine.commit_turn`)", ENGINE_COMMIT, None),
    ("  reply-cache write (`ReplyCache.put`)", r"^(ReplyCache\.)?put \(callweaver/engine/cache\.py:", None),
    ("  SQLite store, in the commit", r"\(callweaver/store/sqlite\.py:", ENGINE_COMMIT),
    ("SQLite store, anywhere (`callweaver/store/sqlite.py`)", r"\(callweaver/store/sqlite\.py:", None),
    ("LLM provider stream (`_stream_from_provider`)", r"^_stream_from_provider ", None),
    ("  SDK: building and sending the request (`with_streaming_response.create(...).__enter__`)",
     r"^ResponseContextManager\.__enter__ ", None),
    ("    SDK option transform (`maybe_transform`)", r"^maybe_transform ", None),
    ("    SDK request construction (`BaseClient._build_request`)", r"^BaseClient\._build_request ", None),
    ("    opening a new upstream connection (`HTTPConnection._connect`)", r"^HTTPConnection\._connect ", None),
    ("  reading chunk bytes (`Response.iter_bytes`)", r"^Response\.iter_bytes ", None),
    ("  sending the request and reading its head (`Exchange.start`, engine/llm_http.py)", r"^(Exchange\.)?start \(callweaver/engine/llm_http\.py:", None),
    ("  reading SSE lines (`Exchange.next_line`, engine/llm_http.py)", r"^(Exchange\.)?next_line \(callweaver/engine/llm_http\.py:", None),
    ("turn commit, store writes (`update_call`, `append_turn`, `commit_turn`)",
     r"^(\w+\.)?(update_call|append_turn|commit_turn) \(callweaver/store/", None),
    ("  chunk JSON (`json.loads` called by the provider loop)", r"^loads \(json/__init__\.py",
     r"^_stream_from_provider "),
    ("reply-cache key and lookup (`ReplyCache.key`, `ReplyCache.get`)", r"^(ReplyCache\.)?(get|key) \(callweaver/engine/cache\.py:", None),
    ("`Workflow.version_hash`", r"^(Workflow\.)?version_hash ", None),
    ("workflow planning (`plan_turn`)", r"^plan_turn ", None),
    ("writing WebSocket frames (`LockedSender.send_json`)", r"^(LockedSender\.)?send_json \(callweaver/routes/relay\.py:", None),
    ("reading WebSocket frames (simple-websocket)", r"\(simple_websocket/", None),
    ("logging (structlog)", r"\(structlog/", None),
    ("cachelib (any backend)", r"\(cachelib/", None),
    ("garbage collection (native frames; `--native` profiles only)", r"^gc_collect_main ", None),
    ("gevent hub loop (stacks rooted in `Hub.run`)", r"^(Hub\.)?run \(gevent/hub\.py:", None),
]
HUB_ROOT = "gevent hub loop"
THREADPOOL = re.compile(r"^_WorkerGreenlet\.run ")  # the gevent threadpool (resolver); Thread.run is a greenlet


HTTP_REQUEST = re.compile(r"^handle_request \(gunicorn/")
RELAY_SOCKET = re.compile(r"^websocket_route \(flask_sock/")


def read_raw(path: Path, talk_only: bool = False) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) format: frames root-first, separated by ';', then a space and a count. With
    `talk_only`, HTTP requests other than the relay sockets (set-up, the bench reading metrics at the end) are
    left out, so the shares describe the talking calls."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():  # py-spy may record a torn name
        frames, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stack = [f for f in frames.split(";") if f]
        if (talk_only and any(HTTP_REQUEST.search(f) for f in stack)
                and not any(RELAY_SOCKET.search(f) for f in stack)):
            continue
        stacks.append((stack, int(count)))
    return stacks


def python_frames(frames: list[str]) -> list[str]:
    """Native profiles interleave C frames; keep the Python ones (they name a .py file)."""
    return [f for f in frames if ".py:" in f]


def matches(frames: list[str], pattern: re.Pattern, within: re.Pattern | None, root_only: bool) -> bool:
    if root_only:
        py = python_frames(frames)
        return bool(py) and bool(pattern.search(py[0]))
    for i, frame in enumerate(frames):
        if pattern.search(frame) and (within is None or any(within.search(f) for f in frames[:i])):
            return True
    return False


def shares(stacks: list[tuple[list[str], int]]) -> dict:
    main, pool, empty = [], 0, 0
    for frames, count in stacks:
        py = python_frames(frames)
        if not py:
            empty += count
        elif THREADPOOL.search(py[0]):
            pool += count
        else:
            main.append((frames, count))
    rows = []
    for label, pattern, within in COMPONENTS:
        rx, inside = re.compile(pattern), re.compile(within) if within else None
        root_only = label.startswith(HUB_ROOT)
        rows.append((label, sum(count for frames, count in main if matches(frames, rx, inside, root_only))))
    leaves = Counter()
    for frames, count in main:
        leaves[python_frames(frames)[-1]] += count
    return {"rows": rows, "total": sum(count for _, count in main), "threadpool": pool, "empty": empty,
            "leaves": leaves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path, nargs="+", help="py-spy record -f raw output (several: side by side)")
    parser.add_argument("--label", action="append", default=[], help="a column title per profile, in order")
    parser.add_argument("--rate", type=float, help="the -r the profiles were taken with (samples/s)")
    parser.add_argument("--turns-per-s", type=float, action="append", default=[],
                        help="completed turns per second during each profile, in order (one value: all)")
    parser.add_argument("--seconds", type=float, default=12.0, help="the profiles' -d")
    parser.add_argument("--leaves", type=int, default=0, help="also list each profile's N most frequent leaf frames")
    parser.add_argument("--talk-only", action="store_true",
                        help="leave out HTTP requests other than the relay sockets (set-up, metrics reads)")
    args = parser.parse_args(argv)
    results = [shares(read_raw(path, args.talk_only)) for path in args.raw]
    labels = args.label + [path.name for path in args.raw[len(args.label):]]
    rates = args.turns_per_s * len(results) if len(args.turns_per_s) == 1 else args.turns_per_s
    per_turn = bool(args.rate) and len(rates) == len(results)
    headers = ["component"]
    for label in labels:
        headers += [f"{label}: samples", f"{label}: share"] + ([f"{label}: ≈ ms per turn"] if per_turn else [])
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for i, (label, _, _) in enumerate(COMPONENTS):
        cells = [label]
        for k, result in enumerate(results):
            count, total = result["rows"][i][1], result["total"]
            cells += [str(count), f"{count / total * 100:.1f} %" if total else "—"]
            if per_turn:
                cells.append(f"{count / args.rate * 1000 / (rates[k] * args.seconds):.2f}")
        print("| " + " | ".join(cells) + " |")
    print()
    for label, result, k in zip(labels, results, range(len(results))):
        print(f"{label}: {result['total']} samples of the worker's main thread; {result['threadpool']} of the gevent "
              f"threadpool (resolver) and {result['empty']} without Python frames left out"
              + (f"; per-turn figures assume {rates[k] * args.seconds:.0f} turns in {args.seconds:g} s"
                 if per_turn else "") + ".")
    if args.leaves:
        for label, result in zip(labels, results):
            print(f"\n{label}, most frequent leaf frames:")
            for frame, count in result["leaves"].most_common(args.leaves):
                print(f"{count:6d}  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
