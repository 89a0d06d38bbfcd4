"""Deterministic reproductions of what the randomized conversations (test_conversation_fuzz.py) found, each on the
smallest call that shows it."""
from __future__ import annotations

import json
import time

import pytest

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
    """Fuzz seed=4 call=9 (Redis; the ending harness as first committed, 15cb4d9): end-call mid-reply; the relay
    socket closed just as the reply's greenlet ended, and RelaySession.close() joined it: `(greenlet or thread).join`
    took the dead greenlet as false and called None.join, an AttributeError out of the socket's handler
    (unhandled_error), and the turn cut by the hang-up was never committed (one turn row for two caller turns).
    gevent's patching is process-wide, hence the subprocess."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", GEVENT_JOIN_FINISHED_TASK_SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


class ClosingRelayCall:
    """A relay call as routes/relay.py runs it: its socket's claim held in the store while the session lives; the
    socket's close ends the session (committing the reply it cut), then releases the claim."""

    def __init__(self, app, client):
        from tests.test_call_audit import Call
        self.call = Call(app, client)
        self.store = self.call.svc.store
        self.tracking_id = self.call.tracking_id
        self.call_sid = self.store.get_call(self.tracking_id).call_sid
        self.store.claim_relay_socket(self.tracking_id, "socket-1", 0, 30.0)

    def reply_streams(self, fake_llm, said: str) -> None:
        fake_llm.push(Reply(text=" ".join(f"word{i}" for i in range(40)), token_interval_s=0.05))
        self.call.send({"type": "prompt", "voicePrompt": said, "lang": "en-US", "last": True})
        self.call.wait(lambda: any(m.get("type") == "text" for m in self.call.sent))

    def completed(self, client) -> None:
        """Twilio's final status: end-call hung the call up, and its callback came before the socket's close."""
        from tests.conftest import Signer
        resp = Signer(client).post(f"/api/call-status-optimized?trackingId={self.tracking_id}",
                                   {"CallSid": self.call_sid, "CallStatus": "completed", "SequenceNumber": "3"})
        assert resp.status_code == 200

    def socket_closes(self) -> None:
        self.call.session.close()
        self.store.release_relay_socket(self.tracking_id, "socket-1")


@pytest.fixture
def report_env(env, receiver):
    return {**env, "CACHE_TYPE": "NullCache", "CALL_REPORT_URL": receiver.url,
            "CALL_REPORT_SECRET": "fuzz-report-secret-0123"}


