"""A silent line: the flow's call limits (config.globalSettings maxCallDuration, silenceTimeout) and the relay's
"are you still there?" re-prompt, then goodbye and `end` (reason "silence") after a second silence. Over the real
production server (gunicorn, gevent workers), driven by the scripted caller with Twilio's speaker events."""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from callweaver.call_report import call_outcome
from callweaver.engine.languages import LanguageTable
from callweaver.engine.workflow import Workflow
from callweaver.engine.relay_session import PLAYBACK_WAIT_MAX_S, playback_wait_bound_s
from callweaver.simulate import RelayCaller
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body
from tests.test_reply_text import say, session_for

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
    caller.answer_placed(stack["twilio"].creates()[-1])
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


# ---- the session's silence deadline, on a fake clock ------------------------------------------------------------

def silent_session(script=(("Sure", 0.0), (" thing.", 0.0)), **turn_options):
    session, engine, sent = session_for(list(script), **turn_options)
    session.silence_timeout_s = SILENCE_S
    engine.speculation = SimpleNamespace(enabled=False, speaker_events=False)
    engine.store = SimpleNamespace(meta={})
    recording(engine, lambda tracking_id, meta: engine.store.meta.update(meta))
    return session, engine, sent


def recording(engine, write) -> None:
    """The stand-in store's meta writes (change_meta, store.END_REASON_RULE) go through `write(tracking_id, meta)`."""
    def change_meta(tracking_id, change):
        new = change(dict(engine.store.meta), False)
        if new is not None:
            write(tracking_id, new)
        return engine.store.meta, new is not None
    engine.store.change_meta = change_meta


def info(session, name: str, value: str) -> None:
    session.handle(json.dumps({"type": "info", "name": name, "value": value}))


def texts(sent) -> list[str]:
    return [m["token"] for m in sent if m["type"] == "text" and m["token"]]


def test_nothing_is_due_before_setup_or_with_silence_handling_off():
    session, _engine, sent = silent_session()
    session.record = None
    info(session, "agentSpeaking", "off")
    assert session.silence_due_at() is None
    session, _engine, sent = silent_session()
    session.silence_timeout_s = 0
    info(session, "agentSpeaking", "off")
    assert session.silence_due_at() is None


def test_the_silence_counts_from_agent_speaking_off_and_any_caller_input_starts_it_again():
    session, _engine, sent = silent_session()
    clock = session.clock
    info(session, "agentSpeaking", "off")
    assert session.silence_due_at() == clock.now + SILENCE_S
    info(session, "agentSpeaking", "on")
    assert session.silence_due_at() is None  # the agent speaks: no silence
    info(session, "agentSpeaking", "off")
    clock.now += 0.2
    session.handle(json.dumps({"type": "prompt", "voicePrompt": "I", "last": False}))  # a partial transcript
    assert session.silence_due_at() == clock.now + SILENCE_S
    info(session, "clientSpeaking", "on")
    assert session.silence_due_at() is None  # the caller is talking
    info(session, "clientSpeaking", "off")
    assert session.silence_due_at() == clock.now + SILENCE_S
    session.check_silence()
    assert sent == []  # not due yet


def fall_silent(session) -> None:
    """Twilio reports the agent fell silent, the caller says nothing for the timeout, the socket's alarm fires."""
    info(session, "agentSpeaking", "off")
    session.clock.now += SILENCE_S
    session.check_silence()


def test_a_silence_reprompts_then_a_second_one_says_goodbye_and_ends_with_reason_silence():
    session, engine, sent = silent_session()
    fall_silent(session)
    assert texts(sent) == [EN.line("reprompt")]
    assert session.silence_due_at() > session.clock.now + SILENCE_S  # counts once the re-prompt has played
    fall_silent(session)
    assert texts(sent) == [EN.line("reprompt"), EN.line("goodbye")]
    assert engine.store.meta == {"endReason": "silence"}
    assert session.silence_due_at() is None  # closing: nothing more
    info(session, "agentSpeaking", "off")  # the goodbye played
    wait_until(lambda: sent[-1]["type"] == "end")
    assert json.loads(sent[-1]["handoffData"]) == {"reason": "silence"}


