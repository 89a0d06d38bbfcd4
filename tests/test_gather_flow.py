"""The traditional <Gather> flow end to end through signed webhooks, and the one-request-per-turn rule."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from urllib.parse import parse_qsl, urlsplit

import pytest
import structlog.testing

from callweaver import create_app
from tests.conftest import PUBLIC, Signer
from tests.helpers import load_workflow, make_call_body
from tests.scripted_brain import real_estate_brain


def _twiml(resp):
    assert resp.status_code == 200, resp.data
    assert resp.headers["Content-Type"].startswith("text/xml")
    return ET.fromstring(resp.data)


class GatherCall:
    """Twilio's side of a traditional call, driven through the Flask test client with signed webhooks."""

    def __init__(self, app, client, twilio, fake_twilio, body: dict | None = None):
        self.app, self.client, self.twilio = app, client, twilio
        data = client.post("/api/make-call", json=body or make_call_body()).get_json()
        assert data["success"], data
        self.call_sid, self.tracking_id = data["callSid"], data["trackingId"]
        self.url = fake_twilio.creates()[-1].one("Url")
        self.path = self.url[len(PUBLIC):]

    def answer(self):
        return _twiml(self.twilio.post(self.path, {"CallSid": self.call_sid, "CallStatus": "in-progress"}))

    def say(self, root, speech):
        gather = root.find("Gather")
        assert gather is not None, ET.tostring(root)
        action = gather.get("action")
        assert action.startswith(PUBLIC + "/api/twiml-ai?"), action  # absolute action URL
        return _twiml(self.twilio.post(action[len(PUBLIC):], {"CallSid": self.call_sid, "SpeechResult": speech,
                                                               "Confidence": "0.93"}))

    @property
    def record(self):
        return self.app.extensions["callweaver"].store.get_call(self.tracking_id)


@pytest.fixture
def call(app, client, twilio, fake_twilio, fake_llm):
    fake_llm.responder = real_estate_brain
    return GatherCall(app, client, twilio, fake_twilio)


def said(root) -> str:
    return " ".join((s.text or "") for s in root.iter("Say"))


def test_greeting_is_first_message_without_llm_and_gather_pattern(call, fake_llm):
    root = call.answer()
    says = root.findall("Say")
    assert says[0].text.startswith("Hello! Thank you for calling Premier Properties")
    assert says[0].get("language") == "en-US" and says[0].get("voice")
    gathers = root.findall("Gather")
    assert len(gathers) == 2 and gathers[0].get("input") == "speech"  # re-prompt once, then goodbye
    # after the second silence Twilio is sent back for the goodbye, so the call is known to have ended on silence
    assert [c.tag for c in root][-1] == "Redirect"
    assert fake_llm.requests == []
    # Each silence lasts the flow's globalSettings.silenceTimeout (10 s), as on a relay call
    assert [g.get("timeout") for g in gathers] == ["10", "10"]


def test_gather_timeout_is_the_servers_silence_timeout_when_the_flow_gives_none(env, fake_twilio):
    app = create_app({**env, "SILENCE_TIMEOUT_S": "7"})
    body = make_call_body()
    del body["config"]["globalSettings"]["silenceTimeout"]
    client = app.test_client()
    assert client.post("/api/make-call", json=body).get_json()["success"]
    root = _twiml(Signer(client).post(fake_twilio.creates()[-1].one("Url")[len(PUBLIC):], {"CallStatus": "in-progress"}))
    assert [g.get("timeout") for g in root.findall("Gather")] == ["7", "7"]


