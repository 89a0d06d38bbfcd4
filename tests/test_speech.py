"""The one speech normaliser: goodbye phrases and reply-cache keys read a caller's words the same way."""

from __future__ import annotations

from pathlib import Path

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
