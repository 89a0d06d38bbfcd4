"""How a reply's text is cut into `text` frames, and when its stream is read: the reply's first token at once; then
the following tokens coalesced into one frame per clause (or per `hold_s`); once the first sentence is out and the
caller has plenty of speech queued, the stream is read in batches (one pause of up to `MAX_PAUSE_FACTOR` × `hold_s`,
then pauses of `hold_s`) instead of waking for every token.

Why this does not change what the caller hears: the first audio is the critical path, and it starts with the
reply's first sentence. The reply's first token goes out the moment it is read (the first-token latency Twilio sees
does not move). Twilio synthesises speech per sentence (docs/twilio.md, "TTS latency is measured per sentence"), so
a clause that is still incomplete cannot be spoken anyway: holding its words until the clause ends costs nothing,
and a token that ends a clause or a sentence is never held — it leaves with the words before it the moment it is
read. So the first sentence's end reaches Twilio exactly when it did with one frame per token (issue 12u), with
fewer socket writes before it. After the first sentence, the LLM writes far faster than a voice speaks (~50
tokens/s against ~3 words/s): while the text already sent takes longer to speak than `PACE_LEAD_FACTOR` ×
`hold_s` beyond now (counted at a fast speaking rate, from when the first sentence was sent), reading the rest
later by as much as still leaves `PACE_LEAD_FACTOR - 1` hold periods of it queued after the pause leaves no gap
in the audio. Each frame saved is a socket write less, and each batch read is a wake-up of the worker less. The
first pause is the long one: a typical reply's words after its first sentence arrive within a few hundred ms (tens
of tokens at ~50 per s), so one pause of up to `MAX_PAUSE_FACTOR` × `hold_s` reads most or all of them in one
wake-up. A stream that outlasts it is read `hold_s` apart from then on, so a reply's end that arrives just after a
pause (its last words, the stream's closing events, then the frame with `last: true`) waits one short pause at
most. The first sentence's tokens are still each read as they arrive: reading them later would read its end late.

The frames' texts concatenated are byte for byte the tokens concatenated (spaces kept, nothing trimmed, nothing
reordered). Held text is not sent until it is returned here: a barge-in or cancellation drops it, so what was
sent (and is stored as heard) never includes it. There is no timer: the time bound is checked when a token is
read (a timer would cost the CPU this saves).
"""
from __future__ import annotations

import re

from .speech import CLAUSE_MARKS, SENTENCE_END_MARKS

# Where written text pauses besides its sentence marks: an ellipsis and a line break.
_TEXT_PAUSES = "\u2026\n"
# Ends a sentence (speech can start there) / ends a clause or a sentence (a frame can be sent there).
SENTENCE_END = re.compile(f"[{re.escape(SENTENCE_END_MARKS + _TEXT_PAUSES)}]")
CLAUSE_END = re.compile(f"[{re.escape(SENTENCE_END_MARKS + CLAUSE_MARKS + _TEXT_PAUSES)}]")
# Faster than any voice speaks (~15 characters/s is usual): the queued speech is never overestimated.
FAST_SPEECH_CHARS_PER_S = 25.0
# Batched reads only while the speech already sent outlasts now by this many hold periods; a pause leaves at least
# PACE_LEAD_FACTOR - 1 of them queued; the first one lasts at most MAX_PAUSE_FACTOR hold periods, later ones one.
PACE_LEAD_FACTOR = 4.0
MAX_PAUSE_FACTOR = 4.0
# A read that returned sooner than this found the token already buffered (it never waited for the network).
WAITED_S = 0.002


class ReplyText:
    """One reply's text on its way to Twilio; `hold_s` 0 sends one frame per token and reads every token at once."""

    __slots__ = ("hold_s", "_coalescing", "_held", "_held_since", "_speaking_from", "_chars_sent", "_batch", "_waited",
                 "_paused")

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._coalescing = False  # set once the reply's first token is out (with hold_s > 0)
        self._held: list[str] = []
        self._held_since = 0.0
        self._speaking_from: float | None = None  # when the first sentence was sent: the earliest audio can play
        self._chars_sent = 0
        self._batch = False  # reading what arrived during a pause
        self._waited = False  # the last token read waited for the network (the stream is slower than we are)
        self._paused = False  # a pause was taken: later ones last `hold_s`

    def add(self, token: str, now: float, waited: bool = True) -> str | None:
        """The text to send now for a new non-empty token (it may carry held tokens before it), or None: held.

        `waited`: reading this token waited for the network (False: it was already buffered, more may be)."""
        self._waited = waited
        if not self._coalescing:
            self._coalescing = self.hold_s > 0  # the first token at once; later ones wait for their clause's end
            return self._sent(token, now)
        if not self._held:
            self._held_since = now
        self._held.append(token)
        if self._batch:
            if not waited:
                return None  # more of what arrived during the pause is probably buffered: read it first
            self._batch = False  # the batch is read; this token came from the network
            return self._sent(self._take(), now)
        if now - self._held_since >= self.hold_s or CLAUSE_END.search(token):
            return self._sent(self._take(), now)
        return None

    def take(self, now: float) -> str:
        """Everything held, now (the reply ended, or something else must follow its words); "" when nothing is."""
        self._batch = False
        return self._sent(self._take(), now) if self._held else ""

    def pause_s(self, now: float) -> float:
        """How long to wait before reading on after a frame, while the caller has enough speech queued and the
        stream is slower than we are (a cached reply, all in memory, is never paused): the first pause as long as
        leaves `PACE_LEAD_FACTOR - 1` hold periods of speech queued, at most `MAX_PAUSE_FACTOR` × `hold_s`; later
        ones `hold_s`. Each pause is one wake-up that reads everything the pause let arrive."""
        if self._speaking_from is None or self._held or self.hold_s <= 0 or not self._waited:
            return 0.0
        queued_s = self._speaking_from + self._chars_sent / FAST_SPEECH_CHARS_PER_S - now
        if queued_s < PACE_LEAD_FACTOR * self.hold_s:
            return 0.0
        self._batch = True
        longest_s = self.hold_s if self._paused else MAX_PAUSE_FACTOR * self.hold_s
        self._paused = True
        return min(queued_s - (PACE_LEAD_FACTOR - 1.0) * self.hold_s, longest_s)

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def _take(self) -> str:
        text = "".join(self._held)
        self._held.clear()
        return text

    def _sent(self, text: str, now: float) -> str:
        self._chars_sent += len(text)
        if self._speaking_from is None and SENTENCE_END.search(text):
            self._speaking_from = now
        return text
