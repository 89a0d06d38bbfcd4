"""How the engine reads what a caller said: the one normaliser behind goodbye phrases and reply-cache keys.

Speech recognisers write the same words in several ways ("that's" / "thats" / "THAT’S", full-width forms,
punctuation they guess); everything that compares a caller's words goes through here, so a fix lands everywhere.
"""

from __future__ import annotations

import re
import unicodedata

# Marks that make a sentence a question: ASCII, CJK full-width, Arabic (also Persian and Urdu) and the Greek
# question mark U+037E. Unicode folds U+037E into the ASCII semicolon (NFC and NFKC alike), so Greek transcripts
# usually carry ";": see `ends_as_question`. The one definition of a question for the whole engine (a goodbye asked as
# a question is none, a question ends the caller's sentence).
QUESTION_MARKS = "?\uff1f\u061f\u037e"
# Marks that end a sentence: Latin, CJK full-width, Arabic, Urdu, Devanagari, and every question mark. One definition
# for both directions: the caller's transcript (have they finished?) and the reply text (where a sentence can be
# spoken).
SENTENCE_END_MARKS = ".!\u3002\uff01\u06d4\u0964" + QUESTION_MARKS
# Marks that end a clause inside a sentence (a pause, not an ending): Latin, CJK full-width, Arabic.
CLAUSE_MARKS = ",;:\u3001\uff0c\uff1b\uff1a\u060c"

# Apostrophes join a word ("don't" == "dont"); every other punctuation mark or symbol separates words.
APOSTROPHES = frozenset("'\u2019\u2018`\u00b4\u02bc\uff07")
# Scripts written without spaces between words, so matching and filler removal work by character there.
_CJK_RANGES = (
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x3FFFF),  # CJK Extensions B and later
)
_CJK_FIRST = min(low for low, _ in _CJK_RANGES)


# Traditional Chinese characters and their Simplified forms: a recogniser (and a caller) may write Cantonese or Mandarin
# in either script, or mix them, and a goodbye is a goodbye in both. Covers the table's Chinese goodbye phrases and
# the characters common around them; the reply cache keys keep the scripts apart (replies differ by language).
_TRADITIONAL_SIMPLIFIED_PAIRS = (
    "見见 謝谢 這这 樣样 沒没 問问 題题 該该 係系 別别 掛挂 們们 個个 會会 還还 說说 話话 電电 聽听 時时 對对 來来 後后 幫帮 "
    "點点 邊边 嗎吗 麼么 給给 為为 裡里 裏里 開开 關关 東东 長长 門门 幾几 號号 機机 經经 歡欢 煩烦 聯联 繫系 絡络 兒儿 請请 "
    "緊紧 無无 預预 約约 醫医 診诊"
)
_TO_SIMPLIFIED = {ord(pair[0]): pair[1] for pair in _TRADITIONAL_SIMPLIFIED_PAIRS.split()}


def fold_chinese_script(text: str) -> str:
    """`text` with Traditional Chinese characters written in their Simplified form, for comparing Chinese speech."""
    return text.translate(_TO_SIMPLIFIED)


def fold(text: str) -> str:
    """NFKC (full-width forms to ASCII) and casefold: the comparison form of any text."""
    return unicodedata.normalize("NFKC", text or "").casefold()


class _WordCharacters(dict):
    """Code point → what `speech_words` keeps of it: None (an apostrophe: dropped), a space (punctuation, symbols,
    separators, controls: a word break) or the character. Filled in advance for the first code points (Latin and
    its accents, the usual text); any other character is looked up each time, so the table never grows."""

    def __missing__(self, code: int) -> str | None:
        char = chr(code)
        if char in APOSTROPHES:
            return None
        return " " if unicodedata.category(char)[0] in "PSZC" else char


_WORD_CHARACTERS = _WordCharacters()
_WORD_CHARACTERS.update({code: _WORD_CHARACTERS[code] for code in range(0x250)})


def speech_words(text: str) -> list[str]:
    """Folded words: apostrophes removed, other punctuation, symbols and spaces (ASCII, CJK, emoji) as breaks."""
    return fold(text).translate(_WORD_CHARACTERS).split()


