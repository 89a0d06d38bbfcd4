"""Every language switch a relay call can make names a language its TwiML declared, in both directions.

Deepgram `multi` reports only the primary subtag (prompt.lang = "en"), so a switch back must land on the
caller's own regional variant (en-GB), never on the table's default for that language (en-US).
"""
from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest

from callweaver.engine.languages import LanguageTable, primary_subtag
from callweaver.simulate.relay_model import TwilioRelayModel
from tests.helpers import make_call_body, twiml_optimized_path

TABLE = LanguageTable.load()
MULTILINGUAL_HOMES = [entry.code for entry in TABLE if len(TABLE.switch_targets(entry)) > 1]


def test_every_regional_variant_of_an_auto_detecting_language_can_switch():
    assert {"en-GB", "en-AU", "en-IN", "en-NZ", "es-MX", "es-US", "fr-CA", "pt-PT", "nl-BE"} <= set(MULTILINGUAL_HOMES)


@pytest.mark.parametrize("home", MULTILINGUAL_HOMES)
def test_every_pair_of_declared_languages_switches_both_ways_by_primary_subtag(home):
    declared = [entry.code for entry in TABLE.switch_targets(TABLE.get(home))]
    assert declared[0] == home and len({primary_subtag(code) for code in declared}) == len(declared)
    for a, b in itertools.permutations(declared, 2):
        target = TABLE.switch_target(a, primary_subtag(b), declared=declared)
        assert target is not None and target.code == b, (home, a, b)


@pytest.mark.parametrize("home", MULTILINGUAL_HOMES)
def test_a_full_tag_for_an_undeclared_variant_lands_on_the_declared_one(home):
    declared = [entry.code for entry in TABLE.switch_targets(TABLE.get(home))]
    for code in TABLE.codes:
        target = TABLE.switch_target(home, code, declared=declared)
        assert target is None or target.code in declared


@pytest.mark.parametrize("home", ["en-US", "zh-HK", "ar-SA", "sv-SE"])
def test_languages_outside_the_declared_set_are_never_targets(home):
    declared = [entry.code for entry in TABLE.switch_targets(TABLE.get(home))]
    for code in ["en", "es", "fr", "zh", "yue", "de-DE", "es-MX", "zh-CN", "ar"]:
        target = TABLE.switch_target(home, code, declared=declared)
        assert target is None or target.code in declared


def _relay_twiml(client, twilio, fake_twilio, language):
    data = client.post("/api/make-call-optimized", json=make_call_body(language=language)).get_json()
    assert data["success"], data
    inline = fake_twilio.creates()[-1].one("Twiml")  # what Twilio runs on answer
    answer = twilio.post(twiml_optimized_path(data["optimization"]["trackingId"]), {"CallSid": data["callSid"]})
    assert inline == answer.get_data(as_text=True)  # the same TwiML as the webhook's (a reconnect's source)
    return ET.fromstring(inline).find("Connect/ConversationRelay")


@pytest.mark.parametrize("home", MULTILINGUAL_HOMES)
def test_twiml_declares_every_switch_target_with_its_voice_and_recognition(client, twilio, fake_twilio, home):
    relay = _relay_twiml(client, twilio, fake_twilio, home)
    declared = {element.get("code"): element.attrib for element in relay.iter("Language")}
    assert list(declared) == [entry.code for entry in TABLE.switch_targets(TABLE.get(home))]
    for code, attrib in declared.items():
        relay_config = TABLE.get(code).relay
        assert attrib == {"code": code, "ttsProvider": relay_config["ttsProvider"], "voice": relay_config["voice"],
                          "transcriptionProvider": relay_config["transcriptionProvider"],
                          "speechModel": relay_config["speechModel"]}
    model = TwilioRelayModel.from_twiml(dict(relay.attrib), list(declared), rate_cps=50)
    for code in declared:  # Twilio accepts a switch to each of them
        assert model.receive({"type": "language", "ttsLanguage": code}) == (True, [])


# ---- the simulator refuses what Twilio refuses -------------------------------------------------------

