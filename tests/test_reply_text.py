"""A reply's `text` frames: its first token at once, then one per clause (issue 12u: the first clause too), and once
the caller has speech queued, the stream read in batches (RELAY_TEXT_HOLD_MS).

The policy itself (engine/reply_text.py) with explicit times, then a RelaySession sending a scripted reply on a
clock the test moves (a token with no gap was already buffered when read): what Twilio receives, in order, and
what is stored as heard when the caller barges in while words are held.
"""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

from callweaver.engine.languages import LanguageTable
from callweaver.engine.relay_session import RelaySession
from callweaver.engine.reply_text import FAST_SPEECH_CHARS_PER_S, MAX_PAUSE_FACTOR, PACE_LEAD_FACTOR, ReplyText
from callweaver.services import spawn

HOLD_S = 0.08


def frames_of(tokens_at: list[tuple[str, float]], hold_s: float = HOLD_S) -> list[str]:
    """The texts ReplyText sends for tokens arriving at the given times, then the reply's end."""
    out, frames = ReplyText(hold_s), []
    for token, now in tokens_at:
        ready = out.add(token, now)
        if ready is not None:
            frames.append(ready)
    if out.holding:
        frames.append(out.take(tokens_at[-1][1]))
    return frames


def test_the_first_token_goes_at_once_then_one_frame_per_clause_the_first_clause_included():
    tokens = ["Thanks", " for", " calling,", " I", " can", " help", " with", " that.", " Let", " me", " check."]
    frames = frames_of([(token, i * 0.01) for i, token in enumerate(tokens)])  # faster than the hold
    # " for" waits for its clause's end, which leaves the moment it is read: the first clause is complete no later.
    assert frames == ["Thanks", " for calling,", " I can help with that.", " Let me check."]
    assert "".join(frames) == "".join(tokens)


def test_a_sentence_end_is_never_held_and_the_time_bound_caps_a_long_clause():
    tokens = [("Sure.", 0.0), (" one", 0.02), (" two", 0.04), (" three", 0.06), (" four", 0.08), (" five", 0.10),
              (" six.", 0.12), (" Bye", 0.14)]
    # " one" waits from 0.02; " four" arrives at 0.08 (< 0.02 + hold): still held; " five" at 0.10 passes the bound.
    assert frames_of(tokens) == ["Sure.", " one two three four five", " six.", " Bye"]


def test_spaces_newlines_and_other_scripts_pass_unchanged_and_in_order():
    tokens = ["你好", "，", "我", "可以", "帮", "你", "。", "  Then\n", "  spaced  ", "out ", "", "?"]
    frames = frames_of([(t, 0.0) for t in tokens if t])
    assert "".join(frames) == "".join(tokens)
    assert frames[:2] == ["你好", "，"]  # the full-width comma ends the first clause
    assert frames[2] == "我可以帮你。"


def test_hold_zero_sends_every_token_in_its_own_frame_and_never_pauses():
    tokens = ["Hi,", " there.", " How", " are", " you?"]
    assert frames_of([(t, 0.0) for t in tokens], hold_s=0) == tokens
    out = ReplyText(0)
    assert [(out.add(t, 0.0), out.pause_s(0.0)) for t in tokens] == [(t, 0.0) for t in tokens]


FIRST_SENTENCE = "Thanks for calling, I can certainly help with that."  # ~2 s of speech even spoken fast


def test_after_the_first_sentence_the_stream_is_read_in_batches_while_the_caller_has_speech_queued():
    out = ReplyText(HOLD_S)
    assert out.add("Thanks for calling,", 0.0) == "Thanks for calling,"
    assert out.pause_s(0.0) == 0  # the first sentence is not out yet: nothing is playing
    assert out.add(" I can certainly help with that.", 0.02) == " I can certainly help with that."
    # ~2 s of speech queued: reading four hold periods later still leaves far more than three of them queued
    assert out.pause_s(0.02) == pytest.approx(MAX_PAUSE_FACTOR * HOLD_S)
    # What arrived during the pause is read at once and held, a clause end included; the read that waits sends it.
    assert out.add(" Let", 0.34, waited=False) is None
    assert out.add(" me, see.", 0.34, waited=False) is None
    assert out.pause_s(0.34) == 0  # words are held: read on
    assert out.add(" Right", 0.36, waited=True) == " Let me, see. Right"
    # The stream outlasted the first pause: later pauses last one hold period, so a reply's end that arrives just
    # after a pause (its last words, the stream's closing events) is not held back long.
    assert out.pause_s(0.36) == pytest.approx(HOLD_S)


