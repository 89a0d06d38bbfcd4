"""An optimized call is placed with its relay TwiML inline (the create's `Twiml`): Twilio runs it on answer without
requesting /api/twiml-optimized. The URL stays for what inline TwiML cannot carry: a TwiML over Twilio's 4000
characters, a request's own `twimlUrl`, the traditional <Gather> flow (whose every turn is a webhook)."""
from __future__ import annotations

from urllib.parse import urlsplit
from xml.etree import ElementTree

import pytest
import websocket

from callweaver.simulate import RelayCaller
from callweaver.twilio_client import MAX_INLINE_TWIML_CHARS, TwilioGateway, fits_inline
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC, Signer, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body, twiml_optimized_path


def _with_greeting(body: dict, greeting: str) -> dict:
    for node in body["nodes"]:
        if node["type"] == "startNode":
            node["data"]["firstMessage"] = greeting
    return body


def _webhook_answer(client, call_sid: str, tracking_id: str) -> str:
    """What /api/twiml-optimized answers for the call (the URL make-call would have given Twilio)."""
    path = f"/api/twiml-optimized?id=wf_real_estate_property_dealer&trackingId={tracking_id}"
    resp = Signer(client).post(path, {"AccountSid": ACCOUNT_SID, "CallSid": call_sid, "CallStatus": "in-progress"})
    assert resp.status_code == 200
    return resp.get_data(as_text=True)


def test_an_optimized_call_is_placed_with_the_webhooks_twiml_inline(app, client, fake_twilio):
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    assert data["success"], data
    tracking_id = data["optimization"]["trackingId"]
    (create,) = fake_twilio.creates()
    assert create.one("Url") is None and create.one("Method") is None  # Twilio fetches nothing on answer
    twiml = create.one("Twiml")
    assert twiml and len(twiml) <= MAX_INLINE_TWIML_CHARS
    # Byte for byte what the webhook answers for the same call: one builder, the same TwiML either way.
    assert twiml == _webhook_answer(client, data["callSid"], tracking_id)
    relay_url = urlsplit(twiml.split('url="', 1)[1].split('"', 1)[0].replace("&amp;", "&"))
    assert relay_url.path == "/api/conversationrelay-ws" and relay_url.query == f"trackingId={tracking_id}"
    assert f'action="{PUBLIC}/api/connect-action?trackingId={tracking_id}"' in twiml  # absolute, as Twilio needs
    assert create.one("StatusCallback") == f"{PUBLIC}/api/call-status-optimized?trackingId={tracking_id}"
    # The call's state is what the webhook would have left: the SID stored, nothing more to write on answer.
    record = app.extensions["callweaver"].store.get_call(tracking_id)
    assert record.call_sid == data["callSid"]


def test_a_twiml_over_twilios_limit_is_placed_with_the_url(client, fake_twilio):
    greeting = ("Welcome to Premier Properties. " * 140).strip()  # ~4300 characters: the TwiML cannot fit
    data = client.post("/api/make-call-optimized", json=_with_greeting(make_call_body(), greeting)).get_json()
    assert data["success"], data
    (create,) = fake_twilio.creates()
    assert create.one("Twiml") is None and create.one("Method") == "POST"
    # The URL exactly as make-call gave it before the TwiML went inline: PUBLIC_BASE_URL's, naming flow and call.
    tracking_id = data["optimization"]["trackingId"]
    assert create.one("Url") == PUBLIC + twiml_optimized_path(tracking_id)
    assert create.one("StatusCallback") == f"{PUBLIC}/api/call-status-optimized?trackingId={tracking_id}"
    answer = _webhook_answer(client, data["callSid"], data["optimization"]["trackingId"])
    assert len(answer) > MAX_INLINE_TWIML_CHARS and greeting in answer


def test_a_twiml_twilio_refuses_as_too_long_is_placed_again_with_the_url(app, client, fake_twilio):
    """Twilio documents "4000 characters", not how it counts them: a TwiML it counts longer than `fits_inline` does
    (its error 32018) places the call with the URL, as before the TwiML went inline, rather than not at all."""
    fake_twilio.max_twiml_chars = 1000  # a Twilio counting this TwiML as over its limit
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    assert data["success"], data
    tracking_id = data["optimization"]["trackingId"]
    refused, placed = fake_twilio.creates()
    assert refused.one("Twiml") and refused.one("Url") is None
    assert placed.one("Twiml") is None and placed.one("Method") == "POST"
    assert placed.one("Url") == PUBLIC + twiml_optimized_path(tracking_id)
    assert {k: v for k, v in placed.params.items() if k not in ("Url", "Method")} == \
        {k: v for k, v in refused.params.items() if k != "Twiml"}  # every other parameter as sent the first time
    assert list(fake_twilio.placed) == [data["callSid"]]
    record = app.extensions["callweaver"].store.get_call(tracking_id)
    assert record.call_sid == data["callSid"] and record.status != "failed"


def test_a_twiml_of_exactly_4000_characters_goes_inline_and_one_more_does_not(client, fake_twilio):
    data = client.post("/api/make-call-optimized", json=make_call_body()).get_json()
    size = len(fake_twilio.creates()[-1].one("Twiml"))
    base = "Hello! Thank you for calling Premier Properties. I'm your AI assistant here to help you find your " \
           "perfect property. How may I assist you today?"
    room = MAX_INLINE_TWIML_CHARS - size
    fits = base + " " + "x" * (room - 1)  # the TwiML exactly 4000 characters long
    client.post("/api/make-call-optimized", json=_with_greeting(make_call_body(), fits))
    assert len(fake_twilio.creates()[-1].one("Twiml")) == MAX_INLINE_TWIML_CHARS
    client.post("/api/make-call-optimized", json=_with_greeting(make_call_body(), fits + "x"))
    assert fake_twilio.creates()[-1].one("Twiml") is None and fake_twilio.creates()[-1].one("Url")
    assert data["success"]


