"""Tests for the language table: provider combinations, TwiML round-trips, Cantonese, lookup and switching."""
import ast
import dataclasses
import json
import re
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from twilio.twiml.voice_response import VoiceResponse

from callweaver.engine import languages
from callweaver.engine.languages import (
    ALLOWED_STT,
    ALLOWED_TTS,
    DEEPGRAM_NOVA3_LANGUAGES,
    LINE_KEYS,
    LanguageEntry,
    LanguageTable,
    entry_problems,
)

TABLE = LanguageTable.load()
ALL_CODES = TABLE.codes

REQUIRED_CODES = [
    "en-US", "en-GB", "en-AU", "en-IN", "es-ES", "es-MX", "es-US", "fr-FR", "fr-CA", "de-DE", "it-IT",
    "pt-BR", "pt-PT", "nl-NL", "sv-SE", "da-DK", "nb-NO", "fi-FI", "pl-PL", "cs-CZ", "sk-SK", "hu-HU",
    "ro-RO", "bg-BG", "el-GR", "tr-TR", "ru-RU", "uk-UA", "he-IL", "hi-IN", "bn-IN", "ta-IN", "te-IN",
    "mr-IN", "gu-IN", "kn-IN", "ml-IN", "th-TH", "vi-VN", "id-ID", "ms-MY", "fil-PH", "ja-JP", "ko-KR",
    "zh-CN", "zh-TW", "zh-HK", "ca-ES", "et-EE", "lv-LV", "lt-LT", "is-IS",
]

# Unicode script each non-Latin language must actually be written in (catches copy-pasted English).
SCRIPT_RANGES = {
    "ja": [(0x3040, 0x30FF), (0x4E00, 0x9FFF)], "ko": [(0xAC00, 0xD7AF)], "zh": [(0x4E00, 0x9FFF)],
    "ru": [(0x0400, 0x04FF)], "uk": [(0x0400, 0x04FF)], "bg": [(0x0400, 0x04FF)], "sr": [(0x0400, 0x04FF)],
    "el": [(0x0370, 0x03FF)], "he": [(0x0590, 0x05FF)], "ar": [(0x0600, 0x06FF)],
    "hi": [(0x0900, 0x097F)], "mr": [(0x0900, 0x097F)], "bn": [(0x0980, 0x09FF)], "gu": [(0x0A80, 0x0AFF)],
    "ta": [(0x0B80, 0x0BFF)], "te": [(0x0C00, 0x0C7F)], "kn": [(0x0C80, 0x0CFF)], "ml": [(0x0D00, 0x0D7F)],
    "th": [(0x0E00, 0x0E7F)],
}
SIMPLIFIED_ONLY = set("们这说话请谢没时还听见么为问题帮边过个来给长门开关对儿")
TRADITIONAL_ONLY = set("們這說話請謝沒時還聽見麼為問題幫邊過個來給長門開關對兒")
CANTONESE_MARKERS = set("唔嘅咗喇冇係啲喺咩哋嚟緊喎啱返嘢佢點乜")
# Hong Kong and Taiwan callers (and mainland ones) say "bye" in English: recognisers write it in Latin letters.
CODE_MIXED_GOODBYES = {"bye"}
MANDARIN_MARKERS = ["是", "的", "了", "在", "们", "們", "没有", "沒有", "什么", "什麼", "怎么", "怎麼"]


def _all_text(entry: LanguageEntry) -> list[str]:
    return [*entry.lines.values(), *entry.termination_phrases, *entry.prewarm_utterances]


def _share_in_script(text: str, ranges) -> float:
    letters = [ch for ch in text if unicodedata.category(ch).startswith(("L", "M"))]
    if not letters:
        return 0.0
    inside = [ch for ch in letters if any(lo <= ord(ch) <= hi for lo, hi in ranges)]
    return len(inside) / len(letters)


def _words(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.casefold()).strip()


# --- size and validity -----------------------------------------------------------------------

def test_table_has_fifty_plus_languages_including_every_required_code():
    assert len(TABLE) >= 50
    missing = [code for code in REQUIRED_CODES if code not in TABLE.codes]
    assert missing == []
    assert TABLE.resolve("ar-SA") is not None or TABLE.resolve("ar-XA") is not None


@pytest.mark.parametrize("code", ALL_CODES)
def test_every_entry_passes_entry_problems(code):
    assert entry_problems(TABLE.get(code)) == []


def test_table_problems_is_empty_for_the_shipped_table():
    assert TABLE.problems() == {}


