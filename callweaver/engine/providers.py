"""LLM providers behind one ordered failover chain: deadlines, failover, hedged first tokens, continuation.

By concern: vendors.py (each vendor's settings, SDK client, URL and model), llm_http.py (deadlines and HTTP),
sse.py (the event stream), circuit.py (breakers), continuation.py (resuming a broken reply); this module is the
chain that uses them."""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import orjson
import structlog

from .circuit import CircuitBreaker, CircuitRecord, CircuitStates, LocalCircuitStates
from .continuation import ContinuationJoiner, continuation_messages
from .llm_http import (FINISH_BUDGET_S, ConnectFailed, ConnectionDropped, ConnectionPool, Exchange,
                       ReadTimedOut, StatusError)
from .metrics import nearest_rank
from .speech import MAX_TURN_REPLY_BYTES, begins_speech, has_words
from .sse import ChatCompletionsStream, StreamReportedError
from .vendors import ProviderConfig, build_sdk_client, chat_endpoint, provider_configs, request_model

if TYPE_CHECKING:
    import openai

log = structlog.get_logger()


DEFAULT_APOLOGY = "Sorry, I'm having trouble right now. Could you say that again?"
# A reply with text but not one word to say aloud (whitespace, SSML tags): nothing usable, so the provider counts as
# failing and the turn goes to the next one, as for an empty reply; the reason failover logs and counts.
WORDLESS_REPLY = "wordless_reply"

# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ChainSettings:
    """Deadlines and breaker limits; a phone caller notices silence after about a second."""

    first_token_timeout_s: float = 1.5
    connect_timeout_s: float = 2.0
    stall_timeout_s: float = 5.0
    circuit_failures: int = 3
    circuit_cooldown_s: float = 30.0
    # Hedged first tokens: no first token from a provider after this long → the same request also goes to the
    # next provider and the first to answer wins. None = off; HEDGE_P95 = the provider's own recent TTFT p95.
    hedge_after_s: float | str | None = None


# --------------------------------------------------------------------------- errors


class ProviderError(Exception):
    """One provider attempt failed; `kind` says how (it is what failover logs and counts)."""

    def __init__(self, kind: str, detail: str = "", *, request_refused: bool = False,
                 worker_late: bool = False) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.request_refused = request_refused  # the provider refused this request only (_charge_failure)
        # the deadline was noticed late by this worker's busy loop (llm_http.ReadTimedOut.worker_late)
        self.worker_late = worker_late


def _status_kind(status_code: int) -> str:
    return "rate_limited" if status_code == 429 else f"http_{status_code}"


# A provider refusing one request (its content or its parameters: Azure's content filter on what a caller said, a
# prompt too long, a value a workflow chose) says nothing of its health. The turn fails over, but the breaker, which
# every call shares, is not charged: one call's refused turns must not take the provider from every other call.
REFUSAL_STATUSES = frozenset({400, 413, 422})
# ...unless its error says every request is refused, whatever it holds: the provider's own configuration (an
# api-version its resource does not serve, a parameter or value its model never takes, a deployment that does no
# chat completions). Those codes are charged; any other refusal (content_filter, context_length_exceeded, a
# self-hosted server's own wording, no JSON at all) is taken as the request's.
CONFIGURATION_ERROR_CODES = frozenset({"unsupported_parameter", "unsupported_value", "OperationNotSupported"})


def _refused_whatever_the_request(body: bytes) -> bool:
    """An error body (OpenAI's and Azure's `{"error": {"code", "message"}}`) that says the provider refuses every
    request: one of CONFIGURATION_ERROR_CODES, or Azure's BadRequest about its api-version."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    if not isinstance(error, dict):
        return False
    code, message = error.get("code"), error.get("message")
    if code in CONFIGURATION_ERROR_CODES:
        return True
    return code == "BadRequest" and isinstance(message, str) and "api version" in message.lower()


def _status_failure(status: int, exchange: Exchange) -> ProviderError:
    """The failover for an HTTP error status; a refusal's error body (read briefly) says whose it is."""
    refused = status in REFUSAL_STATUSES and not _refused_whatever_the_request(exchange.error_body())
    return ProviderError(_status_kind(status), request_refused=refused)


