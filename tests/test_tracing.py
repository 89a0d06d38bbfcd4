"""OpenTelemetry: a real scripted call is one trace (call → turns → cache lookup and LLM request), its log lines
carry the trace id, spans reach the OTLP endpoint; with the variable unset nothing of OpenTelemetry is loaded."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from callweaver import create_app
from callweaver.engine.tracing import trace_id_hex
from callweaver.simulate import RelayCaller
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, Signer, base_env
from tests.fakes.live_server import REPO, LiveServer
from tests.fakes.report_receiver import ReportReceiver
from tests.scripted_brain import real_estate_brain
from tests.helpers import make_call_body
from tests.test_gather_flow import GatherCall

QUESTION = "What are your opening hours?"  # no routing: the reply is cached for the entry node


@pytest.fixture
def collector():
    receiver = ReportReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def traced(env, collector, fake_llm, fake_llm2):
    app = create_app({**env, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.base_url, "CACHE_TYPE": "SimpleCache",
                      "LOG_LEVEL": "INFO"})
    memory = InMemorySpanExporter()
    svc = app.extensions["callweaver"]
    svc.tracer.provider.add_span_processor(SimpleSpanProcessor(memory))
    fake_llm.responder = fake_llm2.responder = real_estate_brain
    yield app, memory
    svc.tracer.provider.shutdown()


def end(twilio, call, sequence: int = 2) -> None:
    resp = twilio.post(f"/api/call-status?trackingId={call.tracking_id}",
                       {"CallSid": call.call_sid, "CallStatus": "completed", "SequenceNumber": str(sequence)})
    assert resp.status_code == 200


def test_a_scripted_call_is_one_trace_of_turns_with_cache_and_llm_spans(traced, fake_twilio, fake_llm, collector,
                                                                        capsys):
    app, memory = traced
    client = app.test_client()
    twilio = Signer(client)
    fake_llm.fault = "500"  # the first turn fails over from azure to openai
    first = GatherCall(app, client, twilio, fake_twilio)
    root = first.say(first.answer(), QUESTION)
    fake_llm.fault = None
    first.say(root, "I want to buy a house")
    end(twilio, first)
    second = GatherCall(app, client, twilio, fake_twilio)
    second.say(second.answer(), QUESTION)  # answered from the reply cache
    end(twilio, second)

    spans = memory.get_finished_spans()
    by_trace = defaultdict(list)
    for span in spans:
        by_trace[f"{span.context.trace_id:032x}"].append(span)
    assert set(by_trace) == {trace_id_hex(first.tracking_id), trace_id_hex(second.tracking_id)}

    def tree(trace_spans):
        (call,) = [s for s in trace_spans if s.parent is None]
        children = defaultdict(list)
        for s in trace_spans:
            if s.parent is not None:
                children[s.parent.span_id].append(s)
        return call, children

    call, children = tree(by_trace[trace_id_hex(first.tracking_id)])
    assert call.name == "call" and call.attributes["callweaver.tracking_id"] == first.tracking_id
    assert call.attributes["callweaver.turns"] == 2 and call.attributes["callweaver.status"] == "completed"
    turns = sorted(children[call.context.span_id], key=lambda s: s.start_time)
    assert [t.name for t in turns] == ["turn", "turn"]
    assert all(call.start_time <= t.start_time and t.end_time <= call.end_time for t in turns)
    stored = app.extensions["callweaver"].store.turns(first.tracking_id)
    for turn, row in zip(turns, stored):
        assert sorted(c.name for c in children[turn.context.span_id]) == ["cache.lookup", "chat gpt-4o-mini"]
        assert turn.attributes["callweaver.first_token_ms"] == row["firstTokenMs"]
        assert turn.attributes["callweaver.node"] == row["nodeId"]
        assert turn.attributes["gen_ai.conversation.id"] == first.tracking_id
    assert turns[1].attributes["callweaver.next_node"] == "buyer_requirements_node"
    chat1 = next(c for c in children[turns[0].context.span_id] if c.name.startswith("chat"))
    assert chat1.attributes["gen_ai.operation.name"] == "chat" and chat1.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert chat1.attributes["callweaver.llm.provider"] == "openai" and chat1.attributes["gen_ai.provider.name"] == "openai"
    assert chat1.attributes["callweaver.llm.failovers"] == 1
    assert chat1.attributes["callweaver.llm.ttft_ms"] == stored[0]["providerTtftMs"]
    assert chat1.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(stored[0]["providerTtftMs"] / 1000)
    (failover,) = chat1.events
    assert failover.name == "llm.failover" and failover.attributes["callweaver.llm.provider"] == "azure"
    assert failover.attributes["error.type"] == stored[0]["failovers"][0]["reason"]
    chat2 = next(c for c in children[turns[1].context.span_id] if c.name.startswith("chat"))
    assert chat2.attributes["callweaver.llm.provider"] == "azure" and chat2.attributes["callweaver.llm.failovers"] == 0
    lookups = [c for t in turns for c in children[t.context.span_id] if c.name == "cache.lookup"]
    assert [c.attributes["callweaver.cache.hit"] for c in lookups] == [False, False]

    call2, children2 = tree(by_trace[trace_id_hex(second.tracking_id)])
    (turn,) = children2[call2.context.span_id]
    (lookup,) = children2[turn.context.span_id]  # a cache hit: no LLM request
    assert lookup.name == "cache.lookup" and lookup.attributes["callweaver.cache.hit"] is True
    assert turn.attributes["callweaver.cache_hit"] is True and turn.attributes["callweaver.source"] == "cache"

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    about_first = [line for line in lines if line.get("tracking_id") == first.tracking_id]
    assert {"turn_completed", "call_status"} <= {line["event"] for line in about_first}
    assert {line["trace_id"] for line in about_first} == {trace_id_hex(first.tracking_id)}

    app.extensions["callweaver"].tracer.provider.force_flush()
    exported = set()
    for post in collector.wait_for(1):
        assert post.path == "/v1/traces" and post.headers["content-type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(post.body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
            assert service == "callweaver"
            exported |= {s.name for scope in resource_spans.scope_spans for s in scope.spans}
    assert exported == {"call", "turn", "cache.lookup", "chat gpt-4o-mini"}


def test_without_the_endpoint_nothing_of_opentelemetry_is_loaded(env):
    code = ("import sys, json\n"
            "from callweaver import create_app\n"
            f"app = create_app({json.dumps(env)})\n"
            "svc = app.extensions['callweaver']\n"
            "print(svc.tracer.enabled, sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False []"


def test_relay_call_on_the_production_server_exports_its_trace_over_otlp(tmp_path, fake_twilio, fake_llm, collector):
    """gunicorn, gevent workers, the batch processor's greenlet: spans of a relay call reach the collector."""
    env = {**base_env(tmp_path, fake_twilio, fake_llm), "OTEL_EXPORTER_OTLP_ENDPOINT": collector.base_url,
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    env.pop("PUBLIC_BASE_URL")
    fake_llm.responder = real_estate_brain
    server = LiveServer(env, workers=1).start()
    try:
        caller = RelayCaller(server.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
        caller.place_call(make_call_body())
        caller.answer_placed(fake_twilio.creates()[-1])
        caller.connect()
        caller.say("I want to buy a house")
        caller.say("A three bedroom house, please")
        caller.hangup()
        assert caller.status("completed", 3).status == 200
        spans: dict[str, list] = defaultdict(list)
        deadline = time.monotonic() + 20
        while len(spans["call"]) < 1 and time.monotonic() < deadline:
            spans.clear()
            for post in collector.reports:
                for resource_spans in ExportTraceServiceRequest.FromString(post.body).resource_spans:
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            spans[span.name.split(" ")[0]].append(span)
            time.sleep(0.05)
    finally:
        server.stop()
    (call,) = spans["call"]
    assert call.trace_id.hex() == trace_id_hex(caller.tracking_id) and not call.parent_span_id
    assert len(spans["turn"]) == 2 and len(spans["chat"]) == 2 and len(spans["cache.lookup"]) == 2
    assert all(t.parent_span_id == call.span_id and t.trace_id == call.trace_id for t in spans["turn"])
    turn_ids = {t.span_id for t in spans["turn"]}
    assert all(c.parent_span_id in turn_ids for c in spans["chat"] + spans["cache.lookup"])
