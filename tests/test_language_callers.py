"""Callers in many languages: what a previous round of calls in each of them found, kept from coming back.

Closings said inside a sentence (Japanese 三人以上です "three or more"), negated ("non è tutto"), or asked as a question
(؟, the Greek ";") are no goodbyes; regional tags reach the table's nearest voice by CLDR's parent locales; the demo
speaks the language it is given; and one short word recognised in another language does not switch the call.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from callweaver.engine.end_of_utterance import Completeness, completeness
from callweaver.engine.languages import LanguageTable
from callweaver.engine import speech
from callweaver.engine.workflow import detect_termination
from callweaver.simulate import __main__ as simulate_main
from callweaver.simulate import demo as demo_module
from tests.helpers import InProcessRelayCall, make_call_body
from tests.scripted_brain import real_estate_brain

TABLE = LanguageTable.load()
PACKAGE = Path(__file__).resolve().parents[1] / "callweaver"
README = Path(__file__).resolve().parents[1] / "README.md"


def goodbye(code: str, said: str) -> bool:
    return detect_termination(said, TABLE.get(code).termination_phrases)


# ---- 1. Japanese closings said inside a sentence ------------------------------------------------------------

@pytest.mark.parametrize("said", ["三人以上です", "3人以上です", "1万円以上です", "半分以上です。", "ちょっと失礼します",
                                  "ちょっと、失礼します。", "少々失礼いたします", "一旦失礼します"])
def test_a_japanese_closing_inside_a_sentence_is_no_goodbye(said):
    assert not goodbye("ja-JP", said)


@pytest.mark.parametrize("said", ["以上です", "以上です。", "はい、以上です", "はい以上です", "私からは以上です",
                                  "それでは失礼します", "失礼します。", "では、失礼いたします", "さようなら"])
def test_a_japanese_closing_said_as_one_still_ends_the_call(said):
    assert goodbye("ja-JP", said)


@pytest.mark.parametrize("said", ["三人 以上です", "3 人 以上 です", "1万円 以上です", "半分 以上です。", "それ 以上です",
                                  "5 メートル 以上です", "二つ、以上です"])
def test_a_quantity_or_more_spaced_by_the_recogniser_is_no_goodbye(said):
    """Recognisers may space Japanese words (or put a comma where the caller paused): 以上 right after a number, a
    counted quantity or それ is still "or more", wherever the space came from."""
    assert not goodbye("ja-JP", said)


@pytest.mark.parametrize("said", ["えっと、以上です", "とりあえず、以上です", "今のところ 以上です", "はい 以上です",
                                  "ありがとうございます 以上です", "大丈夫です、以上です"])
def test_a_japanese_closing_after_a_pause_still_ends_the_call(said):
    assert goodbye("ja-JP", said)


@pytest.mark.parametrize("said", ["ありがとうございます以上です", "大丈夫です以上です", "分かりました以上です",
                                  "よろしくお願いします以上です", "ありがとうございました以上です"])
def test_a_japanese_closing_after_a_finished_sentence_without_punctuation_ends_the_call(said):
    """Recognisers often leave out 。 between sentences: 以上です after a polite sentence ending (です, ます, ました)
    closes as it does after 。 (it was "or more" only after a number or a noun: 三人以上です)."""
    assert goodbye("ja-JP", said)


@pytest.mark.parametrize("said", ["안으로 들어가세요", "홈페이지에 들어가세요.", "2층으로 들어가세요", "사이트에서 들어가세요"])
def test_korean_directions_to_go_in_are_no_goodbye(said):
    assert not goodbye("ko-KR", said)


@pytest.mark.parametrize("said", ["들어가세요", "네, 들어가세요.", "조심히 들어가세요", "네 들어가세요"])
def test_korean_goodbye_go_in_safely_still_ends_the_call(said):
    assert goodbye("ko-KR", said)


# ---- 2. Negated closings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, said", [
    ("it-IT", "non è tutto"), ("it-IT", "No, non è tutto."), ("it-IT", "non e tutto"),
    ("it-IT", "Non basta così, grazie."), ("pt-BR", "não é só isso"),
    ("pt-BR", "Não é só isso, obrigado"), ("pt-PT", "Não é tudo."), ("pt-PT", "nao e so isso obrigado"),
    ("es-MX", "No es todo, gracias."), ("es-US", "no es todo gracias"), ("id-ID", "Bukan itu saja."),
    ("ms-MY", "bukan itu sahaja"), ("fil-PH", "Hindi yun lang po."), ("ar-SA", "ليس هذا كل شيء"),
    # languages that negate inside the phrase or after it: the phrase is not how the sentence ends
    ("es-ES", "Eso no es todo."), ("fr-FR", "Ce n'est pas tout."), ("ru-RU", "Это не всё."),
    ("hr-HR", "To nije sve."), ("pl-PL", "To nie wszystko."), ("th-TH", "ไม่ใช่แค่นี้ครับ"),
    ("ko-KR", "안 끊을게요"), ("zh-CN", "先别说再见"), ("en-GB", "I never said goodbye"),
])
def test_a_negated_closing_is_no_goodbye(code, said):
    assert not goodbye(code, said)


@pytest.mark.parametrize("code, said", [
    ("it-IT", "No, è tutto."), ("it-IT", "è tutto"), ("pt-BR", "Não, é só isso."), ("pt-PT", "Não, é tudo."),
    ("es-MX", "No, es todo, gracias."), ("id-ID", "Tidak, itu saja, terima kasih."), ("en-US", "No, that's all."),
    ("en-US", "no that's all"), ("ar-SA", "لا، هذا كل شيء"),
])
def test_no_then_a_closing_is_still_a_goodbye(code, said):
    """"No, that's all": the comma tells the interjection from the negation."""
    assert goodbye(code, said)


@pytest.mark.parametrize("code, said", [
    ("fr-FR", "non c'est tout"), ("fr-FR", "Non c'est tout."), ("fr-FR", "non non c'est tout"),
    ("fr-CA", "Non c'est beau, merci"), ("fr-CA", "non c'est tout merci bye"),
    # "não", "hindi", "bukan" are also "No" in their own language: they negate only what they negate there
    ("pt-BR", "não tchau"), ("pt-BR", "Não até logo."), ("pt-PT", "nao adeus"), ("pt-BR", "não tchau tchau"),
    ("fil-PH", "hindi sige po salamat"), ("fil-PH", "Hindi paalam."), ("ms-MY", "bukan selamat tinggal"),
])
def test_no_before_a_closing_it_cannot_negate_is_an_interjection_even_without_a_comma(code, said):
    """French negates inside the phrase ("ce n'est pas tout"); "non" before "c'est tout" is always "No, that's all".
    Italian "non" negates only the words it negates there ("non è tutto", "non basta così"); Portuguese "não" a verb
    or "só" ("não é tudo", "não só isso"), never "tchau" or "até logo" (recognisers often drop the comma)."""
    assert goodbye(code, said)


# ---- 3. A goodbye asked as a question --------------------------------------------------------------------------

@pytest.mark.parametrize("code, said", [
    ("ar-SA", "مع السلامة؟"), ("el-GR", "Αντίο;"), ("el-GR", "Αντίο\u037e"), ("en-US", "bye?"),
    ("en-US", "bye\uff1f"), ("ja-JP", "以上です？"), ("zh-HK", "拜拜？"), ("he-IL", "להתראות?"),
])
def test_a_goodbye_asked_as_a_question_does_not_end_the_call(code, said):
    assert not goodbye(code, said)
    assert goodbye(code, said.rstrip(speech.QUESTION_MARKS + ";"))  # said, it would


def test_a_greek_question_ends_the_callers_sentence_as_any_question_does():
    assert completeness("Τι ώρα ανοίγετε;", "el-GR") is Completeness.SENTENCE_END
    assert completeness("هل أنتم مفتوحون؟", "ar-SA") is Completeness.SENTENCE_END
    assert completeness("I mean, well;", "en-US") is Completeness.INCOMPLETE  # a semicolon elsewhere is a pause


def test_a_semicolon_after_latin_words_is_no_question():
    assert not speech.ends_as_question("bye;") and speech.ends_as_question("γεια;")
    assert speech.ends_as_question("وداعا ؟")


def test_question_marks_are_defined_once_in_the_speech_module():
    """Every place that asks "is this a question?" reads speech.QUESTION_MARKS (or ends_as_question)."""
    for source in PACKAGE.rglob("*.py"):
        if source.name == "speech.py":
            continue
        text = source.read_text(encoding="utf-8")
        assert not re.search(r"^\s*_?[A-Z_]*QUESTION[A-Z_]*\s*[:=]", text, re.MULTILINE), source
        for mark in ("\\uff1f", "\\u061f", "\\u037e"):  # in code, marks are written as escapes
            assert mark not in text, (source, mark)


# ---- 4. Regional tags reach the nearest voice (CLDR parent locales) ---------------------------------------------

@pytest.mark.parametrize("code, expected", [
    *[(f"es-{region}", "es-MX") for region in "AR BO CL CO CR CU DO EC GT HN NI PA PE PR PY SV UY VE".split()],
    ("es-419", "es-MX"), ("es-US", "es-US"), ("es-MX", "es-MX"), ("es-ES", "es-ES"), ("es", "es-ES"),
    *[(f"pt-{region}", "pt-PT") for region in "AO MZ CV GW ST TL MO LU CH".split()],
    ("pt-BR", "pt-BR"), ("pt", "pt-BR"),
    *[(f"en-{region}", "en-GB") for region in "IE ZA MT GI 001 150 SG HK NG KE JM".split()],
    ("en-AU", "en-AU"), ("en-NZ", "en-NZ"), ("en-IN", "en-IN"), ("en-US", "en-US"), ("en-CA", "en-US"),
    ("en", "en-US"), ("EN_ie", "en-GB"), ("es_ar", "es-MX"),
])
def test_regional_variants_resolve_to_their_cldr_parents_voice(code, expected):
    assert TABLE.get(code).code == expected


def test_a_call_placed_in_argentine_spanish_speaks_with_the_latin_american_voice(client, fake_twilio):
    data = client.post("/api/make-call-optimized", json=make_call_body(language="es-AR")).get_json()
    assert data["success"], data
    store = client.application.extensions["callweaver"].store
    assert store.get_call(data["optimization"]["trackingId"]).language == "es-MX"


def test_readme_documents_the_regional_mapping():
    text = README.read_text(encoding="utf-8")
    for words in ("es-419", "es-AR", "pt-AO", "pt-MZ", "en-IE", "en-ZA", "CLDR"):
        assert words in text, words


# ---- 5. The demo speaks the language it is given ------------------------------------------------------------------

def test_simulate_demo_passes_lang_to_the_demo(monkeypatch, tmp_path):
    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        return demo_module.DemoResult("t", "u", "end_call_node", "end_node")

    monkeypatch.setattr(demo_module, "run_demo", fake_run_demo)
    code = simulate_main.main(["--demo", "--exit", "--lang", "fr-FR", "--db", str(tmp_path / "d.sqlite3")])
    assert code == 0 and seen.get("lang") == "fr-FR"


@pytest.mark.timeout(200)
def test_the_demo_call_is_placed_and_spoken_in_the_language_given(tmp_path):
    import io
    out = io.StringIO()
    result = demo_module.run_demo(script=["Hola, quiero comprar una casa."], llm_ttft_ms=20, llm_token_ms=2,
                                  db_path=str(tmp_path / "demo.sqlite3"), out=out, lang="es-AR")
    from callweaver.store.sqlite import SQLiteStore
    store = SQLiteStore(str(tmp_path / "demo.sqlite3"))
    try:
        assert store.get_call(result.tracking_id).language == "es-MX"  # es-AR speaks with the es-419 voice
        assert [turn["language"] for turn in store.turns(result.tracking_id)] == ["es-MX"]
    finally:
        store.close()
    assert re.search(r"answered in es-MX", out.getvalue())


# ---- 6. One short word in another language does not switch the call -----------------------------------------------

@pytest.mark.parametrize("said, enough", [
    ("No.", False), ("OK", False), ("Si", False), ("Sí.", False), ("好的", False), ("はい", False),
    ("Sí, claro.", True), ("Quiero comprar una casa", True), ("ありがとう", True), ("我想买房子", True),
    ("ขอบคุณครับ", True),
    # one word said twice or thrice says no more than once
    ("No, no.", False), ("Sí, sí.", False), ("OK OK", False), ("si si si", False), ("はいはい", False),
    ("好的好的", False), ("No, no, claro.", True),
])
def test_how_much_an_utterance_must_say_to_switch(said, enough):
    assert speech.long_enough_to_switch(said) is enough


@pytest.fixture
def relay(app, client):
    """A relay call placed in en-GB (Deepgram `multi`: Spanish and others declared), and a way to talk on it."""
    call = InProcessRelayCall(app, client, make_call_body(language="en-GB"))

    def say(text: str, lang: str) -> list[dict]:
        return call.say(text, lang, settle_s=0.05)

    say.turns = call.turns
    say.record = lambda: call.svc.store.get_call(call.tracking_id)
    return say


@pytest.mark.parametrize("word", ["Si", "No.", "OK", "No, no.", "Sí, sí."])
def test_one_short_word_recognised_in_spanish_does_not_switch_an_english_call(relay, fake_llm, word):
    fake_llm.responder = real_estate_brain
    frames = relay(word, "es")
    assert not [f for f in frames if f.get("type") == "language"], frames
    assert relay.turns()[-1]["language"] == "en-GB" and relay.record().language == "en-GB"


def test_a_spanish_sentence_still_switches_an_english_call(relay, fake_llm):
    fake_llm.responder = real_estate_brain
    frames = relay("Quiero comprar una casa, por favor.", "es")
    assert [f for f in frames if f.get("type") == "language"][0]["ttsLanguage"] == "es-ES"
    assert relay.turns()[-1]["language"] == "es-ES"


@pytest.mark.parametrize("said", ["Adiós.", "Gracias, adiós.", "Hasta luego."])
def test_a_goodbye_in_another_language_ends_the_call_with_its_own_languages_closing(relay, fake_llm, said):
    fake_llm.responder = real_estate_brain
    frames = relay(said, "es")
    assert not [f for f in frames if f.get("type") == "language"], frames
    spoken = "".join(f.get("token", "") for f in frames if f.get("type") == "text")
    turn = relay.turns()[-1]
    assert turn["language"] == "en-GB" and relay.record().language == "en-GB"
    assert turn["source"] == "canned" and turn["action"] == "end", turn
    assert spoken and not re.search(r"[áéíóúñ¡]|adiós|gracias", spoken, re.IGNORECASE), spoken


@pytest.mark.parametrize("said", ["Thanks, bye.", "That's all, thanks.", "Cheers, bye then, goodbye."])
def test_a_goodbye_in_the_calls_own_language_tagged_as_another_ends_the_call_without_switching(relay, fake_llm, said):
    """Deepgram `multi` tags a short English goodbye as Spanish now and then: the call's own goodbye still ends it,
    in its own language, rather than switching to Spanish for an LLM turn."""
    fake_llm.responder = real_estate_brain
    frames = relay(said, "es")
    assert not [f for f in frames if f.get("type") == "language"], frames
    turn = relay.turns()[-1]
    assert turn["language"] == "en-GB" and relay.record().language == "en-GB"
    assert turn["source"] == "canned" and turn["action"] == "end", turn