def _charge_failure(chain: "ProviderChain", provider: "_Provider", error: ProviderError, seen: CircuitRecord) -> None:
    """Count a failed attempt against the provider's breaker, unless the provider only refused this request, or the
    deadline it missed was missed by this worker's busy event loop (a saturated worker must not open the breaker of
    a healthy provider for every call, long after the load is gone)."""
    if error.worker_late:
        log.warning("loop_lag", provider=provider.name, reason=error.kind, outcome="failover_not_charged")
    if error.request_refused or error.worker_late:
        if seen.probe_until is not None:  # this turn held the half-open probe: let the next turn probe
            provider.circuit.release_probe()
        return
    provider.circuit.record_failure(chain._clock())


# --------------------------------------------------------------------------- one provider + its breaker


class _Provider:
    """A configured endpoint, its lazily built SDK client (the configuration), connection pool and (shared)
    circuit breaker."""

    def __init__(self, config: ProviderConfig, settings: ChainSettings, circuit_states: CircuitStates) -> None:
        self.config = config
        self._settings = settings
        self._client: "openai.OpenAI | None" = None
        self._pool: ConnectionPool | None = None
        self._lock = threading.Lock()
        self.circuit = CircuitBreaker(config.name, circuit_states, failures=settings.circuit_failures,
                                      cooldown_s=settings.circuit_cooldown_s)

    @property
    def name(self) -> str:
        return self.config.name

    def client(self) -> "openai.OpenAI":
        """The SDK client: the configuration surface (base URL, keys, api-version, headers)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = build_sdk_client(self.config)
        return self._client

    def pool(self) -> ConnectionPool:
        """Built on first use: each gunicorn worker (post-fork) gets its own connections."""
        if self._pool is None:
            endpoint = chat_endpoint(self.config, self.client())
            with self._lock:
                if self._pool is None:
                    self._pool = ConnectionPool(endpoint, public_only=self.config.public_only)
        return self._pool

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        if client is not None:
            client.close()

    def health(self, now: float) -> dict:
        return {"name": self.name, "kind": self.config.kind, "model": self.config.model,
                **self.circuit.snapshot(now)}


# --------------------------------------------------------------------------- one turn


@dataclass
class _TurnRequest:
    messages: list[dict]
    tools: list[dict] | None
    temperature: float | None
    max_tokens: int | None
    model: str | None
    apology: str


HEDGE_P95 = "p95"
HEDGE_MIN_SAMPLES = 20          # recent first tokens a provider needs before its own p95 is a budget
HEDGE_POLL_S = 0.05             # how often a race checks whether the turn was cancelled


@dataclass
class _TurnState:
    """What a ReplyStream reports; kept apart from the stream so a dropped stream is freed (and closed) at once."""

    text: str = ""
    tool_calls: list[tuple[str, dict]] = field(default_factory=list)
    refused_tool_calls: list[dict] = field(default_factory=list)  # over sse's size limits: not applied
    provider: str | None = None
    provider_ttft_ms: float | None = None
    ttft_provider: str | None = None  # whose first token provider_ttft_ms timed (a continued reply's is earlier)
    failovers: list[dict] = field(default_factory=list)
    apology_used: bool = False
    cancelled: bool = False
    active_exchange: Exchange | None = None
    hedged_requests: int = 0    # second requests started because a first token was late


class ReplyStream:
    """Iterate it for the spoken text tokens (str) as they arrive; after iteration its attributes describe the turn.

    Nothing is sent upstream until iteration starts. Use close() (or `with`) to cancel: the upstream HTTP
    response is closed at once, so the provider stops generating.
    """

    def __init__(self, chain: "ProviderChain", request: _TurnRequest) -> None:
        self._state = _TurnState()
        self._tokens = _run_turn(chain, self._state, request)

    def __iter__(self) -> Iterator[str]:
        return self._tokens

    def __enter__(self) -> "ReplyStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the turn; safe from the iterating greenlet/thread or from another one."""
        self._state.cancelled = True
        if inspect.getgeneratorstate(self._tokens) == inspect.GEN_RUNNING:
            # Another greenlet/thread is blocked reading inside the generator: wake it by hanging up the socket;
            # it sees `cancelled` and finishes quietly (no failover, no apology).
            _abort_exchange(self._state)
        else:
            self._tokens.close()  # GeneratorExit at the yield leaves the `with`, closing the response

    @property
    def text(self) -> str:
        return self._state.text

    @property
    def tool_calls(self) -> list[tuple[str, dict]]:
        return self._state.tool_calls

    @property
    def refused_tool_calls(self) -> list[dict]:
        """Tool calls the model made that were refused for their size (sse.parse_tool_calls): never applied."""
        return self._state.refused_tool_calls

    @property
    def provider(self) -> str | None:
        return self._state.provider

    @property
    def provider_ttft_ms(self) -> float | None:
        return self._state.provider_ttft_ms

    @property
    def failovers(self) -> list[dict]:
        return self._state.failovers

    @property
    def apology_used(self) -> bool:
        return self._state.apology_used

    @property
    def hedged_requests(self) -> int:
        return self._state.hedged_requests

    @property
    def answered_without_words(self) -> bool:
        """A provider answered this turn, but without words (it failed over as WORDLESS_REPLY): the apology that
        may follow is one bad reply, not every provider down."""
        return any(failover["reason"] == WORDLESS_REPLY for failover in self._state.failovers)


