"""Reading an OpenAI-style chat-completions stream (server-sent events): text deltas, tool-call fragments, its end.

Both vendors send the same events (Azure opens with a choices-less content-filter event); only the first choice is
read. Lines arrive as bytes from llm_http; JSON is decoded with orjson (a ValueError for a malformed chunk).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, NamedTuple

import orjson
import structlog

from . import valid_json

log = structlog.get_logger()

# A tool call's arguments (its JSON, in UTF-8 bytes) are read up to this size. A bigger call is refused whole, never
# applied nor stored (call record, transcript, the variables later prompts carry), and the model is told
# (tool_error_note): a flow's details (names, amounts, an address, a short note) are far smaller, and a model streaming
# megabytes of arguments is broken or being steered. The fragments past it are not even kept in memory.
MAX_TOOL_ARGUMENTS_BYTES = 8192
MAX_TOOL_NAME_CHARS = 64  # OpenAI's own limit on a function name: a longer one names no tool we offer
# Tool calls read from one reply (a turn offers at most three tools); the calls past it are refused, not kept.
MAX_TOOL_CALLS = 16


class StreamReportedError(Exception):
    """The stream carried an `error` event instead of a reply."""


class ChatDelta(NamedTuple):
    """One choice's delta: `content` to speak (may be None), `producing` when text or a tool-call fragment came.
    (A tuple: one is built per streamed token.)"""

    content: str | None
    producing: bool


class ChatCompletionsStream:
    """Feed it the stream's lines; `done` once `data: [DONE]` arrived, `finish_reason` once a choice gave one."""

    def __init__(self) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self._tool_parts: dict[int, dict] = {}
        self.refused_tool_calls: list[dict] = []  # filled by tool_calls(): {name, error, argumentsBytes}
        self._too_many_tool_calls = False  # calls past MAX_TOOL_CALLS came (and were not kept)

    def read_lines(self, lines: list[bytes]) -> Iterator[ChatDelta]:
        """The deltas of several lines (what one network read brought), line by line: a delta is handed out before
        a later line of the same read is parsed, so tokens ahead of an `error` event are still spoken. No deltas
        for comments (": keep-alive"), `event:` lines, separators and [DONE]; nothing after [DONE] is read.

        One loop over the read's lines with the line's parse inline: half of a stream's lines are the blank
        separators between events, and a typical event is one content delta (per-token work on the hot path)."""
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            if self.done:
                return
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            event = orjson.loads(payload)
            if event.get("error"):
                raise StreamReportedError()
            for choice in event.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                finish_reason = choice.get("finish_reason")
                if finish_reason:
                    self.finish_reason = finish_reason
                content = delta.get("content")
                tool_deltas = delta.get("tool_calls")
                if tool_deltas:
                    self._add_tool_deltas(tool_deltas)
                yield ChatDelta(content or None, bool(content or tool_deltas))

    def _add_tool_deltas(self, tool_deltas: list[dict]) -> None:
        for tool_delta in tool_deltas:
            index = tool_delta.get("index", 0)
            parts = self._tool_parts.get(index)
            if parts is None:
                if len(self._tool_parts) >= MAX_TOOL_CALLS:
                    self._too_many_tool_calls = True
                    continue
                parts = self._tool_parts[index] = {"name": "", "arguments": [], "bytes": 0}
            function = tool_delta.get("function") or {}
            if function.get("name") and not parts["name"]:
                parts["name"] = function["name"]
            fragment = function.get("arguments")
            if fragment:
                if not isinstance(fragment, str):
                    # Not text: nothing of it is kept, and the None fails the join (skipped as unparseable).
                    parts["arguments"] = [None]
                    continue
                parts["bytes"] += len(fragment.encode("utf-8", "replace"))
                if parts["bytes"] <= MAX_TOOL_ARGUMENTS_BYTES:
                    parts["arguments"].append(fragment)

    def tool_calls(self, provider_name: str) -> list[tuple[str, dict]]:
        """The complete tool calls, in order; an unparseable one is logged and skipped, one over the size limits
        logged and refused (`refused_tool_calls`), and so are the calls past MAX_TOOL_CALLS."""
        calls = parse_tool_calls(provider_name, self._tool_parts, self.refused_tool_calls)
        if self._too_many_tool_calls:
            log.warning("tool_calls_past_limit_refused", provider=provider_name, max_calls=MAX_TOOL_CALLS)
            self.refused_tool_calls.append({"name": None, "argumentsBytes": None,
                                            "error": f"not applied: more than {MAX_TOOL_CALLS} tool calls in one reply"})
        return calls


