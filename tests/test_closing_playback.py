"""The `end` after a closing line: sent once Twilio reports (agentSpeaking off) that the line's last words were heard,
neither before them nor seconds after. Twilio's "off" and our words cross on the wire: an "off" that arrives just
after our last words may be about the words before them (docs/twilio.md, section 4).

A RelaySession sending a scripted closing turn on a clock the test moves; Twilio's speaker events are sent by the test.
"""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

from callweaver.engine.relay_session import (CLOSING_INTERRUPT_GRACE_S, CROSSING_HOLD_MAX_S, RelaySession,
                                             playback_wait_bound_s)
from callweaver.services import spawn
from tests.test_reply_text import HOLD_S, _Clock, _Engine, _ScriptedTurn, say, session_for

EN_RATE = _Engine.languages.get("en-US").speech_chars_per_s


class TwoPartGoodbye:
    """A closing turn (action end) that says `first`, then, once the test opens `gate`, `rest`: a model that speaks,
    then (a tool call later) moves to an end node, whose words follow as the reply's last frame."""

    def __init__(self, first: str, rest: str = "") -> None:
        self.first, self.rest = first, rest
        self.gate = threading.Event()
        self.stopped = threading.Event()
        self.utterance = "bye"
        self.result = SimpleNamespace(language_switched=False, action="end", completed=True, entered_audio=None,
                                      keys=None, reply_text=first + rest, next_node="end", destination=None,
                                      language="en-US", provider="scripted")

    def __iter__(self):
        yield self.first
        self.gate.wait(10)
        if self.rest:
            yield self.rest

    def cancel(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        self.stopped.set()


def goodbye_session(turn: TwoPartGoodbye) -> tuple[RelaySession, list[dict]]:
    sent: list[dict] = []
    session = RelaySession(_Engine(turn), SimpleNamespace(send_json=lambda *messages: sent.extend(messages)),
                           spawn=spawn, clock=_Clock(), text_hold_s=HOLD_S)
    session.record = SimpleNamespace(tracking_id="call_1", messages=[], meta={}, language="en-US")
    return session, sent


def agent(session: RelaySession, value: str) -> None:
    session.handle(json.dumps({"type": "info", "name": "agentSpeaking", "value": value}))


def wait_for(condition, timeout_s: float = 10.0) -> float:
    """Seconds until `condition` held (fails after `timeout_s`)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s
        time.sleep(0.005)
    return time.monotonic() - started


def ended(sent: list[dict]) -> bool:
    return any(m["type"] == "end" for m in sent)


def closed(sent: list[dict]) -> bool:
    return any(m["type"] == "text" and m.get("last") for m in sent)


def test_a_goodbye_heard_before_the_turn_chose_to_end_the_call_ends_it_at_once():
    """Fuzz seed=81 call=26: the model's words were sent and played (agentSpeaking off) before its tool call moved the
    call to an end node with no closing message. The reply's last frame only closed its talk cycle, so no new "off"
    was coming: the end waited its whole playback bound (7 s there) of silence before the hang-up."""
    line = "Sure thing, all done here."
    turn = TwoPartGoodbye(line)
    session, sent = goodbye_session(turn)
    say(session)
    wait_for(lambda: sent)
    session.clock.now += 0.3
    agent(session, "on")
    session.clock.now += len(line) / EN_RATE
    agent(session, "off")  # Twilio spoke every word it was sent
    turn.gate.set()        # ...and then the turn ended the call
    wait_for(lambda: closed(sent))
    assert playback_wait_bound_s(line, chars_per_s=EN_RATE) > 2
    assert wait_for(lambda: ended(sent)) < 1.0
    assert json.loads(sent[-1]["handoffData"])["reason"] == "end"


def test_an_agent_speaking_off_that_crossed_the_goodbyes_last_frame_does_not_end_the_call_before_it_is_heard():
    """The goodbye streamed in two frames, and Twilio reported the first one played (off) just as the second was on
    its way: that "off" arrives after our last words, but is about the words before them. The end waits for Twilio
    to speak the last frame ("on", then its own "off")."""
    turn = TwoPartGoodbye("Sure thing.", " Thanks for calling, goodbye.")
    session, sent = goodbye_session(turn)
    say(session)
    wait_for(lambda: sent)
    session.clock.now += 0.3
    agent(session, "on")  # the call's reaction time: 0.3 s
    turn.gate.set()
    wait_for(lambda: closed(sent))
    agent(session, "off")  # left Twilio before the last frame reached it
    agent(session, "on")   # Twilio speaks the last frame
    time.sleep(0.2 + 0.3 + 0.4)
    assert not ended(sent), "the goodbye's last frame is still playing"
    session.clock.now += 2.0
    agent(session, "off")
    assert wait_for(lambda: ended(sent)) < 1.0
    assert [m["type"] for m in sent].count("end") == 1


def test_an_off_that_may_have_crossed_the_last_frame_counts_once_the_calls_reaction_time_has_passed():
    """No "on" follows it: Twilio had taken the last frame into the speech it was still playing, and that "off" is
    about everything. It counts once Twilio would have reported "on" for new words (the call's measured reaction
    time plus REACTION_GRACE_S), not after the playback bound."""
    turn = TwoPartGoodbye("Sure thing.", " Thanks for calling, goodbye.")
    session, sent = goodbye_session(turn)
    say(session)
    wait_for(lambda: sent)
    session.clock.now += 0.3
    agent(session, "on")
    turn.gate.set()
    wait_for(lambda: closed(sent))
    agent(session, "off")
    waited = wait_for(lambda: ended(sent))
    assert 0.3 + 0.2 - 0.05 <= waited < 1.5


def test_before_any_reaction_time_is_measured_an_off_right_after_the_last_words_is_held_the_full_cap():
    """No "on" was ever reported on the call (no reaction time measured): an "off" that came right after the last
    frame may be about the words before it, and is held CROSSING_HOLD_MAX_S, never longer (then the grace)."""
    turn = TwoPartGoodbye("Sure thing.", " Thanks for calling, goodbye.")
    session, sent = goodbye_session(turn)
    say(session)
    wait_for(lambda: sent)
    turn.gate.set()
    wait_for(lambda: closed(sent))
    agent(session, "off")
    waited = wait_for(lambda: ended(sent))
    assert CROSSING_HOLD_MAX_S - 0.05 <= waited < CROSSING_HOLD_MAX_S + CLOSING_INTERRUPT_GRACE_S + 0.4


def test_a_handovers_deadline_cuts_the_hold_of_an_off_that_may_have_crossed_the_last_words():
    """The worker is stopping: its `end` (handover) goes out by the deadline, however long an "off" right after the
    last words would otherwise be held (2 s here: no reaction time measured)."""
    session, engine, sent = session_for([("Let me check that for you.", 0.0)])
    say(session)
    assert engine.done.wait(5)
    agent(session, "off")  # right after the last words: held
    session.hand_over(deadline=session.clock() + 0.5)
    waited = wait_for(lambda: ended(sent))
    assert 0.4 <= waited < 1.2
    assert json.loads(sent[-1]["handoffData"])["reason"] == "handover"


def test_an_interrupt_during_the_hold_releases_the_wait_at_once():
    """The caller talked just after the goodbye, all of which they heard (docs/twilio.md 4: a barge-in releases the
    wait at once): the end is not held for the "off" that came just before it."""
    line_first, line_rest = "Sure thing.", " Bye."
    turn = TwoPartGoodbye(line_first, line_rest)
    session, sent = goodbye_session(turn)
    say(session)
    wait_for(lambda: sent)
    turn.gate.set()
    wait_for(lambda: closed(sent))
    agent(session, "off")  # held up to 2 s: no reaction time measured
    time.sleep(0.1)
    session.handle(json.dumps({"type": "interrupt", "utteranceUntilInterrupt": line_first + line_rest,
                               "durationUntilInterruptMs": 5000}))
    waited = wait_for(lambda: ended(sent))
    assert waited < 0.6, "the interrupt should release the wait for playback at once"
    assert json.loads(sent[-1]["handoffData"])["reason"] == "end"


def test_an_on_that_never_came_does_not_stretch_the_reaction_time_measured_later():
    """Twilio's "on" for the first words was lost (its "off" came): the wait for an "on" ends there, so the "on" for
    words sent ten seconds later measures its own reaction time (0.3 s), not ten seconds since the lost one, and a
    later "off" right after the last words is held that long, not the whole 2 s."""
    turn = TwoPartGoodbye("Sure thing.", " Thanks for calling, goodbye.")
    session, sent = goodbye_session(turn)
    say(session)
    wait_for(lambda: sent)
    session.clock.now += 1.0
    agent(session, "off")  # the first words played; their "on" was lost
    session.clock.now += 10.0
    turn.gate.set()
    wait_for(lambda: closed(sent))
    session.clock.now += 0.3
    agent(session, "on")   # Twilio speaks the last frame: 0.3 s after it was sent
    agent(session, "off")  # (at the same moment on the test's clock: held until 0.5 s after the last words)
    waited = wait_for(lambda: ended(sent))
    assert waited < 0.2 + CLOSING_INTERRUPT_GRACE_S + 0.4


class _Turns(_Engine):
    """One scripted turn per prompt, in order."""

    def __init__(self, *turns) -> None:
        super().__init__(turns[0])
        self.turns = list(turns)

    def start_turn(self, record, utterance, lang=None):
        return self.turns.pop(0)


def test_a_recordings_start_does_not_count_as_the_calls_reaction_time():
    """Twilio starts a node's recording only once it has fetched it (1.5 s here): that is no measure of how soon it
    reports "on" for our words. The goodbye's own "on" (0.3 s) is: its "off" 0.7 s after its words counts at once,
    rather than being held as one that may have crossed them."""
    clock = _Clock()
    tour = _ScriptedTurn([("AUDIO", 0.0), ("Here is the house.", 0.0)], clock,
                         entered_audio=SimpleNamespace(url="https://example.com/tour.mp3", interruptible=True))
    goodbye = TwoPartGoodbye("Goodbye now.")
    goodbye.gate.set()
    engine = _Turns(tour, goodbye)
    sent: list[dict] = []
    session = RelaySession(engine, SimpleNamespace(send_json=lambda *messages: sent.extend(messages)), spawn=spawn,
                           clock=clock, text_hold_s=HOLD_S)
    session.record = SimpleNamespace(tracking_id="call_1", messages=[], meta={}, language="en-US")
    say(session)
    assert engine.done.wait(5)
    assert [m["type"] for m in sent][0] == "play"
    clock.now += 1.5
    agent(session, "on")   # the recording starts, once fetched
    clock.now += 8.0
    agent(session, "off")  # it and the words after it played
    say(session, "bye")
    wait_for(lambda: closed(sent))
    clock.now += 0.3
    agent(session, "on")   # Twilio speaks the goodbye
    clock.now += 0.4
    agent(session, "off")
    waited = wait_for(lambda: ended(sent))
    assert waited < CLOSING_INTERRUPT_GRACE_S + 0.4
