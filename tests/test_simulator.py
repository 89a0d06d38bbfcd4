"""The README's promises: the service runs on embedded defaults, and the simulator tries a flow with no phone."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import websocket

from callweaver.simulate import RelayCaller, http
from callweaver.simulate.relay_model import TwilioRelayModel
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.fakes.fake_llm import FakeLLM
from tests.fakes.live_server import REPO, LiveServer, free_port
from tests.helpers import FIXTURES
from tests.scripted_brain import real_estate_brain


def test_service_starts_on_embedded_defaults_and_says_what_is_missing(tmp_path):
    env = {k: "" for k in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER", "AZURE_OPENAI_API_KEY",
                           "AZURE_OPENAI_ENDPOINT", "OPENAI_API_KEY", "OPENAI_BASE_URL", "REDIS_URL",
                           "PUBLIC_BASE_URL", "WEBHOOK_BASE_URL")}
    env["CALLWEAVER_DB"] = str(tmp_path / "default.sqlite3")
    env["CACHE_DIR"] = str(tmp_path / "cache")
    with LiveServer(env, workers=1) as server:
        health = http("GET", server.url + "/health")
        assert health.status == 200 and health.json()["status"] == "degraded"
        assert any("TWILIO_AUTH_TOKEN" in w for w in health.json()["warnings"])
        resp = http("POST", server.url + "/api/make-call-optimized", json_body={"to": "+15551234567"})
        assert resp.status == 503 and "TWILIO_ACCOUNT_SID" in resp.json()["error"]


@pytest.mark.parametrize("speech", [[], ["--partials", "--words-per-minute", "600"]], ids=["final", "partials"])
def test_simulator_cli_replays_a_script_through_the_relay(tmp_path, speech):
    twilio_port = free_port()
    with FakeLLM("sim") as llm:
        llm.responder = real_estate_brain
        env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
               "TWILIO_PHONE_NUMBER": "+15005550006", "TWILIO_API_BASE_URL": f"http://127.0.0.1:{twilio_port}",
               "LLM_PROVIDERS": "openai", "OPENAI_BASE_URL": llm.url, "OPENAI_API_KEY": "sk-sim-000000",
               "AZURE_OPENAI_API_KEY": "", "REDIS_URL": "", "CALLWEAVER_DB": str(tmp_path / "sim.sqlite3"),
               "CACHE_DIR": str(tmp_path / "cache"), "CACHE_PREWARM": "0"}
        script = REPO / "tests" / "fixtures" / "scripts" / "real_estate_buyer.txt"  # the README's example
        with LiveServer(env, workers=1) as server:
            out = subprocess.run(
                [sys.executable, "-m", "callweaver.simulate", "--base-url", server.url,
                 "--workflow", str(FIXTURES / "real_estate_property_dealer.json"), "--script", str(script),
                 "--auth-token", AUTH_TOKEN, "--account-sid", ACCOUNT_SID, "--twilio-port", str(twilio_port),
                 *speech],
                cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    text = out.stdout
    assert "agent (welcome greeting): Hello! Thank you for calling Premier Properties" in text
    assert "Wonderful, let's find you a home." in text and "first token" in text
    assert "session ended: {'reason': 'end'" in text and "<Hangup />" in text


class _RecordingSocket:
    """Stands in for the relay socket: keeps what the scripted caller sends; CallWeaver never answers."""

    def __init__(self):
        self.sent: list[dict] = []
        self._timeout = 0.0

    def send(self, raw: str) -> None:
        self.sent.append(json.loads(raw))

    def settimeout(self, seconds: float) -> None:
        self._timeout = seconds

    def recv(self):
        time.sleep(self._timeout)
        raise websocket.WebSocketTimeoutException()


def _spoken_events(debug: str, **options) -> list[tuple]:
    caller = RelayCaller("http://127.0.0.1:9", AUTH_TOKEN, timeout_s=0.05, vad_hangover_ms=100, **options)
    caller.twilio = TwilioRelayModel.from_twiml({"debug": debug}, [], 80.0)
    caller.ws = _RecordingSocket()
    with pytest.raises(TimeoutError):  # nobody answers the final
        caller.speak("one two three four", words_per_minute=6000, end_of_speech_ms=300, punctuated_partials=False,
                     pauses_s={1: 0.05, 2: 0.3})
    return [(m["type"], m.get("value") if m["type"] == "info" else m.get("voicePrompt"), m.get("last"))
            for m in caller.ws.sent]


def test_scripted_caller_reports_its_voice_activity_around_speech():
    """clientSpeaking on as speech starts; off only after a silence longer than the VAD hangover (the 300 ms pause,
    not the 50 ms one), on again as the caller goes on; off at the end, before the final."""
    assert _spoken_events("speaker-events") == [
        ("info", "on", None), ("prompt", "one", False), ("prompt", "one two", False),
        ("info", "off", None), ("info", "on", None), ("prompt", "one two three", False),
        ("prompt", "one two three four", False), ("info", "off", None), ("prompt", "one two three four", True)]
    # Without speaker events in the TwiML (or with a Twilio that sends none), only the transcripts.
    plain = [("prompt", "one", False), ("prompt", "one two", False), ("prompt", "one two three", False),
             ("prompt", "one two three four", False), ("prompt", "one two three four", True)]
    assert _spoken_events("") == plain
    assert _spoken_events("speaker-events", client_speaking_events=False) == plain
