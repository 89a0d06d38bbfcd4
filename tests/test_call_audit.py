"""Unscripted callers on a live relay call: barge-in after a reply was sent, what history keeps, a turn that fails.

A RelaySession fed Twilio's frames directly (as test_one_turn_pipeline does), with the fake LLM behind it.
"""
from __future__ import annotations

import json
import time

import pytest

from callweaver.engine.relay_session import RelaySession
from callweaver.services import spawn
from tests.fakes.fake_llm import Reply
from tests.helpers import make_call_body


@pytest.fixture
def env(env):
    return {**env, "CACHE_TYPE": "NullCache"}


class Call:
    """One relay call: the session, every frame it sent, and the call's stored state."""

    def __init__(self, app, client, workflow: str = "real_estate_property_dealer", before_setup=None):
        data = client.post("/api/make-call-optimized", json=make_call_body(workflow=workflow)).get_json()
        assert data["success"], data
        self.svc = app.extensions["callweaver"]
        self.tracking_id = data["optimization"]["trackingId"]
        self.sent: list[dict] = []
        outer = self

        class Sender:
            def send_json(self, *messages: dict) -> None:
                outer.sent.extend(messages)

        self.session = RelaySession(self.svc.engine, Sender(), spawn=spawn)
        if before_setup is not None:
            before_setup(self)
        self.send({"type": "setup", "callSid": data["callSid"], "direction": "outbound-api",
                   "customParameters": {"trackingId": self.tracking_id}})

    def send(self, frame: dict) -> None:
        self.session.handle(json.dumps(frame))

    def turns(self) -> list[dict]:
        return self.svc.store.turns(self.tracking_id)

    def say(self, text: str) -> None:
        """A final transcript, then wait until its turn is committed."""
        count = len(self.turns())
        self.send({"type": "prompt", "voicePrompt": text, "lang": "en-US", "last": True})
        self.wait(lambda: len(self.turns()) > count)

    def wait(self, done, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done(), self.sent

    def messages(self) -> list[dict]:
        return self.svc.store.get_call(self.tracking_id).messages

    def assistant_lines(self) -> list[str]:
        return [m["content"] for m in self.messages() if m["role"] == "assistant"]


@pytest.fixture
def call(app, client, fake_llm):
    made = Call(app, client)
    yield made
    made.session.close()



def test_barge_in_keeps_only_the_first_occurrence_of_repeated_words_heard(call, fake_llm):
    """utteranceUntilInterrupt is what was spoken from the start of the reply: "Sure," heard is the first "Sure,",
    not the later one (which would record words the caller never heard)."""
    fake_llm.push(Reply(text="Sure, sure, I can help with that. Sure thing."))
    call.say("Can you help me")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Sure,", "durationUntilInterruptMs": 400})
    assert call.assistant_lines()[-1] == "Sure,"


def test_barge_in_before_a_sent_reply_played_keeps_none_of_it(call, fake_llm):
    """The whole reply was sent, but the caller spoke again before Twilio played any of it (it reports an empty
    utteranceUntilInterrupt): the history must not claim they heard it, as when the barge-in comes mid-stream."""
    fake_llm.push(Reply(text="The price is four hundred thousand."), Reply(text="Sure."))
    call.say("What's the price")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "", "durationUntilInterruptMs": 0})
    assert call.messages()[-1] == {"role": "user", "content": "What's the price"}
    call.say("Actually, how big is it")
    sent_history = fake_llm.requests[-1].messages
    assert "The price is four hundred thousand." not in [m.get("content") for m in sent_history]


def test_a_late_empty_interrupt_never_removes_an_older_reply_heard_in_full(call, fake_llm):
    fake_llm.push(Reply(text="It has three bedrooms."))
    call.say("How many bedrooms")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "It has three bedrooms.", "durationUntilInterruptMs": 900})
    before = call.messages()
    fake_llm.push(Reply(text="Let me check that for you, one moment please."))
    count = len(call.turns())
    call.send({"type": "prompt", "voicePrompt": "And the garden?", "lang": "en-US", "last": True})
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "", "durationUntilInterruptMs": 0})
    call.wait(lambda: len(call.turns()) > count)
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "", "durationUntilInterruptMs": 0})
    assert call.assistant_lines()[-1] == "It has three bedrooms."
    assert call.messages()[:len(before)] == before


