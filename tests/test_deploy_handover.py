"""A deploy with live calls: Render sends SIGTERM to the old instance's gunicorn, and the real server (gevent
workers) must hand each live ConversationRelay call over at a clean point rather than be killed mid-sentence."""
from __future__ import annotations

import json
import signal
import time
import xml.etree.ElementTree as ET

import pytest

from callweaver.simulate import RelayCaller
from callweaver.store import build_store
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body


@pytest.fixture
def fakes():
    twilio, llm = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start(), FakeLLM("primary").start()
    yield twilio, llm
    twilio.stop()
    llm.stop()


def test_sigterm_mid_reply_finishes_the_reply_then_hands_the_call_over(tmp_path, fakes):
    from tests.fakes.redis_server import RedisServer

    twilio, llm = fakes
    redis = RedisServer().start()  # the state the old and the new instance share
    try:
        _sigterm_mid_reply(tmp_path, twilio, llm, redis.url)
    finally:
        redis.close()


def _sigterm_mid_reply(tmp_path, twilio, llm, redis_url: str) -> None:
    env = base_env(tmp_path, twilio, llm)
    env["REDIS_URL"] = redis_url
    env.pop("PUBLIC_BASE_URL")
    env["GUNICORN_GRACEFUL_TIMEOUT"] = "20"
    old = LiveServer(env, workers=1, log_path=tmp_path / "old.log").start()
    try:
        caller = RelayCaller(old.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=10)
        caller.place_call(make_call_body())
        caller.answer_placed(twilio.creates()[-1])
        caller.connect()
        words = " ".join(f"word{i}" for i in range(20)) + "."
        llm.push(Reply(text=words, ttft_s=0.05, token_interval_s=0.1))
        caller.prompt("Tell me more")
        first = caller.recv(timeout_s=5)
        assert first["type"] == "text"
        old.proc.send_signal(signal.SIGTERM)  # what Render does to the old instance on every deploy
        messages = [first]
        while (message := caller.recv(timeout_s=15)) is not None:
            messages.append(message)
            if message["type"] == "end":
                break
        spoken = "".join(m.get("token", "") for m in messages if m["type"] == "text")
        assert spoken == words, "the reply in flight is finished, not cut"
        end = messages[-1]
        assert end["type"] == "end", f"the call is handed over, not dropped: {messages[-3:]}"
        assert json.loads(end["handoffData"])["reason"] == "handover"
        assert end["unheard"] == "", "the handover waits until the reply has played"
        caller.hangup()
        old.proc.wait(timeout=15)  # well before GUNICORN_GRACEFUL_TIMEOUT: the worker exits once its calls are gone
        assert "Worker graceful timeout" not in old.logs()
    finally:
        old.stop()
    store = build_store("", redis_url)
    assert [turn["interrupted"] for turn in store.turns(caller.tracking_id)] == [False], \
        "the finished reply is committed before the worker goes"
    assert store.get_call(caller.tracking_id).messages[-1] == {"role": "assistant", "content": words}
    # Twilio then asks the action URL, which lands on the new instance (same store): it reconnects the call.
    new = LiveServer(env, workers=1, log_path=tmp_path / "new.log").start()
    try:
        caller.base_url = new.url
        caller.hooks.base_url = new.url
        caller.twiml = type(caller.twiml).parse(caller.twiml.xml.replace(old.url, new.url))
        resp = caller.connect_action("ended", json.loads(end["handoffData"]))
        relay = ET.fromstring(resp.text).find("Connect/ConversationRelay")
        assert relay is not None, resp.text
        assert relay.get("url").endswith(f"trackingId={caller.tracking_id}")
    finally:
        new.stop()


def _connect_action(twilio, path: str, call_sid: str, **params: str) -> ET.Element:
    return ET.fromstring(twilio.post(path, {"CallSid": call_sid, "SessionDuration": "42", **params})
                         .get_data(as_text=True))


