"""Reply cache benchmarks.

Default: the same scripted calls on the real-estate flow, with and without CACHE_PREWARM; then the same calls
replayed twice on one server (hit rate on turns whose context repeats, hit latency).
`--backends`: the shared default (SQLiteCache) against FileSystemCache and the per-process SimpleCache, in the
same run: the backend alone (in-process lookups and writes), then pairs of identical calls on a two-worker server.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

from bench.common import (TOPIC_WORDS, add_load_options, DEFAULT_TOKEN_INTERVAL_MS, DEFAULT_TTFT_MS,  # noqa: E402
                          BenchStack, RelayCall, cache_backend, call_body, converse, describe, destination,
                          fetch_turns, fmt_ms, machine_summary, markdown_table, parse_env_pairs, percentile, progress,
                          unique_utterance)

WORKFLOW = "real_estate_property_dealer"
# What callers say over and over; the service's en-US prewarm list covers all five (and three more).
RECURRING_UTTERANCES = ("hello?", "yes", "who is this?", "can you repeat that?", "sorry?")
HIT_P99_TARGET_MS = 5.0  # first token of a cache hit, p99, server-measured


def scripted_calls(calls: int, turns: int, seed: int) -> list[list[str]]:
    """Even turns are recurring lines, odd turns unique ones; the same seed replays the very same calls."""
    rng = random.Random(seed)
    scripts = []
    for i in range(calls):
        script = []
        for t in range(turns):
            if t % 2 == 0:
                script.append(RECURRING_UTTERANCES[(i + t // 2) % len(RECURRING_UTTERANCES)])
            else:
                script.append(unique_utterance(rng, i, t))
        scripts.append(script)
    return scripts


def run_once(stack: BenchStack, prewarm: bool, args: argparse.Namespace, run_index: int) -> dict:
    """A fresh server (empty cache, empty store) replaying the scripted calls; counts from both ends."""
    env = {**parse_env_pairs(args.server_env), "CACHE_PREWARM": "1" if prewarm else "0"}
    with stack.server(workers=1, **env) as server:
        backend = cache_backend(server.url)
        llm_before = stack.llm.stats()["requests"]
        calls = [RelayCall(stack, server.url, destination(i, run_index), WORKFLOW) for i in range(args.calls)]
        scripts = scripted_calls(args.calls, args.turns, args.seed)
        errors: dict[str, int] = {}

        def ring_then_answer(call: RelayCall) -> None:
            call.place()
            gevent.sleep(args.ring_s)  # the phone rings; the prewarm (if on) runs now
            call.answer_and_connect()

        talk_s = converse(calls, scripts, rng=random.Random(args.seed + 1), stagger_s=args.stagger_s,
                          think_s=(args.think_min_s, args.think_max_s), deadline=time.monotonic() + args.time_limit_s,
                          errors=errors, before_first_turn=ring_then_answer)
        for call in calls:
            call.hang_up()
        gevent.sleep(1.0)
        # Prewarm requests may still be running for the last calls; they count (they were spent for this run).
        gevent.sleep(args.ring_s if prewarm else 0)
        llm_requests = stack.llm.stats()["requests"] - llm_before
        stored = fetch_turns(server.url, [c.tracking_id for c in calls if c.tracking_id])
    recurring_turns = recurring_hits = 0
    for call, script in zip(calls, scripts):
        turns = stored.get(call.tracking_id or "", [])
        for utterance, turn in zip(script, turns):
            if utterance in RECURRING_UTTERANCES:
                recurring_turns += 1
                recurring_hits += bool(turn.get("cacheHit"))
    all_turns = [t for turns in stored.values() for t in turns]
    hits = [t for t in all_turns if t.get("cacheHit")]
    llm_turns = [t for t in all_turns if t.get("source") == "llm"]
    apologies = sum(1 for t in all_turns if t.get("source") == "apology")
    if apologies:
        errors["server: apology turns"] = apologies
    progress(f"prewarm={int(prewarm)}: {len(all_turns)} turns, {len(hits)} hits, {llm_requests} LLM requests, "
             f"{talk_s:.1f}s, errors {errors or 0}")
    return {"prewarm": prewarm, "backend": backend, "turns": len(all_turns), "hits": len(hits),
            "llm_turns": len(llm_turns),
            "recurring_turns": recurring_turns, "recurring_hits": recurring_hits, "llm_requests": llm_requests,
            "hit_ms": [t["firstTokenMs"] for t in hits if t.get("firstTokenMs") is not None],
            "miss_ms": [t["firstTokenMs"] for t in llm_turns if t.get("firstTokenMs") is not None],
            "errors": errors}


def pct(part: int, whole: int) -> str:
    return f"{part / whole * 100:.1f} %" if whole else "—"


def report(runs: list[dict], args: argparse.Namespace) -> str:
    rows = []
    for r in runs:
        saved = r["turns"] - r["llm_requests"]
        rows.append([
            "on" if r["prewarm"] else "off", r["turns"], f"{r['hits']} ({pct(r['hits'], r['turns'])})",
            f"{r['recurring_hits']}/{r['recurring_turns']} ({pct(r['recurring_hits'], r['recurring_turns'])})",
            f"{fmt_ms(percentile(r['hit_ms'], 50), 2)} / {fmt_ms(percentile(r['hit_ms'], 95), 2)}",
            f"{fmt_ms(percentile(r['miss_ms'], 50))} / {fmt_ms(percentile(r['miss_ms'], 95))}",
            r["llm_turns"], r["llm_requests"] - r["llm_turns"], r["llm_requests"],
            f"{saved} ({pct(saved, r['turns'])})", sum(r["errors"].values()),
        ])
    lines = [
        f"### Reply cache: {args.calls} calls × {args.turns} turns on the real-estate flow, replayed twice",
        "",
        f"Machine: {machine_summary()}. Fake LLM (own process): TTFT {args.ttft_ms:g} ms, "
        f"{args.token_interval_ms:g} ms/token. Each run: fresh server with one worker, empty reply cache "
        f"({' / '.join(sorted({r['backend'] for r in runs}))}, as the worker reports it), calls placed within "
        f"{args.stagger_s:g} s, the first utterance comes {args.ring_s:g} s after a call is placed (ringing, "
        f"greeting). Turns alternate recurring lines "
        f"({', '.join(RECURRING_UTTERANCES)}) and unique ones."
        + (f" Server environment extras: {', '.join(args.server_env)}." if args.server_env else ""),
        "",
        markdown_table(["CACHE_PREWARM", "turns", "cache hits (rate)", "recurring lines hit",
                        "first token, hits p50 / p95 ms", "first token, misses p50 / p95 ms", "LLM turns",
                        "prewarm LLM requests", "LLM requests total", "LLM requests saved vs one per turn",
                        "errors"], rows),
        "",
        "First-token figures are server-measured (prompt received → first token sent, monotonic clock in the "
        "worker).",
    ]
    for r in runs:
        if r["errors"]:
            lines += ["", f"Errors with prewarm {'on' if r['prewarm'] else 'off'}: "
                          + ", ".join(f"{k}: {v}" for k, v in r["errors"].items())]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- backend comparison

BACKENDS = ("SQLiteCache", "FileSystemCache", "SimpleCache")  # the shared default first


def backend_micro(kind: str, directory: Path, entries: int, lookups: int) -> dict:
    """The backend alone, through ReplyCache (the code the turn runs): writes, hits, misses, prewarm claims."""
    from callweaver.cache_backends import build_cache_backend
    from callweaver.engine.cache import CachedReply, ReplyCache

    cache = ReplyCache(build_cache_backend(kind, redis_url=None, cache_dir=str(directory), default_timeout=3600),
                       ttl_s=3600)
    args = {"workflow_hash": "bench-flow", "node_id": "greeting", "language": "en-US",
            "heard_before": "Hi, this is Ava from Premier Properties."}
    keys = [cache.key(**args, utterance=f"caller line number {i} about the {TOPIC_WORDS[i % len(TOPIC_WORDS)]}")
            for i in range(entries)]
    reply = CachedReply(text="Hi, this is Ava from Premier Properties. How can I help you today?",
                        provider="openai", created_at=time.time(), language="en-US", node_id="greeting")

    def timed(operation, items) -> list[float]:
        out = []
        for item in items:
            started = time.perf_counter()
            operation(item)
            out.append((time.perf_counter() - started) * 1000)
        return out

    put_ms = timed(lambda key: cache.put(key, reply), keys)
    rng = random.Random(7)
    hit_ms = timed(lambda key: cache.get(key), [rng.choice(keys) for _ in range(lookups)])
    miss_ms = timed(lambda i: cache.get(cache.key(**args, utterance=f"never said {i}")), range(lookups))
    claim_ms = timed(lambda i: cache.claim_prewarm(f"flow-{i}:en-US", 600), range(min(lookups, entries)))
    misses = cache.stats()["misses"] - lookups
    return {"backend": kind, "put_ms": put_ms, "hit_ms": hit_ms, "miss_ms": miss_ms, "claim_ms": claim_ms,
            "wrong_misses": misses}


def pair_calls(stack: BenchStack, kind: str, args: argparse.Namespace, run_index: int) -> dict:
    """A fresh two-worker server on `kind`; each pair: call A says the lines, then call B says the same lines.
    The kernel gives each call's webhooks and socket to either worker, as in production."""
    lines = RECURRING_UTTERANCES[: args.lines_per_call]
    # one load generator places every call: lift the per-client limits meant for a person at a browser
    env = {"RATE_LIMIT_MAKE_CALL": "100000 per minute", "MAX_CALLS_PER_DAY": "100000",
           **parse_env_pairs(args.server_env), "CACHE_TYPE": kind}
    with stack.server(workers=2, **env) as server:
        reported = cache_backend(server.url)
        tracking: list[tuple[int, str | None]] = []  # (pair, tracking id) of every second call
        errors: dict[str, int] = {}

        def one_pair(pair: int) -> None:
            # a fresh flow per pair (its own prompt → its own cache entries), so call A always misses
            body_tag = f" (bench pair {run_index}-{pair})"
            try:
                for role in ("A", "B"):
                    call = RelayCall(stack, server.url, destination(pair * 2 + (role == "B"), run_index), WORKFLOW)
                    call.caller.place_call({**call_body(call.to, WORKFLOW),
                                            "globalPrompt": call_body(call.to, WORKFLOW)["globalPrompt"] + body_tag})
                    call.answer_and_connect()
                    for index, line in enumerate(lines):
                        if index:
                            # the caller hears the reply before speaking again; without this pause the next
                            # prompt would also wait for the previous turn's commit (store writes, cache put)
                            gevent.sleep(args.line_pause_s)
                        call.say(line)
                    call.hang_up()
                    if role == "B":
                        tracking.append((pair, call.tracking_id))
            except Exception as exc:
                errors[describe(exc)] = errors.get(describe(exc), 0) + 1

        pool = gevent.pool.Pool(args.pair_concurrency)
        for pair in range(args.pairs):
            pool.spawn(one_pair, pair)
        pool.join(timeout=args.time_limit_s)
        pool.kill()
        gevent.sleep(0.5)
        stored = fetch_turns(server.url, [tid for _, tid in tracking if tid])
    second_turns = [t for turns in stored.values() for t in turns]
    hits = [t for t in second_turns if t.get("cacheHit")]
    pairs_all_hit = sum(1 for turns in stored.values() if turns and all(t.get("cacheHit") for t in turns))
    progress(f"{kind}: {len(stored)} second calls, {len(hits)}/{len(second_turns)} turns hit, errors {errors or 0}")
    return {"backend": kind, "reported": reported, "second_calls": len(stored), "pairs_all_hit": pairs_all_hit,
            "turns": len(second_turns), "hits": len(hits),
            "hit_ms": [t["firstTokenMs"] for t in hits if t.get("firstTokenMs") is not None],
            "miss_ms": [t["firstTokenMs"] for t in second_turns if not t.get("cacheHit")
                        and t.get("firstTokenMs") is not None],
            "errors": errors}