def test_buyer_path_to_end_node_with_one_llm_request_per_turn(call, fake_llm):
    root = call.answer()
    path = [call.record.current_node]
    turns = ["I want to buy a house", "A three bedroom house near good schools",
             "My name is Ann Lee, my number is 555 0100", "That's everything, thanks"]
    for i, speech in enumerate(turns, start=1):
        root = call.say(root, speech)
        assert len(fake_llm.requests) == i, "exactly one LLM request per caller turn"
        path.append(call.record.current_node)
    assert path == ["inquiry_type_node", "buyer_requirements_node", "contact_details_node",
                    "summary_confirmation_node", "end_call_node"]
    end_message = load_workflow()["nodes"][-1]["data"]["endMessage"]
    assert end_message in said(root)
    assert [c.tag for c in root] == ["Say", "Hangup"]
    # routing rode in the same request: the tools offered at the inquiry node were the four branches
    first = fake_llm.requests[0].body
    assert {t["function"]["name"] for t in first["tools"]} >= {"transition"}
    assert first["stream"] is True
    # history as heard went into later requests
    later = fake_llm.requests[2].messages
    assert any(m["role"] == "user" and "three bedroom" in m["content"] for m in later)
    assert later[0]["role"] == "system" and "Premier Properties" in later[0]["content"]


@pytest.mark.parametrize("speech,node", [("I'd like to sell my condo", "seller_details_node"),
                                         ("We want to rent an apartment", "rental_requirements_node"),
                                         ("I want to invest in property", "investment_consultation_node")])
def test_inquiry_branches(call, speech, node):
    root = call.answer()
    call.say(root, speech)
    assert call.record.current_node == node


def test_transfer_path_dials_the_destination(call, fake_llm):
    root = call.answer()
    for speech in ["I want to buy", "A three bedroom house", "My name is Bo"]:
        root = call.say(root, speech)
    root = call.say(root, "Can I talk to a human please")
    transfer = next(n for n in load_workflow()["nodes"] if n["type"] == "transferCall")["data"]
    assert transfer["transferMessage"] in said(root)
    dial = root.find("Dial")
    assert dial is not None and dial.text == transfer["destination"]
    assert call.record.current_node == "transfer_to_agent_node"


def test_goodbye_phrase_ends_without_llm(call, fake_llm):
    root = call.answer()
    root = call.say(root, "ok bye!")
    assert fake_llm.requests == []
    assert "Premier Properties" in said(root) and [c.tag for c in root][-1] == "Hangup"


def test_every_provider_down_speaks_apology_and_the_call_goes_on(call, fake_llm, fake_llm2):
    fake_llm.fault = "500"
    fake_llm2.fault = "500"
    root = call.answer()
    root = call.say(root, "I want to buy a house")
    assert "trouble" in said(root).lower()
    assert root.find("Gather") is not None  # still listening
    fake_llm.fault = fake_llm2.fault = None
    fake_llm2.responder = real_estate_brain
    root = call.say(root, "I want to buy a house")
    assert call.record.current_node == "buyer_requirements_node"


