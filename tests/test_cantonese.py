"""A Cantonese (zh-HK) call: relay attributes, Gather voices, the Cantonese instruction, canned lines, goodbye."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.conftest import PUBLIC, base_env
from tests.fakes.fake_llm import Reply
from tests.helpers import make_call_body, twiml_optimized_path


@pytest.fixture
def env(tmp_path, fake_twilio, fake_llm, fake_llm2):
    # the clinic transfers to a Hong Kong nurse line, so +852 must be an allowed destination
    return {**base_env(tmp_path, fake_twilio, fake_llm, fake_llm2), "ALLOWED_DESTINATION_PREFIXES": "+1,+852"}


def _call(client, twilio, fake_twilio, route="/api/make-call-optimized"):
    data = client.post(route, json=make_call_body(workflow="clinic_cantonese_transfer", to="+15551230000")).get_json()
    assert data["success"], data
    create = fake_twilio.creates()[-1]
    if route == "/api/make-call":
        return data, ET.fromstring(twilio.post(create.one("Url")[len(PUBLIC):], {"CallSid": data["callSid"]}).data)
    # A relay call goes out with its TwiML inline (Twilio runs it on answer): the same text as the webhook's answer.
    answer = twilio.post(twiml_optimized_path(data["optimization"]["trackingId"], "wf_clinic_cantonese_transfer"),
                         {"CallSid": data["callSid"]}).get_data(as_text=True)
    assert create.one("Url") is None and create.one("Twiml") == answer
    return data, ET.fromstring(answer)


def test_cantonese_relay_attributes(client, twilio, fake_twilio, fake_llm):
    data, root = _call(client, twilio, fake_twilio)
    assert data["optimization"]["language"] == "zh-HK"
    relay = root.find("Connect/ConversationRelay")
    assert relay.get("language") == "zh-HK"
    assert relay.get("ttsProvider") == "Google" and relay.get("voice").startswith("yue-HK-Chirp3-HD-")
    assert relay.get("transcriptionProvider") == "Deepgram" and relay.get("speechModel") == "nova-3-general"
    assert relay.get("welcomeGreeting") == "你好，呢度係康健診所。請問有咩可以幫到你？"
    assert relay.get("transcriptionLanguage") is None  # Deepgram `multi` has no Chinese: recognition stays zh-HK
    assert relay.get("hints") == "Dr Chan,Dr Wong"  # the flow's doctors, so recognition spells them right
    assert fake_llm.requests == []


def test_cantonese_gather_flow_voice_instruction_and_goodbye(client, twilio, fake_twilio, fake_llm, fake_llm2):
    data, root = _call(client, twilio, fake_twilio, route="/api/make-call")
    say = root.find("Say")
    assert say.get("voice") == "Google.yue-HK-Standard-A" and say.get("language") == "yue-HK"
    assert root.find("Gather").get("language") == "yue-Hant-HK"  # Google's Cantonese recognition code
    action = root.find("Gather").get("action")[len(PUBLIC):]

    fake_llm.push(Reply(text="好呀，你想預約邊一日？", tool_calls=[("transition", {"edge_id": "e_book"})]))
    root = ET.fromstring(twilio.post(action, {"CallSid": data["callSid"], "SpeechResult": "我想预约睇医生"}).data)
    system = fake_llm.requests[0].messages[0]["content"]
    assert "Cantonese" in system and "Traditional" in system and "係" in system
    assert "好呀，你想預約邊一日？" in root.find("Say").text

    # every provider down: the apology is spoken in Cantonese and the call goes on
    fake_llm.fault = fake_llm2.fault = "500"
    root = ET.fromstring(twilio.post(action, {"CallSid": data["callSid"], "SpeechResult": "聽日得唔得？"}).data)
    assert "唔好意思" in root.find("Say").text and root.find("Gather") is not None
    fake_llm.fault = fake_llm2.fault = None

    n = len(fake_llm.requests)
    root = ET.fromstring(twilio.post(action, {"CallSid": data["callSid"], "SpeechResult": "唔該，拜拜"}).data)
    assert len(fake_llm.requests) == n  # the goodbye is recognised without an LLM call
    assert [c.tag for c in root] == ["Say", "Hangup"]
    assert "拜拜" in root.find("Say").text
