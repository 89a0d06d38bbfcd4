"""OpenTelemetry traces of calls, only when OTEL_EXPORTER_OTLP_ENDPOINT is set.

A call is one trace whose id is derived from its tracking id, so turns served by any worker or instance (each
Gather webhook may land elsewhere) join the same trace without passing context around: every turn span is a
child of the call span, which is recorded with those same derived ids when Twilio reports the call's end.
Turn spans have two children: the reply-cache lookup and the LLM request (GenAI semantic-convention names
where one fits, `callweaver.*` for the rest).

With tracing off the engine holds a `NullTracer`: no OpenTelemetry import, no exporter, one no-op method call
at each hook (bench/tracing.py measures it).
"""
from __future__ import annotations

import contextvars
import hashlib
import os
import time
from functools import lru_cache
from typing import Any

TRACER_NAME = "callweaver"


@lru_cache(maxsize=4096)
def _derived_ids(tracking_id: str) -> tuple[int, int]:
    digest = hashlib.sha256(b"callweaver-call-trace:" + tracking_id.encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


def trace_id_hex(tracking_id: str) -> str:
    """The call's trace id as trace back ends show it (32 hex digits)."""
    return f"{_derived_ids(tracking_id)[0]:032x}"


def add_trace_id(_logger: Any, _method: str, event_dict: dict) -> dict:
    """structlog processor: a log line about a call carries its trace id, to jump from the log to the trace."""
    tracking_id = event_dict.get("tracking_id")
    if isinstance(tracking_id, str) and tracking_id:
        event_dict["trace_id"] = trace_id_hex(tracking_id)
    return event_dict


class _NullSpan:
    """Stands in for a span when tracing is off: accepts everything, records nothing."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def __enter__(self) -> "_NullSpan":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


NULL_SPAN = _NullSpan()


class NullTracer:
    """Tracing off (OTEL_EXPORTER_OTLP_ENDPOINT unset): every hook returns at once."""

    enabled = False

    def start_turn(self, tracking_id: str, **attributes: Any) -> Any:
        return NULL_SPAN

    def child(self, parent: Any, name: str) -> Any:
        return NULL_SPAN

    def start_llm_request(self, parent: Any, **request: Any) -> Any:
        return NULL_SPAN

    def end_llm_request(self, span: Any, stream: Any) -> None:
        pass

    def end_turn(self, span: Any, turn_row: dict) -> None:
        pass

    def record_call(self, record: Any, turns: int) -> None:
        pass


def _call_id_generator():
    """An SDK IdGenerator: random ids, except while a call span is recorded (then the ids derived for it)."""
    from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

    class CallIdGenerator(IdGenerator):
        def __init__(self) -> None:
            self._random = RandomIdGenerator()
            self.forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
                "callweaver_forced_ids", default=None)

        def generate_trace_id(self) -> int:
            forced = self.forced.get()
            return forced[0] if forced else self._random.generate_trace_id()

        def generate_span_id(self) -> int:
            forced = self.forced.get()
            return forced[1] if forced else self._random.generate_span_id()

    return CallIdGenerator()


def _genai_provider(provider_name: str | None) -> str | None:
    """gen_ai.provider.name for one of our providers (azure, openai, workflow-azure, workflow-openai)."""
    if not provider_name:
        return None
    return "azure.ai.openai" if "azure" in provider_name else "openai"


class CallTracer:
    """Spans for calls, turns, cache lookups and LLM requests on an SDK TracerProvider."""

    enabled = True

    def __init__(self, provider: Any, id_generator: Any):
        from opentelemetry import trace

        self._trace = trace
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)
        self._ids = id_generator

    def _call_context(self, tracking_id: str):
        trace = self._trace
        trace_id, span_id = _derived_ids(tracking_id)
        parent = trace.SpanContext(trace_id, span_id, is_remote=True,
                                   trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
        return trace.set_span_in_context(trace.NonRecordingSpan(parent))

    def start_turn(self, tracking_id: str, **attributes: Any) -> Any:
        attrs = {"callweaver.tracking_id": tracking_id, "gen_ai.conversation.id": tracking_id}
        attrs.update({f"callweaver.{k}": v for k, v in attributes.items() if v is not None})
        return self.tracer.start_span("turn", context=self._call_context(tracking_id), attributes=attrs)

    def child(self, parent: Any, name: str) -> Any:
        """A span under `parent`, used as a context manager (ended on exit)."""
        return self.tracer.start_as_current_span(name, context=self._trace.set_span_in_context(parent),
                                                 end_on_exit=True)

    def start_llm_request(self, parent: Any, *, model: str | None = None, temperature: float | None = None,
                          max_tokens: int | None = None, tools: int = 0) -> Any:
        attrs: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.request.stream": True,
                                 "callweaver.llm.tools": tools}
        for key, value in (("gen_ai.request.model", model), ("gen_ai.request.temperature", temperature),
                           ("gen_ai.request.max_tokens", max_tokens)):
            if value is not None:
                attrs[key] = value
        return self.tracer.start_span(f"chat {model}" if model else "chat",
                                      context=self._trace.set_span_in_context(parent), attributes=attrs,
                                      kind=self._trace.SpanKind.CLIENT)

    def end_llm_request(self, span: Any, stream: Any) -> None:
        """Provider, TTFT and failovers of a finished (or cancelled) provider stream."""
        provider = stream.provider
        attrs: dict[str, Any] = {"callweaver.llm.failovers": len(stream.failovers),
                                 "callweaver.llm.apology": bool(stream.apology_used)}
        if provider:
            attrs["callweaver.llm.provider"] = provider
            attrs["gen_ai.provider.name"] = _genai_provider(provider)
        if stream.provider_ttft_ms is not None:
            attrs["callweaver.llm.ttft_ms"] = stream.provider_ttft_ms
            attrs["gen_ai.response.time_to_first_chunk"] = stream.provider_ttft_ms / 1000.0
        for failover in stream.failovers:
            span.add_event("llm.failover", {"callweaver.llm.provider": str(failover.get("provider")),
                                            "error.type": str(failover.get("reason")),
                                            "callweaver.llm.spoken_chars": int(failover.get("spoken_chars") or 0)})
        if stream.apology_used:
            attrs["error.type"] = "all_providers_failed"
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, "every provider failed"))
        span.set_attributes(attrs)
        span.end()

    def end_turn(self, span: Any, turn_row: dict) -> None:
        attrs = {"callweaver.source": turn_row.get("source"), "callweaver.provider": turn_row.get("provider"),
                 "callweaver.next_node": turn_row.get("nextNodeId"), "callweaver.action": turn_row.get("action"),
                 "callweaver.first_token_ms": turn_row.get("firstTokenMs"),
                 "callweaver.last_token_ms": turn_row.get("lastTokenMs"),
                 "callweaver.cache_hit": bool(turn_row.get("cacheHit")),
                 "callweaver.interrupted": bool(turn_row.get("interrupted")),
                 "callweaver.failovers": len(turn_row.get("failovers") or [])}
        span.set_attributes({k: v for k, v in attrs.items() if v is not None})
        span.end()

    def record_call(self, record: Any, turns: int) -> None:
        """The call's root span, from when it was placed to when it ended, with the ids its turns point at."""
        start_ns = int(record.created_at * 1e9)
        end_ns = int((record.ended_at or time.time()) * 1e9)
        attrs = {"callweaver.tracking_id": record.tracking_id, "gen_ai.conversation.id": record.tracking_id,
                 "callweaver.path": record.path, "callweaver.status": record.status,
                 "callweaver.language": record.language, "callweaver.turns": turns,
                 "callweaver.end_node": record.current_node, "twilio.call_sid": record.call_sid,
                 "callweaver.workflow_id": record.workflow_id}
        token = self._ids.forced.set(_derived_ids(record.tracking_id))
        try:
            span = self.tracer.start_span("call", context=self._trace.Context(), start_time=start_ns,
                                          attributes={k: v for k, v in attrs.items() if v is not None},
                                          kind=self._trace.SpanKind.SERVER)
        finally:
            self._ids.forced.reset(token)
        if record.status == "failed":
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, "call failed"))
        span.end(end_time=max(end_ns, start_ns))


def build_tracer(endpoint: str | None, *, span_processor: Any = None) -> NullTracer | CallTracer:
    """NullTracer without an endpoint; else an SDK provider batching spans to `<endpoint>/v1/traces` (OTLP/HTTP).

    `span_processor` replaces the OTLP exporter (tests pass one wrapping the SDK's in-memory exporter).
    """
    if not endpoint and span_processor is None:
        return NullTracer()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    ids = _call_id_generator()
    # Other OTEL_* variables (OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES) are read by the SDK itself.
    service = os.environ.get("OTEL_SERVICE_NAME") or "callweaver"
    provider = TracerProvider(resource=Resource.create({"service.name": service}), id_generator=ids)
    if span_processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        span_processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
    provider.add_span_processor(span_processor)
    return CallTracer(provider, ids)