def boom(*args, **kwargs):
    """A step of a webhook that fails (monkeypatched in): what a bug does."""
    raise RuntimeError("injected failure")


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def test_a_turn_that_fails_is_apologised_for_in_the_calls_voice_and_listened_to_again(app, client, twilio,
                                                                                       fake_twilio, fake_llm,
                                                                                       monkeypatch):
    """Any answer but 200 TwiML makes Twilio say "an application error has occurred" and end the call: a turn
    that raises is answered with the call's own apology, and the caller is listened to again (a new turn)."""
    fake_llm.responder = real_estate_brain
    call = GatherCall(app, client, twilio, fake_twilio, make_call_body(language="es-ES"))
    root = call.answer()
    asked = _query(root.find("Gather").get("action"))
    engine = app.extensions["callweaver"].engine
    real_turn = engine.answer_whole_turn

    monkeypatch.setattr(engine, "answer_whole_turn", boom)
    with structlog.testing.capture_logs() as logs:
        root = call.say(root, "Quiero comprar una casa")
    spanish = app.extensions["callweaver"].languages.get("es-ES")
    first = root.find("Say")
    assert (first.text, first.get("voice"), first.get("language")) == (
        spanish.line("apology"), spanish.say_voice, spanish.say_language)
    gather = root.find("Gather")
    assert gather is not None and gather.get("language") == spanish.gather_language, ET.tostring(root)
    again = _query(gather.get("action"))
    assert urlsplit(gather.get("action")).path == "/api/twiml-ai"
    assert (again["id"], again["trackingId"]) == (asked["id"], asked["trackingId"])
    assert int(again["turn"]) == int(asked["turn"]) + 1  # the failed turn may be claimed: the next one is asked
    [line] = [e for e in logs if e["event"] == "twiml_error_answered"]
    assert line["error"] == "RuntimeError" and line["answer"] == "listen" and line["path"] == "/api/twiml-ai"

    # Once the fault is gone, the listen the apology asked for carries on the call.
    monkeypatch.setattr(engine, "answer_whole_turn", real_turn)
    root = call.say(root, "I want to buy a house")
    assert root.find("Gather") is not None and call.record.current_node == "buyer_requirements_node", said(root)

    # A fault that lasts: the listen after the apology fails too, and the call ends rather than loop on apologies.
    monkeypatch.setattr(engine, "answer_whole_turn", boom)
    root = call.say(root, "three bedrooms")
    assert root.find("Gather") is not None
    with structlog.testing.capture_logs() as logs:
        ended = call.say(root, "three bedrooms")
    assert [c.tag for c in ended] == ["Say", "Hangup"] and ended.find("Say").text == spanish.line("apology")
    assert [e["answer"] for e in logs if e["event"] == "twiml_error_answered"] == ["hangup"]
    # CallWeaver ended it with an apology: the call log says error, not that the caller hung up.
    assert call.record.meta.get("endReason") == "error"


def test_a_blank_listen_between_two_failures_does_not_restart_the_apologies(call, app, monkeypatch):
    """The listen after an apology may hear nothing it can transcribe (a blank SpeechResult): its re-prompt is still
    the listen after that apology, so the next failure hangs up rather than apologising again, for ever."""
    engine = app.extensions["callweaver"].engine
    monkeypatch.setattr(engine, "answer_whole_turn", boom)
    root = call.say(call.answer(), "I want to buy a house")
    assert _query(root.find("Gather").get("action"))["apologised"] == "1"
    reprompt = call.say(root, "")
    assert _query(reprompt.find("Gather").get("action")).get("apologised") == "1", ET.tostring(reprompt)
    ended = call.say(reprompt, "I want to buy a house")
    assert [c.tag for c in ended] == ["Say", "Hangup"]


def test_relay_webhooks_that_fail_apologise_in_the_calls_voice_and_hang_up(app, client, twilio, fake_twilio,
                                                                           monkeypatch, capsys):
    data = client.post("/api/make-call-optimized", json=make_call_body(language="es-ES")).get_json()
    tracking_id = data["optimization"]["trackingId"]
    lifecycle = app.extensions["callweaver"].lifecycle

    monkeypatch.setattr(lifecycle, "attach_call_sid", boom)
    monkeypatch.setattr(lifecycle, "try_resume", boom)
    spanish = app.extensions["callweaver"].languages.get("es-ES")
    for path, form in ((f"/api/twiml-optimized?id=wf_x&trackingId={tracking_id}", {"CallSid": data["callSid"]}),
                       (f"/api/connect-action?trackingId={tracking_id}", {"CallSid": data["callSid"],
                                                                          "SessionStatus": "failed"})):
        with structlog.testing.capture_logs() as logs:
            root = _twiml(twilio.post(path, form))
        assert [c.tag for c in root] == ["Say", "Hangup"], ET.tostring(root)
        assert (root.find("Say").text, root.find("Say").get("voice")) == (spanish.line("apology"), spanish.say_voice)
        [line] = [e for e in logs if e["event"] == "twiml_error_answered"]
        assert line["error"] == "RuntimeError" and line["answer"] == "hangup"
        store = app.extensions["callweaver"].store
        assert store.get_call(tracking_id).meta.get("endReason") == "error", path
        store.update_meta(tracking_id, remove=["endReason"])
    # As written to the log: whether the request's signature was checked is readable, never redacted as a secret.
    capsys.readouterr()
    twilio.post(f"/api/twiml-optimized?id=wf_x&trackingId={tracking_id}", {"CallSid": data["callSid"]})
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "twiml_error_answered" in line]
    assert line["call_verified"] is True, line


