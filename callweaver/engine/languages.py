"""Language table: per-language voices, speech models, canned lines and Cantonese settings, loaded from languages.json."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

DEFAULT_CODE = "en-US"
DEFAULT_TABLE_PATH = Path(__file__).with_name("languages.json")

LINE_KEYS: tuple[str, ...] = (
    "apology",           # every LLM provider failed this turn
    "reprompt",          # caller silent
    "listening",         # caller asked us to wait / said "hold on"
    "goodbye",           # engine-initiated end of call
    "oneMoment",         # filler while a slow action runs
    "resumed",           # relay reconnected after a lost socket
    "callEnded",         # closing line when a relay session ends
    "fallbackGreeting",  # workflow has no greeting of its own
)
RELAY_KEYS: tuple[str, ...] = ("language", "ttsProvider", "voice", "transcriptionProvider", "speechModel")
MIN_TERMINATION_PHRASES = 4
MAX_TERMINATION_PHRASES = 10
MIN_PREWARM_UTTERANCES = 3

# --- Allowed provider combinations, as data -----------------------------------------------------
# Twilio's published ConversationRelay voice and provider lists, with their sources and date, live in
# relay_voice_lists.json; the table may only name what is listed there.
VOICE_LISTS_PATH = Path(__file__).with_name("relay_voice_lists.json")
VOICE_LISTS: Mapping[str, Any] = json.loads(VOICE_LISTS_PATH.read_text(encoding="utf-8"))
_DEEPGRAM = VOICE_LISTS["stt"]["Deepgram"]

# Deepgram keys by primary subtag, except where it distinguishes regions or scripts (Chinese, Flemish,
# Swiss German); see deepgram_language_key().
DEEPGRAM_NOVA3_LANGUAGES: frozenset[str] = frozenset(_DEEPGRAM["models"]["nova-3-general"])
# Deepgram nova-2: used only where nova-3 does not cover the language (Danish, Swedish).
DEEPGRAM_NOVA2_LANGUAGES: frozenset[str] = frozenset(_DEEPGRAM["models"]["nova-2-general"])
# Codes Deepgram keys by full tag rather than by primary subtag.
_DEEPGRAM_FULL_CODE_KEYS = frozenset({"zh-CN", "zh-TW", "zh-HK", "nl-BE", "de-CH"})
_DEEPGRAM_PRIMARY_ALIASES = {"nb": "no", "nn": "no"}

ALLOWED_STT: dict[str, frozenset[str]] = {
    provider: frozenset(listing["models"]) for provider, listing in VOICE_LISTS["stt"].items()
}

# Google voice names are <locale>-<Type>-<X>; the locale is Google's, which differs from the call's
# BCP-47 code for Chinese and Arabic (Cantonese speaks through yue-HK voices on a zh-HK call).
GOOGLE_TTS_LOCALE_BY_CODE: dict[str, str] = {
    "zh-CN": "cmn-CN", "zh-TW": "cmn-TW", "zh-HK": "yue-HK", "ar-SA": "ar-XA",
}
GOOGLE_CHIRP3_HD_VOICE_NAMES: frozenset[str] = frozenset(VOICE_LISTS["tts"]["Google"]["chirp3HdVoiceNames"])

# Amazon Polly neural voices by Polly locale; Polly files Cantonese under yue-CN.
AMAZON_TTS_LOCALE_BY_CODE: dict[str, str] = {"zh-CN": "cmn-CN", "zh-HK": "yue-CN", "ar-SA": "ar-AE"}
# ElevenLabs Flash/Turbo v2.5 languages (primary subtags). Cantonese is not among them.
ELEVENLABS_EXCLUDED_CODES: frozenset[str] = frozenset(VOICE_LISTS["tts"]["ElevenLabs"]["excludedCodes"])

ALLOWED_TTS: dict[str, Any] = {
    # Google: Google locale -> voice types that exist there.
    "Google": {locale: frozenset(types)
               for locale, types in VOICE_LISTS["tts"]["Google"]["voiceTypesByLocale"].items()},
    # Amazon: Polly locale -> neural voice names (used as "<Name>-Neural").
    "Amazon": {locale: frozenset(names)
               for locale, names in VOICE_LISTS["tts"]["Amazon"]["neuralVoicesByLocale"].items()},
    # ElevenLabs: voice ids are language-agnostic; the language must be one the model speaks.
    "ElevenLabs": frozenset(VOICE_LISTS["tts"]["ElevenLabs"]["languages"]),
}

_BCP47 = re.compile(r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-([A-Z]{2}|[0-9]{3}))?$")
_GOOGLE_VOICE = re.compile(
    r"^(?P<locale>[a-z]{2,3}-[A-Z]{2})-(?P<type>Standard|Wavenet|Neural2|Journey|Chirp3-HD|Chirp-HD|Studio|News|Polyglot)"
    r"-(?P<variant>[A-Za-z]+)$"
)
_AMAZON_VOICE = re.compile(r"^(?P<name>[A-Z][a-z]+)-Neural$")
_ELEVENLABS_VOICE = re.compile(r"^[A-Za-z0-9]{20}(-[A-Za-z0-9_.\-]+)?$")
# Speech-recognition codes a <Gather> may use for each call language, by primary subtag.
_SPEECH_PRIMARIES_BY_CODE = {
    "zh-CN": {"cmn", "zh"}, "zh-TW": {"cmn", "zh"}, "zh-HK": {"yue"},
    "nb-NO": {"nb", "no"}, "he-IL": {"he", "iw"}, "fil-PH": {"fil", "tl"},
}


# A typical text-to-speech speaking rate in characters a second: turns playback time into text heard (a barge-in's
# durationUntilInterruptMs, heard_of) and text into playback time (the wait before a closing line's `end`). A
# "character" is what those count: a code point, spaces, punctuation and combining marks included. Voices speak
# about 5-7 syllables a second in every language; what differs is how many characters a script spends on one.
SPEECH_CHARS_PER_S = 15.0  # Latin alphabet, ≈ 150 words a minute of ~6 characters with the space
# alphabets with spaces between words: Latin (Vietnamese too, a syllable a word), Cyrillic, Greek
_LATIN_SPACED = SPEECH_CHARS_PER_S
_ABJAD = 12.0              # Arabic, Hebrew: short vowels are not written, so fewer letters a syllable
_INDIC_ABUGIDA = 13.0      # Devanagari, Bengali, Gujarati, Tamil, Telugu, Kannada, Malayalam: a syllable is a consonant
#                            plus a vowel sign or virama (~2 code points), words spaced
_THAI = 14.0               # Thai: an abugida with no spaces between words; vowel signs and tone marks are code points
#                            of their own (~2.5 a syllable)
_HANGUL = 8.0              # Korean: a Hangul block is one syllable (~6.5 a second), words spaced every ~3 blocks
_HAN = 5.0                 # Chinese (Mandarin, Cantonese): one syllable a character, ~4-5 a second plus pauses
_JAPANESE = 5.0            # kanji (often 2 morae) mixed with kana (1 mora), ~7-8 morae a second
# By primary subtag: every language of the table has its own (entry_problems says when one is missing).
SPEECH_CHARS_PER_S_BY_LANGUAGE: Mapping[str, float] = {
    **dict.fromkeys("en es fr de it pt nl sv da nb no fi is pl cs sk hu ro et lv lt ca af tr id ms fil tl vi hr sl "
                    "ru uk bg sr el".split(), _LATIN_SPACED),
    **dict.fromkeys("ar he iw".split(), _ABJAD),
    **dict.fromkeys("hi mr bn gu ta te kn ml".split(), _INDIC_ABUGIDA),
    "th": _THAI, "ko": _HANGUL, "ja": _JAPANESE,
    **dict.fromkeys("zh cmn yue".split(), _HAN),
}


def primary_subtag(code: str) -> str:
    """The language part of a BCP-47 tag ("zh" for "zh-HK")."""
    return code.split("-", 1)[0]


def google_tts_locale(code: str) -> str:
    """Google's locale for a call language; voice names must start with it."""
    return GOOGLE_TTS_LOCALE_BY_CODE.get(code, code)


