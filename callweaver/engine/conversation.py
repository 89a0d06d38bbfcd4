"""The engine turn: a caller utterance in, a stream of text to speak out — cache first, one LLM request, routing."""
from __future__ import annotations

import dataclasses
import re
import secrets
import sys
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import structlog

from ..store import PENDING_ACTION_META, TERMINAL_STATUSES, call_is_live, closing_action_dropped
from .cache import CachedReply, ReplyCache, reply_is_safe_to_cache
from .end_of_utterance import Completeness
from .languages import SPEECH_CHARS_PER_S, LanguageEntry, LanguageTable
from .metrics import elapsed_ms
from .prometheus import turn_counters, unanswered_speculation_counters
from .speech import (MAX_TURN_REPLY_BYTES, SSML_TAG as _SSML_TAG, has_words, is_thai, long_enough_to_switch,
                     normalise_speech)
from .sse import tool_error_note
from .tracing import NULL_SPAN, NullTracer
from .workflow.model import NodeAudio
from .workflow.turn import DEFAULT_HISTORY_LIMIT
from .workflow import (ConversationState, TurnOutcome, Workflow, apply_turn, detect_termination, plan_turn,
                       termination_outcome)

log = structlog.get_logger()

_WORD_CHUNK = re.compile(r"\s*\S+")
PREWARM_INTERVAL_S = 600.0
MAX_KEPT_MESSAGES = 200  # a call's stored history keeps this many latest messages
MAX_PARSED_WORKFLOWS = 256  # parsed workflows kept per worker, by version hash
MAX_TAG_CHARS = 200  # an SSML tag open at the cap is finished within this many characters, else left as it is
MAX_WORD_CHARS = 40  # a word begun before the cap is finished within this many characters, else left as it is
# How often a running prewarm looks in the store for the end of its call.
CALL_OVER_CHECK_S = 0.2
DEFAULT_GLOBAL_PROMPT = ("You are a helpful, friendly AI voice assistant on a phone call. Keep replies short and "
                         "natural.")


def default_workflow() -> Workflow:
    """A call with no call flow: one conversation step driven by a generic global prompt."""
    return Workflow.from_payload({"globalPrompt": DEFAULT_GLOBAL_PROMPT})


def split_tokens(text: str) -> list[str]:
    """Split canned or cached text into word tokens (leading space kept) so it streams like an LLM reply."""
    return _WORD_CHUNK.findall(text) or ([text] if text else [])


# Chinese, Japanese (kana, ideographs) and their full-width punctuation: each character ends a word, as a space does.
_CJK = re.compile("[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
                  "\U00020000-\U0002fa1f]")


def spoken_length(text: str) -> int:
    """How many characters of `text` are spoken: SSML tags are not."""
    return len(_SSML_TAG.sub("", text))


# Thai writes no spaces between words (finding them needs a dictionary; the estimate is not that precise anyway): a cut
# may fall before a consonant or a leading vowel, never before a mark that belongs to the letter before it (a vowel
# sign above, below or after it, a tone mark, ๆ) nor after a vowel written before its consonant (เ แ โ ใ ไ).
_THAI_ATTACHED = re.compile("[\u0e30-\u0e3a\u0e45-\u0e4e]")
_THAI_LEADING_VOWEL = re.compile("[\u0e40-\u0e44]")


def _is_word_end(spoken: str, end: int) -> bool:
    """Whether text cut at `end` ends on a whole word: before a space, next to a CJK character, or between two Thai
    syllables (not just before a punctuation mark, which belongs with the word before it)."""
    if end >= len(spoken):
        return True
    nxt = spoken[end]
    if nxt.isspace():
        return True
    if unicodedata.category(nxt)[0] == "P":
        return False
    prev = spoken[end - 1] if end > 0 else ""
    if is_thai(nxt) and prev and is_thai(prev):
        return not _THAI_ATTACHED.match(nxt) and not _THAI_LEADING_VOWEL.match(prev)
    return bool(_CJK.match(nxt) or prev and _CJK.match(prev))


def part_within_reply_cap(said: str, token: str, fits_bytes: int) -> str:
    """What the caller hears of `token`, the one that crosses MAX_TURN_REPLY_BYTES after `said`: at most `fits_bytes`
    bytes of whole characters, ending on a whole word, with no SSML tag left half written (one begun in `token` is
    dropped; one begun earlier, already sent, is finished from `token` a few bytes over the cap). A word begun in
    `said`, already sent, is finished the same way, within MAX_WORD_CHARS (up to a tag); a longer one stays cut."""
    spoken = said + token
    end = len(token.encode()[:max(fits_bytes, 0)].decode("utf-8", "ignore"))
    while end > 0 and not _is_word_end(spoken, len(said) + end):
        end -= 1
    if end == 0 and said and not _is_word_end(spoken, len(said)):
        end = next((i for i in range(1, min(len(token), MAX_WORD_CHARS) + 1)
                    if _is_word_end(spoken, len(said) + i) or token[i:i + 1] == "<"), 0)
    heard = said + token[:end]
    opened = heard.rfind("<")
    if opened > heard.rfind(">"):
        if opened >= len(said):
            return token[:opened - len(said)]
        closed = token.find(">", end, end + MAX_TAG_CHARS)
        return token[:closed + 1] if closed >= 0 else token[:end]
    return token[:end]


def _estimated_cut(spoken: str, tag_spans: list[tuple[int, int]], chars: int) -> int:
    """Where `chars` spoken characters end in `spoken` (SSML tags are not spoken), rounded up to a word's end that is
    not inside a tag."""
    tag_at = {i: stop for start, stop in tag_spans for i in range(start, stop)}
    end = counted = 0
    while end < len(spoken) and counted < chars:
        if end in tag_at:
            end = tag_at[end]
            continue
        counted, end = counted + 1, end + 1
    while not _is_word_end(spoken, end):
        end = tag_at.get(end, end + 1)  # a tag is passed whole
    return end


def _fold(ch: str) -> str:
    """What one character counts as when matching speech: compatibility-decomposed, casefolded, without
    punctuation, spaces, combining marks or controls (full-width "，。！？" and "İ"'s dot fold away)."""
    return "".join(c for c in unicodedata.normalize("NFKD", ch).casefold()
                   if unicodedata.category(c)[0] not in "PZC" and unicodedata.category(c) != "Mn")


