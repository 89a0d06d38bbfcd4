"""Language support as a caller and a new user meet it: speaking rates for every declared language (barge-in
estimates in Korean and Thai), goodbyes however Chinese is written, and languages the API cannot speak."""
from __future__ import annotations

import json

import pytest

from callweaver.engine import languages
from callweaver.engine.conversation import heard_of
from callweaver.engine.languages import LanguageTable, primary_subtag
from callweaver.engine.workflow import detect_termination
from tests.fakes.fake_llm import Reply
from tests.helpers import make_call_body
from tests.test_call_audit import Call

TABLE = LanguageTable.load()


# --- speaking rates ----------------------------------------------------------------------------

@pytest.mark.parametrize("code", TABLE.codes)
def test_every_declared_language_has_a_speaking_rate_of_its_own(code):
    """No language the product declares falls back to the English default without saying so: each has a rate
    chosen for its script (Korean and Thai were missing, and were estimated at the Latin 15 characters a second)."""
    assert primary_subtag(code) in languages.SPEECH_CHARS_PER_S_BY_LANGUAGE
    assert 3 <= TABLE.get(code).speech_chars_per_s <= 16


def test_a_table_entry_without_a_speaking_rate_is_a_problem():
    data = json.loads(languages.DEFAULT_TABLE_PATH.read_text(encoding="utf-8"))
    raw = next(raw for raw in data["languages"] if raw["code"] == "fr-FR")
    entry = languages.LanguageEntry.from_json({**raw, "code": "xh-ZA", "relay": {**raw["relay"], "language": "xh-ZA"}})
    assert any("speaking rate" in problem for problem in languages.entry_problems(entry))


def test_hangul_and_thai_are_slower_than_latin_in_characters():
    """A Hangul block is a syllable; Thai writes a syllable in ~2-3 code points with no spaces: both fewer
    characters a second than English, Korean far fewer."""
    en, ko, th = (TABLE.get(code).speech_chars_per_s for code in ("en-US", "ko-KR", "th-TH"))
    assert 6 <= ko <= 10 and ko < th < en


KO_LINE = "안녕하세요, 고객님. 오늘 예약하신 시간은 오후 세 시입니다. 다른 문의 사항이 있으신가요?"
TH_LINE = "สวัสดีครับยินดีต้อนรับสู่คลินิกของเราวันนี้มีนัดตอนบ่ายสามโมงครับมีอะไรให้ช่วยอีกไหมครับ"


def test_a_korean_estimate_trims_to_a_word_near_a_seconds_speech():
    rate = TABLE.get("ko-KR").speech_chars_per_s
    heard = heard_of(KO_LINE, None, 1000, chars_per_s=rate)
    assert KO_LINE.startswith(heard) and heard == "안녕하세요, 고객님."  # 8 characters, rounded up to the word's end


def test_a_thai_estimate_cuts_between_syllables_not_at_the_end_of_the_line():
    """Thai has no spaces between words: rounding up to the next space kept the whole line as heard."""
    rate = TABLE.get("th-TH").speech_chars_per_s
    heard = heard_of(TH_LINE, None, 1000, chars_per_s=rate)
    assert TH_LINE.startswith(heard)
    assert rate <= len(heard) <= rate + 3
    nxt = TH_LINE[len(heard)]
    assert not "\u0e30" <= nxt <= "\u0e3a" and not "\u0e47" <= nxt <= "\u0e4e"  # no vowel sign / tone mark cut off
    assert not "\u0e40" <= heard[-1] <= "\u0e44"  # nor a leading vowel left without its consonant


@pytest.fixture
def env(env):
    # the Cantonese clinic transfers to a Hong Kong nurse line, so +852 must be an allowed destination
    return {**env, "CACHE_TYPE": "NullCache", "ALLOWED_DESTINATION_PREFIXES": "+1,+852"}


