"""Unscripted callers on a live relay call: barge-in after a reply was sent, what history keeps, a turn that fails.

A RelaySession fed Twilio's frames directly (as test_one_turn_pipeline does), with the fake LLM behind it.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from callweaver.engine.relay_session import PLAYBACK_WAIT_MIN_S, RelaySession
from callweaver.services import spawn
from tests.fakes.fake_llm import Reply
from tests.helpers import make_call_body


@pytest.fixture
def env(env):
    return {**env, "CACHE_TYPE": "NullCache"}


class Call:
    """One relay call: the session, every frame it sent, and the call's stored state."""

    def __init__(self, app, client, workflow: str = "real_estate_property_dealer", before_setup=None, on_write=None,
                 spawn=spawn, **body):
        data = client.post("/api/make-call-optimized", json=make_call_body(workflow=workflow, **body)).get_json()
        assert data["success"], data
        self.svc = app.extensions["callweaver"]
        self.tracking_id = data["optimization"]["trackingId"]
        self.sent: list[dict] = []
        outer = self

        class Sender:
            def send_json(self, *messages: dict) -> None:
                if on_write is not None:
                    on_write(outer, messages)
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

    def say(self, text: str, lang: str = "en-US") -> None:
        """A final transcript, then wait until its turn is committed."""
        count = len(self.turns())
        self.send({"type": "prompt", "voicePrompt": text, "lang": lang, "last": True})
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


@pytest.fixture
def waited_call(app, client, fake_llm):
    """A call whose end waiters a test can wait for (`waiters.join()`), rather than sleep before checking that no
    second `end` (or none) was written."""
    waiters = EndWaiters()
    made = Call(app, client, spawn=waiters.spawn)
    made.waiters = waiters
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
    ("İstanbulda güzel.", "İstanbul", "İstanbul"),                           # was "İstanbuld"
])
def test_heard_of_maps_letters_that_casefold_to_several_back_to_one(spoken, reported, heard):
    """Casefolding "ß" gives "ss", "İ" gives "i" and a combining dot: the folded copy is longer than the text."""
    from callweaver.engine.conversation import heard_of

    assert heard_of(spoken, reported, None) == heard


@pytest.mark.parametrize("spoken, reported, played_ms, heard", [
    ("Hello, how are you today?", "Hello how are", 900, "Hello, how are"),                 # punctuation dropped
    ("你好，我们下午三点见。然后再说。", "你好我们下午三点见。", 1500, "你好，我们下午三点见。"),  # full-width
    ("你好，我们下午三点见。然后再说。", "你好，我们下午三点见", 1500, "你好，我们下午三点见"),
    ("<speak>Hello there, friend.</speak>", "Hello there", 700, "<speak>Hello there"),      # SSML tags
    ("Sure, sure.", "Sure,", 300, "Sure,"), ("Sure, sure.", "Sure", 300, "Sure"),
    ("It has THREE   bedrooms.", "it has three bedrooms", 1200, "It has THREE   bedrooms."),
    ("Sure. Sure, I can help you with that today.", "I can help", 2000,                   # not from the start:
     "Sure. Sure, I can help you with"),                                                   # 2 s of speech
    ("The price is four hundred thousand.", "", 1000, "The price is four"),                # heard, words unknown
    ("The price is four hundred thousand.", "", 0, ""),
    ("The price is four hundred thousand.", None, None, "The price is four hundred thousand."),
    ("The price is four hundred thousand.", "Das Haus", None, "The price is four hundred thousand."),
])
def test_heard_of_is_one_barge_in_policy(spoken, reported, played_ms, heard):
    """Folded, anchored matching (case, whitespace, punctuation, SSML); when the text does not place the cut, an
    estimate from durationUntilInterruptMs at a typical speaking rate; with neither, all of it counts as heard."""
    from callweaver.engine.conversation import heard_of

    assert heard_of(spoken, reported, played_ms) == heard


def test_barge_in_reported_without_punctuation_cuts_the_stored_reply(call, fake_llm):
    fake_llm.push(Reply(text="Hello, how are you today? I have news about the house."))
    call.say("Hi")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Hello how are you today",
               "durationUntilInterruptMs": 1500})
    assert call.assistant_lines()[-1] == "Hello, how are you today"


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


class LastFrameWrittenDuringBargeIn:
    """A socket write of a reply's last frame (`last: true`) that is still in flight when the caller barges in:
    the write returns only once the session has taken the interrupt (it stopped streaming)."""

    def __init__(self) -> None:
        self.writing = threading.Event()
        self.armed = True

    def __call__(self, call: "Call", messages: tuple) -> None:
        if self.armed and any(m.get("type") == "text" and m.get("last") and m.get("token") == "" for m in messages):
            self.armed = False
            self.writing.set()
            call.wait(lambda: not call.session._streaming)


def assert_the_call_goes_on(call: "Call", fake_llm) -> None:
    """The caller's next words are answered and no `end` was sent: the call did not end nor stay closing."""
    fake_llm.push(Reply(text="Of course, what else?"))
    call.say("wait, one more question")
    assert call.assistant_lines()[-1] == "Of course, what else?"
    assert not any(m["type"] == "end" for m in call.sent), call.sent


def barge_in_during_the_last_write(call: "Call", blocked: LastFrameWrittenDuringBargeIn, prompt: str,
                                   interrupt: dict) -> None:
    call.send({"type": "prompt", "voicePrompt": prompt, "lang": "en-US", "last": True})
    assert blocked.writing.wait(10)
    count = len(call.turns())
    call.send({"type": "interrupt", **interrupt})
    call.wait(lambda: len(call.turns()) > count)


class WordsFailDuringBargeIn(LastFrameWrittenDuringBargeIn):
    """A write of the reply's words (" large") is in flight when the caller barges in, and then fails (the socket
    broke)."""

    def __call__(self, call: "Call", messages: tuple) -> None:
        if self.armed and any(m.get("type") == "text" and "large" in m.get("token", "") for m in messages):
            self.armed = False
            self.writing.set()
            call.wait(lambda: not call.session._streaming)
            raise OSError("connection reset")


@pytest.mark.parametrize("blocker", [LastFrameWrittenDuringBargeIn, WordsFailDuringBargeIn])
def test_a_barge_in_while_a_frame_is_written_keeps_only_what_was_heard(app, client, fake_llm, blocker):
    """The frame in flight at the barge-in is written, or its write then fails (the reply's failure path used to
    commit everything sent as heard before the canceller could store what Twilio reported; found by review)."""
    blocked = blocker()
    call = Call(app, client, on_write=blocked)
    try:
        fake_llm.push(Reply(text="It has three bedrooms, a pool, and a large garden."))
        barge_in_during_the_last_write(call, blocked, "Tell me about the house",
                                       {"utteranceUntilInterrupt": "It has three", "durationUntilInterruptMs": 700})
        assert call.assistant_lines()[-1] == "It has three"
        entry = call.svc.store.get_call(call.tracking_id).transcript[-1]
        assert entry["heard"] == "It has three" and entry["interrupted"] is True
        assert call.turns()[-1]["interrupted"] is True
    finally:
        call.session.close()


