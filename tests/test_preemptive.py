"""Preemptive generation on ConversationRelay partial prompts, on the real gunicorn server.

The scripted caller speaks word by word (`prompt` with `last: false`) and sends the final transcript after an
end-of-speech delay. Three variants: the final equals the last partial (the speculation is adopted), the final
differs (it is discarded), and the caller barges in while a speculation runs (it is discarded). Whatever a
discarded speculation produced must reach neither the caller nor the history, the variables, the node, the
reply cache nor the metrics' LLM-request count of the turn it was adopted into. The end-of-utterance signal
(how a partial ends, the caller's cadence) only moves when a speculation starts; a speculation it starts
mid-sentence is discarded like any other, and speculations of a caller turn that never gets a final transcript
(the call ends, or the recogniser sends none) still count in the cost.
"""
from __future__ import annotations

import time

import pytest

from callweaver.simulate import RelayCaller, http
from callweaver.simulate import Reply as CallerReply
from callweaver.store.sqlite import SQLiteStore
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body

FAST_SPEECH_WPM = 1200  # 50 ms between words: shorter than the stability window, so only the end is stable
STABLE_MS = 100
TTFT_S = 0.3
END_OF_SPEECH_MS = 700  # longer than stability + TTFT: the speculation's first token is in before the final
CADENCE_MARGIN_MS = 150  # generous: a loaded test machine delays partials, and a late one must not look like a pause


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preemptive")
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    llm = FakeLLM("primary", ttft_s=TTFT_S).start()
    env = base_env(tmp, twilio, llm)
    env.update(PUBLIC_BASE_URL="", PREEMPTIVE_GENERATION="1", PREEMPTIVE_STABLE_MS=str(STABLE_MS),
               PREEMPTIVE_MAX_SPECULATIONS="2", PREEMPTIVE_MAX_CHARS="80", CACHE_TYPE="SimpleCache",
               PREEMPTIVE_CADENCE_MARGIN_MS=str(CADENCE_MARGIN_MS))
    server = LiveServer(env, workers=1).start()  # one worker: the per-worker reply cache is observable
    yield {"server": server, "twilio": twilio, "llm": llm, "db": env["CALLWEAVER_DB"]}
    server.stop()
    twilio.stop()
    llm.stop()


@pytest.fixture
def llm(stack):
    stack["llm"].reset()
    return stack["llm"]


def new_call(stack, body=None, *, client_speaking_events: bool = False, **options) -> RelayCaller:
    """A caller; by default Twilio sends no clientSpeaking events, so the text/cadence signal decides (the fallback);
    `client_speaking_events=True` for the acoustic end-of-speech signal (test_preemptive_speaker_events.py)."""
    caller = RelayCaller(stack["server"].url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15,
                         client_speaking_events=client_speaking_events, **options)
    caller.place_call(body or make_call_body(workflow=None, globalPrompt="You answer questions about the shop."))
    caller.answer_placed(stack["twilio"].creates()[-1])
    caller.connect()
    return caller


def speak(caller, text, **options):
    return caller.speak(text, words_per_minute=FAST_SPEECH_WPM, end_of_speech_ms=END_OF_SPEECH_MS, **options)


def turns(stack, caller):
    return http("GET", stack["server"].url + f"/api/performance-metrics/{caller.tracking_id}").json()


def stored(stack, caller):
    store = SQLiteStore(stack["db"])
    return store.get_call(caller.tracking_id), store.turns(caller.tracking_id)


def metric_samples(stack) -> dict[str, float]:
    exposition = http("GET", stack["server"].url + "/metrics").text
    return {key: float(value) for key, value in (line.rsplit(" ", 1) for line in exposition.splitlines()
                                                  if line and not line.startswith("#"))}


