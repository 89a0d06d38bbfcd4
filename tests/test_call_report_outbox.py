"""End-of-call reports survive their worker: the write that ends a call records the report as due in the store (the
outbox), and a worker sharing the store resumes what a stopped worker left, the attempt count going on."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from callweaver.call_report import CallReporter, verify_signature
from callweaver.store import CallRecord, build_store
from tests.conftest import base_env
from tests.fakes.live_server import REPO
from tests.fakes.redis_server import RedisServer
from tests.fakes.report_receiver import ReportReceiver

SECRET = "report-secret-0123456789"
FAR = 1e12  # a `now` after every lease


class Stopped(Exception):
    pass


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def store_env(request, tmp_path) -> dict[str, str]:
    """The store settings of a fresh store: a new SQLite file, or a new key prefix on a real Redis."""
    if request.param == "sqlite":
        return {"CALLWEAVER_DB": str(tmp_path / "state" / "cw.sqlite3"), "REDIS_URL": ""}
    return {"CALLWEAVER_DB": str(tmp_path / "unused.sqlite3"), "REDIS_URL": request.getfixturevalue("redis_server").url,
            "REDIS_KEY_PREFIX": f"cwtest:{uuid.uuid4().hex}:"}


@pytest.fixture
def store(store_env):
    built = build_store(store_env["CALLWEAVER_DB"], store_env["REDIS_URL"] or None,
                        store_env.get("REDIS_KEY_PREFIX", "callweaver:"))
    yield built
    built.close()


def spawned(into: list):
    def spawn(fn, *args):
        thread = threading.Thread(target=fn, args=args, daemon=True)
        thread.start()
        into.append(thread)
        return thread
    return spawn


def ended_call(store, tracking_id: str = "call_1") -> str:
    store.create_call(CallRecord(tracking_id=tracking_id, status="in-progress", call_sid="CA" + "0" * 32,
                                 messages=[{"role": "assistant", "content": "Hi"}]))
    store.append_status(tracking_id, "completed", 5, {"CallStatus": "completed"})
    return tracking_id


def left_by_a_stopped_worker(store, tracking_id: str, attempts: int = 0) -> None:
    """A due report whose worker died after `attempts` attempts: its lease has run out."""
    store.claim_report(tracking_id, "gone:1:abc", 0.0, create=True)
    for _ in range(attempts):
        store.claim_report(tracking_id, "gone:1:abc", 0.0, attempt=True)


# -- the failing-first reproduction: a worker stops while its report waits for the receiver --------------------------

WORKER_A = """
import json, os, sys, time
from callweaver import create_app
from callweaver.store import CallRecord
app = create_app(json.loads(os.environ["WORKER_A_ENV"]))
services = app.extensions["callweaver"]
tracking_id = os.environ["WORKER_A_CALL"]
services.store.create_call(CallRecord(tracking_id=tracking_id, status="in-progress", call_sid="CA" + "1" * 32,
                                      messages=[{"role": "assistant", "content": "Hello"}]))
services.lifecycle.record_status(services.store.get_call(tracking_id),
                                 {"CallStatus": "completed", "CallSid": "CA" + "1" * 32, "SequenceNumber": "3"})
