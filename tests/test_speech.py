"""The one speech normaliser: goodbye phrases and reply-cache keys read a caller's words the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from callweaver.engine import speech
from callweaver.engine.cache import normalize_utterance
from callweaver.engine.workflow import detect_termination

ENGINE = Path(speech.__file__).parent


def test_only_the_speech_module_lists_apostrophes_and_cjk_ranges():
    for source in ENGINE.rglob("*.py"):
        if source.name == "speech.py":
            continue
        text = source.read_text(encoding="utf-8")
        assert "\u2019\u02bc" not in text and "\\u2019" not in text, source
        assert "0x4E00" not in text.upper().replace("0X", "0x"), source


def test_termination_and_cache_keys_agree_on_the_words_of_an_utterance():
    for said, phrase in (("OK, THAT\u2019S ALL", "thats all"), ("\uff34hat\uff07s all", "that's all"),
                         ("\u3067\u306f\u3001\u3055\u3088\u3046\u306a\u3089", "\u3055\u3088\u3046\u306a\u3089")):
        assert detect_termination(said, [phrase])
        assert normalize_utterance(said).endswith(normalize_utterance(phrase))


def test_speech_words_reads_every_character_as_the_unicode_categories_say():
    """The lookup table behind speech_words gives, for any character, what its Unicode category says: apostrophes
    dropped, punctuation, symbols, separators and controls a break, anything else part of a word."""
    import unicodedata

    from callweaver.engine.speech import APOSTROPHES, fold, speech_words

    def by_category(text: str) -> list[str]:
        return "".join("" if c in APOSTROPHES else " " if unicodedata.category(c)[0] in "PSZC" else c
                       for c in fold(text)).split()

    samples = [chr(code) for code in range(0x3100) if not 0xD800 <= code <= 0xDFFF]
    samples += ["你好，我想問", "don't ＴＨＡＴ’S", "🙂 ok 👍", "\u3000full\u3000width", "a\u200bb", "x\U00020000y"]
    for start in range(0, len(samples), 50):
        text = "a".join(samples[start:start + 50])
        assert speech_words(text) == by_category(text)


def test_ssml_pauses_count_their_written_time_in_seconds_or_milliseconds_each_at_most_ten_seconds():
    assert speech.ssml_pause_s("Hello.") == 0.0
    assert speech.ssml_pause_s('One <break time="1.5s"/> two <break time=\'300ms\' /> three') == 1.8
    assert speech.ssml_pause_s('<BREAK TIME="2S"/>') == 2.0
    assert speech.ssml_pause_s('<break time="25s"/><break time="12000ms"/>') == 20.0  # (SSML's own cap: 10 s each)
    assert speech.ssml_pause_s('<break strength="strong"/><break time="soon"/><break time="-3s"/>') == 0.0


def test_a_closing_lines_playback_bound_counts_its_ssml_pauses():
    """A goodbye with a written pause takes that much longer to play: its `end` must wait for it too."""
    from callweaver.engine.relay_session import playback_wait_bound_s

    plain = playback_wait_bound_s("Thank you. Goodbye.", chars_per_s=15.0, capped=False)
    paused = playback_wait_bound_s('Thank you.<break time="3s"/> Goodbye.', chars_per_s=15.0, capped=False)
    assert paused - plain == pytest.approx(3.0)