def heard_of(spoken: str, reported: str | None, played_ms: float | None, *,
             chars_per_s: float = SPEECH_CHARS_PER_S) -> str:
    """The one barge-in policy (docs/twilio.md, Barge-in step 2): how much of `spoken` the caller heard, given
    Twilio's utteranceUntilInterrupt (`reported`) and durationUntilInterruptMs (`played_ms`).

    The reported text is what was spoken from the start of the talk cycle, so it must match `spoken`'s beginning,
    folded (case, whitespace, punctuation, SSML tags); the cut maps back to the original text, with as many of the
    marks after the last word as the report itself ends with ("Sure," keeps the comma, "Sure" does not). When the text does not place the cut (absent, empty after some speech, or not
    the beginning of `spoken`), the duration is turned into spoken characters at `chars_per_s` (the language's
    speaking rate; SSML tags are not spoken), rounded up to a word's end (a space, or a CJK character) outside tags;
    with no duration either, all of it counts as heard: words the caller may have heard are not deleted from
    what the model is told it said. An empty report after no speech means nothing was heard."""
    if not reported and not played_ms and reported is not None:
        return ""
    folded: list[str] = []
    index_map: list[int] = []
    tag_spans = [match.span() for match in _SSML_TAG.finditer(spoken)]
    tags = {i for span in tag_spans for i in range(*span)}
    for i, ch in enumerate(spoken):
        part = "" if i in tags else _fold(ch)
        folded.append(part)
        index_map.extend([i] * len(part))
    reported_text = _SSML_TAG.sub("", reported or "").rstrip()
    target = "".join(map(_fold, reported_text))
    spoken_folded = "".join(folded)
    if target and spoken_folded.startswith(target) and len(target) < len(spoken_folded):
        end = index_map[len(target) - 1] + 1
        marks = len(reported_text) - len(reported_text.rstrip("".join(c for c in reported_text if not _fold(c))))
        while marks and end < len(spoken) and end not in tags and not spoken[end].isspace() and not folded[end]:
            end, marks = end + 1, marks - 1  # the marks closing the last word, as reported
        return spoken[:end].strip()
    if target and target.startswith(spoken_folded):
        return spoken.strip()  # Twilio reports all of this text (or more): all of it was heard
    if not played_ms or played_ms <= 0:
        return spoken.strip()
    return spoken[:_estimated_cut(spoken, tag_spans, int(played_ms / 1000 * chars_per_s))].strip()


@dataclass
class TurnResult:
    """What one turn did; filled in while the turn streams, complete once it is exhausted."""

    node_id: str
    language: str
    next_node: str | None = None
    variables: dict = field(default_factory=dict)
    action: str | None = None
    action_message: str | None = None
    destination: str | None = None
    source: str = "llm"                # llm | cache | canned | apology
    provider: str | None = None
    provider_ttft_ms: float | None = None
    failovers: list = field(default_factory=list)
    cache_hit: bool = False
    cacheable: bool = False
    cache_lookup_ms: float | None = None
    cache_candidate: tuple | None = None  # (key, CachedReply) written after the reply was sent, never before
    cut_at_cap: bool = False           # the model's text was stopped at MAX_TURN_REPLY_BYTES
    providers_failed: bool = False     # no provider answered (the apology); False when one answered without words
    reply_text: str = ""               # everything the turn produced, in order (reply + closing line)
    transitioned_via: str | None = None
    tool_calls: list = field(default_factory=list)  # (name, arguments) the model called, in order
    tool_errors: list = field(default_factory=list)  # calls refused for their size (sse): {name, error, argumentsBytes}
    llm_requests: int = 0
    hedged_requests: int = 0           # second requests a late first token started (LLM_HEDGE_AFTER_MS)
    language_switched: bool = False
    keys: str | None = None            # keypad presses to send to the far end (an IVR), after the reply
    entered_audio: NodeAudio | None = None         # the NodeAudio of a node this turn moved into: played before it speaks
    completed: bool = False
    trace_span: Any = NULL_SPAN        # the turn's span (tracing.py); NULL_SPAN when tracing is off


class TurnControl:
    """Shared between the greenlet streaming a turn and the one that may cancel it (barge-in)."""

    def __init__(self) -> None:
        self.cancelled = False
        self.stream = None  # the provider stream in flight, closable from another greenlet
        # A speculation's: set once it is adopted (or cancelled); a second request waits for it (`defer_followup`).
        self.go_ahead: threading.Event | None = None
        self.held_s = 0.0  # how long a speculation's follow-up waited for `go_ahead` (no time to first token)


class Turn:
    """Iterate for the text chunks to speak; `result` describes the turn.

    `cancel()` may be called from another greenlet: it closes the LLM's HTTP stream at once and the iteration
    ends quietly; `close()` is for the iterating greenlet itself.
    """

    def __init__(self, result: TurnResult, chunks: Iterator[str], utterance: str, control: TurnControl):
        self.result = result
        self.utterance = utterance
        self._chunks = chunks
        self._control = control

    def __iter__(self) -> Iterator[str]:
        return self._chunks

    def defer_followup(self) -> None:
        """A speculative turn: a second LLM request (the tool-only follow-up) waits until `allow_followup`."""
        self._control.go_ahead = threading.Event()

    @property
    def followup_held_s(self) -> float:
        """How long the follow-up request waited for adoption (0 for any other turn)."""
        return self._control.held_s

    def allow_followup(self) -> None:
        if self._control.go_ahead is not None:
            self._control.go_ahead.set()

    def cancel(self) -> None:
        self._control.cancelled = True
        self.allow_followup()  # a held follow-up wakes, sees the cancel and ends
        stream = self._control.stream
        if stream is not None:
            stream.close()

    def close(self) -> None:
        self._control.cancelled = True
        self.allow_followup()
        close = getattr(self._chunks, "close", None)
        if close:
            close()