def reports_of(receiver, tracking_id: str, timeout_s: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [json.loads(r.body) for r in receiver.reports if json.loads(r.body)["trackingId"] == tracking_id]
        if found:
            time.sleep(0.2)  # (a second one would be in by now)
            return [json.loads(r.body) for r in receiver.reports if json.loads(r.body)["trackingId"] == tracking_id]
        time.sleep(0.02)
    return []


def test_the_report_of_a_call_hung_up_mid_reply_counts_the_turn_the_socket_close_committed(report_env, fake_llm,
                                                                                             receiver):
    """Fuzz seed=12 call=1 (SQLite; the harness of 581259a, whose report check found it): end-call mid-reply;
    Twilio's final status came before the relay socket's close, and the end-of-call report was built at once:
    without the turn the close then committed (the report counted 1 turn, the store held 2; its transcript lacked the
    caller's last words)."""
    from callweaver import create_app
    app = create_app(report_env)
    client = app.test_client()
    live = ClosingRelayCall(app, client)
    live.reply_streams(fake_llm, "I want to buy a house")
    live.completed(client)
    time.sleep(0.3)  # the socket closes a little later
    live.socket_closes()
    reports = reports_of(receiver, live.tracking_id)
    assert len(reports) == 1
    assert reports[0]["metrics"]["totalProcessedRequests"] == len(live.store.turns(live.tracking_id)) == 1
    assert {"role": "user", "content": "I want to buy a house"} in reports[0]["transcript"]


def test_with_record_transcripts_off_a_call_hung_up_mid_reply_keeps_no_words(report_env, fake_llm, receiver):
    """RECORD_TRANSCRIPTS=0: the call's history is emptied when it ends. The turn the socket's close committed after
    Twilio's final status wrote the whole history back (the caller's words kept for good)."""
    from callweaver import create_app
    app = create_app({**report_env, "RECORD_TRANSCRIPTS": "0"})
    client = app.test_client()
    live = ClosingRelayCall(app, client)
    live.reply_streams(fake_llm, "My name is Ann Lee")
    live.completed(client)
    time.sleep(0.3)
    live.socket_closes()
    assert len(reports_of(receiver, live.tracking_id)) == 1
    assert live.store.get_call(live.tracking_id).messages == []
    assert len(live.store.turns(live.tracking_id)) == 1  # its timings are kept


def test_a_report_is_not_held_for_a_socket_that_already_closed(report_env, fake_llm, receiver):
    from callweaver import create_app
    app = create_app(report_env)
    client = app.test_client()
    live = ClosingRelayCall(app, client)
    live.reply_streams(fake_llm, "I want to buy a house")
    live.socket_closes()
    started = time.monotonic()
    live.completed(client)
    reports = reports_of(receiver, live.tracking_id)
    assert len(reports) == 1 and time.monotonic() - started < 2.0
    assert reports[0]["metrics"]["totalProcessedRequests"] == 1


def test_a_report_waiting_for_a_socket_whose_worker_died_goes_when_its_lease_lapses(report_env, fake_llm, receiver):
    """A killed worker never closes its socket nor releases its claim: the report waits only until the lease lapses."""
    from callweaver import create_app
    app = create_app(report_env)
    client = app.test_client()
    live = ClosingRelayCall(app, client)
    live.store.claim_relay_socket(live.tracking_id, "socket-1", 0, 1.0)  # its last renewal: a second's lease left
    started = time.monotonic()
    live.completed(client)
    reports = reports_of(receiver, live.tracking_id, timeout_s=10)
    assert len(reports) == 1 and 0.8 < time.monotonic() - started < 5


def hang_up_while_a_gather_turn_is_answered(settings: dict, fake_twilio, fake_llm):
    """An in-process <Gather> call whose caller says their name, then hangs up while the turn's reply is being made:
    Twilio's final status comes before the turn's commit. Returns the app and the call, once the turn has ended."""
    import threading

    from callweaver import create_app
    from tests.conftest import Signer
    from tests.test_gather_flow import GatherCall
    app = create_app(settings)
    client = app.test_client()
    call = GatherCall(app, client, Signer(client), fake_twilio)
    root = call.answer()
    fake_llm.push(Reply(text="Thank you, I have noted that.", ttft_s=0.5))
    turn = threading.Thread(target=call.say, args=(root, "My name is Zebediah Quux"), daemon=True)
    turn.start()
    deadline = time.monotonic() + 5
    while not fake_llm.requests:  # the turn is asking the model
        assert time.monotonic() < deadline, "the turn never reached the model"
        time.sleep(0.02)
    resp = Signer(client).post(f"/api/call-status?trackingId={call.tracking_id}",
                               {"CallSid": call.call_sid, "CallStatus": "completed", "SequenceNumber": "9"})
    assert resp.status_code == 200
    turn.join(timeout=15)
    assert not turn.is_alive()
    return app, call


def test_with_record_transcripts_off_a_gather_turn_committed_after_the_final_status_keeps_no_words(
        env, fake_twilio, fake_llm):
    """RECORD_TRANSCRIPTS=0 on a <Gather> call (no relay socket to wait for): the caller hangs up while a turn's
    reply is being made, and Twilio's final status (which empties the history) comes before the turn's commit. The
    commit wrote the whole history back: the caller's words kept for good."""
    app, call = hang_up_while_a_gather_turn_is_answered(
        {**env, "RECORD_TRANSCRIPTS": "0", "CACHE_TYPE": "NullCache"}, fake_twilio, fake_llm)
    store = app.extensions["callweaver"].store
    record = store.get_call(call.tracking_id)
    assert len(store.turns(call.tracking_id)) == 1  # its timings are kept
    assert record.messages == [] and record.transcript == []
    assert "Zebediah" not in json.dumps([record.to_dict(), store.turns(call.tracking_id)])


def test_the_report_of_a_gather_call_hung_up_while_a_turn_was_answered_counts_that_turn(env, fake_twilio, fake_llm,
                                                                                         receiver):
    """The <Gather> side of the relay case above: the caller hangs up while a turn's reply is being made, Twilio's
    final status comes before the turn's commit, and the report (counting 0 turns, the store 1) lacks the caller's
    last words."""
    app, call = hang_up_while_a_gather_turn_is_answered(
        {**env, "CACHE_TYPE": "NullCache", "CALL_REPORT_URL": receiver.url,
         "CALL_REPORT_SECRET": "fuzz-report-secret-0123"}, fake_twilio, fake_llm)
    reports = reports_of(receiver, call.tracking_id)
    assert len(reports) == 1
    assert reports[0]["metrics"]["totalProcessedRequests"] == len(app.extensions["callweaver"].store.turns(
        call.tracking_id)) == 1
