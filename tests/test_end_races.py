"""How a call's end and its end reason are recorded when several things end it at once, on both stores.

The rule (store.END_REASON_RULE): the first end reason recorded wins; POST /api/end-call's reason is withdrawn
only by the request that recorded it, and only when Twilio refused the hang-up, the reason recorded meanwhile
then taking its place; one Twilio hang-up per call; an ended call stays ended. The interleavings are forced: the
Twilio stand-in holds end-call's hang-up (`hold`) while the other event is delivered."""
from __future__ import annotations

import json
import threading
import time

import pytest

from callweaver import create_app
from tests.conftest import Signer, base_env
from callweaver.store import (API_END, END_REASON_META, ERROR_END, SILENCE_END, CallRecord, end_call_answered,
                              end_call_claimed, end_call_refused, end_reason_claimed)
from tests.helpers import make_call_body
from tests.test_store import redis_server, store, store_spec  # noqa: F401  (both-backend fixtures)


@pytest.fixture(params=["sqlite", "redis"])
def app(request, tmp_path, fake_twilio):
    env = base_env(tmp_path, fake_twilio)
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        import redis
        redis.Redis.from_url(url).flushdb()  # a fresh store per test (the key prefix is fixed)
        env["REDIS_URL"] = url
    return create_app(env)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def twilio(client):
    return Signer(client)


def place(client) -> tuple[str, str]:
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    return data["callSid"], data["optimization"]["trackingId"]


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class HeldEndCall:
    """POST /api/end-call on its own thread, its Twilio hang-up held by the stand-in until `release`."""

    def __init__(self, app, fake_twilio, call_sid: str, updates_before: int = 0):
        self.fake, self.hold = fake_twilio, threading.Event()
        fake_twilio.hold = self.hold
        self.response = None
        client = app.test_client()

        def run() -> None:
            self.response = client.post("/api/end-call", json={"callSid": call_sid})

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        wait_for(lambda: len(fake_twilio.updates()) > updates_before)  # Twilio has the request; the answer is held

    def release(self, refuse: str | None = None):
        if refuse:
            del self.fake.calls[refuse]  # Twilio no longer knows the call: the held hang-up is refused (404)
        self.hold.set()
        self.thread.join(timeout=20)
        self.fake.hold = None
        return self.response


def final_status(twilio, tracking_id: str, call_sid: str, status: str = "completed", sequence: str = "5"):
    return twilio.post(f"/api/call-status-optimized?trackingId={tracking_id}",
                       {"CallSid": call_sid, "CallStatus": status, "SequenceNumber": sequence, "CallDuration": "42"})


def relay_ended_with_error(twilio, tracking_id: str, call_sid: str):
    return twilio.post(f"/api/connect-action?trackingId={tracking_id}", {
        "CallSid": call_sid, "SessionStatus": "ended",
        "HandoffData": json.dumps({"reason": "error", "detail": "repeated Twilio errors"})})


def outcome(client, tracking_id: str) -> str:
    detail = client.get(f"/api/call-log/{tracking_id}").get_json()["call"]["outcome"]
    row = next(r for r in client.get("/api/call-log").get_json()["calls"] if r["trackingId"] == tracking_id)
    assert row["outcome"] == detail  # the list and the detail agree
    return detail


def test_an_error_while_end_call_waits_on_twilio_survives_its_refusal(app, client, twilio, fake_twilio):
    """The socket ends with an error while Twilio is asked to hang up; Twilio then refuses: the call ended on the
    error. The take-back removed whatever reason was stored, the error's included."""
    call_sid, tracking_id = place(client)
    end = HeldEndCall(app, fake_twilio, call_sid)

    assert relay_ended_with_error(twilio, tracking_id, call_sid).status_code == 200
    assert end.release(refuse=call_sid).status_code == 404
    final_status(twilio, tracking_id, call_sid)

    assert outcome(client, tracking_id) == "error"