def test_a_caller_answering_the_reprompt_is_reprompted_again_later_not_told_goodbye():
    session, engine, sent = silent_session()
    fall_silent(session)
    session.handle(json.dumps({"type": "dtmf", "digit": "#"}))  # a key answers it (an empty entry: no turn)
    fall_silent(session)
    assert texts(sent) == [EN.line("reprompt"), EN.line("reprompt")]


def session_mid_reply(first_word: str):
    """The greeting played, the caller spoke: the reply has sent `first_word` and waits for its next token."""
    session, engine, sent = silent_session([(first_word, 0.0), ("WAIT", 0.0)])
    info(session, "agentSpeaking", "off")
    say(session)
    assert engine.turn.waiting.wait(5)
    return session, engine, sent


def test_nothing_is_due_while_a_reply_streams_a_typed_entry_is_open_or_a_closing_line_plays():
    session, engine, sent = session_mid_reply("Let")
    clock = session.clock
    info(session, "agentSpeaking", "off")  # Twilio spoke the first words; the reply goes on
    clock.now += 10 * SILENCE_S
    assert session.silence_due_at() is None
    session.check_silence()
    assert texts(sent) == ["Let"]
    session.handle(json.dumps({"type": "interrupt", "utteranceUntilInterrupt": "Let",
                               "durationUntilInterruptMs": 200}))
    session.handle(json.dumps({"type": "dtmf", "digit": "1"}))
    clock.now += 10 * SILENCE_S
    assert session.silence_due_at() is None  # typing
    session._take_digits()
    session.hand_over()  # a stopping worker's handover, like a closing line, is never re-prompted over
    info(session, "agentSpeaking", "off")
    clock.now += 10 * SILENCE_S
    assert session.silence_due_at() is None


def test_without_speaker_events_the_silence_counts_from_when_the_reply_has_surely_played():
    session, engine, sent = silent_session()
    clock = session.clock
    say(session)
    assert engine.done.wait(5)
    wait_until(lambda: session.silence_due_at() is not None)
    bound = playback_wait_bound_s("Sure thing.", chars_per_s=EN.speech_chars_per_s)
    assert session.silence_due_at() == pytest.approx(clock.now + bound + SILENCE_S)


def test_every_language_has_the_reprompt_and_goodbye_lines():
    table = LanguageTable.load()
    for code in table.codes:
        entry = table.get(code)
        assert entry.lines.get("reprompt", "").strip() and entry.lines.get("goodbye", "").strip(), code


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_the_call_log_says_a_call_ended_for_silence():
    assert call_outcome("completed", [], {"endReason": "silence"}) == "silence"
    assert call_outcome("completed", [{"action": "end"}], {}) == "end_node"


# ---- review fixes ----------------------------------------------------------------------------------------------

def test_no_reprompt_while_twilio_still_speaks_a_reply_it_reported_on_during_streaming():
    session, engine, sent = session_mid_reply("Sure")
    clock = session.clock
    info(session, "agentSpeaking", "on")  # Twilio starts speaking while the reply still streams
    engine.turn.stopped.set()  # the reply ends
    assert engine.done.wait(5)
    wait_until(lambda: session._reply is None)
    clock.now += PLAYBACK_WAIT_MAX_S + 10 * SILENCE_S  # a long reply still playing: no agentSpeaking off yet
    assert session.silence_due_at() is None
    session.check_silence()
    assert texts(sent) == ["Sure"]
    info(session, "agentSpeaking", "off")
    assert session.silence_due_at() == clock.now + SILENCE_S


def test_the_second_count_starts_when_the_reprompt_has_played():
    session, engine, sent = silent_session()
    fall_silent(session)
    info(session, "agentSpeaking", "on")  # Twilio speaks the re-prompt
    session.clock.now += PLAYBACK_WAIT_MAX_S + 10 * SILENCE_S
    session.check_silence()
    assert texts(sent) == [EN.line("reprompt")]
    fall_silent(session)
    assert texts(sent) == [EN.line("reprompt"), EN.line("goodbye")]


def test_without_speaker_events_a_long_reply_or_a_recording_is_waited_for_beyond_the_closing_lines_cap():
    words = "A very long answer about the houses on the market this week and their gardens. " * 20
    session, engine, sent = silent_session([(words, 0.0)])
    say(session)
    assert engine.done.wait(5)
    wait_until(lambda: session.silence_due_at() is not None)
    assert session.silence_due_at() > session.clock.now + PLAYBACK_WAIT_MAX_S + SILENCE_S
    audio = SimpleNamespace(url="https://example.com/a.mp3", interruptible=True)
    session, engine, sent = silent_session([("AUDIO", 0.0), ("Hi.", 0.0)], entered_audio=audio)
    say(session)
    assert engine.done.wait(5)
    wait_until(lambda: session.silence_due_at() is not None)
    assert session.silence_due_at() > session.clock.now + PLAYBACK_WAIT_MAX_S + SILENCE_S