def amazon_tts_locale(code: str) -> str:
    """Polly's locale for a call language (Polly files Cantonese under yue-CN)."""
    return AMAZON_TTS_LOCALE_BY_CODE.get(code, code)


def deepgram_language_key(code: str) -> str:
    """The key Deepgram's language lists use for a call language."""
    if code in _DEEPGRAM_FULL_CODE_KEYS:
        return code
    primary = primary_subtag(code)
    return _DEEPGRAM_PRIMARY_ALIASES.get(primary, primary)


def preferred_stt(code: str) -> tuple[str, str]:
    """(transcriptionProvider, speechModel) by twilio.md's rule: nova-3, else nova-2, else Google telephony."""
    key = deepgram_language_key(code)
    if key in DEEPGRAM_NOVA3_LANGUAGES:
        return "Deepgram", "nova-3-general"
    if key in DEEPGRAM_NOVA2_LANGUAGES:
        return "Deepgram", "nova-2-general"
    return "Google", "telephony"


@dataclass(frozen=True)
class LanguageEntry:
    """Everything a call needs for one language: relay voice/STT, <Say>/<Gather>, LLM steer, canned lines."""

    code: str
    name: str
    native_name: str
    relay: dict
    say_voice: str
    say_language: str
    gather_language: str
    llm_instruction: str
    termination_phrases: tuple[str, ...]
    fillers: tuple[str, ...]
    prewarm_utterances: tuple[str, ...]
    lines: dict[str, str]
    # en-US lines, so a line missing here is still spoken rather than silence.
    fallback_lines: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __hash__(self) -> int:
        return hash(self.code)

    @property
    def speech_chars_per_s(self) -> float:
        """This language's typical speaking rate (SPEECH_CHARS_PER_S_BY_LANGUAGE; the Latin rate if it has none)."""
        return SPEECH_CHARS_PER_S_BY_LANGUAGE.get(primary_subtag(self.code), SPEECH_CHARS_PER_S)

    def line(self, key: str) -> str:
        """A canned line in this language, or the en-US line when this entry lacks it."""
        text = self.lines.get(key) or self.fallback_lines.get(key)
        if not text:
            raise KeyError(f"no canned line {key!r} for {self.code} or {DEFAULT_CODE}")
        return text

    def relay_kwargs(self) -> dict:
        """Keyword arguments for twilio's Connect.conversation_relay() (snake_case)."""
        return {
            "language": self.relay["language"],
            "tts_provider": self.relay["ttsProvider"],
            "voice": self.relay["voice"],
            "transcription_provider": self.relay["transcriptionProvider"],
            "speech_model": self.relay["speechModel"],
        }

    def language_element_kwargs(self) -> dict:
        """Keyword arguments for ConversationRelay.language(), to pre-declare this language for a switch."""
        kwargs = self.relay_kwargs()
        kwargs["code"] = kwargs.pop("language")
        return kwargs

    @classmethod
    def from_json(cls, data: Mapping[str, Any], fallback_lines: Mapping[str, str] | None = None) -> "LanguageEntry":
        """Build an entry from one languages.json object; a missing key is a ValueError naming the code."""
        code = data.get("code", "?") if isinstance(data, Mapping) else "?"
        try:
            return cls(
                code=data["code"],
                name=data["name"],
                native_name=data["nativeName"],
                relay=dict(data["relay"]),
                say_voice=data["say"]["voice"],
                say_language=data["say"]["language"],
                gather_language=data["gather"]["language"],
                llm_instruction=data["llmInstruction"],
                termination_phrases=tuple(data["terminationPhrases"]),
                fillers=tuple(data["fillers"]),
                prewarm_utterances=tuple(data["prewarmUtterances"]),
                lines=dict(data["lines"]),
                fallback_lines=dict(fallback_lines or {}),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"language entry {code}: missing or malformed field {e}") from e


