"""Twilio's side of a ConversationRelay session, as documented: what it accepts, refuses and reports.

The scripted caller runs every message CallWeaver sends through `TwilioRelayModel.receive`, which answers
the way Twilio does: an `error` message for a malformed message or a language that was never declared
(the message is dropped, the session goes on), and — when the TwiML asked for `debug` speaker events —
`info` messages from a playback model that speaks text at a fixed rate, so a test can tell whether a
closing line was heard to the end before `end` arrived, and `clientSpeaking` on/off around the caller's speech.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

# Twilio's documented error for a message that fails validation (the session continues).
INVALID_MESSAGE_ERROR = 64107
SEND_DIGITS = re.compile(r"^[0-9w#*]+$")
OUTBOUND_TYPES = ("text", "play", "sendDigits", "language", "end")


@dataclass
class Playback:
    """Twilio's speaker: plays text tokens one after another at `rate_cps` characters per second."""

    rate_cps: float
    clock: Callable[[], float] = time.monotonic
    speaking: bool = False
    started_at: float = 0.0                       # when the current stretch of speech began
    queue_end: float = 0.0                        # when everything queued so far will have been spoken
    pending: list[tuple[float, str]] = field(default_factory=list)  # (finish time, token) not yet played
    heard: str = ""                               # every token played to the end, in order
    cycle_heard: str = ""                         # what was played of the current talk cycle

    def enqueue(self, token: str) -> bool:
        """Queue a token; True when this starts speech from silence (Twilio reports agentSpeaking on)."""
        now = self.clock()
        self.advance()
        started = not self.speaking
        begin = max(now, self.queue_end)
        if started:
            self.started_at = begin
        self.queue_end = begin + len(token) / self.rate_cps
        self.pending.append((self.queue_end, token))
        self.speaking = True
        return started

    def advance(self) -> bool:
        """Move finished tokens to `heard`; True when speech just fell silent (agentSpeaking off)."""
        now = self.clock()
        while self.pending and self.pending[0][0] <= now:
            token = self.pending.pop(0)[1]
            self.heard += token
            self.cycle_heard += token
        if self.speaking and not self.pending:
            self.speaking = False
            return True
        return False

    def next_event_at(self) -> float | None:
        return self.queue_end if self.speaking else None

    def stop(self) -> str:
        """Playback cut (barge-in or the session closing): what was left unspoken."""
        self.advance()
        unheard = "".join(token for _, token in self.pending)
        self.pending.clear()
        self.speaking = False
        self.queue_end = self.clock()
        return unheard

    def played_ms(self) -> int:
        return int(max(0.0, self.clock() - self.started_at) * 1000)