def eventually(read, done, timeout_s: float = 15.0):
    """Poll `read()` until `done(value)`: the server accounts a hang-up or a missing final after the fact."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def texts_received(caller) -> str:
    return "".join(m.get("token", "") for m in caller.received if isinstance(m, dict) and m.get("type") == "text")


def test_twiml_asks_for_partial_prompts(stack):
    caller = new_call(stack)
    caller.hangup()
    assert caller.twiml.attributes.get("partialPrompts") == "true"


def test_final_equal_to_last_partial_adopts_the_speculation(stack, llm):
    llm.push(Reply(text="We open at nine every weekday."))
    caller = new_call(stack)
    reply = speak(caller, "When do you open on Monday")
    caller.hangup()
    assert reply.while_speaking == []  # nothing was spoken while the caller was still talking
    assert reply.text == "We open at nine every weekday."
    assert len(llm.requests) == 1  # the speculation was the turn: no second request
    assert llm.requests[0].messages[-1]["content"] == "When do you open on Monday"
    record, rows = stored(stack, caller)
    assert [m["content"] for m in record.messages[-2:]] == ["When do you open on Monday",
                                                             "We open at nine every weekday."]
    row = rows[-1]
    assert row["speculation"] == "adopted" and row["speculationsStarted"] == 1
    assert row["speculativeLlmRequests"] == 0 and row["llmRequests"] == 1
    # The provider's first token arrived while the caller was still silent before the final: the reply did not
    # wait a provider TTFT after the final prompt, and the saving is recorded.
    assert row["firstTokenMs"] < row["providerTtftMs"]
    assert row["savedMs"] > 0


def test_final_with_different_words_discards_the_speculation(stack, llm):
    llm.push(Reply(text="SPECULATIVE answer about hours."), Reply(text="Our prices start at ten dollars."))
    caller = new_call(stack)
    reply = speak(caller, "What are your hours", final="What are your prices?")
    assert reply.text == "Our prices start at ten dollars."
    assert "SPECULATIVE" not in texts_received(caller)
    assert len(llm.requests) == 2
    assert llm.requests[0].messages[-1]["content"] == "What are your hours"
    assert llm.requests[1].messages[-1]["content"] == "What are your prices?"
    record, rows = stored(stack, caller)
    assert not any("SPECULATIVE" in m["content"] or m["content"] == "What are your hours" for m in record.messages)
    assert rows[-1]["speculation"] == "discarded" and rows[-1]["speculativeLlmRequests"] == 1
    assert rows[-1]["speculativeTokens"] >= 1 and rows[-1]["llmRequests"] == 1
    # The discarded reply was never cached: the same question on a new call goes to the LLM.
    llm.push(Reply(text="We open at nine."))
    other = new_call(stack)
    again = other.say("What are your hours")
    other.hangup()
    caller.hangup()
    assert again.text == "We open at nine." and len(llm.requests) == 3


def test_discarded_speculation_drops_routing_and_extraction(stack, llm):
    """A speculation that called `transition` and `record_variables` changes nothing once discarded."""
    body = make_call_body()  # the real-estate flow: its entry node routes on buy/sell/rent/invest
    caller = new_call(stack, body)
    start_node = stored(stack, caller)[0].current_node
    llm.push(Reply(text="SPECULATIVE buying reply.", tool_calls=[("transition", {"edge_id": "edge_2"})]),
             Reply(text="Could you tell me a bit more?"))
    reply = speak(caller, "I want to buy", final="I want to buy or sell")
    caller.hangup()
    assert reply.text == "Could you tell me a bit more?"
    assert "SPECULATIVE" not in texts_received(caller)
    record, rows = stored(stack, caller)
    assert record.current_node == start_node and record.variables == {}
    assert rows[-1]["nextNodeId"] == start_node and rows[-1]["speculation"] == "discarded"


def barge_in_on_a_speculation(stack, llm, caller, first: str, utterance: str, start_speculation) -> dict:
    """The reply to `first` is fully sent and still playing (a slow voice); `start_speculation()` starts a
    speculation on `utterance`; Twilio reports the barge-in and then the final. The speculation is discarded and the
    final turn is planned on the history as heard; returns the turn's row."""
    llm.push(Reply(text="Welcome to the shop, we sell bread, cakes, coffee and a great many other things "
                        "that you will surely like.", ttft_s=0.0))
    caller.prompt(first)
    while not (message := caller.recv()).get("last"):  # the whole reply is sent; Twilio is still speaking it
        assert message.get("type") == "text"
    full = texts_received(caller)
    caller.listen(1.0)  # a few words are played
    llm.push(Reply(text="SPECULATIVE reply on the untrimmed history."), Reply(text="Sure, what would you like?"))
    start_speculation()
    llm.wait_for_requests(2)  # the speculation is in flight
    caller.interrupt()        # Twilio reports the barge-in on the first reply
    caller.listen(0.05)
    answer = caller.read_reply(CallerReply(sent_at=caller.prompt(utterance)))
    caller.hangup()
    assert answer.text == "Sure, what would you like?"
    assert "SPECULATIVE" not in texts_received(caller)
    assert len(llm.requests) == 3
    # The final turn was planned on the history as heard, not on the one the speculation saw.
    assistant = [m["content"] for m in llm.requests[2].messages if m["role"] == "assistant"]
    assert full.startswith(assistant[-1]) and len(assistant[-1]) < len(full)
    record, rows = stored(stack, caller)
    assert not any("SPECULATIVE" in m["content"] for m in record.messages)
    assert rows[-1]["speculation"] == "discarded" and rows[-1]["speculativeLlmRequests"] == 1
    return rows[-1]


