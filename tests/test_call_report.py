"""End-of-call report: a signed JSON summary reaches CALL_REPORT_URL after the call, retried while the receiver
is down, and never holds up the call."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from callweaver.call_report import CallReporter, call_outcome, verify_signature
from callweaver.config import ConfigError, Settings
from callweaver.simulate import RelayCaller, http
from callweaver.store import CallRecord, build_store
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import Reply
from tests.fakes.live_server import LiveServer, free_port
from tests.fakes.loopback import LoopbackServer, read_head
from tests.fakes.report_receiver import ReportReceiver
from tests.helpers import make_call_body

SECRET = "report-secret-0123456789"


def spawn_thread(fn, *args):
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def receiver():
    r = ReportReceiver(hold=True).start()
    yield r
    r.stop()


def test_relay_call_report_is_signed_complete_and_sent_after_the_status_callback_returns(
        tmp_path, fake_twilio, fake_llm, receiver):
    env = {**base_env(tmp_path, fake_twilio, fake_llm), "CALL_REPORT_URL": receiver.url,
           "CALL_REPORT_SECRET": SECRET, "CALL_REPORT_BACKOFF_S": "0.05"}
    env.pop("PUBLIC_BASE_URL")
    server = LiveServer(env, workers=1).start()
    try:
        caller = RelayCaller(server.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
        caller.place_call(make_call_body(workflow="loan_prequalification_logical"))
        caller.answer_placed(fake_twilio.creates()[-1])
        caller.connect()
        fake_llm.push(Reply(text="I see.", tool_calls=[("record_variables", {"employment_status": "unemployed"})]))
        reply = caller.say("I'm between jobs right now")
        assert reply.end is not None, reply.text  # the decline end node closed the call
        caller.hangup()
        assert caller.status("completed", 3).status == 200  # answered while the receiver still holds the report
        assert receiver.request_started.wait(timeout=15)
        assert receiver.reports == []
        receiver.release.set()
        (report,) = receiver.wait_for(1)
        assert caller.status("completed", 4).status == 200  # a repeated terminal callback is not a new report
        stored = http("GET", server.url + f"/api/performance-metrics/{caller.tracking_id}").json()["callData"]
    finally:
        server.stop()

    assert verify_signature(SECRET, report.headers["x-callweaver-signature"], report.body)
    assert not verify_signature("another-secret-000000", report.headers["x-callweaver-signature"], report.body)
    assert not verify_signature(SECRET, report.headers["x-callweaver-signature"], report.body + b" ")
    assert report.headers["x-callweaver-event"] == "call.ended"
    body = json.loads(report.body)
    assert body["trackingId"] == body["reportId"] == caller.tracking_id == report.headers["x-callweaver-delivery"]
    assert body["status"] == "completed" and body["outcome"] == "end_node" and body["path"] == "optimized"
    assert body["variables"] == {"employment_status": "unemployed"}
    assert [m["role"] for m in body["transcript"]] == ["assistant", "user", "assistant"]
    assert body["transcript"][1]["content"] == "I'm between jobs right now"
    assert body["transcript"][2]["content"] == reply.text.strip()
    assert [t["firstTokenMs"] for t in body["call"]["turns"]] == [t["firstTokenMs"] for t in stored["turns"]]
    assert body["call"]["turns"][0]["firstTokenMs"] > 0 and body["endedAt"] >= body["startedAt"]
    assert body["metrics"]["totalProcessedRequests"] == 1
    assert len(receiver.reports) == 1


def test_receiver_down_for_a_while_then_up_gets_the_report(tmp_path):
    store = build_store(str(tmp_path / "cw.sqlite3"))
    store.create_call(CallRecord(tracking_id="call_1", status="completed", variables={"name": "Dana"},
                                 messages=[{"role": "assistant", "content": "Hi"}]))
    port = free_port()  # nothing listens here until the receiver comes up
    receiver = ReportReceiver(port=port, statuses=[503])
    waits: list[float] = []

    def sleep(delay: float) -> None:
        waits.append(delay)
        if len(waits) == 2:  # two connection failures so far: the receiver comes back, first answering 503
            receiver.start()
        time.sleep(delay)

    reporter = CallReporter(store, receiver.url, SECRET, spawn=spawn_thread, max_attempts=8, backoff_s=0.05,
                            sleep=sleep)
    try:
        delivery = reporter.deliver("call_1")
        (report,) = receiver.reports
    finally:
        receiver.stop()
    assert delivery.delivered and delivery.attempts == 4 and delivery.last_status == 200
    assert report.headers["x-callweaver-attempt"] == "4"
    assert verify_signature(SECRET, report.headers["x-callweaver-signature"], report.body)
    assert json.loads(report.body)["variables"] == {"name": "Dana"}
    assert waits[1] > waits[0] and waits[2] > waits[1]  # exponential backoff between attempts


def test_bounded_retries_and_no_retry_on_a_rejection(tmp_path):
    store = build_store(str(tmp_path / "cw.sqlite3"))
    store.create_call(CallRecord(tracking_id="call_2", status="failed"))
    dead = CallReporter(store, f"http://127.0.0.1:{free_port()}/x", SECRET, spawn=spawn_thread, max_attempts=3,
                        backoff_s=0.01)
    result = dead.call_ended("call_2")
    result.join(timeout=30)
    assert not result.is_alive()
    gave_up = dead.deliver("call_2")
    assert not gave_up.delivered and gave_up.attempts == 3 and gave_up.last_error
    rejecting = ReportReceiver(statuses=[400]).start()
    try:
        rejected = CallReporter(store, rejecting.url, SECRET, spawn=spawn_thread, backoff_s=0.01).deliver("call_2")
    finally:
        rejecting.stop()
    assert not rejected.delivered and rejected.attempts == 1 and rejected.last_status == 400
    assert [dead.backoff(n) <= 0.01 * 2 ** (n - 1) for n in (1, 2, 3)] == [True] * 3
    assert CallReporter(store, "http://x", SECRET, spawn=spawn_thread, backoff_s=2).backoff(30) <= 300


class RawReceiver(LoopbackServer):
    """Answers every request with `head`, then `drip` one byte every 0.2 s for up to 20 s (a receiver that never
    finishes its answer)."""

    def __init__(self, head: bytes, drip: bool = False) -> None:
        self.head, self.drip = head, drip
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            if not read_head(conn)[0]:
                return
            try:
                conn.sendall(self.head)
                for _ in range(100 if self.drip else 0):
                    time.sleep(0.2)
                    conn.sendall(b"x")
            except OSError:
                return


def test_a_receiver_redirect_is_not_followed_with_the_report(tmp_path):
    """requests follows redirects by default, and a 307/308 sends the POST again, body and signature included, to
    wherever `Location` says (another host, plain http, an internal address): the transcript and phone numbers went
    there. A redirect is now a rejection, logged with its status (found by the outbound audit)."""
    store = build_store(str(tmp_path / "cw.sqlite3"))
    store.create_call(CallRecord(tracking_id="call_3", status="completed", to="+14155550100"))
    elsewhere = ReportReceiver().start()
    redirecting = RawReceiver(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
                              % elsewhere.url.encode())
    try:
        delivery = CallReporter(store, f"http://127.0.0.1:{redirecting.port}/hook", SECRET, spawn=spawn_thread,
                                max_attempts=2, backoff_s=0.01).deliver("call_3")
    finally:
        redirecting.stop()
        elsewhere.stop()
    assert elsewhere.reports == []
    assert not delivery.delivered and delivery.attempts == 1 and delivery.last_status == 307


def test_a_receiver_that_never_finishes_its_answer_does_not_hold_the_delivery(tmp_path):
    """Only the status (and Retry-After) of the receiver's answer matters, but its whole body was read: an answer
    that declares a gigabyte and drips it a byte at a time (each read within the 10 s timeout) held the delivery
    greenlet, and its pending slot, for as long as the receiver liked. The body is no longer read (found by the
    outbound audit)."""
    store = build_store(str(tmp_path / "cw.sqlite3"))
    store.create_call(CallRecord(tracking_id="call_4", status="completed"))
    dripping = RawReceiver(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\nx", drip=True)
    results: list = []
    reporter = CallReporter(store, f"http://127.0.0.1:{dripping.port}/hook", SECRET, spawn=spawn_thread,
                            max_attempts=1)
    worker = spawn_thread(lambda: results.append(reporter.deliver("call_4")))
    worker.join(timeout=5)
    dripping.stop()
    assert results and results[0].delivered and results[0].last_status == 200


def test_outcomes():
    assert call_outcome("completed", [{"action": None}, {"action": "end"}]) == "end_node"
    assert call_outcome("completed", [{"action": "transfer"}]) == "transfer"
    assert call_outcome("completed", [{"action": None}]) == "hang_up"
    assert call_outcome("failed", []) == "error"
    assert call_outcome("no-answer", []) == "no_answer"


def test_report_url_needs_a_secret():
    with pytest.raises(ConfigError, match="CALL_REPORT_SECRET"):
        Settings.from_env({"CALL_REPORT_URL": "https://example.test/hook"})
    settings = Settings.from_env({"CALL_REPORT_URL": "https://example.test/hook", "CALL_REPORT_SECRET": SECRET})
    assert settings.call_report_secret == SECRET


class _ReadCountingStore:
    """A store counting the reads an ended call's report makes while it waits (every other call passes through)."""

    def __init__(self, store):
        self.store, self.reads = store, 0

    def relay_socket_held(self, tracking_id):
        self.reads += 1
        return self.store.relay_socket_held(tracking_id)

    def get_call(self, tracking_id):
        self.reads += 1
        return self.store.get_call(tracking_id)

    def __getattr__(self, name):
        return getattr(self.store, name)


