"""Review of the language audit: every default language the real web app offers places a call, and goodbye matching
does not end calls on questions, negations or words that merely end like a goodbye."""
from __future__ import annotations

import pytest

from callweaver.engine.languages import LanguageTable, entry_problems
from callweaver.engine.workflow import detect_termination
from tests.helpers import make_call_body

TABLE = LanguageTable.load()

# The default-language codes the Call Flow Weaver web app offers (src/types/workflowConfig.ts, SUPPORTED_LANGUAGES).
WEB_APP_LANGUAGES = (
    "ar-EG ar-SA bg-BG cs-CZ da-DK de-DE el-GR en-AU en-CA en-GB en-US es-ES es-MX es-US et-EE fi-FI fr-CA fr-FR "
    "he-IL hi-IN hr-HR hu-HU id-ID it-IT ja-JP ko-KR lt-LT lv-LV ms-MY nl-NL no-NO pl-PL pt-BR pt-PT ro-RO ru-RU "
    "sk-SK sl-SI sv-SE th-TH tl-PH tr-TR uk-UA vi-VN zh-CN zh-HK zh-MO zh-TW"
).split()


@pytest.mark.parametrize("code", WEB_APP_LANGUAGES)
def test_every_language_the_web_app_offers_resolves_to_a_valid_entry(code):
    entry = TABLE.resolve(code)
    assert entry is not None, code
    assert entry_problems(entry) == []


@pytest.mark.parametrize("code", ["hr-HR", "sl-SI"])
def test_croatian_and_slovenian_flows_place_calls_in_their_own_language(client, fake_twilio, code):
    """The web app offers Croatian and Slovenian: the merge refused them with a 400 (before it, English calls)."""
    body = make_call_body()
    body["config"]["globalSettings"]["defaultLanguage"] = code
    for route in ("/api/make-call", "/api/make-call-optimized"):
        resp = client.post(route, json=body)
        data = resp.get_json()
        assert resp.status_code == 200 and data["success"], data
    assert TABLE.get(code).code == code
    assert len(fake_twilio.creates()) == 2


# --- goodbyes: what the audit's particle, script and Thai rules must not turn into a goodbye -------------------------

def _ends(code: str, utterance: str) -> bool:
    return detect_termination(utterance, TABLE.get(code).termination_phrases)


@pytest.mark.parametrize("code, utterance", [
    # A phrase's own particle is part of it: "冇其他嘢喇" (nothing else, closing) is a goodbye, the question
    # "仲有冇其他嘢呀" (is there anything else?) is not; nor is "就这样啊" (that's it?) a "就这样吧".
    ("zh-HK", "仲有冇其他嘢呀"), ("zh-HK", "有冇其他嘢"), ("zh-HK", "你哋仲有冇其他嘢"),
    ("zh-CN", "就这样啊"), ("zh-CN", "是不是就这样"), ("zh-CN", "那我先挂"),
    # a question mark: "掰掰喔？" asked back is no goodbye
    ("zh-TW", "就這樣啊？"), ("zh-HK", "拜拜啦？"),
    # a goodbye asked back is never one, with or without a particle: "that's it?", "bye-bye?", "goodbye?"
    ("zh-TW", "就這樣？"), ("zh-TW", "掰掰？"), ("zh-CN", "再见？"), ("en-US", "Goodbye?"), ("en-US", "bye?"),
])
def test_a_particle_is_stripped_from_what_the_caller_said_not_from_the_goodbye_phrase(code, utterance):
    assert not _ends(code, utterance)


@pytest.mark.parametrize("code, utterance", [
    # "don't say goodbye yet", "I haven't said goodbye", "don't hang up like this": Chinese puts the goodbye last,
    # so ending with it is not enough (English keeps these on the line because "yet" comes last)
    ("zh-CN", "先别说再见"), ("zh-CN", "不要说再见"), ("zh-CN", "我还没说再见"), ("zh-CN", "不要就这样吧"),
    ("zh-TW", "先不要說再見"), ("zh-TW", "還沒說掰掰"), ("zh-HK", "唔好講拜拜"), ("zh-HK", "唔使講拜拜"),
    ("zh-CN", "别bye"), ("zh-CN", "别 bye"),
    # English: "before I say bye", "don't say bye": the goodbye is mentioned, not said
    ("en-US", "wait, before I say bye"), ("en-US", "please don't say bye"), ("en-US", "do not say goodbye"),
    ("en-US", "I never said goodbye"), ("en-US", "I haven't said goodbye"), ("en-US", "no need to say goodbye"),
    ("en-US", "I didn't say bye"), ("en-US", "you don't have to say goodbye"), ("en-US", "I have not said bye"),
    # Thai: "not bye-bye yet", "don't bye-bye yet"
    ("th-TH", "ยังไม่บ๊ายบาย"), ("th-TH", "อย่าเพิ่งบ๊ายบาย"),
])
def test_a_negated_or_mentioned_goodbye_does_not_end_the_call(code, utterance):
    assert not _ends(code, utterance)