def test_a_barge_in_or_a_partial_while_the_caller_talks_does_not_start_the_count():
    session, engine, sent = silent_session()
    info(session, "agentSpeaking", "off")
    info(session, "clientSpeaking", "on")
    session.handle(json.dumps({"type": "interrupt", "utteranceUntilInterrupt": "", "durationUntilInterruptMs": 0}))
    assert session.silence_due_at() is None
    session.handle(json.dumps({"type": "prompt", "voicePrompt": "I", "last": False}))
    assert session.silence_due_at() is None
    session.clock.now += 1
    info(session, "clientSpeaking", "off")
    assert session.silence_due_at() == session.clock.now + SILENCE_S


def test_the_socket_is_not_woken_at_a_reply_end_with_silence_handling_off():
    session, engine, sent = silent_session()
    session.silence_timeout_s = 0
    woken, tasks = [], []
    session.on_quiet = lambda: woken.append(session.clock.now)
    spawn = session.spawn
    session.spawn = lambda fn, *args: tasks.append(spawn(fn, *args)) or tasks[-1]
    say(session)
    tasks[0].join(5)  # the reply's task has ended (after its commit and its end-of-reply wake-up)
    assert engine.done.is_set() and woken == []


def test_a_failed_reply_wakes_the_socket_once_its_silence_can_count():
    session, engine, sent = silent_session()
    due = []
    session.on_quiet = lambda: due.append(session.silence_due_at())

    def send_json(*messages):
        if any("thing" in message.get("token", "") for message in messages):
            raise OSError("socket write failed")  # the reply's last words: the failure path closes its cycle
        sent.extend(messages)
    session.sender = SimpleNamespace(send_json=send_json)
    say(session)
    wait_until(lambda: due)
    assert texts(sent) == ["Sure"] and due[0] is not None


def test_a_handover_during_the_goodbyes_store_write_does_not_turn_the_silence_ending_into_a_handover():
    session, engine, sent = silent_session()

    def update_meta(tracking_id, meta):
        session.hand_over()  # the worker stops while the end reason is written
        wait_until(lambda: session._forced_end is not None)
        engine.store.meta.update(meta)
    fall_silent(session)
    recording(engine, update_meta)
    fall_silent(session)
    info(session, "agentSpeaking", "off")  # the goodbye played
    wait_until(lambda: sent[-1]["type"] == "end")
    assert json.loads(sent[-1]["handoffData"]) == {"reason": "silence"}


@pytest.mark.parametrize("value, silence_s", [(0, 0.0), ("0", 0.0), (12, 12.0), (-1, 20.0), (601, 20.0),
                                              ("soon", 20.0), (None, 20.0)])
def test_a_flows_silence_timeout_of_zero_turns_silence_handling_off(value, silence_s):
    """As SILENCE_TIMEOUT_S=0 does; a value that is no number from 0 to 600 leaves the server's setting (20 s)."""
    limits = Workflow.from_payload(body_with(silenceTimeout=value)).limits
    assert limits.silence_s(20.0) == silence_s


@pytest.mark.parametrize("events", [
    # a cough while Twilio still plays a long reply: the caller's voice activity ends, the agent still speaks
    (("agentSpeaking", "on"), ("clientSpeaking", "on"), ("clientSpeaking", "off")),
    # the caller talks over a line that cannot be interrupted: the agent falls silent while the caller still speaks
    (("agentSpeaking", "on"), ("clientSpeaking", "on"), ("agentSpeaking", "off")),
])
def test_no_reprompt_while_either_side_is_still_speaking(events):
    """Silence is neither side speaking: caller input during the agent's speech, or the agent falling silent while
    the caller talks, starts no count (found by review: both re-prompted after the timeout)."""
    session, _engine, sent = silent_session()
    info(session, "agentSpeaking", "off")
    for name, value in events:
        info(session, name, value)
    assert session.silence_due_at() is None
    session.clock.now += 10 * SILENCE_S
    session.check_silence()
    assert sent == []


