"""One instance, one memory: on the real gunicorn server with two workers (SQLite, no Redis), and with two instances
sharing one real redis-server, the reply cache, the prewarm markers and the circuit breakers describe the service,
not the worker a request happened to land on."""
from __future__ import annotations

import copy
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from callweaver.simulate import RelayCaller, http
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.fakes.redis_server import RedisServer
from tests.helpers import make_call_body
from tests.scripted_brain import real_estate_brain

CIRCUIT_FAILURES = 2
CACHE_PAIRS = 10


MODES = ["one_instance_two_workers_sqlite", "two_instances_two_workers_redis"]


@contextmanager
def running_service(tmp: Path, mode: str, **env_extra: str) -> Iterator[dict]:
    """Every server of the deployment under test (two gevent workers each), with its fakes."""
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    primary = FakeLLM("primary", ttft_s=0.02, token_interval_s=0.002).start()
    secondary = FakeLLM("secondary", ttft_s=0.02, token_interval_s=0.002).start()
    redis = RedisServer().start() if "redis" in mode else None
    servers: list[LiveServer] = []
    try:
        for index in range(2 if redis else 1):
            env = base_env(tmp / f"instance{index}", twilio, primary, secondary)
            env.pop("PUBLIC_BASE_URL")
            env.update(LLM_CIRCUIT_FAILURES=str(CIRCUIT_FAILURES), LLM_CIRCUIT_COOLDOWN_S="600",
                       REDIS_URL=redis.url if redis else "", RATE_LIMIT_MAKE_CALL="1000 per minute",
                       RATE_LIMIT_CHAT="1000 per minute", **env_extra)
            servers.append(LiveServer(env, workers=2).start())
            assert len(servers[-1].worker_pids()) == 2  # really two worker processes, not one
        yield {"servers": servers, "twilio": twilio, "primary": primary, "secondary": secondary}
    finally:
        for server in servers:
            server.stop()
        for fake in (twilio, primary, secondary):
            fake.stop()
        if redis is not None:
            redis.close()


@pytest.fixture(scope="module", params=MODES)
def service(request, tmp_path_factory):
    with running_service(tmp_path_factory.mktemp(request.param), request.param) as deployment:
        yield deployment


def fresh_flow_body(label: str) -> dict:
    """The real-estate flow with its prompt made unique, so its cache starts empty."""
    body = make_call_body()
    body["nodes"] = copy.deepcopy(body["nodes"])
    for node in body["nodes"]:
        if node.get("type") == "startNode":
            node["data"]["globalPrompt"] = node["data"].get("globalPrompt", "") + f" (flow {label})"
    body["globalPrompt"] = body["globalPrompt"] + f" (flow {label})"
    return body