print("ended", flush=True)
time.sleep(120)
"""


def test_a_report_whose_worker_was_killed_while_the_receiver_was_down_is_delivered_by_a_new_worker(
        tmp_path, fake_twilio, store_env):
    receiver = ReportReceiver(statuses=[503] * 50).start()
    env = {**base_env(tmp_path, fake_twilio), **store_env, "CALL_REPORT_URL": receiver.url,
           "CALL_REPORT_SECRET": SECRET, "CALL_REPORT_BACKOFF_S": "2", "CALL_REPORT_LEASE_S": "1",
           "CALL_REPORT_SWEEP_S": "1", "RETENTION_INTERVAL_S": "3600"}
    tracking_id = "call_" + uuid.uuid4().hex[:12]
    worker_a = subprocess.Popen([sys.executable, "-c", WORKER_A], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "WORKER_A_ENV": json.dumps(env), "WORKER_A_CALL": tracking_id})
    try:
        for line in worker_a.stdout:  # its log lines first
            if line.strip() == "ended":
                break
        else:
            pytest.fail("worker A exited before the call ended")
        assert receiver.request_started.wait(timeout=20)  # attempt 1: the receiver answered 503
        time.sleep(0.5)  # the worker is now waiting to try again
    finally:
        worker_a.send_signal(signal.SIGKILL)  # killed: nothing of it runs again
        worker_a.wait(timeout=10)
    receiver.statuses.clear()  # the receiver is back
    from callweaver import create_app
    services = create_app(env).extensions["callweaver"]  # the next worker, on the same store
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise Stopped  # ends the sweep loop (production's ends with its worker)

    def run_sweeps() -> None:  # the worker's loop, as start_background_jobs runs it: at start, then every interval
        with contextlib.suppress(Stopped):
            services.call_reporter.run_sweeps(services.settings.call_report_sweep_s, sleep)

    sweeps = threading.Thread(target=run_sweeps, daemon=True)
    sweeps.start()
    try:
        (report,) = receiver.wait_for(1, timeout_s=30)
    finally:
        stop.set()
        sweeps.join(timeout=10)
        receiver.stop()
    assert json.loads(report.body)["reportId"] == tracking_id == report.headers["x-callweaver-delivery"]
    assert report.headers["x-callweaver-attempt"] == "2"  # the count went on
    assert verify_signature(SECRET, report.headers["x-callweaver-signature"], report.body)
    assert services.store.due_reports(FAR, 10) == []


# -- the outbox, on each store --------------------------------------------------------------------------------------

def test_only_the_write_that_ends_the_call_records_its_report(store):
    store.create_call(CallRecord(tracking_id="call_1", status="queued"))
    store.append_status("call_1", "ringing", 1, {}, report_holder="w1", report_lease_s=0.0)
    assert store.due_reports(FAR, 10) == []
    store.append_status("call_1", "completed", 2, {}, report_holder="w1", report_lease_s=60.0)
    assert store.due_reports(time.time(), 10) == []  # held by the worker that saw it end
    assert store.due_reports(FAR, 10) == ["call_1"]
    assert store.claim_report("call_1", "w2", 10.0) is None  # another worker waits for the lease
    store.finish_report("call_1")
    store.append_status("call_1", "completed", 3, {}, report_holder="w1", report_lease_s=0.0)  # a late repeat
    assert store.due_reports(FAR, 10) == []


def test_two_reporters_on_one_store_deliver_a_left_report_once(store, receiver):
    tracking_id = ended_call(store)
    left_by_a_stopped_worker(store, tracking_id)
    threads: list = []
    reporters = [CallReporter(store, receiver.url, SECRET, spawn=spawned(threads), holder=f"w{i}", backoff_s=0.01)
                 for i in range(2)]
    start = threading.Barrier(2)
    resumed: list[int] = []

    def sweep(reporter):
        start.wait()
        resumed.append(reporter.resume_due())

    sweeps = [threading.Thread(target=sweep, args=(r,)) for r in reporters]
    for thread in sweeps:
        thread.start()
    for thread in sweeps:
        thread.join(timeout=10)
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(resumed) == [0, 1]
    assert len(receiver.reports) == 1
    assert store.due_reports(FAR, 10) == []
    assert all(r.resume_due(now=FAR) == 0 for r in reporters)


def test_a_resumed_report_goes_on_counting_its_attempts(store, receiver):
    tracking_id = ended_call(store)
    left_by_a_stopped_worker(store, tracking_id, attempts=3)  # died during its third attempt's POST
    threads: list = []
    reporter = CallReporter(store, receiver.url, SECRET, spawn=spawned(threads), holder="w1", max_attempts=10)
    assert reporter.resume_due() == 1
    threads[0].join(timeout=10)
    (report,) = receiver.reports
    assert report.headers["x-callweaver-attempt"] == "4"
    assert store.due_reports(FAR, 10) == []


def test_giving_up_removes_the_report_and_a_spent_one_is_not_sent_again(store):
    down = ReportReceiver(statuses=[503] * 20).start()
    try:
        ended_call(store, "call_1")
        left_by_a_stopped_worker(store, "call_1", attempts=2)
        ended_call(store, "call_2")
        left_by_a_stopped_worker(store, "call_2", attempts=3)  # its last attempt was cut short
        threads: list = []
        reporter = CallReporter(store, down.url, SECRET, spawn=spawned(threads), holder="w1", max_attempts=3,
                                backoff_s=0.01)
        assert reporter.resume_due() == 2
        for thread in threads:
            thread.join(timeout=10)
        assert store.due_reports(FAR, 10) == []
        assert store.claim_report("call_1", "w2", 10.0) is None
        assert len(down.statuses) == 19  # only call_1's third attempt was made
    finally:
        down.stop()


def test_the_worker_that_saw_the_call_end_holds_its_report_and_a_late_sweep_leaves_it(store, receiver):
    store.create_call(CallRecord(tracking_id="call_1", status="in-progress"))
    store.append_status("call_1", "completed", 2, {}, report_holder="w1", report_lease_s=0.0)
    threads: list = []
    other = CallReporter(store, receiver.url, SECRET, spawn=spawned(threads), holder="w2")
    mine = CallReporter(store, receiver.url, SECRET, spawn=spawned(threads), holder="w1")
    delivery = mine.deliver("call_1")
    assert delivery.delivered and delivery.attempts == 1
    assert other.resume_due(now=FAR) == 0
    assert len(receiver.reports) == 1


def test_a_worker_taken_over_stops_delivering(store, receiver):
    tracking_id = ended_call(store)
    store.claim_report(tracking_id, "w2", 600.0, create=True)  # another worker holds it, lease running
    reporter = CallReporter(store, receiver.url, SECRET, spawn=spawned([]), holder="w1")
    assert not reporter.deliver(tracking_id).delivered
    assert receiver.reports == []


# -- retention -------------------------------------------------------------------------------------------------------

def test_retention_drops_a_due_report_with_its_call_and_keeps_a_recent_one(store, receiver):
    store.create_call(CallRecord(tracking_id="old", status="in-progress", created_at=time.time() - 10 * 86400))
    store.append_status("old", "completed", 2, {}, received_at=time.time() - 9 * 86400, report_holder="w1")
    store.create_call(CallRecord(tracking_id="new", status="in-progress"))
    store.append_status("new", "completed", 2, {}, report_holder="w1")
    assert sorted(store.due_reports(FAR, 10)) == ["new", "old"]
    assert store.purge(time.time() - 86400) == 1
    assert store.due_reports(FAR, 10) == ["new"]
    threads: list = []
    reporter = CallReporter(store, receiver.url, SECRET, spawn=spawned(threads), holder="w2")
    assert reporter.resume_due(now=FAR) == 1
    threads[0].join(timeout=10)
    assert [json.loads(r.body)["trackingId"] for r in receiver.reports] == ["new"]
    assert store.due_reports(FAR, 10) == []


def test_a_stopping_worker_hands_back_the_reports_it_waits_to_retry(store):
    receiver = ReportReceiver(statuses=[503]).start()
    try:
        tracking_id = ended_call(store)
        woken = threading.Event()
        waiting = threading.Event()

        def sleep(delay: float) -> None:
            waiting.set()
            woken.wait(timeout=30)

        stopping = CallReporter(store, receiver.url, SECRET, spawn=spawned([]), holder="w1", backoff_s=100.0,
                                lease_s=600.0, sleep=sleep)
        first = threading.Thread(target=lambda: results.append(stopping.deliver(tracking_id)))
        results: list = []
        first.start()
        assert waiting.wait(timeout=10)  # attempt 1 answered 503: held for the 75-100 s wait and the lease
        assert store.due_reports(time.time(), 10) == []
        assert stopping.hand_back_waiting() == 1  # SIGTERM
        assert store.due_reports(time.time(), 10) == [tracking_id]
        threads: list = []
        running = CallReporter(store, receiver.url, SECRET, spawn=spawned(threads), holder="w2")
        assert running.resume_due() == 1
        threads[0].join(timeout=10)
        woken.set()  # the stopping worker wakes before it exits: the report is no longer its own
        first.join(timeout=10)
        assert [r.headers["x-callweaver-attempt"] for r in receiver.reports] == ["2"]
        assert not results[0].delivered and store.due_reports(FAR, 10) == []
    finally:
        receiver.stop()


# -- on the real server: a deploy's SIGTERM while a report waits to retry -------------------------------------------

def test_gunicorn_stopped_by_sigterm_while_a_report_waits_then_started_again_delivers_it(
        tmp_path, fake_twilio):
    from callweaver.simulate import RelayCaller
    from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
    from tests.fakes.live_server import LiveServer
    from tests.helpers import make_call_body
    receiver = ReportReceiver(statuses=[503] * 50).start()
    env = {**base_env(tmp_path, fake_twilio), "CALL_REPORT_URL": receiver.url, "CALL_REPORT_SECRET": SECRET,
           "CALL_REPORT_BACKOFF_S": "60", "CALL_REPORT_LEASE_S": "60", "CALL_REPORT_SWEEP_S": "60"}
    env.pop("PUBLIC_BASE_URL")
    try:
        first = LiveServer(env, workers=1).start()
        try:
            caller = RelayCaller(first.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
            caller.place_call(make_call_body())
            assert caller.status("no-answer", 1).status == 200
            assert receiver.request_started.wait(timeout=20)  # attempt 1: 503; the next is 45-60 s away
            time.sleep(0.5)
        finally:
            first.stop()  # SIGTERM, as Render's deploy sends
        receiver.statuses.clear()
        with LiveServer(env, workers=1):  # its worker's first sweep, at start, resumes it
            (report,) = receiver.wait_for(1, timeout_s=20)
    finally:
        receiver.stop()
    assert report.headers["x-callweaver-delivery"] == caller.tracking_id
    assert report.headers["x-callweaver-attempt"] == "2"
    assert json.loads(report.body)["outcome"] == "no_answer"


# -- review: defects found on a-outbox -------------------------------------------------------------------------------

def test_a_call_seen_ending_twice_is_not_reported_again_once_delivered(store, receiver):
    """Two terminal callbacks of one call, each read before the other wrote (two workers), both see the call end and
    both call `call_ended`. The report was due once (the write that ended the call); the second worker's first hold
    recorded it anew when the first worker had already delivered it, and the receiver got it twice, no crash."""
    store.create_call(CallRecord(tracking_id="call_1", status="in-progress"))
    store.append_status("call_1", "completed", 5, {}, report_holder="w1", report_lease_s=60.0)
    threads: list = []
    first = CallReporter(store, receiver.url, SECRET, spawn=spawned(threads), holder="w1")
    second = CallReporter(store, receiver.url, SECRET, spawn=spawned(threads), holder="w2")
    first.call_ended("call_1")
    threads[0].join(timeout=10)
    assert len(receiver.reports) == 1
    second.call_ended("call_1")  # the other worker's callback (stale read) saw the same end
    threads[1].join(timeout=10)
    assert len(receiver.reports) == 1
    assert store.due_reports(FAR, 10) == []


def test_redis_an_attempt_whose_claim_reply_was_lost_is_counted_once(redis_server):
    """redis-py sends a script once more when its connection fails before the reply (RECONNECT_ON): the claim that
    counts an attempt ran twice, so a report lost an attempt (given up one early) for every lost reply."""
    from callweaver.store.redis import RedisStore
    from tests.fakes.loopback import ReplyLosingProxy
    proxy = ReplyLosingProxy(redis_server.port)
    store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    try:
        ended_call(store)
        assert store.claim_report("call_1", "w1", 60.0, create=True).attempts == 0  # the script is loaded
        proxy.lose_after = b"EVALSHA"
        claim = store.claim_report("call_1", "w1", 60.0, attempt=True)
        assert proxy.lost == 1
        assert claim is not None and claim.attempts == 1
        assert store.claim_report("call_1", "w1", 60.0).attempts == 1
    finally:
        store.close()
        proxy.stop()


def test_a_report_beyond_the_pending_cap_stays_due_for_a_later_sweep(store, receiver, monkeypatch):
    """With the outbox, a worker whose pending reports are full need not lose one more: it was dropped and removed
    from the store, never sent, though a sweep (this worker's once there is room, or another's) could take it."""
    import callweaver.call_report as call_report
    monkeypatch.setattr(call_report, "MAX_PENDING_REPORTS", 0)
    store.create_call(CallRecord(tracking_id="call_1", status="in-progress"))
    store.append_status("call_1", "completed", 5, {}, report_holder="w1", report_lease_s=0.0)
    full = CallReporter(store, receiver.url, SECRET, spawn=spawned([]), holder="w1")
    assert full.call_ended("call_1") is None
    monkeypatch.setattr(call_report, "MAX_PENDING_REPORTS", 1000)
    threads: list = []
    other = CallReporter(store, receiver.url, SECRET, spawn=spawned(threads), holder="w2")
    assert other.resume_due(now=FAR) == 1
    threads[0].join(timeout=10)
    assert len(receiver.reports) == 1


def test_a_stopping_worker_takes_no_report_over_and_hands_back_one_it_fails_to_deliver(store):
    """On a deploy every worker gets SIGTERM, and one with live calls runs on until graceful_timeout: its sweep went on
    taking over the reports the others had just handed back, and a failed attempt (its own in flight at SIGTERM, or
    one so taken) then held the report for the whole wait and the lease, past the worker's exit: the new workers
    could resume it only minutes later. A stopping worker now sweeps no more, and an attempt failing after SIGTERM
    leaves the report due at once."""
    down = ReportReceiver(statuses=[503] * 20).start()
    try:
        left = ended_call(store, "call_1")
        left_by_a_stopped_worker(store, left)  # handed back by a worker that stopped
        store.create_call(CallRecord(tracking_id="call_2", status="in-progress"))
        store.append_status("call_2", "completed", 5, {}, report_holder="w1", report_lease_s=600.0)
        waits: list[float] = []
        threads: list = []
        stopping = CallReporter(store, down.url, SECRET, spawn=spawned(threads), holder="w1", backoff_s=100.0,
                                lease_s=600.0, sleep=waits.append)
        assert stopping.hand_back_waiting() == 0  # SIGTERM: nothing waiting yet
        assert stopping.resume_due() == 0
        delivery = stopping.deliver("call_2", recorded=True)  # its first attempt, after SIGTERM: 503
        assert delivery.attempts == 1 and waits == []
        assert sorted(store.due_reports(time.time(), 10)) == ["call_1", "call_2"]
    finally:
        down.stop()


def test_the_sweep_logs_a_store_outage_once_not_every_interval():
    """While Redis is down every sweep failed and each logged an error line: with the default 30 s, two a minute per
    worker for the whole outage, on top of what /health and the call path already report. The first failure of an
    outage is logged, then one line every SWEEP_FAILURE_LOG_S while it lasts."""
    from structlog.testing import capture_logs

    from callweaver.store import StoreError

    class Down:
        def due_reports(self, now, limit):
            raise StoreError("redis store: ConnectionError: refused")

    reporter = CallReporter(Down(), "http://127.0.0.1:9/unused", SECRET, spawn=spawned([]), holder="w1")
    sweeps = []

    def sleep(seconds: float) -> None:
        sweeps.append(seconds)
        if len(sweeps) == 20:
            raise Stopped

    with capture_logs() as logs, contextlib.suppress(Stopped):
        reporter.run_sweeps(30.0, sleep)
    assert len(sweeps) == 20  # the loop went on
    assert [entry["event"] for entry in logs] == ["call_report_sweep_failed"]


SLOW_ATTEMPT = """
from gevent import monkey
monkey.patch_all()
import sys, time
import callweaver.call_report as call_report
from callweaver.store import CallRecord, build_store
call_report.ATTEMPT_HOLD_S = 1.0  # the attempt's share of the report's hold (20 s in production)
store = build_store(sys.argv[1])
store.create_call(CallRecord(tracking_id="call_1", status="completed"))
reporter = call_report.CallReporter(store, sys.argv[2], "report-secret-0123456789", spawn=None, max_attempts=1,
                                    lease_s=1.0)