def test_barge_in_during_a_speculation_discards_it(stack, llm):
    caller = new_call(stack, speaking_rate_cps=15.0)
    barge_in_on_a_speculation(stack, llm, caller, "Hello", "Stop I want to order",
                              lambda: caller.partial("Stop I want to order"))


def test_limits_per_turn_and_length(stack, llm):
    # Slow speech (every gap longer than the stability window) would speculate after every word: the limit
    # stops it at two, and the final starts a normal turn.
    llm.push(Reply(text="A"), Reply(text="B"), Reply(text="Right."))
    caller = new_call(stack)
    reply = caller.speak("one two three four", words_per_minute=60000 / (STABLE_MS + 250),
                         end_of_speech_ms=STABLE_MS + 250)
    assert reply.text == "Right."
    assert len(llm.requests) == 3
    rows = stored(stack, caller)[1]
    assert rows[-1]["speculationsStarted"] == 2 and rows[-1]["speculation"] == "discarded"
    # An utterance longer than PREEMPTIVE_MAX_CHARS is never speculated on.
    llm.push(Reply(text="Long one."))
    long_text = " ".join(["word"] * 20)  # 99 characters
    reply = speak(caller, long_text)
    caller.hangup()
    assert reply.text == "Long one." and len(llm.requests) == 4
    assert stored(stack, caller)[1][-1]["speculation"] is None


