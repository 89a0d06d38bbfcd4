"""ConversationRelay over the real production server (gunicorn, gevent workers), driven by the scripted caller."""
from __future__ import annotations

import os
import platform
import signal
import time
import xml.etree.ElementTree as ET

import pytest
import websocket

from callweaver.simulate import RelayCaller
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import load_workflow, make_call_body
from tests.scripted_brain import REAL_ESTATE_SCRIPT, real_estate_brain


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relay")
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    primary, secondary = FakeLLM("primary").start(), FakeLLM("secondary").start()
    env = base_env(tmp, twilio, primary, secondary)
    env.pop("PUBLIC_BASE_URL")
    server = LiveServer(env, workers=2).start()
    yield {"server": server, "twilio": twilio, "llm": primary, "llm2": secondary}
    server.stop()
    for fake in (twilio, primary, secondary):
        fake.stop()


@pytest.fixture
def llm(stack):
    stack["llm"].reset()
    stack["llm2"].reset()
    return stack["llm"]


def new_call(stack, body=None) -> RelayCaller:
    caller = RelayCaller(stack["server"].url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
    caller.place_call(body or make_call_body())
    caller.answer_placed(stack["twilio"].creates()[-1])
    return caller


def test_twiml_optimized_is_a_signed_relay_with_greeting_and_parameters(stack, llm):
    caller = new_call(stack)
    attrs = caller.twiml.attributes
    assert caller.twiml.url == f"ws://127.0.0.1:{stack['server'].port}/api/conversationrelay-ws?trackingId={caller.tracking_id}"
    assert attrs["welcomeGreeting"].startswith("Hello! Thank you for calling Premier Properties")
    assert attrs["language"] == "en-US" and attrs["dtmfDetection"] == "true" and attrs["interruptible"] == "any"
    assert attrs["ttsProvider"] and attrs["voice"] and attrs["transcriptionProvider"] and attrs["speechModel"]
    assert caller.twiml.parameters == {"trackingId": caller.tracking_id}
    assert caller.twiml.action.endswith(f"/api/connect-action?trackingId={caller.tracking_id}")
    assert llm.requests == []  # no LLM call inside the webhook


def test_tokens_stream_before_the_llm_finishes_the_first_one_at_once(stack, llm):
    words = "One two three four five six seven eight nine ten eleven twelve."
    llm.push(Reply(text=words, ttft_s=0.3, token_interval_s=0.05))
    caller = new_call(stack)
    caller.connect()
    reply = caller.say("Hello, who is this?")
    caller.hangup()
    generation_ms = 300 + 50 * (len(words.split()) - 1)
    assert reply.text == words
    # The first token in a frame of its own; the clause's next words wait at most RELAY_TEXT_HOLD_MS (80 ms, about
    # three tokens 50 ms apart) for its end, so they too leave while the LLM still generates (reply_text.py).
    assert reply.tokens[0] == "One"
    assert len(reply.tokens) >= 4
    assert reply.first_token_ms >= 290
    assert reply.first_token_ms < generation_ms - 200, "first token must arrive while the LLM still generates"
    texts = [m for m in reply.messages if m["type"] == "text"]
    assert texts[-1] == {"type": "text", "token": "", "last": True}
    assert all(m["last"] is False for m in texts[:-1])


def test_interrupt_cancels_the_llm_stream_and_history_keeps_the_heard_prefix(stack, llm):
    long_text = " ".join(f"word{i}" for i in range(60)) + "."
    llm.push(Reply(text=long_text, ttft_s=0.05, token_interval_s=0.05), Reply(text="Sure, go ahead."))
    caller = new_call(stack)
    caller.connect()
    partial = caller.say("Tell me everything", stop_after_tokens=5)
    heard = "".join(partial.tokens)
    caller.interrupt(heard.strip())
    assert llm.wait_until(lambda: llm.requests and llm.requests[0].client_closed, timeout_s=5), \
        "the upstream LLM stream must be closed on interrupt"
    assert llm.requests[0].tokens_sent < 60
    caller.drain()
    reply = caller.say("Wait, one question")
    caller.hangup()
    assert reply.text == "Sure, go ahead."
    history = llm.requests[1].messages
    assistant = [m["content"] for m in history if m["role"] == "assistant"]
    assert assistant[-1] == heard.strip()
    assert history[-1] == {"role": "user", "content": "Wait, one question"}


def test_unsigned_or_wrongly_signed_upgrade_is_refused(stack, llm):
    caller = new_call(stack)
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        caller.connect(sign=False)
    assert err.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException):
        caller.connect(signature="d3Jvbmc=")


