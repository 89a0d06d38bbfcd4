"""Hedged first tokens on the real gunicorn server: a slow (not failing) primary is raced by the next provider."""
from __future__ import annotations

import pytest

from callweaver.simulate import RelayCaller, http
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hedging")
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    primary, backup = FakeLLM("primary").start(), FakeLLM("backup").start()
    env = base_env(tmp, twilio, primary, backup)
    env.update(PUBLIC_BASE_URL="", LLM_HEDGE_AFTER_MS="100", CACHE_TYPE="NullCache")
    server = LiveServer(env, workers=1).start()
    yield {"server": server, "twilio": twilio, "primary": primary, "backup": backup}
    server.stop()
    for fake in (twilio, primary, backup):
        fake.stop()


def test_slow_primary_is_hedged_and_the_extra_request_is_counted(stack):
    primary, backup = stack["primary"], stack["backup"]
    primary.reset()
    backup.reset()
    primary.push(Reply(text="Primary, far too late.", ttft_s=0.9))
    backup.push(Reply(text="The backup answers first."))
    caller = RelayCaller(stack["server"].url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
    caller.place_call(make_call_body(workflow=None, globalPrompt="You answer questions."))
    caller.answer_placed(stack["twilio"].creates()[-1])
    caller.connect()
    reply = caller.say("Are you open on Sunday?")
    caller.hangup()
    assert reply.text == "The backup answers first."
    assert primary.wait_until(lambda: primary.requests and primary.requests[0].client_closed)  # loser cancelled
    data = http("GET", stack["server"].url + f"/api/performance-metrics/{caller.tracking_id}").json()
    turn = data["callData"]["turns"][-1]
    assert turn["hedgedRequests"] == 1 and turn["provider"] == "openai" and turn["failovers"] == []
    assert data["metrics"]["preemption"]["hedgedRequests"] == 1
    exposition = http("GET", stack["server"].url + "/metrics").text
    assert "callweaver_hedged_llm_requests_total 1.0" in exposition
