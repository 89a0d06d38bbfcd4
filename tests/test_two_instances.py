"""Two instances (two apps) on one Redis: Twilio's webhooks for one call may land on either, and a retried
callback on the other one than the first delivery. What one instance recorded, the other sees, and a call's end
is acted on once across both."""
from __future__ import annotations

import threading
import time

import pytest

from callweaver import create_app
from tests.conftest import Signer, base_env
from tests.fakes.redis_server import RedisServer
from tests.fakes.report_receiver import ReportReceiver
from tests.helpers import make_call_body

SECRET = "report-secret-0123456789"


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def receiver():
    r = ReportReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def instances(tmp_path, fake_twilio, redis_server, receiver):
    """Two apps with their own disks (CALLWEAVER_DB, CACHE_DIR), sharing only REDIS_URL."""
    apps = []
    for name in ("a", "b"):
        env = {**base_env(tmp_path / name, fake_twilio), "REDIS_URL": redis_server.url,
               "CALL_REPORT_URL": receiver.url, "CALL_REPORT_SECRET": SECRET, "MAX_CALLS_PER_DAY": "3"}
        apps.append(create_app(env).test_client())
    return apps


def test_a_terminal_callback_delivered_to_both_instances_at_once_ends_the_call_once(instances, receiver):
    instance_a, instance_b = instances
    placed = instance_a.post("/api/make-call", json=make_call_body()).get_json()
    path = f"/api/call-status-optimized?trackingId={placed['trackingId']}"
    form = {"CallSid": placed["callSid"], "CallStatus": "completed", "SequenceNumber": "3", "CallDuration": "42"}
    answers: list[int] = []
    start = threading.Barrier(2)

    def deliver(client) -> None:
        start.wait()
        answers.append(Signer(client).post(path, form).status_code)

    threads = [threading.Thread(target=deliver, args=(client,)) for client in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert answers == [200, 200]
    assert len(receiver.wait_for(1)) == 1
    time.sleep(0.5)  # a second report would have been sent by now
    assert len(receiver.reports) == 1
    history = instance_b.application.extensions["callweaver"].store.status_history(placed["trackingId"])
    assert [(entry["status"], entry["sequence"]) for entry in history] == [("completed", 3)]


def test_the_calls_per_day_cap_counts_both_instances_calls(instances):
    instance_a, instance_b = instances
    answers = [client.post("/api/make-call", json=make_call_body()).status_code
               for client in (instance_a, instance_b, instance_a, instance_b)]
    assert answers == [200, 200, 200, 429]