def _storable_int(digits: str) -> int | None:
    """A JSON integer as orjson writes it (64 bits); a longer one is no value (None: not recorded), so it is dropped
    alone instead of failing the write of the whole call's arguments and losing the caller's other details."""
    if len(digits) > 20:
        return None
    value = int(digits)
    return value if -(2 ** 63) <= value < 2 ** 64 else None


def parse_tool_calls(provider_name: str, tool_parts: dict[int, dict],
                     refused: list[dict] | None = None) -> list[tuple[str, dict]]:
    """The calls whose arguments are a JSON object every store can write: read as all JSON we read is (valid_json: a
    lone surrogate escape such as \\ud800, which no UTF-8 writer takes, becomes U+FFFD), without NaN or ±Infinity
    (as literals or as a number beyond a float, 1e400), and written once (orjson: its depth and integer limits), so a
    model's arguments can never fail the turn's commit. A call over MAX_TOOL_ARGUMENTS_BYTES or MAX_TOOL_NAME_CHARS
    is logged and added to `refused` (what the turn stores and tells the model instead)."""
    tool_calls: list[tuple[str, dict]] = []
    for index in sorted(tool_parts):
        name = tool_parts[index]["name"]
        size = tool_parts[index].get("bytes", 0)
        if size > MAX_TOOL_ARGUMENTS_BYTES or (isinstance(name, str) and len(name) > MAX_TOOL_NAME_CHARS):
            shown = name[:MAX_TOOL_NAME_CHARS] if isinstance(name, str) and name else None
            log.warning("tool_call_arguments_too_large", provider=provider_name, tool=shown, arguments_bytes=size,
                        max_bytes=MAX_TOOL_ARGUMENTS_BYTES, name_chars=len(name) if isinstance(name, str) else None)
            if refused is not None:
                refused.append({"name": shown, "argumentsBytes": size,
                                "error": f"not applied: a tool call is at most {MAX_TOOL_ARGUMENTS_BYTES} bytes of "
                                         f"arguments and a {MAX_TOOL_NAME_CHARS}-character name"})
            continue
        arguments_json = ""
        try:
            arguments_json = "".join(tool_parts[index]["arguments"]) or "{}"
            arguments = valid_json.loads(arguments_json, parse_constant=_not_json, parse_int=_storable_int,
                                         parse_float=_finite_float)
            orjson.dumps(arguments)
        except (ValueError, TypeError, RecursionError):  # orjson's JSONEncodeError is a TypeError; nested too deep
            arguments = None
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            log.warning("tool_call_skipped_unparseable", provider=provider_name,
                        tool=name if isinstance(name, str) and name else None, arguments_chars=len(arguments_json))
            continue
        tool_calls.append((name, arguments))
    return tool_calls


def _not_json(constant: str) -> Any:
    """NaN and ±Infinity are not JSON (the standard library's reader accepts them): no stored variable may hold one."""
    raise ValueError(f"not JSON: {constant}")


def _finite_float(digits: str) -> float:
    """A JSON number beyond a float's range (1e400) reads as ±inf: refused as the Infinity literal is."""
    value = float(digits)
    if not math.isfinite(value):
        raise ValueError(f"beyond a float: {digits[:40]}")
    return value


def tool_error_note(refused: list[dict]) -> str:
    """What the model reads about its refused tool calls (in the follow-up request and in the history): which call,
    why, and that nothing of it was applied."""
    said = "; ".join(f"{'`' + call['name'] + '`' if call.get('name') else 'a tool call'} {call['error']}"
                     for call in refused)
    return f"[Tool error: {said}. Nothing from it was recorded.]"