def _abort_exchange(state: _TurnState) -> None:
    """Hang up the request another greenlet/thread is reading: shutting its socket down wakes the blocked read."""
    exchange = state.active_exchange
    if exchange is not None:
        exchange.abort()


def _run_turn(chain: "ProviderChain", state: _TurnState, request: _TurnRequest) -> Iterator[str]:
    """Ordered failover: each provider in turn, open circuits skipped, a broken reply continued; never raises."""
    raced: set[str] = set()  # providers a hedged race already tried (and settled) in this turn
    for provider in chain._providers:
        if state.cancelled:
            return
        if provider.name in raced:
            continue
        seen = provider.circuit.acquire(chain._clock())
        if seen is None:
            continue
        backup = chain.hedge_partner(provider, state, skip=raced)
        if backup is not None:
            raced.add(provider.name)
            attempt = _hedged_attempt(chain, state, request, provider, seen, backup,
                                      chain.hedge_budget_s(provider), raced)
        else:
            attempt = _stream_from_provider(provider, chain._settings, state, request)
        try:
            yield from attempt
        except ProviderError as error:
            if state.cancelled:
                _settle_cancelled(provider, state, seen)
                return
            if error.kind == "hedge_failed":
                continue  # the race recorded both providers' outcomes
            _charge_failure(chain, provider, error, seen)
            state.failovers.append({"provider": provider.name, "reason": error.kind, "spoken_chars": len(state.text)})
            log.warning("provider_failover", provider=provider.name, reason=error.kind, spoken_chars=len(state.text))
            continue
        except BaseException:
            # Cancelled by the caller (GeneratorExit, GreenletExit): closing the attempt closes its HTTP response.
            attempt.close()
            _settle_cancelled(provider, state, seen)
            raise
        if backup is None:
            provider.circuit.record_success(seen)
        if state.ttft_provider == state.provider:  # a continuation's own first token was not timed
            chain.note_first_token(state.provider, state.provider_ttft_ms)
        return
    if state.cancelled:
        return
    log.error("all_llm_providers_failed", providers=[p.name for p in chain._providers], spoken_chars=len(state.text))
    state.apology_used = True
    state.provider = None
    apology = request.apology
    if state.text and not state.text[-1].isspace():
        apology = " " + apology
    state.text += apology
    yield apology


