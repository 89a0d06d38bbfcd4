"""How a reply's text is cut into `text` frames: every token at once until the reply's first clause or sentence
ends, then the following tokens coalesced into one frame per clause (or per `hold_s`, whichever comes first).

Why this does not change what the caller hears: the first audio is the critical path, and it starts with the
reply's first clause, which goes out token by token exactly as before. After it, the LLM writes far faster than a
voice speaks (~50 tokens/s against ~3 words/s), and Twilio synthesises speech per sentence (docs/twilio.md,
"TTS latency is measured per sentence"), so a clause that is still incomplete cannot be spoken anyway: holding its
words until the clause ends costs the caller nothing, while every frame saved is one socket write less for the
worker. A token that ends a clause or a sentence is never held: it leaves with the words before it the moment it
arrives, so no sentence reaches Twilio later than before. The time bound is checked when a token arrives (there
is no timer: one would cost the CPU this saves); it caps how many words one frame carries when tokens come fast.

The frames' texts concatenated are byte for byte the tokens concatenated (spaces kept, nothing trimmed, nothing
reordered). Held text is not sent until it is returned here: a barge-in or cancellation drops it, so what was
sent (and is stored as heard) never includes it.
"""
from __future__ import annotations

import re

# Ends a clause or a sentence: Latin, CJK (full-width), Arabic, Urdu and Devanagari punctuation, and line breaks.
CLAUSE_END = re.compile(r"[.!?,;:\u2026\n\u3002\uff01\uff1f\uff0c\uff1b\uff1a\u3001\u061f\u060c\u06d4\u0964]")


class ReplyText:
    """One reply's text on its way to Twilio; `hold_s` 0 sends one frame per token (the old behaviour)."""

    __slots__ = ("hold_s", "_coalescing", "_held", "_held_since")

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._coalescing = False  # set once the first clause or sentence has ended
        self._held: list[str] = []
        self._held_since = 0.0

    def add(self, token: str, now: float) -> str | None:
        """The text to send now for a new non-empty token (it may carry held tokens before it), or None: held."""
        if not self._coalescing:
            if self.hold_s > 0 and CLAUSE_END.search(token):
                self._coalescing = True
            return token
        if not self._held:
            self._held_since = now
        self._held.append(token)
        if now - self._held_since >= self.hold_s or CLAUSE_END.search(token):
            return self.take()
        return None

    def take(self) -> str:
        """Everything held, now (the reply ended, or something else must follow its words); "" when nothing is."""
        if not self._held:
            return ""
        text = "".join(self._held)
        self._held.clear()
        return text

    @property
    def holding(self) -> bool:
        return bool(self._held)