def one_turn_call(service, server: LiveServer, body: dict, utterance: str) -> dict:
    """A whole short call: place, answer, open the relay socket, say one thing, hang up; the stored turn."""
    caller = RelayCaller(server.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
    caller.place_call(body)
    caller.answer_placed(service["twilio"].creates()[-1])
    caller.connect()
    heard = caller.say(utterance).text
    caller.hangup()
    turns = http("GET", f"{server.url}/api/performance-metrics/{caller.tracking_id}").json()["callData"]["turns"]
    assert len(turns) == 1, turns
    return {**turns[0], "heard": heard}


def test_second_of_two_identical_calls_is_answered_from_the_cache_every_time(service):
    service["primary"].responder = real_estate_brain
    servers = service["servers"]
    second_calls = []
    for pair in range(CACHE_PAIRS):
        body = fresh_flow_body(f"pair-{pair}")
        # With two instances the second call goes to the other one; with one, the kernel picks the worker.
        first = one_turn_call(service, servers[pair % len(servers)], body, "hello?")
        second = one_turn_call(service, servers[(pair + 1) % len(servers)], body, "hello?")
        assert first["cacheHit"] is False
        second_calls.append(second)
    missed = [i for i, turn in enumerate(second_calls) if not turn["cacheHit"]]
    assert missed == [], f"second calls of pairs {missed} missed the cache"
    assert all(turn["heard"] and turn["source"] == "cache" for turn in second_calls)


def every_worker(service) -> set[tuple[int, str]]:
    return {(i, str(pid)) for i, server in enumerate(service["servers"]) for pid in server.worker_pids()}


def test_failing_primary_gets_at_most_the_failure_count_from_the_whole_service(service):
    primary, secondary = service["primary"], service["secondary"]
    primary.fault = "500"
    before = len(primary.requests)
    servers = service["servers"]
    workers = every_worker(service)
    turns_by_worker: Counter = Counter()
    for turn in range(120):
        # Keep going until every worker of every instance has answered more turns than the failure count:
        # a breaker per worker would then have let the primary see CIRCUIT_FAILURES requests from each.
        index = turn % len(servers)
        resp = http("POST", servers[index].url + "/api/chat",
                    json_body={"messages": [{"role": "user", "content": f"hello {turn}"}]})
        assert resp.status == 200, resp.text
        assert resp.json()["provider"] == "openai"
        turns_by_worker[(index, resp.headers["X-CallWeaver-Worker"])] += 1
        if all(turns_by_worker[w] > CIRCUIT_FAILURES for w in workers):
            break
    assert set(turns_by_worker) == workers and all(turns_by_worker[w] > CIRCUIT_FAILURES for w in workers), \
        turns_by_worker
    assert len(primary.requests) - before == CIRCUIT_FAILURES

    # A live call on every instance skips the primary too, and /health on every worker reports the open circuit.
    for index, server in enumerate(servers):
        turn = one_turn_call(service, server, fresh_flow_body(f"outage-{index}"), "hello?")
        assert turn["provider"] == "openai" and turn["heard"]
    assert len(primary.requests) - before == CIRCUIT_FAILURES
    seen: set[tuple[int, str]] = set()
    for attempt in range(400):
        index = attempt % len(servers)
        resp = http("GET", servers[index].url + "/health")
        primary_health = resp.json()["checks"]["llm"]["providers"][0]
        assert primary_health["name"] == "azure"
        assert primary_health["state"] == "open" and primary_health["consecutiveFailures"] == CIRCUIT_FAILURES
        seen.add((index, resp.headers["X-CallWeaver-Worker"]))
        if seen == workers:
            break
    assert seen == workers
    assert len(secondary.requests) > 0


def wait_until_quiet(fake: FakeLLM, quiet_s: float = 1.0, limit_s: float = 20.0) -> int:
    """The fake's request count once no request has arrived for `quiet_s` (background prewarms are done)."""
    count, changed_at, started = len(fake.requests), time.monotonic(), time.monotonic()
    while time.monotonic() - changed_at < quiet_s and time.monotonic() - started < limit_s:
        time.sleep(0.05)
        if len(fake.requests) != count:
            count, changed_at = len(fake.requests), time.monotonic()
    return count


@pytest.mark.parametrize("mode", MODES)
def test_a_flow_is_prewarmed_once_however_many_workers_place_its_calls(tmp_path, mode):
    with running_service(tmp_path, mode, CACHE_PREWARM="1") as deployment:
        primary, servers = deployment["primary"], deployment["servers"]
        primary.responder = lambda body: Reply(text="This is Premier Properties. How can I help you today?")
        body = fresh_flow_body("prewarm")
        placed_by: Counter = Counter()
        resp = http("POST", servers[0].url + "/api/make-call-optimized", json_body=body)
        assert resp.status == 200, resp.text
        placed_by[(0, resp.headers["X-CallWeaver-Worker"])] += 1
        warmed = wait_until_quiet(primary)
        assert warmed >= 3  # the language's opening lines were generated once, while the first call rang

        workers = every_worker(deployment)
        for attempt in range(1, 80):  # more calls of the same flow until every worker has placed one
            index = attempt % len(servers)
            resp = http("POST", servers[index].url + "/api/make-call-optimized", json_body=body)
            assert resp.status == 200, resp.text
            placed_by[(index, resp.headers["X-CallWeaver-Worker"])] += 1
            if set(placed_by) == workers:
                break
        assert set(placed_by) == workers, placed_by
        assert wait_until_quiet(primary) == warmed
