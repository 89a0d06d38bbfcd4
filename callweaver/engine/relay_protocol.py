"""ConversationRelay messages as small typed classes: what Twilio sends us, what we send Twilio, in one place.

In (docs/twilio.md): `setup`, `prompt`, `interrupt`, `dtmf`, `info`, `error`; `parse` turns a frame into one of
them, and a frame that is not a message becomes one logged error and None — never an exception for the socket.
Out: `text`, `language`, `sendDigits`, `play`, `end`; `serialise` gives the JSON object Twilio reads. The
inbound `info` names are the ones `debug="speaker-events"` produces.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import orjson
import structlog

from . import valid_json

log = structlog.get_logger()

# What the TwiML `debug` attribute asks for: agentSpeaking on/off tells us when a closing line has played, and
# clientSpeaking on/off when the caller starts and stops talking (preemptive generation starts a turn on "off").
DEBUG_EVENTS = "speaker-events"
AGENT_SPEAKING = "agentSpeaking"
CLIENT_SPEAKING = "clientSpeaking"
SEND_DIGITS = re.compile(r"^[0-9w#*]{1,64}$")
MAX_LOGGED_ERROR_CHARS = 200


# ---- in: Twilio → CallWeaver ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """The session opened: who called whom, and the <Parameter>s of our TwiML (`custom_parameters`)."""

    call_sid: str | None
    custom_parameters: Mapping[str, Any]
    details: Mapping[str, Any]  # every other field of the frame (from, to, direction, callerName...)


@dataclass(frozen=True)
class Prompt:
    """What the caller said; `last` False marks an interim transcript (partialPrompts)."""

    voice_prompt: str
    last: bool = True
    lang: str | None = None


@dataclass(frozen=True)
class Interrupt:
    """Barge-in: Twilio stopped speaking; `utterance_until_interrupt` is what the caller heard of the reply."""

    utterance_until_interrupt: str | None = None
    duration_until_interrupt_ms: float | None = None


@dataclass(frozen=True)
class Dtmf:
    """One keypad press."""

    digit: str


@dataclass(frozen=True)
class Info:
    """A debug event (`debug="speaker-events"`): agentSpeaking / clientSpeaking on or off."""

    name: str | None
    value: str | None

    @property
    def agent_fell_silent(self) -> bool:
        """Twilio finished speaking everything it was given."""
        return self.agent_speaking is False

    @property
    def client_speaking(self) -> bool | None:
        """clientSpeaking: True when the caller started talking ("on"), False when they stopped ("off"), None for
        any other event. Documented shape: `{"type": "info", "name": "clientSpeaking", "value": "on" | "off"}`."""
        return self._on_off(CLIENT_SPEAKING)

    @property
    def agent_speaking(self) -> bool | None:
        """agentSpeaking: True when Twilio started speaking what we sent ("on"), False when it fell silent ("off"),
        None for any other event."""
        return self._on_off(AGENT_SPEAKING)

    def _on_off(self, name: str) -> bool | None:
        if self.name != name:
            return None
        value = str(self.value).lower()
        return True if value == "on" else False if value == "off" else None


@dataclass(frozen=True)
class Error:
    """Twilio refused something we sent (the description carries its error code)."""

    description: str


Inbound = Union[Setup, Prompt, Interrupt, Dtmf, Info, Error]


def parse(raw: str | bytes) -> Inbound | None:
    """The message in a frame, or None after logging why the frame is not one (never raises)."""
    try:
        frame = valid_json.loads(raw)  # every string valid Unicode (a lone surrogate becomes U+FFFD)
        if not isinstance(frame, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
        log.error("relay_bad_message", error=str(exc)[:MAX_LOGGED_ERROR_CHARS], size=len(raw or ""))
        return None
    kind = frame.get("type")
    reader = _READERS.get(kind) if isinstance(kind, str) else None
    if reader is None:
        log.warning("relay_unknown_message", message_type=str(kind)[:40])
        return None
    return reader(frame)


def _setup(frame: dict) -> Setup:
    params = frame.get("customParameters")
    call_sid = frame.get("callSid")
    # Any non-empty callSid is kept as text, so a malformed one is seen (and refused), never silently dropped.
    return Setup(call_sid=str(call_sid) if call_sid not in (None, "") else None,
                 custom_parameters=dict(params) if isinstance(params, dict) else {},
                 details={k: v for k, v in frame.items() if k not in ("type", "callSid", "customParameters")})


def _prompt(frame: dict) -> Prompt:
    text = frame.get("voicePrompt")
    lang = frame.get("lang")
    return Prompt(voice_prompt=text if isinstance(text, str) else "", last=frame.get("last") is not False,
                  lang=lang if isinstance(lang, str) and lang else None)


def _interrupt(frame: dict) -> Interrupt:
    heard = frame.get("utteranceUntilInterrupt")
    played = frame.get("durationUntilInterruptMs")
    return Interrupt(utterance_until_interrupt=heard if isinstance(heard, str) else None,
                     duration_until_interrupt_ms=played if isinstance(played, (int, float))
                     and not isinstance(played, bool) else None)


def _dtmf(frame: dict) -> Dtmf:
    return Dtmf(digit=str(frame.get("digit", ""))[:1])


def _info(frame: dict) -> Info:
    name, value = frame.get("name"), frame.get("value")
    return Info(name=None if name is None else str(name), value=None if value is None else str(value))


def _error(frame: dict) -> Error:
    return Error(description=str(frame.get("description")))


_READERS = {"setup": _setup, "prompt": _prompt, "interrupt": _interrupt, "dtmf": _dtmf, "info": _info,
            "error": _error}


# ---- out: CallWeaver → Twilio --------------------------------------------------------------------------

@dataclass(frozen=True)
class Text:
    """One text token; `last=True` closes the talk cycle (Twilio speaks what it holds and waits)."""

    token: str
    last: bool = False
    interruptible: bool | None = None
    preemptible: bool | None = None


@dataclass(frozen=True)
class Language:
    """Switch the active voice and/or recognition language; both must be declared in the TwiML."""

    tts: str | None
    transcription: str | None


@dataclass(frozen=True)
class End:
    """End the session; Twilio posts `handoffData` to the <Connect action> URL."""

    reason: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SendDigits:
    """Press keys on the far end (0-9, *, #, and w for a half-second pause)."""

    digits: str

    def __post_init__(self) -> None:
        if not SEND_DIGITS.match(self.digits):
            raise ValueError("digits may only use 0-9, *, # and w")


@dataclass(frozen=True)
class Play:
    """Play an audio file by URL in the talk cycle."""

    source: str
    loop: int = 1
    interruptible: bool | None = None


Outbound = Union[Text, Language, End, SendDigits, Play]


def serialise(message: Outbound) -> dict[str, Any]:
    """The JSON object Twilio reads for a message, with the documented field names; unset options left out."""
    if isinstance(message, Text):
        frame: dict[str, Any] = {"type": "text", "token": message.token, "last": message.last}
        _set_if_given(frame, interruptible=message.interruptible, preemptible=message.preemptible)
        return frame
    if isinstance(message, Language):
        frame = {"type": "language"}
        if message.tts:
            frame["ttsLanguage"] = message.tts
        if message.transcription:
            frame["transcriptionLanguage"] = message.transcription
        return frame
    if isinstance(message, End):
        return {"type": "end", "handoffData": json.dumps({"reason": message.reason, **message.data})}
    if isinstance(message, SendDigits):
        return {"type": "sendDigits", "digits": message.digits}
    if isinstance(message, Play):
        frame = {"type": "play", "source": message.source, "loop": message.loop}
        _set_if_given(frame, interruptible=message.interruptible)
        return frame
    raise TypeError(f"not a ConversationRelay message: {type(message).__name__}")


def _set_if_given(frame: dict[str, Any], **options: bool | None) -> None:
    frame.update({name: value for name, value in options.items() if value is not None})


# ---- the frames the relay session sends, by name (as JSON objects, or as whole WebSocket frames) ---------------------------------------------------------

def text(token: str, *, last: bool = False, interruptible: bool | None = None,
         preemptible: bool | None = None) -> dict[str, Any]:
    if interruptible is None and preemptible is None:
        return {"type": "text", "token": token, "last": last}  # serialise(Text(token, last)): one per frame sent
    return serialise(Text(token, last, interruptible, preemptible))


def close_cycle() -> dict[str, Any]:
    """The empty final token that closes a talk cycle."""
    return serialise(Text("", last=True))


def language(tts: str | None, transcription: str | None) -> dict[str, Any]:
    return serialise(Language(tts, transcription))


def end(reason: str, **data: Any) -> dict[str, Any]:
    return serialise(End(reason, data))


def send_digits(digits: str) -> dict[str, Any]:
    return serialise(SendDigits(digits))


def play(source: str, *, loop: int = 1, interruptible: bool | None = None) -> dict[str, Any]:
    return serialise(Play(source, loop, interruptible))


def frame(message: dict[str, Any]) -> bytes:
    """The message as one whole, unmasked RFC 6455 text frame (server to client), JSON encoded once with orjson.

    Sent as is, it skips the WebSocket library's per-message state machine; a frame without RSV1 is valid with or
    without permessage-deflate, and every message CallWeaver sends takes this path, so no compressor state exists.
    """
    return text_frame(orjson.dumps(message))


def text_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload
