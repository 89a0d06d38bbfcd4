"""Tests for the LLM provider chain: failover, deadlines, continuation, circuit breakers, cancellation."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog

from callweaver.engine.continuation import CONTINUE_INSTRUCTION
from callweaver.engine.providers import ChainSettings, ProviderChain, build_provider_chain
from callweaver.engine.sse import parse_tool_calls as _parse_tool_calls
from callweaver.engine.vendors import ProviderConfig, parse_azure_endpoint
from tests.fakes.fake_llm import DEFAULT_REPLY_TEXT, FakeLLM, Reply, split_into_word_tokens

REPO_ROOT = Path(__file__).absolute().parents[1]
MESSAGES = [{"role": "system", "content": "You are a property dealer's assistant."},
            {"role": "user", "content": "Do you have flats in Kowloon?"}]
SIX_WORDS = "One two three four five six."
AZURE_KEY = "azure-secret-key-0123456789"
OPENAI_KEY = "sk-openai-secret-abcdef"
APOLOGY = "Sorry, I'm having trouble right now. Could you say that again?"
# Generous deadlines: a loaded 2-core CI box must never trip them by accident.
FIRST_TOKEN_TIMEOUT_S = 1.0


class FakeClock:
    """Drives the circuit breaker's cooldown without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def azure_fake():
    fake = FakeLLM("azure").start()
    yield fake
    fake.stop()


@pytest.fixture
def openai_fake():
    fake = FakeLLM("openai").start()
    yield fake
    fake.stop()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_chain(azure_fake, openai_fake, clock):
    chains: list[ProviderChain] = []

    def build(**overrides) -> ProviderChain:
        settings = ChainSettings(**{"first_token_timeout_s": FIRST_TOKEN_TIMEOUT_S, "stall_timeout_s": 2.0,
                                    "circuit_failures": 3, "circuit_cooldown_s": 30.0, **overrides})
        chain = ProviderChain(
            [ProviderConfig("azure", "azure", AZURE_KEY, "gpt4omini", azure_endpoint=azure_fake.root_url,
                            api_version="2025-01-01-preview"),
             ProviderConfig("openai", "openai", OPENAI_KEY, "gpt-4o-mini", base_url=openai_fake.url)],
            settings, clock=clock)
        chains.append(chain)
        return chain

    yield build
    for chain in chains:
        chain.close()


def test_streams_the_primary_reply_in_order_and_measures_its_ttft(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text="We have three flats in Kowloon.", ttft_s=0.3))

    reply = make_chain().stream(MESSAGES, temperature=0.4, max_tokens=120)
    tokens = list(reply)

    assert tokens == split_into_word_tokens("We have three flats in Kowloon.")
    assert reply.text == "We have three flats in Kowloon."
    assert reply.provider == "azure"
    assert reply.provider_ttft_ms is not None and 290 <= reply.provider_ttft_ms < FIRST_TOKEN_TIMEOUT_S * 1000
    assert reply.failovers == [] and reply.apology_used is False
    request = azure_fake.requests[0]
    assert request.path == "/openai/deployments/gpt4omini/chat/completions?api-version=2025-01-01-preview"
    assert request.headers["api-key"] == AZURE_KEY
    assert (request.messages, request.body["stream"]) == (MESSAGES, True)
    assert (request.body["temperature"], request.body["max_tokens"]) == (0.4, 120)
    assert openai_fake.requests == []


@pytest.mark.parametrize("fault, reason", [("500", "http_500"), ("429", "rate_limited")])
def test_primary_error_moves_the_same_turn_to_the_secondary(make_chain, azure_fake, openai_fake, fault, reason):
    azure_fake.push(Reply(fault=fault))
    openai_fake.push(Reply(text="Yes, two in Mong Kok."))

    reply = make_chain().stream(MESSAGES)

    assert "".join(reply) == "Yes, two in Mong Kok."
    assert reply.provider == "openai"
    assert reply.failovers == [{"provider": "azure", "reason": reason, "spoken_chars": 0}]
    assert openai_fake.requests[0].messages == MESSAGES
    assert openai_fake.requests[0].headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert openai_fake.requests[0].body["model"] == "gpt-4o-mini"


def test_silent_primary_is_abandoned_at_the_first_token_deadline(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(fault="hang"))
    openai_fake.push(Reply(text="Here I am."))

    started = time.monotonic()
    reply = make_chain().stream(MESSAGES)
    text = "".join(reply)
    elapsed_s = time.monotonic() - started

    assert text == "Here I am."
    assert reply.failovers == [{"provider": "azure", "reason": "timeout_first_token", "spoken_chars": 0}]
    assert FIRST_TOKEN_TIMEOUT_S * 0.9 <= elapsed_s < FIRST_TOKEN_TIMEOUT_S + 5
    assert azure_fake.wait_until(lambda: azure_fake.requests[0].client_closed, timeout_s=5)