started = time.monotonic()
delivery = reporter.deliver("call_1")
print(delivery.last_error, time.monotonic() - started)
"""


def test_an_attempt_a_receiver_answers_a_byte_at_a_time_ends_within_its_hold(tmp_path):
    """requests' timeout (10 s) bounds each socket operation, not the request: a receiver that sends its status line
    and headers a byte at a time kept the attempt open as long as it liked, past the report's hold (an attempt's 20 s
    and CALL_REPORT_LEASE_S), and another worker's sweep took the report over and sent it again while the first
    attempt still ran. Under gevent (production) the whole attempt is now bounded by its share of the hold, and
    counts as a timed-out attempt."""
    from tests.fakes.loopback import LoopbackServer, read_head

    class HeadersDripped(LoopbackServer):
        def handle(self, conn) -> None:
            with conn:
                if not read_head(conn)[0]:
                    return
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    for _ in range(75):  # 15 s of a header that never ends
                        time.sleep(0.2)
                        conn.sendall(b"x")
                except OSError:
                    return

    receiver = HeadersDripped()
    try:
        done = subprocess.run([sys.executable, "-c", SLOW_ATTEMPT, str(tmp_path / "cw.sqlite3"),
                               f"http://127.0.0.1:{receiver.port}/hook"], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
    finally:
        receiver.stop()
    error, elapsed = done.stdout.split()[-2:]
    assert error == "Timeout", done.stdout + done.stderr
    assert float(elapsed) < 10  # ended at its 1 s bound, not when the receiver stopped dripping (15 s)
