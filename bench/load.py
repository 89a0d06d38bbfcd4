"""Load patterns: the load options every bench shares, and many relay callers at once with their results.

Import this only after `gevent.monkey.patch_all()` (the bench modules do that first): the load generator runs
hundreds of callers as greenlets."""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import dataclass, field

import gevent
import gevent.pool

from callweaver.simulate.webhooks import http
from tests.fakes.live_server import LiveServer
from bench.loop_lag import LoopLagProbe
from bench.report import describe, progress
from bench.stack import BenchStack, DEFAULT_TOKEN_INTERVAL_MS, DEFAULT_TTFT_MS, cpu_s, rss_kib
from bench.callers import NaiveCall, RelayCall, cache_backend, converse, destination, fetch_turns, server_added_ms, unique_utterance


def add_load_options(parser: argparse.ArgumentParser, *, stagger_s: float, seed: int,
                     server_env_example: str = "CACHE_TYPE=NullCache") -> None:
    """Options every load benchmark shares: call pacing, the fake LLM's speed, server environment, seed."""
    parser.add_argument("--stagger-s", type=float, default=stagger_s, help="calls start within this many seconds")
    parser.add_argument("--think-min-s", type=float, default=1.0, help="shortest pause after a reply")
    parser.add_argument("--think-max-s", type=float, default=2.0, help="longest pause after a reply")
    parser.add_argument("--ttft-ms", type=float, default=DEFAULT_TTFT_MS, help="fake LLM time to first token")
    parser.add_argument("--token-interval-ms", type=float, default=DEFAULT_TOKEN_INTERVAL_MS,
                        help="fake LLM ms per token")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help=f"extra environment for the server (repeatable), e.g. {server_env_example}")
    parser.add_argument("--seed", type=int, default=seed)


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    """`--server-env KEY=VALUE` options → a dict (e.g. CACHE_TYPE=NullCache to measure without the cache)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--server-env wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out




@dataclass
class RelayLoadResult:
    """Everything one relay load run measured; the benches turn it into tables."""

    calls: int
    turns_per_call: int
    calls_connected: int = 0
    turns_completed: int = 0
    turns_stored: int = 0
    llm_turns: int = 0
    apology_turns: int = 0
    failover_turns: int = 0
    setup_s: float = 0.0
    talk_s: float = 0.0
    rss_before_kib: int = 0
    rss_connected_kib: int = 0
    server_added_ms: list[float] = field(default_factory=list)
    server_first_token_ms: list[float] = field(default_factory=list)
    provider_ttft_ms: list[float] = field(default_factory=list)
    client_first_token_ms: list[float] = field(default_factory=list)
    # Paired per turn with the fake LLM's own record of the same request (matched by the unique caller line):
    server_minus_delivered_ms: list[float] = field(default_factory=list)
    client_minus_delivered_ms: list[float] = field(default_factory=list)
    # The same overhead split in two legs on the machine-wide monotonic clock:
    to_llm_ms: list[float] = field(default_factory=list)    # caller sends prompt → fake LLM has read the request
    text_frames: list[int] = field(default_factory=list)     # per turn, `text` frames carrying words
    first_sentence_ms: list[float] = field(default_factory=list)  # per turn, prompt sent → first sentence's end read
    reply_end_ms: list[float] = field(default_factory=list)  # per turn, prompt sent → the reply's `last: true` read
    from_llm_ms: list[float] = field(default_factory=list)  # fake LLM writes first token → caller reads it
    # Per turn, client-side minus server-side first token: time outside the server's clock (the prompt waiting to be
    # read by the worker, frames in flight, the caller late to read the first token)
    client_minus_server_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    llm_stats: dict = field(default_factory=dict)
    # CPU seconds used during the talk phase, per process: "worker", "fake LLM", "load generator".
    talk_cpu_s: dict[str, float] = field(default_factory=dict)
    cache_backend: str = ""  # the reply cache's backend as the worker reported it
    setup_cpu_ms_per_call: float | None = None  # worker CPU while all calls were set up (none talking) ÷ calls
    # How late (ms) each process of the measuring apparatus woke from a 10 ms sleep during the talk phase
    # (bench/loop_lag.py): a frame read late by a busy load generator counts in the client-side "added".
    generator_lag_ms: list[float] = field(default_factory=list)
    fake_llm_lag_ms: list[float] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def memory_per_call_kib(self) -> float | None:
        if not self.calls_connected or not self.rss_connected_kib:  # arrival mode: never all idle at once
            return None
        return (self.rss_connected_kib - self.rss_before_kib) / self.calls_connected

    @property
    def turns_per_s(self) -> float | None:
        return self.turns_completed / self.talk_s if self.talk_s > 0 else None

    def core_share(self, process: str) -> float | None:
        """CPU used during the talk phase as a fraction of one core (1.0 = one core busy all the time)."""
        if self.talk_s <= 0 or process not in self.talk_cpu_s:
            return None
        return self.talk_cpu_s[process] / self.talk_s

    @property
    def worker_cpu_ms_per_turn(self) -> float | None:
        if not self.turns_completed or "worker" not in self.talk_cpu_s:
            return None
        return self.talk_cpu_s["worker"] * 1000 / self.turns_completed


def naive_first_tokens(base_url: str) -> dict[str, float]:
    """The naive relay's server-side first tokens: caller line → ms from prompt received to first token sent
    (the union over its workers)."""
    out: dict[str, float] = {}
    for _ in range(12):  # each worker keeps its own list: new connections land on every worker sooner or later
        resp = http("GET", f"{base_url}/turns", timeout_s=60)
        out.update((row["lastUser"], row["firstTokenMs"]) for row in resp.json())
    return out


def run_relay_load(stack: BenchStack, server: LiveServer, *, calls: int, turns: int, stagger_s: float,
                   think_s: tuple[float, float], seed: int, workflow: str | None = "real_estate_property_dealer",
                   setup_concurrency: int = 25, time_limit_s: float = 180.0,
                   run_index: int = 0, naive: bool = False, arrival: bool = False) -> RelayLoadResult:
    """N concurrent optimized calls talking `turns` cache-missing turns each; bounded in count and in time.

    1. warm-up call (one turn) so one-time costs (first upstream connection, lazy imports) are not per-call memory;
    2. RSS of the worker; 3. set up all N calls (socket open, `setup` sent) and let them sit idle; 4. RSS again;
    5. each call starts talking at a random offset within `stagger_s`, pausing `think_s` between turns;
    6. hang up all, then read every call's server-measured turns from the per-call metrics endpoint.
    With `arrival`, step 3 is skipped: each call is placed (make-call, TwiML, signed socket) at its offset,
    while the earlier calls already talk. With `naive` the server is bench/naive_relay.py (no set-up at all).
    """
    rng = random.Random(seed)
    result = RelayLoadResult(calls=calls, turns_per_call=turns)
    base_url = server.url
    pids = server.worker_pids()
    pid = pids[0]
    started = time.monotonic()
    hard_deadline = started + time_limit_s
    call_class = NaiveCall if naive else RelayCall

    for worker_index in range(len(pids)):  # one warm-up call per worker, as far as the kernel spreads them
        warm = call_class(stack, base_url, destination(999_999 - worker_index - 10 * run_index, run_index), workflow)
        warm.set_up()
        warm.say(f"Warm-up turn {worker_index} before the measured calls start.")
        warm.hang_up()
    result.cache_backend = "none (naive relay)" if naive else cache_backend(base_url)
    gevent.sleep(1.0)
    result.rss_before_kib = sum(rss_kib(p) for p in pids)
    llm_before = stack.llm.stats()

    live = [call_class(stack, base_url, destination(i, run_index), workflow) for i in range(calls)]
    connected: list[RelayCall] = []

    def set_up(call: RelayCall) -> None:
        try:
            call.set_up()
            connected.append(call)
        except Exception as exc:
            result.error(f"setup: {describe(exc)}")

    processes = {"worker": pids, "fake LLM": [stack.llm.proc.pid], "load generator": [os.getpid()]}

    def cpu_now() -> dict[str, float]:
        return {name: sum(cpu_s(p) for p in group) for name, group in processes.items()}

    if not arrival:
        cpu_setup_before = cpu_now()["worker"]
        t0 = time.monotonic()
        pool = gevent.pool.Pool(setup_concurrency)
        for call in live:
            pool.spawn(set_up, call)
        pool.join(timeout=max(5.0, hard_deadline - time.monotonic()))
        pool.kill()
        result.setup_s = time.monotonic() - t0
        result.calls_connected = len(connected)
        gevent.sleep(1.5)  # let the worker finish reading every `setup` message before measuring
        if connected:
            result.setup_cpu_ms_per_call = (cpu_now()["worker"] - cpu_setup_before) * 1000 / len(connected)
        result.rss_connected_kib = sum(rss_kib(p) for p in pids)
        progress(f"{len(connected)}/{calls} calls connected in {result.setup_s:.1f}s; "
                 f"worker RSS {result.rss_before_kib} → {result.rss_connected_kib} KiB")
        talkers = connected
    else:
        talkers = live

    scripts = [[unique_utterance(rng, i, t) for t in range(turns)] for i in range(len(talkers))]
    cpu_before = cpu_now()
    lag_probe = LoopLagProbe().start()
    talk_started = time.monotonic()
    result.talk_s = converse(talkers, scripts, rng=rng, stagger_s=stagger_s, think_s=think_s,
                             deadline=hard_deadline, errors=result.errors,
                             before_first_turn=(lambda call: call.set_up()) if arrival else None)
    talk_ended = time.monotonic()
    lag_probe.stop()
    result.generator_lag_ms = lag_probe.lags_between(talk_started, talk_ended)
    result.fake_llm_lag_ms = stack.llm.loop_lags(talk_started, talk_ended)
    cpu_after = cpu_now()
    result.talk_cpu_s = {name: cpu_after[name] - cpu_before[name] for name in processes}
    if arrival:
        connected = [call for call in live if call.caller.ws is not None]
        result.calls_connected = len(connected)
    result.turns_completed = sum(len(call.samples) for call in connected)
    result.client_first_token_ms = [s.first_token_ms for call in connected for s in call.samples
                                    if s.first_token_ms is not None]
    result.text_frames = [s.text_frames for call in connected for s in call.samples]
    result.first_sentence_ms = [s.first_sentence_ms for call in connected for s in call.samples
                                if s.first_sentence_ms is not None]
    result.reply_end_ms = [s.last_token_ms for call in connected for s in call.samples if s.last_token_ms is not None]
    for call in connected:
        call.hang_up()
    gevent.sleep(1.0)  # sessions commit interrupted turns on close; let them land before reading
    result.llm_stats = {"before": llm_before, "after": stack.llm.stats()}

    delivered = {r["lastUser"]: r for r in stack.llm.requests_since(llm_before["requests"])
                 if r["stream"] and r["ttftMs"] is not None}
    server_first: dict[str, float] = {}  # caller line → server-side ms from prompt received to first token sent
    if naive:
        server_first = naive_first_tokens(base_url)
        result.turns_stored = result.llm_turns = len([u for call in connected for u in
                                                      (s.utterance for s in call.samples) if u in server_first])
        result.server_first_token_ms = [server_first[s.utterance] for call in connected for s in call.samples
                                        if s.utterance in server_first]
    else:
        stored = fetch_turns(base_url, [c.tracking_id for c in connected if c.tracking_id])
        for call in connected:
            server_turns = stored.get(call.tracking_id or "", [])
            if len(server_turns) != len(call.samples):
                continue  # a turn cut off by the time limit: pairing by position would be wrong
            for sample, turn in zip(call.samples, server_turns):
                if turn.get("source") == "llm" and turn.get("firstTokenMs") is not None:
                    server_first[sample.utterance] = turn["firstTokenMs"]
        for turns_of_call in stored.values():
            for turn in turns_of_call:
                result.turns_stored += 1
                if turn.get("source") == "apology":
                    result.apology_turns += 1
                if turn.get("failovers"):
                    result.failover_turns += 1
                if turn.get("firstTokenMs") is not None:
                    result.server_first_token_ms.append(turn["firstTokenMs"])
                if turn.get("providerTtftMs") is not None:
                    result.provider_ttft_ms.append(turn["providerTtftMs"])
                added = server_added_ms(turn)
                if added is not None:
                    result.llm_turns += 1
                    result.server_added_ms.append(added)
    for call in connected:
        for sample in call.samples:
            fake = delivered.get(sample.utterance)
            if fake is None:
                continue
            if sample.utterance in server_first:
                result.server_minus_delivered_ms.append(server_first[sample.utterance] - fake["ttftMs"])
            if sample.first_token_ms is not None and sample.utterance in server_first:
                result.client_minus_server_ms.append(sample.first_token_ms - server_first[sample.utterance])
            if sample.first_token_ms is not None:
                result.client_minus_delivered_ms.append(sample.first_token_ms - fake["ttftMs"])
                result.to_llm_ms.append((fake["receivedAt"] - sample.sent_at) * 1000)
                first_token_at = sample.sent_at + sample.first_token_ms / 1000
                result.from_llm_ms.append((first_token_at - fake["firstTokenAt"]) * 1000)
    if result.apology_turns:
        result.errors["server: apology turns (every provider failed)"] = result.apology_turns
    if result.failover_turns:
        result.errors["server: turns with a provider failover"] = result.failover_turns
    missing = result.turns_completed - result.turns_stored
    if missing > 0:
        result.errors["server: turns not stored"] = missing
    return result


def client_added_ms(result: RelayLoadResult, ttft_ms: float) -> list[float]:
    """Cross-check from the caller's side: first token seen minus the fake LLM's configured TTFT."""
    return [value - ttft_ms for value in result.client_first_token_ms]