def test_keepalive_comments_do_not_extend_the_first_token_deadline(make_chain, azure_fake, openai_fake):
    # Comments every 100 ms would keep a per-read timeout alive for the whole 60 s hang.
    azure_fake.push(Reply(fault="hang", keepalive_interval_s=0.1))
    openai_fake.push(Reply(text="Here I am."))

    started = time.monotonic()
    chain = make_chain()
    reply = chain.stream(MESSAGES)
    text = "".join(reply)

    assert text == "Here I am."
    assert reply.failovers[0]["reason"] == "timeout_first_token"
    assert time.monotonic() - started < FIRST_TOKEN_TIMEOUT_S + 5
    # a responsive worker noticed the deadline on time: the provider's failure, charged (not loop_lag's exemption)
    assert chain.health()[0]["consecutiveFailures"] == 1


def test_slow_but_steady_stream_within_the_stall_limit_is_not_abandoned(make_chain, azure_fake, openai_fake):
    # 1.4 s between tokens: longer than the first-token deadline, shorter than the stall limit.
    azure_fake.push(Reply(text="Slow and steady.", token_interval_s=1.4))

    reply = make_chain(stall_timeout_s=4.0).stream(MESSAGES)

    assert "".join(reply) == "Slow and steady."
    assert reply.failovers == [] and openai_fake.requests == []


def test_reply_dropped_mid_stream_continues_on_the_secondary_from_what_was_spoken(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text=SIX_WORDS, fault="drop", drop_after_tokens=3))
    openai_fake.push(Reply(text=" four five six."))

    reply = make_chain().stream(MESSAGES)
    tokens = list(reply)

    assert "".join(tokens) == SIX_WORDS == reply.text
    assert tokens[:3] == ["One", " two", " three"]
    assert reply.provider == "openai"
    assert reply.provider_ttft_ms is not None
    assert reply.failovers == [{"provider": "azure", "reason": "dropped", "spoken_chars": len("One two three")}]
    continuation_request = openai_fake.requests[0].messages
    assert continuation_request[:len(MESSAGES)] == MESSAGES
    assert continuation_request[len(MESSAGES)] == {"role": "assistant", "content": "One two three"}
    assert continuation_request[len(MESSAGES) + 1] == {"role": "system", "content": CONTINUE_INSTRUCTION}


def test_a_continued_reply_records_no_first_token_time_for_the_provider_that_continued(make_chain, azure_fake,
                                                                                       openai_fake):
    """The turn's first token came from the primary: its time was recorded as the secondary's, skewing the
    secondary's p95 hedge budget (review of issue 12r)."""
    azure_fake.push(Reply(text=SIX_WORDS, fault="drop", drop_after_tokens=3))
    openai_fake.push(Reply(text=" four five six."))

    chain = make_chain()
    assert "".join(chain.stream(MESSAGES)) == SIX_WORDS
    assert "openai" not in chain._recent_ttft_ms


@pytest.mark.parametrize("continuation", [
    SIX_WORDS,                     # the model restarted the whole reply
    "three four five six.",        # it repeated the last word
    "two three four five six.",    # it repeated the last words
    "Three. Four five six.",       # ... with different case and punctuation
    "four five six.",              # it continued without a leading space
])
def test_continuation_never_repeats_what_the_caller_already_heard(make_chain, azure_fake, openai_fake, continuation):
    azure_fake.push(Reply(text=SIX_WORDS, fault="drop", drop_after_tokens=3))
    openai_fake.push(Reply(text=continuation))

    reply = make_chain().stream(MESSAGES)
    text = "".join(reply)

    assert text.lower().replace(".", "") == "one two three four five six"
    assert text.startswith("One two three ")


def test_stream_that_stalls_after_its_first_token_continues_on_the_secondary(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text=SIX_WORDS, token_interval_s=30.0))
    openai_fake.push(Reply(text=" two three four five six."))

    started = time.monotonic()
    reply = make_chain(stall_timeout_s=1.0).stream(MESSAGES)
    text = "".join(reply)

    assert text == SIX_WORDS
    assert reply.failovers == [{"provider": "azure", "reason": "stalled", "spoken_chars": len("One")}]
    assert time.monotonic() - started < 10
    assert azure_fake.wait_until(lambda: azure_fake.requests[0].client_closed, timeout_s=5)


def test_unreachable_primary_fails_over_as_a_connect_error(openai_fake):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    chain = ProviderChain([
        ProviderConfig("dead", "openai", "k", "m", base_url=f"http://127.0.0.1:{dead_port}/v1"),
        ProviderConfig("openai", "openai", OPENAI_KEY, "gpt-4o-mini", base_url=openai_fake.url),
    ], ChainSettings(first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S))

    reply = chain.stream(MESSAGES)

    assert "".join(reply) == DEFAULT_REPLY_TEXT
    assert reply.provider == "openai"
    assert reply.failovers == [{"provider": "dead", "reason": "connect", "spoken_chars": 0}]
    chain.close()