def test_the_first_end_reason_wins_over_an_error_that_follows(app, client, twilio, fake_twilio):
    """end-call came first and Twilio took it: the call was ended through the API, not by the error after it."""
    call_sid, tracking_id = place(client)
    end = HeldEndCall(app, fake_twilio, call_sid)

    relay_ended_with_error(twilio, tracking_id, call_sid)
    assert end.release().status_code == 200
    final_status(twilio, tracking_id, call_sid)

    assert outcome(client, tracking_id) == "ended_by_api"


def test_end_call_after_an_error_keeps_the_error(app, client, twilio, fake_twilio):
    call_sid, tracking_id = place(client)
    relay_ended_with_error(twilio, tracking_id, call_sid)

    assert client.post("/api/end-call", json={"callSid": call_sid}).status_code == 200
    final_status(twilio, tracking_id, call_sid)

    assert outcome(client, tracking_id) == "error"


def test_end_call_during_the_goodbye_keeps_the_goodbye(app, client, twilio, fake_twilio):
    """The caller said goodbye and the closing line is playing (its end is recorded, the call is ending on its own)
    when the end button is pressed: the call ended at its end node, the first decisive end."""
    call_sid, tracking_id = place(client)
    svc = app.extensions["callweaver"]
    _, result = svc.engine.answer_whole_turn(svc.store.get_call(tracking_id), "Okay, goodbye.", path="relay",
                                             received_at=svc.engine.clock())
    assert result.action == "end"

    assert client.post("/api/end-call", json={"callSid": call_sid}).status_code == 200
    final_status(twilio, tracking_id, call_sid)

    assert outcome(client, tracking_id) == "end_node"


@pytest.mark.parametrize("twilio_answers_first", [True, False])
def test_end_call_during_a_goodbye_the_caller_talked_over_is_the_end_calls(app, client, twilio, fake_twilio,
                                                                            twilio_answers_first):
    """End-call left the call to its goodbye; the caller then talked over the goodbye (its end never fires), before
    or after Twilio took the hang-up: nothing but end-call ended the call, which was logged as the caller's hang-up."""
    from types import SimpleNamespace
    call_sid, tracking_id = place(client)
    svc = app.extensions["callweaver"]
    _, result = svc.engine.answer_whole_turn(svc.store.get_call(tracking_id), "Okay, goodbye.", path="relay",
                                             received_at=svc.engine.clock())
    assert result.action == "end"

    def talked_over() -> None:
        svc.engine.drop_closing_action(svc.store.get_call(tracking_id), SimpleNamespace(result=result))

    if twilio_answers_first:
        assert client.post("/api/end-call", json={"callSid": call_sid}).status_code == 200
        talked_over()
    else:
        end = HeldEndCall(app, fake_twilio, call_sid)
        talked_over()
        assert end.release().status_code == 200
    final_status(twilio, tracking_id, call_sid)

    assert outcome(client, tracking_id) == "ended_by_api"


def test_a_goodbye_talked_over_while_end_call_is_refused_is_the_callers(app, client, twilio, fake_twilio):
    from types import SimpleNamespace
    call_sid, tracking_id = place(client)
    svc = app.extensions["callweaver"]
    _, result = svc.engine.answer_whole_turn(svc.store.get_call(tracking_id), "Okay, goodbye.", path="relay",
                                             received_at=svc.engine.clock())
    end = HeldEndCall(app, fake_twilio, call_sid)
    svc.engine.drop_closing_action(svc.store.get_call(tracking_id), SimpleNamespace(result=result))
    assert end.release(refuse=call_sid).status_code == 404
    final_status(twilio, tracking_id, call_sid)

    assert outcome(client, tracking_id) == "hang_up"