def _tts_problems(provider: str, voice: str, code: str) -> list[str]:
    if provider == "Google":
        match = _GOOGLE_VOICE.match(voice or "")
        if not match:
            return [f"relay voice {voice!r} is not a Google <locale>-<Type>-<X> voice name"]
        return _google_voice_problems(match, code, "relay voice")
    if provider == "Amazon":
        match = _AMAZON_VOICE.match(voice or "")
        locale = amazon_tts_locale(code)
        if not match:
            return [f"relay voice {voice!r} is not an Amazon <Name>-Neural voice"]
        if match["name"] not in ALLOWED_TTS["Amazon"].get(locale, ()):
            return [f"Amazon voice {match['name']} is not a neural voice for {locale}"]
        return []
    if provider == "ElevenLabs":
        problems = []
        if not _ELEVENLABS_VOICE.match(voice or ""):
            problems.append(f"relay voice {voice!r} is not an ElevenLabs voice id")
        primary = primary_subtag(code)
        if code in ELEVENLABS_EXCLUDED_CODES or primary not in ALLOWED_TTS["ElevenLabs"]:
            problems.append(f"ElevenLabs does not speak {code}")
        return problems
    return [f"ttsProvider {provider!r} is not one of {sorted(ALLOWED_TTS)}"]


def _google_voice_problems(match: re.Match, code: str, what: str) -> list[str]:
    problems = []
    expected_locale = google_tts_locale(code)
    locale, voice_type, variant = match["locale"], match["type"], match["variant"]
    if locale != expected_locale:
        problems.append(f"{what} locale {locale} does not speak {code} (expected {expected_locale})")
    allowed_types = ALLOWED_TTS["Google"].get(locale, frozenset())
    if voice_type not in allowed_types:
        problems.append(f"{what}: Google has no {voice_type} voices for {locale}")
    if voice_type == "Chirp3-HD":
        if variant not in GOOGLE_CHIRP3_HD_VOICE_NAMES:
            problems.append(f"{what}: {variant} is not a Chirp3-HD voice name")
    elif not re.fullmatch(r"[A-Z]", variant):
        problems.append(f"{what}: {voice_type} voices are lettered A-Z, not {variant!r}")
    return problems