def test_circuit_opens_after_consecutive_failures_and_the_primary_is_skipped(make_chain, azure_fake, openai_fake):
    chain = make_chain(circuit_failures=2)
    azure_fake.fault = "500"
    for _ in range(2):
        assert make_and_finish(chain).provider == "openai"
    assert len(azure_fake.requests) == 2

    reply = make_and_finish(chain)

    assert reply.provider == "openai"
    assert reply.failovers == []  # skipped, not tried
    assert len(azure_fake.requests) == 2
    assert chain.health()[0]["state"] == "open"
    assert chain.health()[0]["consecutiveFailures"] == 2


@pytest.mark.parametrize("hedged", [False, True])
def test_a_refused_request_fails_over_without_charging_the_providers_circuit(make_chain, azure_fake, openai_fake,
                                                                             hedged):
    """A 400 is the provider's verdict on one request (Azure's content filter on what a caller said, a parameter a
    make-call body chose), not on its health. Every provider's breaker is shared by all calls, so three refused
    turns of one call (or one hostile caller) opened it and every other call lost that provider for the cooldown.
    The turn still fails over; the breaker is not charged (found by the outbound audit)."""
    chain = make_chain(circuit_failures=2, **({"hedge_after_s": 0.0} if hedged else {}))
    azure_fake.fault = "400"
    openai_fake.ttft_s = 0.3 if hedged else 0.0  # hedged: Azure's refusal comes first, while both are asked
    for _ in range(4):
        reply = make_and_finish(chain)
        assert reply.provider == "openai" and [f["reason"] for f in reply.failovers] == ["http_400"]
    assert len(azure_fake.requests) == 4  # never skipped
    assert chain.health()[0]["state"] == "closed" and chain.health()[0]["consecutiveFailures"] == 0


@pytest.mark.parametrize("fault", ["400-api-version", "400-unsupported-parameter"])
def test_a_provider_refusing_every_request_still_opens_its_circuit(make_chain, azure_fake, openai_fake, fault):
    """Not every 400 is about one request: Azure answers a wrong AZURE_OPENAI_API_VERSION with 400 BadRequest "API
    version not supported", and a model that takes no `max_tokens` refuses every turn with `unsupported_parameter`.
    With no 400 charged, such a provider stayed first in the chain for good: every turn of every call paid its round
    trip before failing over, and /health called it healthy. Its error code tells it apart from a refusal of one
    request (a content filter, a prompt too long), which still charges nothing (found by the outbound review)."""
    chain = make_chain(circuit_failures=2)
    azure_fake.fault = fault
    for _ in range(2):
        reply = make_and_finish(chain)
        assert reply.provider == "openai" and [f["reason"] for f in reply.failovers] == ["http_400"]
    assert make_and_finish(chain).failovers == []  # skipped, not tried
    assert len(azure_fake.requests) == 2
    assert chain.health()[0]["state"] == "open"

def test_half_open_probe_after_cooldown_closes_the_circuit_on_success(make_chain, azure_fake, openai_fake, clock):
    chain = make_chain(circuit_failures=2, circuit_cooldown_s=30.0)
    azure_fake.fault = "500"
    make_and_finish(chain), make_and_finish(chain)
    azure_fake.fault = None
    clock.now += 29.0
    assert make_and_finish(chain).provider == "openai" and len(azure_fake.requests) == 2  # still cooling down

    clock.now += 2.0
    assert chain.health()[0]["state"] == "half_open"
    reply = make_and_finish(chain)

    assert reply.provider == "azure"
    assert len(azure_fake.requests) == 3
    assert chain.health()[0] | {"openedAt": None} == {
        "name": "azure", "kind": "azure", "model": "gpt4omini", "state": "closed",
        "consecutiveFailures": 0, "openedAt": None}
    assert chain.health()[0]["openedAt"] is None


def test_failed_half_open_probe_reopens_the_circuit(make_chain, azure_fake, openai_fake, clock):
    chain = make_chain(circuit_failures=2, circuit_cooldown_s=30.0)
    azure_fake.fault = "500"
    make_and_finish(chain), make_and_finish(chain)
    first_opened_at = chain.health()[0]["openedAt"]
    clock.now += 31.0

    probe = make_and_finish(chain)  # one real request to the primary, which fails again
    skipped = make_and_finish(chain)

    assert probe.failovers == [{"provider": "azure", "reason": "http_500", "spoken_chars": 0}]
    assert skipped.failovers == []
    assert len(azure_fake.requests) == 3
    assert chain.health()[0]["state"] == "open"
    assert chain.health()[0]["openedAt"] >= first_opened_at


def test_health_reports_every_provider_without_secrets(make_chain, azure_fake):
    chain = make_chain()

    health = chain.health()

    assert [entry["name"] for entry in health] == chain.names == ["azure", "openai"]
    assert health[1] == {"name": "openai", "kind": "openai", "model": "gpt-4o-mini", "state": "closed",
                         "consecutiveFailures": 0, "openedAt": None}
    rendered = json.dumps(health) + repr(chain._providers[0].config)
    assert AZURE_KEY not in rendered and OPENAI_KEY not in rendered