def test_a_pause_always_leaves_three_hold_periods_of_speech_queued_and_lasts_one_to_four_of_them():
    """The first pause after the first sentence as long as the queued speech allows (at most four hold periods),
    later ones one hold period; every pause leaves at least three hold periods of speech queued."""
    queued_at = len(FIRST_SENTENCE) / FAST_SPEECH_CHARS_PER_S  # when the speech sent so far has played (fast)
    for step in range(300):
        now = step * 0.01
        out = ReplyText(HOLD_S)
        out.add(FIRST_SENTENCE, 0.0)
        first, later = out.pause_s(now), out.pause_s(now)
        queued = queued_at - now
        if queued < PACE_LEAD_FACTOR * HOLD_S:
            assert first == later == 0
            continue
        assert first == pytest.approx(min(MAX_PAUSE_FACTOR * HOLD_S, queued - (PACE_LEAD_FACTOR - 1) * HOLD_S))
        assert later == pytest.approx(HOLD_S)
        assert queued - first >= (PACE_LEAD_FACTOR - 1) * HOLD_S - 1e-9


def test_no_batched_reads_for_a_reply_already_in_memory_or_without_speech_queued():
    cached = ReplyText(HOLD_S)  # a cached reply or an adopted speculation's buffer: nothing waits for the network
    cached.add(FIRST_SENTENCE, 0.0, waited=False)
    assert cached.pause_s(0.0) == 0
    short = ReplyText(HOLD_S)  # "Sure." is 0.2 s of speech: less than four hold periods queued
    short.add("Sure.", 0.0)
    assert short.pause_s(0.0) == 0
    late = ReplyText(HOLD_S)  # the first sentence went out long ago and has played by now
    late.add(FIRST_SENTENCE, 0.0)
    assert late.pause_s(5.0) == 0