class _Racer:
    """One provider's attempt in a hedged race, streamed on its own greenlet/thread into a shared queue."""

    def __init__(self, chain: "ProviderChain", provider: _Provider, seen: CircuitRecord, request: _TurnRequest,
                 events) -> None:
        self.provider, self.seen, self.state, self.events = provider, seen, _TurnState(), events
        self._attempt = _stream_from_provider(provider, chain._settings, self.state, request)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for token in self._attempt:
                self.events.put((self, "token", token))
            self.events.put((self, "done", None))
        except ProviderError as error:
            self.events.put((self, "error", error))
        except Exception as error:  # never let a racer die silently: the race would wait for it
            self.events.put((self, "error", ProviderError("unexpected", type(error).__name__)))

    def cancel(self) -> None:
        self.state.cancelled = True
        _abort_exchange(self.state)


def _hedged_attempt(chain: "ProviderChain", state: _TurnState, request: _TurnRequest, primary: _Provider,
                    primary_seen: CircuitRecord, backup: _Provider, budget_s: float,
                    raced: set[str]) -> Iterator[str]:
    """`primary`, and `backup` too if `primary` has no first token within `budget_s`: the first to produce a
    token is streamed and the other cancelled.

    Circuit bookkeeping for both providers is done here. A primary failing before the hedge raises its own
    error (the chain fails over as usual); anything else that leaves no working stream raises `hedge_failed`.
    """
    import queue

    events: queue.Queue = queue.Queue()
    racers = [_Racer(chain, primary, primary_seen, request, events)]
    hedge_at = time.monotonic() + budget_s
    winner: _Racer | None = None
    failed = 0
    settled: set[_Racer] = set()  # racers whose circuit outcome is already recorded
    try:
        while True:
            if state.cancelled:
                raise ProviderError("cancelled")
            if winner is None and len(racers) == 1 and time.monotonic() >= hedge_at:
                hedge_at = float("inf")
                backup_seen = backup.circuit.acquire(chain._clock())
                if backup_seen is not None:
                    raced.add(backup.name)
                    state.hedged_requests += 1
                    log.info("llm_request_hedged", primary=primary.name, backup=backup.name,
                             after_ms=round(budget_s * 1000, 1))
                    racers.append(_Racer(chain, backup, backup_seen, request, events))
            wait = HEDGE_POLL_S if hedge_at == float("inf") else max(0.0, min(HEDGE_POLL_S,
                                                                             hedge_at - time.monotonic()))
            try:
                racer, kind, value = events.get(timeout=wait)
            except queue.Empty:
                continue
            if winner is not None and racer is not winner:
                continue  # the loser's last words before it noticed the cancel
            if kind == "error":
                if len(racers) == 1:
                    raise value  # no hedge was started: the chain's own failover handles it
                failed += 1
                _charge_failure(chain, racer.provider, value, racer.seen)
                settled.add(racer)
                state.failovers.append({"provider": racer.provider.name, "reason": value.kind,
                                        "spoken_chars": len(state.text)})
                if winner is not None or failed == len(racers):
                    raise ProviderError("hedge_failed")
                continue
            if winner is None:
                winner = racer
                for other in racers:
                    if other is not racer:
                        other.cancel()
                        _settle_cancelled(other.provider, other.state, other.seen)
                        settled.add(other)
            if kind == "done":
                break
            state.text += value
            yield value
    except BaseException:
        for racer in racers:
            racer.cancel()
            if racer is not racers[0] and racer not in settled:  # the chain settles the primary
                _settle_cancelled(racer.provider, racer.state, racer.seen)
        raise
    won = winner.state
    state.tool_calls.extend(won.tool_calls)
    state.refused_tool_calls.extend(won.refused_tool_calls)
    state.provider = won.provider
    if state.provider_ttft_ms is None:
        state.provider_ttft_ms, state.ttft_provider = won.provider_ttft_ms, won.ttft_provider
    winner.provider.circuit.record_success(winner.seen)