def test_every_provider_down_yields_the_apology_and_never_raises(make_chain, azure_fake, openai_fake):
    azure_fake.fault = "500"
    openai_fake.fault = "429"

    reply = make_chain().stream(MESSAGES, apology="Lo siento, un momento.")
    tokens = list(reply)

    assert tokens == ["Lo siento, un momento."]
    assert reply.apology_used is True and reply.provider is None
    assert [f["reason"] for f in reply.failovers] == ["http_500", "rate_limited"]


def test_all_circuits_open_yields_the_apology_without_calling_anyone(make_chain, azure_fake, openai_fake):
    chain = make_chain(circuit_failures=1)
    azure_fake.fault = openai_fake.fault = "500"
    make_and_finish(chain)
    requests_before = (len(azure_fake.requests), len(openai_fake.requests))

    reply = make_and_finish(chain)

    assert reply.text == APOLOGY and reply.apology_used
    assert (len(azure_fake.requests), len(openai_fake.requests)) == requests_before == (1, 1)


def test_failure_after_text_ends_with_the_apology_after_a_space(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text=SIX_WORDS, fault="drop", drop_after_tokens=2))
    openai_fake.fault = "500"

    reply = make_and_finish(make_chain())

    assert reply.text == "One two " + APOLOGY
    assert reply.apology_used


def test_close_mid_stream_closes_the_upstream_response(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text="a b c d e f g h i j", token_interval_s=0.2))
    reply = make_chain().stream(MESSAGES)
    tokens = iter(reply)

    assert [next(tokens), next(tokens)] == ["a", " b"]
    reply.close()

    assert azure_fake.wait_until(lambda: azure_fake.requests[0].client_closed, timeout_s=5)
    assert not azure_fake.requests[0].finished
    assert list(reply) == []
    assert reply.text == "a b" and reply.failovers == [] and not reply.apology_used
    assert openai_fake.requests == []


def test_close_from_another_thread_wakes_a_blocked_reader(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text="a b c d", token_interval_s=30.0))
    reply = make_chain(stall_timeout_s=60.0).stream(MESSAGES)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.extend(reply), daemon=True)
    reader.start()
    assert azure_fake.wait_until(lambda: received == ["a"], timeout_s=5)

    reply.close()  # the reader is blocked waiting ~30 s for " b"
    reader.join(timeout=10)

    assert not reader.is_alive()
    assert received == ["a"]
    assert azure_fake.wait_until(lambda: azure_fake.requests[0].client_closed, timeout_s=5)
    assert openai_fake.requests == [] and not reply.apology_used


def test_close_while_waiting_for_the_first_token_cancels_without_failover(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(fault="hang"))
    reply = make_chain().stream(MESSAGES)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.extend(reply), daemon=True)
    reader.start()
    azure_fake.wait_for_requests(1)

    reply.close()
    reader.join(timeout=10)

    assert not reader.is_alive()
    assert received == [] and reply.failovers == [] and not reply.apology_used
    assert openai_fake.requests == []
    assert azure_fake.wait_until(lambda: azure_fake.requests[0].client_closed, timeout_s=5)


def test_consumer_that_stops_and_drops_the_stream_closes_the_response(make_chain, azure_fake):
    azure_fake.push(Reply(text="a b c d e f g h", token_interval_s=0.2))
    chain = make_chain()

    def hear_two_words() -> None:
        for index, _token in enumerate(chain.stream(MESSAGES)):
            if index == 1:
                break

    hear_two_words()

    assert azure_fake.wait_until(lambda: azure_fake.requests[0].client_closed, timeout_s=5)


def test_tool_calls_come_through_alongside_the_text(make_chain, azure_fake):
    tools = [{"type": "function", "function": {"name": "goto_node", "parameters": {"type": "object"}}}]
    azure_fake.push(Reply(text="Let me check prices.",
                          tool_calls=[("goto_node", {"node": "pricing"}), ("set_variable", {"budget": 500000})]))

    reply = make_chain().stream(MESSAGES, tools=tools)

    assert "".join(reply) == "Let me check prices."
    assert reply.tool_calls == [("goto_node", {"node": "pricing"}), ("set_variable", {"budget": 500000})]
    assert azure_fake.requests[0].body["tools"] == tools


def test_tool_call_without_text_counts_as_an_answer(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text="", tool_calls=[("end_call", {})]))

    reply = make_and_finish(make_chain())

    assert reply.text == "" and reply.tool_calls == [("end_call", {})]
    assert reply.provider == "azure" and reply.failovers == [] and openai_fake.requests == []


