"""Preemptive generation bench: final prompt → first token with speculation off and on, in one run, and its cost.

Callers speak word by word at a normal rate (partial prompts), then the recogniser's end-of-speech delay, then
the final prompt. In the "clientSpeaking" variants the scripted caller's Twilio also reports voice activity
(`info` clientSpeaking on/off, what `debug="speaker-events"` asks for): "off" after a silence as long as the VAD
hangover (at the end of speech, and in a longer hesitation), "on" when the caller goes on; in the others it sends
none, so the server falls back to the text/cadence signal. Each configuration gets a fresh gunicorn server against the same fake LLM process (TTFT
300 ms by default). Measured per turn: the caller's wait from sending the final prompt to the first reply token
(client clock), the server's own firstTokenMs, whether a speculation was adopted, and the LLM requests the
fake actually received (so discarded speculations count).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gevent  # noqa: E402

from bench.common import (DEFAULT_TOKEN_INTERVAL_MS, DEFAULT_TTFT_MS, BenchStack, RelayCall,  # noqa: E402
                          destination, distribution_cells, fetch_turns, fmt_ms, machine_summary, markdown_table,
                          percentile, progress, unique_utterance)
from callweaver.simulate.caller import END_OF_SPEECH_MS, NORMAL_WORDS_PER_MINUTE, VAD_HANGOVER_MS  # noqa: E402

TARGET_P50_MS = 50.0
TARGET_REQUESTS_PER_TURN = 1.5


# Things callers say on the phone, each with one hesitation ("|"): mostly after a word that cannot end a sentence,
# in a few after one that can (reading out a number). The hesitation is longer than a word gap but shorter than
# the recogniser's end-pointing, so no final comes in it.
REALISTIC_LINES = (
    "I'd like to book a | table for two tonight",
    "Can you tell me if the | pharmacy is open on Sunday",
    "I need to move my | appointment to Thursday afternoon",
    "What time does the | last train leave for the airport",
    "My order number is four five | seven two and it has not arrived",
    "I want to know whether | you deliver to my street",
    "Is it possible to | pay by card when I arrive",
    "Could you put me through to | someone in billing please",
    "The parcel was left at | number nineteen | but I live at ninety",
    "We would like a room with | two beds and a view of the sea",
)


@dataclass
class Variant:
    label: str
    env: dict
    punctuated_partials: bool = True
    realistic: bool = False   # REALISTIC_LINES with a hesitation, instead of the bench's generated question
    speaker_events: bool = False           # the caller's Twilio sends clientSpeaking on/off
    hesitation_ms: float | None = None     # realistic lines: this hesitation instead of --hesitation-ms
    vad_hangover_ms: float | None = None   # clientSpeaking off after this much silence instead of --vad-hangover-ms


@dataclass
class VariantResult:
    variant: Variant
    client_ms: list = field(default_factory=list)     # final prompt sent → first token read (caller's clock)
    server_ms: list = field(default_factory=list)     # final prompt received → first token sent (server's clock)
    saved_ms: list = field(default_factory=list)
    turns: int = 0
    adopted: int = 0
    speculated: int = 0
    llm_requests: int = 0                             # what the fake LLM received during the run
    extra_tokens: int = 0
    errors: int = 0
    by_signal: dict = field(default_factory=dict)     # signal → [adopted, started] (stored turns)


VARIANTS = [
    Variant("preemption off", {"PREEMPTIVE_GENERATION": "0"}),
    Variant("preemption on (defaults), recogniser punctuates partials", {"PREEMPTIVE_GENERATION": "1"}),
    Variant("preemption on (defaults), partials without sentence marks, no clientSpeaking",
            {"PREEMPTIVE_GENERATION": "1"}, punctuated_partials=False),
    Variant("preemption on, PREEMPTIVE_END_OF_UTTERANCE=0 (plain window), partials without sentence marks",
            {"PREEMPTIVE_GENERATION": "1", "PREEMPTIVE_END_OF_UTTERANCE": "0"}, punctuated_partials=False),
    Variant("preemption on, PREEMPTIVE_STABLE_MS=150, partials without sentence marks",
            {"PREEMPTIVE_GENERATION": "1", "PREEMPTIVE_STABLE_MS": "150"}, punctuated_partials=False),
    Variant("preemption on (defaults), realistic lines with a hesitation, partials without sentence marks, "
            "no clientSpeaking", {"PREEMPTIVE_GENERATION": "1"}, punctuated_partials=False, realistic=True),
    Variant("preemption on, PREEMPTIVE_END_OF_UTTERANCE=0 (plain window), realistic lines with a hesitation, "
            "partials without sentence marks",
            {"PREEMPTIVE_GENERATION": "1", "PREEMPTIVE_END_OF_UTTERANCE": "0"}, punctuated_partials=False,
            realistic=True),
    # Twilio's voice activity (clientSpeaking off) starts the speculation: the acoustic end-of-speech signal.
    Variant("preemption on (defaults), clientSpeaking, partials without sentence marks",
            {"PREEMPTIVE_GENERATION": "1"}, punctuated_partials=False, speaker_events=True),
    Variant("preemption on (defaults), clientSpeaking, realistic lines with a short hesitation (under the VAD "
            "hangover), partials without sentence marks",
            {"PREEMPTIVE_GENERATION": "1"}, punctuated_partials=False, realistic=True, speaker_events=True),
    Variant("preemption on (defaults), clientSpeaking, realistic lines with a 400 ms hesitation (past the VAD "
            "hangover), partials without sentence marks",
            {"PREEMPTIVE_GENERATION": "1"}, punctuated_partials=False, realistic=True, speaker_events=True,
            hesitation_ms=400.0),
    Variant("preemption on, PREEMPTIVE_END_OF_UTTERANCE=0, clientSpeaking, realistic lines with a 400 ms "
            "hesitation (past the VAD hangover), partials without sentence marks",
            {"PREEMPTIVE_GENERATION": "1", "PREEMPTIVE_END_OF_UTTERANCE": "0"}, punctuated_partials=False,
            realistic=True, speaker_events=True, hesitation_ms=400.0),
    Variant("preemption on (defaults), clientSpeaking, a 350 ms VAD hangover, partials without sentence marks",
            {"PREEMPTIVE_GENERATION": "1"}, punctuated_partials=False, speaker_events=True, vad_hangover_ms=350.0),
]


def realistic_line(rng: random.Random, hesitation_s: float) -> tuple[str, dict[int, float]]:
    """One of REALISTIC_LINES: its words and where the caller hesitates (after word n, 1-based)."""
    words, pauses = [], {}
    for part in rng.choice(REALISTIC_LINES).split(" | "):
        words += part.split()
        pauses[len(words)] = hesitation_s
    pauses.pop(len(words))
    return " ".join(words), pauses


def is_corrected(k: int, share: float) -> bool:
    """Turn k (0-based, over the run) is one whose final the recogniser corrects: evenly spread, `share` of them
    rounded up, the same turns in every configuration."""
    return math.ceil((k + 1) * share) > math.ceil(k * share)


def corrected(utterance: str) -> str:
    """The final the recogniser settled on when it corrected the last word."""
    head, _, last = utterance.rpartition(" ")
    return f"{head} the {last}"


def run_variant(stack: BenchStack, variant: Variant, args: argparse.Namespace, run: int) -> VariantResult:
    result = VariantResult(variant)
    with stack.server(workers=1, CACHE_TYPE="NullCache", **variant.env) as server:
        before = stack.llm.stats().get("requests", 0)
        calls = [RelayCall(stack, server.url, destination(i, run), None) for i in range(args.calls)]
        hangover_ms = variant.vad_hangover_ms if variant.vad_hangover_ms is not None else args.vad_hangover_ms
        hesitation_ms = variant.hesitation_ms if variant.hesitation_ms is not None else args.hesitation_ms
        for call in calls:
            call.caller.client_speaking_events = variant.speaker_events
            call.caller.vad_hangover_s = hangover_ms / 1000

        def talk(index: int, call: RelayCall) -> None:
            gevent.sleep(index * args.stagger_s / max(1, args.calls))
            try:
                call.set_up()
                for turn in range(args.turns):
                    # The same (call, turn) says the same line, thinks as long and is corrected or not in every
                    # configuration: only the server's settings and the caller's voice-activity reports differ.
                    rng = random.Random(f"{args.seed}:{index}:{turn}")
                    pauses: dict[int, float] = {}
                    if variant.realistic:
                        utterance, pauses = realistic_line(rng, hesitation_ms / 1000)
                    else:
                        utterance = unique_utterance(rng, index, turn)
                    final = corrected(utterance) if is_corrected(index * args.turns + turn, args.corrected_share) \
                        else None
                    reply = call.caller.speak(utterance, words_per_minute=args.wpm,
                                              end_of_speech_ms=args.end_of_speech_ms, final=final,
                                              punctuated_partials=variant.punctuated_partials, pauses_s=pauses)
                    if reply.first_token_ms is not None:
                        result.client_ms.append(reply.first_token_ms)
                    call.caller.listen(rng.uniform(args.think_min_s, args.think_max_s))
            except Exception as exc:  # counted and reported, never hidden
                progress(f"  call {index}: {type(exc).__name__}: {exc}")
                result.errors += 1
            finally:
                call.hang_up()

        greenlets = [gevent.spawn(talk, i, call) for i, call in enumerate(calls)]
        gevent.joinall(greenlets, timeout=args.time_limit_s)
        gevent.killall(greenlets)
        time.sleep(0.5)
        result.llm_requests = stack.llm.stats().get("requests", 0) - before
        stored = fetch_turns(server.url, [c.tracking_id for c in calls if c.tracking_id])
    for turns in stored.values():
        for turn in turns:
            result.turns += 1
            if turn.get("firstTokenMs") is not None:
                result.server_ms.append(turn["firstTokenMs"])
            if turn.get("speculationsStarted"):
                result.speculated += 1
            for signal, started in (turn.get("speculationSignals") or {}).items():
                counts = result.by_signal.setdefault(signal, [0, 0])
                counts[0] += 1 if turn.get("speculationSignal") == signal else 0
                counts[1] += started
            if turn.get("speculation") == "adopted":
                result.adopted += 1
                if turn.get("savedMs") is not None:
                    result.saved_ms.append(turn["savedMs"])
    return result


def report(results: list[VariantResult], args: argparse.Namespace) -> str:
    rows, targets = [], []
    for r in results:
        per_turn = r.llm_requests / r.turns if r.turns else None
        rows.append([r.variant.label, r.turns, *distribution_cells(r.client_ms)[:2],
                     *distribution_cells(r.server_ms)[:2],
                     f"{r.adopted}/{r.speculated}" if r.speculated else "—",
                     fmt_ms(percentile(r.saved_ms, 50)), fmt_ms(percentile(r.saved_ms, 95)),
                     "—" if per_turn is None else f"{per_turn:.2f}",
                     "; ".join(f"{signal} {adopted}/{started}" for signal, (adopted, started)
                               in sorted(r.by_signal.items())) or "—", r.errors])
        if r.variant.env.get("PREEMPTIVE_GENERATION") == "1":
            p50 = percentile(r.client_ms, 50)
            ok = p50 is not None and p50 <= TARGET_P50_MS and per_turn is not None \
                and per_turn <= TARGET_REQUESTS_PER_TURN
            targets.append([r.variant.label, fmt_ms(p50), "—" if per_turn is None else f"{per_turn:.2f}",
                            "met" if ok else "**not met**"])
    lines = [
        f"### Preemptive generation: {args.calls} calls × {args.turns} turns per configuration, one gevent worker",
        "",
        f"Machine: {machine_summary()}. Fake LLM (own process): TTFT {args.ttft_ms:g} ms, "
        f"{args.token_interval_ms:g} ms/token. Callers speak {args.wpm:g} words/min (one partial prompt per "
        f"word), end of speech {args.end_of_speech_ms:g} ms before the final prompt; in "
        f"{args.corrected_share:.0%} of turns (evenly spread, rounded up; the same turns in "
        "every configuration, which also share each turn's line and think time) the final differs from the last "
        "partial (the "
        "recogniser corrected a word). The bench's own lines are generated questions (\"Turn N of caller M: is "
        "there a place near the X or the Y?\"); the realistic lines are ten things callers say, each with one "
        f"hesitation (two in one line) of {args.hesitation_ms:g} ms of silence unless the row says otherwise "
        "(mostly after a word that cannot end a sentence, in two lines after one that can: a number read out). The reply cache is off. Requests per turn are counted "
        "by the fake LLM itself. \"clientSpeaking\" rows: the caller's Twilio reports voice activity, "
        f"clientSpeaking off after {args.vad_hangover_ms:g} ms of silence (unless the row says otherwise), so "
        "before the final when the end of speech is longer; words follow each other without silence, the silence "
        "is the hesitation and the end of speech. Other rows: no clientSpeaking events (the text/cadence fallback).",
        "",
        markdown_table(["configuration", "turns", "final → first token, caller p50 (ms)", "p95",
                        "server p50 (ms)", "p95", "adopted / speculated turns", "saved p50 (ms)",
                        "saved p95 (ms)", "LLM requests per turn",
                        "speculations by signal (adopted / started)", "errors"], rows),
        "",
        markdown_table([f"goal: p50 ≤ {TARGET_P50_MS:g} ms at ≤ {TARGET_REQUESTS_PER_TURN:g} requests/turn",
                        "p50 (ms)", "requests/turn", "verdict"], targets),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=6, help="concurrent calls per configuration")
    parser.add_argument("--turns", type=int, default=4, help="turns per call")
    parser.add_argument("--wpm", type=float, default=NORMAL_WORDS_PER_MINUTE, help="caller speaking rate")
    parser.add_argument("--end-of-speech-ms", type=float, default=END_OF_SPEECH_MS)
    parser.add_argument("--hesitation-ms", type=float, default=100.0,
                        help="realistic lines: how much longer than a word gap the caller hesitates (gap + this "
                             "stays under --end-of-speech-ms, so no final comes in it)")
    parser.add_argument("--vad-hangover-ms", type=float, default=VAD_HANGOVER_MS,
                        help="clientSpeaking rows: silence before the caller's Twilio reports clientSpeaking off")
    parser.add_argument("--only", default="",
                        help="run only the variants whose label contains one of these texts (separated by |)")
    parser.add_argument("--corrected-share", type=float, default=0.2,
                        help="share of turns whose final transcript differs from the last partial")
    parser.add_argument("--ttft-ms", type=float, default=DEFAULT_TTFT_MS)
    parser.add_argument("--token-interval-ms", type=float, default=DEFAULT_TOKEN_INTERVAL_MS)
    parser.add_argument("--stagger-s", type=float, default=3.0)
    parser.add_argument("--think-min-s", type=float, default=0.5)
    parser.add_argument("--think-max-s", type=float, default=1.5)
    parser.add_argument("--time-limit-s", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    with BenchStack("preemptive", args.ttft_ms, args.token_interval_ms) as stack:
        for run, variant in enumerate(VARIANTS, start=1):
            if args.only and not any(part and part in variant.label for part in args.only.split("|")):
                continue
            progress(f"preemptive bench: {variant.label}")
            results.append(run_variant(stack, variant, args, run))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
