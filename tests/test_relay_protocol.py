"""ConversationRelay as Twilio documents it, on the real gunicorn server, with the simulator playing Twilio.

The simulator refuses what Twilio refuses (undeclared languages, malformed messages) by answering with an
`error`, and speaks at a fixed rate reporting `info` agentSpeaking events, so these tests can tell what a
caller would actually hear. Each test here failed on the code before issue 15.
"""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import pytest

from callweaver.simulate import RelayCaller, http, twilio_signature
from callweaver.simulate import Reply as CallerReply
from callweaver.store.sqlite import SQLiteStore
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import load_workflow, make_call_body
from tests.scripted_brain import real_estate_brain

# Homes with a regional variant that is not the table's default for its language, and the defaults.
REGIONAL_HOMES = ["en-GB", "en-AU", "en-IN", "en-NZ", "es-MX", "es-US", "fr-CA", "pt-PT", "nl-BE"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relay_protocol")
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    primary = FakeLLM("primary").start()
    env = base_env(tmp, twilio, primary)
    env["PUBLIC_BASE_URL"] = ""  # callback URLs follow each request's Host, as behind a proxy
    server = LiveServer(env, workers=2).start()
    yield {"server": server, "twilio": twilio, "llm": primary, "db": env["CALLWEAVER_DB"]}
    server.stop()
    for fake in (twilio, primary):
        fake.stop()


@pytest.fixture
def llm(stack):
    stack["llm"].reset()
    return stack["llm"]


def new_call(stack, body=None, **caller_options) -> RelayCaller:
    caller = RelayCaller(stack["server"].url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15, **caller_options)
    caller.place_call(body or make_call_body())
    caller.answer_placed(stack["twilio"].creates()[-1])
    return caller


def record_of(stack, caller):
    return SQLiteStore(stack["db"]).get_call(caller.tracking_id)


def drive_to_summary(caller):
    for speech in ["I want to buy a house", "A three bedroom house", "My name is Ann"]:
        assert caller.say(speech).end is None


def read_until_end(caller, quiet_s: float = 8) -> list[dict]:
    """Everything CallWeaver sends up to its `end` (or until it falls quiet or closes the socket)."""
    messages = []
    while (msg := caller.recv(timeout_s=quiet_s)) is not None:
        messages.append(msg)
        if msg.get("type") == "end":
            break
    return messages


def texts(messages):
    return [m for m in messages if m.get("type") == "text"]


# ---- 1. language switches land on declared languages, and back on the caller's own variant ----------

@pytest.mark.parametrize("home", REGIONAL_HOMES)
def test_switching_away_and_back_returns_to_the_callers_regional_variant(stack, llm, home):
    caller = new_call(stack, make_call_body(language=home), closing_quiet_s=0.05)
    declared = [lang["code"] for lang in caller.twiml.languages]
    assert caller.twiml.attributes["language"] == home and declared[0] == home
    other = "es" if not home.startswith("es") else "en"
    llm.push(Reply(text="Okay."), Reply(text="Back again."))
    caller.connect()
    away = caller.say("Let us switch", lang=other)
    back = caller.say("And back", lang=home.split("-")[0])  # Deepgram `multi` reports the primary subtag only
    caller.hangup()
    assert caller.twilio.errors == [], "Twilio refused a message"
    assert away.language["ttsLanguage"] in declared and away.language["ttsLanguage"].startswith(other)
    assert back.language == {"type": "language", "ttsLanguage": home}
    assert caller.twilio.tts_language == home
    assert record_of(stack, caller).language == home


def test_a_language_that_was_not_declared_is_never_named(stack, llm):
    """zh-HK cannot auto-detect (Deepgram `multi` has no Chinese): a stray prompt.lang must not switch."""
    caller = new_call(stack, make_call_body(language="zh-HK"), closing_quiet_s=0.05)
    assert caller.twiml.languages == [] and "transcriptionLanguage" not in caller.twiml.attributes
    llm.push(Reply(text="好呀。"))
    caller.connect()
    reply = caller.say("Hello", lang="en")
    caller.hangup()
    assert reply.language is None and caller.twilio.errors == []
    assert record_of(stack, caller).language == "zh-HK"


# ---- 2. closing lines are heard to the end before `end` ----------------------------------------------

def closing_line(kind: str) -> str:
    nodes = load_workflow()["nodes"]
    if kind == "end":
        return nodes[-1]["data"]["endMessage"]
    return next(n for n in nodes if n["type"] == "transferCall")["data"]["transferMessage"]


@pytest.mark.parametrize("kind, speech", [("end", "That's everything, thank you"), ("transfer", "I need a human agent")])
def test_goodbye_and_transfer_message_are_heard_to_the_end_before_the_session_ends(stack, llm, kind, speech):
    llm.responder = real_estate_brain
    caller = new_call(stack, speaking_rate_cps=60)
    caller.connect()
    drive_to_summary(caller)
    reply = caller.say(speech)
    caller.hangup()
    assert reply.text.endswith(closing_line(kind)) and reply.end is not None
    assert reply.unheard_at_end == "", "the caller lost the end of the closing line"
    assert caller.twiml.attributes["debug"] == "speaker-events"  # how CallWeaver learns playback finished
    assert caller.twilio.playback.heard.endswith(closing_line(kind))
    assert json.loads(reply.end["handoffData"])["reason"] == kind


# ---- 3. talk cycles: a reply cut by a new prompt is closed before the next one -------------------------

def start_a_long_reply(stack, llm, word: str, then: str):
    """A call whose first reply streams slowly (40 tokens), cut after 3 tokens; `then` answers next."""
    llm.push(Reply(text=" ".join(f"{word}{i}" for i in range(40)), ttft_s=0.05, token_interval_s=0.05),
             Reply(text=then))
    caller = new_call(stack, closing_quiet_s=0.05)
    caller.connect()
    partial = caller.say("Tell me a long story", stop_after_tokens=3)
    assert partial.tokens
    return caller, partial


def test_a_new_prompt_while_streaming_closes_the_cut_reply_before_the_next_one(stack, llm):
    caller, partial = start_a_long_reply(stack, llm, "first", "Second answer here.")
    second = caller.say("Actually, just the price")  # a final prompt with no barge-in (interrupt) before it
    if not second.text:  # the first `last: true` read was the cut reply's close: read the new reply too
        second = caller.read_reply(second)
    caller.hangup()
    sequence = texts(partial.messages) + texts(second.messages)
    closes = [i for i, m in enumerate(sequence) if m["last"]]
    first_of_second = next(i for i, m in enumerate(sequence) if m["token"].strip().startswith("Second"))
    assert len(closes) == 2, sequence
    assert closes[0] < first_of_second, "the cut reply's talk cycle must be closed before the next reply"
    assert all(m["token"].strip().startswith("first") for m in sequence[:closes[0]] if m["token"])
    assert second.text.endswith("Second answer here.")
    assert caller.twilio.errors == []


def test_barge_in_stops_the_reply_without_further_messages_for_it(stack, llm):
    caller, _partial = start_a_long_reply(stack, llm, "word", "Sure.")
    caller.interrupt()  # what the playback model actually spoke
    stray = caller.drain(quiet_s=0.4)
    reply = caller.say("Wait")
    caller.hangup()
    assert len(texts(stray)) <= 2, "at most a token already in flight"
    assert not any(m.get("last") for m in texts(stray)), "Twilio already closed the interrupted cycle"
    assert reply.text == "Sure."


def test_a_goodbye_talked_over_with_agent_speaking_off_before_the_interrupt_neither_hangs_up_nor_ignores_them(
        stack, llm):
    """Twilio reports the playback the barge-in stopped (agentSpeaking off) a few milliseconds before the
    `interrupt`: the goodbye's end is dropped all the same, and the caller's next words are answered."""
    caller = new_call(stack, closing_quiet_s=0.05, speaking_rate_cps=20)  # the goodbye plays for about 3 s
    caller.connect()
    caller.prompt("goodbye")
    sent = []
    while not (sent and sent[-1].get("type") == "text" and sent[-1].get("last")):
        msg = caller.recv()
        assert msg is not None and msg.get("type") != "end", sent
        sent.append(msg)
    caller.interrupt(heard="Thank you", played_ms=500, silent_first_s=0.02)
    stray = caller.drain(quiet_s=0.6)
    assert not [m for m in stray if m.get("type") == "end"], stray
    llm.push(Reply(text="Of course, what else?"))
    reply = caller.say("wait, one more question")
    caller.hangup()
    assert reply.text == "Of course, what else?" and reply.end is None


# ---- 4. keypad: one turn per entry; sendDigits and play are valid messages -----------------------------

def test_typed_digits_make_one_turn_and_hash_ends_the_entry(stack, llm):
    llm.push(Reply(text="Thanks, account 1234 found."))
    caller = new_call(stack, closing_quiet_s=0.05)
    caller.connect()
    for digit in "1234#":
        caller.send({"type": "dtmf", "digit": digit})
    reply = caller.read_reply(CallerReply(sent_at=time.monotonic()))
    caller.hangup()
    assert reply.text == "Thanks, account 1234 found."
    assert len(llm.requests) == 1, "one LLM turn for the whole entry, none cancelled"
    assert "pressed 1234 " in llm.requests[0].messages[-1]["content"]


def test_digits_without_hash_end_after_the_inter_digit_pause(stack, llm):
    llm.push(Reply(text="Option seven."))
    caller = new_call(stack, closing_quiet_s=0.05)
    caller.connect()
    caller.send({"type": "dtmf", "digit": "7"})
    caller.send({"type": "dtmf", "digit": "9"})
    reply = caller.read_reply(CallerReply(sent_at=time.monotonic()))
    caller.hangup()
    assert reply.text == "Option seven." and len(llm.requests) == 1
    assert "pressed 79 " in llm.requests[0].messages[-1]["content"]


# ---- 5. resume ------------------------------------------------------------------------------------------

def test_interrupting_the_resume_greeting_trims_the_greeting_not_the_previous_reply(stack, llm):
    llm.push(Reply(text="Our office opens at nine."), Reply(text="Go on."))
    caller = new_call(stack, closing_quiet_s=0.05)
    caller.connect()
    caller.say("When do you open?")
    caller.hangup()
    resp = caller.connect_action("failed", ErrorCode="39001", ErrorMessage="Network connection to WebSocket server failed")
    caller.twiml = type(caller.twiml).parse(resp.text)
    greeting = caller.twiml.attributes["welcomeGreeting"]
    caller.connect()
    caller.interrupt(heard=" ".join(greeting.split()[:3]), played_ms=600)
    reply = caller.say("Sorry, as I was saying")
    caller.hangup()
    assert reply.text == "Go on."
    assistant = [m["content"] for m in llm.requests[1].messages if m["role"] == "assistant"]
    assert "Our office opens at nine." in assistant, "the real reply must stay as it was heard"
    assert assistant[-1] == " ".join(greeting.split()[:3])


def test_a_configuration_error_is_not_retried_but_ends_with_an_apology(stack, llm):
    caller = new_call(stack)
    resp = caller.connect_action("failed", ErrorCode="64101", ErrorMessage="Invalid voice for the TTS provider")
    root = ET.fromstring(resp.text)
    assert root.find("Connect") is None, "the same TwiML would fail again"
    assert [c.tag for c in root] == ["Say", "Hangup"]
    assert "relay_not_resumed" in stack["server"].logs()


# ---- 6. setup and errors ---------------------------------------------------------------------------------

def test_setup_fields_are_recorded_on_the_call(stack, llm):
    caller = new_call(stack, closing_quiet_s=0.05)
    caller.connect()
    llm.push(Reply(text="Hello."))
    caller.say("Hi")
    caller.hangup()
    setup = record_of(stack, caller).meta["setup"]
    for key in ("from", "to", "direction", "callerName", "forwardedFrom"):
        assert setup[key] == caller.caller[key]


def test_setup_for_an_unknown_call_apologises_and_ends_the_session(stack, llm):
    caller = new_call(stack)
    caller.connect(setup=False)
    setup = caller.setup_message()
    setup.update(callSid="CA" + "f" * 32, customParameters={"trackingId": "no-such-call"})
    caller.send(setup)
    messages = read_until_end(caller)
    caller.hangup()
    # Either the session ends after an apology, or the socket is refused outright — never dead air.
    assert (messages and messages[-1].get("type") == "end") or caller.closed_by_server, "the session must end"
    if messages and messages[-1].get("type") == "end":
        assert json.loads(messages[-1]["handoffData"])["reason"] == "error"
        assert messages[-1]["unheard"] == "", "the apology is heard before the session ends"


def test_twilio_errors_are_logged_and_repeated_ones_end_the_call(stack, llm):
    caller = new_call(stack, closing_quiet_s=0.05)
    caller.connect()
    caller.send({"type": "error", "description": "Error 64107: invalid message received"})
    llm.push(Reply(text="Still here."))
    assert caller.say("Are you there?").text == "Still here.", "one refused message does not end the call"
    for _ in range(3):
        caller.send({"type": "error", "description": "Error 64107: invalid message received"})
    messages = read_until_end(caller)
    caller.hangup()
    assert messages and messages[-1]["type"] == "end"
    assert json.loads(messages[-1]["handoffData"])["reason"] == "error"
    logs = stack["server"].logs()
    assert "relay_twilio_error" in logs and caller.tracking_id in logs and "64107" in logs
    assert [c.tag for c in ET.fromstring(caller.connect_action("ended", {"reason": "error"}).text)] == ["Hangup"]


def test_relay_url_is_wss_for_a_public_host_even_behind_a_proxy_that_drops_the_scheme(stack, llm):
    caller = new_call(stack)
    path = f"/api/twiml-optimized?trackingId={caller.tracking_id}"
    public = "http://callweaver.example.com"
    params = caller._call_params(CallStatus="in-progress")
    resp = http("POST", stack["server"].url + path, form=params,
                headers={"Host": "callweaver.example.com",
                         "X-Twilio-Signature": twilio_signature(AUTH_TOKEN, public + path, params)})
    assert resp.status == 200, resp.text
    relay = ET.fromstring(resp.text).find("Connect/ConversationRelay")
    assert relay.get("url").startswith("wss://callweaver.example.com/")


def test_an_outbound_call_that_reaches_a_phone_menu_presses_keys(stack, llm):
    llm.push(Reply(text="", tool_calls=[("press_keys", {"digits": "2"})]), Reply(text="Hello, I'm calling about"))
    caller = new_call(stack, closing_quiet_s=0.3)
    caller.connect()  # setup says direction outbound-api: we placed this call
    caller.say("Thank you for calling. For sales press 1, for support press 2.")
    caller.hangup()
    assert caller.twilio.digits_sent == ["2"] and caller.twilio.errors == []
    assert "press_keys" in [t["function"]["name"] for t in llm.requests[0].body.get("tools") or []]
    assistant = [m["content"] for m in record_of(stack, caller).messages if m["role"] == "assistant"]
    assert assistant[-1] == "[pressed 2 on the keypad]"


def test_an_inbound_call_is_not_offered_the_keypad(stack, llm):
    llm.push(Reply(text="Hi!"))
    caller = new_call(stack, closing_quiet_s=0.05)
    caller.caller["direction"] = "inbound"
    caller.connect()
    caller.say("Hello")
    caller.hangup()
    assert "press_keys" not in [t["function"]["name"] for t in llm.requests[0].body.get("tools") or []]
