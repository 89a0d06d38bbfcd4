"""Tests for the fake OpenAI/Azure chat-completions server, driven by the real openai SDK."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

from tests.fakes.fake_llm import DEFAULT_REPLY_TEXT, FakeLLM, Reply, split_into_word_tokens

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture
def fake():
    server = FakeLLM("fake").start()
    yield server
    server.stop()


def openai_client(fake: FakeLLM, read_timeout_s: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.url, api_key="sk-test", max_retries=0,
                         timeout=httpx2.Timeout(10.0, read=read_timeout_s))


def stream_deltas(client: openai.OpenAI, **kwargs) -> list:
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, **kwargs)
    return [chunk.choices[0] for chunk in stream if chunk.choices]


def test_word_tokens_keep_leading_spaces_and_rejoin_to_the_text():
    assert split_into_word_tokens("Hello there, how are you?") == ["Hello", " there,", " how", " are", " you?"]
    assert "".join(split_into_word_tokens(DEFAULT_REPLY_TEXT)) == DEFAULT_REPLY_TEXT


def test_openai_shape_streams_one_word_per_chunk_with_role_first_and_stop_last(fake):
    choices = stream_deltas(openai_client(fake))

    assert choices[0].delta.role == "assistant"
    contents = [choice.delta.content for choice in choices if choice.delta.content]
    assert contents == split_into_word_tokens(DEFAULT_REPLY_TEXT)
    assert choices[-1].finish_reason == "stop"
    request = fake.requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.messages == MESSAGES
    assert request.body["stream"] is True
    assert request.finished and not request.client_closed
    assert request.tokens_sent == len(contents)


def test_azure_shape_routes_by_deployment_with_api_key_header(fake):
    client = openai.AzureOpenAI(azure_endpoint=fake.root_url, api_key="azure-key", api_version="2025-01-01-preview",
                                max_retries=0)
    fake.push(Reply(text="From Azure."))

    stream = client.chat.completions.create(model="gpt4omini", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert text == "From Azure."
    request = fake.requests[0]
    assert request.path == "/openai/deployments/gpt4omini/chat/completions?api-version=2025-01-01-preview"
    assert request.headers["api-key"] == "azure-key"
    assert fake.azure_full_endpoint() == (
        f"{fake.root_url}/openai/deployments/gpt4omini/chat/completions?api-version=2025-01-01-preview")


def test_non_streaming_request_gets_one_whole_completion_with_tool_calls(fake):
    fake.push(Reply(text="Booked.", tool_calls=[("book", {"day": "Monday"})]))

    completion = openai_client(fake).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    message = completion.choices[0].message
    assert message.content == "Booked."
    assert message.tool_calls[0].function.name == "book"
    assert json.loads(message.tool_calls[0].function.arguments) == {"day": "Monday"}
    assert completion.choices[0].finish_reason == "tool_calls"
    assert fake.requests[0].finished


def test_tool_calls_stream_after_the_text_with_arguments_in_pieces(fake):
    fake.push(Reply(text="One moment.", tool_calls=[("goto_node", {"node": "pricing"}), ("set", {"budget": 500000})]))

    choices = stream_deltas(openai_client(fake), tools=[{"type": "function", "function": {"name": "goto_node"}}])

    text = "".join(choice.delta.content or "" for choice in choices)
    names: dict[int, str] = {}
    argument_pieces: dict[int, list[str]] = {}
    first_tool_chunk = next(i for i, choice in enumerate(choices) if choice.delta.tool_calls)
    for choice in choices:
        for call in choice.delta.tool_calls or []:
            if call.function.name:
                names[call.index] = call.function.name
            if call.function.arguments:
                argument_pieces.setdefault(call.index, []).append(call.function.arguments)
    assert text == "One moment."
    assert all(not choice.delta.content for choice in choices[first_tool_chunk:])
    assert names == {0: "goto_node", 1: "set"}
    assert len(argument_pieces[0]) > 1
    assert json.loads("".join(argument_pieces[0])) == {"node": "pricing"}
    assert json.loads("".join(argument_pieces[1])) == {"budget": 500000}
    assert choices[-1].finish_reason == "tool_calls"
    assert fake.requests[0].body["tools"][0]["function"]["name"] == "goto_node"


def test_pushed_replies_are_served_in_order_then_the_responder_then_the_default(fake):
    client = openai_client(fake)
    fake.push(Reply(text="first"), Reply(text="second"))

    def ask() -> str:
        return client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content

    assert [ask(), ask()] == ["first", "second"]
    fake.responder = lambda body: Reply(text=f"echo {body['messages'][-1]['content']}")
    assert ask() == "echo Hi"
    fake.responder = None
    assert ask() == DEFAULT_REPLY_TEXT


def test_fault_500_is_a_server_error_with_a_json_body(fake):
    fake.push(Reply(fault="500"))

    with pytest.raises(openai.InternalServerError) as raised:
        openai_client(fake).chat.completions.create(model="m", messages=MESSAGES, stream=True)

    assert raised.value.status_code == 500
    assert raised.value.body == {"message": "fake upstream error", "type": "server_error"}


def test_fault_429_is_a_rate_limit_with_retry_after(fake):
    fake.push(Reply(fault="429"))

    with pytest.raises(openai.RateLimitError) as raised:
        openai_client(fake).chat.completions.create(model="m", messages=MESSAGES, stream=True)

    assert raised.value.response.headers["retry-after"] == "1"
    assert raised.value.body["type"] == "rate_limit_error"


def test_server_wide_fault_applies_to_every_request_until_cleared(fake):
    client = openai_client(fake)
    fake.push(Reply(text="queued"))
    fake.fault = "500"
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=MESSAGES)

    fake.fault = None

    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == "queued"


def test_hang_sends_headers_then_nothing_and_notices_the_client_hanging_up(fake):
    fake.push(Reply(fault="hang"))
    client = openai_client(fake, read_timeout_s=0.3)

    started = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        with client.chat.completions.with_streaming_response.create(model="m", messages=MESSAGES, stream=True) as response:
            assert response.http_response.status_code == 200  # headers did arrive
            for _ in response.iter_lines():
                pass

    assert time.monotonic() - started < 10
    assert fake.wait_until(lambda: fake.requests[0].client_closed, timeout_s=5)
    assert fake.requests[0].tokens_sent == 0 and not fake.requests[0].finished


def test_hang_with_keepalive_sends_only_sse_comments(fake):
    fake.push(Reply(fault="hang", keepalive_interval_s=0.05))
    client = openai_client(fake)

    lines = []
    with client.chat.completions.with_streaming_response.create(model="m", messages=MESSAGES, stream=True) as response:
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if len(lines) >= 3:
                break

    assert lines == [": keep-alive"] * 3
    assert fake.wait_until(lambda: fake.requests[0].client_closed, timeout_s=5)


def test_drop_cuts_the_connection_after_the_given_number_of_tokens(fake):
    fake.push(Reply(text="One two three four five six.", fault="drop", drop_after_tokens=2))
    received: list[str] = []

    with pytest.raises((httpx2.RemoteProtocolError, openai.APIConnectionError)):
        for chunk in openai_client(fake).chat.completions.create(model="m", messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == "One two"
    assert fake.requests[0].tokens_sent == 2
    assert not fake.requests[0].finished


def test_timing_fields_reflect_the_configured_first_token_delay(fake):
    fake.ttft_s = 0.3

    stream_deltas(openai_client(fake))

    request = fake.requests[0]
    assert request.first_token_at is not None
    assert request.first_token_at - request.received_at >= 0.29
    assert request.finished


def test_per_reply_timings_override_the_server_defaults(fake):
    fake.ttft_s = 5.0
    fake.push(Reply(text="quick", ttft_s=0.0, token_interval_s=0.0))

    started = time.monotonic()
    stream_deltas(openai_client(fake))

    assert time.monotonic() - started < 4.0


def test_client_closing_mid_stream_is_recorded_as_client_closed(fake):
    fake.push(Reply(text="a b c d e f g h i j", token_interval_s=0.2))
    client = openai_client(fake)

    with client.chat.completions.with_streaming_response.create(model="m", messages=MESSAGES, stream=True) as response:
        data_lines = 0
        for line in response.iter_lines():
            data_lines += line.startswith("data:")
            if data_lines == 2:
                break  # leaving the `with` closes the response

    assert fake.wait_until(lambda: fake.requests[0].client_closed, timeout_s=5)
    request = fake.requests[0]
    assert not request.finished
    assert 2 <= request.tokens_sent < 10


def test_wait_for_requests_returns_them_or_raises_on_timeout(fake):
    client = openai_client(fake)
    client.chat.completions.create(model="m", messages=MESSAGES)

    assert len(fake.wait_for_requests(1, timeout_s=1)) == 1
    with pytest.raises(TimeoutError):
        fake.wait_for_requests(2, timeout_s=0.2)


def test_reset_clears_queue_requests_fault_responder_and_timings():
    with FakeLLM("resettable", ttft_s=0.0, token_interval_s=0.0) as fake:
        client = openai_client(fake)
        client.chat.completions.create(model="m", messages=MESSAGES)
        fake.push(Reply(text="stale"))
        fake.fault, fake.ttft_s, fake.token_interval_s = "500", 9.0, 9.0
        fake.responder = lambda body: Reply(text="responder")

        fake.reset()

        assert (fake.requests, fake.fault, fake.responder, fake.ttft_s, fake.token_interval_s) == ([], None, None, 0.0, 0.0)
        assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == DEFAULT_REPLY_TEXT


def test_unknown_paths_are_404(fake):
    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    connection.request("POST", "/v1/embeddings", body=b"{}", headers={"Content-Type": "application/json"})

    assert connection.getresponse().status == 404
    assert fake.requests == []


def _raw_chat_request(port: int) -> bytes:
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body))


def test_serves_two_hundred_concurrent_streams(fake):
    # Every request hangs, so the server only sees all 200 if it serves them at the same time.
    fake.fault = "hang"
    sockets = [socket.create_connection(("127.0.0.1", fake.port), timeout=10) for _ in range(200)]
    try:
        for sock in sockets:
            sock.sendall(_raw_chat_request(fake.port))
        assert len(fake.wait_for_requests(200, timeout_s=30)) == 200
    finally:
        for sock in sockets:
            sock.close()
    assert fake.wait_until(lambda: all(request.client_closed for request in fake.requests), timeout_s=15)

    fake.reset()
    fake.token_interval_s = 0.02

    def stream_once(_: int) -> bytes:
        connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=30)
        connection.request("POST", "/v1/chat/completions",
                           body=json.dumps({"model": "m", "messages": MESSAGES, "stream": True}),
                           headers={"Content-Type": "application/json"})
        body = connection.getresponse().read()
        connection.close()
        return body

    with ThreadPoolExecutor(max_workers=200) as pool:
        bodies = list(pool.map(stream_once, range(200)))

    assert all(body.rstrip().endswith(b"data: [DONE]") for body in bodies)
    assert all(request.finished for request in fake.requests) and len(fake.requests) == 200