@pytest.mark.parametrize("language, line, heard", [
    ("ko-KR", KO_LINE, "안녕하세요, 고객님."),
    ("th-TH", TH_LINE, None),
])
def test_barge_in_on_a_korean_or_thai_call_keeps_about_a_seconds_speech(app, client, fake_llm, language, line, heard):
    """Twilio reports no words it recognises (an empty utteranceUntilInterrupt after a second of speech): the stored
    reply is cut at the language's rate, not at English's 15 characters a second (nor kept whole, for Thai)."""
    call = Call(app, client, workflow="minimal_faq", language=language)
    try:
        fake_llm.push(Reply(text=line))
        call.say("สวัสดีครับ" if language == "th-TH" else "안녕하세요", language)
        call.send({"type": "interrupt", "utteranceUntilInterrupt": "", "durationUntilInterruptMs": 1000})
        kept = call.assistant_lines()[-1]
        rate = TABLE.get(language).speech_chars_per_s
        assert line.startswith(kept) and kept != line
        if heard is not None:
            assert kept == heard
        else:
            assert rate <= len(kept) <= rate + 3
    finally:
        call.session.close()


# --- goodbyes however Chinese is written ------------------------------------------------------------

@pytest.mark.parametrize("code, utterance", [
    # Cantonese: Simplified characters, mixed scripts, English code-mixing, romanised "bye"
    ("zh-HK", "再见"), ("zh-HK", "唔该，拜拜"), ("zh-HK", "多谢，拜拜"), ("zh-HK", "系咁先"), ("zh-HK", "好，唔該晒，再见！"),
    ("zh-HK", "得喇，唔该"), ("zh-HK", "OK，拜拜"), ("zh-HK", "唔該晒，bye bye"), ("zh-HK", "Bye-bye!"), ("zh-HK", "ok bye"),
    ("zh-HK", "多謝晒，bye"),
    # Mandarin (Taiwan) written in Simplified, Mandarin (China) written in Traditional
    ("zh-TW", "谢谢，再见"), ("zh-TW", "就这样"), ("zh-TW", "没有其他问题了，谢谢"), ("zh-TW", "好的，bye bye"),
    ("zh-CN", "謝謝，再見"), ("zh-CN", "就這樣吧"), ("zh-CN", "那我先掛了"), ("zh-CN", "沒別的事了，謝謝"), ("zh-CN", "OK拜拜"),
    ("zh-CN", "bye bye"),
])
def test_chinese_goodbyes_are_recognised_in_either_script_and_mixed_with_english(code, utterance):
    assert detect_termination(utterance, TABLE.get(code).termination_phrases)


@pytest.mark.parametrize("code, utterance", [
    ("zh-HK", "我想預約睇醫生"), ("zh-HK", "我想预约睇医生"), ("zh-HK", "拜拜係咩意思"), ("zh-CN", "再见是什么意思"),
    ("zh-HK", "bye的意思係咩"), ("zh-CN", "我想问一下价格"),
])
def test_chinese_questions_that_mention_a_goodbye_do_not_end_the_call(code, utterance):
    assert not detect_termination(utterance, TABLE.get(code).termination_phrases)


def test_a_cantonese_caller_saying_goodbye_in_simplified_characters_ends_a_live_call(app, client, fake_llm):
    call = Call(app, client, workflow="clinic_cantonese_transfer", language="zh-HK")
    try:
        call.say("好，多谢，再见", "zh-HK")  # the table writes 再見: Simplified 见 did not match
        assert fake_llm.requests == []  # recognised without a model call
        assert "拜拜" in "".join(m.get("token", "") for m in call.sent if m["type"] == "text")  # the Cantonese goodbye
        row = call.svc.store.turns(call.tracking_id)[-1]
        assert row["action"] == "end" and row["transitionedVia"] == "termination_phrase"
    finally:
        call.session.close()


# --- a language the API cannot speak ---------------------------------------------------------------

@pytest.mark.parametrize("route", ["/api/make-call", "/api/make-call-optimized"])
@pytest.mark.parametrize("language", ["xx-YY", "klingon", "multi", "en_US!", 42, ["en-US"]])
def test_make_call_refuses_a_language_it_cannot_speak_with_a_400(client, fake_twilio, route, language):
    resp = client.post(route, json=make_call_body(language=language))
    data = resp.get_json()
    assert resp.status_code == 400, data
    assert data["success"] is False and "language" in data["error"] and "en-US" in data["error"]
    assert fake_twilio.creates() == []  # no call placed in English instead


def test_make_call_refuses_a_workflow_whose_default_language_is_unknown(client, fake_twilio):
    body = make_call_body()
    body["config"]["globalSettings"]["defaultLanguage"] = "Elvish"
    resp = client.post("/api/make-call-optimized", json=body)
    assert resp.status_code == 400 and "Elvish" in resp.get_json()["error"]
    assert fake_twilio.creates() == []


