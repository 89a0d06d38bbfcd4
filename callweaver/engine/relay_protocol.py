"""ConversationRelay messages CallWeaver sends, built in one place with the documented field names.

See docs/twilio.md: `text` (token, last, lang, interruptible, preemptible), `play`, `sendDigits`,
`language` and `end`. Inbound `info` names are the ones `debug="speaker-events"` produces.
"""
from __future__ import annotations

import json
import re
from typing import Any

import orjson

# What the TwiML `debug` attribute asks for: agentSpeaking on/off tells us when a closing line has played.
DEBUG_EVENTS = "speaker-events"
AGENT_SPEAKING = "agentSpeaking"
SEND_DIGITS = re.compile(r"^[0-9w#*]{1,64}$")


def text(token: str, *, last: bool = False, interruptible: bool | None = None,
         preemptible: bool | None = None) -> dict[str, Any]:
    """One text token; `last=True` closes the talk cycle (Twilio speaks what it holds and waits)."""
    message: dict[str, Any] = {"type": "text", "token": token, "last": last}
    if interruptible is not None:
        message["interruptible"] = interruptible
    if preemptible is not None:
        message["preemptible"] = preemptible
    return message


def close_cycle() -> dict[str, Any]:
    """The empty final token that closes a talk cycle."""
    return text("", last=True)


def language(tts: str | None, transcription: str | None) -> dict[str, Any]:
    """Switch the active voice and/or recognition language; both must be declared in the TwiML."""
    message: dict[str, Any] = {"type": "language"}
    if tts:
        message["ttsLanguage"] = tts
    if transcription:
        message["transcriptionLanguage"] = transcription
    return message


def end(reason: str, **data: Any) -> dict[str, Any]:
    """End the session; Twilio posts `handoffData` to the <Connect action> URL."""
    return {"type": "end", "handoffData": json.dumps({"reason": reason, **data})}


def send_digits(digits: str) -> dict[str, Any]:
    """Press keys on the far end (0-9, *, #, and w for a half-second pause)."""
    if not SEND_DIGITS.match(digits):
        raise ValueError("digits may only use 0-9, *, # and w")
    return {"type": "sendDigits", "digits": digits}


def play(source: str, *, loop: int = 1, interruptible: bool | None = None) -> dict[str, Any]:
    """Play an audio file by URL in the talk cycle."""
    message: dict[str, Any] = {"type": "play", "source": source, "loop": loop}
    if interruptible is not None:
        message["interruptible"] = interruptible
    return message


def agent_fell_silent(message: dict) -> bool:
    """An `info` event saying Twilio finished speaking everything it was given."""
    return message.get("name") == AGENT_SPEAKING and str(message.get("value")).lower() == "off"


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