def _settle_cancelled(provider: _Provider, state: _TurnState, seen: CircuitRecord) -> None:
    """A cancelled turn proves a provider healthy only if it had already answered."""
    if state.provider == provider.name:
        provider.circuit.record_success(seen)
    elif seen.probe_until is not None:  # this turn held the half-open probe
        provider.circuit.release_probe()


def _request_body(provider: _Provider, request: _TurnRequest, messages: list[dict]) -> bytes:
    """The turn's JSON body, encoded once (orjson): messages and tools are plain JSON already."""
    config = provider.config
    body: dict[str, Any] = {
        "model": request_model(config, request.model),
        "messages": messages,
        "stream": True,
    }
    if request.tools:
        body["tools"] = request.tools
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    try:
        return orjson.dumps(body)
    except TypeError:
        # Text that is not valid Unicode (a lone surrogate, which a JSON escape in our input can carry): the
        # request is ours to fix, never a failure of the provider (its circuit breaker must not count it).
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "replace")


def _stream_from_provider(provider: _Provider, settings: ChainSettings, state: _TurnState,
                          request: _TurnRequest) -> Iterator[str]:
    """One attempt: yields text tokens; raises ProviderError on any upstream failure (mapped from llm_http's)."""
    spoken_before = state.text
    joiner = ContinuationJoiner(spoken_before) if spoken_before else None
    # Before the reply's first word, its text is held: a reply that never says one fails over (WORDLESS_REPLY) with
    # nothing of it sent to the caller. A continuation of words already spoken is not held.
    held: str | None = None if has_words(spoken_before) else ""
    messages = continuation_messages(request.messages, spoken_before) if spoken_before else request.messages
    first_token_seen = False
    stall_timeout_s = settings.stall_timeout_s
    try:
        pool = provider.pool()  # built before the clock starts: a cold worker's SDK import is ours, not the provider's
        sent_at = time.monotonic()
        deadline = sent_at + settings.first_token_timeout_s
        exchange = Exchange(pool)
        state.active_exchange = exchange
        try:
            try:
                exchange.start(_request_body(provider, request, messages), deadline, settings.connect_timeout_s)
            except StatusError as error:
                raise _status_failure(error.status, exchange) from None
            if state.cancelled:  # close() ran while we waited for the headers
                raise ProviderError("cancelled")
            sse = ChatCompletionsStream()
            while not sse.done:
                if state.cancelled:
                    raise ProviderError("cancelled")
                now = time.monotonic()
                # e.g. keep-alive comments trickling in without tokens; but bytes already waiting when this worker's
                # loop gets here late get their one read (Exchange.may_read_late)
                if now > deadline and not exchange.may_read_late(deadline):
                    if sse.finish_reason is not None:
                        break  # finished; its `[DONE]` tail is late
                    raise ReadTimedOut("deadline passed between lines", late_s=now - deadline)
                try:
                    lines = exchange.next_lines(deadline)
                except (ConnectionDropped, ReadTimedOut):
                    if state.cancelled:  # close() aborted the read: a barge-in, never a finished reply
                        raise ProviderError("cancelled") from None
                    if sse.finish_reason is None:
                        raise
                    break  # the reply had finished: only its `[DONE]` tail was lost
                if lines is None:
                    break
                for content, producing in sse.read_lines(lines):
                    if producing:
                        now = time.monotonic()
                        if not first_token_seen:
                            first_token_seen = True
                            if state.provider_ttft_ms is None:
                                state.provider_ttft_ms = (now - (exchange.written_at or sent_at)) * 1000.0
                                state.ttft_provider = provider.name
                            state.provider = provider.name
                        deadline = now + stall_timeout_s
                    if content:
                        speakable = joiner.feed(content) if joiner is not None else content
                        if speakable and held is not None:
                            held += speakable
                            speakable = ""
                            if begins_speech(held):
                                speakable, held = held, None
                            elif len(held.encode()) > MAX_TURN_REPLY_BYTES:
                                # The turn would cut the reply before any word (a model looping on breaks or
                                # newlines): fail over now, not after the whole runaway generation.
                                raise ProviderError(WORDLESS_REPLY)
                        if speakable:
                            state.text += speakable
                            yield speakable
                            if state.cancelled:  # while the consumer had the token (one read may bring several)
                                raise ProviderError("cancelled")
                            # time the consumer spent with the token is not upstream silence
                            deadline = time.monotonic() + stall_timeout_s
                if sse.finish_reason is not None and not sse.done:
                    # Finished: only `[DONE]` is to come. It gets the budget finish() gives a body's end, not a
                    # stall timeout that would hold the turn's routing and store write for seconds.
                    deadline = min(deadline, time.monotonic() + FINISH_BUDGET_S)
            if not sse.done and sse.finish_reason is None:
                raise ProviderError("dropped", "stream ended without finishing")
            if sse.done:
                exchange.finish()  # reading to the body's end returns the connection to the pool
            if joiner is not None:
                tail = joiner.finish()
                if tail:
                    state.text += tail
                    yield tail
            tool_calls = sse.tool_calls(provider.name)
            refused = sse.refused_tool_calls  # an answer too (the model is told why it was not applied)
            if held is not None:  # no word yet (or only after a "<" that no ">" closed: spoken now)
                if not has_words(held) and not tool_calls and not refused:
                    raise ProviderError(WORDLESS_REPLY if held else "empty_reply")
                if held:  # (a tool call's stray whitespace or tag: the turn's routing reads it as wordless)
                    state.text += held
                    yield held
            state.tool_calls.extend(tool_calls)
            state.refused_tool_calls.extend(refused)
            state.provider = provider.name
        finally:
            if exchange.late_reads:
                log.info("loop_lag", provider=provider.name, late_reads=exchange.late_reads, outcome="read_late")
            state.active_exchange = None
            exchange.close()  # no-op once finish() pooled the connection
    except ProviderError:
        raise
    except StreamReportedError:
        raise ProviderError("stream_error") from None
    except StatusError as error:
        raise ProviderError(_status_kind(error.status)) from None
    except ConnectFailed:
        raise ProviderError("connect") from None
    except ReadTimedOut as error:
        raise ProviderError("stalled" if first_token_seen else "timeout_first_token",
                            worker_late=error.worker_late) from None
    except ConnectionDropped:
        raise ProviderError("dropped") from None
    except ValueError:  # orjson.JSONDecodeError included
        raise ProviderError("malformed_chunk") from None
    except Exception as error:  # the caller must never see a provider's exception
        # no traceback: rendered locals could carry the client and its key
        log.error("provider_unexpected_error", provider=provider.name, error_type=type(error).__name__,
                  error=str(error)[:300])
        raise ProviderError("unexpected", type(error).__name__) from None