def test_the_silence_goodbyes_playback_is_waited_for_from_before_it_is_sent():
    """The `end` after the silence goodbye waits for Twilio's agentSpeaking off for the goodbye itself: an off that
    arrives while the end reason is written is not lost (the wait is armed before the goodbye goes out)."""
    session, engine, sent = silent_session()
    fall_silent(session)   # the re-prompt
    writes = []

    def reported_off_during_the_write(tracking_id, meta):
        writes.append(meta)
        info(session, "agentSpeaking", "off")  # Twilio has played the goodbye meanwhile

    recording(engine, reported_off_during_the_write)
    fall_silent(session)   # the goodbye
    assert writes and session._fell_silent.is_set()


def test_a_failed_reply_in_a_switched_language_counts_its_playback_at_that_languages_rate():
    """Without speaker events the silence counts from the failed reply's playback estimate, made before its commit:
    at the rate of the language the turn switched Twilio's voice to, not the stored call's (found by review)."""
    session, engine, sent = silent_session()
    engine.turn.result.language = "ja-JP"  # the stored call is still en-US

    def send_json(*messages):
        if any("thing" in message.get("token", "") for message in messages):
            raise OSError("socket write failed")  # the reply's last words: the failure path closes its cycle
        sent.extend(messages)
    session.sender = SimpleNamespace(send_json=send_json)
    rates = []
    from callweaver.engine import relay_session
    bound = relay_session.playback_wait_bound_s

    def recorded(spoken, *, chars_per_s, with_audio=False, capped=True):
        rates.append(chars_per_s)
        return bound(spoken, chars_per_s=chars_per_s, with_audio=with_audio, capped=capped)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(relay_session, "playback_wait_bound_s", recorded)
        say(session)
        wait_until(lambda: rates)
    assert rates == [5.0]


# ---- a speaker event that never comes (Twilio does not guarantee them) -------------------------------------------

def test_a_lost_agent_speaking_off_after_a_reply_still_reprompts_once_the_reply_has_surely_played():
    """The caller spoke, the reply streamed, Twilio reported agentSpeaking on and its off was lost: the silence
    counts anyway from the reply's whole playback estimate plus a margin, not never (only TimeLimit ended the call:
    up to an hour billed)."""
    from callweaver.engine.relay_session import AGENT_SPEAKING_MARGIN_S

    session, engine, sent = silent_session()
    clock = session.clock
    info(session, "agentSpeaking", "off")  # the greeting played
    say(session)
    assert engine.done.wait(5)
    wait_until(lambda: session.silence_due_at() is not None)  # the reply's talk cycle closed
    info(session, "agentSpeaking", "on")  # Twilio speaks the reply; its "off" is lost
    spoken_at = clock.now
    bound = playback_wait_bound_s("Sure thing.", chars_per_s=EN.speech_chars_per_s, capped=False)
    assert session.silence_check_at() == pytest.approx(spoken_at + bound + AGENT_SPEAKING_MARGIN_S + SILENCE_S)
    clock.now = spoken_at + bound + AGENT_SPEAKING_MARGIN_S - 0.01
    session.check_silence()
    assert texts(sent) == ["Sure", " thing."]  # the report is still trusted
    clock.now = spoken_at + bound + AGENT_SPEAKING_MARGIN_S + SILENCE_S
    session.check_silence()
    assert texts(sent) == ["Sure", " thing.", EN.line("reprompt")]
    # The re-prompt's own silence counts from its playback estimate (no report is trusted any more), then goodbye.
    clock.now = session.silence_due_at()
    session.check_silence()
    assert texts(sent)[-1] == EN.line("goodbye")


def test_a_lost_agent_speaking_off_on_the_reprompt_still_ends_the_call_for_silence():
    session, engine, sent = silent_session()
    fall_silent(session)  # the re-prompt
    info(session, "agentSpeaking", "on")  # Twilio speaks it; the "off" is lost
    session.clock.now += 3600.0  # the longest TimeLimit
    session.check_silence()
    assert texts(sent) == [EN.line("reprompt"), EN.line("goodbye")]
    assert engine.store.meta == {"endReason": "silence"}


