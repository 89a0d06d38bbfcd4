"""ConversationRelay messages as typed classes: every inbound frame parses or becomes one logged error."""
from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from callweaver.engine import relay_protocol as protocol


@pytest.mark.parametrize("frame, expected", [
    ({"type": "setup", "callSid": "CA1", "from": "+1555", "direction": "outbound-api",
      "customParameters": {"trackingId": "call_1"}},
     protocol.Setup("CA1", {"trackingId": "call_1"}, {"from": "+1555", "direction": "outbound-api"})),
    ({"type": "prompt", "voicePrompt": "hello", "lang": "en-US", "last": True}, protocol.Prompt("hello", True, "en-US")),
    ({"type": "prompt", "voicePrompt": "hel", "last": False}, protocol.Prompt("hel", False, None)),
    ({"type": "interrupt", "utteranceUntilInterrupt": "Hi the", "durationUntilInterruptMs": 850},
     protocol.Interrupt("Hi the", 850)),
    ({"type": "dtmf", "digit": "5"}, protocol.Dtmf("5")),
    ({"type": "info", "name": "agentSpeaking", "value": "off"}, protocol.Info("agentSpeaking", "off")),
    ({"type": "error", "description": "Invalid message (64107)"}, protocol.Error("Invalid message (64107)")),
])
def test_each_inbound_message_parses_to_its_class(frame, expected):
    assert protocol.parse(json.dumps(frame)) == expected


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", "null", b"\xff\xfe", json.dumps({"type": 7})])
def test_a_bad_frame_is_one_logged_record_and_none(raw):
    with capture_logs() as logs:
        assert protocol.parse(raw) is None
    assert len(logs) == 1 and logs[0]["event"] in ("relay_bad_message", "relay_unknown_message")


def test_odd_field_types_never_raise():
    assert protocol.parse(json.dumps({"type": "prompt", "voicePrompt": 5, "last": "no"})) == protocol.Prompt("", True)
    assert protocol.parse(json.dumps({"type": "setup", "customParameters": "x"})) == protocol.Setup(None, {}, {})
    assert protocol.parse(json.dumps({"type": "interrupt", "durationUntilInterruptMs": True})) == protocol.Interrupt()


def test_outbound_messages_serialise_with_the_documented_field_names():
    assert protocol.serialise(protocol.Text("Hi")) == {"type": "text", "token": "Hi", "last": False}
    assert protocol.close_cycle() == {"type": "text", "token": "", "last": True}
    assert protocol.language("es-ES", None) == {"type": "language", "ttsLanguage": "es-ES"}
    assert protocol.end("transfer", destination="+1555") == {
        "type": "end", "handoffData": json.dumps({"reason": "transfer", "destination": "+1555"})}
    assert protocol.send_digits("1w2#") == {"type": "sendDigits", "digits": "1w2#"}
    with pytest.raises(ValueError):
        protocol.send_digits("12a")
    assert protocol.play("https://x.test/a.mp3", interruptible=False) == {
        "type": "play", "source": "https://x.test/a.mp3", "loop": 1, "interruptible": False}
    assert protocol.Info("agentSpeaking", "OFF").agent_fell_silent


def test_client_speaking_events_say_when_the_caller_starts_and_stops():
    assert protocol.parse('{"type": "info", "name": "clientSpeaking", "value": "off"}').client_speaking is False
    assert protocol.Info("clientSpeaking", "ON").client_speaking is True
    assert protocol.Info("clientSpeaking", "maybe").client_speaking is None
    assert protocol.Info("agentSpeaking", "off").client_speaking is None
    assert not protocol.Info("clientSpeaking", "off").agent_fell_silent