@pytest.mark.parametrize("code", ALL_CODES)
def test_every_entry_has_all_lines_goodbye_phrases_fillers_and_prewarm_utterances(code):
    entry = TABLE.get(code)
    assert set(LINE_KEYS) <= set(entry.lines)
    assert all(entry.line(key).strip() for key in LINE_KEYS)
    assert 4 <= len(entry.termination_phrases) <= 10
    assert entry.fillers
    assert len(entry.prewarm_utterances) >= 3
    assert entry.llm_instruction.strip()


@pytest.mark.parametrize("code", ALL_CODES)
def test_stt_choice_follows_nova3_then_nova2_then_google_rule(code):
    relay = TABLE.get(code).relay
    key = languages.deepgram_language_key(code)
    if key in DEEPGRAM_NOVA3_LANGUAGES:
        assert (relay["transcriptionProvider"], relay["speechModel"]) == ("Deepgram", "nova-3-general")
    elif key in languages.DEEPGRAM_NOVA2_LANGUAGES:
        assert (relay["transcriptionProvider"], relay["speechModel"]) == ("Deepgram", "nova-2-general")
    else:
        assert (relay["transcriptionProvider"], relay["speechModel"]) == ("Google", "telephony")
    assert relay["speechModel"] in ALLOWED_STT[relay["transcriptionProvider"]]
    assert relay["ttsProvider"] in ALLOWED_TTS


def test_google_tts_and_deepgram_stt_are_preferred_across_the_table():
    google_tts = sum(TABLE.get(c).relay["ttsProvider"] == "Google" for c in ALL_CODES)
    deepgram_stt = sum(TABLE.get(c).relay["transcriptionProvider"] == "Deepgram" for c in ALL_CODES)
    assert google_tts >= 0.9 * len(TABLE)
    assert deepgram_stt >= 0.75 * len(TABLE)


def _broken(base_code: str, **changes) -> LanguageEntry:
    entry = TABLE.get(base_code)
    relay_changes = changes.pop("relay", {})
    return dataclasses.replace(entry, relay={**entry.relay, **relay_changes}, **changes)


@pytest.mark.parametrize(
    "entry, expected",
    [
        (_broken("zh-HK", relay={"voice": "cmn-CN-Chirp3-HD-Aoede"}), "does not speak zh-HK"),
        (_broken("zh-HK", relay={"ttsProvider": "ElevenLabs", "voice": "UgBBYS2sOqTuMpoF3BR0"}), "ElevenLabs does not speak"),
        (_broken("zh-HK", relay={"ttsProvider": "Amazon", "voice": "Zhiyu-Neural"}), "not a neural voice for yue-CN"),
        (_broken("he-IL", relay={"transcriptionProvider": "Deepgram", "speechModel": "nova-3-general"}), "nova-3 does not support"),
        (_broken("sv-SE", relay={"speechModel": "nova-3-general"}), "nova-3 does not support"),
        (_broken("en-US", relay={"transcriptionProvider": "Google", "speechModel": "nova-3-general"}), "not valid for Google"),
        (_broken("en-US", relay={"speechModel": "nova-2-general"}), "should use Deepgram nova-3-general"),
        (_broken("en-US", relay={"transcriptionProvider": "Whisper"}), "transcriptionProvider"),
        (_broken("en-US", relay={"ttsProvider": "Azure"}), "ttsProvider"),
        (_broken("en-US", relay={"voice": ""}), "relay is missing voice"),
        (_broken("en-US", relay={"language": "en-GB"}), "differs from code"),
        (_broken("is-IS", relay={"voice": "is-IS-Chirp3-HD-Aoede"}), "no Chirp3-HD voices for is-IS"),
        (_broken("en-US", relay={"voice": "en-US-Chirp3-HD-Bob"}), "not a Chirp3-HD voice name"),
        (_broken("fr-FR", relay={"voice": "Joanna-Neural", "ttsProvider": "Amazon"}), "not a neural voice for fr-FR"),
        (_broken("zh-HK", say_voice="Google.cmn-CN-Standard-A", say_language="cmn-CN"), "does not speak zh-HK"),
        (_broken("zh-HK", say_language="zh-HK"), "must match the voice locale yue-HK"),
        (_broken("es-MX", say_voice="Polly.Joanna-Neural"), "not a neural voice for es-MX"),
        (_broken("de-DE", say_voice="alice"), "neither Google"),
        (_broken("zh-HK", gather_language="zh-HK"), "does not recognise zh-HK"),
        (_broken("en-US", lines={k: v for k, v in TABLE.get("en-US").lines.items() if k != "apology"}), "line 'apology' is missing"),
        (_broken("en-US", termination_phrases=()), "termination phrases"),
        (_broken("en-US", termination_phrases=tuple(f"bye {n}" for n in range(11))), "termination phrases"),
        (_broken("en-US", termination_phrases=("bye", "Bye", "goodbye", "thanks, bye")), "repeat"),
        (_broken("en-US", fillers=()), "fillers"),
        (_broken("en-US", prewarm_utterances=("Hello?",)), "prewarm"),
        (_broken("en-US", llm_instruction=" "), "llmInstruction is empty"),
        (_broken("en-US", code="english", relay={"language": "english"}), "BCP-47"),
    ],
)
def test_entry_problems_catches_a_broken_entry(entry, expected):
    problems = entry_problems(entry)
    assert any(expected in problem for problem in problems), problems