def test_a_call_handed_over_on_every_deploy_keeps_its_reconnects_for_broken_sockets(client, twilio):
    """A handover is planned (a deploy), not a failure: a long call that lives through several deploys is still
    reconnected every time, and keeps its MAX_RESUMES reconnects for sockets that really broke."""
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    path = f"/api/connect-action?trackingId={data['optimization']['trackingId']}"
    for deploy in range(3):
        root = _connect_action(twilio, path, data["callSid"], SessionStatus="ended",
                               HandoffData=json.dumps({"reason": "handover"}))
        assert root.find("Connect/ConversationRelay") is not None, f"deploy {deploy + 1} dropped the call"
    for _ in range(2):  # MAX_RESUMES broken sockets are still reconnected
        assert _connect_action(twilio, path, data["callSid"], SessionStatus="failed").find("Connect") is not None
    root = _connect_action(twilio, path, data["callSid"], SessionStatus="failed")
    assert root.find("Connect") is None and root.find("Hangup") is not None


class _LiveSession:
    def __init__(self) -> None:
        self.told = False
        self.deadline: float | None = None

    def hand_over(self, deadline: float | None = None) -> None:
        self.told, self.deadline = True, deadline


@pytest.fixture(params=[False, True], ids=["sqlite", "redis"])
def worker_services(request, tmp_path, fake_twilio):
    """A worker's Services, with its store shared through Redis (param True) or in its own SQLite file."""
    from callweaver import create_app
    from tests.fakes.redis_server import RedisServer

    redis = RedisServer().start() if request.param else None
    try:
        env = base_env(tmp_path, fake_twilio)
        if redis is not None:
            env["REDIS_URL"] = redis.url
        yield create_app(env).extensions["callweaver"]
    finally:
        if redis is not None:
            redis.close()


def test_a_stopping_worker_hands_calls_over_only_through_a_store_other_instances_read(worker_services):
    """On Render a deploy starts the new instance on a fresh disk (and with a persistent disk only after the old one
    stopped): without Redis no other instance can read the call, so a handover could only end it with an apology.
    The call then keeps this worker until it ends or graceful_timeout runs out, as before handovers."""
    svc = worker_services
    shared = bool(svc.settings.redis_url)
    session = _LiveSession()
    svc.live_sessions.add(session)
    assert svc.hand_over_live_calls() == (1 if shared else 0)
    assert session.told is shared


def test_a_call_whose_socket_opens_just_after_sigterm_is_handed_over_too(worker_services):
    """gunicorn's gevent worker closes its listener only on its next loop: a socket accepted after the live calls
    were told to hand over is told as it is registered (with Redis; without it, no call is handed over)."""
    svc = worker_services
    shared = bool(svc.settings.redis_url)
    live = _LiveSession()
    svc.live_sessions.add(live)
    before = time.monotonic()
    svc.hand_over_live_calls(within_s=20.0)
    late = _LiveSession()
    svc.add_live_session(late)
    assert late in svc.live_sessions
    assert late.told is shared
    if shared:  # both `end`s go out by the same deadline, 20 s after the SIGTERM
        assert late.deadline == live.deadline and before + 20.0 <= live.deadline <= time.monotonic() + 20.0


class _SlowHandBack:
    """A call reporter whose hand-back is slow (a hung Redis: each claim waits out its socket timeout)."""

    def __init__(self, session: _LiveSession) -> None:
        self.session = session
        self.calls_told_first: bool | None = None

    def hand_back_waiting(self) -> int:
        self.calls_told_first = self.session.told
        return 0


def test_a_stopping_worker_tells_its_calls_before_handing_back_reports(worker_services, monkeypatch):
    """The calls' `end`s are bounded by graceful_timeout from the SIGTERM; handing the waiting reports back writes
    to the store once per report (up to the pending cap), so it must not delay them, nor push their deadline back."""
    import dataclasses

    svc = worker_services
    monkeypatch.setattr(svc, "settings", dataclasses.replace(svc.settings, call_report_url="http://127.0.0.1:9/r"))
    live = _LiveSession()
    svc.live_sessions.add(live)
    reporter = _SlowHandBack(live)
    monkeypatch.setattr(svc, "call_reporter", reporter)
    svc.hand_over_live_calls(within_s=20.0)
    assert reporter.calls_told_first is bool(svc.settings.redis_url)