def _stt_problems(provider: str, model: str, code: str) -> list[str]:
    if provider not in ALLOWED_STT:
        return [f"transcriptionProvider {provider!r} is not one of {sorted(ALLOWED_STT)}"]
    if model not in ALLOWED_STT[provider]:
        return [f"speechModel {model!r} is not valid for {provider} (allowed: {sorted(ALLOWED_STT[provider])})"]
    key = deepgram_language_key(code)
    if model == "nova-3-general" and key not in DEEPGRAM_NOVA3_LANGUAGES:
        return [f"Deepgram nova-3 does not support {code}"]
    if model == "nova-2-general" and key not in DEEPGRAM_NOVA2_LANGUAGES:
        return [f"Deepgram nova-2 does not support {code}"]
    preferred = preferred_stt(code)
    if (provider, model) != preferred:
        return [f"{code} should use {preferred[0]} {preferred[1]}, not {provider} {model}"]
    return []


def _say_problems(entry: LanguageEntry) -> list[str]:
    voice, language = entry.say_voice or "", entry.say_language or ""
    if voice.startswith("Google."):
        match = _GOOGLE_VOICE.match(voice[len("Google."):])
        if not match:
            return [f"say voice {voice!r} is not Google.<locale>-<Type>-<X>"]
        problems = _google_voice_problems(match, entry.code, "say voice")
        if language != match["locale"]:
            problems.append(f"say language {language!r} must match the voice locale {match['locale']}")
        return problems
    if voice.startswith("Polly."):
        match = _AMAZON_VOICE.match(voice[len("Polly."):])
        locale = amazon_tts_locale(entry.code)
        if not match:
            return [f"say voice {voice!r} is not Polly.<Name>-Neural"]
        problems = []
        if match["name"] not in ALLOWED_TTS["Amazon"].get(locale, ()):
            problems.append(f"Polly voice {match['name']} is not a neural voice for {locale}")
        if language != locale:
            problems.append(f"say language {language!r} must match the Polly locale {locale}")
        return problems
    return [f"say voice {voice!r} is neither Google.* nor Polly.*"]