def test_tool_calls_with_unparseable_arguments_are_skipped():
    parts = {0: {"name": "good", "arguments": ['{"a":', ' 1}']}, 1: {"name": "bad", "arguments": ['{"a": ']}}

    assert _parse_tool_calls("azure", parts) == [("good", {"a": 1})]


def test_a_workflows_model_applies_to_its_own_openai_account_only(make_chain, azure_fake, openai_fake):
    """The server's providers run their configured model and deployment whatever a flow asks for (a public request
    must not choose what the operator's key pays for); a call's own OpenAI account runs the flow's choice."""
    chain = make_chain()
    make_and_finish(chain, model="gpt-4.1-mini")
    azure_fake.fault = "500"
    make_and_finish(chain, model="gpt-4.1-mini")

    assert "/deployments/gpt4omini/" in azure_fake.requests[0].path
    assert openai_fake.requests[0].body["model"] == "gpt-4o-mini"
    own = chain.with_first(ProviderConfig("workflow-openai", "openai", OPENAI_KEY, "gpt-4o-mini",
                                          base_url=openai_fake.url, request_account=True))
    assert make_and_finish(own, model="gpt-4.1-mini").provider == "workflow-openai"
    assert openai_fake.requests[1].body["model"] == "gpt-4.1-mini"


def test_complete_runs_the_whole_turn(make_chain, azure_fake):
    azure_fake.push(Reply(text="Done."))

    reply = make_chain().complete(MESSAGES)

    assert (reply.text, reply.provider) == ("Done.", "azure")


def test_nothing_is_sent_until_the_stream_is_iterated(make_chain, azure_fake):
    make_chain().stream(MESSAGES)

    time.sleep(0.2)
    assert azure_fake.requests == []


def test_api_keys_never_reach_the_logs(make_chain, azure_fake, openai_fake):
    azure_fake.fault = "500"
    openai_fake.fault = "hang"
    with structlog.testing.capture_logs() as logs:
        make_and_finish(make_chain())

    rendered = repr(logs)
    assert any(entry["event"] == "provider_failover" for entry in logs)
    assert AZURE_KEY not in rendered and OPENAI_KEY not in rendered


def test_parse_azure_endpoint_accepts_the_full_chat_completions_url():
    url = "https://my-res.openai.azure.com/openai/deployments/gpt4omini/chat/completions?api-version=2025-01-01-preview"

    assert parse_azure_endpoint(url) == ("https://my-res.openai.azure.com", "gpt4omini", "2025-01-01-preview")


@pytest.mark.parametrize("url", ["https://my-res.openai.azure.com", "https://my-res.openai.azure.com/",
                                 "my-res.openai.azure.com"])
def test_parse_azure_endpoint_accepts_a_plain_resource_url(url):
    assert parse_azure_endpoint(url) == ("https://my-res.openai.azure.com", None, None)


@pytest.mark.parametrize("url", [
    "https://gw.example.com/team-a/openai/deployments/gpt4omini/chat/completions?api-version=2024-10-21",
    "https://gw.example.com/team-a/", "https://gw.example.com/team-a/openai"])
def test_parse_azure_endpoint_keeps_a_gateways_path_before_openai(url):
    """An Azure endpoint behind a gateway (API Management) has a path before /openai/; the SDK keeps an
    azure_endpoint's path, and dropping it sent every request to a URL the gateway does not serve."""
    resource, _deployment, _version = parse_azure_endpoint(url)
    assert resource == "https://gw.example.com/team-a"


def test_build_provider_chain_uses_the_full_azure_url_and_a_keyless_self_hosted_server(azure_fake, openai_fake):
    settings = SimpleNamespace(
        llm_providers=("azure", "openai"), azure_openai_api_key=AZURE_KEY,
        azure_openai_endpoint=azure_fake.azure_full_endpoint("prod-dep", "2024-10-21"),
        azure_openai_deployment=None, azure_openai_api_version="2025-01-01-preview",
        openai_api_key=None, openai_base_url=openai_fake.url, openai_model="llama-3",
        llm_first_token_timeout_s=1.0, llm_connect_timeout_s=2.0, llm_stall_timeout_s=3.0,
        llm_circuit_failures=3, llm_circuit_cooldown_s=30.0)
    chain = build_provider_chain(settings)
    azure_fake.fault = "500"

    reply = make_and_finish(chain)

    assert chain.names == ["azure", "openai"]
    assert azure_fake.requests[0].path == "/openai/deployments/prod-dep/chat/completions?api-version=2024-10-21"
    assert azure_fake.requests[0].headers["api-key"] == AZURE_KEY
    assert reply.provider == "openai"
    assert openai_fake.requests[0].headers["authorization"] == "Bearer not-needed"
    assert openai_fake.requests[0].body["model"] == "llama-3"
    chain.close()


