"""Reply cache: a known caller utterance at a workflow node is answered without an LLM round trip."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import structlog

from ..config import DEFAULT_REDIS_KEY_PREFIX
from .speech import fold, is_cjk, speech_words

log = structlog.get_logger()

# Replies longer than this are too specific to be worth sharing between callers (and too long to cache).
MAX_REPLY_CHARS = 600
# A backend failure is logged at most once per this many seconds; the rest are only counted.
ERROR_LOG_INTERVAL_S = 60.0
# Redis waits at most this long per operation, so an outage costs a miss, never a stalled turn.
REDIS_SOCKET_TIMEOUT_S = 0.5
# Per-process and per-machine backends prune past this many entries (cachelib's default of 500 is too few).
LOCAL_CACHE_MAX_ENTRIES = 5000
# The health probe is removed right after the round trip; the expiry only matters if that delete fails.
HEALTH_PROBE_TTL_S = 30
# Bumped when the stored entry layout changes, so old entries read as misses instead of garbage.
ENTRY_FORMAT_VERSION = 1
# Part of every key: entries stored under an older key layout (without the caller's context) are never read.
KEY_FORMAT = "ctx1:"

_DIGIT_RUN = re.compile(r"\d(?:[\s,.\-/:]?\d){3,}")
_EMAIL_LIKE = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")


@dataclass(frozen=True)
class CachedReply:
    """A reply that is the same for every caller who says the same thing at the same node."""

    text: str
    provider: str | None  # provider that originally generated it
    created_at: float  # epoch seconds
    language: str
    node_id: str


def _strip_unspaced_fillers(word: str, fillers: list[str]) -> str:
    """Drop CJK fillers at either end of a run of CJK text ("呃你好" → "你好"), repeatedly ("嗯嗯" → "")."""
    changed = True
    while word and changed:
        changed = False
        for filler in fillers:
            if word.startswith(filler):
                word, changed = word[len(filler):], True
            if word.endswith(filler):
                word, changed = word[: len(word) - len(filler)], True
    return word


@functools.lru_cache(maxsize=64)
def _filler_words(fillers: tuple[str, ...]) -> tuple[dict[str, list[tuple[str, ...]]], list[str]]:
    """A language's fillers as words, by their first word (longest first), and the CJK ones written unspaced;
    worked out once per filler list (a language's), not on every turn."""
    word_fillers: list[tuple[str, ...]] = []
    unspaced_fillers: list[str] = []
    for filler in fillers:
        words = tuple(speech_words(filler))
        if not words:
            continue
        word_fillers.append(words)
        if len(words) == 1 and any(is_cjk(c) for c in words[0]):
            unspaced_fillers.append(words[0])
    # Longest first, so "嗯嗯" is stripped as one filler before "嗯" is tried.
    unspaced_fillers.sort(key=len, reverse=True)
    word_fillers.sort(key=len, reverse=True)
    by_first_word: dict[str, list[tuple[str, ...]]] = {}
    for words in word_fillers:
        by_first_word.setdefault(words[0], []).append(words)
    return by_first_word, unspaced_fillers


def conversation_digest(messages: Iterable[Mapping[str, Any]]) -> str:
    """A hash of the messages' roles and texts as they are; each field is length-prefixed, so no two conversations
    share one (a line split differently between turns is a different conversation)."""
    fields = []
    for message in messages:
        role, content = str(message.get("role")), str(message.get("content") or "")
        fields.append(f"{len(role)}:{role}{len(content)}:{content}")
    return hashlib.sha256("".join(fields).encode("utf-8", "surrogatepass")).hexdigest()


def normalize_utterance(utterance: str, fillers: Iterable[str] = ()) -> str:
    """Map the ways a caller (or the speech recogniser) writes the same words to one string.

    Traditional and Simplified Chinese stay distinct: they belong to different languages, whose replies differ.
    """
    by_first_word, unspaced_fillers = _filler_words(tuple(fillers))
    words = speech_words(utterance)
    words = _without_fillers(words, by_first_word)
    if utterance.isascii():  # no CJK character anywhere: no unspaced filler or CJK join can apply
        return " ".join(words)
    kept: list[str] = []
    for word in words:
        if unspaced_fillers and any(is_cjk(c) for c in word):
            word = _strip_unspaced_fillers(word, unspaced_fillers)
        if word:
            kept.append(word)

    # Punctuation between CJK characters became a space; remove it so "你好，我想問" == "你好我想問".
    joined: list[str] = []
    for word in kept:
        if joined and is_cjk(joined[-1][-1]) and is_cjk(word[0]):
            joined[-1] += word
        else:
            joined.append(word)
    return " ".join(joined)


def _without_fillers(words: list[str], by_first_word: dict[str, list[tuple[str, ...]]]) -> list[str]:
    """`words` without the (multi-word) fillers, matched at word boundaries."""
    if not by_first_word or by_first_word.keys().isdisjoint(words):
        return words
    kept: list[str] = []
    i = 0
    while i < len(words):
        matched = next((f for f in by_first_word.get(words[i], ()) if tuple(words[i:i + len(f)]) == f), None)
        if matched is not None:
            i += len(matched)
            continue
        kept.append(words[i])
        i += 1
    return kept


def reply_is_safe_to_cache(
    reply_text: str,
    *,
    variables: dict,
    tool_calls: list,
    node_cacheable: bool,
    utterance: str = "",
) -> bool:
    """Only a reply that would be the same for every caller may be served to the next one.

    Anything that could carry one caller's data (their variables, numbers, e-mail) or that moved the call
    (a tool call: routing, extraction) is refused; wrongly refusing costs one LLM call, wrongly caching leaks data.
    """
    if not node_cacheable or tool_calls:
        return False
    if not reply_text or not reply_text.strip():
        return False
    folded_reply = fold(reply_text)
    for value in (variables or {}).values():
        if value is None or value == "" or value == [] or value == {}:
            continue
        value_text = fold(str(value)).strip()
        if len(value_text) >= 2 and value_text in folded_reply:
            return False
    if _DIGIT_RUN.search(folded_reply):
        return False
    if _EMAIL_LIKE.search(folded_reply):
        return False
    if _echoes_proper_names(utterance, reply_text):
        return False
    return True


_WORD = re.compile(r"[^\W\d_][\w'-]*", re.UNICODE)


def _echoes_proper_names(utterance: str, reply_text: str) -> bool:
    """A reply that repeats a capitalised word the caller said (a name, a street) carries that caller's details."""
    if not utterance:
        return False
    replied = {w.casefold() for w in _WORD.findall(reply_text)}  # the reply is short; the callers' words grow
    return any(i > 0 and len(w) >= 2 and w[0].isupper() and (folded := w.casefold()) in replied
               and folded not in {"i", "i'm", "i'd", "i'll"} for i, w in enumerate(_WORD.findall(utterance)))


def reply_cache_prefix(redis_key_prefix: str) -> str:
    """The reply cache's keys (entries, prewarm markers, health probe) under the deployment's REDIS_KEY_PREFIX."""
    return f"{redis_key_prefix}reply:"


class ReplyCache:
    """Reply cache over a cachelib-style backend; every backend failure degrades to a miss, never an exception."""

    def __init__(
        self,
        backend: Any,
        *,
        ttl_s: int = 86400,
        key_prefix: str = reply_cache_prefix(DEFAULT_REDIS_KEY_PREFIX),
        clock: Callable[[], float] = time.time,
        max_utterance_chars: int = 80,
    ) -> None:
        self.backend = backend
        self.ttl_s = int(ttl_s)
        self.key_prefix = key_prefix
        self.max_utterance_chars = max_utterance_chars
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "puts": 0, "errors": 0}
        self._last_error_logged_at: float | None = None
        self._errors_not_logged = 0
        self._probe_key = f"{key_prefix}health:{uuid.uuid4().hex}"

    @property
    def backend_name(self) -> str:
        return type(self.backend).__name__

    def key(
        self,
        *,
        workflow_hash: str,
        node_id: str,
        language: str,
        heard_before: str,
        utterance: str,
        prompt_variables: Mapping[str, Any] | None = None,
        fillers: Iterable[str] = (),
        history: Iterable[Mapping[str, Any]] = (),
    ) -> str | None:
        """A hash of what the caller is answering and what they said; None when the words cannot recur.

        The same words answer different questions ("Yes." to the morning slot or to the evening slot), so the key
        holds the last assistant line the caller heard (normalised) next to the workflow version, node, language,
        the normalised utterance and the values of the variables the node's prompt uses. `history` is everything
        the model is sent before the utterance, its system prompt first: a reply may repeat anything said in it (a
        name the caller gave two turns ago) or follow what only that call was told (the keypad's use), so it is
        only ever served to a caller whose conversation was the same. It is
        hashed as sent, not normalised: the key is built on every turn and normalising twenty lines cost ~45 µs.
        """
        normalized = normalize_utterance(utterance or "", fillers)
        if not normalized or len(normalized) > self.max_utterance_chars:
            return None
        variables = sorted((str(name), fold(str(value)).strip())
                           for name, value in (prompt_variables or {}).items())
        # JSON keeps the fields apart, so ("a b", "c") and ("a", "b c") can never collide.
        material = json.dumps(
            [str(workflow_hash), str(node_id), str(language).strip().casefold(), normalize_utterance(heard_before),
             variables, normalized, conversation_digest(history)],
            ensure_ascii=False,
        )
        return self.key_prefix + KEY_FORMAT + hashlib.sha256(material.encode("utf-8")).hexdigest()

    def get(self, key: str | None) -> CachedReply | None:
        """The cached reply, or None on a miss, an expired or unreadable entry, or a backend failure."""
        if key is None:
            return None
        try:
            entry = self.backend.get(key)
        except Exception as exc:  # any backend, any outage: a miss
            self._record_error("get", exc)
            return None
        reply = self._decode(entry)
        if reply is not None and self.ttl_s > 0 and self._clock() - reply.created_at > self.ttl_s:
            reply = None  # the backend keeps it a little longer than asked (second granularity); we do not
        self._count("hits" if reply is not None else "misses")
        return reply

    def put(self, key: str | None, reply: CachedReply) -> bool:
        """Store a reply; False (never an exception) when refused or when the backend fails."""
        if key is None or not isinstance(reply, CachedReply):
            return False
        if not reply.text or not reply.text.strip() or len(reply.text) > MAX_REPLY_CHARS:
            return False
        entry = {"v": ENTRY_FORMAT_VERSION, **vars(reply)}  # flat fields: no deep copy (asdict) needed
        try:
            stored = self.backend.set(key, entry, timeout=self.ttl_s)
        except Exception as exc:
            self._record_error("put", exc)
            return False
        if stored is False or stored is None:
            self._record_error("put", RuntimeError(f"{self.backend_name} refused the write"))
            return False
        self._count("puts")
        return True

    def connect(self) -> None:
        """Open the backend's connection now (worker start), so the first caller's lookup does not pay for it."""
        try:
            self.backend.has(self._probe_key)
        except Exception as exc:
            self._record_error("connect", exc)

    def claim_prewarm(self, marker: str, interval_s: float) -> bool:
        """True for exactly one caller per `marker` per interval among everyone sharing the backend (the
        workers of a machine, or every instance with Redis): only that one spends LLM requests warming."""
        if self.backend_name == "NullCache":
            return False  # a cache that keeps nothing is not worth warming
        try:
            return bool(self.backend.add(self._prewarm_key(marker), 1, timeout=max(1, int(interval_s))))
        except Exception as exc:
            self._record_error("claim_prewarm", exc)
            return False

    def release_prewarm(self, marker: str) -> None:
        """A prewarm stopped before it finished (its call ended): let the next call of the flow warm it."""
        try:
            self.backend.delete(self._prewarm_key(marker))
        except Exception as exc:
            self._record_error("release_prewarm", exc)

    def _prewarm_key(self, marker: str) -> str:
        return f"{self.key_prefix}prewarm:{hashlib.sha256(marker.encode('utf-8')).hexdigest()}"

    def stats(self) -> dict:
        """This process's counters since start; diagnostics only (the store holds the measured hit rate)."""
        with self._lock:
            return {**self._counts, "backend": self.backend_name}

    def health(self) -> dict:
        """A real round trip through the backend: write a probe, read it back, remove it."""
        token = uuid.uuid4().hex
        try:
            self.backend.set(self._probe_key, token, timeout=HEALTH_PROBE_TTL_S)
            echoed = self.backend.get(self._probe_key)
            try:
                self.backend.delete(self._probe_key)
            except Exception:
                pass  # the probe expires on its own
        except Exception as exc:
            return {"ok": False, "backend": self.backend_name, "error": _describe(exc)}
        if echoed != token:
            return {"ok": False, "backend": self.backend_name,
                    "error": f"{self.backend_name} did not return the value just written"}
        return {"ok": True, "backend": self.backend_name, "error": None}

    def _decode(self, entry: Any) -> CachedReply | None:
        """Entries are plain dicts (not pickled classes) so a code change never breaks reading old entries."""
        if not isinstance(entry, dict) or entry.get("v") != ENTRY_FORMAT_VERSION:
            return None
        try:
            text = entry["text"]
            if not isinstance(text, str) or not text:
                return None
            provider = entry.get("provider")
            return CachedReply(
                text=text,
                provider=str(provider) if provider is not None else None,
                created_at=float(entry["created_at"]),
                language=str(entry["language"]),
                node_id=str(entry["node_id"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _record_error(self, operation: str, exc: BaseException) -> None:
        """Count every failure; log one a minute, so a Redis outage does not flood the log on every turn."""
        now = self._clock()
        with self._lock:
            self._counts["errors"] += 1
            due = self._last_error_logged_at is None or now - self._last_error_logged_at >= ERROR_LOG_INTERVAL_S
            if not due:
                self._errors_not_logged += 1
                return
            suppressed, self._errors_not_logged = self._errors_not_logged, 0
            self._last_error_logged_at = now
        log.warning("reply_cache_backend_error", operation=operation, backend=self.backend_name,
                    error=_describe(exc), errors_not_logged=suppressed)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


