"""Tracing overhead per turn: the same cache-hit turns through the real engine (SQLite store, reply cache) with
tracing off (NullTracer, the default) and on (SDK provider, batch processor, an exporter that drops spans).

Cache hits are the shortest turns (no LLM), so any per-turn cost of the hooks shows most here. A third row
times the no-op hooks alone, in the order one turn calls them: what tracing costs when it is off.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from bench.common import machine_summary, markdown_table, percentile  # noqa: E402
from callweaver.cache_backends import build_cache_backend  # noqa: E402
from callweaver.engine.cache import CachedReply, ReplyCache  # noqa: E402
from callweaver.engine.conversation import ConversationEngine  # noqa: E402
from callweaver.engine.languages import LanguageTable  # noqa: E402
from callweaver.engine.tracing import NullTracer, build_tracer  # noqa: E402
from callweaver.engine.workflow import Workflow  # noqa: E402
from callweaver.logging import init_logging  # noqa: E402
from callweaver.store import CallRecord, build_store  # noqa: E402
from tests.helpers import load_workflow  # noqa: E402

UTTERANCE = "What are your opening hours?"


def dropping_processor():
    """A batch processor like production's, whose exporter discards spans (no collector needed)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    return BatchSpanProcessor(Drop())


def make_engine(folder: Path, tracer) -> tuple[ConversationEngine, CallRecord]:
    store = build_store(str(folder / "cw.sqlite3"))
    cache = ReplyCache(build_cache_backend("SimpleCache", redis_url=None, cache_dir=str(folder / "cache"),
                                           default_timeout=3600), ttl_s=3600)
    engine = ConversationEngine(store, None, LanguageTable.load(), cache, tracer=tracer)
    workflow = Workflow.from_payload(load_workflow("real_estate_property_dealer"))
    record = CallRecord(tracking_id="call_bench_1", path="optimized", workflow=workflow.to_snapshot(),
                        workflow_hash=workflow.version_hash, current_node=workflow.entry_node_id())
    store.create_call(record)
    entry = engine.language_of(record)
    key = cache.key(workflow_hash=workflow.version_hash, node_id=record.current_node, language=entry.code,
                    utterance=UTTERANCE, fillers=entry.fillers)
    cache.put(key, CachedReply(text="We are open nine to five, Monday to Saturday.", provider="bench",
                               created_at=time.time(), language=entry.code, node_id=record.current_node))
    return engine, record


def run_turns(engine: ConversationEngine, record: CallRecord, turns: int) -> list[float]:
    """µs per turn: start, stream every chunk, commit (the store write included), yield to other greenlets."""
    samples = []
    for _ in range(turns):
        started = time.perf_counter()
        turn = engine.start_turn(record, UTTERANCE)
        for _chunk in turn:
            pass
        engine.commit_turn(record, turn, path="optimized", timings={"firstTokenMs": 1.0, "lastTokenMs": 2.0})
        gevent.sleep(0)  # a real turn does socket I/O, which lets the batch processor's greenlet run (timed too)
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def null_hooks_us(calls: int) -> list[float]:
    """The NullTracer hooks one cache-hit turn calls, timed alone (µs per turn)."""
    tracer = NullTracer()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        span = tracer.start_turn("call_bench_1", node="n", language="en-US", path="optimized")
        with tracer.child(span, "cache.lookup") as lookup:
            lookup.set_attribute("callweaver.cache.hit", True)
        tracer.end_turn(span, {})
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def row(name: str, samples: list[float], reference: float | None) -> list:
    p50 = percentile(samples, 50)
    extra = "—" if reference is None else f"{p50 - reference:+.1f}"
    return [name, len(samples), f"{p50:.1f}", f"{percentile(samples, 95):.1f}", extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=2000, help="cache-hit turns per variant (bounded)")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the variants this many times")
    args = parser.parse_args()
    turns = max(100, min(args.turns, 20000))
    init_logging("WARNING")  # the engine logs every turn at INFO; the bench measures turns, not log writes
    off: list[float] = []
    on: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        engines = {"off": make_engine(Path(tmp) / "off", NullTracer()),
                   "on": make_engine(Path(tmp) / "on", build_tracer(None, span_processor=dropping_processor()))}
        for folder in ("off", "on"):
            (Path(tmp) / folder).mkdir(exist_ok=True)
        run_turns(*engines["off"], 50)  # warm-up (imports, first SQLite pages)
        run_turns(*engines["on"], 50)
        for _ in range(max(1, min(args.rounds, 10))):  # interleaved so drift hits both variants alike
            off += run_turns(*engines["off"], turns)
            on += run_turns(*engines["on"], turns)
        engines["on"][0].tracer.provider.shutdown()
    hooks = null_hooks_us(turns * 10)
    reference = percentile(off, 50)
    print(machine_summary())
    print()
    print(markdown_table(["variant", "turns", "p50 µs/turn", "p95 µs/turn", "p50 vs off (µs)"], [
        row("tracing off (NullTracer, the default)", off, None),
        row("tracing on (SDK, batch processor, dropping exporter)", on, reference),
        row("no-op hooks alone (what 'off' spends on tracing)", hooks, None),
    ]))


if __name__ == "__main__":
    main()