# --- TwiML round-trips through the twilio SDK --------------------------------------------------

@pytest.mark.parametrize("code", ALL_CODES)
def test_conversation_relay_twiml_round_trips_every_entry(code):
    entry = TABLE.get(code)
    vr = VoiceResponse()
    vr.connect(action="https://example.test/api/connect-action").conversation_relay(
        url="wss://example.test/ws", welcome_greeting=entry.line("fallbackGreeting"), **entry.relay_kwargs()
    )
    relay = ET.fromstring(str(vr)).find("Connect/ConversationRelay")
    assert relay is not None
    assert relay.attrib == {
        "url": "wss://example.test/ws",
        "welcomeGreeting": entry.line("fallbackGreeting"),
        **entry.relay,
    }


@pytest.mark.parametrize("code", ALL_CODES)
def test_say_and_gather_twiml_round_trips_every_entry(code):
    entry = TABLE.get(code)
    vr = VoiceResponse()
    vr.say(entry.line("goodbye"), voice=entry.say_voice, language=entry.say_language)
    vr.gather(input="speech", language=entry.gather_language, action="https://example.test/api/gather")
    root = ET.fromstring(str(vr))
    say, gather = root.find("Say"), root.find("Gather")
    assert say.text == entry.line("goodbye")
    assert say.attrib == {"voice": entry.say_voice, "language": entry.say_language}
    assert gather.attrib == {"input": "speech", "language": entry.gather_language, "action": "https://example.test/api/gather"}


def test_language_element_predeclares_cantonese_for_a_switch():
    entry = TABLE.get("zh-HK")
    vr = VoiceResponse()
    relay = vr.connect().conversation_relay(url="wss://example.test/ws", **TABLE.get("en-US").relay_kwargs())
    relay.language(**entry.language_element_kwargs())
    element = ET.fromstring(str(vr)).find("Connect/ConversationRelay/Language")
    assert element.attrib == {
        "code": "zh-HK", "ttsProvider": "Google", "voice": entry.relay["voice"],
        "transcriptionProvider": "Deepgram", "speechModel": "nova-3-general",
    }


def test_relay_kwargs_are_the_snake_case_names_twilio_expects():
    assert TABLE.get("en-US").relay_kwargs() == {
        "language": "en-US", "tts_provider": "Google", "voice": "en-US-Chirp3-HD-Aoede",
        "transcription_provider": "Deepgram", "speech_model": "nova-3-general",
    }


# --- Cantonese -------------------------------------------------------------------------------

def test_cantonese_relay_is_google_yue_hk_chirp3_voice_with_deepgram_nova3():
    relay = TABLE.get("zh-HK").relay
    assert relay["language"] == "zh-HK"
    assert relay["ttsProvider"] == "Google"
    assert relay["voice"].startswith("yue-HK-Chirp3-HD-")
    assert relay["transcriptionProvider"] == "Deepgram"
    assert relay["speechModel"] == "nova-3-general"


def test_cantonese_say_and_gather_use_yue_hk():
    entry = TABLE.get("zh-HK")
    assert entry.say_voice == "Google.yue-HK-Standard-A"
    assert entry.say_language == "yue-HK"
    assert entry.gather_language == "yue-Hant-HK"  # Google recognition's Cantonese (docs/twilio.md §3)


def test_cantonese_lines_are_traditional_colloquial_cantonese_not_mandarin():
    entry = TABLE.get("zh-HK")
    texts = _all_text(entry)
    assert not SIMPLIFIED_ONLY & set("".join(texts))
    lines_with_particles = [text for text in entry.lines.values() if CANTONESE_MARKERS & set(text)]
    assert len(lines_with_particles) >= 6, entry.lines
    for text in entry.lines.values():
        assert not [marker for marker in MANDARIN_MARKERS if marker in text], text


