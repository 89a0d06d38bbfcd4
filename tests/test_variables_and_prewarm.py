"""Variables extracted in the reply's own request drive logical edges; the cache is warm before the caller speaks."""
from __future__ import annotations

import time
import xml.etree.ElementTree as ET

from callweaver import create_app
from tests.conftest import PUBLIC, Signer
from tests.fakes.fake_llm import Reply
from tests.helpers import make_call_body


def _answer(client, twilio, fake_twilio, workflow):
    data = client.post("/api/make-call", json=make_call_body(workflow=workflow)).get_json()
    assert data["success"], data
    url = fake_twilio.creates()[-1].one("Url")[len(PUBLIC):]
    root = ET.fromstring(twilio.post(url, {"CallSid": data["callSid"]}).data)
    return data, root


def test_extracted_variables_are_stored_and_route_logical_edges(app, client, twilio, fake_twilio, fake_llm):
    data, root = _answer(client, twilio, fake_twilio, "loan_prequalification_logical")
    action = root.find("Gather").get("action")[len(PUBLIC):]
    fake_llm.push(Reply(text="Thanks Dana, noted.", tool_calls=[("record_variables", {
        "applicant_name": "Dana Wu", "employment_status": "employed", "annual_income": "82000",
        "loan_amount": 300000})]))
    root = ET.fromstring(twilio.post(action, {"CallSid": data["callSid"],
                                              "SpeechResult": "I'm Dana Wu, employed, 82k a year, want 300k"}).data)
    assert len(fake_llm.requests) == 1
    tools = {t["function"]["name"] for t in fake_llm.requests[0].body["tools"]}
    assert "record_variables" in tools
    record = app.extensions["callweaver"].store.get_call(data["trackingId"])
    assert record.variables == {"applicant_name": "Dana Wu", "employment_status": "employed",
                                "annual_income": 82000.0, "loan_amount": 300000}
    assert record.current_node == "offer_node"  # income >= 50000 and amount <= 500000, no LLM routing call
    # the next prompt is filled with the caller's own variables, so it is never cached for others
    fake_llm.push(Reply(text="Great."))
    twilio.post(action, {"CallSid": data["callSid"], "SpeechResult": "What's the rate?"})
    system = fake_llm.requests[1].messages[0]["content"]
    assert "Dana Wu" in system and "300000" in system


def test_unemployed_caller_reaches_the_decline_end_node(client, twilio, fake_twilio, fake_llm):
    data, root = _answer(client, twilio, fake_twilio, "loan_prequalification_logical")
    action = root.find("Gather").get("action")[len(PUBLIC):]
    fake_llm.push(Reply(text="I see.", tool_calls=[("record_variables", {"employment_status": "unemployed"})]))
    root = ET.fromstring(twilio.post(action, {"CallSid": data["callSid"], "SpeechResult": "I'm between jobs"}).data)
    assert [c.tag for c in root] == ["Say", "Hangup"] and "steady employment" in root.find("Say").text


def test_prewarm_fills_the_cache_while_the_phone_rings(env, fake_twilio, fake_llm):
    app = create_app({**env, "CACHE_PREWARM": "1", "CACHE_TYPE": "SimpleCache"})
    client, twilio = app.test_client(), Signer(app.test_client())
    fake_llm.responder = lambda body: Reply(text="This is Premier Properties. How can I help you today?")
    data = client.post("/api/make-call", json=make_call_body()).get_json()
    utterances = app.extensions["callweaver"].languages.get("en-US").prewarm_utterances
    fake_llm.wait_for_requests(len(utterances), timeout_s=10)
    deadline = time.monotonic() + 10
    cache = app.extensions["callweaver"].reply_cache
    while cache.stats()["puts"] < len(utterances) and time.monotonic() < deadline:
        time.sleep(0.05)
    n = len(fake_llm.requests)
    url = fake_twilio.creates()[-1].one("Url")[len(PUBLIC):]
    root = ET.fromstring(twilio.post(url, {"CallSid": data["callSid"]}).data)
    action = root.find("Gather").get("action")[len(PUBLIC):]
    root = ET.fromstring(twilio.post(action, {"CallSid": data["callSid"], "SpeechResult": "Hello?"}).data)
    assert len(fake_llm.requests) == n  # served from the warm cache: no LLM request
    assert "This is Premier Properties" in root.find("Say").text
    (turn,) = app.extensions["callweaver"].store.turns(data["trackingId"])
    assert turn["cacheHit"] is True and turn["source"] == "cache"


def test_prewarm_stops_when_its_call_ends(env, fake_twilio, fake_llm):
    import threading
    app = create_app({**env, "CACHE_PREWARM": "0", "CACHE_TYPE": "SimpleCache"})
    svc = app.extensions["callweaver"]
    fake_llm.responder = lambda body: Reply(text=" ".join(["word"] * 40), ttft_s=0.05, token_interval_s=0.1)
    data = app.test_client().post("/api/make-call", json=make_call_body()).get_json()
    record = svc.store.get_call(data["trackingId"])
    warming = threading.Thread(target=svc.engine.prewarm, args=(record,), daemon=True)
    warming.start()
    fake_llm.wait_for_requests(1, timeout_s=10)
    svc.store.append_status(record.tracking_id, "completed", 5, {"CallStatus": "completed"})  # caller hung up
    warming.join(timeout=20)
    assert not warming.is_alive()
    assert len(fake_llm.requests) == 1  # the reply in flight was abandoned and no further one was asked for
    assert svc.reply_cache.stats()["puts"] == 0


def test_prewarm_goes_on_past_an_opening_line_the_model_answers_without_words(env, fake_twilio, fake_llm,
                                                                             fake_llm2):
    """A wordless reply from every provider gets the apology too, but it is one bad reply, not every provider down:
    the other opening lines are still warmed."""
    app = create_app({**env, "CACHE_PREWARM": "0", "CACHE_TYPE": "SimpleCache"})
    svc = app.extensions["callweaver"]
    utterances = svc.languages.get("en-US").prewarm_utterances
    fake_llm.responder = fake_llm2.responder = lambda body: Reply(
        text=" " if body["messages"][-1]["content"] == utterances[0] else "Hello there! How can I help?")
    data = app.test_client().post("/api/make-call", json=make_call_body()).get_json()
    stored = svc.engine.prewarm(svc.store.get_call(data["trackingId"]))
    assert stored == len(utterances) - 1
