"""One live ConversationRelay socket: setup, prompt, interrupt, dtmf, info, error in; text, language, sendDigits,
end out (docs/twilio.md describes each case).

The session is the only in-memory state of a call and lives as long as its socket; everything that must
survive (history, node, variables, timings) is written to the store after every turn, so a lost socket resumes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
import time
from typing import Any, Callable, Protocol

import structlog

from ..store import CARRIED_OVER_META, SILENCE_END, end_reason_claimed
from . import relay_protocol as protocol
from .conversation import (SIGNAL_END_OF_SPEECH, SIGNAL_SENTENCE_END, SIGNAL_STABLE, ConversationEngine,
                           SpeculativeTurn, Turn, heard_of, speculation_row, spoken_length)
from .end_of_utterance import Completeness, SpeechCadence, completeness
from .metrics import elapsed_ms
from .reply_text import WAITED_S, ReplyText
from .speech import ssml_pause_s

log = structlog.get_logger()

# The `setup` fields an operator needs to know who called whom; kept on the call record.
SETUP_FIELDS = ("from", "to", "direction", "callerName", "forwardedFrom", "callType", "parentCallSid", "sessionId")
DTMF_INTER_DIGIT_S = 2.0        # keypad silence that ends a typed entry ("#" ends it at once)
DTMF_MAX_DIGITS = 32
MAX_CONSECUTIVE_ERRORS = 3      # Twilio `error` messages in a row before we give up on the session
# Bound on waiting for a closing line to play: generous speaking time for the text, never longer than this.
PLAYBACK_WAIT_MIN_S = 2.0
PLAYBACK_WAIT_MAX_S = 20.0
SLOW_SPEECH_FACTOR = 2 / 3      # a slow voice speaks at two thirds of the language's typical rate
# After agentSpeaking off, a closing line's end/transfer waits this long for an `interrupt` before it goes out. A
# barge-in stops playback, and Twilio may report that stop (agentSpeaking off) just before the `interrupt` of the same
# talk cycle; the two frames leave Twilio together, so what separates them here is the jitter between two frames of
# one WebSocket across the internet (tens of milliseconds; a delayed TCP segment takes longer and no grace covers it
# all). 200 ms is several times that jitter and costs a goodbye heard to its end 200 ms of silence before the hang-up.
CLOSING_INTERRUPT_GRACE_S = 0.2
# Twilio's agentSpeaking "off" and our next words cross on the wire: an "off" that left Twilio before our last words
# reached it is about the words before them, and Twilio then speaks the last ones ("on", later their own "off"). So an
# "off" that comes sooner after our last words than Twilio could have reported "on" for them counts only once that
# time has passed with no "on" (no new report) since: the call's reaction time (from sending words while Twilio was
# silent to its "on" for them: a round trip plus the start of speech synthesis; the slowest measured on the call) plus
# REACTION_GRACE_S for the jitter of a round trip, never more than CROSSING_HOLD_MAX_S (also before any was measured).
REACTION_GRACE_S = 0.2
CROSSING_HOLD_MAX_S = 2.0
# Twilio does not guarantee its speaker events (a socket hiccup loses a frame), and the silence count waits for the
# "off" of an agentSpeaking/clientSpeaking "on": one lost would leave the call unprompted until its TimeLimit (up to an
# hour, billed). So a report is trusted only so long. Agent: the whole playback estimate of the last talk cycle
# (playback_wait_bound_s, uncapped: slow speech, plus the longest wait for a recording) from when it was sent, plus this
# margin for Twilio's speech synthesis and network delays (more than PLAYBACK_WAIT_MAX_S, the longest wait any closing
# line gets), and never less than this margin from the "on" itself.
AGENT_SPEAKING_MARGIN_S = 30.0
# Caller: a clientSpeaking "on" with no transcript (final or interim), key or "off" for this long. A final transcript
# ends it, and interim ones extend it; only a long monologue on a call without partial prompts comes near it.
CLIENT_SPEAKING_MAX_S = 60.0
MAX_SETUP_FIELD_CHARS = 200     # a setup field kept on the call record (numbers, names, ids) is cut to this
MAX_ERROR_TEXT_CHARS = 300      # Twilio's error description, as logged
SETUP_READ_RETRIES = 2          # reads of a call `setup` could not read (store down) before the call ends
# No transcript for this long after an interim one: the caller's speech ended without a final transcript (the
# recogniser dropped it), so that turn's speculations are accounted as unanswered (their cost is kept).
NO_FINAL_AFTER_S = 5.0
# handoffData reason of the `end` a stopping worker sends (RelaySession.hand_over): the action URL reconnects the call.
HANDOVER = "handover"
# Call meta key: what the caller said (or typed) while the call was being handed over, which the stopping worker no
# longer answers; the resumed session answers it at its `setup`, after its welcome greeting. Kept to its latest
# MAX_CARRIED_OVER_CHARS.
CARRIED_OVER = CARRIED_OVER_META
MAX_CARRIED_OVER_CHARS = 1000
_ERROR_CODE = re.compile(r"\b(6\d{4})\b")


def playback_wait_bound_s(spoken: str, *, chars_per_s: float, with_audio: bool = False, capped: bool = True) -> float:
    """How long a closing line may take to play (`chars_per_s`: its language's typical rate), spoken slowly, with the
    pauses its SSML writes; the longest wait when a recording of unknown length plays too. `capped=False`: the whole
    of a long line (and the longest wait for a recording on top), where waiting too long costs nothing but a later
    re-prompt."""
    speech_s = PLAYBACK_WAIT_MIN_S + spoken_length(spoken) / (chars_per_s * SLOW_SPEECH_FACTOR) + ssml_pause_s(spoken)
    if not capped:
        return speech_s + (PLAYBACK_WAIT_MAX_S if with_audio else 0.0)
    if with_audio:
        return PLAYBACK_WAIT_MAX_S
    return min(PLAYBACK_WAIT_MAX_S, speech_s)


class Sender(Protocol):
    def send_json(self, *messages: dict[str, Any]) -> None:
        """Write the messages' frames in order; several at once go out in one socket write."""


class RelaySession:
    """Reads on the socket's greenlet; each reply streams on its own greenlet so `interrupt` is seen at once.

    What Twilio hears, message by message:
    - a reply streams as `text` tokens and is closed by an empty `text` with `last: true`;
    - barge-in (`interrupt`): Twilio has already stopped speaking and dropped the talk cycle, so we stop
      sending and keep what was heard; nothing more is sent for that reply;
    - a new final prompt while a reply still streams (no barge-in): the reply is cut and its talk cycle is
      closed with `last: true`, so the next reply is a new utterance rather than appended to the old one;
    - a closing line (goodbye, transfer message): `end` is sent only once Twilio reports the agent fell
      silent (`info` agentSpeaking off, from `debug="speaker-events"`), or after a bounded wait;
    - keypad digits are collected into one turn (inter-digit timeout, `#` ends early);
    - on calls we placed, the model may press keys (`press_keys` → `sendDigits`) to get through a phone menu;
    - with preemptive generation, a stable interim transcript (`prompt` with `last: false`) starts the turn
      early, silently; the final transcript adopts it when the words match, and otherwise (or on barge-in,
      keypad, hang-up) it is discarded uncommitted (docs/twilio.md section 5a); once Twilio reports the caller's
      voice activity (`info` clientSpeaking on/off), "off" starts it at once on the latest interim transcript and
      replaces the text windows.
    """

    # Every live call holds one while it is idle: slots, no per-instance dict (bench/idle_call_memory.py).
    __slots__ = ("engine", "text_hold_s", "sender", "spawn", "clock", "inter_digit_s", "record", "call_sid",
                 "_reply", "_streaming", "_turn", "_sent", "_committed", "_timings", "_fell_silent_event",
                 "_reply_stopped_event", "_digits", "_digit_batch", "_errors_in_a_row", "_closing_end", "ended",
                 "_speculation", "_discarded", "_partial_seq", "_adopted", "_dropped_this_turn", "_speech_cadence",
                 "_last_partial_at", "_watching_for_final", "_latest_partial", "_speaker_events", "_caller_silent",
                 "_setup_unread", "_setup_retries", "_stored_cycle", "_closing_turn", "_writing", "_forced_end",
                 "_barged_in_event", "_handing_over", "_agent_speaking", "_reading_setup",
                 "_handover_deadline", "silence_timeout_s", "on_quiet", "_silence_from", "_reprompted",
                 "_twilio_speaking", "_client_speaking", "_agent_on_until", "_client_on_until", "_words_at",
                 "_off_at", "_on_awaited_at", "_reaction_s", "_speaker_seq", "_cut_off_event")

    def __init__(self, engine: ConversationEngine, sender: Sender, *, spawn: Callable, clock=time.monotonic,
                 inter_digit_s: float = DTMF_INTER_DIGIT_S, text_hold_s: float = 0.0, silence_timeout_s: float = 0.0):
        self.engine = engine
        self.text_hold_s = text_hold_s  # RELAY_TEXT_HOLD_MS: after a reply's first token, tokens per clause (reply_text.py)
        self.sender = sender
        self.spawn = spawn
        self.clock = clock
        self.inter_digit_s = inter_digit_s
        self.record = None
        self.call_sid: str | None = None
        self._reply = None           # task (services.Task) streaming, then committing, the current reply
        self._streaming = False      # True while that greenlet is still sending tokens
        self._turn: Turn | None = None
        self._sent = ""              # text of the current reply already sent to Twilio
        self._writing = ""           # the chunk whose write is under way (not sent until the write returns)
        self._committed = True
        self._timings: dict[str, Any] = {}
        # Made on first use (the properties below), like the cadence: an idle call holds none of them.
        # Set by `info` agentSpeaking off (and an interrupt, the socket closing); cleared by our words and by "on".
        self._fell_silent_event: threading.Event | None = None
        self._reply_stopped_event: threading.Event | None = None  # set when the current reply is cancelled
        self._barged_in_event: threading.Event | None = None      # set by `interrupt`
        # Set when an interrupt or the socket closing stopped Twilio's speech, cleared by our next words: ends the hold
        # of an "off" (_wait_for_playback) at once. Made by the first hold.
        self._cut_off_event: threading.Event | None = None
        self._digits = ""
        self._digit_batch = 0        # bumps on every digit so a stale inter-digit timer does nothing
        self._errors_in_a_row = 0
        self._closing_turn: Turn | None = None  # the turn whose end/transfer waits for its line to play
        self._closing_end: dict | None = None   # that end/transfer (dropped if the caller talks over the line)
        self._forced_end: dict | None = None    # an ending for an error or a handover, never dropped by a barge-in
        self.ended = False           # the call is over here: its one `end` was sent, or the socket closed
        self._handing_over = False   # this worker is stopping: `end` (HANDOVER) follows the reply in flight
        self._handover_deadline: float | None = None  # on `clock`: that `end` goes out by then, whatever plays
        self._agent_speaking: bool | None = None  # Twilio's last agentSpeaking (None: it has reported none)
        self._speculation: SpeculativeTurn | None = None  # started on an interim transcript, held back
        self._discarded: list[SpeculativeTurn] = []        # this caller turn's dropped speculations (metrics)
        self._partial_seq = 0        # bumps on every partial and final so a stale stability timer does nothing
        self._adopted: SpeculativeTurn | None = None           # the current reply's, if it was speculated
        self._dropped_this_turn: list[SpeculativeTurn] = []    # dropped before the current reply
        self._speech_cadence: SpeechCadence | None = None  # the caller's own pauses inside a sentence, in this call
        self._last_partial_at = 0.0      # when the last interim transcript came (the no-final watch)
        self._watching_for_final = False
        self._latest_partial: tuple[str, str | None] | None = None  # this caller turn's last interim transcript
        self._speaker_events = False  # Twilio has sent clientSpeaking on this call: the acoustic signal is there
        self._caller_silent = False   # its last clientSpeaking was "off" (since the last final)
        self._setup_unread: protocol.Setup | None = None  # a `setup` whose store read failed: read again later
        self._setup_retries = 0
        self._reading_setup = False  # `setup` is reading the call (its store reads yield): a handover waits for it
        # The stored assistant line whose talk cycle this session sent last (None: the last one was something else,
        # a canned line or a greeting, or it was already cut): the only line a barge-in after the fact may trim.
        self._stored_cycle: str | None = None
        # Caller silence (docs/twilio.md, 6a): SILENCE_TIMEOUT_S until `setup` reads the flow's own (0: never). Its
        # deadline is kept by the socket's one alarm (routes/relay.py), which calls check_silence when it is due.
        self.silence_timeout_s = silence_timeout_s
        self.on_quiet: Callable[[], None] | None = None  # told when a reply's talk cycle closes: a deadline moved
        self._silence_from: float | None = None  # when the caller's silence started counting (None: it is not)
        self._reprompted = False  # "are you still there?" said in this silence: the next one ends the call
        self._twilio_speaking: bool | None = None  # what Twilio last REPORTED (agentSpeaking; None: nothing yet)
        self._client_speaking = False  # Twilio's last clientSpeaking was "on" (no final transcript since)
        # On `clock`: an agentSpeaking "on" with no "off" by then is taken as lost (the last talk cycle's whole
        # playback estimate from when it closed, plus AGENT_SPEAKING_MARGIN_S).
        self._agent_on_until = 0.0
        self._client_on_until = 0.0  # on `clock`: a clientSpeaking "on" with no caller input since, likewise
        # What a closing line's `end` waits for (_wait_for_playback), on `clock`: when our last words (or a recording)
        # were written, when the agentSpeaking "off" that set _fell_silent came (None: an interrupt or the socket set
        # it), since when an "on" for words sent while Twilio was silent is awaited (math.inf: for a recording, which
        # measures nothing), and the slowest such "on" measured.
        self._words_at: float | None = None
        self._off_at: float | None = None
        self._on_awaited_at: float | None = None
        self._reaction_s: float | None = None
        self._speaker_seq = 0  # bumps on our words and on every agentSpeaking report or interrupt

    @property
    def _fell_silent(self) -> threading.Event:
        """Set when Twilio reports agentSpeaking off, or stopped at an interrupt, after our last words (a gevent Event
        under gevent)."""
        if self._fell_silent_event is None:
            self._fell_silent_event = threading.Event()
        return self._fell_silent_event

    @property
    def _barged_in(self) -> threading.Event:
        """Set by `interrupt`: ends a closing line's grace for an interrupt after agentSpeaking off."""
        if self._barged_in_event is None:
            self._barged_in_event = threading.Event()
        return self._barged_in_event

    @property
    def _closing(self) -> bool:
        """A closing line is playing or the call is being ended (an error, a handover): new input is not answered."""
        return self._closing_end is not None or self._forced_end is not None or self._handing_over

    @property
    def _cut_off(self) -> threading.Event:
        """Set when an interrupt or the socket closing stopped Twilio's speech since our last words."""
        if self._cut_off_event is None:
            self._cut_off_event = threading.Event()
        return self._cut_off_event

    @property
    def _reply_stopped(self) -> threading.Event:
        """Set when the current reply is cancelled: ends a paced read's pause."""
        if self._reply_stopped_event is None:
            self._reply_stopped_event = threading.Event()
        return self._reply_stopped_event

    @property
    def _cadence(self) -> SpeechCadence:
        if self._speech_cadence is None:
            self._speech_cadence = SpeechCadence()
        return self._speech_cadence

    # ---- inbound ------------------------------------------------------------------------------
    def handle(self, raw: str | bytes) -> None:
        """One frame from Twilio; a frame that is not a message was logged by `parse` and changes nothing."""
        message = protocol.parse(raw)
        if message is not None:
            self.handle_message(message)

    def handle_message(self, message: protocol.Inbound) -> None:
        """One parsed message from Twilio; a handler's failure is logged and apologised for, never raised."""
        try:
            match message:
                case protocol.Setup():
                    self._reading_setup = True
                    try:
                        self._on_setup(message)
                    finally:
                        self._reading_setup = False
                        if self._handing_over:  # told to hand over before its setup (hand_over): now
                            self.spawn(self._hand_over_when_played)
                case protocol.Prompt():
                    self._on_prompt(message)
                case protocol.Interrupt():
                    self._on_interrupt(message)
                case protocol.Dtmf():
                    self._on_dtmf(message)
                case protocol.Error():
                    self._on_error(message)
                case protocol.Info():
                    self._on_info(message)
        except Exception:
            # One bad message must not end the call: log it, apologise, keep listening.
            log.exception("relay_handler_failed", message_type=type(message).__name__.lower())
            self._speak_canned("apology")

    def _on_setup(self, message: protocol.Setup) -> None:
        self._setup_unread = message  # until the call is read: a store failure leaves it for the caller's next turn
        params = message.custom_parameters
        self.call_sid = message.call_sid
        tracking_id = params.get("trackingId")
        store = self.engine.store
        if not tracking_id and self.call_sid:
            tracking_id = store.find_tracking_id(self.call_sid)
        record = store.get_call(tracking_id) if tracking_id else None
        structlog.contextvars.bind_contextvars(tracking_id=tracking_id, call_sid=self.call_sid)
        if record is None:
            # Nothing to talk about: apologise and end the session rather than leave the caller in silence.
            log.error("relay_setup_unknown_call", tracking_id=tracking_id, call_sid=self.call_sid)
            self._setup_unread = None
            self._speak_canned("apology")
            self._end_soon(protocol.end("error", detail="unknown call"), self._canned("apology"))
            return
        setup = {key: str(message.details[key])[:MAX_SETUP_FIELD_CHARS] for key in SETUP_FIELDS
                 if message.details.get(key) not in (None, "")}
        if self.call_sid and record.call_sid != self.call_sid:
            record = store.update_call(record.tracking_id, call_sid=self.call_sid) or record
        meta = store.update_meta(record.tracking_id, {"setup": setup})  # merged: meta has other writers
        if meta is not None:
            record = dataclasses.replace(record, meta=meta)
        self.record = self.engine.sharing_snapshot(record)
        self._setup_unread = None
        # The socket's first talk cycle is Twilio's welcome greeting, which the call flow stored as the latest line
        # (make-call: the call's greeting; a resume: the "I'm back" line): a barge-in on it trims that line.
        greeting = self._canned("resumed") if params.get("resumed") else (
            record.greeting or self._canned("fallbackGreeting"))
        latest = (record.messages or [{}])[-1]
        self._stored_cycle = greeting if latest == {"role": "assistant", "content": greeting} else None
        self.silence_timeout_s = self.engine.workflow_for(record).limits.silence_s(self.silence_timeout_s)
        self._quiet_after(greeting)  # Twilio speaks the welcome greeting, then listens
        log.info("relay_setup", tracking_id=record.tracking_id, resumed=bool(params.get("resumed")),
                 direction=setup.get("direction"))
        if params.get("resumed"):
            self._answer_carried_over()

    def _carry_over(self, said: str, lang: str | None) -> bool:
        """The caller spoke (or typed) while this worker hands the call over: not answered here, so kept in the
        store (CARRIED_OVER) for the resumed session to answer, and logged. Only for a handover: words said over a
        goodbye, a transfer or an error ending are not (the call ends). False when nothing was kept."""
        forced = json.loads(self._forced_end["handoffData"]).get("reason") if self._forced_end else HANDOVER
        if not self._handing_over or self._closing_end is not None or forced != HANDOVER or self.record is None:
            return False
        earlier = (self.record.meta or {}).get(CARRIED_OVER) or {}
        text = f"{earlier.get('text') or ''} {said}".strip()[-MAX_CARRIED_OVER_CHARS:]
        lang = lang or earlier.get("lang")
        try:
            meta = self.engine.store.update_meta(self.record.tracking_id, {CARRIED_OVER: {"text": text, "lang": lang}})
        except Exception:
            log.exception("relay_words_at_handover_lost", chars=len(said))
            return True  # (logged: not silently)
        if meta is not None:
            self.record = dataclasses.replace(self.record, meta=meta)
        log.warning("relay_words_at_handover_carried_over", chars=len(said), carried_chars=len(text))
        return True

    def _answer_carried_over(self) -> None:
        """A resumed session: answer what the caller said while the call was handed over (CARRIED_OVER), once.
        Twilio speaks the welcome greeting first (a new talk cycle waits for it)."""
        carried = (self.record.meta or {}).get(CARRIED_OVER)
        text = str(carried.get("text") or "").strip() if isinstance(carried, dict) else ""
        if not text:
            return
        try:
            meta = self.engine.store.update_meta(self.record.tracking_id, remove=(CARRIED_OVER,))
            if meta is not None:
                self.record = dataclasses.replace(self.record, meta=meta)
        except Exception:  # answered anyway: the caller is waiting (a later resume might answer it again)
            log.exception("relay_carried_over_not_removed")
        log.info("relay_answering_words_from_handover", chars=len(text))
        self._start_reply(text, self.clock(), lang=carried.get("lang"))

    def _read_setup_again(self) -> None:
        """`setup` could not read the call (the store failed) and the caller was asked to say it again: a whole
        caller turn (final transcript, keypad entry) reads it again; a failure is apologised for, and after
        SETUP_READ_RETRIES the call ends with an error rather than apologising for every turn."""
        if self.record is not None or self._setup_unread is None:
            return
        self._setup_retries += 1
        try:
            self._on_setup(self._setup_unread)
        except Exception:
            log.exception("relay_setup_read_failed", attempt=self._setup_retries)
            self._speak_canned("apology")
            if self._setup_retries >= SETUP_READ_RETRIES:
                log.error("relay_setup_unreadable", attempts=self._setup_retries + 1)
                self._setup_unread = None
                self._end_soon(protocol.end("error", detail="call unreadable"), self._canned("apology"))

    def _on_prompt(self, message: protocol.Prompt) -> None:
        received = self.clock()
        if message.last:
            self._read_setup_again()
        if self.record is None:
            log.error("relay_prompt_before_setup")
            return
        if message.last:
            self._client_speaking = False  # the recogniser ended the utterance
        self._heard_caller(received)
        if not message.last:
            self._on_partial(message, received)  # interim transcript (partialPrompts): maybe start the turn early
            return
        if self._speech_cadence is not None:
            self._speech_cadence.turn_ended()
        self._latest_partial, self._caller_silent = None, False
        text = message.voice_prompt.strip()
        if self._closing:
            if not (text and self._carry_over(text, message.lang)):
                log.info("relay_prompt_while_closing", chars=len(text))
            return
        if not text:
            return
        if self._digits:  # the caller spoke while typing: the digits so far go with the words
            text = f"{self._keypad_note(self._take_digits())} {text}"
        self._partial_seq += 1
        speculation, self._speculation = self._speculation, None
        if speculation is not None and not speculation.matches(text, message.lang):
            self._drop_speculation(speculation, "final_differs")
            speculation = None
        self._settle_previous()
        if speculation is not None:
            self._adopt(speculation, received)
        else:
            self._start_reply(text, received, lang=message.lang)

    # ---- speculation on interim transcripts --------------------------------------------------------
    def _on_partial(self, message: protocol.Prompt, received: float) -> None:
        policy = self.engine.speculation
        text = message.voice_prompt.strip()
        if not policy.enabled or self._closing or self.ended or not text:
            return
        lang = message.lang
        how = completeness(text, lang or self.record.language)
        self._cadence.heard(received, text, how)
        self._partial_seq += 1
        self._watch_for_final(received)
        self._latest_partial = (text, lang)
        if self._speculation is not None:
            if self._speculation.matches(text, lang):
                return  # the same words again: the speculation in flight still fits
            self._drop_speculation(self._speculation, "transcript_changed")
            self._speculation = None
        if not self._may_speculate(text):
            return
        if self._hears_voice_activity():
            # Twilio tells us when the caller stops talking: that (or a sentence mark) starts the speculation, not
            # a guess from how long the transcript stayed the same.
            if how is Completeness.SENTENCE_END:
                self._speculate(text, lang, SIGNAL_SENTENCE_END)
            elif self._caller_silent and policy.starts_at_end_of_speech(how):
                self._speculate(text, lang, SIGNAL_END_OF_SPEECH)  # the transcript caught up after "off"
            return
        window_s = policy.window_s(how, self._cadence.usual_pause_s())
        if window_s <= 0:
            self._speculate(text, lang, SIGNAL_SENTENCE_END if how is Completeness.SENTENCE_END else SIGNAL_STABLE)
        else:
            self.spawn(self._speculate_when_stable, self._partial_seq, text, lang, window_s)

    def _hears_voice_activity(self) -> bool:
        """Speculations follow Twilio's clientSpeaking events: enabled, and Twilio has sent one on this call."""
        return self.engine.speculation.speaker_events and self._speaker_events

    def _on_client_speaking(self, speaking: bool) -> None:
        """`info` clientSpeaking (from `debug="speaker-events"`): "off" means Twilio's voice activity detection
        heard the caller stop, before the recogniser's end-pointing sends the final transcript. Start the turn on
        the latest interim transcript now. "on" (the caller resumed) changes nothing by itself: a following interim
        transcript with other words discards the speculation as any changed transcript does."""
        self._speaker_events = True
        self._caller_silent = not speaking
        policy = self.engine.speculation
        if speaking or not policy.enabled or not policy.speaker_events or self.ended or self._latest_partial is None:
            return
        text, lang = self._latest_partial
        if self._may_speculate(text) and policy.starts_at_end_of_speech(
                completeness(text, lang or self.record.language)):
            self._speculate(text, lang, SIGNAL_END_OF_SPEECH)

    def _may_speculate(self, text: str) -> bool:
        """Only between replies (the history is committed), never while typing, within the per-turn limits."""
        policy = self.engine.speculation
        return (self.record is not None and self._reply is None and not self._digits and not self._closing
                and self._speculation is None and len(text) <= policy.max_chars
                and len(self._discarded) < policy.max_per_turn)

    def _speculate_when_stable(self, seq: int, text: str, lang: str | None, window_s: float) -> None:
        time.sleep(window_s)
        if seq == self._partial_seq and self._may_speculate(text) and not self._hears_voice_activity():
            self._speculate(text, lang, SIGNAL_STABLE)

    def _speculate(self, text: str, lang: str | None, signal: str) -> None:
        speculation = self.engine.speculate(self.record, text, lang=lang, signal=signal)
        self._speculation = speculation
        self.spawn(speculation.pump)
        log.info("speculation_started", utterance_chars=len(text), signal=signal)

    def _drop_speculation(self, speculation: SpeculativeTurn, reason: str) -> None:
        self.engine.drop_speculation(speculation, reason)
        self._discarded.append(speculation)

    def _discard_speculation(self, reason: str) -> None:
        if self._speculation is not None:
            speculation, self._speculation = self._speculation, None
            self._drop_speculation(speculation, reason)

    def _watch_for_final(self, received: float) -> None:
        """One watcher per session while interim transcripts come: it notices speech that ends with no final."""
        self._last_partial_at = received
        if not self._watching_for_final:
            self._watching_for_final = True
            self.spawn(self._settle_if_no_final)

    def _settle_if_no_final(self) -> None:
        try:
            while (left := self._last_partial_at + NO_FINAL_AFTER_S - self.clock()) > 0 and not self.ended:
                time.sleep(left)
        finally:
            self._watching_for_final = False
        if not self.ended and (self._speculation is not None or self._discarded):
            self._settle_unanswered("no_final")  # a final would have taken them into its reply

    def _settle_unanswered(self, reason: str) -> None:
        """A caller turn ends with no final transcript: drop its speculation and keep what its speculations cost."""
        self._discard_speculation(reason)
        discarded, self._discarded = self._discarded, []
        if self._speech_cadence is not None:
            self._speech_cadence.turn_ended()
        self._latest_partial, self._caller_silent = None, False
        if discarded and self.record is not None:
            try:
                self.engine.record_unanswered_speculations(self.record, discarded, reason)
            except Exception:
                log.exception("speculation_accounting_failed", reason=reason)

    def _adopt(self, speculation: SpeculativeTurn, received: float) -> None:
        """The final transcript is what we speculated on: send what it already produced, then the rest."""
        log.info("speculation_adopted", tokens_ready=speculation.token_count)
        self._begin_reply(speculation.turn, received, adopted=speculation)
        self._reply = self.spawn(self._stream_reply, speculation.turn, speculation.replay())

    def _on_dtmf(self, message: protocol.Dtmf) -> None:
        """Collect keypad digits into one turn: a pause of `inter_digit_s` or `#` ends the entry."""
        digit = message.digit
        if self.record is None and self._setup_unread is None:
            log.error("relay_dtmf_before_setup")
            return  # (a call `setup` could not read is read again when the entry ends)
        if digit not in "0123456789*#" or not digit:
            log.warning("relay_bad_digit")
            return
        if self._closing:
            if not self._carry_over(self._keypad_note(digit), None):
                log.info("relay_digit_while_closing")
            return
        self._heard_caller(self.clock())
        if not self._digits:
            self._discard_speculation("keypad")
            self._settle_previous()  # the caller started typing: stop talking over them
        self._digit_batch += 1
        if digit == "#":
            self._flush_digits(self._digit_batch)
            return
        self._digits = (self._digits + digit)[-DTMF_MAX_DIGITS:]
        self.spawn(self._digits_after_pause, self._digit_batch)

    def _digits_after_pause(self, batch: int) -> None:
        time.sleep(self.inter_digit_s)
        self._flush_digits(batch)

    def _flush_digits(self, batch: int) -> None:
        if batch != self._digit_batch or not self._digits or self.ended:
            return  # another digit came since (its own timer will flush), or already flushed
        digits = self._take_digits()
        if self._closing:
            # Typed before the call began to end (an error ending, a handover): a reply now would be cut by the end
            # (a handover's resumed session asks the caller to go on), as prompts meanwhile are not answered.
            if not self._carry_over(self._keypad_note(digits), None):
                log.info("relay_digits_while_closing", digits=len(digits))
            return
        self._read_setup_again()
        if self.record is None:
            return
        self._settle_previous()
        self._start_reply(self._keypad_note(digits), self.clock())

    def _take_digits(self) -> str:
        digits, self._digits = self._digits, ""
        self._digit_batch += 1
        return digits

    @staticmethod
    def _keypad_note(digits: str) -> str:
        return f"[The caller pressed {digits} on the keypad]"

    def _on_interrupt(self, message: protocol.Interrupt) -> None:
        # A speculation was built on the history the barge-in is about to trim: drop it (partials may start
        # another one on the trimmed history).
        self._discard_speculation("barge_in")
        self._heard_caller(self.clock())
        log.info("relay_interrupt", sent_chars=len(self._sent), played_ms=message.duration_until_interrupt_ms)
        try:
            if self._reply is not None and self._streaming:
                self._cancel(message)
            elif self.record is not None and not self.ended:  # after `end` the call is over: nothing to undo
                self._settle_previous()
                closing = self._closing_turn
                cut_short = closing is not None and self._cut_short(closing, message)  # from the line itself
                if cut_short:
                    # Decided now, before any store write: a waiter whose grace runs out during the trim below
                    # must already find no end to send.
                    self._stop_closing(closing)
                try:
                    self._trim_heard(message)
                finally:
                    if cut_short:  # whatever the store did, no end goes out (after the trim: it sets the record)
                        self._drop_closing_action(closing)
        finally:
            # Twilio stopped speaking. Set last: a closing line's waiter then sees whether its end was dropped.
            self._agent_speaking = self._twilio_speaking = False
            self._off_at = self._on_awaited_at = None  # (an interrupt counts at once: nothing of ours plays on)
            self._speaker_seq += 1
            if self._barged_in_event is not None:  # made when a closing line starts: only its waiter reads it
                self._barged_in_event.set()
            if self._cut_off_event is not None:  # made by a hold: it ends now
                self._cut_off_event.set()
            self._fell_silent.set()

    def _cut_short(self, turn: Turn, message: protocol.Interrupt) -> bool:
        """Whether the caller talked over this closing line before its end."""
        line = turn.result.reply_text
        return self._heard(line, message, turn.result.language) != line

    def _stop_closing(self, turn: Turn) -> None:
        """`turn`'s closing line no longer waits for its end (an error ending decided meanwhile still goes out)."""
        if self._closing_turn is turn:
            self._closing_turn = self._closing_end = None

    def _drop_closing_action(self, turn: Turn) -> None:
        """The caller talked over a closing line before its end: the end/transfer it announced was not heard, so
        it never fires (architecture.md, interrupts) and the call stays where it was, as `commit_turn` does for a
        reply cut mid-stream; the caller's next words are answered. (`_on_interrupt` already stopped its end.)"""
        self.record = self.engine.drop_closing_action(self.record, turn)
        log.info("relay_closing_action_dropped", action=turn.result.action, node=turn.result.node_id)
        if self._handing_over:  # the call stays, but not on this worker
            self.spawn(self._hand_over_when_played)

    def _settle_previous(self) -> None:
        """Before a new turn: cut off a reply still streaming (closing its talk cycle); wait for a finished one."""
        if self._reply is None:
            return
        if self._streaming:
            # The caller spoke again before our reply finished, without barging in: Twilio still holds an
            # open talk cycle, so close it; the next reply then starts a new utterance of its own.
            self._cancel()
            self._send(protocol.close_cycle())
        else:
            self._reply.join(timeout=5)

    def _trim_heard(self, message: protocol.Interrupt) -> None:
        """Barge-in after the last token was sent (Twilio was still speaking it): keep only what was heard of the
        reply (`heard_of`, as for a reply cut mid-stream), nothing when nothing was heard. Only when the talk cycle
        interrupted is the stored line this session sent last (`_stored_cycle`): a canned apology, an unstored
        greeting or an older reply heard in full is never touched."""
        messages = list(self.record.messages or [])
        content, self._stored_cycle = self._stored_cycle, None  # a second barge-in is about a later talk cycle
        if content is None or not messages or messages[-1] != {"role": "assistant", "content": content}:
            return
        cut = self._heard(content, message)
        if cut == content:
            return  # all of it was heard
        messages[-1:] = [{"role": "assistant", "content": cut}] if cut else []
        fields: dict[str, Any] = {"messages": messages}
        transcript = list(self.record.transcript or [])
        if transcript and transcript[-1].get("heard") == content:  # the call log's line for this reply
            transcript[-1] = {**transcript[-1], "heard": cut, "interrupted": True}
            fields["transcript"] = transcript
        try:
            updated = self.engine.store.update_call(self.record.tracking_id, **fields)
        except Exception:  # the history keeps the whole line; the call goes on (_on_interrupt still drops an end)
            log.exception("relay_history_trim_failed")
            return
        self.record = self.engine.sharing_snapshot(updated) or self.record
        try:
            # Its row says so too (the call log's timeline, the call's interrupted count), as for a barge-in
            # mid-stream. A closing line's row is left to _drop_closing_action, which also clears its action.
            self.engine.store.amend_last_turn(self.record.tracking_id, {"interrupted": True},
                                              expect={"interrupted": False, "action": None})
        except Exception:  # the history and transcript are trimmed; only the row's flag is stale
            log.exception("relay_interrupted_turn_row_not_amended")
        log.info("relay_history_trimmed", heard_chars=len(cut))

    def _heard(self, spoken: str, message: protocol.Interrupt, language: str | None = None) -> str:
        """`heard_of` at the speaking rate of the reply's language (`language`, else the call's)."""
        return heard_of(spoken, message.utterance_until_interrupt, message.duration_until_interrupt_ms,
                        chars_per_s=self._speech_rate(language))

    def _speech_rate(self, language: str | None = None) -> float:
        """The typical speaking rate of `language`, else of the call's language."""
        language = language or (self.record.language if self.record else None)
        return self.engine.languages.get(language).speech_chars_per_s

    def _on_error(self, message: protocol.Error) -> None:
        """Twilio drops a message it refuses (64107) and goes on; errors it cannot recover from end the
        session on its side (the action URL then reports them). We log each with the call, and stop after
        MAX_CONSECUTIVE_ERRORS in a row: something we keep sending is wrong, so apologise and end."""
        description = message.description[:MAX_ERROR_TEXT_CHARS]
        code = _ERROR_CODE.search(description)
        self._errors_in_a_row += 1
        log.error("relay_twilio_error", description=description, error_code=code.group(1) if code else None,
                  tracking_id=self.record.tracking_id if self.record else None, in_a_row=self._errors_in_a_row)
        if self._errors_in_a_row >= MAX_CONSECUTIVE_ERRORS and not self.ended:
            log.error("relay_ending_after_errors", errors=self._errors_in_a_row)
            if self._reply is not None and self._streaming:
                self._cancel()
            self._speak_canned("apology")
            self._end_soon(protocol.end("error", detail="repeated Twilio errors"), self._canned("apology"))

    def _on_info(self, message: protocol.Info) -> None:
        if message.agent_speaking is not None:
            now = self.clock()
            self._agent_speaking = self._twilio_speaking = message.agent_speaking
            self._speaker_seq += 1
            if message.agent_speaking:  # trusted while the last talk cycle may still play, and the margin from now
                self._agent_on_until = max(self._agent_on_until, now + AGENT_SPEAKING_MARGIN_S)
                if self._on_awaited_at is not None:  # Twilio started speaking what we sent while it was silent
                    if math.isfinite(self._on_awaited_at):  # (not a recording: its start waits for its fetch)
                        self._reaction_s = max(self._reaction_s or 0.0, now - self._on_awaited_at)
                    self._on_awaited_at = None
                if not self.ended:
                    self._fell_silent.clear()  # an earlier "off" is over: it speaks again
            else:  # everything queued has played (a recording's unbounded trust ends here)
                self._agent_on_until = 0.0
                # An "on" still awaited for words sent while Twilio was silent was lost (or merged into speech under
                # way): measure no more, or a later "on" would count from those words (a reaction time of seconds).
                self._on_awaited_at = None
                self._off_at = now
                self._fell_silent.set()
            if not self._streaming:  # (a reply still streaming starts the silence when its talk cycle closes)
                self._silence_from = now  # (while the agent speaks, nothing is due: silence_due_at)
        elif message.client_speaking is not None:
            self._client_speaking = message.client_speaking
            self._heard_caller(self.clock())
            self._on_client_speaking(message.client_speaking)
        log.debug("relay_info", name=str(message.name)[:40], value=str(message.value)[:100])

    # ---- replies ------------------------------------------------------------------------------
    def _start_reply(self, utterance: str, received: float, lang: str | None = None) -> None:
        self._discard_speculation("new_turn")  # keypad entries end a caller turn too
        turn = self.engine.start_turn(self.record, utterance, lang=lang)
        self._begin_reply(turn, received)
        self._reply = self.spawn(self._stream_reply, turn)

    def _begin_reply(self, turn: Turn, received: float, adopted: SpeculativeTurn | None = None) -> None:
        """A caller turn ends here: its speculations (adopted or not) are accounted to this reply."""
        self._turn, self._sent, self._writing, self._committed, self._streaming = turn, "", "", False, True
        self._silence_from = None  # until this reply has been spoken
        self._reply_stopped.clear()
        self._timings = {"receivedAt": received, "firstTokenMs": None, "lastTokenMs": None}
        self._adopted, self._dropped_this_turn, self._discarded = adopted, self._discarded, []

    def _stream_reply(self, turn: Turn, tokens=None) -> None:
        """Send a reply's tokens (`tokens`: an adopted speculation's replay, else the turn itself)."""
        received = self._timings["receivedAt"]
        closing = False
        try:
            if turn.result.language_switched:
                self.sender.send_json(self._language_message(turn.result.language))
            audio_sent = False
            out = ReplyText(self.text_hold_s)
            read_from = self.clock()
            stream = iter(turn if tokens is None else tokens)
            for token in stream:
                now = self.clock()
                if not self._streaming:
                    break  # cancelled: the canceller commits what was heard; held text was never sent
                if not token:
                    continue
                if not audio_sent and turn.result.entered_audio is not None:
                    self._send_text(out.take(now))  # the words before the node's recording go before it
                    audio_sent = self._play_entered_audio(turn)
                self._send_text(out.add(token, now, waited=now - read_from >= WAITED_S))
                pause_s = out.pause_s(now)
                if pause_s and self._reply_stopped.wait(pause_s):
                    break  # cancelled during the pause
                read_from = self.clock()
            if not self._streaming:
                # Stopped between two tokens: end the stream here, so what it accounts on its way out (provider,
                # TTFT, failovers, the LLM span) is in the turn before the canceller commits it.
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
                return
            tail = out.take(self.clock())
            if not audio_sent and turn.result.entered_audio is not None:
                self._send_text(tail)
                tail = ""
                audio_sent = self._play_entered_audio(turn)
            closing = turn.result.completed and turn.result.action in ("end", "transfer")
            if closing:
                announced = self._closing_message(turn)
                # Its end waits for Twilio to play the last words sent (an "off" after them, even one that came
                # before the turn chose to end the call: every word sent re-armed that wait). An interrupt from here
                # on is about this line.
                self._closing_turn, self._closing_end = turn, announced
                self._barged_in.clear()
            try:
                self._send_text(tail, close_cycle=True)
            except Exception:
                if tail:
                    raise  # the reply's last words were not written: the failure path below
                # Every word was written and Twilio speaks it: the reply (and a goodbye's end) stands.
                log.exception("relay_close_cycle_failed")
                self._send(protocol.close_cycle())
            if not self._streaming:
                # The caller barged in while the last frame was written: the canceller commits what was heard,
                # and a closing line cut short announces nothing (its end/transfer is dropped).
                self._stop_closing(turn)
                return
            self._timings["lastTokenMs"] = elapsed_ms(received, self.clock())
        except Exception:
            log.exception("relay_reply_failed")
            self._writing = ""  # a write that raised sent nothing
            if closing:
                # no `end` follows a closing line that failed: the caller's next words count
                self._stop_closing(turn)
            if not self._streaming:
                # Cancelled meanwhile (a barge-in): the canceller commits what was heard, not everything sent.
                turn.close() if tokens is None else turn.cancel()
                return
            if not self.ended:
                # Not a cancelled reply: the caller is waiting. An apology when nothing was said yet, else close the
                # talk cycle so the words sent are spoken as a whole reply; never silence.
                if self._sent:
                    self._send(protocol.close_cycle())
                    self._quiet_after(self._sent, language=turn.result.language)  # (before the commit)
                else:
                    self._speak_canned("apology")
                turn.result.source = "apology"  # a failed turn: counted with the errors (metrics.summarize_turns)
            self._streaming = False
            self._notify_quiet()
            turn.close() if tokens is None else turn.cancel()  # an adopted turn is iterated by its pump
            self._commit(turn, heard=self._sent, interrupted=True)
            self._reply = None
            return
        self._streaming = False  # fully sent; a new prompt now waits for the commit instead of cancelling
        self._commit(turn, heard=None, interrupted=False)
        self._reply = None
        if turn.result.completed and turn.result.keys:
            log.info("relay_pressing_keys", digits=len(turn.result.keys))
            self._send(protocol.send_digits(turn.result.keys))  # a phone menu answered: press what it asked
        if not closing:
            self._quiet_after(self._sent, with_audio=audio_sent)
            self._notify_quiet()
            return
        # On a greenlet of its own: this reply's task ends with its commit (a barge-in waits for that, not playback).
        self.spawn(self._end_after_playback, announced, turn.result.reply_text, audio_sent, turn.result.language)

    @staticmethod
    def _closing_message(turn: Turn) -> dict:
        """The `end` a completed closing turn announced: end, or transfer with its destination."""
        r = turn.result
        if r.action == "end":
            return protocol.end("end", node=r.next_node)
        return protocol.end("transfer", destination=r.destination, node=r.next_node)

    def hand_over(self, deadline: float | None = None) -> None:
        """This worker is stopping (Render sends SIGTERM on every deploy; gunicorn then kills what is still running
        after GUNICORN_GRACEFUL_TIMEOUT, mid-sentence). So end the session at the next clean point, with `end`
        {"reason": "handover"}: once the reply in flight has been sent, committed and played, else at once. Twilio
        then asks the action URL, which lands on a running instance and reconnects the call from the store. The
        caller's new words are not answered here meanwhile: they are kept for the resumed session (_carry_over);
        a goodbye or transfer already under way ends the call as it would have. `deadline` (on `clock`): the
        `end` goes out by then, before the stopping worker is killed, even if the reply has not finished playing."""
        if self.ended or self._handing_over:
            return
        self._handing_over = True  # no new turn starts here (`_closing`)
        self._handover_deadline = deadline
        if self._reading_setup or (self.record is None and self._setup_unread is None):
            return  # no setup yet, or one being read (or an unknown call, ending anyway): it starts the wait itself
        self.spawn(self._hand_over_when_played)

    def _hand_over_when_played(self) -> None:
        if self.record is not None:  # its lines name the call (the SIGTERM's task has an empty log context)
            structlog.contextvars.bind_contextvars(tracking_id=self.record.tracking_id, call_sid=self.call_sid)
        reply = self._reply
        if reply is not None:
            reply.join(timeout=self._within_deadline(PLAYBACK_WAIT_MAX_S, self._handover_deadline))  # committed
        if self.ended or self._closing_turn is not None:
            return  # a goodbye or transfer is playing: its own `end` follows
        self._force_end(protocol.end(HANDOVER))  # the one `end` sent (an error ending already decided stays)
        log.info("relay_handing_over", agent_speaking=self._agent_speaking)
        # Twilio has played everything it was given (an "off" or an interrupt after our last words): at once (an "off"
        # that may have crossed them, once held); still speaking: its next "off"; never reported agentSpeaking: the
        # next event, or the bounded wait for what it was given (_wait_for_playback).
        # What Twilio may still be speaking: this socket's last reply, else (no turn yet) its welcome greeting.
        spoken = self._sent if self._turn is not None else (self._stored_cycle or "")
        with_audio = self._turn is not None and self._turn.result.entered_audio is not None  # a node's recording
        self._end_after_playback(protocol.end(HANDOVER), spoken, with_audio=with_audio,
                                 deadline=self._handover_deadline)

    def _words_going_out(self, recording: bool = False) -> None:
        """Words (or a `recording`) are about to be written: Twilio speaks them until it reports agentSpeaking off,
        so an "off" from before does not say they were heard (the wait for playback is re-armed). Before the write: an
        "off" read while it is under way counts (held while it may have crossed them: _crossing_hold_s). Twilio's
        "on" for words sent while it was silent measures the call's reaction time; not for a recording, which Twilio
        starts only once it has fetched it (its "on" is awaited, math.inf, and measures nothing)."""
        now = self.clock()
        if self._twilio_speaking is not True and self._on_awaited_at is None:
            self._on_awaited_at = math.inf if recording else now
        self._agent_speaking = True
        self._words_at = now
        self._speaker_seq += 1
        if not self.ended:
            self._fell_silent.clear()
            if self._cut_off_event is not None:
                self._cut_off_event.clear()

    def _crossing_hold_s(self) -> float:
        """How much longer the "off" that set _fell_silent is held because it may have crossed our last words on the
        wire (0: it counts now). An interrupt or a closed socket counts at once, as does an "off" that came once
        Twilio could have reported "on" for our last words (none came since: it is about them too)."""
        if self._off_at is None or self._words_at is None:
            return 0.0
        window = CROSSING_HOLD_MAX_S if self._reaction_s is None else min(
            CROSSING_HOLD_MAX_S, self._reaction_s + REACTION_GRACE_S)
        if self._off_at - self._words_at >= window:
            return 0.0
        return max(0.0, self._words_at + window - self.clock())

    def _wait_for_playback(self, bound: float) -> bool:
        """Until Twilio has played everything we sent: agentSpeaking off after our last words (held while it may have
        crossed them), an interrupt, or the socket closed. False when `bound` (seconds) ran out first; a hold is cut
        to what is left of it."""
        until = self.clock() + bound
        while not self.ended:
            left = max(0.0, until - self.clock())
            if not self._fell_silent.is_set():
                if not self._fell_silent.wait(timeout=left):
                    return False
                continue  # (re-read: an "on" or new words may have cleared it again)
            hold = self._crossing_hold_s()
            if hold <= 0:
                return True
            seq = self._speaker_seq
            if self._cut_off.wait(timeout=min(hold, left)):
                return True  # an interrupt or the socket closing: nothing of ours plays on (at once, as ever)
            if self._speaker_seq == seq:
                return True  # nothing new was reported or sent meanwhile: that "off" is about everything
            if hold >= left:
                return False
        return True

    def _within_deadline(self, wait_s: float, deadline: float | None) -> float:
        """`wait_s`, cut to what is left before `deadline` (on `clock`; None: no deadline)."""
        return wait_s if deadline is None else max(0.0, min(wait_s, deadline - self.clock()))

    def _send_text(self, chunk: str | None, close_cycle: bool = False) -> None:
        """One `text` frame of the current reply (nothing for an empty chunk). While it is written it is `_writing`:
        a barge-in taken meanwhile measures what was heard against it too, and a write that fails takes it back.
        `close_cycle`: the reply's last words, then the frame that closes its talk cycle, in one socket write (a
        write per turn less; the caller reads the same two frames)."""
        if not chunk:
            if close_cycle:
                self.sender.send_json(protocol.close_cycle())
            return
        self._writing = chunk
        if chunk.strip():
            self._words_going_out()  # Twilio speaks it, until it reports agentSpeaking off
        if close_cycle:
            self.sender.send_json(protocol.text(chunk), protocol.close_cycle())
        else:
            self.sender.send_json(protocol.text(chunk))
        self._sent, self._writing = self._sent + chunk, ""
        if self._timings["firstTokenMs"] is None:
            self._timings["firstTokenMs"] = elapsed_ms(self._timings["receivedAt"], self.clock())

    def _play_entered_audio(self, turn: Turn) -> bool:
        """Once the turn has moved into a node with a recording: play it before that node's words."""
        audio = turn.result.entered_audio
        if audio is None:
            return False
        log.info("relay_playing_node_audio", node=turn.result.next_node)
        self._words_going_out(recording=True)  # Twilio plays it, until it reports agentSpeaking off
        self.sender.send_json(protocol.play(audio.url, loop=1, interruptible=audio.interruptible))
        return True

    def _force_end(self, message: dict) -> None:
        """An ending the call did not choose (an error, a handover, silence): the first one decided stays."""
        if self._forced_end is None:
            self._forced_end = message

    def _end_soon(self, message: dict, spoken: str) -> None:
        """From the socket's greenlet, once `spoken` was sent: end after playback on another greenlet, so `info` can
        still be read. An ending for an error is never dropped by a barge-in (only a closing turn's end is)."""
        self._force_end(message)
        self.spawn(self._end_after_playback, message, spoken)

    def _end_after_playback(self, message: dict, spoken: str, with_audio: bool = False, language: str | None = None,
                            deadline: float | None = None) -> None:
        """Send `end` once Twilio has finished speaking `spoken` (in `language`, else the call's), the last words sent:
        Twilio closes the session at `end`, and anything still unspoken is lost. Waits for agentSpeaking off after
        those words (_wait_for_playback: re-armed by every word sent, so an "off" about earlier ones does not count,
        nor, for a while, one that may have crossed them), bounded by a slow speaking rate (by the longest wait when
        a recording of unknown length plays too); then, while a closing line could still be talked over, up to
        CLOSING_INTERRUPT_GRACE_S for an interrupt that drops its end.

        `deadline` (on `clock`, a handover's) cuts the wait for playback short.

        Whichever waiter wakes first sends the one `end`, and always the same one (`_pending_end`), so the reason
        Twilio gets and the log records never depend on which greenlet ran first."""
        bound = self._within_deadline(playback_wait_bound_s(spoken, chars_per_s=self._speech_rate(language),
                                                            with_audio=with_audio), deadline)
        started = self.clock()
        if not self._wait_for_playback(bound):
            log.warning("relay_playback_wait_timed_out", waited_s=bound, spoken_chars=len(spoken))
        if self._closing_turn is not None:
            self._barged_in.wait(timeout=CLOSING_INTERRUPT_GRACE_S)  # set at once when the interrupt came first
        pending = self._pending_end()
        if pending is None:
            log.info("relay_end_dropped", reason=json.loads(message["handoffData"]).get("reason"))
            return  # the caller talked over the closing line before its end (_drop_closing_action)
        if self.ended:
            # another waiter on the same playback (a goodbye's, an error ending's) took the one `end`, or the socket
            # closed (the caller hung up first: nothing is written on it)
            return
        self.ended, self._closing_turn = True, None  # before the write: a barge-in from here on changes nothing
        log.info("relay_ending", reason=json.loads(pending["handoffData"]).get("reason"),
                 waited_ms=elapsed_ms(started, self.clock()))
        self._send(pending)

    def _pending_end(self) -> dict | None:
        """The `end` that goes out once the closing line has played. A closing line's own end/transfer, which the
        caller heard announced, goes before an error ending decided while it played (it is always decided first:
        an error ending cancels a reply still streaming, and no reply starts once one is pending)."""
        return self._closing_end or self._forced_end

    def _language_message(self, code: str) -> dict[str, Any]:
        """Switch the voice; switch recognition too unless it is auto-detecting (`multi`)."""
        multi = bool(self.record and (self.record.meta or {}).get("multilingualStt"))
        return protocol.language(code, None if multi else code)

    def _cancel(self, interrupt: protocol.Interrupt | None = None) -> None:
        """Stop sending, close the LLM stream, keep only what was heard: what Twilio reports for a barge-in
        (`interrupt`), else everything sent.

        Cancellation is cooperative (a flag plus closing the provider's socket) so a frame being written is
        never cut in half; a greenlet that does not finish promptly is killed as a last resort. What was heard is
        measured after the reply's greenlet stopped: a frame in flight at the barge-in counts as sent.
        """
        task, turn = self._reply, self._turn
        self._streaming = False
        self._reply_stopped.set()
        if turn is not None:
            turn.cancel()
        if task is not None:
            task.join(timeout=1.0)
            if not task.dead:
                task.kill(timeout=1.0)  # raises GreenletExit in it, past its own clean-up of a closing line
        if turn is not None:
            self._stop_closing(turn)  # a closing line cut short announces nothing
        self._reply = None
        if turn is not None:
            if self._timings.get("lastTokenMs") is None and self._timings.get("firstTokenMs") is not None:
                self._timings["lastTokenMs"] = elapsed_ms(self._timings["receivedAt"], self.clock())
            self._sent, self._writing = self._sent + self._writing, ""  # a frame in flight counts as sent
            heard = self._sent if interrupt is None else self._heard(self._sent, interrupt, turn.result.language)
            self._commit(turn, heard=heard, interrupted=True)
            if interrupt is not None:
                self._stored_cycle = None  # Twilio already dropped that talk cycle: a later barge-in is not about it

    def _commit(self, turn: Turn, *, heard: str | None, interrupted: bool) -> None:
        if self._committed or self.record is None:
            return
        self._committed = True
        self._errors_in_a_row = 0
        self._stored_cycle = None
        timings = {k: v for k, v in self._timings.items() if k != "receivedAt"}
        speculation = speculation_row(self._adopted, self._dropped_this_turn, timings.get("firstTokenMs"))
        try:
            updated = self.engine.commit_turn(self.record, turn, path="optimized", timings=timings,
                                              heard_text=heard, interrupted=interrupted, speculation=speculation)
            if updated is not None:
                self.record = updated
                last = (updated.messages or [{}])[-1]
                self._stored_cycle = last["content"] if last.get("role") == "assistant" else None
        except Exception:
            log.exception("relay_commit_failed", tracking_id=self.record.tracking_id)
            if turn.result.language != self.record.language:
                # Twilio speaks the language the turn switched its voice to, whatever the store kept: the call goes
                # on in it (its apologies, its speaking rate, a switch back), as if the write had been made.
                self.record = dataclasses.replace(self.record, language=turn.result.language)

    def _canned(self, key: str) -> str:
        return self.engine.languages.get(self.record.language if self.record else None).line(key)

    def _speak_canned(self, key: str) -> None:
        self._stored_cycle = None  # a talk cycle of its own, not in the history
        self._words_going_out()
        line = self._canned(key)
        self._send(protocol.text(line, last=True))
        self._quiet_after(line)

    # ---- caller silence -------------------------------------------------------------------------
    def _quiet_after(self, spoken: str, with_audio: bool = False, language: str | None = None) -> None:
        """A talk cycle closed: the caller's silence counts from when `spoken` (after a node's recording:
        `with_audio`; in `language`, else the call's) has played. Twilio's agentSpeaking off says when (_on_info):
        while its last report is "on", nothing counts until its "off". Otherwise from the longest the whole of it
        may take to play; a report of "on" whose "off" does not come within that (and a margin) is taken as lost."""
        now = self.clock()
        playback_s = playback_wait_bound_s(spoken, chars_per_s=self._speech_rate(language), with_audio=with_audio,
                                           capped=False)
        # For its "on", reported or to come. Twilio still speaking an earlier cycle plays this one after it. A node's
        # recording has no known length: a report of "on" over it is trusted until its "off" (TimeLimit caps a lost
        # one), never cut short by an estimate.
        start = max(now, self._agent_on_until - AGENT_SPEAKING_MARGIN_S) if self._twilio_speaking else now
        self._agent_on_until = math.inf if with_audio else start + playback_s + AGENT_SPEAKING_MARGIN_S
        self._silence_from = now if self._twilio_speaking else now + playback_s

    def _notify_quiet(self) -> None:
        """From a reply's own task, once it has stopped streaming: the socket sets its alarm for the new deadline
        (only when there is one: with silence handling off a reply's end wakes nobody)."""
        if self.on_quiet is not None and self.silence_check_at() is not None:
            self.on_quiet()

    def _heard_caller(self, at: float) -> None:
        """Any caller input (speech, a partial transcript, a key, a barge-in): the silence starts again, once the
        caller has stopped talking (clientSpeaking off) if Twilio said they are, or has given no sign of talking
        for CLIENT_SPEAKING_MAX_S (that "off" was lost)."""
        self._silence_from, self._reprompted = at, False
        if self._client_speaking:
            self._client_on_until = at + CLIENT_SPEAKING_MAX_S

    def silence_due_at(self) -> float | None:
        """When the caller's silence is due to be handled (check_silence), on `clock`; None while it cannot be:
        before `setup`, while a reply streams or a typed entry is open, while a closing line or handover plays,
        while either side speaks (as Twilio last reported, within the bounds on a lost "off"), or with silence
        handling off."""
        due = self.silence_check_at()
        if due is None or self._reported_speaking():
            return None  # (either side's "off" starts the count again)
        return due

    def silence_check_at(self) -> float | None:
        """When the socket's alarm must next call check_silence, on `clock` (None: never, until something changes):
        when the silence is due, counting a speaker's "on" without its "off" as lost once its bound has passed."""
        if (self._silence_from is None or self.silence_timeout_s <= 0 or self.record is None or self.ended
                or self._streaming or self._closing or self._digits):
            return None
        start = self._silence_from
        if self._twilio_speaking:
            start = max(start, self._agent_on_until)
        if self._client_speaking:
            start = max(start, self._client_on_until)
        if start == math.inf:
            return None  # a recording Twilio still reports playing: nothing is due until its "off"
        return start + self.silence_timeout_s

    def _reported_speaking(self) -> bool:
        """Twilio's last report says a side is speaking, and that report is still within its bound."""
        now = self.clock()
        return bool((self._twilio_speaking and now < self._agent_on_until)
                    or (self._client_speaking and now < self._client_on_until))

    def check_silence(self) -> None:
        """Called by the socket's alarm: once the silence is due, ask "are you still there?" (the `reprompt`
        line); after a second silence as long, say goodbye and end the call (`end` reason "silence")."""
        due = self.silence_due_at()
        if due is None or self.clock() < due:
            return
        if self._twilio_speaking or self._client_speaking:
            # Its "off" never came (Twilio does not guarantee speaker events): from here on the state is unknown,
            # and the next talk cycle's silence counts from its playback estimate until Twilio reports again.
            log.warning("relay_speaker_off_presumed_lost", agent=bool(self._twilio_speaking),
                        caller=self._client_speaking)
            self._twilio_speaking, self._client_speaking = None, False
        if not self._reprompted:
            self._reprompted = True
            log.info("relay_silence_reprompt", silence_s=self.silence_timeout_s)
            self._speak_canned("reprompt")
            return
        log.info("relay_silence_ending", silence_s=self.silence_timeout_s)
        # The ending and its goodbye before the store write (it yields): a handover meanwhile ends with this ending,
        # once the goodbye has played.
        ending = protocol.end("silence")
        self._force_end(ending)
        self._speak_canned("goodbye")  # (its words re-arm the wait for playback: an off in the write below counts)
        try:
            self.engine.store.change_meta(self.record.tracking_id, end_reason_claimed(SILENCE_END))
        except Exception:  # the call ends anyway; the log says why
            log.exception("relay_end_reason_write_failed")
        self._end_soon(ending, self._canned("goodbye"))

    def _send(self, message: dict) -> None:
        try:
            self.sender.send_json(message)
        except ConnectionError:
            log.info("relay_send_after_close", message_type=message.get("type"))  # the caller already hung up
        except Exception:
            log.exception("relay_send_failed", message_type=message.get("type"))

    def close(self) -> None:
        """Socket gone: stop any reply; what was sent so far counts as heard."""
        self.ended = True  # first: a waiter released below (or a later hand_over) writes no `end` on a closed socket
        self._fell_silent.set()  # nobody is listening any more: stop waiting for playback
        if self._barged_in_event is not None:
            self._barged_in_event.set()  # nor for an interrupt
        if self._cut_off_event is not None:
            self._cut_off_event.set()  # nor for a hold
        self._digit_batch += 1
        self._partial_seq += 1
        self._settle_unanswered("hangup")
        if self._reply is not None and self._streaming:
            self._cancel()
        elif self._reply is not None:
            self._reply.join(timeout=5)
