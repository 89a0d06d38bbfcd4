"""Continuing a reply that broke mid-stream: the resuming request, and the seam so the caller never hears a repeat."""

from __future__ import annotations

import re

CONTINUE_INSTRUCTION = (
    "Your previous reply was cut off after the assistant text above, and the caller already heard it. "
    "Continue exactly where it stopped. Do not repeat anything already said; output only the rest of the reply."
)


def _normalised_word(word: str) -> str:
    return re.sub(r"[^\w]", "", word.lower())


class ContinuationJoiner:
    """Joins a continuation onto the already-spoken prefix so the caller never hears a repeat.

    Models asked to continue sometimes restart the reply or repeat its last words; this holds back the first
    words of the continuation until it is clear whether they repeat the end of the prefix, and drops the repeat.
    """

    MAX_HELD_CHARS = 400

    def __init__(self, spoken: str) -> None:
        self._spoken = spoken
        self._spoken_words = [_normalised_word(word) for word in spoken.split()]
        self._held = ""
        self._decided = False

    def feed(self, piece: str) -> str:
        """Returns the text that may be spoken now ("" while still deciding)."""
        if self._decided:
            return piece
        self._held += piece
        return self._decide(final=False)

    def finish(self) -> str:
        return "" if self._decided else self._decide(final=True)

    def _decide(self, final: bool) -> str:
        words = [(match.group(), match.end()) for match in re.finditer(r"\S+", self._held)]
        partial = ""
        if words and not final and not self._held[-1].isspace():
            partial = _normalised_word(words.pop()[0])
        if not words and not partial and not final:
            return ""  # only whitespace so far
        spoken_words = self._spoken_words
        confirmed_overlap_words = 0
        still_possible = False
        for start in range(len(spoken_words)):
            suffix = spoken_words[start:]
            compared = min(len(words), len(suffix))
            if any(_normalised_word(words[i][0]) != suffix[i] for i in range(compared)):
                continue
            if len(words) >= len(suffix):
                confirmed_overlap_words = len(suffix)
                break  # smallest start = longest overlap
            if partial and not suffix[len(words)].startswith(partial):
                continue
            still_possible = True
            break  # a longer overlap may still be forming: wait for more words
        if still_possible and not final and len(self._held) < self.MAX_HELD_CHARS:
            return ""
        self._decided = True
        rest = self._held
        if confirmed_overlap_words:
            rest = self._held[words[confirmed_overlap_words - 1][1]:]
        return self._seam(rest)

    def _seam(self, rest: str) -> str:
        # A fresh completion rarely starts with a space, while the cut almost always falls at a word end.
        if not rest or not self._spoken or self._spoken[-1].isspace() or rest[0].isspace() or rest[0] in ".,!?;:)'\"":
            return rest
        return " " + rest


def continuation_messages(messages: list[dict], spoken: str) -> list[dict]:
    """The request that resumes a reply which broke after `spoken` was already heard."""
    return [*messages, {"role": "assistant", "content": spoken}, {"role": "system", "content": CONTINUE_INSTRUCTION}]
