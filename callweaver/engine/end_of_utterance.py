"""Does an interim transcript look like the end of what the caller wants to say? And how long to wait to know.

Preemptive generation starts the LLM on an interim transcript once it has stopped changing for a while. A fixed
window has to be longer than the caller's pauses between words, or it fires in the middle of every sentence.
Two signals make the wait fit the caller instead:

* the words: a transcript that ends in a word that practically never ends a turn (an article, a preposition, a
  conjunction, a possessive, a contraction such as "I'm", a filler such as "um") or in a comma or colon is not
  the end yet, so the wait after it is long (`PREEMPTIVE_INCOMPLETE_MS`); one that ends in `.`, `?` or `!`
  (a recogniser that punctuates) is the end, so the turn starts at once. The word lists are short and
  conservative, written only for the languages listed in CONTINUATION_WORDS; any other language gets the
  plain window (`PREEMPTIVE_STABLE_MS`), never a guess.
* the caller's own cadence in this call (`SpeechCadence`): how long they have gone quiet after a
  complete-looking word and then kept talking. The wait after a complete-looking transcript is that pause
  (its 90th percentile) plus a margin (`PREEMPTIVE_CADENCE_MARGIN_MS`), so a fast talker is answered sooner
  and a slow one is not interrupted by speculations between words. LiveKit's dynamic endpointing adapts its
  delay to the pauses of the conversation in the same way; its turn-detector model plays the part of the
  word lists (we download no model).

Neither signal changes what is answered: a wrong guess costs one discarded LLM request (capped per turn by
`PREEMPTIVE_MAX_SPECULATIONS`) or a later start, never a wrong reply.
"""
from __future__ import annotations

import unicodedata
from collections import deque
from enum import Enum

from .languages import normalise_code, primary_subtag
from .metrics import nearest_rank
from .speech import APOSTROPHES, CLAUSE_MARKS, SENTENCE_END_MARKS, ends_as_question, fold

SENTENCE_MARKS = tuple(SENTENCE_END_MARKS)
# The caller is mid-sentence: trailing off, a clause mark, a dash, or a sentence just opened (Spanish "¿", "¡").
TRAILING_OFF = ("...", "\u2026", "-", "\u2013", "\u2014", "\u00bf", "\u00a1", *CLAUSE_MARKS)

# Words after which a turn practically never ends, by language (ISO 639-1, the part before "-" in `lang`).
# Only words that cannot close a sentence in ordinary speech: no verbs, no pronouns that can be objects, no
# particles of phrasal / separable verbs ("log in", "kommst du mit"), no "so"/"though"/"you".
CONTINUATION_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset("""
        a an the my your our their its
        of to for with from into onto near about than via
        and or but nor because if unless whether although while
        i i'm i'd i'll i've you're we're they're it's that's there's what's where's let's
        um uh erm er hmm
    """.split()),
    "es": frozenset("""
        el la los las un una unos unas mi mis tu tus su sus nuestro nuestra nuestros nuestras
        de del al con por para sin sobre entre hacia hasta desde
        y e o u pero porque aunque que
        eh este em
    """.split()),
    "fr": frozenset("""
        le la les l' un une des du de d' au aux mon ma mes ton ta tes son sa ses notre nos votre vos leurs
        à avec pour sans sur sous dans chez par vers entre
        et ou mais que qu' parce lorsque quand je j'
        euh hum
    """.split()),
    "de": frozenset("""
        ein eine einen einem einer den dem des
        mein meine meinen meinem meiner dein deine deinen deinem unser unsere unseren unserem
        für von bei zum zur ohne gegen wegen
        und oder aber weil dass wenn ob
        äh ähm
    """.split()),
    "pt": frozenset("""
        o a os as um uma uns umas do da dos das no na nas ao à
        de em com para por pelo pela sem entre até
        e ou mas que
        hum eh
    """.split()),
    "it": frozenset("""
        il un uno una un' del della dei delle degli al alla ai alle
        di a da con per tra fra
        e o ma che
        ehm eh
    """.split()),
}


class Completeness(Enum):
    SENTENCE_END = "sentence_end"   # ends in . ? ! : start now
    COMPLETE = "complete"           # ends in a word that can end a turn (the caller's cadence decides)
    INCOMPLETE = "incomplete"       # ends in a continuation word or a comma: the caller is mid-sentence
    UNKNOWN = "unknown"             # no word list for this language: the plain window


def language_of(lang: str | None) -> str:
    """"en-US" → "en"; "" for none."""
    return primary_subtag(normalise_code(lang or ""))


def last_word(text: str) -> str:
    """The last word, folded, apostrophes written as "'" (so "I'd" stays apart from "ID"), edge marks removed."""
    words = fold(text).split()
    if not words:
        return ""
    word = "".join("'" if char in APOSTROPHES else char for char in words[-1])
    start, end = 0, len(word)
    while start < end and _is_mark(word[start]):
        start += 1
    while end > start and _is_mark(word[end - 1]) and word[end - 1] != "'":
        end -= 1
    return word[start:end]


def _is_mark(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


def completeness(text: str, lang: str | None) -> Completeness:
    """How the transcript ends: a sentence mark, a continuation word, another word, or a language we do not know."""
    stripped = text.rstrip()
    if ends_as_question(stripped):  # before the clause marks: a Greek question ends with ";"
        return Completeness.SENTENCE_END
    if stripped.endswith(TRAILING_OFF):
        return Completeness.INCOMPLETE
    if stripped.endswith(SENTENCE_MARKS):
        return Completeness.SENTENCE_END
    words = CONTINUATION_WORDS.get(language_of(lang))
    if words is None:
        return Completeness.UNKNOWN
    word = last_word(stripped)
    if word in words:
        return Completeness.INCOMPLETE
    return Completeness.COMPLETE


class SpeechCadence:
    """One caller's pauses in one call: how long they went quiet after a complete-looking transcript and then went
    on speaking. Only such pauses are kept (the pause before a final transcript is never one: it ended the turn)."""

    KEPT = 20              # the most recent pauses: a caller's pace changes during a call
    MIN_SAMPLES = 3        # fewer than this: nothing is known yet, the plain window applies
    MAX_PAUSE_S = 3.0      # a longer silence that went on is a thinking pause, not the caller's pace
    PERCENTILE = 90

    def __init__(self) -> None:
        self._pauses: deque[float] = deque(maxlen=self.KEPT)
        self._last: tuple[float, str, Completeness] | None = None  # (heard at, text, how it ended)

    def heard(self, at: float, text: str, how: Completeness) -> None:
        """An interim transcript; the same words again are not a new word."""
        if self._last is not None:
            last_at, last_text, last_how = self._last
            if text == last_text:
                return
            if last_how is Completeness.COMPLETE and 0 <= at - last_at <= self.MAX_PAUSE_S:
                self._pauses.append(at - last_at)
        self._last = (at, text, how)

    def turn_ended(self) -> None:
        """A final transcript (or none coming): the next interim transcript starts a new utterance."""
        self._last = None

    def usual_pause_s(self) -> float | None:
        """The caller's longest usual pause inside a sentence (90th percentile), or None while too few are known."""
        if len(self._pauses) < self.MIN_SAMPLES:
            return None
        return nearest_rank(list(self._pauses), self.PERCENTILE)