def test_a_barge_in_while_a_goodbye_is_written_neither_hangs_up_nor_goes_silent(app, client, fake_llm):
    """The caller talks over the closing line as its last frame is written: the end it announced was not heard,
    so it is dropped (architecture.md's interrupt rule) and the caller's next words are answered."""
    blocked = LastFrameWrittenDuringBargeIn()
    call = Call(app, client, on_write=blocked)
    try:
        barge_in_during_the_last_write(call, blocked, "goodbye",
                                       {"utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
        record = call.svc.store.get_call(call.tracking_id)
        assert call.turns()[-1]["action"] is None and "pendingAction" not in (record.meta or {})
        assert_the_call_goes_on(call, fake_llm)
    finally:
        call.session.close()


def resumed_socket(call: "Call") -> RelaySession:
    """The call's socket dropped and Twilio opened a new one: its greeting is the "I'm back" line, not a reply."""
    resumed = RelaySession(call.svc.engine, call.session.sender, spawn=spawn)
    resumed.handle(json.dumps({"type": "setup", "callSid": call.session.call_sid,
                               "customParameters": {"trackingId": call.tracking_id, "resumed": "1"}}))
    return resumed


@pytest.mark.parametrize("interrupt", [
    {"utteranceUntilInterrupt": "", "durationUntilInterruptMs": 0},
    {"durationUntilInterruptMs": 2500},
    {},
], ids=["empty", "missing-with-duration", "missing"])
def test_a_barge_in_on_a_resumed_sockets_greeting_keeps_the_reply_heard_before(call, fake_llm, interrupt):
    """The talk cycle interrupted is the greeting the session did not send as a reply: nothing stored is trimmed,
    whatever (or nothing) Twilio reports of it."""
    fake_llm.push(Reply(text="The price is four hundred thousand."))
    call.say("What's the price")
    resumed_socket(call).handle(json.dumps({"type": "interrupt", **interrupt}))
    assert call.assistant_lines()[-1] == "The price is four hundred thousand."


def test_a_barge_in_on_an_apology_keeps_the_reply_heard_before_it(call, fake_llm, monkeypatch):
    """A canned apology (here for a frame that failed to be handled) is its own talk cycle, not a stored reply."""
    fake_llm.push(Reply(text="The price is four hundred thousand."))
    call.say("What's the price")

    def broken(self, message):
        raise RuntimeError("handler failed")

    monkeypatch.setattr(RelaySession, "_on_info", broken)
    call.send({"type": "info", "name": "agentSpeaking", "value": "off"})  # fails: the session apologises
    apology = call.svc.engine.languages.get("en-US").line("apology")
    assert call.sent[-1] == {"type": "text", "token": apology, "last": True}
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "", "durationUntilInterruptMs": 0})
    assert call.assistant_lines()[-1] == "The price is four hundred thousand."


def test_a_barge_in_that_reports_no_text_is_not_taken_for_nothing_heard(call, fake_llm):
    """utteranceUntilInterrupt absent is unknown, not empty: the reply Twilio was speaking is not deleted."""
    fake_llm.push(Reply(text="It has three bedrooms."))
    call.say("How many bedrooms")
    call.send({"type": "interrupt"})
    assert call.assistant_lines()[-1] == "It has three bedrooms."


def test_a_barge_in_on_the_welcome_greeting_trims_the_greeting(call, fake_llm):
    """The welcome greeting is stored as the call's first line and is the socket's first talk cycle."""
    greeting = call.assistant_lines()[-1]
    first_word = greeting.split()[0]
    call.send({"type": "interrupt", "utteranceUntilInterrupt": first_word, "durationUntilInterruptMs": 400})
    assert call.assistant_lines() == [first_word]


class FailOnce:
    """A socket write that raises, once, for the first frames `matches` picks; `failed` holds them."""

    def __init__(self, matches) -> None:
        self.matches, self.failed = matches, []

    def __call__(self, call: "Call", messages: tuple) -> None:
        if not self.failed and self.matches(messages):
            self.failed.append(messages)
            raise RuntimeError("socket write failed")


def carries_words(messages: tuple) -> bool:
    return any(m.get("type") == "text" and m.get("token") for m in messages)


def test_a_closing_line_that_fails_to_be_sent_leaves_the_call_answering(app, client, fake_llm):
    """The write of the goodbye's words fails: no `end` follows, so the session must not stay "closing" (every
    later prompt dropped, the call silent), and the failed turn counts as an error (source apology)."""
    fail = FailOnce(carries_words)  # the goodbye's words
    call = Call(app, client, on_write=fail)
    try:
        call.say("goodbye")
        assert fail.failed, call.sent
        source = call.turns()[-1]["source"]
        fake_llm.push(Reply(text="Of course, what else?"))
        call.say("wait, one more question")
        assert call.assistant_lines()[-1] == "Of course, what else?"
        assert source == "apology"
    finally:
        call.session.close()


def test_a_turn_that_fails_counts_as_an_error(call, fake_llm, monkeypatch):
    from callweaver.engine import conversation

    def broken(*args, **kwargs):
        raise RuntimeError("planning failed")

    monkeypatch.setattr(conversation, "plan_turn", broken)
    call.say("Hello?")
    assert call.turns()[-1]["source"] == "apology"


def test_a_goodbye_cut_short_by_the_caller_neither_hangs_up_nor_ignores_them(call, fake_llm):
    """The whole closing line was sent and Twilio is speaking it when the caller talks over it: the end it announces
    was not heard, so it is dropped (architecture.md's interrupt rule), the call stays on its step, and the caller's
    words are answered."""
    node = call.svc.store.get_call(call.tracking_id).current_node
    call.say("goodbye")
    closing_line = call.assistant_lines()[-1]
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    record = call.svc.store.get_call(call.tracking_id)
    assert record.current_node == node and "pendingAction" not in (record.meta or {})
    assert call.assistant_lines()[-1] == "Thank you" != closing_line
    assert_the_call_goes_on(call, fake_llm)


def test_a_goodbye_heard_to_its_end_still_ends_the_call(call, fake_llm):
    call.say("goodbye")
    closing_line = call.assistant_lines()[-1]
    call.send({"type": "interrupt", "utteranceUntilInterrupt": closing_line, "durationUntilInterruptMs": 3000})
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    assert json.loads(call.sent[-1]["handoffData"])["reason"] == "end"


def test_a_call_the_store_cannot_read_is_retried_on_whole_turns_only_and_then_ended(app, client, fake_llm,
                                                                                     monkeypatch):
    """A store that stays down: the read is retried when a caller turn ends (a final transcript, a keypad entry),
    not on every digit, at most twice; then the call ends with an error instead of apologising forever."""
    from structlog.testing import capture_logs
    from callweaver.store import StoreError

    def store_down(call):
        def failing(tracking_id):
            raise StoreError("database is locked")

        monkeypatch.setattr(call.svc.store, "get_call", failing)

    with capture_logs() as logs:
        call = Call(app, client, before_setup=store_down)
        try:
            apology = call.svc.engine.languages.get("en-US").line("apology")
            for digit in "12#":
                call.send({"type": "dtmf", "digit": digit})
            assert [m for m in call.sent if m.get("token") == apology] == [call.sent[0]] * 2, call.sent
            call.send({"type": "prompt", "voicePrompt": "Hello?", "lang": "en-US", "last": True})
            call.wait(lambda: any(m["type"] == "end" for m in call.sent))
            assert json.loads(call.sent[-1]["handoffData"])["reason"] == "error"
            sent = len(call.sent)
            call.send({"type": "prompt", "voicePrompt": "Hello??", "lang": "en-US", "last": True})
            assert len(call.sent) == sent
        finally:
            call.session.close()
    assert "relay_setup_unreadable" in [entry["event"] for entry in logs]