@pytest.mark.parametrize("language, code", [("yue-HK", "zh-HK"), ("zh_hk", "zh-HK"), ("yue", "zh-HK"),
                                            ("ko", "ko-KR"), ("TH-th", "th-TH"), ("zh-Hans", "zh-CN"), ("", "en-US")])
def test_make_call_normalises_every_spelling_of_a_language_it_speaks(client, fake_twilio, language, code):
    data = client.post("/api/make-call-optimized", json=make_call_body(language=language)).get_json()
    assert data["success"], data
    assert data["optimization"]["language"] == code


@pytest.mark.parametrize("language", ["xx-YY", "multi"])
def test_test_optimization_refuses_an_unknown_language_instead_of_answering_in_english(client, fake_llm, language):
    resp = client.post("/api/test-optimization", json={"message": "What are your hours?", "language": language})
    assert resp.status_code == 400 and "language" in resp.get_json()["error"]
    assert fake_llm.requests == []


# Every Traditional goodbye phrase of the table, as a Simplified writer (or recogniser) writes it.
SIMPLIFIED_GOODBYES = {
    "zh-HK": ["拜拜", "再见", "唔该，拜拜", "冇嘢喇，拜拜", "多谢，拜拜", "冇其他嘢喇", "系咁先", "就咁先", "得喇，唔该"],
    "zh-TW": ["再见", "掰掰", "拜拜", "好，谢谢，再见", "谢谢，掰掰", "就这样", "没有其他问题了，谢谢", "先这样，谢谢"],
}


@pytest.mark.parametrize("code", sorted(SIMPLIFIED_GOODBYES))
def test_every_traditional_goodbye_phrase_is_recognised_in_simplified_characters(code):
    phrases = TABLE.get(code).termination_phrases
    assert len(SIMPLIFIED_GOODBYES[code]) == len([p for p in phrases if p != "bye"])  # one per phrase of the table
    for written in SIMPLIFIED_GOODBYES[code]:
        assert detect_termination(written, phrases), written


def test_the_call_log_filters_by_any_spelling_of_a_language_and_refuses_an_unknown_one(client, fake_twilio):
    assert client.post("/api/make-call-optimized", json=make_call_body(language="yue-HK")).get_json()["success"]
    for spelling in ("zh-HK", "yue-HK", "zh_hk", "yue"):
        page = client.get(f"/api/call-log?language={spelling}").get_json()
        assert page["total"] == 1 and page["filters"]["language"] == "zh-HK", (spelling, page)
    assert client.get("/api/call-log?language=en-US").get_json()["total"] == 0
    refused = client.get("/api/call-log?language=xx-YY")
    assert refused.status_code == 400 and "language" in refused.get_json()["error"]


JA_LINE = "かしこまりました。物件の価格は四千万円で、駅から徒歩五分です。ほかにご質問はございますか。"


def test_after_a_switch_the_barge_in_rate_goodbyes_and_cache_follow_the_new_language(app, client, fake_llm):
    """An English call the caller moves to Japanese (Deepgram `multi` reports "ja"): the `language` message goes
    out, the reply cut by a barge-in is estimated at Japanese speed, a Japanese goodbye ends the call, and every
    turn row and cache key carries ja-JP."""
    call = Call(app, client, language="en-US")
    try:
        fake_llm.push(Reply(text=JA_LINE))
        call.say("家の値段を教えてください", "ja")
        assert {"type": "language", "ttsLanguage": "ja-JP"} in call.sent
        call.send({"type": "interrupt", "utteranceUntilInterrupt": "", "durationUntilInterruptMs": 1000})
        rate = TABLE.get("ja-JP").speech_chars_per_s
        assert call.assistant_lines()[-1] == JA_LINE[:int(rate)]
        n = len(fake_llm.requests)
        call.say("ありがとうございました、失礼します", "ja")
        assert len(fake_llm.requests) == n
        rows = call.svc.store.turns(call.tracking_id)
        assert [row["language"] for row in rows] == ["ja-JP", "ja-JP"] and rows[-1]["action"] == "end"
        assert call.svc.store.get_call(call.tracking_id).language == "ja-JP"
    finally:
        call.session.close()