def test_prompt_before_setup_and_invalid_json_are_logged_and_socket_stays_usable(stack, llm):
    caller = new_call(stack)
    caller.connect(setup=False)
    caller.prompt("hello?")
    caller.send("this is not json")
    assert caller.recv(timeout_s=0.5) is None
    caller.send({"type": "setup", "callSid": caller.call_sid, "customParameters": caller.twiml.parameters})
    llm.push(Reply(text="Hi there!"))
    reply = caller.say("hello?")
    caller.hangup()
    assert reply.text == "Hi there!"
    logs = stack["server"].logs()
    assert "relay_prompt_before_setup" in logs and "relay_bad_message" in logs


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_after_calls_are_set_up_the_worker_hands_its_free_heap_back(stack, llm, tmp_path):
    """callweaver/heap.py: once set-ups pause, the worker returns the C heap's free pages (one info line each)."""
    env = base_env(tmp_path, stack["twilio"], stack["llm"], stack["llm2"])
    env.pop("PUBLIC_BASE_URL")
    server = LiveServer({**env, "LOG_LEVEL": "INFO"}, workers=1).start()
    try:
        callers = [new_call({**stack, "server": server}) for _ in range(3)]
        for caller in callers:
            caller.connect()
        deadline = time.monotonic() + 20
        while '"heap_trimmed"' not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        for caller in callers:
            caller.hangup()
        assert '"heap_trimmed"' in server.logs()
    finally:
        server.stop()


def drive_to_summary(caller):
    for speech in ["I want to buy a house", "A three bedroom house", "My name is Ann"]:
        reply = caller.say(speech)
        assert reply.end is None


def test_end_node_speaks_end_message_then_end_and_connect_action_hangs_up(stack, llm):
    llm.responder = real_estate_brain
    caller = new_call(stack)
    caller.connect()
    drive_to_summary(caller)
    reply = caller.say("That's everything, thank you")
    end_message = load_workflow()["nodes"][-1]["data"]["endMessage"]
    assert reply.text.endswith(end_message)
    assert reply.end is not None
    import json
    handoff = json.loads(reply.end["handoffData"])
    assert handoff["reason"] == "end"
    caller.hangup()
    twiml = caller.connect_action("ended", handoff)
    root = ET.fromstring(twiml.text)
    assert [c.tag for c in root] == ["Hangup"]


def test_a_goodbye_heard_before_the_model_moved_to_the_end_node_hangs_up_without_dead_air(stack, llm):
    """Fuzz seed=81 call=26: the model spoke, and only later called its tool to an end node with no closing message.
    Twilio had spoken the words (agentSpeaking off) before the reply's last frame, which said nothing more: the end
    then waited for an "off" that was never coming, seconds of silence before the hang-up."""
    import json
    export = load_workflow()
    for node in export["nodes"]:
        if node["type"] == "endCall":
            node["data"].pop("endMessage", None)

    def brain(body: dict) -> Reply:
        reply = real_estate_brain(body)
        if reply.tool_calls == [("transition", {"edge_id": "edge_12"})]:  # "that's everything": to the end node
            reply.tool_call_delay_s = 1.0  # Twilio speaks the words (0.3 s at 80 characters a second) meanwhile
        return reply
    llm.responder = brain
    caller = new_call(stack, body=make_call_body(nodes=export["nodes"]))
    caller.connect()
    drive_to_summary(caller)
    reply = caller.say("That's everything, thank you")
    assert reply.text == REAL_ESTATE_SCRIPT["that's everything"][0]
    assert reply.end is not None and json.loads(reply.end["handoffData"])["reason"] == "end", reply.messages
    assert caller.end_after_silent_s is not None and caller.end_after_silent_s < 1.0
    caller.hangup()