TOOL_ONLY = Reply(text="", tool_calls=[("record_variables", {"applicant_name": "Dana Wu"})])


def test_a_discarded_speculation_never_pays_the_tool_only_follow_up(app, client, fake_llm):
    """A speculation whose model only called a tool holds its second request until it is adopted: a discarded one
    (the final transcript differs) never sends it."""
    call = Call(app, client, workflow="loan_prequalification_logical")
    try:
        fake_llm.push(TOOL_ONLY, Reply(text="Thanks Dana."))
        engine = call.svc.engine
        speculation = engine.speculate(call.svc.store.get_call(call.tracking_id), "My name is Dana Wu", lang="en-US")
        task = spawn(speculation.pump)
        call.wait(lambda: speculation.turn.result.tool_calls)
        engine.drop_speculation(speculation, "final_differs")
        task.join(10)
        assert speculation.done and len(fake_llm.requests) == 1
    finally:
        call.session.close()


def test_an_adopted_speculation_sends_the_tool_only_follow_up(app, client, fake_llm):
    call = Call(app, client, workflow="loan_prequalification_logical")
    try:
        fake_llm.push(TOOL_ONLY, Reply(text="Thanks Dana."))
        speculation = call.svc.engine.speculate(call.svc.store.get_call(call.tracking_id), "My name is Dana Wu",
                                                lang="en-US")
        spawn(speculation.pump)
        assert "".join(speculation.replay()) == "Thanks Dana." and len(fake_llm.requests) == 2
    finally:
        call.session.close()


def test_a_tool_only_follow_up_that_ends_in_an_apology_counts_as_one(app, client, fake_llm, fake_llm2):
    """The follow-up request failed on every provider and the caller heard an apology: the turn is an apology
    (an error on the dashboard), and the call stays on its step, as when the first request fails."""
    call = Call(app, client, workflow="loan_prequalification_logical")
    try:
        node = call.svc.store.get_call(call.tracking_id).current_node
        fake_llm.push(TOOL_ONLY, *[Reply(fault="500") for _ in range(3)])
        fake_llm2.push(*[Reply(fault="500") for _ in range(3)])
        call.say("My name is Dana Wu")
        apology = call.svc.engine.languages.get("en-US").line("apology")
        assert call.assistant_lines()[-1] == apology
        assert call.turns()[-1]["source"] == "apology"
        assert call.svc.store.get_call(call.tracking_id).current_node == node
    finally:
        call.session.close()


def test_a_lone_surrogate_anywhere_in_a_relay_frame_is_cleaned_where_it_is_parsed(app, client, fake_llm):
    """Not only the caller's words: a setup field (kept on the call record) with "\\ud800" made SQLite refuse the
    write ("surrogates not allowed"), so the call was never read and the caller heard an apology."""
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    svc = app.extensions["callweaver"]
    sent: list[dict] = []

    class Sender:
        def send_json(self, *messages: dict) -> None:
            sent.extend(messages)

    session = RelaySession(svc.engine, Sender(), spawn=spawn)
    try:
        session.handle('{"type": "setup", "callSid": "%s", "callerName": "Dana \\ud800", "customParameters": '
                       '{"trackingId": "%s"}}' % (data["callSid"], data["optimization"]["trackingId"]))
        assert sent == []
        meta = svc.store.get_call(data["optimization"]["trackingId"]).meta
        assert meta["setup"]["callerName"] == "Dana \ufffd"
    finally:
        session.close()


def test_a_lone_surrogate_in_an_http_json_body_is_cleaned_where_it_is_parsed(app, client, fake_llm):
    """Every route reads its body through body_params: a lone surrogate in a stored field (the flow's global
    prompt) is U+FFFD there, not a 400 'surrogates not allowed' from the store (found by review: the Flask JSON
    provider first tried here is used by no route)."""
    body = make_call_body()
    body["globalPrompt"] = "Be kind SURROGATE"
    raw = json.dumps(body).replace("SURROGATE", "\\ud800")
    data = client.post("/api/make-call-optimized", data=raw, content_type="application/json").get_json()
    assert data["success"], data
    record = app.extensions["callweaver"].store.get_call(data["optimization"]["trackingId"])
    assert "Be kind \ufffd" in json.dumps(record.workflow, ensure_ascii=False)


def test_a_goodbye_heard_to_its_last_word_ends_the_call_whatever_its_punctuation(call, fake_llm):
    """Twilio's report of the whole line without its final "!" is all of it heard: the end is not dropped."""
    call.say("goodbye")
    closing_line = call.assistant_lines()[-1]
    call.send({"type": "interrupt", "utteranceUntilInterrupt": closing_line.rstrip("!.").lower(),
               "durationUntilInterruptMs": 3000})
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    assert call.assistant_lines()[-1] == closing_line


def test_a_barge_in_after_the_end_was_sent_leaves_the_ended_call_alone(call, fake_llm):
    """agentSpeaking off, then `end` went out: the call has ended (or been transferred). A late interrupt must not
    roll it back to its earlier step, drop its pending action or cut the goodbye from the history."""
    call.say("goodbye")
    agent_fell_silent(call)
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    before = call.svc.store.get_call(call.tracking_id)
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    after = call.svc.store.get_call(call.tracking_id)
    assert after.current_node == before.current_node
    assert (after.meta or {}).get("pendingAction") == (before.meta or {}).get("pendingAction") is not None
    assert after.messages == before.messages


def test_a_reply_whose_first_write_fails_speaks_an_apology_and_stores_no_words(app, client, fake_llm):
    """The first `text` frame never reached Twilio: the caller heard nothing, so they hear an apology (not an
    empty close of the talk cycle, i.e. silence) and the words that were never written are not stored as heard."""
    fail = FailOnce(carries_words)
    call = Call(app, client, on_write=fail)
    try:
        fake_llm.push(Reply(text="It has three bedrooms and a large garden."))
        call.say("Tell me about the house")
        assert fail.failed
        apology = call.svc.engine.languages.get("en-US").line("apology")
        assert {"type": "text", "token": apology, "last": True} in call.sent, call.sent
        assert not any(line.startswith("It") for line in call.assistant_lines()), call.assistant_lines()
        assert call.turns()[-1]["source"] == "apology"
    finally:
        call.session.close()


def test_a_goodbye_whose_only_failed_write_closes_its_talk_cycle_still_ends_the_call(app, client, fake_llm):
    """Every word of the goodbye was written (Twilio speaks them); only the empty frame closing the talk cycle
    failed: the caller heard the goodbye, so the end it announced follows."""
    fail = FailOnce(lambda messages: list(messages) == [{"type": "text", "token": "", "last": True}])
    call = Call(app, client, on_write=fail)
    try:
        call.say("goodbye")
        assert fail.failed, call.sent
        agent_fell_silent(call)
        call.wait(lambda: any(m["type"] == "end" for m in call.sent))
        assert json.loads(call.sent[-1]["handoffData"])["reason"] == "end"
    finally:
        call.session.close()