def test_build_provider_chain_leaves_out_unconfigured_providers_with_a_warning():
    settings = SimpleNamespace(
        llm_providers=("openai", "azure"), azure_openai_api_key="", azure_openai_endpoint=None,
        azure_openai_deployment=None, azure_openai_api_version="2025-01-01-preview",
        openai_api_key="sk-x", openai_base_url=None, openai_model="gpt-4o-mini",
        llm_first_token_timeout_s=1.5, llm_connect_timeout_s=2.0, llm_stall_timeout_s=5.0,
        llm_circuit_failures=3, llm_circuit_cooldown_s=30.0)

    with structlog.testing.capture_logs() as logs:
        chain = build_provider_chain(settings)

    assert chain.names == ["openai"]
    assert any(entry["event"] == "llm_provider_not_configured" and entry["provider"] == "azure" for entry in logs)


GEVENT_SCRIPT = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import gevent
    from callweaver.engine.providers import ProviderChain
    from callweaver.engine.vendors import ProviderConfig

    chain = ProviderChain([ProviderConfig("openai", "openai", "k", "m", base_url=sys.argv[1])])
    heard = []

    def speak():
        for token in chain.stream([{"role": "user", "content": "hi"}]):
            heard.append(token)

    speaker = gevent.spawn(speak)
    with gevent.Timeout(10):
        while len(heard) < 2:
            gevent.sleep(0.01)
    speaker.kill(block=True, timeout=5)   # barge-in: kill the reply greenlet
    turns = [gevent.spawn(lambda: chain.complete([{"role": "user", "content": "x"}]).text) for _ in range(30)]
    gevent.joinall(turns, timeout=30)
    print(json.dumps({"heard": heard, "killed": speaker.dead, "texts": sorted({t.value for t in turns})}))
""")


def test_under_gevent_killing_the_reply_greenlet_closes_the_upstream_response():
    with FakeLLM("gevent") as fake:
        fake.push(Reply(text="a b c d e f g h i j", token_interval_s=0.3))
        fake.responder = lambda body: Reply(text="Concurrent turn.", ttft_s=0.2)

        finished = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT, fake.url, str(REPO_ROOT)],
                                  capture_output=True, text=True, timeout=90)

        assert finished.returncode == 0, finished.stderr[-3000:]
        result = json.loads(finished.stdout.strip().splitlines()[-1])
        assert result == {"heard": ["a", " b"], "killed": True, "texts": ["Concurrent turn."]}
        assert fake.wait_until(lambda: fake.requests[0].client_closed, timeout_s=5)
        assert fake.requests[0].tokens_sent < 10
        assert len(fake.requests) == 31


def make_and_finish(chain: ProviderChain, **options):
    """One whole turn with the default conversation."""
    return chain.complete(MESSAGES, **options)


def test_consecutive_turns_reuse_one_upstream_connection(make_chain, azure_fake):
    """Reading past `[DONE]` to the body's end keeps the connection pooled: no new TCP/TLS handshake per turn."""
    chain = make_chain()
    for _ in range(3):
        azure_fake.push(Reply(text="Pooled reply."))
        assert "".join(chain.stream(MESSAGES)) == "Pooled reply."
    assert len(azure_fake.requests) == 3
    assert azure_fake.connections_opened == 1


# ---- hedged first tokens (LLM_HEDGE_AFTER_MS) ---------------------------------------------------------------

def test_hedge_is_off_by_default_a_slow_primary_is_waited_for(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text="Slow but fine.", ttft_s=0.4))
    reply = make_chain().stream(MESSAGES)
    assert "".join(reply) == "Slow but fine." and reply.provider == "azure"
    assert reply.hedged_requests == 0 and openai_fake.requests == []


def test_slow_primary_is_hedged_and_the_first_to_answer_wins(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text="Primary, late.", ttft_s=0.9))
    openai_fake.push(Reply(text="Backup answers first.", ttft_s=0.0))
    reply = make_chain(hedge_after_s=0.1).stream(MESSAGES)
    assert "".join(reply) == "Backup answers first."
    assert reply.text == "Backup answers first." and reply.provider == "openai"
    assert reply.hedged_requests == 1 and reply.failovers == []
    assert openai_fake.requests[0].messages == MESSAGES
    assert azure_fake.wait_until(lambda: azure_fake.requests[0].client_closed)  # the loser was cancelled


def test_primary_that_answers_within_the_budget_is_not_hedged(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text="On time.", ttft_s=0.0))
    reply = make_chain(hedge_after_s=0.5).stream(MESSAGES)
    assert "".join(reply) == "On time." and reply.hedged_requests == 0 and openai_fake.requests == []


def test_hedged_race_where_the_primary_still_wins_cancels_the_backup(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text="Primary first after all.", ttft_s=0.25))
    openai_fake.push(Reply(text="Backup too slow.", ttft_s=1.0))
    reply = make_chain(hedge_after_s=0.1).stream(MESSAGES)
    assert "".join(reply) == "Primary first after all." and reply.provider == "azure"
    assert reply.hedged_requests == 1
    assert openai_fake.wait_until(lambda: openai_fake.requests and openai_fake.requests[0].client_closed)