def _end_relay_call(tmp_path, lease_s: float):
    """A relay call whose socket a (killed) worker claimed for `lease_s`, then its final status; returns the
    counting store, the reports asked for (their times) and when the status was recorded."""
    from callweaver.lifecycle import CallLifecycle
    store = _ReadCountingStore(build_store(str(tmp_path / "reads.sqlite3")))
    store.create_call(CallRecord(tracking_id="call_wait", path="optimized", status="in-progress"))
    assert store.claim_relay_socket("call_wait", "socket-1", 0, lease_s)
    reported: list[float] = []
    lifecycle = CallLifecycle(Settings(), store, None, None,
                              on_call_ended=lambda tid: reported.append(time.monotonic()))
    ended_at = time.monotonic()
    lifecycle.record_status(store.get_call("call_wait"),
                            {"CallSid": "CA" + "6" * 32, "CallStatus": "completed", "SequenceNumber": "9"})
    return store, reported, ended_at


def test_a_report_waiting_for_a_dead_workers_socket_reads_the_store_less_and_less_often(tmp_path):
    """A killed worker's socket holds its call's report for the whole lease: polled every 0.1 s, 200 such calls
    read the store 2000 times a second. The pause grows to 1 s: a 3 s lease costs ~8 reads, not ~30."""
    store, reported, ended_at = _end_relay_call(tmp_path, lease_s=3.0)
    reads_at_end = store.reads
    deadline = time.monotonic() + 10
    while not reported and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reported and 2.8 < reported[0] - ended_at < 4.2  # the report goes once the lease lapsed
    assert store.reads - reads_at_end <= 12, store.reads - reads_at_end


def test_a_report_waiting_for_a_socket_that_closes_at_once_goes_as_promptly_as_before(tmp_path):
    """The common case: the socket closes within ~0.1 s of the final status; the report's first look is still
    0.1 s after it."""
    store, reported, ended_at = _end_relay_call(tmp_path, lease_s=30.0)
    time.sleep(0.05)
    store.release_relay_socket("call_wait", "socket-1")
    deadline = time.monotonic() + 5
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reported and reported[0] - ended_at < 0.4, reported[0] - ended_at