class KilledWhileWriting:
    """A reply's task as a greenlet is under gevent: `kill` raises GreenletExit (not an Exception) where the
    greenlet is blocked, here in the write of the goodbye's last frame."""

    def __init__(self) -> None:
        self.writing = threading.Event()
        self.killed = threading.Event()

    def on_write(self, call: "Call", messages: tuple) -> None:
        if not self.writing.is_set() and any(m.get("type") == "text" and m.get("last") for m in messages):
            self.writing.set()
            self.killed.wait(10)
            from gevent import GreenletExit
            raise GreenletExit()

    def spawn(self, fn, *args):
        task, killed = spawn(fn, *args), self.killed

        class Killable:
            @property
            def dead(self) -> bool:
                return task.dead

            def join(self, timeout=None) -> None:
                task.join(timeout)

            def kill(self, timeout=None) -> None:
                killed.set()
                task.join(timeout)

        return Killable()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # GreenletExit ends the thread
def test_a_goodbye_whose_reply_task_is_killed_at_a_barge_in_leaves_the_call_answering(app, client, fake_llm):
    """The goodbye's last write blocks past the barge-in's join, so the reply's greenlet is killed: the end is
    dropped as for any goodbye cut short, and the session must not stay "closing" (every later prompt ignored)."""
    blocked = KilledWhileWriting()
    call = Call(app, client, on_write=blocked.on_write, spawn=blocked.spawn)
    try:
        call.send({"type": "prompt", "voicePrompt": "goodbye", "lang": "en-US", "last": True})
        assert blocked.writing.wait(10)
        count = len(call.turns())
        call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
        call.wait(lambda: len(call.turns()) > count)
        assert_the_call_goes_on(call, fake_llm)
    finally:
        call.session.close()


@pytest.mark.parametrize("failing", ["update_call", "update_meta"])
def test_a_store_failure_while_dropping_a_goodbyes_end_never_says_goodbye_again(call, fake_llm, monkeypatch, failing):
    """The caller talked over the goodbye, so its end is dropped and the call goes back to its step; one of the two
    store writes doing that fails: the call still goes on from that step (in memory), and the other write is made."""
    from callweaver.store import StoreError

    node = call.svc.store.get_call(call.tracking_id).current_node
    call.say("goodbye")
    store = call.svc.store
    write = getattr(store, failing)

    def fails_on_the_drop(tracking_id, *args, **kwargs):
        if "current_node" in kwargs or "remove" in kwargs:
            raise StoreError("database is locked")
        return write(tracking_id, *args, **kwargs)

    monkeypatch.setattr(store, failing, fails_on_the_drop)
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    monkeypatch.setattr(store, failing, write)
    record = store.get_call(call.tracking_id)
    if failing == "update_call":
        assert "pendingAction" not in (record.meta or {})
    else:
        assert record.current_node == node
    assert_the_call_goes_on(call, fake_llm)


def test_a_store_failure_trimming_the_history_at_a_goodbye_barge_in_still_never_hangs_up(call, fake_llm, monkeypatch):
    """The history trim (the first store write of a barge-in on a goodbye) fails: the end is dropped all the same,
    decided from the line itself, and the caller's next words are answered (found by review: the failed write left
    the handler before the drop, and the goodbye's waiter then sent `end`)."""
    from callweaver.store import StoreError

    call.say("goodbye")
    store = call.svc.store
    write = store.update_call

    def fails_on_the_trim(tracking_id, *args, **kwargs):
        if "messages" in kwargs:
            raise StoreError("database is locked")
        return write(tracking_id, *args, **kwargs)

    monkeypatch.setattr(store, "update_call", fails_on_the_trim)
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    monkeypatch.setattr(store, "update_call", write)
    time.sleep(0.3)
    assert not any(m["type"] == "end" for m in call.sent)
    assert_the_call_goes_on(call, fake_llm)


def test_a_goodbye_whose_own_commit_failed_never_amends_the_turn_before_it(call, fake_llm, monkeypatch):
    """The goodbye's turn row was never written (its commit failed); the caller then talks over it: the end is
    dropped, and the row of the turn before, the last one stored, is left as it was (found by review)."""
    from callweaver.store import StoreError

    call.say("hello")
    before = call.turns()[-1]
    store = call.svc.store
    commit = store.commit_turn
    monkeypatch.setattr(store, "commit_turn", lambda *a, **k: (_ for _ in ()).throw(StoreError("database is locked")))
    call.send({"type": "prompt", "voicePrompt": "goodbye", "lang": "en-US", "last": True})
    # sent, its commit failed (the session's task handle is set after the spawn returns: in the tests' thread mode
    # the reply can end first and leave it pointing at the finished task)
    call.wait(lambda: call.session._closing and (call.session._reply is None or call.session._reply.dead))
    monkeypatch.setattr(store, "commit_turn", commit)
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    time.sleep(0.3)
    assert call.turns()[-1] == before
    assert_the_call_goes_on(call, fake_llm)


ZH_LINE = "您好，我们的营业时间是周一到周五上午九点到下午六点。祝您生活愉快，再见！"


@pytest.mark.parametrize("code", ["zh-CN", "zh-HK", "ja-JP"])
def test_chinese_cantonese_and_japanese_are_estimated_at_their_own_speaking_rate(code):
    """About 5 characters a second, not the 15 of English: a second of a Chinese goodbye is its first few
    characters (was the whole line: no whitespace to round up to), cut after a character, not inside a word."""
    from callweaver.engine.conversation import heard_of
    from callweaver.engine.languages import LanguageTable

    rate = LanguageTable.load().get(code).speech_chars_per_s
    assert 3 <= rate <= 7
    assert heard_of(ZH_LINE, None, 1000, chars_per_s=rate) == ZH_LINE[:int(rate)]
    assert LanguageTable.load().get("en-US").speech_chars_per_s == 15


@pytest.mark.parametrize("spoken, played_ms, rate, heard", [
    ("Sure <break time=\"1s\"/> the price is high.", 400, 15.0, "Sure <break time=\"1s\"/> the"),  # "Sure <break"
    ("我们在<break time=\"1s\"/>周一见面吧。", 1000, 5.0, "我们在<break time=\"1s\"/>周一"),  # tags are not speech
    ("好的，Sure thing.", 800, 5.0, "好的，Sure"),   # a CJK/Latin change is no word end inside "Sure"
])
def test_the_duration_estimate_never_cuts_inside_an_ssml_tag_or_counts_it(spoken, played_ms, rate, heard):
    from callweaver.engine.conversation import heard_of

    assert heard_of(spoken, None, played_ms, chars_per_s=rate) == heard


def test_a_chinese_closing_line_waits_long_enough_to_be_spoken():
    """With no agentSpeaking event, `end` waits a slow speaking time for the line: at Chinese rates, not English."""
    from callweaver.engine.relay_session import playback_wait_bound_s

    assert playback_wait_bound_s(ZH_LINE, chars_per_s=5.0) >= len(ZH_LINE) / 5.0
    assert playback_wait_bound_s("<speak>" * 20 + "Bye.", chars_per_s=15.0) < 3  # tags are not spoken


def test_a_goodbye_and_an_error_ending_waiting_together_send_one_end(waited_call, fake_llm):
    """The goodbye's end waits for playback when repeated Twilio errors end the call too: both waiters wake on the
    same agentSpeaking off, and only the first sends `end` (Twilio gets no second end)."""
    call = waited_call
    call.say("goodbye")
    for _ in range(3):
        call.send({"type": "error", "description": "Invalid message received"})
    agent_fell_silent(call)
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    call.waiters.join()  # both waiters are done: a second end would have been written
    assert [m["type"] for m in call.sent].count("end") == 1, call.sent


