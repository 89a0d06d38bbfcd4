"""A deploy with live calls: Render sends SIGTERM to the old instance's gunicorn, and the real server (gevent
workers) must hand each live ConversationRelay call over at a clean point rather than be killed mid-sentence."""
from __future__ import annotations

import json
import signal
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
    twilio, llm = fakes
    env = base_env(tmp_path, twilio, llm)
    env.pop("PUBLIC_BASE_URL")
    env["GUNICORN_GRACEFUL_TIMEOUT"] = "20"
    old = LiveServer(env, workers=1, log_path=tmp_path / "old.log").start()
    try:
        caller = RelayCaller(old.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=10)
        caller.place_call(make_call_body())
        caller.answer(twilio.creates()[-1].one("Url"))
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
    store = build_store(env["CALLWEAVER_DB"])
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