def test_turn_timings_are_stored_per_turn(call, app):
    root = call.answer()
    call.say(root, "I want to buy a house")
    (turn,) = app.extensions["callweaver"].store.turns(call.tracking_id)
    assert turn["path"] == "traditional" and turn["source"] == "llm" and turn["provider"] == "azure"
    assert turn["firstTokenMs"] > 0 and turn["providerTtftMs"] is not None
    assert turn["nodeId"] == "inquiry_type_node" and turn["nextNodeId"] == "buyer_requirements_node"


def test_unsigned_twiml_webhook_is_403(call):
    resp = call.twilio.post(call.path, {"CallSid": call.call_sid}, sign=False)
    assert resp.status_code == 403


def test_twiml_optimized_for_an_unknown_call_falls_back_to_the_gather_flow(twilio):
    root = _twiml(twilio.post("/api/twiml-optimized?id=wf_x&trackingId=call_unknown", {"CallSid": "CA" + "1" * 32}))
    assert root.find("Connect") is None
    gather = root.find("Gather")
    assert gather is not None and "/api/twiml-ai?id=wf_x" in gather.get("action")


def test_connect_action_closing_lines(app, client, twilio, fake_twilio):
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    path = f"/api/connect-action?trackingId={data['optimization']['trackingId']}"
    caller_hung_up = _twiml(twilio.post(path, {"CallSid": data["callSid"], "SessionStatus": "completed",
                                               "SessionDuration": "42"}))
    assert [c.tag for c in caller_hung_up] == ["Say", "Hangup"]
    legacy = _twiml(twilio.post(path, {"CallSid": data["callSid"], "ConnectStatus": "completed",
                                       "ConnectDuration": "12"}))
    assert [c.tag for c in legacy] == ["Say", "Hangup"]
    weird = _twiml(twilio.post(path, {"CallSid": data["callSid"], "SessionStatus": "ended",
                                      "HandoffData": '"not an object"'}))
    assert weird.find("Hangup") is not None
    blocked = _twiml(twilio.post(path, {"CallSid": data["callSid"], "SessionStatus": "ended",
                                        "HandoffData": '{"reason": "transfer", "destination": "+882345678901"}'}))
    assert blocked.find("Dial") is None and blocked.find("Hangup") is not None  # outside allowed prefixes


def test_twiml_default_is_a_signed_twilio_route(client, twilio):
    assert client.post("/api/twiml-default").status_code == 403
    root = _twiml(twilio.post("/api/twiml-default", {"CallSid": "CA" + "2" * 32}))
    assert [c.tag for c in root] == ["Say", "Pause", "Say"]
    assert _twiml(twilio.get("/api/twiml-default")).find("Say") is not None


def test_a_turn_that_raised_is_no_longer_due_so_an_ended_calls_report_does_not_wait_for_it(call, app, monkeypatch):
    """A claimed turn says by when it will be committed, and an ended call's report waits for it: a turn whose
    webhook failed (answered with the apology) will never be committed, and says so."""
    from callweaver.gather_turns import GatherTurns
    engine = app.extensions["callweaver"].engine
    monkeypatch.setattr(engine, "answer_whole_turn", boom)
    root = call.say(call.answer(), "I want to buy a house")
    assert _query(root.find("Gather").get("action"))["apologised"] == "1"
    assert GatherTurns.due(call.record) is None
    monkeypatch.undo()
    call.say(root, "I want to buy a house")  # a turn that went well is not due either
    assert GatherTurns.due(call.record) is None and len(app.extensions["callweaver"].store.turns(call.tracking_id)) == 1