def test_a_goodbye_cut_short_after_it_was_sent_marks_its_turn_interrupted_without_an_action(call, fake_llm):
    """Its turn row was written as a call that ended (action end, nextNodeId the end node): once the end is dropped,
    the row says what happened, as the transcript does (the dashboard and call report count ended calls from it)."""
    node = call.svc.store.get_call(call.tracking_id).current_node
    call.say("goodbye")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    row = call.turns()[-1]
    assert (row["interrupted"], row["action"], row["nextNodeId"]) == (True, None, node)


def test_an_adopted_tool_only_speculation_does_not_count_its_wait_for_adoption_as_time_saved(app, client, fake_llm,
                                                                                              monkeypatch):
    """The follow-up request waits for the final transcript to adopt the speculation: that wait is not time to
    first token the speculation saved (savedMs would count the caller's own speaking time)."""
    call = Call(app, client, workflow="loan_prequalification_logical")
    try:
        now = [1000.0]
        engine = call.svc.engine
        monkeypatch.setattr(engine, "clock", lambda: now[0])  # moves only when the test moves it
        fake_llm.push(TOOL_ONLY, Reply(text="Thanks Dana."))
        speculation = engine.speculate(call.svc.store.get_call(call.tracking_id), "My name is Dana Wu", lang="en-US")
        spawn(speculation.pump)
        call.wait(lambda: speculation.turn.result.tool_calls)
        now[0] += 10.0  # the caller goes on speaking for 10 s before the final transcript adopts it
        assert "".join(speculation.replay()) == "Thanks Dana."
        assert speculation.first_token_ms() < 10_000
    finally:
        call.session.close()


def test_a_stopping_worker_hands_an_idle_call_over_at_once_and_answers_nothing_more(call, fake_llm):
    """RelaySession.hand_over (a deploy's SIGTERM): with Twilio silent, `end` {"reason": "handover"} goes at once;
    what the caller says meanwhile is left to the resumed session."""
    fake_llm.push(Reply(text="It has three bedrooms."))
    call.say("How many bedrooms")
    agent_fell_silent(call)
    requests = len(fake_llm.requests)
    call.session.hand_over()
    call.send({"type": "prompt", "voicePrompt": "And the garden?", "lang": "en-US", "last": True})
    call.wait(lambda: call.sent and call.sent[-1]["type"] == "end")
    assert json.loads(call.sent[-1]["handoffData"])["reason"] == "handover"
    assert len(fake_llm.requests) == requests and len(call.turns()) == 1


def test_a_stopping_worker_waits_for_the_reply_twilio_is_still_speaking(call, fake_llm):
    fake_llm.push(Reply(text="It has three bedrooms."))
    call.say("How many bedrooms")  # Twilio speaks it now (agentSpeaking off not yet reported)
    call.session.hand_over()
    time.sleep(0.3)
    assert not any(m["type"] == "end" for m in call.sent), "the reply is still playing"
    agent_fell_silent(call)
    call.wait(lambda: call.sent and call.sent[-1]["type"] == "end")


def test_a_stopping_worker_hands_over_at_once_after_a_barge_in(call, fake_llm):
    """Twilio stops speaking at a barge-in (and reports no agentSpeaking off for it): nothing is left to play."""
    fake_llm.push(Reply(text="It has three bedrooms and a very large garden with old apple trees."))
    call.say("How many bedrooms")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "It has", "durationUntilInterruptMs": 300})
    from structlog.testing import capture_logs
    with capture_logs() as logs:
        call.session.hand_over()
        call.wait(lambda: call.sent and call.sent[-1]["type"] == "end")
    assert "relay_playback_wait_timed_out" not in [e["event"] for e in logs]


def test_a_stopping_worker_lets_the_welcome_greeting_play_before_handing_over(call, fake_llm):
    """SIGTERM while Twilio speaks the call's welcome greeting (no reply sent yet on this socket): the handover
    waits for that greeting, as for a reply, rather than cut it after the shortest wait."""
    greeting = call.svc.store.get_call(call.tracking_id).greeting
    assert len(greeting) > 40  # longer than PLAYBACK_WAIT_MIN_S of speech
    call.send({"type": "info", "name": "agentSpeaking", "value": "on"})
    call.session.hand_over()
    time.sleep(PLAYBACK_WAIT_MIN_S + 0.5)
    assert not any(m["type"] == "end" for m in call.sent), "the greeting is still playing"
    call.send({"type": "info", "name": "agentSpeaking", "value": "off"})
    call.wait(lambda: call.sent and call.sent[-1]["type"] == "end")
    assert json.loads(call.sent[-1]["handoffData"])["reason"] == "handover"


def test_a_call_whose_setup_had_not_arrived_at_sigterm_hears_its_greeting_before_the_handover(app, client, fake_llm):
    call = Call(app, client, before_setup=lambda made: made.session.hand_over())
    try:
        call.send({"type": "info", "name": "agentSpeaking", "value": "on"})
        time.sleep(PLAYBACK_WAIT_MIN_S + 0.5)
        assert not any(m["type"] == "end" for m in call.sent), "the greeting is still playing"
        call.send({"type": "info", "name": "agentSpeaking", "value": "off"})
        call.wait(lambda: call.sent and call.sent[-1]["type"] == "end")
        assert json.loads(call.sent[-1]["handoffData"])["reason"] == "handover"
    finally:
        call.session.close()


# ---- the end of a call: a closing line's end, its waiters, and what the turn reports ------------------------------

def agent_fell_silent(call: "Call") -> None:
    """Twilio spoke what it was sent and fell silent: as real Twilio reports it, "on" for the words, then "off" (an
    "off" alone, right after our words, may be about earlier ones and is held: docs/twilio.md 4)."""
    call.send({"type": "info", "name": "agentSpeaking", "value": "on"})
    call.send({"type": "info", "name": "agentSpeaking", "value": "off"})


def test_a_goodbye_talked_over_just_after_agent_speaking_off_neither_hangs_up_nor_ignores_them(call, fake_llm,
                                                                                                monkeypatch):
    """Twilio may report agentSpeaking off when the barge-in stops playback and send the `interrupt` just after: the
    goodbye's end waits a grace for it, and that interrupt drops the end as one before agentSpeaking off does (the
    call stays on its step and answers the caller). The grace is widened here so the test never depends on timing."""
    from callweaver.engine import relay_session

    monkeypatch.setattr(relay_session, "CLOSING_INTERRUPT_GRACE_S", 30.0, raising=False)
    node = call.svc.store.get_call(call.tracking_id).current_node
    call.say("goodbye")
    agent_fell_silent(call)
    time.sleep(0.05)  # the interrupt follows a few tens of milliseconds later
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    record = call.svc.store.get_call(call.tracking_id)
    assert record.current_node == node and "pendingAction" not in (record.meta or {})
    assert call.turns()[-1]["action"] is None
    assert_the_call_goes_on(call, fake_llm)


def test_a_goodbye_heard_whole_ends_the_call_when_its_interrupt_follows_agent_speaking_off(call, fake_llm, monkeypatch):
    """The interrupt in the grace reports the whole line heard: the end is not dropped, and goes out at once."""
    from callweaver.engine import relay_session

    monkeypatch.setattr(relay_session, "CLOSING_INTERRUPT_GRACE_S", 30.0, raising=False)
    call.say("goodbye")
    closing_line = call.assistant_lines()[-1]
    agent_fell_silent(call)
    call.send({"type": "interrupt", "utteranceUntilInterrupt": closing_line, "durationUntilInterruptMs": 3000})
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    assert json.loads(call.sent[-1]["handoffData"])["reason"] == "end"