@dataclass(frozen=True)
class SpeculationPolicy:
    """When a relay call may start a turn on an interim transcript (PREEMPTIVE_* settings, README)."""

    enabled: bool = False
    stable_ms: float = 400.0         # the plain window: an unchanged partial this long starts a speculation
    max_per_turn: int = 2            # speculations per caller turn (each discarded one is an extra LLM request)
    max_chars: int = 200             # longer utterances are not speculated on
    end_of_utterance: bool = True    # the wait follows how the partial ends and the caller's cadence
    incomplete_ms: float = 1000.0    # the wait after a partial ending mid-sentence ("near the", "and", "um")
    cadence_margin_ms: float = 40.0  # after a complete-looking partial: the caller's usual pause plus this
    speaker_events: bool = True      # Twilio's clientSpeaking off starts a speculation at once (docs/twilio.md 5a)

    def window_s(self, how: Completeness, usual_pause_s: float | None) -> float:
        """How long a partial must stay unchanged before a speculation starts on it (end_of_utterance.py)."""
        if how is Completeness.SENTENCE_END:
            return 0.0  # the recogniser closed the sentence: start at once
        if not self.end_of_utterance or how is Completeness.UNKNOWN:
            return self.stable_ms / 1000
        if how is Completeness.INCOMPLETE:
            return max(self.stable_ms, self.incomplete_ms) / 1000
        if usual_pause_s is None:
            return self.stable_ms / 1000  # this caller's cadence is not known yet
        return min(usual_pause_s + self.cadence_margin_ms / 1000, max(self.stable_ms, self.incomplete_ms) / 1000)

    def starts_at_end_of_speech(self, how: Completeness) -> bool:
        """The caller stopped speaking (clientSpeaking off): start now unless the words say they are mid-sentence
        (with the end-of-utterance signal on, a pause after "the", "and" or a comma is a hesitation)."""
        return self.speaker_events and not (self.end_of_utterance and how is Completeness.INCOMPLETE)


# What started a speculation (per-turn rows and metrics attribute speculations to it).
SIGNAL_END_OF_SPEECH = "end_of_speech"   # Twilio reported the caller stopped speaking (clientSpeaking off)
SIGNAL_SENTENCE_END = "sentence_end"     # the interim transcript ends in . ? !
SIGNAL_STABLE = "stable_window"          # the interim transcript stayed unchanged for the text/cadence window


class SpeculativeTurn:
    """A turn started on an interim transcript, its output held back until the final transcript adopts it.

    It is the same `Turn` as any other: `pump()` (on its own greenlet) iterates it into a buffer, nothing is sent
    and nothing is committed. Adoption replays the buffer and follows the rest of the stream; a discard cancels
    the turn (closing the upstream stream) and the turn is never committed, so its history, variables, routing
    and extraction tool calls, cache write and action are dropped with it.
    """

    def __init__(self, turn: Turn, lang: str | None, clock: Callable[[], float], signal: str = SIGNAL_STABLE):
        self.turn = turn
        turn.defer_followup()  # a second request is paid for only if the final transcript adopts it
        self.lang = lang
        self.signal = signal  # what started it (SIGNAL_*)
        # Recognisers add punctuation and capitals to the final transcript: those change nothing the model reads.
        self.key = normalise_speech(turn.utterance)
        self.clock = clock
        self.started_at = clock()
        self.first_token_at: float | None = None
        self.tokens: list[str] = []
        self.done = False
        self.failed = False
        self.discarded = False
        self._changed = threading.Condition()  # a gevent condition once wsgi.py has monkey-patched threading

    def matches(self, utterance: str, lang: str | None) -> bool:
        return (not self.discarded and not self.failed and self.key == normalise_speech(utterance)
                and self.lang == lang)

    def pump(self) -> None:
        try:
            for token in self.turn:
                with self._changed:
                    if self.first_token_at is None and token:
                        self.first_token_at = self.clock()
                    self.tokens.append(token)
                    self._changed.notify_all()
        except Exception:
            self.failed = True  # never adopted: the final transcript starts a normal turn
            log.exception("speculation_failed")
        finally:
            with self._changed:
                self.done = True
                self._changed.notify_all()

    def replay(self) -> Iterator[str]:
        """Adopted: the tokens already received at once, then the rest as it streams."""
        self.turn.allow_followup()
        sent = 0
        while True:
            with self._changed:
                while sent >= len(self.tokens) and not self.done:
                    self._changed.wait()
                if sent >= len(self.tokens):
                    return
                token = self.tokens[sent]
            sent += 1
            yield token

    def discard(self) -> None:
        """Cancel the upstream request; the turn is dropped uncommitted."""
        self.discarded = True
        self.turn.cancel()

    def first_token_ms(self) -> float | None:
        """Start of the speculation to its first token: what the turn would have waited without speculating (a
        follow-up's wait for adoption is not: a turn that did not speculate never waits for it)."""
        if self.first_token_at is None:
            return None
        return elapsed_ms(self.started_at, self.first_token_at - self.turn.followup_held_s)

    @property
    def token_count(self) -> int:
        return sum(1 for token in self.tokens if token)


def action_and_next_node(r: TurnResult, interrupted: bool) -> tuple[str | None, str]:
    """The end/transfer a turn fires and the node the call goes on from. An action fires only when its turn completed
    and was heard whole: an interrupted one was not heard, so it never fires and the call stays on the node the turn
    started on (architecture.md, interrupts)."""
    action = None if interrupted or not r.completed else r.action
    if action is None and r.action is not None:
        return None, r.node_id
    return action, r.next_node or r.node_id


def speculation_row(adopted: SpeculativeTurn | None, discarded: list[SpeculativeTurn],
                    first_token_ms: float | None) -> dict[str, Any]:
    """The per-turn speculation fields stored with the turn; `savedMs` is the adopted speculation's own measured
    time to first token minus what the caller actually waited after the final transcript."""
    started = len(discarded) + (1 if adopted else 0)
    saved = None
    if adopted is not None and first_token_ms is not None and adopted.first_token_ms() is not None:
        saved = round(max(0.0, adopted.first_token_ms() - first_token_ms), 3)
    cost = discarded_cost(discarded)
    signals: dict[str, int] = {}
    for speculation in [*discarded, *([adopted] if adopted else [])]:
        signals[speculation.signal] = signals.get(speculation.signal, 0) + 1
    return {
        "speculation": "adopted" if adopted else ("discarded" if discarded else None),
        "speculationsStarted": started, "speculationsDiscarded": cost["speculations"],
        "speculativeLlmRequests": cost["llmRequests"], "speculativeTokens": cost["tokens"],
        "savedMs": saved,
        "speculationSignal": adopted.signal if adopted else None, "speculationSignals": signals,
    }


def discarded_cost(discarded: list[SpeculativeTurn]) -> dict[str, int]:
    """What discarded speculations cost: how many, the LLM requests they made, the tokens they streamed."""
    return {"speculations": len(discarded),
            "llmRequests": sum(s.turn.result.llm_requests for s in discarded),
            "tokens": sum(s.token_count for s in discarded if s.turn.result.llm_requests)}