def test_cantonese_goodbyes_are_colloquial():
    phrases = TABLE.get("zh-HK").termination_phrases
    for expected in ("拜拜", "唔該，拜拜", "冇嘢喇，拜拜", "再見"):
        assert expected in phrases


def test_cantonese_instruction_demands_spoken_cantonese_and_reads_written_chinese_input():
    instruction = TABLE.get("zh-HK").llm_instruction
    for word in ("Cantonese", "Hong Kong", "Traditional", "Simplified", "transcribed"):
        assert word in instruction
    for word in ("係", "唔係", "冇", "嘅", "咗", "佢", "乜嘢", "點樣"):
        assert word in instruction
    for mandarin in ("是", "不是", "没有", "的", "了"):
        assert mandarin in instruction  # named as what to avoid


@pytest.mark.parametrize("alias", ["yue", "yue-HK", "yue-Hant-HK", "zh-yue", "YUE_hk", " zh-hk ", "zh-Hant-HK"])
def test_cantonese_aliases_resolve_to_zh_hk(alias):
    assert TABLE.get(alias).code == "zh-HK"


def test_mandarin_variants_stay_distinct_from_cantonese_and_each_other():
    cn, tw, hk = TABLE.get("zh-CN"), TABLE.get("zh-TW"), TABLE.get("zh-HK")
    assert len({cn.code, tw.code, hk.code}) == 3
    assert cn.relay["voice"].startswith("cmn-CN-")
    assert tw.relay["voice"].startswith("cmn-TW-")
    assert cn.say_voice.startswith("Google.cmn-CN-") and tw.say_voice.startswith("Google.cmn-TW-")
    assert "Simplified" in cn.llm_instruction and "Mandarin" in cn.llm_instruction
    assert "Traditional" in tw.llm_instruction and "Taiwan" in tw.llm_instruction
    assert len({cn.llm_instruction, tw.llm_instruction, hk.llm_instruction}) == 3
    assert cn.lines != tw.lines != hk.lines
    assert not TRADITIONAL_ONLY & set("".join(_all_text(cn)))
    assert not SIMPLIFIED_ONLY & set("".join(_all_text(tw)))


@pytest.mark.parametrize(
    "alias, code",
    [("cmn-CN", "zh-CN"), ("zh-Hans", "zh-CN"), ("zh", "zh-CN"), ("cmn-Hans-CN", "zh-CN"),
     ("cmn-TW", "zh-TW"), ("zh-Hant", "zh-TW"), ("zh-Hant-TW", "zh-TW")],
)
def test_mandarin_aliases_resolve(alias, code):
    assert TABLE.get(alias).code == code


# --- lookup ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "code, expected",
    [("en", "en-US"), ("fr", "fr-FR"), ("es", "es-ES"), ("de", "de-DE"), ("ja", "ja-JP"), ("ko", "ko-KR"),
     ("en-us", "en-US"), ("EN-GB", "en-GB"), ("pt_BR", "pt-BR"), ("no", "nb-NO"), ("iw", "he-IL"),
     ("en-CA", "en-US"), ("fr-BE", "fr-FR"), ("zh-Hant-MO", "zh-HK")],
)
def test_get_resolves_exact_codes_aliases_and_bare_languages(code, expected):
    assert TABLE.get(code).code == expected


@pytest.mark.parametrize("code", [None, "", "   ", "xx", "klingon", "multi", "x-YY", 42])
def test_unknown_codes_resolve_to_none_and_get_falls_back_to_en_us(code):
    assert TABLE.resolve(code) is None
    assert TABLE.get(code).code == "en-US"


@pytest.mark.parametrize(
    "current, prompt_lang, expected",
    [
        ("en-US", None, None), ("en-US", "", None), ("en-US", "en", None), ("en-US", "en-US", None),
        ("en-US", "EN-us", None), ("en-GB", "en", None), ("fr-CA", "fr", None), ("nb-NO", "no", None),
        ("en-US", "es", "es-ES"), ("en-US", "es-MX", "es-MX"), ("fr-CA", "fr-FR", "fr-FR"),
        ("zh-CN", "yue", "zh-HK"), ("zh-HK", "zh-HK", None), ("zh-HK", "yue-HK", None),
        ("zh-HK", "zh", None), ("zh-HK", "zh-CN", "zh-CN"), ("en-US", "zh-HK", "zh-HK"),
        ("en-US", "multi", None), ("en-US", "xx-YY", None), ("unknown", "en", None),
    ],
)
def test_switch_target(current, prompt_lang, expected):
    target = TABLE.switch_target(current, prompt_lang)
    assert (target.code if target else None) == expected


# --- loading ---------------------------------------------------------------------------------