def test_two_end_calls_at_once_hang_up_once_and_agree(app, client, twilio, fake_twilio):
    """A double click: one Twilio hang-up, both answered as the first was, one outcome."""
    call_sid, tracking_id = place(client)
    end = HeldEndCall(app, fake_twilio, call_sid)
    second: dict = {}
    thread = threading.Thread(target=lambda: second.update(
        response=app.test_client().post("/api/end-call", json={"callSid": call_sid})), daemon=True)
    thread.start()
    time.sleep(0.3)  # the second request is in (it waits on the first, or has asked Twilio itself)

    first = end.release()
    thread.join(timeout=20)
    final_status(twilio, tracking_id, call_sid)

    assert len(fake_twilio.updates()) == 1
    assert first.status_code == second["response"].status_code == 200
    assert first.get_data() == second["response"].get_data()
    assert outcome(client, tracking_id) == "ended_by_api"


def test_a_second_end_call_refused_by_twilio_keeps_the_first_ones_reason(app, client, twilio, fake_twilio):
    """The second end-call comes after the first was taken; if it reached Twilio, Twilio refused it (the call had
    gone), and its take-back removed the first request's reason."""
    call_sid, tracking_id = place(client)
    assert client.post("/api/end-call", json={"callSid": call_sid}).status_code == 200
    del fake_twilio.calls[call_sid]  # the call has gone: Twilio refuses any further update

    again = client.post("/api/end-call", json={"callSid": call_sid})
    final_status(twilio, tracking_id, call_sid)

    assert again.status_code == 200 and again.get_json()["callSid"] == call_sid
    assert len(fake_twilio.updates()) == 1
    assert outcome(client, tracking_id) == "ended_by_api"


def test_end_call_after_the_final_status_leaves_the_outcome(app, client, twilio, fake_twilio):
    call_sid, tracking_id = place(client)
    final_status(twilio, tracking_id, call_sid)

    client.post("/api/end-call", json={"callSid": call_sid})

    assert outcome(client, tracking_id) == "hang_up"


def test_the_callers_hang_up_during_end_call_is_the_callers(app, client, twilio, fake_twilio):
    """The caller hangs up while Twilio is asked to: Twilio reports `completed`, then refuses the hang-up."""
    call_sid, tracking_id = place(client)
    end = HeldEndCall(app, fake_twilio, call_sid)

    final_status(twilio, tracking_id, call_sid)
    assert end.release(refuse=call_sid).status_code == 404

    assert outcome(client, tracking_id) == "hang_up"


@pytest.mark.parametrize("sequence", ["13", None])
def test_a_late_in_progress_does_not_revive_an_ended_call(app, client, twilio, sequence):
    """Twilio delivers out of order; a callback without a SequenceNumber counts as the newest, and even one with a
    higher number than the final status's leaves an ended call ended."""
    call_sid, tracking_id = place(client)
    final_status(twilio, tracking_id, call_sid, "busy", "3")

    form = {"CallSid": call_sid, "CallStatus": "in-progress"}
    if sequence is not None:
        form["SequenceNumber"] = sequence
    twilio.post(f"/api/call-status-optimized?trackingId={tracking_id}", form)

    record = app.extensions["callweaver"].store.get_call(tracking_id)
    assert record.status == "busy" and record.ended_at is not None
    assert outcome(client, tracking_id) == "busy"
    row = next(r for r in client.get("/api/call-log").get_json()["calls"] if r["trackingId"] == tracking_id)
    assert row["status"] == "busy" and row["live"] is False
    assert client.get("/api/call-log?status=busy").get_json()["calls"][0]["trackingId"] == tracking_id
    assert app.extensions["callweaver"].store.count_live_calls() == 0


def test_the_report_of_a_caller_who_hung_up_during_end_call_says_so(tmp_path, fake_twilio):
    """The final status comes while Twilio is asked to hang up (the caller left first; Twilio then refuses): the
    end-of-call report, queued by that status, was built with end-call's provisional reason."""
    from tests.fakes.report_receiver import ReportReceiver
    receiver = ReportReceiver().start()
    try:
        app = create_app({**base_env(tmp_path, fake_twilio), "CALL_REPORT_URL": receiver.url,
                          "CALL_REPORT_SECRET": "report-secret-0123456789"})
        client = app.test_client()
        call_sid, tracking_id = place(client)
        end = HeldEndCall(app, fake_twilio, call_sid)

        final_status(Signer(client), tracking_id, call_sid)
        time.sleep(0.3)  # the report's delivery has started meanwhile
        assert end.release(refuse=call_sid).status_code == 404

        [report] = receiver.wait_for(1)
        assert json.loads(report.body)["outcome"] == "hang_up"
        assert outcome(client, tracking_id) == "hang_up"
    finally:
        receiver.stop()