@pytest.mark.parametrize("utterance", [
    "มีแค่นี้ครับ",         # "that's all I have" (answering how many): แค่นี้ is "only this much"
    "ราคาแค่นี้ครับ",       # "the price is only this much"
    "ได้แค่นี้ค่ะ",          # "I can only do this much"
    "ในตู้ไม่มีอะไรแล้วครับ",  # "there is nothing left in the cupboard"
])
def test_a_thai_goodbye_phrase_inside_a_longer_sentence_is_no_goodbye(utterance):
    """Thai has no spaces, so the audit matched every multi-syllable phrase as a plain suffix; a goodbye like
    แค่นี้ครับ ("that's all") then also ended "มีแค่นี้ครับ" ("I only have this much")."""
    assert not _ends("th-TH", utterance)


@pytest.mark.parametrize("code, utterance", [
    ("zh-HK", "冇其他嘢喇"), ("zh-HK", "冇其他嘢啦"), ("zh-HK", "好，冇其他嘢喇"), ("zh-CN", "就这样吧"),
    ("zh-CN", "好的，那就这样吧"), ("zh-CN", "就这样吧啊"), ("zh-CN", "那我先挂了"), ("zh-CN", "不用了，再见"),
    ("zh-CN", "没事，拜拜"), ("zh-HK", "冇嘢喇，拜拜"), ("zh-TW", "不會，謝謝，再見"), ("zh-CN", "拜拜！"),
    ("zh-CN", "我没有，再见"), ("zh-CN", "OK，bye"),
    ("en-US", "no, that's all, thanks bye"), ("en-US", "nothing else, goodbye"), ("en-US", "not today, bye"),
    ("en-US", "I said bye"), ("en-US", "OK bye"), ("en-US", "OK bye!"), ("en-US", "never mind, goodbye"),
    ("th-TH", "แค่นี้ครับ"), ("th-TH", "เอาแค่นี้ค่ะ"), ("th-TH", "โอเคครับ แค่นี้ครับ"), ("th-TH", "ไม่มีอะไรแล้วครับ"),
    ("th-TH", "ขอบคุณค่ะไม่มีอะไรแล้วค่ะ"), ("th-TH", "ผมไม่สบายครับบาย"), ("th-TH", "ไม่เป็นไรค่ะบ๊ายบาย"),
])
def test_real_goodbyes_still_end_the_call(code, utterance):
    assert _ends(code, utterance)


@pytest.mark.parametrize("code, utterance", [
    ("zh-TW", "我明天要去廟裡拜拜"), ("zh-TW", "過年都會去拜拜"), ("zh-CN", "阿嬷在拜拜"), ("zh-CN", "我们要去庙里拜拜"),
])
def test_bai_bai_as_worship_is_no_goodbye(code, utterance):
    """拜拜 is also "to worship at a temple" (去拜拜, 在拜拜, 廟裡拜拜): said after those it is not a goodbye."""
    assert not _ends(code, utterance)


@pytest.mark.parametrize("code, utterance", [
    ("zh-TW", "好，我先去忙了，拜拜"), ("zh-CN", "现在先这样"), ("zh-HK", "我去搵佢先，拜拜"), ("zh-CN", "好的拜拜"),
])
def test_bai_bai_after_a_clause_or_other_words_still_ends_the_call(code, utterance):
    assert _ends(code, utterance)


@pytest.mark.parametrize("utterance, ends", [
    ("안 끊을게요", False), ("아직 안 끊을게요", False), ("전화 안 끊을게요", False),  # "I won't hang up (yet)"
    ("네, 끊을게요", True), ("감사합니다. 안녕히 계세요", True), ("그럼 이만", True),
])
def test_a_korean_i_wont_hang_up_is_no_goodbye(utterance, ends):
    """Korean spaces its words, so a space before 끊을게요 ("I'll hang up") is no clause break: 안 negates it."""
    assert _ends("ko-KR", utterance) is ends