# The record fields whose values every call of a flow (or of a kind of call) repeats; each decoded record would
# otherwise hold its own copy of them for as long as the call lives.
_REPEATED_FIELDS = ("path", "language", "status", "workflow_id", "workflow_hash", "current_node", "greeting")
_REPEATED_META = ("homeLanguage",)
_REPEATED_SETUP = ("direction", "callType")


def share_repeated_values(record) -> None:
    """Swap the strings every live call of a flow holds alike (its greeting, also as the first line of the history,
    language codes, status, hashes, `setup`'s direction) for one shared copy each (sys.intern), so an idle call keeps
    only what is its own (bench/idle_call_memory.py). Values are unchanged; only equal strings become one object."""
    intern = sys.intern
    for name in _REPEATED_FIELDS:
        value = getattr(record, name)
        if type(value) is str:
            setattr(record, name, intern(value))
    greeting = record.greeting
    for message in record.messages or ():
        if type(message) is dict:
            role, content = message.get("role"), message.get("content")
            if type(role) is str:
                message["role"] = intern(role)
            if content is not None and content == greeting:
                message["content"] = greeting
    meta = record.meta
    if type(meta) is not dict:
        return
    for name in _REPEATED_META:
        if type(meta.get(name)) is str:
            meta[name] = intern(meta[name])
    languages = meta.get("relayLanguages")
    if type(languages) is list and all(type(code) is str for code in languages):
        meta["relayLanguages"] = [intern(code) for code in languages]
    setup = meta.get("setup")
    if type(setup) is dict:
        for name in _REPEATED_SETUP:
            if type(setup.get(name)) is str:
                setup[name] = intern(setup[name])