def test_both_hedged_providers_failing_yields_the_apology(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(fault="hang"))
    openai_fake.push(Reply(fault="500"))
    reply = make_chain(hedge_after_s=0.05).stream(MESSAGES)
    text = "".join(reply)
    assert reply.apology_used and text == reply.text
    assert {f["provider"] for f in reply.failovers} == {"azure", "openai"} and reply.hedged_requests == 1


def test_primary_failing_before_the_hedge_fails_over_as_usual(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(fault="500"))
    openai_fake.push(Reply(text="Backup as plain failover."))
    reply = make_chain(hedge_after_s=0.5).stream(MESSAGES)
    assert "".join(reply) == "Backup as plain failover." and reply.hedged_requests == 0
    assert reply.failovers == [{"provider": "azure", "reason": "http_500", "spoken_chars": 0}]


def test_p95_budget_waits_for_enough_samples_of_the_providers_own_ttft(make_chain, azure_fake, openai_fake):
    chain = make_chain(hedge_after_s="p95")
    primary = chain._providers[0]
    assert chain.hedge_budget_s(primary) is None  # no samples yet: never hedge on a guess
    for ttft in range(1, 21):
        chain.note_first_token("azure", float(ttft * 10))
    assert chain.hedge_budget_s(primary) == 0.19  # nearest-rank p95 of 10..200 ms


def test_a_reply_that_finished_before_its_connection_broke_is_not_failed_over(openai_fake):
    """The provider sent the whole reply and its finish_reason, then the connection broke before `data: [DONE]`:
    the reply is complete. It used to count as a dropped stream: a circuit failure, and the next provider asked to
    continue a finished reply (or the apology appended to it when none answered)."""
    from tests.test_llm_http import ScriptedServer

    events = [b'data: {"choices":[{"index":0,"delta":{"content":"All done."}}]}\n\n',
              b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n']
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)  # no terminating chunk
    server = ScriptedServer([[head + body, None]])
    openai_fake.push(Reply(text=" And more."))
    chain = ProviderChain([ProviderConfig("primary", "openai", "sk-primary", "m", base_url=f"http://127.0.0.1:{server.port}/v1"),
                           ProviderConfig("openai", "openai", OPENAI_KEY, "gpt-4o-mini", base_url=openai_fake.url)])
    try:
        reply = chain.stream(MESSAGES)
        assert "".join(reply) == "All done." == reply.text
        assert (reply.provider, reply.failovers, reply.apology_used) == ("primary", [], False)
        assert openai_fake.requests == []
        assert chain.health()[0]["consecutiveFailures"] == 0
    finally:
        chain.close()
        server.stop()


def test_a_hedged_turn_cancelled_mid_race_frees_the_backups_half_open_probe(make_chain, azure_fake, openai_fake,
                                                                            clock):
    """A barge-in during a hedged race settled only the primary: the backup's half-open probe, claimed when the
    hedge started, stayed held, so the backup was skipped for one more cooldown (the next turn got the apology)."""
    chain = make_chain(circuit_failures=1, circuit_cooldown_s=30.0, first_token_timeout_s=5.0, hedge_after_s=0.1)
    azure_fake.push(Reply(fault="500"))
    openai_fake.push(Reply(fault="500"))
    assert make_and_finish(chain).apology_used  # both circuits open
    clock.now += 31.0                           # both half-open

    azure_fake.push(Reply(text="Primary, slow.", ttft_s=3.0))
    openai_fake.push(Reply(text="Backup, slow too.", ttft_s=3.0))
    reply = chain.stream(MESSAGES)
    listener = threading.Thread(target=lambda: list(reply), daemon=True)
    listener.start()
    assert openai_fake.wait_until(lambda: len(openai_fake.requests) == 2)  # the hedge started: both probes held
    reply.close()                                                           # the caller barged in
    listener.join(timeout=10)
    assert not listener.is_alive()

    azure_fake.push(Reply(fault="500"))
    openai_fake.push(Reply(text="Backup here."))
    after = make_and_finish(chain)
    assert (after.text, after.provider) == ("Backup here.", "openai")


def test_a_reply_whose_done_never_comes_ends_soon_after_its_finish_reason(openai_fake):
    """finish_reason arrived, then the server held the connection open without `[DONE]`: the reply is complete at
    once (within finish()'s budget), not after the whole stall timeout, which held the turn's routing, end/transfer
    and store write for seconds (found by review)."""
    from tests.test_llm_http import ScriptedServer

    events = [b'data: {"choices":[{"index":0,"delta":{"content":"All done."}}]}\n\n',
              b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n']
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)
    server = ScriptedServer([[head + body, 10.0, None]])  # then silence, connection open
    chain = ProviderChain([ProviderConfig("primary", "openai", "sk-primary", "m",
                                          base_url=f"http://127.0.0.1:{server.port}/v1")],
                          ChainSettings(stall_timeout_s=5.0))
    try:
        started = time.monotonic()
        reply = chain.stream(MESSAGES)
        assert "".join(reply) == "All done." and not reply.apology_used
        assert time.monotonic() - started < 3.0  # not the 5 s stall timeout
    finally:
        chain.close()
        server.stop()