# -- the rule in the store, on both backends ---------------------------------------------------------------------


def test_a_later_end_reason_never_overwrites_the_first(store):
    store.create_call(CallRecord(tracking_id="call_1"))
    store.change_meta("call_1", end_reason_claimed(ERROR_END))

    meta, written = store.change_meta("call_1", end_reason_claimed(SILENCE_END))  # the relay's silence goodbye

    assert (meta[END_REASON_META], written) == (ERROR_END, False)
    assert store.change_meta("ghost", end_reason_claimed(ERROR_END)) == (None, False)


def test_a_reason_recorded_while_twilio_is_asked_is_kept_for_its_refusal(store):
    store.create_call(CallRecord(tracking_id="call_1"))
    store.change_meta("call_1", end_call_claimed("a", 100.0, 11.0))
    store.change_meta("call_1", end_reason_claimed(SILENCE_END, now=105.0))  # while Twilio is asked
    assert store.get_call("call_1").meta[END_REASON_META] == API_END

    assert store.change_meta("call_1", end_call_refused("b"))[1] is False  # not b's to withdraw
    store.change_meta("call_1", end_call_refused("a"))

    assert store.get_call("call_1").meta == {END_REASON_META: SILENCE_END}


def test_twilios_answer_makes_the_api_end_stand(store):
    store.create_call(CallRecord(tracking_id="call_1"))
    store.change_meta("call_1", end_call_claimed("a", 100.0, 11.0))
    store.change_meta("call_1", end_reason_claimed(ERROR_END, now=105.0))  # while Twilio is asked
    store.change_meta("call_1", end_call_answered("a", "completed"))

    meta, written = store.change_meta("call_1", end_reason_claimed(SILENCE_END))

    assert written is False
    assert meta == {END_REASON_META: API_END,
                    "endCall": {"by": "a", "at": 100.0, "until": 111.0, "status": "completed"}}


def test_a_hang_up_asked_for_longer_than_twilio_answers_is_taken_over(store):
    """Its request died with its worker: later end-calls do not wait on it for ever."""
    store.create_call(CallRecord(tracking_id="call_1"))
    store.change_meta("call_1", end_call_claimed("dead", 100.0, 11.0))

    assert store.change_meta("call_1", end_call_claimed("b", 110.0, 11.0))[1] is False  # still being asked
    meta, written = store.change_meta("call_1", end_call_claimed("b", 112.0, 11.0))

    assert written and meta == {END_REASON_META: API_END, "endCall": {"by": "b", "at": 112.0, "until": 123.0}}