def _gather_problems(entry: LanguageEntry) -> list[str]:
    language = entry.gather_language or ""
    if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{2,4})*", language):
        return [f"gather language {language!r} is not a BCP-47 tag"]
    allowed = _SPEECH_PRIMARIES_BY_CODE.get(entry.code, {primary_subtag(entry.code)})
    if primary_subtag(language) not in allowed:
        return [f"gather language {language} does not recognise {entry.code} (expected one of {sorted(allowed)})"]
    return []


def _text_problems(entry: LanguageEntry) -> list[str]:
    problems = []
    for label, value in (("name", entry.name), ("nativeName", entry.native_name), ("llmInstruction", entry.llm_instruction)):
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{label} is empty")
    phrases = entry.termination_phrases
    if not MIN_TERMINATION_PHRASES <= len(phrases) <= MAX_TERMINATION_PHRASES:
        problems.append(f"{len(phrases)} termination phrases (need {MIN_TERMINATION_PHRASES}-{MAX_TERMINATION_PHRASES})")
    if any(not isinstance(p, str) or not p.strip() for p in phrases):
        problems.append("a termination phrase is empty")
    elif len({p.casefold() for p in phrases}) != len(phrases):
        problems.append("termination phrases repeat")
    if not entry.fillers or any(not isinstance(f, str) or not f.strip() for f in entry.fillers):
        problems.append("fillers are missing or empty")
    if len(entry.prewarm_utterances) < MIN_PREWARM_UTTERANCES or any(
        not isinstance(u, str) or not u.strip() for u in entry.prewarm_utterances
    ):
        problems.append(f"need at least {MIN_PREWARM_UTTERANCES} non-empty prewarm utterances")
    for key in LINE_KEYS:
        text = entry.lines.get(key)
        if not isinstance(text, str) or not text.strip():
            problems.append(f"line {key!r} is missing")
    return problems


def entry_problems(entry: LanguageEntry) -> list[str]:
    """Every way this entry would fail on a call: invalid provider/voice/model pairs and missing fields.

    Twilio drops the call on an invalid provider/voice or provider/model pair (twilio.md §1), so the
    table is checked as data rather than discovered on a live call.
    """
    problems: list[str] = []
    if not _BCP47.match(entry.code or ""):
        problems.append(f"code {entry.code!r} is not a BCP-47 language-REGION tag")
    missing = [key for key in RELAY_KEYS if not entry.relay.get(key)]
    if missing:
        problems.append(f"relay is missing {', '.join(missing)}")
    else:
        if entry.relay["language"] != entry.code:
            problems.append(f"relay language {entry.relay['language']!r} differs from code {entry.code!r}")
        problems += _tts_problems(entry.relay["ttsProvider"], entry.relay["voice"], entry.code)
        problems += _stt_problems(entry.relay["transcriptionProvider"], entry.relay["speechModel"], entry.code)
    if primary_subtag(entry.code or "") not in SPEECH_CHARS_PER_S_BY_LANGUAGE:
        problems.append(f"no speaking rate for {entry.code} in SPEECH_CHARS_PER_S_BY_LANGUAGE (barge-in estimates)")
    problems += _say_problems(entry)
    problems += _gather_problems(entry)
    problems += _text_problems(entry)
    return problems


MAX_REMEMBERED_CODES = 512  # resolve() remembers this many distinct codes per table
# A language tag as normalise_code() writes it: a 2-3 letter language, then subtags of 1-8 letters or digits.
_WELL_FORMED_TAG = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{1,8})*$")


def normalise_code(code: str) -> str:
    """The one spelling of a language code every lookup compares: "EN_us " is "en-us"."""
    return code.strip().replace("_", "-").lower()