# ---- a reply with nothing to say aloud ----------------------------------------------------------------------------

@pytest.mark.parametrize("wordless", ["   \n\t ", '<break time="1s"/>', ' <break time="1s"/>  <break time="2s"/> '])
def test_a_wordless_reply_fails_over_like_an_empty_one_and_nothing_of_it_is_spoken(make_chain, azure_fake,
                                                                                    openai_fake, wordless):
    """Whitespace or SSML alone is nothing usable: the provider counts as failing (its breaker too) and the same turn
    goes to the next provider, as for an empty reply, rather than the caller hearing the apology. Nothing of the
    wordless text reaches the caller (a lone <break/> would be spoken as silence)."""
    azure_fake.push(Reply(text=wordless))
    openai_fake.push(Reply(text="Yes, two in Mong Kok."))

    reply = make_chain().stream(MESSAGES)
    tokens = list(reply)

    assert "".join(tokens) == "Yes, two in Mong Kok." == reply.text
    assert reply.provider == "openai" and reply.apology_used is False
    assert reply.failovers == [{"provider": "azure", "reason": "wordless_reply", "spoken_chars": 0}]
    assert openai_fake.requests[0].messages == MESSAGES  # a fresh request, no continuation of nothing


def test_every_provider_wordless_yields_the_apology_and_says_they_answered(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text=" "))
    openai_fake.push(Reply(text='<break time="1s"/>'))

    reply = make_and_finish(make_chain())

    assert reply.text == APOLOGY and reply.apology_used
    assert [f["reason"] for f in reply.failovers] == ["wordless_reply", "wordless_reply"]
    assert reply.answered_without_words


def test_leading_ssml_or_whitespace_before_words_is_spoken_in_order(make_chain, azure_fake, openai_fake):
    text = '  <break time="1s"/> Let me check that for you.'
    azure_fake.push(Reply(text=text))

    reply = make_chain().stream(MESSAGES)
    tokens = list(reply)

    assert "".join(tokens) == text == reply.text
    assert reply.failovers == [] and openai_fake.requests == []
    assert not reply.answered_without_words


def test_a_tool_call_with_only_whitespace_text_still_counts_as_an_answer(make_chain, azure_fake, openai_fake):
    azure_fake.push(Reply(text="\n", tool_calls=[("end_call", {})]))

    reply = make_and_finish(make_chain())

    assert reply.tool_calls == [("end_call", {})] and reply.text == "\n"
    assert reply.provider == "azure" and reply.failovers == [] and openai_fake.requests == []


def test_a_wordless_continuation_after_words_ends_the_reply_as_before(make_chain, azure_fake, openai_fake):
    """Mid-stream continuation: the caller already heard words, so a continuation that adds only whitespace is the
    reply's end (as an empty one is), not a failure."""
    azure_fake.push(Reply(text=SIX_WORDS, fault="drop", drop_after_tokens=6))
    openai_fake.push(Reply(text="  "))

    reply = make_and_finish(make_chain())

    assert reply.text.startswith(SIX_WORDS) and not reply.apology_used
    assert [f["reason"] for f in reply.failovers] == ["dropped"]


def test_a_reply_opening_with_a_lone_less_than_sign_is_spoken_not_failed_over(make_chain, azure_fake, openai_fake):
    """A `<` that never closes is no SSML tag (`has_words` counts it as words): held while a tag might still be
    streaming, it is spoken at the reply's end rather than failed over as wordless."""
    azure_fake.push(Reply(text="<5 minutes from the station."))

    reply = make_and_finish(make_chain())

    assert reply.text == "<5 minutes from the station." and reply.provider == "azure"
    assert reply.failovers == [] and openai_fake.requests == []


def test_a_wordless_start_longer_than_a_reply_may_be_fails_over_without_waiting_for_its_end(make_chain, azure_fake,
                                                                                           openai_fake):
    """A model looping on breaks (or newlines) says nothing the caller could hear within a reply's cap (the turn
    would stop it there): the held text is bounded by that cap, so the turn fails over then, instead of holding
    the caller in silence for the whole runaway generation."""
    breaks = '<break time="1s"/> ' * 400  # 8,000 bytes, then words the turn's cap would never let through
    azure_fake.push(Reply(text=breaks + "Hello there.", token_interval_s=0.001))
    openai_fake.push(Reply(text="Yes, two in Mong Kok."))

    reply = make_chain().stream(MESSAGES)
    tokens = list(reply)

    assert "".join(tokens) == "Yes, two in Mong Kok."
    assert [f["reason"] for f in reply.failovers] == ["wordless_reply"]
    assert azure_fake.requests[0].tokens_sent < 400  # hung up long before the runaway's end
