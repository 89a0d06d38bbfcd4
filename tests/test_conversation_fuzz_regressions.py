"""Deterministic reproductions of what the randomized conversations (test_conversation_fuzz.py) found, each on the
smallest call that shows it."""
from __future__ import annotations

from tests.fakes.fake_llm import Reply
from tests.test_call_audit import Call, call, env  # noqa: F401  (fixtures)


def test_a_barge_in_after_the_reply_was_sent_marks_its_turn_interrupted(call, fake_llm):
    """Fuzz seed=6 call=0: the model's reply was streamed whole, and the caller talked over it while Twilio still
    spoke it. The history and the transcript keep only what was heard; the turn's row (the call log's timeline, the
    call's interrupted count) must say it was interrupted too, as for a barge-in mid-stream."""
    fake_llm.push(Reply(text="Sure, sure, I can help with that."))
    call.say("Can you help me")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "Sure,", "durationUntilInterruptMs": 400})
    assert call.assistant_lines()[-1] == "Sure,"
    assert call.turns()[-1]["interrupted"] is True
    assert call.svc.store.get_call(call.tracking_id).transcript[-1]["interrupted"] is True


def test_a_barge_in_after_the_whole_reply_was_heard_leaves_its_turn_uninterrupted(call, fake_llm):
    fake_llm.push(Reply(text="It has three bedrooms."))
    call.say("How many bedrooms")
    call.send({"type": "interrupt", "utteranceUntilInterrupt": "It has three bedrooms.",
               "durationUntilInterruptMs": 900})
    assert call.turns()[-1]["interrupted"] is False


GEVENT_JOIN_FINISHED_TASK_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import gevent
from callweaver.background import spawn

task = spawn(lambda: None)
gevent.sleep(0.01)  # the reply's greenlet has finished
assert task.dead
task.join(timeout=1.0)  # the relay's close() joins it: a finished greenlet is falsy, never the (absent) thread
task.kill(timeout=1.0)
print("ok")
"""


def test_joining_a_reply_task_that_already_finished_under_gevent_does_not_raise():
    """Fuzz seed=4 call=9 (Redis, CONVO_FUZZ_END_CALLS=12): end-call mid-reply; the relay socket closed just as the
    reply's greenlet ended, and RelaySession.close() joined it: `(greenlet or thread).join` took the dead greenlet
    as false and called None.join, an AttributeError out of the socket's handler (unhandled_error), and the turn
    cut by the hang-up was never committed (one turn row for two caller turns). gevent's patching is process-wide,
    hence the subprocess."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", GEVENT_JOIN_FINISHED_TASK_SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