def test_entering_a_node_with_audio_url_plays_it_before_the_node_speaks(stack, llm):
    import json
    export = load_workflow()
    sounds = {"buyer_requirements_node": "https://media.example.com/buyer-jingle.mp3",
              "end_call_node": "https://media.example.com/goodbye.wav"}
    for node in export["nodes"]:
        if node["id"] in sounds:
            node["data"]["audioUrl"] = sounds[node["id"]]
    node_ids = [n["id"] for n in export["nodes"]]
    export["nodes"][node_ids.index("end_call_node")]["data"]["audioInterruptible"] = False
    llm.responder = real_estate_brain
    caller = new_call(stack, body=make_call_body(nodes=export["nodes"]))
    caller.connect()
    entered = caller.say("I want to buy a house")  # inquiry -> buyer_requirements_node
    assert {"type": "play", "source": sounds["buyer_requirements_node"], "loop": 1} in entered.messages
    for speech in ["A three bedroom house", "My name is Ann"]:  # on to the summary: nodes without audio
        caller.say(speech)
    assert caller.twilio.played_audio == [sounds["buyer_requirements_node"]]  # played once, on entering

    reply = caller.say("That's everything, thank you")
    kinds = [m["type"] for m in reply.messages]
    play = reply.messages[kinds.index("play")]
    assert play == {"type": "play", "source": sounds["end_call_node"], "loop": 1, "interruptible": False}
    end_message = export["nodes"][-1]["data"]["endMessage"]
    first_closing_token = next(i for i, m in enumerate(reply.messages)
                               if m["type"] == "text" and m["token"] and end_message.startswith(m["token"].strip()))
    assert kinds.index("play") < first_closing_token  # the recording plays before the end node's words
    assert reply.text.endswith(end_message) and json.loads(reply.end["handoffData"])["reason"] == "end"
    assert reply.unheard_at_end in (None, "")  # `end` still waited for the closing line to play
    caller.hangup()


def test_transfer_node_speaks_transfer_message_and_connect_action_dials(stack, llm):
    import json
    llm.responder = real_estate_brain
    caller = new_call(stack)
    caller.connect()
    drive_to_summary(caller)
    reply = caller.say("I need a human agent")
    transfer = next(n for n in load_workflow()["nodes"] if n["type"] == "transferCall")["data"]
    assert transfer["transferMessage"] in reply.text
    handoff = json.loads(reply.end["handoffData"])
    assert handoff == {"reason": "transfer", "destination": transfer["destination"],
                       "node": "transfer_to_agent_node"}
    caller.hangup()
    root = ET.fromstring(caller.connect_action("ended", handoff).text)
    assert root.find("Dial").text == transfer["destination"]