def _model(**attributes):
    return TwilioRelayModel.from_twiml({"language": "en-GB", **attributes}, ["en-GB", "es-ES"], rate_cps=100)


@pytest.mark.parametrize("message", [
    {"type": "text"}, {"type": "text", "token": None}, {"type": "text", "token": 5},
    {"type": "text", "token": "Hi", "last": "yes"}, {"type": "text", "token": "Hi", "interruptible": "any"},
    {"type": "text", "token": "Hi", "lang": "de-DE"}, {"type": "language"},
    {"type": "language", "ttsLanguage": "en-US"}, {"type": "language", "transcriptionLanguage": "fr-FR"},
    {"type": "sendDigits", "digits": "12a"}, {"type": "play", "source": "file.mp3"}, {"type": "end", "handoffData": {}},
    {"type": "speak", "token": "Hi"}, ["not", "an", "object"],
])
def test_the_simulator_answers_a_message_twilio_would_refuse_with_an_error(message):
    model = _model()
    accepted, replies = model.receive(message)
    assert accepted is False and replies[0]["type"] == "error" and "64107" in replies[0]["description"]
    assert model.tts_language == "en-GB"  # a refused switch leaves the voice where it was


@pytest.mark.parametrize("message", [
    {"type": "text", "token": "Hello ", "last": False}, {"type": "text", "token": "", "last": True},
    {"type": "text", "token": "Hola", "lang": "es-ES", "interruptible": False, "preemptible": True},
    {"type": "language", "ttsLanguage": "es-ES"}, {"type": "language", "transcriptionLanguage": "multi"},
    {"type": "sendDigits", "digits": "1w2#*"}, {"type": "play", "source": "https://example.test/a.mp3", "loop": 2},
    {"type": "end", "handoffData": "{}"}, {"type": "end"},
])
def test_the_simulator_accepts_documented_messages(message):
    assert _model().receive(message) == (True, [])


def test_the_playback_model_reports_speaking_at_its_rate():
    now = [100.0]
    model = TwilioRelayModel.from_twiml({"language": "en-GB", "debug": "speaker-events"}, [], rate_cps=10,
                                        clock=lambda: now[0])
    assert model.receive({"type": "text", "token": "Hello there", "last": True})[1] == [
        {"type": "info", "name": "agentSpeaking", "value": "on"}]
    now[0] += 1.0
    assert model.tick() == [] and model.playback.heard == ""  # 11 characters take 1.1 s
    now[0] += 0.2
    assert model.tick() == [{"type": "info", "name": "agentSpeaking", "value": "off"}]
    assert model.playback.heard == "Hello there"


def test_without_debug_speaker_events_the_simulator_sends_no_info():
    model = _model()
    assert model.receive({"type": "text", "token": "Hi", "last": True}) == (True, [])


@pytest.mark.parametrize("home", ["en-GB", "zh-HK", "pl-PL"])
def test_make_call_stores_what_the_relay_twiml_declares_so_the_webhook_writes_nothing(client, twilio, fake_twilio,
                                                                                       home, monkeypatch):
    """The relay languages are recorded when the call is placed; the TwiML webhook finds them already stored."""
    store = client.application.extensions["callweaver"].store
    data = client.post("/api/make-call-optimized", json=make_call_body(language=home)).get_json()
    tracking_id = data["optimization"]["trackingId"]
    placed_meta = store.get_call(tracking_id).meta
    writes = []
    monkeypatch.setattr(store, "update_meta", lambda *args, **kwargs: writes.append(args))
    answer = twilio.post(twiml_optimized_path(tracking_id), {"CallSid": data["callSid"]}).data
    assert fake_twilio.creates()[-1].one("Twiml").encode() == answer  # placed inline: Twilio asks for nothing
    relay = ET.fromstring(answer).find("Connect/ConversationRelay")
    targets = TABLE.switch_targets(TABLE.get(home))
    declared = [element.get("code") for element in relay.iter("Language")] or [relay.get("language")]
    assert placed_meta == {"multilingualStt": len(targets) > 1, "homeLanguage": TABLE.get(home).code,
                           "relayLanguages": declared}
    assert writes == []
