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


def test_tool_call_arguments_with_nan_or_infinity_are_not_json_and_are_skipped():
    """NaN/Infinity are not JSON: the standard library's reader accepts them, and a variable holding one was stored
    as null by the SQLite store but as NaN by the Redis one, which then wrote invalid JSON into API answers and call
    reports."""
    from callweaver.engine.sse import parse_tool_calls

    parts = {0: {"name": "record_variables", "arguments": ['{"budget": NaN}']},
             1: {"name": "record_variables", "arguments": ['{"rooms": -Infinity}']},
             2: {"name": "record_variables", "arguments": ['{"rooms": 2}']}}
    assert parse_tool_calls("azure", parts) == [("record_variables", {"rooms": 2})]


def test_tool_call_arguments_with_a_number_too_large_for_a_float_are_skipped_as_infinity_is():
    """1e400 is valid JSON but reads as inf: the call holding it is skipped as one holding Infinity is, so no stored
    variable holds inf."""
    from callweaver.engine.sse import parse_tool_calls

    parts = {0: {"name": "record_variables", "arguments": ['{"budget": 1e400}']},
             1: {"name": "record_variables", "arguments": ['{"rooms": [-1E+400]}']},
             2: {"name": "record_variables", "arguments": ['{"rooms": 2, "budget": 1e300}']}}
    assert parse_tool_calls("azure", parts) == [("record_variables", {"rooms": 2, "budget": 1e300})]


def test_tool_call_arguments_with_a_lone_surrogate_are_made_valid_text():
    """A JSON escape of half a UTF-16 pair is no character: no UTF-8 writer (SQLite, Redis) takes it."""
    from callweaver.engine.sse import parse_tool_calls

    parts = {0: {"name": "record_variables", "arguments": ['{"name": "Ann \\ud800 Lee"}']},
             1: {"name": "record_variables", "arguments": ['{"name": "Ann \\ud83d\\ude00"}']}}  # a pair is fine
    assert parse_tool_calls("azure", parts) == [("record_variables", {"name": "Ann \ufffd Lee"}),
                                                ("record_variables", {"name": "Ann \U0001F600"})]


def test_tool_call_arguments_nested_deeper_than_json_writers_go_are_skipped():
    from callweaver.engine.sse import parse_tool_calls

    parts = {0: {"name": "record_variables", "arguments": ['{"a": ' + "[" * 2000 + "]" * 2000 + "}"]},
             1: {"name": "record_variables", "arguments": ['{"a": ' + "[" * 300 + "]" * 300 + "}"]},
             2: {"name": "record_variables", "arguments": ['{"rooms": 2}']}}
    assert parse_tool_calls("azure", parts) == [("record_variables", {"rooms": 2})]


def test_tool_call_fragments_that_are_not_text_are_skipped():
    from callweaver.engine.sse import parse_tool_calls

    parts = {0: {"name": "record_variables", "arguments": [{"name": "Ann"}]},
             1: {"name": {"not": "a name"}, "arguments": ['{}']},
             2: {"name": "transition", "arguments": ['{"edge_id": "e1"}']}}
    assert parse_tool_calls("azure", parts) == [("transition", {"edge_id": "e1"})]


def test_a_tool_calls_arguments_past_the_size_limit_are_not_kept_and_the_call_is_refused():
    """~2 MB of arguments streamed in fragments: what is kept in memory stops at the limit, and the call is refused
    (logged, listed in refused_tool_calls) while a normal call next to it goes through."""
    import orjson as _orjson

    from callweaver.engine.sse import MAX_TOOL_ARGUMENTS_BYTES, ChatCompletionsStream

    def event(index, name, arguments):
        delta = {"tool_calls": [{"index": index, "function": {"name": name, "arguments": arguments}}]}
        return b"data: " + _orjson.dumps({"choices": [{"index": 0, "delta": delta}]})

    stream = ChatCompletionsStream()
    lines = [event(0, "record_variables", '{"applicant_name": "')]
    lines += [event(0, None, "A" * 10_000) for _ in range(200)]
    lines += [event(0, None, '"}'), event(1, "transition", '{"edge_id": "e1"}'), b"data: [DONE]"]
    list(stream.read_lines(lines))
    kept = sum(len(part) for part in stream._tool_parts[0]["arguments"])
    assert kept <= MAX_TOOL_ARGUMENTS_BYTES
    assert stream.tool_calls("azure") == [("transition", {"edge_id": "e1"})]
    assert stream.refused_tool_calls[0]["name"] == "record_variables"
    assert stream.refused_tool_calls[0]["argumentsBytes"] > 2_000_000


def test_tool_calls_past_the_limit_are_not_kept_and_refused():
    import orjson as _orjson

    from callweaver.engine.sse import MAX_TOOL_CALLS, ChatCompletionsStream

    def event(index):
        delta = {"tool_calls": [{"index": index, "function": {"name": "transition", "arguments": '{"edge_id": "e"}'}}]}
        return b"data: " + _orjson.dumps({"choices": [{"index": 0, "delta": delta}]})

    stream = ChatCompletionsStream()
    list(stream.read_lines([event(i) for i in range(10_000)] + [b"data: [DONE]"]))
    assert len(stream._tool_parts) == MAX_TOOL_CALLS
    assert len(stream.tool_calls("azure")) == MAX_TOOL_CALLS
    assert [call["error"] for call in stream.refused_tool_calls] == [
        f"not applied: more than {MAX_TOOL_CALLS} tool calls in one reply"]


def test_tool_call_fragments_that_are_not_text_are_not_kept_either():
    """Arguments streamed as JSON objects instead of text (a broken gateway): the call is skipped as unparseable, as
    before, and the objects are not kept in memory past the limit whatever their number or size."""
    import orjson as _orjson

    from callweaver.engine.sse import MAX_TOOL_ARGUMENTS_BYTES, ChatCompletionsStream

    def event(arguments):
        delta = {"tool_calls": [{"index": 0, "function": {"name": "record_variables", "arguments": arguments}}]}
        return b"data: " + _orjson.dumps({"choices": [{"index": 0, "delta": delta}]})

    stream = ChatCompletionsStream()
    list(stream.read_lines([event({"applicant_name": "A" * 10_000}) for _ in range(200)] + [b"data: [DONE]"]))
    kept = len(_orjson.dumps([part for part in stream._tool_parts[0]["arguments"] if part is not None]))
    assert kept <= MAX_TOOL_ARGUMENTS_BYTES
    assert stream.tool_calls("azure") == []