def test_end_calls_claiming_at_once_get_one_hang_up(store, store_spec):
    """change_meta is one atomic write: of requests claiming together, each on its own store (a worker's SQLite
    connection, an instance's Redis client), exactly one holds the hang-up."""
    from callweaver.store import build_store
    store.create_call(CallRecord(tracking_id="call_1"))
    workers = [build_store(**store_spec) for _ in range(6)]
    start, claimed = threading.Barrier(len(workers)), []

    def claim(worker, token: str) -> None:
        start.wait()
        claimed.append(worker.change_meta("call_1", end_call_claimed(token, 100.0, 11.0))[1])

    threads = [threading.Thread(target=claim, args=(worker, f"t{n}")) for n, worker in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    for worker in workers:
        worker.close()

    assert sorted(claimed) == [False] * 5 + [True]
    assert store.get_call("call_1").meta["endCall"]["by"] in {f"t{n}" for n in range(6)}


def test_a_final_status_numbered_as_an_unnumbered_callback_was_still_ends_the_call(store):
    """A callback without a SequenceNumber takes the next number; Twilio's own final status may then carry that
    number, and was dropped as a redelivery: the call stayed live (the gauge, the call log) until the horizon."""
    store.create_call(CallRecord(tracking_id="call_1"))
    store.append_status("call_1", "ringing", 1, {})
    store.append_status("call_1", "in-progress", None, {})  # numbered 2 by the store

    store.append_status("call_1", "completed", 2, {"CallDuration": "42"}, received_at=1000.0)

    record = store.get_call("call_1")
    assert (record.status, record.ended_at) == ("completed", 1000.0)
    assert store.count_live_calls() == 0
    assert store.append_status("call_1", "completed", 2, {}) is False  # a real redelivery changes nothing
    assert store.get_call("call_1").ended_at == 1000.0


def test_a_reason_after_an_abandoned_end_call_is_the_calls(store):
    """End-call's request died with its worker after recording ended_by_api, before Twilio answered; the call went
    on past Twilio's deadline, so its hang-up was never taken, and the call's own end (the silence goodbye, an
    error) is how it ended: it was queued behind ended_by_api for ever, as only the dead request could withdraw it."""
    store.create_call(CallRecord(tracking_id="call_1"))
    store.change_meta("call_1", end_call_claimed("dead", time.time() - 60, 11.0))

    meta, written = store.change_meta("call_1", end_reason_claimed(SILENCE_END))

    assert written and meta == {END_REASON_META: SILENCE_END}  # and the hang-up is free for the next end-call


def test_a_reason_queued_before_end_call_was_abandoned_stays_first(store):
    store.create_call(CallRecord(tracking_id="call_1"))
    store.change_meta("call_1", end_call_claimed("dead", time.time() - 60, 11.0))
    store.change_meta("call_1", lambda meta, ended: {**meta, "endReasonQueued": ERROR_END})  # queued while asked

    meta, _ = store.change_meta("call_1", end_reason_claimed(SILENCE_END))

    assert meta == {END_REASON_META: ERROR_END}


def test_an_abandoned_end_call_after_the_calls_end_stands(store):
    """Once the call has ended, Twilio may have taken the dead request's hang-up: ended_by_api is kept."""
    store.create_call(CallRecord(tracking_id="call_1"))
    store.change_meta("call_1", end_call_claimed("dead", time.time() - 60, 11.0))
    store.append_status("call_1", "completed", 3, {})

    meta, _ = store.change_meta("call_1", end_reason_claimed(ERROR_END))

    assert meta[END_REASON_META] == API_END


def test_the_report_does_not_wait_for_an_abandoned_end_call(store):
    """The report waits for a pending end-call's answer only while its request can still get one."""
    from callweaver.call_report import CallReporter
    store.create_call(CallRecord(tracking_id="call_1"))
    store.change_meta("call_1", end_call_claimed("dead", time.time() - 60, 11.0))
    store.append_status("call_1", "completed", 3, {})
    reporter = CallReporter(store, "http://127.0.0.1:9/unused", "secret", spawn=None, max_attempts=1,
                            settle_s=11.0)

    started = time.monotonic()
    reporter.deliver("call_1")

    assert time.monotonic() - started < 3.0


def rfc2822(epoch: float) -> str:
    """Twilio's Timestamp field: when the event happened."""
    from email.utils import formatdate
    return formatdate(epoch, usegmt=True)


def test_a_call_twilio_ended_after_a_dead_end_calls_deadline_is_not_ended_by_api(app, client, twilio, fake_twilio):
    """End-call's request died with its worker after recording ended_by_api and before Twilio answered; the caller
    hung up a minute later. Twilio's final status says when the call ended: after that request's deadline, so its
    hang-up is not what ended it. The call log said ended_by_api for ever."""
    call_sid, tracking_id = place(client)
    store = app.extensions["callweaver"].store
    store.change_meta(tracking_id, end_call_claimed("dead", time.time() - 60, 11.0))

    twilio.post(f"/api/call-status-optimized?trackingId={tracking_id}",
                {"CallSid": call_sid, "CallStatus": "completed", "SequenceNumber": "5", "CallDuration": "90",
                 "Timestamp": rfc2822(time.time())})

    assert outcome(client, tracking_id) == "hang_up"
    assert client.post("/api/end-call", json={"callSid": call_sid}).status_code in (200, 404)  # asks Twilio again


def test_a_call_twilio_ended_within_end_calls_deadline_keeps_ended_by_api(app, client, twilio, fake_twilio):
    """Twilio may have taken the hang-up before the request died: the call ended within its deadline."""
    call_sid, tracking_id = place(client)
    store = app.extensions["callweaver"].store
    claimed_at = time.time() - 60
    store.change_meta(tracking_id, end_call_claimed("dead", claimed_at, 11.0))

    twilio.post(f"/api/call-status-optimized?trackingId={tracking_id}",
                {"CallSid": call_sid, "CallStatus": "completed", "SequenceNumber": "5", "CallDuration": "90",
                 "Timestamp": rfc2822(claimed_at + 3)})

    assert outcome(client, tracking_id) == "ended_by_api"


def test_an_end_call_claim_whose_reply_was_lost_is_still_that_requests(redis_server):
    """redis-py sends a command again when its connection fails before the reply; under change_meta's WATCH that
    replays the change on what it had already written. End-call's claim then read its own hang-up as another
    request's: it reported no claim, and the request waited Twilio's whole deadline on itself before asking for the
    hang-up it already held."""
    import uuid

    from callweaver.store import build_store
    from tests.fakes.loopback import ReplyLosingProxy

    proxy = ReplyLosingProxy(redis_server.port)
    store = build_store("", f"redis://127.0.0.1:{proxy.port}/0", key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    try:
        store.create_call(CallRecord(tracking_id="call_1"))
        proxy.lose_after = b"EXEC"  # the claim's MULTI/EXEC
        meta, claimed = store.change_meta("call_1", end_call_claimed("a", 100.0, 11.0))
        assert proxy.lost == 1  # the claim landed, its reply lost

        assert claimed and meta == {END_REASON_META: API_END, "endCall": {"by": "a", "at": 100.0, "until": 111.0}}
        assert store.change_meta("call_1", end_call_claimed("b", 101.0, 11.0))[1] is False  # still one hang-up
    finally:
        store.close()
        proxy.stop()


def test_a_final_status_renumbered_after_an_unnumbered_callback_is_current_when_its_reply_was_lost(redis_server):
    """Twilio's final status carrying the number an unnumbered callback took is stored after it (END_REASON_RULE);
    sent again after its reply was lost, it was not recognised (looked for under the number it came with) and
    answered "not current": the end of the call was never acted on (no end-of-call report)."""
    import uuid

    from callweaver.store import build_store
    from tests.fakes.loopback import ReplyLosingProxy

    proxy = ReplyLosingProxy(redis_server.port)
    store = build_store("", f"redis://127.0.0.1:{proxy.port}/0", key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    try:
        store.create_call(CallRecord(tracking_id="call_1"))
        store.append_status("call_1", "ringing", 1, {})
        store.append_status("call_1", "in-progress", None, {})  # numbered 2 by the store
        proxy.lose_after = b"EVALSHA"
        current = store.append_status("call_1", "completed", 2, {"CallDuration": "42"}, received_at=1000.0)
        assert proxy.lost == 1

        assert current is True
        record = store.get_call("call_1")
        assert (record.status, record.ended_at) == ("completed", 1000.0)
        assert [entry["status"] for entry in store.status_history("call_1")] == ["ringing", "in-progress",
                                                                                   "completed"]
        assert store.append_status("call_1", "completed", 2, {}) is False  # a real redelivery changes nothing
    finally:
        store.close()
        proxy.stop()