class ConversationEngine:
    """Runs turns of any call (relay, Gather flow, playground) from the call's record in the store."""

    def __init__(self, store, providers, languages: LanguageTable, cache: ReplyCache | None = None, *,
                 history_limit: int = DEFAULT_HISTORY_LIMIT, clock: Callable[[], float] = time.monotonic,
                 chain_for: Callable[[Any], Any] | None = None, tracer: Any = None,
                 record_transcripts: bool = True, speculation: SpeculationPolicy = SpeculationPolicy()):
        self.store = store
        self.record_transcripts = record_transcripts  # RECORD_TRANSCRIPTS=0: the call log keeps timings only
        self.speculation = speculation  # relay calls: start turns on stable interim transcripts
        self.tracer = tracer or NullTracer()  # OpenTelemetry spans when OTEL_EXPORTER_OTLP_ENDPOINT is set
        self.providers = providers
        # A call may bring its own LLM account (ALLOW_REQUEST_CREDENTIALS); chain_for picks its provider chain.
        self.chain_for = chain_for or (lambda record: self.providers)
        self.languages = languages
        self.cache = cache
        self.history_limit = history_limit
        self.clock = clock
        self._workflows: OrderedDict[str, Workflow] = OrderedDict()  # parsed, immutable; keyed by version hash
        self._snapshots: OrderedDict[str, dict] = OrderedDict()  # one raw snapshot per version hash, shared

    # ---- call state ---------------------------------------------------------------------------
    def workflow_for(self, record) -> Workflow:
        key = record.workflow_hash or ""
        wf = self._workflows.get(key)
        if wf is None:
            wf = Workflow.from_snapshot(record.workflow) if record.workflow else default_workflow()
            self._workflows[key] = wf
            while len(self._workflows) > MAX_PARSED_WORKFLOWS:
                self._workflows.popitem(last=False)
        else:
            self._workflows.move_to_end(key)
        return wf

    def sharing_snapshot(self, record):
        """The record with its workflow snapshot swapped for the copy this worker already holds for the same
        version hash, so live calls of one flow share one snapshot instead of each keeping its own (the snapshot
        was most of an idle call's memory), and the values all its calls repeat shared too (share_repeated_values).
        Snapshots are never mutated in place (updates replace fields)."""
        if record is None:
            return record
        if record.workflow and record.workflow_hash:
            shared = self._snapshots.get(record.workflow_hash)
            if shared is None:
                shared = self._snapshots[record.workflow_hash] = record.workflow
                while len(self._snapshots) > 256:
                    self._snapshots.popitem(last=False)
            record.workflow = shared
        share_repeated_values(record)
        return record

    def language_of(self, record) -> LanguageEntry:
        return self.languages.get(record.language)

    def declared_languages(self, record) -> list[str]:
        """The languages the call's relay TwiML declared (home first); a switch may only land on these."""
        declared = (record.meta or {}).get("relayLanguages")
        if declared:
            return list(declared)
        home = self.languages.get((record.meta or {}).get("homeLanguage") or record.language)
        return [entry.code for entry in self.languages.switch_targets(home)]

    def state_of(self, record, workflow: Workflow) -> ConversationState:
        node = record.current_node if record.current_node in workflow.nodes else workflow.entry_node_id()
        return ConversationState(current_node=node, variables=dict(record.variables or {}),
                                 messages=list(record.messages or []))

    # ---- one turn ------------------------------------------------------------------------------
    def start_turn(self, record, utterance: str, *, lang: str | None = None) -> Turn:
        workflow = self.workflow_for(record)
        entry = self.language_of(record)
        switched = False
        goodbye: bool | None = None  # decided in _run unless decided here
        if lang:
            target = self.languages.switch_target(entry.code, lang, declared=self.declared_languages(record))
            if target is not None:
                # A goodbye, in the call's language (recognition tags a short one wrongly now and then) or the other,
                # ends the call; the closing stays in the call's own language (switching the voice to say one line
                # and hang up would only sound odd).
                goodbye = (detect_termination(utterance, entry.termination_phrases)
                           or detect_termination(utterance, target.termination_phrases))
                if not goodbye and long_enough_to_switch(utterance):  # one word ("No.") says too little
                    entry, switched = target, True
        state = self.state_of(record, workflow)
        span = self.tracer.start_turn(record.tracking_id, node=state.current_node, language=entry.code,
                                      path=record.path)
        return self._turn(workflow, state, entry, utterance, self.chain_for(record),
                          keypad=self.may_press_keys(record), language_switched=switched, trace_span=span,
                          goodbye=goodbye)

    def _turn(self, workflow: Workflow, state: ConversationState, entry: LanguageEntry, utterance: str, chain, *,
              keypad: bool = False, language_switched: bool = False, trace_span: Any = NULL_SPAN,
              goodbye: bool | None = None) -> Turn:
        """A turn from an explicit state: a call's (start_turn) or the ringing phone's (prewarm). `goodbye`: whether
        the caller said goodbye, when start_turn already knows (in either of two languages); None: matched here."""
        result = TurnResult(node_id=state.current_node, language=entry.code, language_switched=language_switched,
                            variables=dict(state.variables), trace_span=trace_span)
        control = TurnControl()
        return Turn(result, self._run(workflow, state, entry, utterance, result, control, chain, keypad,
                                      goodbye), utterance, control)

    def speculate(self, record, utterance: str, *, lang: str | None = None,
                  signal: str = SIGNAL_STABLE) -> SpeculativeTurn:
        """The turn `utterance` would start, begun early on an interim transcript; run `pump()` off the socket."""
        return SpeculativeTurn(self.start_turn(record, utterance, lang=lang), lang, self.clock, signal)

    def drop_speculation(self, speculation: SpeculativeTurn, reason: str) -> None:
        """Discard a speculation: cancel its request, end its span; it is never committed."""
        speculation.discard()
        self.tracer.end_turn(speculation.turn.result.trace_span, {"source": "speculation_discarded"})
        log.info("speculation_discarded", reason=reason, utterance_chars=len(speculation.turn.utterance),
                 tokens_held=speculation.token_count)

    def record_unanswered_speculations(self, record, discarded: list[SpeculativeTurn], reason: str) -> None:
        """Speculations of a caller turn that never got a final transcript (speech ended without one, or the call
        ended): no turn row carries their cost, so it is added to the call (`meta.unansweredSpeculations`, the
        per-call metrics) and to the cumulative counters (/metrics, the aggregate)."""
        cost = discarded_cost(discarded)
        log.info("speculations_unanswered", reason=reason, **cost)
        self.store.add_counters(unanswered_speculation_counters(cost))
        # Added inside the store: a turn or the terminal status callback may write the call's meta at this moment.
        self.store.update_meta(record.tracking_id, add={"unansweredSpeculations": cost})

    @staticmethod
    def may_press_keys(record) -> bool:
        """A relay call we placed may reach a phone menu: Twilio's setup says it is outbound."""
        return str(((record.meta or {}).get("setup") or {}).get("direction", "")).startswith("outbound")

    def _run(self, workflow: Workflow, state: ConversationState, entry: LanguageEntry, utterance: str,
             result: TurnResult, control: TurnControl, chain, keypad: bool = False,
             goodbye: bool | None = None) -> Iterator[str]:
        if goodbye is None:
            goodbye = detect_termination(utterance, entry.termination_phrases)
        if goodbye:
            outcome = termination_outcome(workflow, state)
            self._apply_outcome(result, outcome, workflow)
            result.source = "canned"
            text = outcome.action_message or entry.line("goodbye")
            result.action_message = text
            yield from self._emit(result, text)
            result.completed = True
            return

        plan = plan_turn(workflow, state, utterance, language_instruction=entry.llm_instruction,
                         history_limit=self.history_limit, keypad=keypad)
        result.cacheable = plan.cacheable
        key = None
        if self.cache is not None and plan.cacheable:
            started = self.clock()
            key = self._cache_key(workflow, plan, entry, state, utterance)
            with self.tracer.child(result.trace_span, "cache.lookup") as span:
                hit = self.cache.get(key)
                span.set_attribute("callweaver.cache.hit", hit is not None)
            result.cache_lookup_ms = elapsed_ms(started, self.clock())
            if hit is not None:
                result.source, result.cache_hit, result.provider = "cache", True, None
                result.next_node = plan.node_id
                yield from self._emit(result, hit.text)
                result.completed = True
                return

        options = workflow.llm_options
        llm_span = self._llm_span(result, plan.tools, options)
        stream = chain.stream(plan.messages, tools=plan.tools, temperature=options.get("temperature"),
                              max_tokens=options.get("max_tokens"), model=options.get("model"),
                              apology=entry.line("apology"))
        yield from self._relay_stream(result, stream, control, llm_span)
        if control.cancelled:
            return  # barge-in: nothing after the reply (no routing, no closing line) may happen
        if stream.apology_used:
            result.providers_failed = not stream.answered_without_words
            self._stay_after_apology(result, state, workflow)
            return

        outcome = apply_turn(workflow, state, stream.text, stream.tool_calls, keypad=keypad)
        self._apply_outcome(result, outcome, workflow)
        result.tool_calls = list(stream.tool_calls)
        result.tool_errors = list(stream.refused_tool_calls)  # logged by sse; the model is told (below, commit_turn)
        offered = {tool["function"]["name"] for tool in plan.tools or ()}
        for name in {name for name, _args in stream.tool_calls if name not in offered}:
            log.warning("llm_called_a_tool_not_offered", tool=name[:80], node=plan.node_id)  # ignored by apply_turn
        moved_on = outcome.next_node != state.current_node
        if not has_words(stream.text) and outcome.action is None and (moved_on or not outcome.keys):
            # The model only called a tool: nothing was spoken, so the node the call is on now (a new one, or the
            # same one with what was just recorded) must answer; keys pressed at a phone menu need no words. This
            # is the one case with a second request; it only happens when the model ignores "speak first".
            if control.go_ahead is not None:
                # A speculation pays the second request only once it is adopted. Only this wait is held time: the
                # routing above is work a turn that did not speculate does too (its time to first token).
                holding = self.clock()
                control.go_ahead.wait()
                control.held_s = self.clock() - holding
                if control.cancelled:
                    return
            log.info("tool_only_reply_followup", node=outcome.next_node)
            moved = ConversationState(outcome.next_node, outcome.variables, state.messages)
            plan2 = plan_turn(workflow, moved, utterance, language_instruction=entry.llm_instruction,
                              history_limit=self.history_limit)
            llm_span = self._llm_span(result, None, options)
            messages2 = plan2.messages
            if result.tool_errors:  # the model's call was refused: it must not answer as if it had been applied
                messages2 = [*messages2, {"role": "system", "content": tool_error_note(result.tool_errors)}]
            stream2 = chain.stream(messages2, tools=None, temperature=options.get("temperature"),
                                   max_tokens=options.get("max_tokens"), model=options.get("model"),
                                   apology=entry.line("apology"))
            yield from self._relay_stream(result, stream2, control, llm_span)
            if control.cancelled:
                return
            if stream2.apology_used:
                result.providers_failed = not stream2.answered_without_words
                self._stay_after_apology(result, state, workflow)  # the tool's routing is undone with it
                return
        worded = has_words(result.reply_text)
        if outcome.action is None and not outcome.keys and not worded:
            # The model (asked twice) gave only whitespace or SSML: the caller would hear silence.
            log.warning("llm_reply_without_words", node=outcome.next_node, reply_chars=len(result.reply_text))
            yield from self._emit_after(result, entry.line("apology"))
            self._stay_after_apology(result, state, workflow)
            return
        if outcome.action_message:
            yield from self._emit_after(result, outcome.action_message)
        elif not worded and outcome.action:
            yield from self._emit_after(result, entry.line("goodbye"))  # a lone <break/> is no goodbye
        if (key and self.cache is not None and outcome.action is None and not stream.tool_calls
                and not result.tool_errors and not result.cut_at_cap
                and outcome.next_node == state.current_node
                and reply_is_safe_to_cache(stream.text, variables=outcome.variables, tool_calls=stream.tool_calls,
                                           node_cacheable=plan.cacheable,
                                           utterance=" ".join([*self._caller_texts(state), utterance]))):
            result.cache_candidate = (key, CachedReply(text=stream.text, provider=stream.provider,
                                                       created_at=time.time(), language=entry.code,
                                                       node_id=plan.node_id))
        result.completed = True

    def _stay_after_apology(self, result: TurnResult, state: ConversationState, workflow: Workflow) -> None:
        """Every provider failed and the caller heard the apology asking them to say it again: the turn is an
        error (source apology) and the call stays where it was, with what it knew."""
        self._apply_outcome(result, TurnOutcome(state.current_node, dict(state.variables), None, None, None, None),
                            workflow)
        result.source = "apology"
        result.completed = True

    def _llm_span(self, result: TurnResult, tools: list | None, options: dict):
        return self.tracer.start_llm_request(result.trace_span, model=options.get("model"),
                                             temperature=options.get("temperature"),
                                             max_tokens=options.get("max_tokens"), tools=len(tools or ()))

    def _relay_stream(self, result: TurnResult, stream, control: TurnControl, llm_span) -> Iterator[str]:
        """Pass an LLM stream's tokens through; cancelling the turn closes the HTTP stream."""
        control.stream = stream
        room = MAX_TURN_REPLY_BYTES - len(result.reply_text.encode())
        try:
            if control.cancelled:
                return  # cancelled while no stream was in flight (`cancel` had none to close): never send it
            result.llm_requests += 1
            for token in stream:
                if control.cancelled:
                    break
                room -= len(token.encode())
                if room < 0:
                    log.warning("llm_reply_cut_at_length_cap", max_bytes=MAX_TURN_REPLY_BYTES)
                    result.cut_at_cap = True  # a reply stopped mid-sentence is no answer to serve again
                    token = part_within_reply_cap(result.reply_text, token, len(token.encode()) + room)
                    result.reply_text += token
                    if token:
                        yield token
                    break  # closing the stream below stops the model; the turn ends as it is
                result.reply_text += token
                yield token
        finally:
            stream.close()
            result.failovers += list(stream.failovers)
            result.hedged_requests += stream.hedged_requests
            result.provider = stream.provider or result.provider
            if result.provider_ttft_ms is None:
                result.provider_ttft_ms = stream.provider_ttft_ms
            control.stream = None
            self.tracer.end_llm_request(llm_span, stream)

    def _cache_key(self, workflow: Workflow, plan, entry: LanguageEntry, state: ConversationState,
                   utterance: str) -> str | None:
        """The reply cache key of this turn: what the caller answers (the last assistant line they heard) and
        everything the model is sent before the utterance (plan.messages: system prompt, history, utterance). The
        system prompt tells the call's own tools apart: a call offered the keypad (may_press_keys) is told how to
        use it, and a reply another call gave without it is not its answer."""
        return self.cache.key(workflow_hash=workflow.version_hash, node_id=plan.node_id, language=entry.code,
                              heard_before=last_assistant_line(state.messages), utterance=utterance,
                              prompt_variables=plan.prompt_variables, fillers=entry.fillers,
                              history=plan.messages[:-1])

    @staticmethod
    def _caller_texts(state: ConversationState) -> list[str]:
        return [m["content"] for m in state.messages if m.get("role") == "user" and isinstance(m.get("content"), str)]

    @staticmethod
    def _emit(result: TurnResult, text: str) -> Iterator[str]:
        for token in split_tokens(text):
            result.reply_text += token
            yield token

    @classmethod
    def _emit_after(cls, result: TurnResult, text: str) -> Iterator[str]:
        """`text` after what the turn already said, as a separate word."""
        sep = " " if result.reply_text and not result.reply_text.endswith((" ", "\n")) else ""
        yield from cls._emit(result, sep + text)

    @staticmethod
    def _apply_outcome(result: TurnResult, outcome: TurnOutcome, workflow: Workflow) -> None:
        result.next_node = outcome.next_node
        result.variables = dict(outcome.variables)
        result.action = outcome.action
        result.action_message = outcome.action_message
        result.destination = outcome.destination
        result.transitioned_via = outcome.transitioned_via
        result.keys = outcome.keys
        # Set or cleared: an apology after a tool's routing (`_stay_after_apology`) enters no node, so plays nothing.
        entered = workflow.nodes.get(outcome.next_node) if outcome.next_node != result.node_id else None
        result.entered_audio = entered.audio if entered is not None else None

    # ---- after the turn --------------------------------------------------------------------------
    def commit_turn(self, record, turn: Turn, *, path: str, timings: dict[str, Any],
                    heard_text: str | None = None, interrupted: bool = False,
                    speculation: dict[str, Any] | None = None):
        """Persist history as heard, node, variables and the measured turn; an interrupted action never fires."""
        r = turn.result
        heard = r.reply_text.strip() if heard_text is None else heard_text.strip()
        messages = list(record.messages or [])
        messages.append({"role": "user", "content": turn.utterance})
        if r.keys and not interrupted:
            heard = f"{heard} [pressed {r.keys} on the keypad]".strip()
        # The model reads why its call was not applied, in the history it is sent next; the transcript's `heard`
        # stays what the caller heard (the refusal is shown with the tool call).
        told = f"{heard} {tool_error_note(r.tool_errors)}".strip() if r.tool_errors else heard
        if told:
            messages.append({"role": "assistant", "content": told})
        action, next_node = action_and_next_node(r, interrupted)
        fields: dict[str, Any] = {"messages": messages[-MAX_KEPT_MESSAGES:], "current_node": next_node,
                                  "variables": r.variables, "language": r.language}
        entry = None
        if self.record_transcripts:
            entry = {"said": turn.utterance, "spoken": r.reply_text, "heard": heard, "interrupted": interrupted,
                     "toolCalls": [*({"name": name, "arguments": arguments} for name, arguments in r.tool_calls),
                                   *({"name": e["name"], "error": e["error"], "argumentsBytes": e["argumentsBytes"]}
                                     for e in r.tool_errors)]}
        turn_row = {
            "path": path, "nodeId": r.node_id, "nextNodeId": next_node, "callerTextChars": len(turn.utterance),
            "source": r.source, "provider": r.provider, "providerTtftMs": r.provider_ttft_ms,
            "firstTokenMs": timings.get("firstTokenMs"), "lastTokenMs": timings.get("lastTokenMs"),
            "interrupted": interrupted, "failovers": r.failovers, "cacheHit": r.cache_hit,
            "cacheable": r.cacheable, "action": action, "language": r.language,
            "llmRequests": r.llm_requests, "transitionedVia": r.transitioned_via,
            "languageSwitched": r.language_switched, "toolNames": [name for name, _ in r.tool_calls],
            # Every turn row has the speculation fields: a turn that never speculated (the <Gather> path) has none.
            "hedgedRequests": r.hedged_requests, **(speculation or speculation_row(None, [], None)),
        }
        # One write, no read-back: the record this call goes on with is the one it had, with the turn applied.
        index = self.store.commit_turn(record.tracking_id, fields, turn_row, counters=turn_counters(turn_row),
                                       transcript_entry=entry)
        if index is None:
            # The store has no such call any more (a Redis restarted without its data, a purge): nothing was written.
            log.error("turn_not_stored", tracking_id=record.tracking_id, reason="the call is not in the store",
                      node=r.node_id, first_token_ms=timings.get("firstTokenMs"))
        elif not self.record_transcripts:
            self._forget_history_if_ended(record.tracking_id)
        meta = record.meta
        if action and index is not None:
            # Merged key by key, never this session's copy of meta: other writers (the terminal status callback
            # stripping credentials, hang-up accounting) may have changed it since the session read its record.
            meta = self.store.update_meta(record.tracking_id, {PENDING_ACTION_META: action,
                                                               "destination": r.destination}) or meta
        updated = None if index is None else dataclasses.replace(
            record, **fields, meta=meta, transcript=[*(record.transcript or []), entry] if entry else record.transcript,
            updated_at=time.time())
        self.tracer.end_turn(r.trace_span, turn_row)
        if r.cache_candidate and not interrupted and self.cache is not None:
            self.cache.put(*r.cache_candidate)  # off the hot path: the caller already has the whole reply
        log.info("turn_completed", tracking_id=record.tracking_id, node=r.node_id, next_node=next_node,
                 source=r.source, provider=r.provider, provider_ttft_ms=r.provider_ttft_ms,
                 first_token_ms=timings.get("firstTokenMs"), interrupted=interrupted, action=action)
        # `updated` is `record` with the turn's fields replaced: a relay session's record was shared when the
        # session read it (sharing_snapshot), so the turn does not walk its history again to share it.
        return updated

    def forget_history(self, tracking_id: str) -> None:
        """RECORD_TRANSCRIPTS=0: an ended call's history (which the LLM needed while the call was live) goes."""
        self.store.update_call(tracking_id, messages=[])

    def _forget_history_if_ended(self, tracking_id: str) -> None:
        """After a turn's commit with RECORD_TRANSCRIPTS=0: a call that ended meanwhile (its final status came while
        the reply was made, as a <Gather> webhook's may: no socket to wait for) had its history emptied before the
        commit wrote it back. Read after the write, the end is seen either way (the final status is stored before
        the history is emptied)."""
        try:
            if not call_is_live(self.store.get_call(tracking_id)):
                self.forget_history(tracking_id)
        except Exception:
            log.exception("transcript_drop_failed", tracking_id=tracking_id)

    def drop_closing_action(self, record, turn: Turn):
        """The caller talked over a committed closing line before its end: the end/transfer was not heard, so it never
        fires and the call goes back to the turn's node, as `commit_turn` does for an interrupted turn; the turn's row
        (the relay session's last) says so too. Returns the record the call goes on with, changed in memory whatever
        the store does: each write is made on its own and a failed one is logged, so the caller is never answered
        from the end node."""
        _action, node = action_and_next_node(turn.result, interrupted=True)
        store, tracking_id = self.store, record.tracking_id

        def logged(event: str, write: Callable[[], Any]) -> Any:
            try:
                return write()
            except Exception:
                log.exception(event, tracking_id=tracking_id, node=node)
                return None

        logged("closing_action_node_not_restored", lambda: store.update_call(tracking_id, current_node=node))
        # One atomic write (store.END_REASON_RULE): an end-call that left the call to this line now ends it.
        meta = logged("closing_action_not_removed",
                      lambda: store.change_meta(tracking_id, closing_action_dropped())[0])
        # Only the closing turn's own row: if its write failed, the last row is an earlier turn's.
        logged("closing_turn_row_not_amended", lambda: store.amend_last_turn(
            tracking_id, {"interrupted": True, "action": None, "nextNodeId": node},
            expect={"action": turn.result.action, "interrupted": False}))
        if meta is None:
            meta = {k: v for k, v in (record.meta or {}).items() if k not in (PENDING_ACTION_META, "destination")}
        return dataclasses.replace(record, current_node=node, meta=meta)

    def answer_whole_turn(self, record, utterance: str, *, path: str, received_at: float,
                          budget_s: float | None = None) -> tuple[str, TurnResult]:
        """A turn whose reply is spoken only once complete (<Gather> then <Say>): run it, time it, commit it.

        `received_at` is this engine's clock when the caller's words arrived; the whole reply must exist before it
        can be spoken, so its first and last "token" are the same moment. A reply not complete `budget_s` after
        `received_at` is cancelled (its LLM stream closed) and replaced by the language's apology, the call staying
        on its node: Twilio stops waiting for a webhook's answer after 15 s, and then ends the call."""
        turn = self.start_turn(record, utterance)
        timer = None
        if budget_s is not None:
            timer = threading.Timer(max(0.0, budget_s - (self.clock() - received_at)), turn.cancel)
            timer.daemon = True
            timer.start()
        try:
            text = "".join(turn).strip()
        finally:
            if timer is not None:
                timer.cancel()
        r = turn.result
        if not r.completed:  # the budget ran out first: nothing of this reply is heard
            workflow = self.workflow_for(record)
            log.warning("whole_turn_too_late", budget_s=budget_s, node=r.node_id, reply_chars=len(r.reply_text),
                        provider=r.provider)
            text = r.reply_text = self.languages.get(r.language).line("apology")
            r.cache_candidate = None
            self._stay_after_apology(r, self.state_of(record, workflow), workflow)
        waited_ms = elapsed_ms(received_at, self.clock())
        self.commit_turn(record, turn, path=path, timings={"firstTokenMs": waited_ms, "lastTokenMs": waited_ms})
        return text, r

    # ---- while the phone rings ------------------------------------------------------------------
    def prewarm(self, record) -> int:
        """Answer the utterances callers open with while the phone rings, so the first turn hits the cache.

        Each reply is generated with the greeting as the only history and keyed to it, so it serves only callers
        answering the greeting. The work stops as soon as the call is over (no cost after hang-up).
        """
        if self.cache is None:
            return 0
        workflow = self.workflow_for(record)
        entry = self.language_of(record)
        # Once per flow, language and greeting (the context the replies are keyed to) per PREWARM_INTERVAL_S, for
        # every worker sharing the cache (one machine's, or with Redis every instance's).
        # A relay call we placed: Twilio's setup will say outbound, and its turns are offered the keypad
        # (may_press_keys), which is part of what the model is sent and so of the replies' keys.
        keypad = record.path == "optimized"
        marker = "\n".join((workflow.version_hash, entry.code, record.greeting or "", str(keypad)))
        if not self.cache.claim_prewarm(marker, PREWARM_INTERVAL_S):
            return 0  # another call of this flow warmed it, or is warming it
        node_id = workflow.entry_node_id()
        if not workflow.node(node_id).cacheable:
            log.info("cache_prewarmed", tracking_id=record.tracking_id, node=node_id, stored=0)
            return 0  # replies there depend on the caller: nothing to warm
        greeting = [{"role": "assistant", "content": record.greeting}] if record.greeting else []
        state = ConversationState(node_id, {}, greeting)
        call_over = _CallOverCheck(self.store, record.tracking_id)
        chain = self.chain_for(record)
        stored = 0
        for utterance in entry.prewarm_utterances:
            if call_over():
                log.info("cache_prewarm_stopped", tracking_id=record.tracking_id, stored=stored)
                self.cache.release_prewarm(marker)
                return stored
            # The same pipeline as a caller's turn (termination, plan, cache lookup, stream, routing, what is safe
            # to cache), from the state a caller answering the greeting would be in; only the cache write is here.
            turn = self._turn(workflow, state, entry, utterance, chain, keypad=keypad)
            for _token in turn:
                if call_over():
                    turn.close()
                    break
            if call_over():
                log.info("cache_prewarm_stopped", tracking_id=record.tracking_id, stored=stored)
                self.cache.release_prewarm(marker)
                return stored
            if turn.result.providers_failed:
                break  # every provider failed: the next utterance would fail too
            if turn.result.cache_candidate:
                stored += bool(self.cache.put(*turn.result.cache_candidate))
        log.info("cache_prewarmed", tracking_id=record.tracking_id, node=node_id, stored=stored)
        return stored