@dataclass
class TwilioRelayModel:
    """Validates CallWeaver's messages against the TwiML it returned, and tracks the active languages."""

    declared: set[str]
    tts_language: str
    transcription_language: str
    speaker_events: bool
    playback: Playback
    errors: list[dict] = field(default_factory=list)          # every error sent back to CallWeaver
    language_switches: list[dict] = field(default_factory=list)
    digits_sent: list[str] = field(default_factory=list)      # sendDigits the callee's line received
    played_audio: list[str] = field(default_factory=list)     # play sources
    cycle_open: bool = False

    @classmethod
    def from_twiml(cls, attributes: dict[str, str], language_codes: list[str], rate_cps: float,
                   clock: Callable[[], float] = time.monotonic) -> "TwilioRelayModel":
        base = attributes.get("language", "en-US")
        tts = attributes.get("ttsLanguage", base)
        stt = attributes.get("transcriptionLanguage", base)
        debug = (attributes.get("debug") or "").split()
        return cls(declared={base, tts, *language_codes}, tts_language=tts, transcription_language=stt,
                   speaker_events="speaker-events" in debug, playback=Playback(rate_cps, clock))

    def _error(self, description: str) -> dict:
        error = {"type": "error", "description": f"Error {INVALID_MESSAGE_ERROR}: {description}"}
        self.errors.append(error)
        return error

    def receive(self, message: object) -> tuple[bool, list[dict]]:
        """Apply one message from CallWeaver: (accepted, messages Twilio sends back because of it)."""
        if not isinstance(message, dict) or message.get("type") not in OUTBOUND_TYPES:
            kind = message.get("type") if isinstance(message, dict) else type(message).__name__
            return False, [self._error(f"unknown message type {kind!r}")]
        problem = getattr(self, "_check_" + message["type"])(message)
        if problem:
            return False, [self._error(problem)]
        replies: list[dict] = []
        kind = message["type"]
        if kind == "text":
            if message.get("lang") and message["lang"] not in self.declared and message["lang"] != "multi":
                return False, [self._error(f"text lang {message['lang']} is not a configured language")]
            if not self.cycle_open:
                self.cycle_open = True
                self.playback.cycle_heard = ""
            if message["token"] and self.playback.enqueue(message["token"]) and self.speaker_events:
                replies.append({"type": "info", "name": "agentSpeaking", "value": "on"})
            if message.get("last"):
                self.cycle_open = False
        elif kind == "language":
            if message.get("ttsLanguage"):
                self.tts_language = message["ttsLanguage"]
            if message.get("transcriptionLanguage"):
                self.transcription_language = message["transcriptionLanguage"]
            self.language_switches.append(message)
        elif kind == "sendDigits":
            self.digits_sent.append(message["digits"])
        elif kind == "play":
            self.played_audio.append(message["source"])
        return True, replies

    def client_speaking(self, speaking: bool) -> list[dict]:
        """What Twilio reports when its voice activity detection hears the caller start ("on") or stop ("off")
        talking, with speaker events on: `{"type": "info", "name": "clientSpeaking", "value": "on" | "off"}`
        (the documented `info` shape). That "off" comes before the final transcript is Twilio's Voice Insights
        description of `end_of_customer_speech` ("transcription will be sent to your application"); how long
        before it is not documented, so the caller's VAD hangover is a setting."""
        if not self.speaker_events:
            return []
        return [{"type": "info", "name": "clientSpeaking", "value": "on" if speaking else "off"}]

    def tick(self) -> list[dict]:
        """Time passed: speech that finished produces agentSpeaking off (when speaker events are on)."""
        if self.playback.advance() and self.speaker_events:
            return [{"type": "info", "name": "agentSpeaking", "value": "off"}]
        return []

    # ---- per-type validation (None = valid) ------------------------------------------------------
    @staticmethod
    def _check_bools(message: dict, *names: str) -> str | None:
        for name in names:
            if name in message and not isinstance(message[name], bool):
                return f"{message['type']}.{name} must be a boolean"
        return None

    def _check_text(self, message: dict) -> str | None:
        if not isinstance(message.get("token"), str):
            return "text.token is required and must be a string"
        if "lang" in message and not isinstance(message["lang"], str):
            return "text.lang must be a string"
        return self._check_bools(message, "last", "interruptible", "preemptible")

    def _check_play(self, message: dict) -> str | None:
        if not isinstance(message.get("source"), str) or not message["source"].startswith(("http://", "https://")):
            return "play.source must be an http(s) URL"
        if "loop" in message and (not isinstance(message["loop"], int) or message["loop"] < 0):
            return "play.loop must be a non-negative integer"
        return self._check_bools(message, "interruptible", "preemptible")

    def _check_sendDigits(self, message: dict) -> str | None:  # noqa: N802 - named after the message type
        digits = message.get("digits")
        if not isinstance(digits, str) or not SEND_DIGITS.match(digits):
            return "sendDigits.digits must use only 0-9, w, # and *"
        return None

    def _check_language(self, message: dict) -> str | None:
        tts, stt = message.get("ttsLanguage"), message.get("transcriptionLanguage")
        if not tts and not stt:
            return "language needs ttsLanguage or transcriptionLanguage"
        for label, code in (("ttsLanguage", tts), ("transcriptionLanguage", stt)):
            if code and code not in self.declared and not (label == "transcriptionLanguage" and code == "multi"):
                return f"{label} {code} is not a configured language: declare it in <Language>"
        return None

    def _check_end(self, message: dict) -> str | None:
        if "handoffData" in message and not isinstance(message["handoffData"], str):
            return "end.handoffData must be a string"
        return None