def test_a_request_twiml_url_and_the_gather_flow_keep_the_url(client, fake_twilio):
    client.post("/api/make-call-optimized", json=make_call_body(twimlUrl="/api/twiml-ai?id=wf_other"))
    client.post("/api/make-call", json=make_call_body())
    optimized, traditional = fake_twilio.creates()
    assert optimized.one("Twiml") is None and optimized.one("Url") == f"{PUBLIC}/api/twiml-ai?id=wf_other"
    assert traditional.one("Twiml") is None and urlsplit(traditional.one("Url")).path == "/api/twiml-ai"


def test_the_limit_counts_what_twilio_counts_and_the_gateway_falls_back():
    assert fits_inline("a" * MAX_INLINE_TWIML_CHARS) and not fits_inline("a" * (MAX_INLINE_TWIML_CHARS + 1))
    # A character outside the BMP is two UTF-16 units: counted as two, the stricter reading of "characters".
    assert not fits_inline("\U0001F600" * (MAX_INLINE_TWIML_CHARS // 2 + 1))
    assert fits_inline("é" * MAX_INLINE_TWIML_CHARS)
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    try:
        gateway = TwilioGateway(ACCOUNT_SID, AUTH_TOKEN, twilio.url)
        common = {"to": "+15551234567", "from_number": "+15005550006", "url": f"{PUBLIC}/api/twiml-optimized",
                  "status_callback": f"{PUBLIC}/api/call-status-optimized", "timeout_s": 30, "time_limit_s": 60,
                  "record": False}
        small = "<Response><Hangup/></Response>"
        assert gateway.create_call(**common, twiml=small).inline_twiml
        assert not gateway.create_call(**common, twiml="<Response>" + "x" * 4000 + "</Response>").inline_twiml
        assert not gateway.create_call(**common).inline_twiml
        inline, too_long, plain = twilio.creates()
        assert inline.one("Twiml") == small and inline.one("Url") is None
        assert too_long.one("Twiml") is None and too_long.one("Url") == common["url"]
        assert plain.one("Url") == common["url"] and plain.one("Method") == "POST"
    finally:
        twilio.stop()


def test_the_stand_in_refuses_what_twilio_refuses(fake_twilio):
    """Twilio's answers to a create with no TwiML to run (21205) and to one with too long a Twiml (32018)."""
    import requests

    calls = f"{fake_twilio.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
    form = {"To": "+15551234567", "From": "+15005550006"}
    none = requests.post(calls, data=form, auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=5)
    long = requests.post(calls, data={**form, "Twiml": "x" * 4001}, auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=5)
    ok = requests.post(calls, data={**form, "Twiml": "x" * 4000}, auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=5)
    assert (none.status_code, none.json()["code"]) == (400, 21205)
    assert (long.status_code, long.json()["code"]) == (400, 32018)
    assert ok.status_code == 201 and fake_twilio.placed[ok.json()["sid"]].one("Twiml") == "x" * 4000


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inline")
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    llm = FakeLLM("primary").start()
    env = base_env(tmp, twilio, llm)
    env.pop("PUBLIC_BASE_URL")
    server = LiveServer(env, workers=1).start()
    yield {"server": server, "twilio": twilio, "llm": llm}
    server.stop()
    twilio.stop()
    llm.stop()


def test_a_call_placed_inline_talks_end_to_end_with_no_twiml_webhook(live):
    server, twilio, llm = live["server"], live["twilio"], live["llm"]
    llm.push(Reply(text="We have three homes in that area."))
    caller = RelayCaller(server.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
    caller.place_call(make_call_body())
    create = twilio.placed[caller.call_sid]
    assert create.one("Url") is None and create.one("Twiml")
    caller.answer_placed(create)  # Twilio runs the TwiML it was given: no request reaches CallWeaver
    assert caller.twiml.url.endswith(f"/api/conversationrelay-ws?trackingId={caller.tracking_id}")
    assert caller.twiml.attributes["welcomeGreeting"].startswith("Hello! Thank you for calling Premier Properties")
    caller.connect()  # the upgrade is signed for the URL in the inline TwiML, as for a fetched one
    reply = caller.say("Do you have homes downtown?")
    caller.hangup()
    assert reply.text == "We have three homes in that area."
    assert "/api/twiml-optimized" not in server.logs()


def test_an_unsigned_upgrade_to_the_inline_relay_url_is_refused(live):
    server, twilio = live["server"], live["twilio"]
    caller = RelayCaller(server.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
    caller.place_call(make_call_body())
    caller.answer_placed(twilio.placed[caller.call_sid])
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        caller.connect(sign=False)
    assert err.value.status_code == 403


def test_the_inline_twiml_drops_characters_xml_cannot_carry_as_the_webhook_does(client, fake_twilio):
    """A flow's greeting is the web app's text: a vertical tab or U+FFFE pasted into it made the webhook's answer drop
    them (twiml_response), but the TwiML sent inline carried them raw, a TwiML no XML parser (Twilio's) reads."""
    greeting = "Welcome\x0b to Premier\ufffe Properties\x01. How can I help?"
    data = client.post("/api/make-call-optimized", json=_with_greeting(make_call_body(), greeting)).get_json()
    assert data["success"], data
    (create,) = fake_twilio.creates()
    twiml = create.one("Twiml")
    assert twiml is not None
    relay = ElementTree.fromstring(twiml).find("Connect/ConversationRelay")
    assert relay.get("welcomeGreeting") == "Welcome to Premier Properties. How can I help?"
    assert twiml == _webhook_answer(client, data["callSid"], data["optimization"]["trackingId"])