class _CallOverCheck:
    """Whether a call has ended (terminal status in the store), read at most every CALL_OVER_CHECK_S."""

    def __init__(self, store, tracking_id: str, clock: Callable[[], float] = time.monotonic):
        self.store, self.tracking_id, self.clock = store, tracking_id, clock
        self._checked_at: float | None = None
        self._over = False

    def __call__(self) -> bool:
        now = self.clock()
        if not self._over and (self._checked_at is None or now - self._checked_at >= CALL_OVER_CHECK_S):
            self._checked_at = now
            record = self.store.get_call(self.tracking_id)
            self._over = record is None or record.ended_at is not None or record.status in TERMINAL_STATUSES
        return self._over


def last_assistant_line(messages: list[dict]) -> str:
    """The last thing the caller heard from the assistant (history holds what was heard); "" before any."""
    for message in reversed(messages or []):
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def probe_turn(engine: ConversationEngine, message: str, language: str) -> dict[str, Any]:
    """Run the real turn pipeline once on a throwaway call (nothing stored) and time each stage."""
    from ..store import CallRecord

    clock = engine.clock
    started = clock()
    entry = engine.languages.resolve(language)
    known = entry is not None
    entry = entry or engine.languages.get(language)
    language_ms = elapsed_ms(started, clock())
    workflow = default_workflow()
    record = CallRecord(tracking_id=f"probe_{secrets.token_hex(4)}", path="probe", workflow=workflow.to_snapshot(),
                        workflow_hash=workflow.version_hash, language=entry.code,
                        current_node=workflow.entry_node_id())
    turn = engine.start_turn(record, message)
    first_token_ms = None
    for _token in turn:
        if first_token_ms is None:
            first_token_ms = elapsed_ms(started, clock())
    r = turn.result
    total_ms = elapsed_ms(started, clock())
    engine.tracer.end_turn(r.trace_span, {"source": r.source, "provider": r.provider, "cacheHit": r.cache_hit,
                                          "firstTokenMs": first_token_ms, "lastTokenMs": total_ms})
    stages = {"languageMs": language_ms, "cacheLookupMs": r.cache_lookup_ms, "providerTtftMs": r.provider_ttft_ms,
              "firstTokenMs": first_token_ms, "totalMs": total_ms}
    return {"language": entry.code, "languageKnown": known, "source": r.source, "cacheHit": r.cache_hit,
            "providersFailed": r.providers_failed, "text": r.reply_text,
            "provider": r.provider, "failovers": r.failovers, "stages": stages, "firstTokenMs": first_token_ms,
            "totalMs": total_ms}
