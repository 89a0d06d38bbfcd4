"""The end-of-utterance signal: how a partial ends, the caller's cadence, and the wait they give (pure, no clock)."""
from __future__ import annotations

import pytest

from callweaver.engine.conversation import SpeculationPolicy
from callweaver.engine.end_of_utterance import CONTINUATION_WORDS, Completeness, SpeechCadence, completeness

C = Completeness


@pytest.mark.parametrize("text, lang, expected", [
    ("Is there a place near the park?", "en-US", C.SENTENCE_END),
    ("Is there a place near the", "en-US", C.INCOMPLETE),
    ("Is there a place near the park", "en-US", C.COMPLETE),
    ("I'd", "en-GB", C.INCOMPLETE),          # "I'd" needs more; "ID" can end a turn
    ("Can I see my ID", "en-US", C.COMPLETE),
    ("I want to buy, um", "en-US", C.INCOMPLETE),
    ("Turn 1 of caller 2:", "en-US", C.INCOMPLETE),
    ("well...", "en-US", C.INCOMPLETE),
    ("Quiero una mesa para", "es-ES", C.INCOMPLETE),
    ("Quiero una mesa", "es-MX", C.COMPLETE),
    ("Je voudrais réserver une", "fr-FR", C.INCOMPLETE),
    ("Ich möchte einen", "de-DE", C.INCOMPLETE),
    ("Ich komme mit", "de-DE", C.COMPLETE),   # a separable particle ends German sentences: not in the list
    ("Habari yako", "sw-KE", C.UNKNOWN),      # no word list: the plain window, never a guess
    ("Habari yako?", "sw-KE", C.SENTENCE_END),
    ("hello", None, C.UNKNOWN),
    # The marks that end a sentence in the reply text end the caller's sentence too (one definition, speech.py).
    ("هل لديكم طاولة؟", "ar-SA", C.SENTENCE_END),  # Arabic question mark
    ("मुझे एक टेबल चाहिए।", "hi-IN", C.SENTENCE_END),  # Devanagari danda
    ("我想訂一張枱，", "zh-HK", C.INCOMPLETE),  # a full-width comma: mid-sentence
    ("مرحبا،", "ar-SA", C.INCOMPLETE),            # an Arabic comma: mid-sentence
    ("¿Qué tal? ¿", "es-ES", C.INCOMPLETE),  # an opening "¿": a new sentence has begun
])
def test_completeness(text, lang, expected):
    assert completeness(text, lang) is expected


def test_reply_text_and_transcripts_share_the_sentence_marks():
    """A mark that ends a sentence in the reply text ends the caller's transcript too, and the other way round."""
    from callweaver.engine.reply_text import SENTENCE_END
    from callweaver.engine.speech import SENTENCE_END_MARKS

    for mark in SENTENCE_END_MARKS:
        assert SENTENCE_END.search(f"done{mark}"), mark
        assert completeness(f"done{mark}", "en-US") is C.SENTENCE_END, mark


def test_word_lists_hold_no_word_that_ends_a_turn():
    enders = {"en": {"you", "it", "so", "though", "in", "on", "up", "out", "yes", "no", "id"},
              "de": {"mit", "zu", "an", "auf", "aus", "nach", "das", "ja", "nein"},
              "es": {"sí", "no", "lo"}, "fr": {"oui", "non", "il", "nous", "vous"}}
    for lang, words in enders.items():
        assert not CONTINUATION_WORDS[lang] & words, lang


def test_cadence_keeps_pauses_after_complete_looking_words_within_a_turn():
    cadence = SpeechCadence()
    at = 0.0
    for text, how in [("one", C.COMPLETE), ("one two", C.COMPLETE), ("one two of", C.INCOMPLETE),
                      ("one two of three", C.COMPLETE)]:
        cadence.heard(at, text, how)
        at += 0.3
    assert cadence.usual_pause_s() is None  # two pauses after complete-looking words: not enough yet
    cadence.heard(at - 0.3, "one two of three", C.COMPLETE)  # the same words again: not a pause
    cadence.turn_ended()
    cadence.heard(10.0, "four", C.COMPLETE)    # the silence between turns is not a pause
    cadence.heard(10.5, "four five", C.COMPLETE)
    assert cadence.usual_pause_s() == pytest.approx(0.5)
    cadence.heard(20.0, "four five six", C.COMPLETE)  # a long thinking pause is not the caller's pace
    assert cadence.usual_pause_s() == pytest.approx(0.5)


def test_window_follows_how_the_partial_ends_and_the_cadence():
    policy = SpeculationPolicy(enabled=True, stable_ms=400, incomplete_ms=1000, cadence_margin_ms=40)
    assert policy.window_s(C.SENTENCE_END, None) == 0.0
    assert policy.window_s(C.UNKNOWN, 0.2) == 0.4
    assert policy.window_s(C.INCOMPLETE, 0.2) == 1.0
    assert policy.window_s(C.COMPLETE, None) == 0.4               # cadence not known yet: the plain window
    assert policy.window_s(C.COMPLETE, 0.2) == pytest.approx(0.24)   # a quick talker: sooner
    assert policy.window_s(C.COMPLETE, 0.6) == pytest.approx(0.64)   # a slow one: not between their words
    assert policy.window_s(C.COMPLETE, 5.0) == 1.0                   # never longer than after an incomplete one
    plain = SpeculationPolicy(enabled=True, stable_ms=400, end_of_utterance=False)
    assert plain.window_s(C.INCOMPLETE, 0.2) == plain.window_s(C.COMPLETE, 0.2) == 0.4
    assert plain.window_s(C.SENTENCE_END, None) == 0.0


def test_end_of_speech_starts_a_speculation_unless_the_words_are_mid_sentence():
    policy = SpeculationPolicy(enabled=True)
    assert policy.starts_at_end_of_speech(Completeness.COMPLETE)
    assert policy.starts_at_end_of_speech(Completeness.UNKNOWN)
    assert policy.starts_at_end_of_speech(Completeness.SENTENCE_END)
    assert not policy.starts_at_end_of_speech(Completeness.INCOMPLETE)  # a hesitation after "the"
    assert SpeculationPolicy(enabled=True, end_of_utterance=False).starts_at_end_of_speech(Completeness.INCOMPLETE)
    assert not SpeculationPolicy(enabled=True, speaker_events=False).starts_at_end_of_speech(Completeness.COMPLETE)