# ---- a RelaySession sending a scripted reply ------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _ScriptedTurn:
    """Yields (token, seconds since the previous one) on the session's clock; blocks at "WAIT" until cancelled."""

    def __init__(self, script: list[tuple[str, float]], clock: _Clock, entered_audio=None) -> None:
        self.script, self.clock = script, clock
        self.result = SimpleNamespace(language_switched=False, action=None, completed=True, entered_audio=None,
                                      keys=None, reply_text="", next_node=None, language="en-US")
        self._audio = entered_audio
        self.utterance = "hi"
        self.stopped = threading.Event()
        self.waiting = threading.Event()
        self._chunks = self._generate()  # held by the turn, as the engine's Turn holds its stream

    def __iter__(self):
        return self._chunks

    def _generate(self):
        try:
            for token, gap_s in self.script:
                if token == "WAIT":
                    self.waiting.set()
                    self.stopped.wait(10)
                    return
                if token == "AUDIO":
                    self.result.entered_audio = self._audio  # the turn moved into a node with a recording
                    continue
                self.clock.now += gap_s
                self.result.reply_text += token
                yield token
        finally:
            self.result.provider = "scripted"  # as the engine's stream accounts its provider on the way out

    def cancel(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        self.stopped.set()


class _Engine:
    languages = LanguageTable.load()  # a barge-in's heard text is estimated at the reply language's speaking rate

    def __init__(self, turn: _ScriptedTurn) -> None:
        self.turn = turn
        self.committed: list[dict] = []
        self.done = threading.Event()

    def start_turn(self, record, utterance, lang=None):
        if self.committed or self.turn.stopped.is_set():  # a later prompt: an empty reply
            return _ScriptedTurn([], self.turn.clock)
        return self.turn

    def commit_turn(self, record, turn, **kwargs):
        self.committed.append({**kwargs, "provider": getattr(turn.result, "provider", None)})
        self.done.set()
        return record


def session_for(script: list[tuple[str, float]], **turn_options) -> tuple[RelaySession, _Engine, list[dict]]:
    clock = _Clock()
    engine = _Engine(_ScriptedTurn(script, clock, **turn_options))
    sent: list[dict] = []
    session = RelaySession(engine, SimpleNamespace(send_json=lambda *messages: sent.extend(messages)), spawn=spawn, clock=clock,
                           text_hold_s=HOLD_S)
    session.record = SimpleNamespace(tracking_id="call_1", messages=[], meta={}, language="en-US")
    return session, engine, sent


def say(session: RelaySession, text: str = "hi") -> None:
    session.handle(json.dumps({"type": "prompt", "voicePrompt": text, "last": True}))


REPLY = [("Thanks", 0.3), (" for", 0.03), (" calling,", 0.03), (" I", 0.03), (" can", 0.03), (" certainly", 0.03),
         (" help", 0.03), (" with", 0.03), (" that.", 0.03), (" Let", 0), (" me,", 0), (" check", 0), (" now", 0.03),
         (" please", 0)]


def test_a_streamed_reply_reaches_twilio_token_by_token_then_clause_by_clause_and_is_stored_whole():
    session, engine, sent = session_for(REPLY)
    say(session)
    assert engine.done.wait(5)
    texts = [m for m in sent if m["type"] == "text"]
    # "Thanks" goes at once; " for" waits for " calling," (its clause's end, sent the moment it is read); " I" waits
    # from +0.39 s; " help" arrives 90 ms later (past the 80 ms bound); " that." ends a sentence, and ~2 s of
    # speech is queued: the next read comes after a pause and finds three tokens buffered (the comma does not split
    # them); " now" waited for the network, so the batch goes with it; " please" ends the reply.
    assert [m["token"] for m in texts] == ["Thanks", " for calling,", " I can certainly help", " with that.",
                                           " Let me, check now", " please", ""]
    assert texts[-1] == {"type": "text", "token": "", "last": True}
    assert all(m["last"] is False for m in texts[:-1])
    assert "".join(m["token"] for m in texts) == "".join(token for token, _ in REPLY)
    assert engine.committed[0]["heard_text"] is None and engine.committed[0]["interrupted"] is False
    assert engine.committed[0]["timings"]["firstTokenMs"] == pytest.approx(300.0)  # the first token, at once


@pytest.mark.parametrize("how", ["interrupt", "new_prompt", "hang_up"])
def test_words_held_when_the_caller_barges_in_are_never_sent_nor_stored_as_heard(how):
    session, engine, sent = session_for([("Sure,", 0.3), (" the", 0.01), (" office", 0.01), ("WAIT", 0)])
    say(session)
    assert engine.turn.waiting.wait(5)  # " the office" is held: its clause has not ended, the hold has not passed
    assert [m["token"] for m in sent] == ["Sure,"]
    if how == "interrupt":
        session.handle(json.dumps({"type": "interrupt", "utteranceUntilInterrupt": "Sure"}))
    elif how == "new_prompt":
        say(session, "wait, another question")
    else:
        session.close()
    assert engine.done.wait(5)
    # (interrupt: Twilio reports "Sure", every word sent; punctuation is not speech, so all of "Sure," was heard)
    assert engine.committed[0]["heard_text"] == "Sure,"
    assert engine.committed[0]["interrupted"] is True
    assert all("office" not in m.get("token", "") for m in sent)  # the held words never reach Twilio


def test_held_words_go_out_before_the_recording_of_the_node_the_turn_entered():
    audio = SimpleNamespace(url="https://example.com/welcome.mp3", interruptible=True)
    session, engine, sent = session_for([("Great,", 0.3), (" moving", 0.01), (" on", 0.01), ("AUDIO", 0),
                                         (" Here", 0.01), (" it", 0.01), (" is.", 0.01)], entered_audio=audio)
    say(session)
    assert engine.done.wait(5)
    kinds = [(m["type"], m.get("token", m.get("source"))) for m in sent]
    assert kinds == [("text", "Great,"), ("text", " moving on"), ("play", audio.url), ("text", " Here it is."),
                     ("text", "")]


def test_a_reply_that_never_ends_a_clause_sends_its_first_token_at_once_then_a_frame_per_hold_period():
    words = [(f" w{i}", 0.03) for i in range(12)]  # 30 ms apart: the fourth held token passes the 80 ms bound
    session, engine, sent = session_for(words)
    say(session)
    assert engine.done.wait(5)
    assert [m["token"] for m in sent if m["type"] == "text"] == [" w0", " w1 w2 w3 w4", " w5 w6 w7 w8",
                                                                 " w9 w10 w11", ""]


def test_the_bound_is_on_the_session_clock_not_wall_time():
    # Tokens 50 ms apart on the session's clock: every third one passes the 80 ms bound. "Okay. a a a" is too
    # little speech for batched reads.
    script = [("Okay.", 0.3)] + [(" a", 0.05) for _ in range(6)]
    session, engine, sent = session_for(script)
    started = time.monotonic()
    say(session)
    assert engine.done.wait(5)
    assert time.monotonic() - started < 5
    assert [m["token"] for m in sent if m["type"] == "text"] == ["Okay.", " a a a", " a a a", ""]


def test_a_barge_in_during_a_batched_read_pause_ends_the_reply_at_once():
    long_sentence = "Here is everything about the house" + ", and more" * 60 + "."  # ~25 s of speech queued
    session, engine, sent = session_for([("Sure,", 0.3), (" " + long_sentence, 0.01), (" Next", 0.01)])
    session.text_hold_s = 5.0  # a pause long enough that only the barge-in can end it
    say(session)
    deadline = time.monotonic() + 5
    while len(sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [m["token"] for m in sent] == ["Sure,", " " + long_sentence]  # then the reply pauses before reading on
    reply = session._reply
    session.handle(json.dumps({"type": "interrupt", "utteranceUntilInterrupt": "Sure, here is everything"}))
    assert reply.dead  # the pause ended with the barge-in (it was not waited out: 5 s, beyond the join's bound)
    assert engine.committed[0]["heard_text"] == "Sure, Here is everything"
    assert engine.committed[0]["interrupted"] is True
    assert engine.committed[0]["provider"] == "scripted"  # the stream was ended (and accounted) before the commit
    assert [m["token"] for m in sent] == ["Sure,", " " + long_sentence]  # " Next" was never read nor sent