# --------------------------------------------------------------------------- the chain


class ProviderChain:
    """The one place that owns LLM failover: ordered providers, first-token/stall deadlines, circuit breakers.

    `clock` (epoch seconds: the circuit records are shared across processes and instances) drives the circuit
    breakers only (tests inject a fake one); request deadlines and TTFT are always measured with the real
    monotonic clock. `circuit_states` is where the breakers keep their records (the store, shared by every
    worker); by default this process only.
    """

    def __init__(self, providers: list[ProviderConfig], settings: ChainSettings = ChainSettings(),
                 clock: Callable[[], float] = time.time,
                 circuit_states: CircuitStates | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self._circuit_states = circuit_states or LocalCircuitStates()
        self._providers = [_Provider(config, settings, self._circuit_states) for config in providers]
        self._recent_ttft_ms: dict[str, deque] = {}  # per provider, for a p95 hedge budget (this worker)

    def hedge_budget_s(self, provider: _Provider) -> float | None:
        """How long `provider` gets to send a first token before the request is hedged; None = never."""
        setting = self._settings.hedge_after_s
        if setting is None:
            return None
        if setting != HEDGE_P95:
            return float(setting)
        recent = list(self._recent_ttft_ms.get(provider.name, ()))
        if len(recent) < HEDGE_MIN_SAMPLES:
            return None  # no p95 to speak of yet
        return nearest_rank(recent, 95) / 1000

    def hedge_partner(self, provider: _Provider, state: _TurnState, skip: set[str]) -> _Provider | None:
        """The provider a hedge would start: the next one in the chain, only before any text was spoken."""
        if state.text or self.hedge_budget_s(provider) is None:
            return None
        later = self._providers[self._providers.index(provider) + 1:]
        return next((p for p in later if p.name not in skip), None)

    def note_first_token(self, provider_name: str | None, ttft_ms: float | None) -> None:
        if provider_name and ttft_ms is not None:
            self._recent_ttft_ms.setdefault(provider_name, deque(maxlen=100)).append(ttft_ms)

    def with_first(self, config: ProviderConfig) -> "ProviderChain":
        """A chain trying `config` first (a call's own LLM account), then this chain's providers, whose
        clients and circuit breakers are shared, not copied."""
        chain = ProviderChain([], self._settings, self._clock, self._circuit_states)
        # The call's own account gets a breaker of its own, in this process: its name is not unique service-wide.
        chain._providers = [_Provider(config, self._settings, LocalCircuitStates()), *self._providers]
        chain._recent_ttft_ms = self._recent_ttft_ms
        return chain

    @property
    def names(self) -> list[str]:
        return [provider.name for provider in self._providers]

    def stream(self, messages: list[dict], *, tools: list[dict] | None = None, temperature: float | None = None,
               max_tokens: int | None = None, model: str | None = None, apology: str = DEFAULT_APOLOGY) -> ReplyStream:
        """Start a turn (lazily: nothing is sent until iterated).

        `model` overrides the model of a call's own OpenAI account only (vendors.request_model).
        """
        request = _TurnRequest(list(messages), tools, temperature, max_tokens, model, apology)
        return ReplyStream(self, request)

    def complete(self, messages: list[dict], **options: Any) -> ReplyStream:
        """Run a whole turn and return the finished stream (for non-streaming callers such as the playground)."""
        reply = self.stream(messages, **options)
        for _ in reply:
            pass
        return reply

    def health(self) -> list[dict]:
        """Per-provider breaker state for health endpoints; never includes keys or endpoints."""
        now = self._clock()
        return [provider.health(now) for provider in self._providers]

    def warm_up(self) -> None:
        """Build every provider's client and request head now (no network), so a worker's first turn does not."""
        for provider in self._providers:
            provider.pool()

    def close(self) -> None:
        """Release the HTTP connection pools (tests, shutdown)."""
        for provider in self._providers:
            provider.close()


def build_provider_chain(settings: Any, circuit_states: CircuitStates | None = None) -> ProviderChain:
    """Build the chain from app Settings; providers named in LLM_PROVIDERS but not configured are left out.
    `circuit_states`: the store, so every worker shares the breakers."""
    configs = provider_configs(settings)
    defaults = ChainSettings()
    chain_settings = ChainSettings(
        first_token_timeout_s=float(getattr(settings, "llm_first_token_timeout_s", defaults.first_token_timeout_s)),
        connect_timeout_s=float(getattr(settings, "llm_connect_timeout_s", defaults.connect_timeout_s)),
        stall_timeout_s=float(getattr(settings, "llm_stall_timeout_s", defaults.stall_timeout_s)),
        circuit_failures=int(getattr(settings, "llm_circuit_failures", defaults.circuit_failures)),
        circuit_cooldown_s=float(getattr(settings, "llm_circuit_cooldown_s", defaults.circuit_cooldown_s)),
        hedge_after_s=getattr(settings, "llm_hedge_after_s", defaults.hedge_after_s),
    )
    return ProviderChain(configs, chain_settings, circuit_states=circuit_states)
