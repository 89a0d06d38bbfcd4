"""structlog setup: JSON lines, bound call context, secrets redacted before anything is written."""
from __future__ import annotations

import functools
import json
import logging
import re
import sys
from typing import Any

from gunicorn import glogging

_SECRET_KEY_RE = re.compile(
    r"(auth_?token|api_?key|secret|password|authorization|twilioauthtoken|credentials|signature)", re.I)
REDACTED = "[REDACTED]"
# (pattern, replacement, a text the pattern can only match if it holds it): the last pattern is the slow one
# (~4 µs on a text holding a secret word) and needs an "=", which ids, names and most messages never hold.
_SECRET_VALUE_PATTERNS = (
    (re.compile(r"sk-[A-Za-z0-9_\-]{8,}"), REDACTED, ""),                 # OpenAI-style keys
    # a header written out (`Authorization: Negotiate x`, a headers dict's or werkzeug Headers' repr, a list of
    # values, JSON): its whole value, whatever the scheme: to its closing quote, or unquoted to the end of the line
    (re.compile(r"(?i)(api-key|authorization)[\"']?\s*[:=,]\s*[\[(]?\s*(?:\"[^\"\r\n]*|'[^'\r\n]*|[^\r\n]*)"),
     REDACTED, ""),
    (re.compile(r"\b[0-9a-f]{32}\b"), REDACTED, ""),                       # Twilio auth tokens (32 hex)
    # secret-looking query parameters, in a URL (?a=..&twilioAuthToken=..) or a bare query string
    (re.compile(r"(?i)((?:^|[?&])[^=&\s]*(?:token|key|secret|password|signature|credential|authorization)"
                r"[^=&\s]*=)[^&\s\"']*"), r"\1" + REDACTED, "="),
)
# Cheap first look: a string none of these can be found in matches none of the patterns above, so it skips them.
_MAYBE_SECRET_VALUE = re.compile(r"sk-|[0-9a-f]{32}|=|(?i:api-key|authorization)")
# The same look for an ASCII string, lower-cased first (case-insensitive alternatives are slow in `re`): each pattern
# needs "sk-", 32 hex digits as a word, or one of its secret words. So a Call SID ("CA" + 32 hex digits) or a plain
# query ("trackingId=...") on every line about a call skips the four substitutions: 5.8 → 1.1 µs and 4.3 → 1.2 µs
# (docs/performance-history.md, "Issue 12w"). Not for other text, where case-insensitive matching knows more
# than lower() ("ſ" is an "s" to it).
_MAYBE_SECRET_ASCII_LOWERED = re.compile(
    r"sk-|\b[0-9a-f]{32}\b|token|key|secret|password|signature|credential|authorization")
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')  # what a JSON string escapes (json.dumps, ensure_ascii=False)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_known_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a configured secret so its exact value is scrubbed from any log line."""
    if value and len(value) >= 6:
        _known_secrets.add(value)


@functools.lru_cache(maxsize=1024)
def _is_secret_key(key: str) -> bool:
    """Log field names repeat on every line: decide each once."""
    return _SECRET_KEY_RE.search(key) is not None


def _scrub_text(text: str) -> str:
    """`text` with configured secrets and secret-looking values redacted."""
    value = text
    for secret in _known_secrets:
        if secret in value:
            value = value.replace(secret, REDACTED)
    if (_MAYBE_SECRET_ASCII_LOWERED.search(value.lower()) if value.isascii() else _MAYBE_SECRET_VALUE.search(value)):
        for pattern, replacement, needed in _SECRET_VALUE_PATTERNS:
            if needed in value:
                value = pattern.sub(replacement, value)
    return value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and v and _is_secret_key(k) else _scrub(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v) for v in value)
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: dict) -> dict:
    """structlog processor: drop secret-named fields and scrub secret-looking values."""
    return _scrub(event_dict)


def escape_control_chars(text: str) -> str:
    """Control characters as visible escapes (\\x0a), so a value cannot start a new, forged log line."""
    return _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _escape_strings(_logger: Any, _method: str, event_dict: dict) -> dict:
    """structlog processor for the console format (JSON lines are escaped by the JSON renderer itself)."""
    return {k: escape_control_chars(v) if isinstance(v, str) else v for k, v in event_dict.items()}


class _JsonSafeAtoms(glogging.SafeAtoms):
    """gunicorn access-log values made safe for the JSON line format: secrets redacted, then each value escaped as
    a JSON string body (gunicorn's own wrapper escapes only quotes, so a backslash or newline could forge a line).
    Only the values the format reads are scrubbed and escaped, when it reads them (gunicorn offers every header
    and environ entry, ~60 values, for the ~12 the line uses)."""

    def __init__(self, atoms: dict) -> None:
        dict.__init__(self, atoms)

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if not isinstance(value, str):
            return value
        value = _scrub(value)
        # json.dumps(ensure_ascii=False) changes only these; most values (paths, ids, numbers) have none of them
        return json.dumps(value, ensure_ascii=False)[1:-1] if _JSON_ESCAPED.search(value) else value