def test_a_turn_that_fails_before_any_word_speaks_an_apology_and_the_call_goes_on(call, fake_llm, monkeypatch):
    """An unexpected fault inside a turn (here planning it) must not leave the caller in silence."""
    from callweaver.engine import conversation

    plan_turn = conversation.plan_turn

    def broken_once(*args, **kwargs):
        monkeypatch.setattr(conversation, "plan_turn", plan_turn)
        raise RuntimeError("planning failed")

    monkeypatch.setattr(conversation, "plan_turn", broken_once)
    call.say("Hello?")
    apology = call.svc.engine.languages.get("en-US").line("apology")
    assert {"type": "text", "token": apology, "last": True} in call.sent
    fake_llm.push(Reply(text="Hi, how can I help?"))
    call.say("Hello?")
    assert call.assistant_lines()[-1] == "Hi, how can I help?"


def test_a_turn_that_fails_after_its_words_closes_the_talk_cycle(call, fake_llm, monkeypatch):
    """Words already sent, then a fault (here routing the reply): the talk cycle is closed with last: true."""
    from callweaver.engine import conversation

    def broken(*args, **kwargs):
        raise RuntimeError("routing failed")

    monkeypatch.setattr(conversation, "apply_turn", broken)
    fake_llm.push(Reply(text="Let me see."))
    call.say("Hello?")
    assert call.sent[-1] == {"type": "text", "token": "", "last": True}, call.sent


@pytest.mark.parametrize("spoken, reported, heard", [
    ("Das ist die Straße", "Das ist die Straße", "Das ist die Straße"),      # raised IndexError
    ("Die Straßenbahn fährt um neun.", "Die Straße", "Die Straße"),          # was cut one character late
    ("İstanbul güzel bir şehir.", "İstanbul güzel", "İstanbul güzel"),
])
def test_heard_prefix_maps_letters_that_casefold_to_several_back_to_one(spoken, reported, heard):
    """Casefolding "ß" gives "ss": the folded copy is longer than the text it maps back to."""
    from callweaver.engine.conversation import heard_prefix

    assert heard_prefix(spoken, reported) == heard


def test_barge_in_after_a_german_reply_ending_in_eszett_speaks_no_apology(call, fake_llm):
    fake_llm.push(Reply(text="Das Haus liegt in der Hauptstraße"))
    call.say("Wo liegt das Haus?")
    sent = len(call.sent)
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Das Haus liegt in der Hauptstraße",
               "durationUntilInterruptMs": 2000})
    assert call.sent[sent:] == []
    assert call.assistant_lines()[-1] == "Das Haus liegt in der Hauptstraße"



def test_a_reply_that_only_records_a_variable_is_followed_by_words(app, client, fake_llm):
    """The model called only `record_variables` and said nothing, and the call stays on its step: the caller must
    not be left in silence (as when a tool-only reply moves to another step, the step is asked to speak)."""
    call = Call(app, client, workflow="loan_prequalification_logical")
    try:
        fake_llm.push(Reply(text="", tool_calls=[("record_variables", {"applicant_name": "Dana Wu"})]),
                      Reply(text="Thanks Dana. Are you currently employed?"))
        call.say("My name is Dana Wu")
        assert call.assistant_lines()[-1] == "Thanks Dana. Are you currently employed?"
        assert call.svc.store.get_call(call.tracking_id).variables["applicant_name"] == "Dana Wu"
        assert "Thanks Dana." in "".join(m["token"] for m in call.sent if m["type"] == "text")
    finally:
        call.session.close()