def test_a_lost_client_speaking_off_still_reprompts_after_a_bound():
    """A cough (clientSpeaking on, no transcript) whose "off" is lost: re-prompted after CLIENT_SPEAKING_MAX_S with no
    sign of the caller, not never; a caller still talking (interim transcripts) extends it."""
    from callweaver.engine.relay_session import CLIENT_SPEAKING_MAX_S

    session, engine, sent = silent_session()
    clock = session.clock
    info(session, "agentSpeaking", "off")
    info(session, "clientSpeaking", "on")
    clock.now += CLIENT_SPEAKING_MAX_S / 2
    session.handle(json.dumps({"type": "prompt", "voicePrompt": "I was", "last": False}))  # still talking
    talked_at = clock.now
    clock.now = talked_at + CLIENT_SPEAKING_MAX_S - 0.01
    session.check_silence()
    assert sent == []
    assert session.silence_check_at() == pytest.approx(talked_at + CLIENT_SPEAKING_MAX_S + SILENCE_S)
    clock.now = talked_at + CLIENT_SPEAKING_MAX_S + SILENCE_S
    session.check_silence()
    assert texts(sent) == [EN.line("reprompt")]


def test_the_socket_alarm_is_set_for_a_lost_speaker_off():
    """The socket's alarm (routes/relay.py) follows silence_check_at: with an agentSpeaking on reported, it is still
    set (for when that report stops being trusted), where silence_due_at says nothing is due yet."""
    session, engine, sent = silent_session()
    info(session, "agentSpeaking", "off")
    info(session, "agentSpeaking", "on")
    assert session.silence_due_at() is None and session.silence_check_at() is not None
    info(session, "clientSpeaking", "on")
    assert session.silence_due_at() is None and session.silence_check_at() is not None


def test_a_talk_cycle_queued_behind_one_twilio_still_speaks_keeps_the_longer_bound():
    """Twilio still speaks a long reply (agentSpeaking on, no off yet) when the caller's next words get a short one:
    Twilio plays it after the long one, so the bound on a lost off counts from the long one's end, not from now."""
    from callweaver.engine.relay_session import AGENT_SPEAKING_MARGIN_S

    words = "A very long answer about the houses on the market this week and their gardens. " * 10
    session, engine, sent = silent_session([(words, 0.0)])
    clock = session.clock
    info(session, "agentSpeaking", "off")
    say(session)
    assert engine.done.wait(5)
    wait_until(lambda: session.silence_check_at() is not None)
    closed_at = clock.now
    info(session, "agentSpeaking", "on")
    long_end = closed_at + playback_wait_bound_s(words, chars_per_s=EN.speech_chars_per_s, capped=False)
    clock.now += 5.0
    engine.done.clear()
    say(session, "and the price")  # (the test engine answers a later prompt with an empty reply)
    assert engine.done.wait(5)
    wait_until(lambda: session.silence_check_at() is not None)
    assert session.silence_check_at() >= long_end + AGENT_SPEAKING_MARGIN_S + SILENCE_S


def test_a_node_recording_twilio_reports_playing_is_never_cut_by_the_lost_off_bound():
    """A node's recording has no known length (a three-minute message is a fair flow): while Twilio reports the
    agent speaking during a cycle with a recording, the report is trusted until its "off" (TimeLimit caps a lost
    one), as before the bound existed; after the "off", the next cycles are bounded again."""
    audio = SimpleNamespace(url="https://example.com/a.mp3", interruptible=True)
    session, engine, sent = silent_session([("AUDIO", 0.0), ("Hi.", 0.0)], entered_audio=audio)
    clock = session.clock
    info(session, "agentSpeaking", "off")  # the greeting played
    say(session)
    assert engine.done.wait(5)
    wait_until(lambda: session.silence_check_at() is not None or session._twilio_speaking is not None)
    info(session, "agentSpeaking", "on")  # Twilio plays the recording, then the words
    spoken = len(texts(sent))
    clock.now += 600.0  # a ten-minute recording, still playing
    session.check_silence()
    assert len(texts(sent)) == spoken  # no "are you still there?" over the recording
    assert session.silence_check_at() is None
    info(session, "agentSpeaking", "off")  # it ended
    clock.now += SILENCE_S
    session.check_silence()
    assert texts(sent)[-1] == EN.line("reprompt")
    info(session, "agentSpeaking", "on")  # the re-prompt (no recording): its lost "off" is bounded again
    clock.now += 3600.0
    session.check_silence()
    assert texts(sent)[-1] == EN.line("goodbye")