@pytest.mark.parametrize("utterance, ends", [
    ("ขอบคุณครับบาย", True),          # "thanks, bye" as recognisers write Thai: no space before บาย
    ("โอเคค่ะบ๊ายบาย", True), ("เอาแค่นี้ครับ", True), ("ไม่มีอะไรแล้วค่ะ", True), ("ขอบคุณครับ บาย", True),
    ("ผมไม่สบาย", False),              # "I'm unwell" ends in สบาย, which ends in บาย: not a goodbye
    ("ลูกไม่ค่อยสบาย", False), ("สบายดีครับ", False),
])
def test_thai_goodbyes_match_without_spaces_but_not_inside_a_word(utterance, ends):
    assert detect_termination(utterance, TABLE.get("th-TH").termination_phrases) is ends


def test_the_cantonese_gather_recognises_with_googles_cantonese_code():
    """<Gather> speech goes to Google, whose Cantonese is yue-Hant-HK (docs/twilio.md §3), as Mandarin's gathers use
    cmn-Hans-CN / cmn-Hant-TW; yue-HK is the <Say> voice's locale, not a recognition language."""
    assert TABLE.get("zh-HK").gather_language == "yue-Hant-HK"
    assert TABLE.get("zh-HK").say_language == "yue-HK"


@pytest.mark.parametrize("code, utterance", [
    ("zh-HK", "拜拜啦"), ("zh-HK", "好啦，拜拜喇"), ("zh-HK", "唔該晒，再見啦"), ("zh-HK", "冇其他嘢啦"), ("zh-HK", "bye bye啦"),
    ("zh-CN", "再见啦"), ("zh-CN", "那我先挂了啊"), ("zh-CN", "拜拜了"), ("zh-TW", "謝謝，再見囉"), ("zh-TW", "掰掰喔"),
])
def test_a_chinese_goodbye_followed_by_a_sentence_final_particle_still_ends_the_call(code, utterance):
    """Cantonese and Mandarin close a goodbye with a particle (拜拜啦, 再见了); the particle is not part of the phrase."""
    assert detect_termination(utterance, TABLE.get(code).termination_phrases)


@pytest.mark.parametrize("code, utterance", [("zh-HK", "我想改期啦"), ("zh-CN", "我到了"), ("zh-HK", "啦")])
def test_a_sentence_final_particle_alone_is_no_goodbye(code, utterance):
    assert not detect_termination(utterance, TABLE.get(code).termination_phrases)


def test_a_goodbye_in_a_switched_language_waits_for_playback_at_that_languages_rate(app, client, fake_llm, monkeypatch):
    """The caller switches to Japanese, then says goodbye; the switching turn's store write fails, so the stored call
    is still English: `end` must still wait for the Japanese goodbye at Japanese speed (5, not 15 characters a second),
    or Twilio closes the session before the line has played. (A goodbye in the very turn that would switch does not
    switch: it is said in the call's language, tests/test_language_callers.py.)"""
    from callweaver.engine import relay_session
    from callweaver.store import StoreError

    rates: list[float] = []
    bound = relay_session.playback_wait_bound_s

    def recorded(spoken, *, chars_per_s, with_audio=False, capped=True):
        if capped:  # the wait before an `end` (the silence count's estimates are uncapped)
            rates.append(chars_per_s)
        return bound(spoken, chars_per_s=chars_per_s, with_audio=with_audio, capped=capped)

    monkeypatch.setattr(relay_session, "playback_wait_bound_s", recorded)
    call = Call(app, client, language="en-US")
    try:
        monkeypatch.setattr(call.svc.store, "commit_turn",
                            lambda *a, **k: (_ for _ in ()).throw(StoreError("database is locked")))
        call.send({"type": "prompt", "voicePrompt": "予約を変更したいのですが", "lang": "ja", "last": True})
        call.wait(lambda: any(f.get("type") == "language" for f in call.sent)
                  and any(f.get("type") == "text" and f.get("last") for f in call.sent))
        call.send({"type": "prompt", "voicePrompt": "ありがとうございました、失礼します", "lang": "ja", "last": True})
        call.wait(lambda: rates)
        assert rates == [TABLE.get("ja-JP").speech_chars_per_s]
    finally:
        call.session.close()