# The atoms of gunicorn's access-line format (`%(name)s`), e.g. "h", "{x-request-id}o", "{callweaver.call_sid}e".
_FORMAT_ATOM = re.compile(r"%\(([^)]+)\)")
# gunicorn's own atoms that cost next to nothing, with gunicorn's formulas (glogging.Logger.atoms): (environ, response,
# request_time) → value.
_CHEAP_ATOMS = {
    "h": lambda environ, resp, took: environ.get("REMOTE_ADDR", "-"),
    "m": lambda environ, resp, took: environ.get("REQUEST_METHOD"),
    "U": lambda environ, resp, took: environ.get("PATH_INFO"),
    "q": lambda environ, resp, took: environ.get("QUERY_STRING"),
    "s": lambda environ, resp, took: resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status,
    "B": lambda environ, resp, took: getattr(resp, "sent", None),
    "M": lambda environ, resp, took: took.seconds * 1000 + int(took.microseconds / 1000),
}


class AccessLogger(glogging.Logger):
    """gunicorn logger (gunicorn.conf.py `logger_class`) whose access lines redact and escape every value.

    gunicorn builds ~80 atoms per line (every request and response header, every environ entry, a strftime) for
    the ~12 the format reads; when the format names only cheap atoms and headers/environ entries, only those are
    built, with gunicorn's formulas (tests/test_security.py compares the two for the same requests)."""

    atoms_wrapper_class = _JsonSafeAtoms

    def atoms(self, resp, req, environ, request_time):  # noqa: ANN001, ANN201  (gunicorn's signature)
        names = self._format_atoms()
        if names is None:
            return super().atoms(resp, req, environ, request_time)
        simple, request_headers, response_headers, environ_keys = names
        atoms = {name: _CHEAP_ATOMS[name](environ, resp, request_time) for name in simple}
        for wanted, headers, kind in ((request_headers, getattr(req, "headers", req), "i"),
                                      (response_headers, resp.headers, "o")):
            if wanted:
                for key, value in (headers.items() if hasattr(headers, "items") else headers):
                    if key.lower() in wanted:
                        atoms["{%s}%s" % (key.lower(), kind)] = value  # the last one wins, as in gunicorn
        if environ_keys:
            lengths = {len(key) for key in environ_keys}
            for key, value in environ.items():
                if len(key) in lengths and key.lower() in environ_keys:  # gunicorn's lower-cased names
                    atoms["{%s}e" % key.lower()] = value
        return atoms

    def _format_atoms(self) -> tuple[tuple[str, ...], frozenset, frozenset, frozenset] | None:
        """The format's atoms by kind, or None when it names an atom outside _CHEAP_ATOMS (gunicorn builds them)."""
        fmt = self.cfg.access_log_format
        parsed = self.__dict__.get("_parsed_format")
        if parsed is None or parsed[0] != fmt:
            simple, by_kind = [], {"i": set(), "o": set(), "e": set()}
            for name in _FORMAT_ATOM.findall(fmt):
                if name.startswith("{") and name[-2:-1] == "}" and name[-1] in by_kind:
                    by_kind[name[-1]].add(name[1:-2].lower())
                elif name in _CHEAP_ATOMS:
                    simple.append(name)
                else:
                    parsed = (fmt, None)
                    break
            else:
                parsed = (fmt, (tuple(dict.fromkeys(simple)), frozenset(by_kind["i"]), frozenset(by_kind["o"]),
                                frozenset(by_kind["e"])))
            self._parsed_format = parsed
        return parsed[1]


class _StdoutLogger:
    """Writes each line to whatever sys.stdout is at that moment (gunicorn, tests capturing output)."""

    def msg(self, message: str) -> None:
        out = sys.stdout
        if out is not None:  # as print: no stdout (pythonw), no line
            out.write(message + "\n")  # the bytes print(message, flush=True) writes, in one call
            out.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _StdoutHandler(logging.StreamHandler):
    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def init_logging(level: str = "INFO", fmt: str = "json", trace_ids: bool = False) -> None:
    """Configure structlog and route stdlib logging (gunicorn, werkzeug, libraries) through it; with
    `trace_ids` (tracing on) every line about a call carries its OpenTelemetry trace id.
    structlog is imported here, not at the top: gunicorn's master imports this module for AccessLogger before it
    starts the worker, so a top-level import would add to every cold start before the first health check."""
    import structlog

    from .engine.tracing import add_trace_id
    renderer = (structlog.processors.JSONRenderer(ensure_ascii=False) if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.format_exc_info,
        redact_secrets,
        # After the redaction: a level and our own timestamp never hold a secret (and never repeat, for the time).
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *([add_trace_id] if trace_ids else []),
        *([] if fmt == "json" else [_escape_strings]),
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=lambda *args: _StdoutLogger(),
        cache_logger_on_first_use=False,
    )
    handler = _StdoutHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
    ))
    # No record names its thread (no format here or in gunicorn's reads %(thread)d or %(threadName)s). Under gevent
    # each request is a new greenlet, and the thread look-up of its first record (gunicorn's access line) built a
    # gevent dummy thread for it: ~7 µs of every request (docs/performance-history.md, "p-setup").
    logging.logThreads = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level, logging.INFO))
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "twilio.http_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
