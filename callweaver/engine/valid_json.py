"""JSON text in, valid Unicode out: the one place a lone surrogate is cleaned.

A JSON escape can carry a UTF-16 half ("\\ud800") that is not a character: such text cannot be encoded as UTF-8,
so SQLite refuses to store it, and an LLM request holding it cannot be sent. Every JSON text we read (relay frames,
HTTP bodies) goes through `loads`, so the rest of the code only ever sees valid text; a lone surrogate becomes
U+FFFD.
"""
from __future__ import annotations

import json
import re
from typing import Any

# Only an escape in the D800-DFFF range can make one: frames without it (nearly all) are not walked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


def loads(raw: str | bytes | bytearray, **kwargs: Any) -> Any:
    """json.loads, with every string (keys too) made valid Unicode."""
    value = json.loads(raw, **kwargs)
    escape = _SURROGATE_ESCAPE if isinstance(raw, str) else _SURROGATE_ESCAPE_BYTES
    return valid_unicode(value) if escape.search(raw) else value


def valid_unicode(value: Any) -> Any:
    """`value` with each string's lone surrogates replaced by U+FFFD (a decoded pair is one character already)."""
    if isinstance(value, str):
        return value if value.isascii() else value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [valid_unicode(item) for item in value]
    if isinstance(value, dict):
        return {valid_unicode(key): valid_unicode(item) for key, item in value.items()}
    return value