def test_barge_in_on_a_line_not_in_the_history_leaves_the_last_reply_alone(app, call, fake_llm):
    """After a resume, Twilio speaks the "I'm back" line as the new socket's greeting; it is not in the history. A
    caller talking over it must not turn the last reply they heard in full into that line's first words."""
    fake_llm.push(Reply(text="The price is four hundred thousand."))
    call.say("What's the price")
    resumed = RelaySession(call.svc.engine, call.session.sender, spawn=spawn)
    resumed.handle(json.dumps({"type": "setup", "callSid": call.session.call_sid,
                               "customParameters": {"trackingId": call.tracking_id, "resumed": "1"}}))
    back = call.svc.engine.languages.get("en-US").line("resumed")
    resumed.handle(json.dumps({"type": "interrupt", "utteranceUntilInterrupt": back.split(",")[0],
                               "durationUntilInterruptMs": 600}))
    assert call.assistant_lines()[-1] == "The price is four hundred thousand."


def test_the_call_log_transcript_keeps_what_was_heard_of_a_reply_cut_after_it_was_sent(call, fake_llm):
    fake_llm.push(Reply(text="It has three bedrooms and a large garden."))
    call.say("Tell me about the house")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "It has three bedrooms",
               "durationUntilInterruptMs": 1200})
    entry = call.svc.store.get_call(call.tracking_id).transcript[-1]
    assert entry["spoken"] == "It has three bedrooms and a large garden."
    assert entry["heard"] == "It has three bedrooms" and entry["interrupted"] is True
    assert call.assistant_lines()[-1] == "It has three bedrooms"


def test_a_deeply_nested_frame_is_a_logged_bad_message_and_the_call_goes_on(call, fake_llm):
    """parse never raises: json's RecursionError on a deeply nested frame (well under the size limit) used to end
    the socket's task, and with it the call."""
    from structlog.testing import capture_logs

    nested = '{"type": "prompt", "voicePrompt": "hi", "x": ' + "[" * 5000 + "]" * 5000 + "}"
    with capture_logs() as logs:
        call.session.handle(nested)
    assert [entry["event"] for entry in logs] == ["relay_bad_message"]
    fake_llm.push(Reply(text="Still here."))
    call.say("Hello?")
    assert call.assistant_lines()[-1] == "Still here."



def test_a_store_outage_at_setup_is_retried_when_the_caller_speaks(app, client, fake_llm, monkeypatch):
    """The store failed while `setup` read the call: the caller hears an apology asking them to say it again, so
    the next prompt must find the call (read again), not be dropped as a prompt before setup for the rest of it."""
    from callweaver.store import StoreError

    def store_down_once(call):
        get_call = call.svc.store.get_call

        def failing(tracking_id):
            monkeypatch.setattr(call.svc.store, "get_call", get_call)
            raise StoreError("database is locked")

        monkeypatch.setattr(call.svc.store, "get_call", failing)

    call = Call(app, client, before_setup=store_down_once)
    try:
        apology = call.svc.engine.languages.get("en-US").line("apology")
        assert call.sent == [{"type": "text", "token": apology, "last": True}]
        fake_llm.push(Reply(text="Hello, I can hear you now."))
        call.say("Hello?")
        assert call.assistant_lines()[-1] == "Hello, I can hear you now."
    finally:
        call.session.close()


def test_a_lone_surrogate_in_the_callers_words_neither_fails_the_turn_nor_trips_the_breakers(call, client, fake_llm):
    """A JSON escape can carry text that is not valid Unicode ("\\ud800"). Encoding the LLM request failed, which
    counted as a failure of every provider: three such messages (a relay prompt, or /api/chat from anyone) opened
    every circuit breaker, and healthy providers were skipped for every call until the cooldown."""
    fake_llm.responder = lambda body: Reply(text="Answered.")
    for _ in range(3):
        count = len(call.turns())
        call.session.handle('{"type": "prompt", "voicePrompt": "hi \\ud800 there", "lang": "en-US", "last": true}')
        call.wait(lambda: len(call.turns()) > count)
        assert call.assistant_lines()[-1] == "Answered."
    chat = client.post("/api/chat", data='{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
                       content_type="application/json")
    assert chat.status_code == 200 and chat.get_json()["response"] == "Answered."
    assert all(turn["failovers"] == [] for turn in call.turns())