def test_sigkill_worker_mid_call_resumes_the_conversation(stack, llm):
    server = stack["server"]
    llm.responder = real_estate_brain
    caller = new_call(stack)
    caller.connect()
    caller.say("I want to buy a house")
    # a reply is streaming when the workers die
    llm.responder = None
    llm.push(Reply(text=" ".join(["slow"] * 40), ttft_s=0.05, token_interval_s=0.1))
    caller.prompt("Tell me more")
    assert caller.recv(timeout_s=5)["type"] == "text"
    serving = server.worker_serving(caller.ws.sock.getsockname()[1])
    assert serving in server.worker_pids(), "the worker holding this call's socket must be found"
    os.kill(serving, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = set(server.worker_pids())
        if len(now) == 2 and serving not in now:
            break
        time.sleep(0.1)
    assert serving not in server.worker_pids()
    caller.hangup()
    resp = caller.connect_action("failed", ErrorCode="39001",
                                 ErrorMessage="Network connection to WebSocket server failed")
    assert resp.status == 200
    root = ET.fromstring(resp.text)
    relay = root.find("Connect/ConversationRelay")
    assert relay is not None, resp.text
    assert "back" in relay.get("welcomeGreeting").lower()
    caller.twiml = type(caller.twiml).parse(resp.text)
    assert caller.twiml.parameters["trackingId"] == caller.tracking_id
    caller.connect()
    llm.responder = real_estate_brain
    n_before = len(llm.requests)
    caller.say("A three bedroom house please")
    caller.hangup()
    history = llm.requests[n_before].messages
    assert any(m["role"] == "user" and m["content"] == "I want to buy a house" for m in history)
    assert history[0]["role"] == "system" and "buyer" in history[0]["content"].lower()


def test_resume_is_limited_to_two_per_call(stack, llm):
    caller = new_call(stack)
    for _ in range(2):
        root = ET.fromstring(caller.connect_action("failed").text)
        assert root.find("Connect/ConversationRelay") is not None
    root = ET.fromstring(caller.connect_action("failed").text)
    assert root.find("Connect") is None and root.find("Hangup") is not None


def test_caller_switching_language_gets_a_language_message_and_new_instruction(stack, llm):
    caller = new_call(stack)
    caller.connect()
    llm.push(Reply(text="Claro, hablamos en español."), Reply(text="Perfecto."))
    reply = caller.say("Hola, ¿podemos hablar en español?", lang="es-ES")
    # the call runs Deepgram `multi` recognition, so only the voice switches; recognition keeps auto-detecting
    assert reply.language == {"type": "language", "ttsLanguage": "es-ES"}
    assert caller.twiml.attributes["transcriptionLanguage"] == "multi"
    import xml.etree.ElementTree as ET
    declared = {l.get("code") for l in ET.fromstring(caller.twiml.xml).iter("Language")}
    assert "es-ES" in declared and "zh-HK" not in declared
    assert reply.messages[0]["type"] == "language"  # before the first token, so the reply is voiced in Spanish
    assert "Spanish" in llm.requests[0].messages[0]["content"]
    second = caller.say("Quiero comprar una casa", lang="es")  # multi reports only the primary subtag
    caller.hangup()
    assert second.language is None  # already Spanish: no new switch
    assert "Spanish" in llm.requests[1].messages[0]["content"]


def test_primary_hang_fails_over_to_secondary_within_the_same_turn(stack, llm):
    llm.push(Reply(fault="hang"))
    stack["llm2"].push(Reply(text="Backup here, how can I help?"))
    caller = new_call(stack)
    caller.connect()
    reply = caller.say("Is anyone there?")
    caller.hangup()
    assert reply.text == "Backup here, how can I help?"
    assert reply.first_token_ms >= 900  # the first-token deadline (1.0 s) passed on the primary
    assert llm.wait_until(lambda: llm.requests[0].client_closed, timeout_s=5)


def test_a_whitespace_only_reply_fails_over_to_the_secondary_not_to_the_apology(stack, llm):
    """A live call: the primary answers with only whitespace and a <break/>. The caller hears the secondary's answer,
    no apology, and no frame of the wordless text."""
    llm.push(Reply(text=' \n <break time="1s"/> '))
    stack["llm2"].push(Reply(text="Backup here, how can I help?"))
    caller = new_call(stack)
    caller.connect()
    reply = caller.say("Is anyone there?")
    caller.hangup()
    assert reply.text == "Backup here, how can I help?"
    assert [m["token"] for m in reply.messages if m["type"] == "text" and m["token"]][0] == "Backup"


def test_stream_dropped_mid_reply_continues_on_secondary_without_repeating(stack, llm):
    llm.push(Reply(text="Our office opens at nine and closes at six.", fault="drop", drop_after_tokens=4))
    stack["llm2"].push(Reply(text="nine and closes at six."))
    caller = new_call(stack)
    caller.connect()
    reply = caller.say("When are you open?")
    caller.hangup()
    assert reply.text == "Our office opens at nine and closes at six."
    continuation = stack["llm2"].requests[0].messages
    assert any(m["role"] == "assistant" and m["content"].startswith("Our office opens at") for m in continuation)
    metrics = caller.hooks.url(f"/api/performance-metrics/{caller.tracking_id}")
    from callweaver.simulate import http
    turn = http("GET", metrics).json()["callData"]["turns"][0]
    assert turn["failovers"] and turn["failovers"][0]["provider"] == "azure"


def test_dtmf_goes_to_the_engine_as_caller_input(stack, llm):
    caller = new_call(stack)
    caller.connect()
    llm.push(Reply(text="You chose option two."))
    caller.send({"type": "dtmf", "digit": "2"})
    from callweaver.simulate import Reply as CallerReply
    reply = caller.read_reply(CallerReply(sent_at=time.monotonic()))
    caller.hangup()
    assert reply.text == "You chose option two."
    assert "pressed 2" in llm.requests[0].messages[-1]["content"]


def test_interrupted_end_never_fires(stack, llm):
    llm.responder = real_estate_brain
    caller = new_call(stack)
    caller.connect()
    drive_to_summary(caller)
    llm.responder = None
    llm.push(Reply(text="Perfect, I have all I need and " + " ".join(["more"] * 40), ttft_s=0.05,
                   token_interval_s=0.05, tool_calls=[("transition", {"edge_id": "edge_12"})]),
             Reply(text="Sure, what else?"))
    partial = caller.say("That's everything", stop_after_tokens=3)
    caller.interrupt("".join(partial.tokens).strip())
    caller.drain()
    reply = caller.say("Actually, one more thing")
    caller.hangup()
    assert reply.end is None and reply.text == "Sure, what else?"
    record = http_json(stack, f"/api/performance-metrics/{caller.tracking_id}")
    assert record["callData"]["currentNode"] == "summary_confirmation_node"
    assert record["callData"]["turns"][3]["interrupted"] is True and record["callData"]["turns"][3]["action"] is None


def http_json(stack, path):
    from callweaver.simulate import http
    return http("GET", stack["server"].url + path).json()


def test_a_runaway_reply_continued_after_a_failover_is_cut_whole_and_the_call_goes_on(stack, llm):
    """The cap counts what both providers said; the cut ends on a whole word outside any tag, the talk cycle is
    closed with last: true, the history holds what was sent, and the next turn is answered."""
    runaway = 'I will keep going. <break time="1s"/> ' * 300
    llm.push(Reply(text=runaway, fault="drop", drop_after_tokens=60, token_interval_s=0.001))
    stack["llm2"].push(Reply(text=runaway, token_interval_s=0.001))
    caller = new_call(stack)
    caller.connect()
    reply = caller.say("Tell me everything.")
    assert 1500 < len(reply.text.encode()) <= 2100 and reply.text.count("<") == reply.text.count(">")
    texts = [m for m in reply.messages if m["type"] == "text"]
    assert texts[-1] == {"type": "text", "token": "", "last": True}
    llm.push(Reply(text="Anything else?"))
    assert caller.say("Thanks.").text == "Anything else?"
    caller.hangup()
    from callweaver.simulate import http
    turns = http("GET", caller.hooks.url(f"/api/performance-metrics/{caller.tracking_id}")).json()["callData"]["turns"]
    assert turns[0]["failovers"] and len(turns) == 2
