"""Reading a chat-completions stream's lines: what one network read brought is handed out line by line."""
from __future__ import annotations

import pytest

from callweaver.engine.sse import ChatCompletionsStream, StreamReportedError


def _token(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]}'


def test_tokens_before_an_error_event_in_the_same_read_are_handed_out_first():
    """A read holding tokens and then an `error` event: the tokens are spoken (and kept for the failover's
    continuation) before the error is raised, as when each line arrived in its own read."""
    stream = ChatCompletionsStream()
    received = []
    with pytest.raises(StreamReportedError):
        for delta in stream.read_lines([_token("Hello"), b"", _token(" there"), b'data: {"error":{"code":500}}']):
            received.append(delta.content)
    assert received == ["Hello", " there"]


def test_nothing_after_done_is_read():
    stream = ChatCompletionsStream()
    deltas = list(stream.read_lines([_token("Hi"), b"data: [DONE]", b"data: not json"]))
    assert [d.content for d in deltas] == ["Hi"] and stream.done