def normalise_speech(text: str) -> str:
    """The words of `text` joined by single spaces."""
    return " ".join(speech_words(text))


def is_cjk(char: str) -> bool:
    """True for a character of a script written without spaces (Chinese, Japanese kana) or Hangul."""
    code = ord(char)
    # Most text is below the first range (Latin, Cyrillic, Arabic, Devanagari...): one comparison decides it.
    return code >= _CJK_FIRST and any(low <= code <= high for low, high in _CJK_RANGES)


def is_thai(char: str) -> bool:
    """True for a character of the Thai script, which is written without spaces between words too."""
    return "\u0e00" <= char <= "\u0e7f"


def _is_greek(char: str) -> bool:
    return "\u0370" <= char <= "\u03ff" or "\u1f00" <= char <= "\u1fff"


def ends_as_question(text: str) -> bool:
    """Whether `text` ends with a question mark (QUESTION_MARKS), or, written in Greek, with ";" (the Greek question
    mark as Unicode normalises it)."""
    stripped = (text or "").rstrip()
    if stripped.endswith(tuple(QUESTION_MARKS)):
        return True
    if not stripped.endswith(";"):
        return False
    before = stripped.rstrip(";").rstrip()
    return bool(before) and _is_greek(before[-1])


# A call switches its language only for an utterance with this much to go on: one short word ("No.", "OK", "Si"),
# even said twice ("No, no.", "Sí, sí", はいはい), is recognised in the wrong language too often. Different words where
# a script spaces them; different characters where it does not (Chinese, Japanese, Thai: 好的 is two, ありがとう five).
MIN_WORDS_TO_SWITCH = 2
MIN_UNSPACED_CHARS_TO_SWITCH = 3


def long_enough_to_switch(text: str) -> bool:
    """Whether an utterance says enough to tell its language: at least MIN_WORDS_TO_SWITCH different words, or at
    least MIN_UNSPACED_CHARS_TO_SWITCH different characters of a script written without spaces."""
    words = set(speech_words(text))
    if len(words) >= MIN_WORDS_TO_SWITCH:
        return True
    unspaced = {char for word in words for char in word if is_cjk(char) or is_thai(char)}
    return len(unspaced) >= MIN_UNSPACED_CHARS_TO_SWITCH


# A turn's model text stops at this many UTF-8 bytes (about two minutes of speech, in any script): a runaway model
# (a flow without maxTokens) would otherwise talk for minutes, grow every later request, and overflow one <Say>
# (Polly speaks at most 3,000 bytes, Twilio warning 13521). The turn cuts there (conversation.py); a reply's start
# held until its first word (providers.py) is no longer than that either.
MAX_TURN_REPLY_BYTES = 2000
SSML_TAG = re.compile(r"<[^<>]*>")
_OPEN_TAG_AT_END = re.compile(r"<[^<>]*$")


# An SSML pause with a written length (<break time="1.5s"/>, "300ms"): Twilio's voice stays silent that long, at most
# 10 s for one break (Amazon Polly's limit for a pause; a longer one is counted as 10 s). A break given only a strength
# has no written length and is not counted.
_SSML_BREAK_TIME = re.compile(r"""<break\b[^<>]*?\btime\s*=\s*["']\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s)\s*["']""",
                              re.IGNORECASE)
MAX_SSML_BREAK_S = 10.0


def ssml_pause_s(text: str) -> float:
    """Seconds of silence the SSML breaks written in `text` add to its playback (each capped at 10 s, as in SSML)."""
    total = 0.0
    for value, unit in _SSML_BREAK_TIME.findall(text):
        seconds = float(value) / (1000.0 if unit.lower() == "ms" else 1.0)
        total += min(seconds, MAX_SSML_BREAK_S)
    return total


def has_words(text: str) -> bool:
    """Whether `text` says anything aloud: not only whitespace and SSML tags (a lone <break/> is silence)."""
    return bool(SSML_TAG.sub("", text).strip())


def begins_speech(text: str) -> bool:
    """Whether the start of a streamed reply says a word already: `has_words`, with a tag still being streamed at its
    end (`<break`, not yet closed) counted as a tag, not as words."""
    return has_words(_OPEN_TAG_AT_END.sub("", text))
