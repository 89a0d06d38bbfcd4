"""A worker whose event loop runs late (CPU-saturated) must not blame its LLM providers: a first-token deadline that
passes while the reply is already readable, or whose timer fired late because the loop was busy, is not the
provider's failure (its circuit breaker is not charged). A provider that is slow on an idle worker still fails over
and is charged exactly as before (tests/test_providers.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.fake_llm import FakeLLM, Reply

REPO_ROOT = Path(__file__).absolute().parents[1]

# The worker's loop is held (gevent's original time.sleep: the way CPU-bound greenlets hold it) from just after the
# turn sent its request until well past its first-token deadline.
LAGGING_WORKER = """
from gevent import monkey; monkey.patch_all()
import json, sys
sys.path.insert(0, sys.argv[3])
import gevent
import structlog
from callweaver.engine.providers import ChainSettings, ProviderChain
from callweaver.engine.vendors import ProviderConfig

hold_loop = monkey.get_original("time", "sleep")
chain = ProviderChain([ProviderConfig("primary", "openai", "k", "m", base_url=sys.argv[1]),
                       ProviderConfig("fallback", "openai", "k", "m", base_url=sys.argv[2])],
                      ChainSettings(first_token_timeout_s=1.0, stall_timeout_s=2.0, circuit_failures=1))
chain.warm_up()


def busy_worker():
    gevent.sleep(0.1)   # the turn has sent its request and waits for its first token
    hold_loop(2.0)      # every greenlet of the worker waits, the reply's bytes with them


with structlog.testing.capture_logs() as logs:
    turn = gevent.spawn(lambda: chain.complete([{"role": "user", "content": "hi"}]))
    gevent.spawn(busy_worker)
    reply = turn.get(timeout=30)
print(json.dumps({"text": reply.text, "provider": reply.provider, "failovers": reply.failovers,
                  "primary": chain.health()[0], "events": [e["event"] for e in logs]}))
"""


def run_lagging_worker(primary: FakeLLM, fallback: FakeLLM) -> dict:
    finished = subprocess.run([sys.executable, "-c", LAGGING_WORKER, primary.url, fallback.url, str(REPO_ROOT)],
                              capture_output=True, text=True, timeout=90)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_a_reply_readable_when_the_busy_worker_gets_to_it_is_read_and_the_provider_is_not_blamed():
    with FakeLLM("primary") as primary, FakeLLM("fallback") as fallback:
        primary.push(Reply(text="Primary here.", ttft_s=0.2, token_interval_s=0.01))
        fallback.push(Reply(text="Fallback here."))

        result = run_lagging_worker(primary, fallback)

        assert result["text"] == "Primary here." and result["provider"] == "primary"
        assert result["failovers"] == []
        assert result["primary"]["state"] == "closed" and result["primary"]["consecutiveFailures"] == 0
        assert "loop_lag" in result["events"]
        assert fallback.requests == []


@pytest.mark.parametrize("keepalive_interval_s", [None, 0.1])
def test_a_silent_provider_on_a_busy_worker_fails_over_without_opening_its_circuit(keepalive_interval_s):
    """No token came, so the turn cannot wait on it (keep-alive comments get one late read, not a longer deadline);
    but the deadline was noticed a second late: the worker's loop, not the provider, took that time, so the breaker
    every call shares is not charged."""
    with FakeLLM("primary") as primary, FakeLLM("fallback") as fallback:
        primary.push(Reply(fault="hang", keepalive_interval_s=keepalive_interval_s))
        fallback.push(Reply(text="Fallback here."))

        result = run_lagging_worker(primary, fallback)

        assert result["text"] == "Fallback here." and result["provider"] == "fallback"
        assert [f["reason"] for f in result["failovers"]] == ["timeout_first_token"]
        assert result["primary"]["state"] == "closed" and result["primary"]["consecutiveFailures"] == 0
        assert "loop_lag" in result["events"]