def p50_95_99(values: list[float], digits: int = 3) -> str:
    return " / ".join(fmt_ms(percentile(values, p), digits) for p in (50, 95, 99))


def compare_backends(args: argparse.Namespace) -> str:
    """Both parts for every backend in one run, so the numbers share a machine and a moment."""
    progress(f"backend comparison: {', '.join(BACKENDS)}")
    micro = []
    for kind in BACKENDS:
        with tempfile.TemporaryDirectory(prefix="cw-cache-bench-") as directory:
            micro.append(backend_micro(kind, Path(directory), args.entries, args.lookups))
    with BenchStack("cache-backends", args.ttft_ms, args.token_interval_ms) as stack:
        # rounds interleave the backends, so a noisy minute on the machine hits all of them alike
        served = [{**pair_calls(stack, kind, args, round_index * len(BACKENDS) + index), "round": round_index + 1}
                  for round_index in range(args.rounds) for index, kind in enumerate(BACKENDS)]
    micro_rows = [[m["backend"], p50_95_99(m["put_ms"]), p50_95_99(m["hit_ms"]), fmt_ms(max(m["hit_ms"]), 3),
                   p50_95_99(m["miss_ms"]), p50_95_99(m["claim_ms"])] for m in micro]
    served_rows = [[r["round"],
                    r["backend"] + ("" if r["reported"] == r["backend"] else f" (worker says {r['reported']})"),
                    f"{r['pairs_all_hit']}/{r['second_calls']}", f"{r['hits']}/{r['turns']}",
                    p50_95_99(r["hit_ms"], 2), fmt_ms(max(r["hit_ms"]) if r["hit_ms"] else None, 2),
                    "yes" if r["hit_ms"] and percentile(r["hit_ms"], 99) <= HIT_P99_TARGET_MS else "no",
                    p50_95_99(r["miss_ms"], 1), sum(r["errors"].values())] for r in served]
    lines = [
        "### Reply cache backends side by side: the shared default (SQLiteCache), FileSystemCache, SimpleCache",
        "",
        f"Machine: {machine_summary()}.",
        "",
        f"**The backend alone** (in-process, through `ReplyCache`; {args.entries} entries written, then "
        f"{args.lookups} random hits, {args.lookups} misses, and prewarm claims (`add`); ms):",
        "",
        markdown_table(["backend", "write p50 / p95 / p99", "hit p50 / p95 / p99", "hit max",
                        "miss p50 / p95 / p99", "prewarm claim p50 / p95 / p99"], micro_rows),
        "",
        f"**Served** (real gunicorn, two gevent workers, a fresh server per backend; {args.pairs} pairs of calls, "
        f"{args.pair_concurrency} pairs at a time, each pair on a flow of its own: call A says "
        f"{', '.join(RECURRING_UTTERANCES[: args.lines_per_call])} ({args.line_pause_s:g} s after each reply), "
        f"then call B says the same; fake LLM TTFT "
        f"{args.ttft_ms:g} ms, {args.token_interval_ms:g} ms/token). Figures are call B's turns, server-measured "
        f"first token (prompt received → first token sent):",
        "",
        markdown_table(["round", "backend", "second calls fully from cache", "second-call turns hit",
                        "first token, hits p50 / p95 / p99 ms", "hits max ms", f"hit p99 ≤ {HIT_P99_TARGET_MS:g} ms",
                        "first token, misses p50 / p95 / p99 ms", "errors"], served_rows),
    ]
    for r in served:
        if r["errors"]:
            lines += ["", f"Errors on {r['backend']} (round {r['round']}): "
                      + ", ".join(f"{k}: {v}" for k, v in r["errors"].items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- two replays

GREETING = "<greeting>"  # what the caller answers on the first turn: the same spoken greeting for every call


def replay_twice(stack: BenchStack, args: argparse.Namespace) -> list[dict]:
    """One server, the same scripted calls twice. A turn's context is the conversation so far (the greeting, what
    was said and heard before) plus what the caller says; a turn "repeats" when an earlier turn (this replay or the
    first) had its context. Hits on repeated contexts show the cache paying off; a hit anywhere else would be a
    wrong answer."""
    scripts = scripted_calls(args.calls, args.turns, args.seed)
    seen: set[tuple[str, ...]] = set()
    replays = []
    with stack.server(workers=1, **parse_env_pairs(args.server_env)) as server:
        backend = cache_backend(server.url)
        for replay in (1, 2):
            llm_before = stack.llm.stats()["requests"]
            calls = [RelayCall(stack, server.url, destination(i, 10 + replay), WORKFLOW) for i in range(args.calls)]
            errors: dict[str, int] = {}

            def ring_then_answer(call: RelayCall) -> None:
                call.place()
                gevent.sleep(args.ring_s)
                call.answer_and_connect()

            converse(calls, scripts, rng=random.Random(args.seed + replay), stagger_s=args.stagger_s,
                     think_s=(args.think_min_s, args.think_max_s), deadline=time.monotonic() + args.time_limit_s,
                     errors=errors, before_first_turn=ring_then_answer)
            for call in calls:
                call.hang_up()
            gevent.sleep(1.0 + args.ring_s)  # let any prewarm of the last calls finish: it counts for this replay
            stored = fetch_turns(server.url, [c.tracking_id for c in calls if c.tracking_id])
            turns = []
            for call in calls:
                context: tuple[str, ...] = (GREETING,)
                for sample, turn in zip(call.samples, stored.get(call.tracking_id or "", [])):
                    context += (sample.utterance,)
                    turns.append((context, turn))
                    context += (sample.text,)
            rows = []
            for context, turn in sorted(turns, key=lambda item: item[1].get("at") or 0):  # in the order answered
                rows.append({"repeats": context in seen, **turn})
                seen.add(context)
            repeated = [r for r in rows if r["repeats"]]
            hits = [r for r in rows if r.get("cacheHit")]
            progress(f"replay {replay}: {len(rows)} turns, {len(hits)} hits, {len(repeated)} repeated contexts")
            replays.append({
                "replay": replay, "backend": backend, "turns": len(rows), "hits": len(hits),
                "repeated": len(repeated), "repeated_hits": sum(1 for r in repeated if r.get("cacheHit")),
                "hits_elsewhere": sum(1 for r in rows if r.get("cacheHit") and not r["repeats"]),
                "hit_ms": [r["firstTokenMs"] for r in hits if r.get("firstTokenMs") is not None],
                "miss_ms": [r["firstTokenMs"] for r in rows
                            if r.get("source") == "llm" and r.get("firstTokenMs") is not None],
                "llm_requests": stack.llm.stats()["requests"] - llm_before, "errors": errors,
            })
    return replays


def replay_report(replays: list[dict], args: argparse.Namespace) -> str:
    rows = []
    for r in replays:
        hit_ms = r["hit_ms"]
        rows.append([
            r["replay"], r["turns"], f"{r['hits']} ({pct(r['hits'], r['turns'])})",
            f"{r['repeated_hits']}/{r['repeated']} ({pct(r['repeated_hits'], r['repeated'])})",
            r["hits_elsewhere"],
            " / ".join(fmt_ms(percentile(hit_ms, p), 2) for p in (50, 95, 99)),
            " / ".join(fmt_ms(percentile(r["miss_ms"], p)) for p in (50, 95, 99)),
            r["llm_requests"], sum(r["errors"].values()),
        ])
    second_hits = replays[-1]["hit_ms"] if replays else []
    p99 = percentile(second_hits, 99)
    verdict = ("no hits to measure" if p99 is None else
               f"{'met' if p99 <= HIT_P99_TARGET_MS else 'NOT met'} ({p99:.2f} ms)")
    return "\n".join([
        f"### Reply cache: the same {args.calls} calls × {args.turns} turns replayed twice on one server",
        "",
        f"Machine: {machine_summary()}. Fake LLM (own process): TTFT {args.ttft_ms:g} ms, "
        f"{args.token_interval_ms:g} ms/token, the same reply text every time. One server, one worker, reply "
        f"cache {', '.join(sorted({r['backend'] for r in replays}))}, kept between the replays. A turn's context is "
        "the conversation before it (the greeting, then what was said and heard) and what the caller says; a turn is "
        "\"repeated\" when an earlier-answered turn (in this replay or the first) had its context."
        + (f" Server environment extras: {', '.join(args.server_env)}." if args.server_env else ""),
        "",
        markdown_table(["replay", "turns", "cache hits (rate)", "repeated-context turns hit",
                        "hits on contexts not seen before", "first token, hits p50 / p95 / p99 ms",
                        "first token, LLM turns p50 / p95 / p99 ms", "LLM requests (incl. prewarm)", "errors"],
                       rows),
        "",
        f"Target: a hit's first token ≤ {HIT_P99_TARGET_MS:g} ms p99, server-measured (prompt received → first "
        f"token sent), in the second replay: {verdict}.",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--ring-s", type=float, default=8.0,
                        help="placing a call → its first utterance (ringing plus the spoken greeting)")
    parser.add_argument("--time-limit-s", type=float, default=120.0, help="per run")
    add_load_options(parser, stagger_s=12.0, seed=5, server_env_example="CACHE_TYPE=FileSystemCache")
    backends = parser.add_argument_group("--backends: SQLiteCache vs FileSystemCache vs SimpleCache")
    backends.add_argument("--backends", action="store_true", help="compare the cache backends instead")
    backends.add_argument("--entries", type=int, default=2000, help="entries written in the in-process part")
    backends.add_argument("--lookups", type=int, default=5000, help="hits (and misses) timed in-process")
    backends.add_argument("--pairs", type=int, default=30, help="pairs of identical calls per backend")
    backends.add_argument("--pair-concurrency", type=int, default=4)
    backends.add_argument("--lines-per-call", type=int, default=5)
    backends.add_argument("--rounds", type=int, default=2, help="served part: the backends in turn, this many times")
    backends.add_argument("--line-pause-s", type=float, default=0.5, help="pause between a reply and the next line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backends:
        print(compare_backends(args))
        return 0
    progress(f"cache bench: {args.calls} calls × {args.turns} turns, prewarm off then on")
    with BenchStack("cache", args.ttft_ms, args.token_interval_ms) as stack:
        runs = [run_once(stack, prewarm, args, index) for index, prewarm in enumerate((False, True))]
        replays = replay_twice(stack, args)
    print(report(runs, args))
    print()
    print(replay_report(replays, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