def test_a_goodbye_heard_to_its_end_is_ended_after_agent_speaking_off_with_no_interrupt(call, fake_llm):
    """No interrupt follows agentSpeaking off: the end goes out once the grace has passed (never held for good)."""
    from callweaver.engine.relay_session import CLOSING_INTERRUPT_GRACE_S

    assert 0.15 <= CLOSING_INTERRUPT_GRACE_S <= 0.25
    call.say("goodbye")
    agent_fell_silent(call)
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    assert [m["type"] for m in call.sent].count("end") == 1
    assert json.loads(call.sent[-1]["handoffData"])["reason"] == "end"


def japanese_turn_whose_commit_fails(call: "Call", fake_llm, monkeypatch) -> None:
    """The caller of an English call speaks Japanese: the turn switches the voice, and its store write fails."""
    from callweaver.store import StoreError

    store = call.svc.store
    commit, failed = store.commit_turn, threading.Event()

    def fails(*args, **kwargs):
        failed.set()
        raise StoreError("database is locked")

    monkeypatch.setattr(store, "commit_turn", fails)
    fake_llm.push(Reply(text="はい、承知しました。"))
    call.send({"type": "prompt", "voicePrompt": "物件について教えてください", "lang": "ja-JP", "last": True})
    reply = call.session._reply
    call.wait(lambda: failed.is_set() and (reply is None or reply.dead))  # its task handled the failed write
    monkeypatch.setattr(store, "commit_turn", commit)
    assert [m["ttsLanguage"] for m in call.sent if m["type"] == "language"] == ["ja-JP"]


def test_after_a_turn_whose_commit_failed_the_apology_is_in_the_language_it_switched_to(call, fake_llm, monkeypatch):
    """Twilio speaks Japanese since that turn, whatever the store kept: the apology ending the call is Japanese."""
    japanese_turn_whose_commit_fails(call, fake_llm, monkeypatch)
    for _ in range(3):
        call.send({"type": "error", "description": "Invalid message received"})
    apology = call.svc.engine.languages.get("ja-JP").line("apology")
    assert {"type": "text", "token": apology, "last": True} in call.sent, call.sent


def test_after_a_turn_whose_commit_failed_speaking_english_again_switches_the_voice_back(call, fake_llm, monkeypatch):
    """The session must know Twilio speaks Japanese: the caller's next English words switch the voice back (without
    it, the English reply was read by the Japanese voice)."""
    japanese_turn_whose_commit_fails(call, fake_llm, monkeypatch)
    fake_llm.push(Reply(text="Sure, what would you like to know?"))
    call.say("Sorry, can we speak English?")
    assert [m["ttsLanguage"] for m in call.sent if m["type"] == "language"] == ["ja-JP", "en-US"]
    assert call.svc.store.get_call(call.tracking_id).language == "en-US"


class FirstWaiterHeld:
    """A spawn whose first end waiter (the goodbye's) starts only once `release` is set: the error ending's waiter,
    spawned later, wakes first, as scheduling may have it."""

    def __init__(self) -> None:
        self.release, self.done = threading.Event(), threading.Event()
        self.held = False

    def spawn(self, fn, *args):
        if getattr(fn, "__name__", "") != "_end_after_playback" or self.held:
            return spawn(fn, *args)
        self.held = True

        def held() -> None:
            self.release.wait(10)
            try:
                fn(*args)
            finally:
                self.done.set()

        return spawn(held)


def test_a_goodbye_and_an_error_ending_send_the_end_decided_first_whichever_waiter_wakes_first(app, client,
                                                                                                 fake_llm):
    """The goodbye's end was decided before repeated Twilio errors ended the call too: its reason (end, or transfer
    with its destination) is the one Twilio gets (and posts back to the action URL), not whichever waiter ran first."""
    held = FirstWaiterHeld()
    call = Call(app, client, spawn=held.spawn)
    try:
        call.say("goodbye")
        call.wait(lambda: held.held)  # the goodbye's waiter is spawned (after its commit) and held
        for _ in range(3):
            call.send({"type": "error", "description": "Invalid message received"})
        agent_fell_silent(call)
        call.wait(lambda: any(m["type"] == "end" for m in call.sent))  # sent by the error ending's waiter
        held.release.set()
        assert held.done.wait(10)
        ends = [m for m in call.sent if m["type"] == "end"]
        assert [json.loads(m["handoffData"])["reason"] for m in ends] == ["end"], call.sent
    finally:
        call.session.close()


def test_a_goodbye_playing_at_sigterm_still_ends_the_call(waited_call, fake_llm):
    call = waited_call
    call.say("goodbye")
    call.session.hand_over()
    agent_fell_silent(call)
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    call.waiters.join()
    assert [json.loads(m["handoffData"])["reason"] for m in call.sent if m["type"] == "end"] == ["end"]


def test_a_goodbye_cut_short_during_a_handover_hands_the_call_over(waited_call, fake_llm):
    call = waited_call
    call.say("goodbye")
    call.session.hand_over()
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    call.waiters.join()
    assert [json.loads(m["handoffData"])["reason"] for m in call.sent if m["type"] == "end"] == ["handover"]


def test_a_goodbye_talked_over_while_an_error_ending_waits_ends_the_call_for_the_error(waited_call, fake_llm):
    """Repeated Twilio errors end the call while its goodbye plays, and the caller talks over the goodbye: its end
    is dropped (the call goes back to its step in the store), and the error ending, never dropped, goes out."""
    call = waited_call
    node = call.svc.store.get_call(call.tracking_id).current_node
    call.say("goodbye")
    for _ in range(3):
        call.send({"type": "error", "description": "Invalid message received"})
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    call.waiters.join()  # both waiters are done: a second end would have been written
    ends = [m for m in call.sent if m["type"] == "end"]
    assert [json.loads(m["handoffData"])["reason"] for m in ends] == ["error"], call.sent
    assert call.svc.store.get_call(call.tracking_id).current_node == node


def test_an_adopted_tool_only_speculation_counts_its_routing_before_the_hold_as_time_to_first_token(
        app, client, fake_llm, monkeypatch):
    """Only the follow-up's wait for adoption is left out of the speculation's time to first token: the routing done
    after the first answer (which a turn that did not speculate pays too) is in it, so savedMs is not overstated...
    nor the speculation's own time understated."""
    from callweaver.engine import conversation

    call = Call(app, client, workflow="loan_prequalification_logical")
    try:
        now = [1000.0]
        engine = call.svc.engine
        monkeypatch.setattr(engine, "clock", lambda: now[0])  # moves only when the test moves it
        routing = conversation.apply_turn

        def routing_takes_half_a_second(*args, **kwargs):
            now[0] += 0.5
            return routing(*args, **kwargs)

        monkeypatch.setattr(conversation, "apply_turn", routing_takes_half_a_second)
        fake_llm.push(TOOL_ONLY, Reply(text="Thanks Dana."))
        speculation = engine.speculate(call.svc.store.get_call(call.tracking_id), "My name is Dana Wu", lang="en-US")
        spawn(speculation.pump)
        call.wait(lambda: speculation.turn.result.tool_calls)
        now[0] += 10.0  # held 10 s for adoption
        assert "".join(speculation.replay()) == "Thanks Dana."
        assert speculation.turn.followup_held_s == pytest.approx(10.0)
        assert speculation.first_token_ms() == pytest.approx(500.0)
    finally:
        call.session.close()