class LanguageTable:
    """The loaded language table with alias-aware lookup; build once (per worker) and share."""

    def __init__(
        self,
        entries: list[LanguageEntry],
        aliases: Mapping[str, str] | None = None,
        primary_defaults: Mapping[str, str] | None = None,
        default_code: str = DEFAULT_CODE,
    ) -> None:
        self._entries = list(entries)
        self._by_key: dict[str, LanguageEntry] = {}
        for entry in self._entries:
            key = normalise_code(entry.code)
            if key in self._by_key:
                raise ValueError(f"language {entry.code} appears twice")
            self._by_key[key] = entry
        if normalise_code(default_code) not in self._by_key:
            raise ValueError(f"default language {default_code} is not in the table")
        self._default = self._by_key[normalise_code(default_code)]
        self._aliases = {normalise_code(a): self._target(t, f"alias {a}") for a, t in (aliases or {}).items()}
        # A bare primary subtag ("fr") means the first entry of that language unless the data says otherwise.
        self._by_primary: dict[str, LanguageEntry] = {}
        for entry in self._entries:
            self._by_primary.setdefault(normalise_code(primary_subtag(entry.code)), entry)
        for primary, target in (primary_defaults or {}).items():
            self._by_primary[normalise_code(primary)] = self._target(target, f"primary default {primary}")
        self._resolved: dict[str, LanguageEntry | None] = {}  # resolve()'s answers (the table never changes)

    def _target(self, code: str, what: str) -> LanguageEntry:
        entry = self._by_key.get(normalise_code(code))
        if entry is None:
            raise ValueError(f"{what} points at {code}, which is not in the table")
        return entry

    @classmethod
    def load(cls, path: str | Path | None = None) -> "LanguageTable":
        """Parse languages.json (the packaged one by default); callers keep the returned table."""
        source = Path(path) if path is not None else DEFAULT_TABLE_PATH
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LanguageTable":
        """Build a table from the parsed JSON document."""
        if not isinstance(data, Mapping) or not isinstance(data.get("languages"), list) or not data["languages"]:
            raise ValueError("language table needs a non-empty 'languages' list")
        default_code = data.get("default", DEFAULT_CODE)
        raw_default = next((raw for raw in data["languages"] if isinstance(raw, Mapping) and raw.get("code") == default_code), None)
        if raw_default is None:
            raise ValueError(f"default language {default_code} is not in the table")
        fallback_lines = dict(raw_default.get("lines") or {})
        entries = [LanguageEntry.from_json(raw, fallback_lines) for raw in data["languages"]]
        return cls(entries, data.get("aliases"), data.get("primaryDefaults"), default_code)

    @property
    def codes(self) -> list[str]:
        """Every language code in table order."""
        return [entry.code for entry in self._entries]

    @property
    def default(self) -> LanguageEntry:
        """The entry used when a code is unknown (en-US)."""
        return self._default

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[LanguageEntry]:
        return iter(self._entries)

    def __contains__(self, code: object) -> bool:
        return isinstance(code, str) and self.resolve(code) is not None

    def resolve(self, code: str | None) -> LanguageEntry | None:
        """The entry for a code, alias or bare language ("yue", "zh-Hant", "fr"), or None when unknown.

        Follows BCP-47 lookup: the full tag first, then shorter prefixes ("zh-Hant-MO" -> "zh-Hant"),
        each tried as a code and as an alias; a lone primary subtag maps to that language's default region.
        """
        if not isinstance(code, str):
            return None
        try:
            return self._resolved[code]  # every turn resolves the call's declared languages again
        except KeyError:
            pass
        entry = self._lookup(code)
        if len(self._resolved) < MAX_REMEMBERED_CODES:  # codes come from callers' prompts: keep the memo bounded
            self._resolved[code] = entry
        return entry

    def _lookup(self, code: str) -> LanguageEntry | None:
        normalised = normalise_code(code)
        if not _WELL_FORMED_TAG.match(normalised):
            return None  # "en_US!" or "en-US; DROP" names no language, even though it starts like one
        subtags = normalised.split("-")
        for length in range(len(subtags), 0, -1):
            prefix = "-".join(subtags[:length])
            entry = self._by_key.get(prefix) or self._aliases.get(prefix)
            if entry is None and length == 1:
                entry = self._by_primary.get(prefix)
            if entry is not None:
                return entry
        return None

    def refusal(self, value: Any, field: str = "language") -> str:
        """Why `value` (sent as `field`) is refused when resolve() finds no language: what was sent, what works."""
        shown = f"'{value[:40]}'" if isinstance(value, str) else f"of type {type(value).__name__}"
        return (f"{field} {shown} is not a language CallWeaver speaks: send a BCP-47 code such as en-US, es-MX, "
                f"zh-HK (Cantonese) or ko-KR (one of {len(self)} languages)")

    def get(self, code: str | None) -> LanguageEntry:
        """Like resolve(), but never fails: unknown or empty codes give en-US."""
        return self.resolve(code) or self._default

    def switch_target(self, current_code: str, prompt_lang: str | None,
                      declared: Sequence[str] | None = None) -> LanguageEntry | None:
        """The language to switch to for a caller utterance tagged prompt_lang, or None to stay.

        With Deepgram `multi`, prompt.lang carries only the primary subtag ("en"), so a bare subtag
        that matches the current language is the same language, not a switch (en-GB stays en-GB).
        `declared` lists the languages the call's TwiML declared, the call's home language first: a
        switch only ever lands on one of them (Twilio refuses the others), and a bare subtag picks the
        first declared language of that subtag, so en-GB → es-ES → "en" returns to en-GB, not en-US.
        """
        if not isinstance(prompt_lang, str) or not prompt_lang.strip():
            return None
        target = self.resolve(prompt_lang)
        if target is None:
            return None
        current = self.get(current_code)
        spoken = normalise_code(prompt_lang)
        if "-" not in spoken and spoken == normalise_code(primary_subtag(current.code)):
            return None
        if declared is not None:
            allowed = [entry for code in declared if (entry := self.resolve(code)) is not None]
            if target not in allowed or "-" not in spoken:
                primary = primary_subtag(target.code)
                target = next((e for e in allowed if primary_subtag(e.code) == primary), None)
                if target is None:
                    return None
        if target.code == current.code:
            return None
        return target

    def switch_targets(self, home: LanguageEntry) -> list[LanguageEntry]:
        """Every language a relay call that starts in `home` can switch to, home first.

        These are all declared as <Language> in the TwiML, so each `language` message names one Twilio
        has configured (voice and recognition); empty besides home when recognition cannot auto-detect.
        """
        return [home, *multilingual_partners(self, home)]

    @staticmethod
    def relay_language_meta(home: LanguageEntry, current: LanguageEntry,
                            targets: Sequence[LanguageEntry]) -> dict[str, Any]:
        """The meta keys that record what a relay call's <ConversationRelay> declares (`targets`, from
        switch_targets(home)): whether recognition is multilingual, the home language, the declared languages.
        The engine reads them on every turn (ConversationEngine.declared_languages, the relay session)."""
        multilingual = len(targets) > 1
        return {"multilingualStt": multilingual, "homeLanguage": home.code,
                "relayLanguages": [target.code for target in targets] if multilingual else [current.code]}

    def problems(self) -> dict[str, list[str]]:
        """entry_problems() for every entry that has any, keyed by code (for tests and health checks)."""
        return {entry.code: found for entry in self._entries if (found := entry_problems(entry))}


# Languages Deepgram's `multi` model recognises; a call in one of them can auto-detect a switch.
DEEPGRAM_MULTI_LANGUAGES: frozenset[str] = frozenset(_DEEPGRAM["multi"])


def multilingual_partners(table: "LanguageTable", entry: LanguageEntry) -> list[LanguageEntry]:
    """When `entry` can run Deepgram `multi` recognition, the other languages a caller may switch to.

    Empty when it cannot (e.g. Cantonese: `multi` has no Chinese), in which case recognition stays fixed.
    """
    primary = primary_subtag(normalise_code(entry.code))
    relay = entry.relay
    if (primary not in DEEPGRAM_MULTI_LANGUAGES or relay.get("transcriptionProvider") != "Deepgram"
            or relay.get("speechModel") not in {"nova-2-general", "nova-3-general"}):
        return []
    partners = []
    for code in sorted(DEEPGRAM_MULTI_LANGUAGES - {primary}):
        other = table.resolve(code)
        if other is not None and other.relay.get("transcriptionProvider") == "Deepgram":
            partners.append(other)
    return partners