def test_metrics_report_adoption_saving_and_cost(stack, llm):
    llm.push(Reply(text="Adopted reply."), Reply(text="SPECULATIVE"), Reply(text="Second reply."))
    caller = new_call(stack)
    # The words follow each other within a millisecond: even on a loaded machine no gap between them outlasts the
    # window, so each turn speculates exactly once (on its whole line) and the counts below are exact.
    instant = dict(words_per_minute=60000, end_of_speech_ms=END_OF_SPEECH_MS)
    caller.speak("Is the shop open today", **instant)
    caller.speak("Do you sell bread", final="Do you sell cakes", **instant)
    caller.hangup()
    per_call = turns(stack, caller)["metrics"]["preemption"]
    assert per_call["turns"] == 2 and per_call["turnsSpeculated"] == 2
    assert per_call["adopted"] == 1 and per_call["discarded"] == 1 and per_call["adoptionRate"] == 0.5
    assert per_call["extraLlmRequests"] == 1 and per_call["extraLlmRequestsPerTurn"] == 0.5
    assert per_call["llmRequestsPerTurn"] == 1.5 and per_call["extraTokensPerTurn"] > 0
    assert per_call["savedMs"]["samples"] == 1 and per_call["savedMs"]["p50"] > 0
    assert per_call["finalToFirstTokenMs"]["adopted"]["samples"] == 1
    aggregate = http("GET", stack["server"].url + "/api/performance-metrics").json()["aggregatedMetrics"]
    assert aggregate["preemption"]["adopted"] >= 1 and aggregate["preemption"]["extraLlmRequests"] >= 1
    exposition = http("GET", stack["server"].url + "/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in exposition.splitlines() if line and not line.startswith("#"))
    assert float(samples['callweaver_speculations_total{outcome="adopted"}']) >= 1
    assert float(samples['callweaver_speculations_total{outcome="discarded"}']) >= 1
    assert float(samples["callweaver_speculative_llm_requests_total"]) >= 1
    assert float(samples["callweaver_speculation_saved_ms_count"]) >= 1
    assert float(samples['callweaver_relay_final_to_first_token_ms_count{speculation="adopted"}']) >= 1


UNANSWERED = 'callweaver_speculations_total{outcome="unanswered"}'


def test_call_ending_during_a_speculation_keeps_its_cost(stack, llm):
    """The caller hangs up mid-sentence: no turn row is written, but the speculation's request is counted."""
    llm.push(Reply(text="SPECULATIVE answer nobody asked for.", ttft_s=0.0))
    before = metric_samples(stack)
    caller = new_call(stack)
    caller.partial("Do you deliver on Sundays?")  # a sentence mark: the speculation starts at once
    llm.wait_for_requests(1)
    caller.listen(0.3)  # its tokens are in (held back)
    caller.hangup()
    preemption = eventually(lambda: turns(stack, caller)["metrics"]["preemption"],
                            lambda p: p["unanswered"]["speculations"] >= 1)
    assert preemption["unanswered"]["speculations"] == 1 and preemption["unanswered"]["llmRequests"] == 1
    assert preemption["unanswered"]["tokens"] >= 1 and preemption["unanswered"]["window"] == "call"
    assert preemption["extraLlmRequests"] == 1 and preemption["turns"] == 0
    assert "SPECULATIVE" not in texts_received(caller)
    record, rows = stored(stack, caller)
    assert rows == [] and record.variables == {} and not record.transcript
    assert [m["role"] for m in record.messages] == ["assistant"]  # the greeting only
    assert "SPECULATIVE" not in record.messages[0]["content"]
    after = metric_samples(stack)
    assert after[UNANSWERED] - before.get(UNANSWERED, 0) == 1
    assert after["callweaver_speculative_llm_requests_total"] - before["callweaver_speculative_llm_requests_total"] == 1
    aggregate = http("GET", stack["server"].url + "/api/performance-metrics").json()["aggregatedMetrics"]
    assert aggregate["preemption"]["unanswered"]["speculations"] >= 1


def test_speech_ending_without_a_final_keeps_its_cost_and_frees_the_turn(stack, llm):
    """The recogniser never sends `last: true` for what the caller said: after a silence the speculation is
    accounted as unanswered, and the caller's next turn starts with its own speculation budget."""
    llm.push(Reply(text="SPECULATIVE", ttft_s=0.0), Reply(text="We deliver every day."))
    caller = new_call(stack)
    caller.partial("Do you deliver?")
    llm.wait_for_requests(1)
    preemption = eventually(lambda: turns(stack, caller)["metrics"]["preemption"],
                            lambda p: p["unanswered"]["speculations"] >= 1)
    assert preemption["unanswered"]["speculations"] == 1 and preemption["unanswered"]["llmRequests"] == 1
    reply = speak(caller, "Do you deliver on Sundays")
    caller.hangup()
    assert reply.text == "We deliver every day." and "SPECULATIVE" not in texts_received(caller)
    record, rows = stored(stack, caller)
    assert len(rows) == 1 and rows[0]["speculation"] == "adopted" and rows[0]["speculationsStarted"] == 1
    assert rows[0]["speculativeLlmRequests"] == 0  # the unanswered one is not charged to this turn twice
    assert not any("SPECULATIVE" in m["content"] for m in record.messages)


def test_a_partial_ending_mid_sentence_is_not_speculated_on(stack, llm):
    """Hesitations after "a" and "for" are longer than PREEMPTIVE_STABLE_MS: the plain window would speculate in
    both; the end-of-utterance signal waits PREEMPTIVE_INCOMPLETE_MS there and speculates only at the end."""
    llm.push(Reply(text="A table for two, certainly."))
    caller = new_call(stack)
    reply = speak(caller, "I would like a table for two", punctuated_partials=False, pauses_s={4: 0.4, 6: 0.4})
    caller.hangup()
    assert reply.text == "A table for two, certainly."
    assert len(llm.requests) == 1
    row = stored(stack, caller)[1][-1]
    assert row["speculation"] == "adopted" and row["speculationsStarted"] == 1


def test_the_wait_follows_the_callers_cadence(stack, llm):
    """A slow talker: the first turn speculates between words (the cadence is not known yet) until the cap; from
    their pauses the wait grows past them, so the next turn speculates once, at the end, and adopts it."""
    gap_ms = 350.0
    llm.push(Reply(text="A"), Reply(text="B"), Reply(text="First."), Reply(text="Second."))
    caller = new_call(stack)
    first = caller.speak("one two three four five six", words_per_minute=60000 / gap_ms,
                         end_of_speech_ms=gap_ms + CADENCE_MARGIN_MS + TTFT_S * 1000 + 300,
                         punctuated_partials=False)
    assert first.text == "First." and len(llm.requests) == 3
    second = caller.speak("seven eight nine ten", words_per_minute=60000 / gap_ms,
                          end_of_speech_ms=gap_ms + CADENCE_MARGIN_MS + TTFT_S * 1000 + 300,
                          punctuated_partials=False)
    caller.hangup()
    assert second.text == "Second." and len(llm.requests) == 4
    rows = stored(stack, caller)[1]
    assert rows[0]["speculationsStarted"] == 2 and rows[0]["speculation"] == "discarded"
    assert rows[1]["speculationsStarted"] == 1 and rows[1]["speculation"] == "adopted"


def test_a_mid_sentence_speculation_from_the_cadence_changes_nothing(stack, llm):
    """The cadence makes the wait short; a hesitation after a complete-looking word ("a house") starts a
    speculation that routes, which the next word discards: not heard, not in the history, the node or the store."""
    body = make_call_body()  # the real-estate flow: its entry node routes on buy/sell/rent/invest
    caller = new_call(stack, body)
    start_node = stored(stack, caller)[0].current_node
    llm.push(Reply(text="Hello, how can I help?"))
    speak(caller, "Hello there good morning to you", punctuated_partials=False)  # the caller's pace is learned
    llm.push(Reply(text="SPECULATIVE buying reply.", ttft_s=0.0, tool_calls=[("transition", {"edge_id": "edge_2"})]),
             Reply(text="Could you tell me a bit more?"))
    reply = speak(caller, "I want to buy a house or rent one", punctuated_partials=False, pauses_s={6: 0.4})
    caller.hangup()
    assert reply.text == "Could you tell me a bit more?" and reply.while_speaking == []
    assert "SPECULATIVE" not in texts_received(caller)
    assert llm.requests[1].messages[-1]["content"] == "I want to buy a house"
    record, rows = stored(stack, caller)
    assert record.current_node == start_node and record.variables == {}
    assert not any("SPECULATIVE" in m["content"] or m["content"] == "I want to buy a house"
                   for m in record.messages)
    assert not any("SPECULATIVE" in (entry.get("spoken") or "") for entry in record.transcript)
    row = rows[-1]
    assert row["speculation"] == "adopted" and row["speculationsStarted"] == 2
    assert row["speculativeLlmRequests"] == 1 and row["nextNodeId"] == start_node and row["toolNames"] == []


# ---- the acoustic end-of-speech signal: Twilio's clientSpeaking on/off (debug="speaker-events") ----------------

HANGOVER_MS = 100  # the scripted caller's VAD hangover: silence this long after a word and Twilio reports "off"
SLOW_GAP_MS = 250  # between words: longer than PREEMPTIVE_STABLE_MS, so the text window alone would fire in them


def speaking_call(stack, body=None, **options) -> RelayCaller:
    """A caller whose Twilio reports clientSpeaking on/off, as it does with debug="speaker-events"."""
    return new_call(stack, body, client_speaking_events=True, vad_hangover_ms=HANGOVER_MS, **options)


def test_twiml_asks_for_speaker_events(stack):
    caller = new_call(stack)
    caller.hangup()
    assert "speaker-events" in caller.twiml.attributes.get("debug", "").split()


def test_client_speaking_off_starts_the_speculation_and_the_final_adopts_it(stack, llm):
    """Unpunctuated words with gaps longer than the text window: without the acoustic signal the window would
    speculate between words; with it the only speculation starts at "off" after the last word, and is adopted."""
    llm.push(Reply(text="We open at nine on Tuesdays."))
    caller = speaking_call(stack)
    reply = caller.speak("When do you open on Tuesday", words_per_minute=60000 / SLOW_GAP_MS,
                         end_of_speech_ms=END_OF_SPEECH_MS, punctuated_partials=False)
    caller.hangup()
    assert reply.while_speaking == []  # nothing was spoken while the caller was still talking
    assert reply.text == "We open at nine on Tuesdays."
    assert len(llm.requests) == 1 and llm.requests[0].messages[-1]["content"] == "When do you open on Tuesday"
    record, rows = stored(stack, caller)
    assert [m["content"] for m in record.messages[-2:]] == ["When do you open on Tuesday", "We open at nine on Tuesdays."]
    row = rows[-1]
    assert row["speculation"] == "adopted" and row["speculationsStarted"] == 1
    assert row["speculationSignal"] == "end_of_speech" and row["speculationSignals"] == {"end_of_speech": 1}
    assert row["firstTokenMs"] < row["providerTtftMs"] and row["savedMs"] > 0
    preemption = turns(stack, caller)["metrics"]["preemption"]
    assert preemption["bySignal"] == {"end_of_speech": {"started": 1, "adopted": 1}}
    assert metric_samples(stack)['callweaver_speculations_by_signal_total{outcome="adopted",signal="end_of_speech"}'] >= 1


def test_caller_resuming_after_client_speaking_off_and_a_different_final_discard_everything(stack, llm):
    """A pause past the VAD hangover after a complete-looking word: "off" starts a speculation that routes; the
    caller goes on ("on", then other words), so it is discarded; "off" at the end starts another, and the final
    differs from it too. Neither reaches the caller, the history, the node, the variables or the store."""
    body = make_call_body()  # the real-estate flow: its entry node routes on buy/sell/rent/invest
    caller = speaking_call(stack, body)
    start_node = stored(stack, caller)[0].current_node
    llm.push(Reply(text="SPECULATIVE buying reply.", ttft_s=0.0, tool_calls=[("transition", {"edge_id": "edge_2"})]),
             Reply(text="SPECULATIVE second reply.", tool_calls=[("transition", {"edge_id": "edge_2"})]),
             Reply(text="Could you tell me a bit more?"))
    reply = caller.speak("I want to buy a flat or rent one", words_per_minute=FAST_SPEECH_WPM,
                         end_of_speech_ms=END_OF_SPEECH_MS, punctuated_partials=False, pauses_s={6: 0.4},
                         final="I want to buy a flat or rent one please")
    caller.hangup()
    assert reply.text == "Could you tell me a bit more?" and reply.while_speaking == []
    assert "SPECULATIVE" not in texts_received(caller)
    assert [r.messages[-1]["content"] for r in llm.requests] == [
        "I want to buy a flat", "I want to buy a flat or rent one", "I want to buy a flat or rent one please"]
    record, rows = stored(stack, caller)
    assert record.current_node == start_node and record.variables == {}
    assert not any("SPECULATIVE" in m["content"] or m["content"] in ("I want to buy a flat",
                                                                     "I want to buy a flat or rent one")
                   for m in record.messages)
    assert not any("SPECULATIVE" in (entry.get("spoken") or "") for entry in record.transcript)
    row = rows[-1]
    assert row["speculation"] == "discarded" and row["speculationsStarted"] == 2
    assert row["speculationSignals"] == {"end_of_speech": 2} and row["speculationSignal"] is None
    assert row["speculativeLlmRequests"] == 2 and row["nextNodeId"] == start_node and row["toolNames"] == []


def test_a_hesitation_after_a_word_that_cannot_end_a_sentence_is_not_speculated_on(stack, llm):
    """clientSpeaking off after "a" (past the hangover): the words say the caller is mid-sentence, so no request;
    the "off" at the end starts the one speculation, which is adopted."""
    llm.push(Reply(text="A table for three, certainly."))
    caller = speaking_call(stack)
    reply = caller.speak("We would like a table for three", words_per_minute=FAST_SPEECH_WPM,
                         end_of_speech_ms=END_OF_SPEECH_MS, punctuated_partials=False, pauses_s={4: 0.4})
    caller.hangup()
    assert reply.text == "A table for three, certainly." and len(llm.requests) == 1
    row = stored(stack, caller)[1][-1]
    assert row["speculation"] == "adopted" and row["speculationSignals"] == {"end_of_speech": 1}


def test_barge_in_during_a_speculation_started_by_client_speaking_off(stack, llm):
    caller = speaking_call(stack, speaking_rate_cps=15.0)

    def speak_then_fall_silent():
        caller.client_speaking(True)
        caller.partial("Wait I would like to order")
        caller.listen(HANGOVER_MS / 1000)
        caller.client_speaking(False)  # the speculation starts here

    row = barge_in_on_a_speculation(stack, llm, caller, "Good evening", "Wait I would like to order",
                                    speak_then_fall_silent)
    assert row["speculationSignals"] == {"end_of_speech": 1}


def test_a_transcript_arriving_after_client_speaking_off_starts_the_speculation(stack, llm):
    """The recogniser's last interim transcript may come after Twilio's "off": it starts the speculation at once."""
    llm.push(Reply(text="SPECULATIVE on two words."), Reply(text="Yes, we deliver."))
    caller = speaking_call(stack)
    caller.client_speaking(True)
    caller.partial("Do you")
    caller.listen(HANGOVER_MS / 1000)
    caller.client_speaking(False)  # "Do you" ends in a pronoun, which can end a sentence: a speculation starts
    llm.wait_for_requests(1)
    caller.partial("Do you cater")  # the transcript catches up while the caller is silent
    llm.wait_for_requests(2)
    caller.listen(0.5)
    reply = caller.read_reply(CallerReply(sent_at=caller.prompt("Do you cater")))
    caller.hangup()
    assert reply.text == "Yes, we deliver." and "SPECULATIVE" not in texts_received(caller)
    assert len(llm.requests) == 2
    row = stored(stack, caller)[1][-1]
    assert row["speculation"] == "adopted" and row["speculationSignals"] == {"end_of_speech": 2}
    assert row["firstTokenMs"] < row["providerTtftMs"]
