"""A silent line: the flow's call limits (config.globalSettings maxCallDuration, silenceTimeout) and the relay's
"are you still there?" re-prompt, then goodbye and `end` (reason "silence") after a second silence. Over the real
production server (gunicorn, gevent workers), driven by the scripted caller with Twilio's speaker events."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from callweaver.engine.languages import LanguageTable
from callweaver.simulate import RelayCaller
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body

SILENCE_S = 0.3
EN = LanguageTable.load().get("en-US")
AGENT_SILENT = {"type": "info", "name": "agentSpeaking", "value": "off"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("silence")
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    llm = FakeLLM("primary").start()
    env = base_env(tmp, twilio, llm)
    env.pop("PUBLIC_BASE_URL")
    server = LiveServer(env, workers=1).start()
    yield {"server": server, "twilio": twilio, "llm": llm}
    server.stop()
    for fake in (twilio, llm):
        fake.stop()


@pytest.fixture
def llm(stack):
    stack["llm"].reset()
    return stack["llm"]


def body_with(**global_settings) -> dict:
    body = make_call_body()
    body["config"]["globalSettings"].update(global_settings)
    return body


def new_call(stack, body=None, **caller_options) -> RelayCaller:
    caller = RelayCaller(stack["server"].url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15, **caller_options)
    caller.place_call(body or body_with(silenceTimeout=SILENCE_S))
    caller.answer(stack["twilio"].creates()[-1].one("Url"))
    caller.connect()
    caller.send(AGENT_SILENT)  # Twilio has spoken the welcome greeting (the caller model does not play it)
    return caller


def next_message(caller: RelayCaller, kind: str) -> dict:
    while (message := caller.recv()) is not None:
        if message.get("type") == kind and (kind != "text" or message.get("token")):
            return message
    raise AssertionError(f"no {kind} message; got {caller.received}")


def test_a_silent_caller_is_reprompted_then_told_goodbye_and_the_call_ends_with_reason_silence(stack, llm):
    caller = new_call(stack)
    assert next_message(caller, "text") == {"type": "text", "token": EN.line("reprompt"), "last": True}
    assert next_message(caller, "text")["token"] == EN.line("goodbye")  # after a second silence
    end = next_message(caller, "end")
    assert json.loads(end["handoffData"]) == {"reason": "silence"}
    caller.hangup()
    assert llm.requests == []  # nothing was said: no turn
    twiml = caller.connect_action("completed", json.loads(end["handoffData"]))
    assert [c.tag for c in ET.fromstring(twiml.text)] == ["Hangup"]  # the goodbye was spoken on the relay


def test_a_caller_answering_the_reprompt_keeps_the_call(stack, llm):
    llm.push(Reply(text="Great, let's go on."))
    caller = new_call(stack)
    assert next_message(caller, "text")["token"] == EN.line("reprompt")
    reply = caller.say("Yes, I'm here")
    assert reply.text == "Great, let's go on." and reply.end is None
    # The silence starts again after the reply: a re-prompt, not a goodbye (the caller answered the first one).
    assert next_message(caller, "text")["token"] == EN.line("reprompt")
    caller.hangup()


def test_no_reprompt_while_a_long_reply_plays(stack, llm):
    words = "This is a long answer about the three bedroom houses we have on the market this week, " * 3
    llm.push(Reply(text=words.strip(), token_interval_s=0.01))
    caller = new_call(stack, speaking_rate_cps=120.0)  # about two seconds of speech, several silence timeouts
    sent_at: list[tuple[int, dict]] = []
    send = caller.send
    caller.send = lambda message: (sent_at.append((len(caller.received), message)), send(message))[-1]
    reply = caller.say("Tell me about the houses")
    assert reply.text == words.strip()
    reprompt = next_message(caller, "text")
    assert reprompt["token"] == EN.line("reprompt")
    # Twilio reported the reply played (agentSpeaking off) before the re-prompt was sent, not while it played.
    played = [index for index, message in sent_at if message == AGENT_SILENT]
    assert played and played[0] < caller.received.index(reprompt)
    caller.hangup()


def test_silence_handling_off_when_the_server_and_flow_say_nothing(stack, llm):
    """The flow's silenceTimeout overrides SILENCE_TIMEOUT_S; a value that is no positive number is ignored (the
    server's 20 s applies: no re-prompt within this test's short listen)."""
    caller = new_call(stack, body_with(silenceTimeout="soon"))
    caller.listen(4 * SILENCE_S)
    assert not [m for m in caller.received if m.get("type") == "text"]
    caller.hangup()


@pytest.mark.parametrize("minutes, time_limit", [(30, "1800"), (120, "3600"), (1e300, "3600"), (0, "3600"),
                                                 (-5, "3600"), ("abc", "3600"), (None, "3600"), ("2", "120"),
                                                 (0.1, "60")])
def test_twilio_time_limit_is_the_flows_max_call_duration_capped_by_the_operators(stack, minutes, time_limit):
    caller = RelayCaller(stack["server"].url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
    caller.place_call(body_with(maxCallDuration=minutes))
    assert stack["twilio"].creates()[-1].one("TimeLimit") == time_limit  # MAX_CALL_DURATION_S: 3600