def _minimal_document() -> dict:
    data = json.loads(languages.DEFAULT_TABLE_PATH.read_text(encoding="utf-8"))
    keep = {"en-US", "fr-FR", "zh-HK", "zh-CN", "zh-TW", "nb-NO", "he-IL", "fil-PH", "es-MX", "ar-SA"}
    data["languages"] = [raw for raw in data["languages"] if raw["code"] in keep]
    data["aliases"] = {a: t for a, t in data["aliases"].items() if t in keep}
    data["primaryDefaults"] = {p: t for p, t in data["primaryDefaults"].items() if t in keep}
    return data


def test_load_reads_a_custom_path_and_missing_lines_fall_back_to_en_us(tmp_path):
    data = _minimal_document()
    french = next(raw for raw in data["languages"] if raw["code"] == "fr-FR")
    del french["lines"]["oneMoment"]
    path = tmp_path / "languages.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    table = LanguageTable.load(str(path))
    assert len(table) == 10
    entry = table.get("fr")
    assert entry.line("oneMoment") == table.get("en-US").line("oneMoment")
    assert entry.line("goodbye") != table.get("en-US").line("goodbye")
    assert any("oneMoment" in problem for problem in entry_problems(entry))
    with pytest.raises(KeyError):
        entry.line("noSuchLine")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: d["languages"].append(dict(d["languages"][0])), "twice"),
        (lambda d: d["aliases"].update({"yue": "yue-HK"}), "not in the table"),
        (lambda d: d["languages"][1].pop("relay"), "relay"),
        (lambda d: d.update({"languages": []}), "non-empty"),
        (lambda d: d.update({"default": "xx-YY"}), "default language"),
    ],
)
def test_load_rejects_a_malformed_table(tmp_path, breakage, message):
    data = _minimal_document()
    breakage(data)
    path = tmp_path / "languages.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        LanguageTable.load(path)


def test_load_rejects_invalid_json(tmp_path):
    path = tmp_path / "languages.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        LanguageTable.load(path)


# --- translation sanity ----------------------------------------------------------------------

@pytest.mark.parametrize("code", [c for c in ALL_CODES if c.split("-")[0] in SCRIPT_RANGES])
def test_non_latin_languages_are_written_in_their_own_script(code):
    ranges = SCRIPT_RANGES[code.split("-")[0]]
    entry = TABLE.get(code)
    for text in [*entry.lines.values(), *entry.termination_phrases]:
        if code.startswith("zh-") and text in CODE_MIXED_GOODBYES:
            continue
        assert _share_in_script(text, ranges) >= 0.8, text


def test_no_non_english_entry_reuses_english_lines():
    english = {_words(text) for text in TABLE.get("en-US").lines.values()}
    for code in ALL_CODES:
        if code.startswith("en-"):
            continue
        reused = [text for text in TABLE.get(code).lines.values() if _words(text) in english]
        assert reused == [], code


@pytest.mark.parametrize("code", ALL_CODES)
def test_goodbye_phrases_are_not_also_prewarm_utterances(code):
    entry = TABLE.get(code)
    prewarm = {_words(text) for text in entry.prewarm_utterances}
    assert [p for p in entry.termination_phrases if _words(p) in prewarm] == []


def test_english_goodbye_phrases_contain_no_greetings_or_fillers():
    entry = TABLE.get("en-US")
    for phrase in entry.termination_phrases:
        assert not re.search(r"\b(hello|hi|hey|um|uh)\b", phrase)
    assert not {"like", "so", "well"} & set(entry.fillers)


def test_languages_module_does_not_import_flask():
    tree = ast.parse(Path(languages.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "flask" not in imported


@pytest.mark.parametrize("code", ["en-US", "es-ES", "yue-HK"])
def test_prebuilt_language_elements_serialise_as_freshly_built_ones(code):
    """The <Language> elements a worker builds once per home language (routes/twiml.py) give the same TwiML, byte
    for byte, as building them per call, also when two responses nest the same elements."""
    from callweaver.routes.twiml import RelayLanguageDeclarations

    home = TABLE.get(code)
    declarations = RelayLanguageDeclarations(TABLE)
    targets, elements = declarations.for_home(home)
    assert targets == TABLE.switch_targets(home) and declarations.for_home(home)[1] is elements

    def response(nest_prebuilt: bool) -> str:
        vr = VoiceResponse()
        relay = vr.connect().conversation_relay(url="wss://example.test/ws", **home.relay_kwargs())
        for target, element in zip(targets, elements):
            relay.nest(element) if nest_prebuilt else relay.language(**target.language_element_kwargs())
        return str(vr)

    assert response(True) == response(True) == response(False)