# ---- review of the end of a call: a socket closed while an end waits, a keypad entry while the call ends ---------

class EndWaiters:
    """A spawn that keeps the end waiters it starts (`_end_after_playback`, `_hand_over_when_played`), so a test can
    wait for them to finish rather than for a time."""

    def __init__(self) -> None:
        self.tasks: list = []

    def spawn(self, fn, *args):
        task = spawn(fn, *args)
        if getattr(fn, "__name__", "") in ("_end_after_playback", "_hand_over_when_played"):
            self.tasks.append(task)
        return task

    def join(self) -> None:
        for task in self.tasks:
            task.join(timeout=10)
            assert task.dead


def test_a_caller_hanging_up_in_a_goodbyes_grace_gets_no_end_on_the_closed_socket(app, client, fake_llm,
                                                                                   monkeypatch, info_logs):
    """The socket closes while the goodbye's end waits its grace for an interrupt: the waiter is released at once and
    writes nothing after the close (nor logs that it ended the call: the caller hung up first)."""
    from structlog.testing import capture_logs

    from callweaver.engine import relay_session

    monkeypatch.setattr(relay_session, "CLOSING_INTERRUPT_GRACE_S", 30.0, raising=False)
    waiters = EndWaiters()
    call = Call(app, client, spawn=waiters.spawn)
    call.say("goodbye")
    call.wait(lambda: waiters.tasks)  # the goodbye's waiter is spawned (after its commit)
    agent_fell_silent(call)  # the waiter now waits (up to 30 s here) for an interrupt
    with capture_logs() as logs:
        sent = len(call.sent)
        call.session.close()
        waiters.join()
    assert call.sent[sent:] == [], call.sent[sent:]
    assert "relay_ending" not in [e["event"] for e in logs]


def test_a_worker_stopping_after_the_socket_closed_sends_nothing(app, client, fake_llm):
    """hand_over reaches a session whose socket just closed (the live-session list is read while sockets close):
    nothing is written on the closed socket, and nothing waits for a playback nobody reports."""
    waiters = EndWaiters()
    call = Call(app, client, spawn=waiters.spawn)
    fake_llm.push(Reply(text="It has three bedrooms."))
    call.say("How many bedrooms")  # Twilio speaks it (no agentSpeaking off yet)
    call.session.close()
    sent = len(call.sent)
    call.session.hand_over()
    waiters.join()
    assert call.sent[sent:] == [], call.sent[sent:]


def test_a_keypad_entry_typed_before_a_handover_starts_no_reply_in_it(call, fake_llm):
    """The caller was typing when the worker began handing over: the entry's pause must not start a reply that the
    handover's `end` would cut mid-sentence (the resumed session asks the caller to go on)."""
    fake_llm.push(Reply(text="It has three bedrooms."))
    call.say("How many bedrooms")  # Twilio still speaks it
    call.session.inter_digit_s = 0.05
    call.send({"type": "dtmf", "digit": "4"})
    call.send({"type": "dtmf", "digit": "2"})
    requests, sent = len(fake_llm.requests), len(call.sent)
    call.session.hand_over()
    time.sleep(0.3)  # the entry's pause has passed
    agent_fell_silent(call)
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    assert [m["type"] for m in call.sent[sent:]] == ["end"], call.sent[sent:]
    assert json.loads(call.sent[-1]["handoffData"])["reason"] == "handover"
    assert len(fake_llm.requests) == requests and len(call.turns()) == 1


def test_a_keypad_entry_typed_before_an_error_ending_starts_no_reply_in_it(call, fake_llm):
    """Repeated Twilio errors end the call while the caller types: the entry starts no reply after the apology."""
    call.session.inter_digit_s = 0.05
    call.send({"type": "dtmf", "digit": "7"})
    requests = len(fake_llm.requests)
    for _ in range(3):
        call.send({"type": "error", "description": "Invalid message received"})
    time.sleep(0.3)  # the entry's pause has passed
    agent_fell_silent(call)
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    assert len(fake_llm.requests) == requests, call.sent
    assert json.loads(call.sent[-1]["handoffData"])["reason"] == "error"


def test_a_goodbye_talked_over_in_its_grace_is_dropped_even_when_trimming_the_history_outlasts_the_grace(
        app, client, fake_llm, monkeypatch):
    """The interrupt came within the grace: that decides the end is dropped, even when the store write trimming the
    goodbye to what was heard (a busy SQLite, a slow Redis) takes longer than the grace left. Deciding it only after
    that write let the waiter's grace run out first and hang up on a caller who was talking."""
    waiters = EndWaiters()
    call = Call(app, client, spawn=waiters.spawn)
    try:
        store = call.svc.store
        update_call = store.update_call

        def slow_update_call(*args, **kwargs):
            time.sleep(1.0)  # five times the grace
            return update_call(*args, **kwargs)

        call.say("goodbye")
        call.wait(lambda: waiters.tasks)  # the goodbye's waiter is spawned (after its commit)
        monkeypatch.setattr(store, "update_call", slow_update_call)
        agent_fell_silent(call)
        call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
        waiters.join()
        assert not [m for m in call.sent if m["type"] == "end"], call.sent
    finally:
        call.session.close()


def test_a_worker_stopping_in_a_goodbyes_grace_hands_over_once_when_the_goodbye_is_talked_over(waited_call, fake_llm,
                                                                                               monkeypatch):
    """A handover decided during the goodbye's grace waits for the goodbye; the caller talks over it: the goodbye's
    end is dropped and the one `end` is the handover's (the call stays, on another worker)."""
    from callweaver.engine import relay_session

    monkeypatch.setattr(relay_session, "CLOSING_INTERRUPT_GRACE_S", 30.0, raising=False)
    call = waited_call
    call.say("goodbye")
    agent_fell_silent(call)
    call.session.hand_over()
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    call.waiters.join()  # every waiter is done: a second end would have been written
    ends = [json.loads(m["handoffData"])["reason"] for m in call.sent if m["type"] == "end"]
    assert ends == ["handover"], call.sent


def test_a_worker_stopping_while_a_goodbye_plays_lets_the_goodbye_end_the_call(waited_call, fake_llm):
    call = waited_call
    call.say("goodbye")
    call.session.hand_over()
    agent_fell_silent(call)
    call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    call.waiters.join()
    ends = [json.loads(m["handoffData"])["reason"] for m in call.sent if m["type"] == "end"]
    assert ends == ["end"], call.sent


def test_an_interrupt_on_an_earlier_reply_never_cuts_a_later_goodbyes_grace_short(call, fake_llm, monkeypatch):
    """An interrupt about an ordinary reply (after a goodbye talked over made the grace's event) must not leave the
    event set for the next goodbye: its interrupt just after agentSpeaking off still drops its end."""
    from callweaver.engine import relay_session

    monkeypatch.setattr(relay_session, "CLOSING_INTERRUPT_GRACE_S", 30.0, raising=False)
    call.say("goodbye")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    fake_llm.push(Reply(text="Of course, it has three bedrooms and a garden."))
    call.say("How many bedrooms")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Of course", "durationUntilInterruptMs": 400})
    call.say("goodbye")
    agent_fell_silent(call)
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Thank you", "durationUntilInterruptMs": 500})
    time.sleep(0.3)
    assert not [m for m in call.sent if m["type"] == "end"], call.sent


# ---- review of the handover: a SIGTERM during setup, its log lines, its deadline, a node's recording ---------------

def test_a_handover_requested_while_the_setup_is_read_waits_for_the_welcome_greeting(app, client, fake_llm,
                                                                                     monkeypatch):
    """SIGTERM while `setup` reads the call from the store: the handover waits for the setup, then (one waiter) for
    the welcome greeting, rather than end the greeting after the shortest wait with nothing known to be playing."""
    waiters = EndWaiters()
    reading, release = threading.Event(), threading.Event()

    def hold_the_setup_read(made: Call) -> None:
        store = made.svc.store
        get_call = store.get_call

        def blocked_get_call(*args, **kwargs):
            reading.set()
            release.wait(10)
            return get_call(*args, **kwargs)

        monkeypatch.setattr(store, "get_call", blocked_get_call)

        def sigterm_mid_setup() -> None:
            reading.wait(10)
            made.session.hand_over()
            monkeypatch.setattr(store, "get_call", get_call)
            release.set()

        spawn(sigterm_mid_setup)

    call = Call(app, client, spawn=waiters.spawn, before_setup=hold_the_setup_read)
    try:
        assert call.session.record is not None
        call.send({"type": "info", "name": "agentSpeaking", "value": "on"})
        time.sleep(PLAYBACK_WAIT_MIN_S + 0.5)
        assert not any(m["type"] == "end" for m in call.sent), "the greeting is still playing"
        assert len(waiters.tasks) == 1
        agent_fell_silent(call)
        waiters.join()
        ends = [json.loads(m["handoffData"])["reason"] for m in call.sent if m["type"] == "end"]
        assert ends == ["handover"], call.sent
    finally:
        call.session.close()


@pytest.fixture
def info_logs(app):
    """Info lines logged (the tests' LOG_LEVEL is WARNING), for capture_logs, from after the app configured them."""
    import logging

    import structlog
    filtering = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    yield
    structlog.configure(wrapper_class=filtering)


def test_the_handovers_log_lines_name_the_call(call, fake_llm, info_logs):
    """hand_over runs in the SIGTERM's task, whose log context is empty: its lines still say which call they are."""
    import structlog
    from structlog.testing import capture_logs

    fake_llm.push(Reply(text="It has three bedrooms."))
    call.say("How many bedrooms")
    agent_fell_silent(call)
    call_sid = call.session.call_sid
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        def sigterm() -> None:  # a task of its own, whose log context is empty
            structlog.contextvars.clear_contextvars()
            call.session.hand_over()

        spawn(sigterm).join(timeout=10)
        call.wait(lambda: any(m["type"] == "end" for m in call.sent))
    lines = [e for e in logs if e["event"] in ("relay_handing_over", "relay_ending")]
    assert [e["event"] for e in lines] == ["relay_handing_over", "relay_ending"], (logs, call.sent)
    for line in lines:
        assert (line.get("tracking_id"), line.get("call_sid")) == (call.tracking_id, call_sid), line


class _FailingSession:
    """A live session whose hand_over fails (services.Services.hand_over_live_calls logs it and goes on)."""
    record = type("Record", (), {"tracking_id": "call_1"})()
    call_sid = "CA" + "0" * 32

    def hand_over(self, deadline: float | None = None) -> None:
        raise RuntimeError("boom")


def test_a_handover_that_fails_is_logged_with_its_call(app, monkeypatch):
    import dataclasses

    import structlog
    from structlog.testing import capture_logs

    structlog.contextvars.clear_contextvars()  # as in the SIGTERM's task
    svc = app.extensions["callweaver"]
    monkeypatch.setattr(svc, "settings", dataclasses.replace(svc.settings, redis_url="redis://127.0.0.1:1"))
    svc.live_sessions.add(_FailingSession())
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        svc.hand_over_live_calls()
    failed = [e for e in logs if e["event"] == "relay_hand_over_failed"]
    assert [(e.get("tracking_id"), e.get("call_sid")) for e in failed] == [("call_1", _FailingSession.call_sid)]


LONG_REPLY = ("It has three bedrooms, two bathrooms, a large kitchen with an island, a garden with old apple trees, "
              "a garage for two cars, a cellar, an attic that could be a fourth bedroom, and it is close to a school, "
              "a park, the station and the shops, all on a quiet street with very little traffic at any time.")


def test_a_handover_ends_the_call_by_its_deadline_while_a_reply_still_streams(call, fake_llm):
    """A deploy's graceful timeout bounds the handover: its `end` goes out by the deadline it was given, even while
    the reply in flight still streams (the wait for it alone could reach PLAYBACK_WAIT_MAX_S)."""
    fake_llm.push(Reply(text=LONG_REPLY, token_interval_s=0.5))
    call.send({"type": "prompt", "voicePrompt": "Tell me about the house", "lang": "en-US", "last": True})
    call.wait(lambda: any(m["type"] == "text" for m in call.sent))
    call.session.hand_over(deadline=time.monotonic() + 0.5)
    call.wait(lambda: any(m["type"] == "end" for m in call.sent), timeout_s=PLAYBACK_WAIT_MIN_S * 3)
    assert [json.loads(m["handoffData"])["reason"] for m in call.sent if m["type"] == "end"] == ["handover"]


def test_a_handover_ends_the_call_by_its_deadline_while_a_long_reply_plays(call, fake_llm):
    fake_llm.push(Reply(text=LONG_REPLY))
    call.say("Tell me about the house")  # Twilio speaks it (no agentSpeaking off: up to PLAYBACK_WAIT_MAX_S)
    call.session.hand_over(deadline=time.monotonic() + 0.5)
    call.wait(lambda: any(m["type"] == "end" for m in call.sent), timeout_s=PLAYBACK_WAIT_MIN_S * 3)
    assert [json.loads(m["handoffData"])["reason"] for m in call.sent if m["type"] == "end"] == ["handover"]


def test_a_handover_lets_a_nodes_recording_play_before_its_end(app, client, fake_llm):
    """The turn moved into a node with a recording (`play`, then a short line): the handover waits for Twilio to
    report it stopped speaking, as long as a recording may take, not only as long as the short line takes."""
    from tests.helpers import load_workflow

    export = load_workflow("real_estate_property_dealer")
    for node in export["nodes"]:
        if node["id"] == "buyer_requirements_node":
            node["data"]["audioUrl"] = "https://media.example.com/buyer-jingle.mp3"
    waiters = EndWaiters()
    call = Call(app, client, spawn=waiters.spawn, nodes=export["nodes"])
    try:
        agent_fell_silent(call)  # the welcome greeting played
        fake_llm.push(Reply(text="Sure.", tool_calls=[("transition", {"edge_id": "edge_2"})]))
        call.say("I want to buy a house")
        assert any(m["type"] == "play" for m in call.sent), call.sent
        call.session.hand_over()
        time.sleep(PLAYBACK_WAIT_MIN_S + 1.0)
        assert not any(m["type"] == "end" for m in call.sent), "the recording may still be playing"
        agent_fell_silent(call)
        waiters.join()
        assert [json.loads(m["handoffData"])["reason"] for m in call.sent if m["type"] == "end"] == ["handover"]
    finally:
        call.session.close()
