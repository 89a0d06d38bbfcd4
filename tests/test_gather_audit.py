"""The traditional <Gather> path as real Twilio and real callers drive it: retried webhooks, late replies,
odd parameters, ended calls, text XML cannot carry."""
from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET

import pytest

from callweaver import create_app
from tests.conftest import PUBLIC, Signer
from tests.fakes.fake_llm import Reply
from tests.helpers import make_call_body
from tests.scripted_brain import real_estate_brain
from tests.test_gather_flow import GatherCall, _twiml, boom, said


@pytest.fixture
def call(app, client, twilio, fake_twilio, fake_llm):
    fake_llm.responder = real_estate_brain
    return GatherCall(app, client, twilio, fake_twilio)


def _action(root) -> str:
    return root.find("Gather").get("action")[len(PUBLIC):]


def _store(app):
    return app.extensions["callweaver"].store


def test_a_retried_gather_webhook_runs_the_turn_once_and_gets_the_same_answer(call, app, fake_llm):
    """Twilio retries a webhook whose answer it did not get (its connection overrides: rc/rp): the same action URL
    with the same SpeechResult. The caller said it once: one LLM request, one stored turn, one step of the flow."""
    root = call.answer()
    action = _action(root)
    form = {"CallSid": call.call_sid, "SpeechResult": "I want to buy a house", "Confidence": "0.93"}
    first = call.twilio.post(action, form)
    again = call.twilio.post(action, form)
    assert again.status_code == 200 and again.data == first.data  # what Twilio never received, exactly
    assert len(fake_llm.requests) == 1
    assert len(_store(app).turns(call.tracking_id)) == 1
    record = call.record
    assert [m["content"] for m in record.messages if m["role"] == "user"] == ["I want to buy a house"]
    assert record.current_node == "buyer_requirements_node"
    # the conversation goes on from the answer Twilio got on the retry
    call.say(_twiml(again), "A three bedroom house near good schools")
    assert call.record.current_node == "contact_details_node" and len(fake_llm.requests) == 2


def test_the_same_words_said_again_on_the_next_turn_are_a_new_turn(call, app, fake_llm):
    """Only a retry is deduplicated: a caller repeating themselves at the next prompt is answered again."""
    root = call.answer()
    root = call.say(root, "tell me more")
    root = call.say(root, "tell me more")
    assert len(fake_llm.requests) == 2 and len(_store(app).turns(call.tracking_id)) == 2


def test_a_retry_that_arrives_while_the_first_attempt_still_runs_waits_for_its_answer(call, app, fake_llm):
    """Twilio gave up on a slow first attempt and retried: the turn is not run a second time in parallel."""
    root = call.answer()
    action = _action(root)
    fake_llm.responder = lambda body: Reply(text="Wonderful, let's find you a home.", ttft_s=0.8,
                                            tool_calls=[("transition", {"edge_id": "edge_2"})])
    form = {"CallSid": call.call_sid, "SpeechResult": "I want to buy a house"}
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("first", Signer(app.test_client()).post(action, form)))
    worker.start()
    fake_llm.wait_for_requests(1)
    again = call.twilio.post(action, form)
    worker.join(10)
    assert results["first"].data == again.data
    assert "find you a home" in said(_twiml(again))
    assert len(fake_llm.requests) == 1
    assert len(_store(app).turns(call.tracking_id)) == 1
    assert call.record.current_node == "buyer_requirements_node"


def test_a_reply_too_slow_for_twilios_webhook_timeout_becomes_an_apology_in_time(env, fake_twilio, fake_llm):
    """Twilio waits 15 s for a webhook's answer, then the call fails ("an application error has occurred"). A model
    that streams slowly (here ~9 s of tokens, each within the stall timeout) must not hold the answer past
    GATHER_REPLY_TIMEOUT_S: the caller hears the apology and is listened to again; the call stays where it was."""
    app = create_app({**env, "GATHER_REPLY_TIMEOUT_S": "2"})
    client = app.test_client()
    fake_llm.responder = real_estate_brain
    call = GatherCall(app, client, Signer(client), fake_twilio)
    root = call.answer()
    fake_llm.responder = lambda body: Reply(text=" ".join(["word"] * 30), token_interval_s=0.3)
    started = time.monotonic()
    root = call.say(root, "I want to buy a house")
    waited = time.monotonic() - started
    assert waited < 3.0, waited
    assert "trouble" in said(root).lower() and "word word" not in said(root)
    assert root.find("Gather") is not None
    assert call.record.current_node == "inquiry_type_node"
    (turn,) = _store(app).turns(call.tracking_id)
    assert turn["source"] == "apology" and turn["action"] is None
    assert call.record.messages[-1]["content"].startswith("Sorry")  # history holds what was heard
    # the LLM's HTTP stream was closed, not left generating
    assert fake_llm.wait_until(lambda: fake_llm.requests[-1].client_closed or fake_llm.requests[-1].finished)
    fake_llm.responder = real_estate_brain
    call.say(root, "I want to buy a house")
    assert call.record.current_node == "buyer_requirements_node"


def test_text_xml_cannot_carry_never_breaks_the_twiml(call, fake_llm):
    """A control character in a model's reply (or in a flow's text) made the TwiML malformed: Twilio answers a
    document it cannot parse with error 12100 and the call ends. The SDK escapes markup, not these."""
    root = call.answer()
    fake_llm.responder = lambda body: Reply(text="Sure\x00 thing\x1b[0m, what\x0b else?\ufffe")
    resp = call.twilio.post(_action(root), {"CallSid": call.call_sid, "SpeechResult": "hello"})
    root = _twiml(resp)  # parses
    assert "Sure thing[0m, what else?" in said(root)


def test_a_greeting_with_a_control_character_still_parses(app, client, twilio, fake_twilio):
    body = make_call_body()
    start = next(n for n in body["nodes"] if n["type"] == "startNode")
    start["data"]["firstMessage"] = "Hello\x07 there!"
    assert client.post("/api/make-call", json=body).get_json()["success"]
    path = fake_twilio.creates()[-1].one("Url")[len(PUBLIC):]
    root = _twiml(twilio.post(path, {"CallStatus": "in-progress"}))
    assert "Hello there!" in said(root)


def test_an_empty_speech_result_mid_call_is_not_answered_with_the_greeting(call, fake_llm):
    """A Gather action with no (or blank) SpeechResult after the call has started (actionOnEmptyResult, a
    recogniser that heard noise): the caller is asked again, not greeted as if the call had just begun."""
    root = call.answer()
    root = call.say(root, "I want to buy a house")
    for form in ({"CallSid": call.call_sid, "SpeechResult": "  ", "Confidence": "0"},
                 {"CallSid": call.call_sid}, {"CallSid": call.call_sid, "Digits": "5"}):
        again = _twiml(call.twilio.post(_action(root), form))
        assert "Premier Properties" not in said(again)
        assert "didn't" in said(again).lower() and again.find("Gather") is not None
    assert len(fake_llm.requests) == 1


def test_a_webhook_for_an_ended_call_runs_no_turn(call, app, fake_llm):
    root = call.answer()
    status = call.twilio.post(f"/api/call-status?trackingId={call.tracking_id}",
                              {"CallSid": call.call_sid, "CallStatus": "completed", "SequenceNumber": "3"})
    assert status.status_code == 200
    late = _twiml(call.twilio.post(_action(root), {"CallSid": call.call_sid, "SpeechResult": "I want to buy"}))
    assert [c.tag for c in late] == ["Hangup"]
    assert fake_llm.requests == []
    assert _store(app).turns(call.tracking_id) == []


def test_a_webhook_naming_one_call_with_another_calls_sid_touches_neither(call, app, fake_llm):
    root = call.answer()
    other_sid = "CA" + "9" * 32
    resp = _twiml(call.twilio.post(_action(root), {"CallSid": other_sid, "SpeechResult": "I want to buy"}))
    assert resp.find("Hangup") is not None
    assert fake_llm.requests == []
    assert call.record.call_sid == call.call_sid
    assert _store(app).turns(call.tracking_id) == []


def test_the_kept_answer_goes_when_the_call_ends(call, app):
    """The latest answer is what the caller was told: kept for a retry while the call lives, not after."""
    from callweaver.gather_turns import GATHER_META_KEYS, REPLY_META
    root = call.answer()
    call.say(root, "I want to buy a house")
    assert REPLY_META in call.record.meta
    call.twilio.post(f"/api/call-status?trackingId={call.tracking_id}",
                     {"CallSid": call.call_sid, "CallStatus": "completed", "SequenceNumber": "3"})
    assert not set(GATHER_META_KEYS) & set(call.record.meta)


def test_an_action_url_used_again_with_other_words_is_a_new_turn(call, app, fake_llm):
    """Only the same words under the same turn are a retry: a client posting every turn to one URL is answered."""
    root = call.answer()
    action = _action(root)
    call.twilio.post(action, {"CallSid": call.call_sid, "SpeechResult": "I want to buy a house"})
    again = _twiml(call.twilio.post(action, {"CallSid": call.call_sid, "SpeechResult": "A three bedroom house"}))
    assert "three bedroom" in said(again).lower()
    assert len(fake_llm.requests) == 2 and call.record.current_node == "contact_details_node"


def test_an_inbound_gather_call_ends_at_the_call_duration_cap(env, fake_twilio, fake_llm):
    """A placed call carries Twilio's TimeLimit; a call that rang in on a number pointed at /api/twiml-ai has none,
    so the cap (MAX_CALL_DURATION_S) is kept by the webhook: past it the caller is told goodbye, no LLM request."""
    app = create_app({**env, "MAX_CALL_DURATION_S": "60"})
    twilio = Signer(app.test_client())
    sid = "CA" + "7" * 32
    root = _twiml(twilio.post("/api/twiml-ai", {"CallSid": sid, "From": "+15551230000", "To": "+15005550006"}))
    store = _store(app)
    tracking_id = store.find_tracking_id(sid)
    root = _twiml(twilio.post(_action(root), {"CallSid": sid, "SpeechResult": "hello there"}))
    assert len(fake_llm.requests) == 1 and root.find("Gather") is not None
    store.update_call(tracking_id, created_at=time.time() - 61)
    root = _twiml(twilio.post(_action(root), {"CallSid": sid, "SpeechResult": "and another thing"}))
    assert [c.tag for c in root] == ["Say", "Hangup"] and "Goodbye" in said(root)
    assert len(fake_llm.requests) == 1


def _updates_of(fake_twilio, call_sid: str, timeout_s: float = 5.0) -> list:
    """The call updates the Twilio stand-in received for `call_sid`, once there is one (they are sent off the
    request path), or [] after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [u for u in fake_twilio.updates() if u.path.endswith(f"/Calls/{call_sid}.json")]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_an_inbound_gather_call_gets_our_status_callback_and_time_limit_so_its_end_is_recorded(
        env, fake_twilio, fake_llm):
    """A call that rang in on a number pointed at /api/twiml-ai was never placed by us, so Twilio had neither our
    status callback nor our TimeLimit for it: its end was never recorded (in progress for a day in the call log,
    counted live, its meta never cleaned up). When it is first seen, Twilio is asked for both (the server's
    account), and the final status Twilio then sends ends the call in the store."""
    app = create_app({**env, "MAX_CALL_DURATION_S": "60"})
    client = app.test_client()
    twilio = Signer(client)
    sid = fake_twilio.ring_in(to="+15005550006", from_number="+15551230000")
    root = _twiml(twilio.post("/api/twiml-ai", {"CallSid": sid, "From": "+15551230000", "To": "+15005550006"}))
    assert root.find("Gather") is not None and "Hello" in said(root)
    tracking_id = _store(app).find_tracking_id(sid)
    (update,) = _updates_of(fake_twilio, sid)
    assert update.auth_ok  # the server's own account
    callback = update.one("StatusCallback")
    assert callback == f"{PUBLIC}/api/call-status?trackingId={tracking_id}"  # a placed Gather call's callback
    assert update.one("StatusCallbackMethod") == "POST" and update.one("TimeLimit") == "60"
    assert update.one("Status") is None and update.one("Url") is None  # the call itself is left alone
    assert client.get(f"/api/call-log/{tracking_id}").get_json()["call"]["outcome"] == "in_progress"
    # Twilio's final status to that URL, signed with the server's token, ends the call.
    status = twilio.post(callback[len(PUBLIC):], {"CallSid": sid, "CallStatus": "completed", "CallDuration": "42",
                                                  "SequenceNumber": "0"})
    assert status.status_code == 200
    record = _store(app).get_call(tracking_id)
    assert record.status == "completed" and record.ended_at is not None
    assert client.get(f"/api/call-log/{tracking_id}").get_json()["call"]["outcome"] not in ("in_progress", "unknown")


def test_the_inbound_greeting_does_not_wait_for_twilio_and_a_failed_watch_is_logged(app, twilio, fake_twilio,
                                                                                   fake_llm):
    """The caller waits for the greeting: Twilio is asked off the request path (here it is slow, then refuses: a
    SID it does not know). The refusal is logged with its class, no secrets; the webhook-time cap stays."""
    import threading

    from structlog.testing import capture_logs

    from tests.conftest import AUTH_TOKEN
    sid = "CA" + "8" * 32  # not a call the stand-in knows: Twilio answers the update with a 404
    fake_twilio.hold = threading.Event()
    with capture_logs() as logs:
        started = time.monotonic()
        root = _twiml(twilio.post("/api/twiml-ai", {"CallSid": sid, "From": "+15551230000", "To": "+15005550006"}))
        assert time.monotonic() - started < 5  # answered while Twilio still holds the update
        assert root.find("Gather") is not None and "Hello" in said(root)
        assert _updates_of(fake_twilio, sid), "no update sent"
        fake_twilio.hold.set()
        deadline = time.monotonic() + 5
        while not any(e["event"] == "inbound_call_watch_failed" for e in logs) and time.monotonic() < deadline:
            time.sleep(0.02)
    (line,) = [e for e in logs if e["event"] == "inbound_call_watch_failed"]
    assert line["error"] == "TwilioRestException" and line["log_level"] == "warning", line
    assert AUTH_TOKEN not in repr(line)
    record = _store(app).get_call(_store(app).find_tracking_id(sid))
    assert record is not None and record.ended_at is None


def test_a_runaway_reply_is_capped_for_say_and_an_empty_one_is_an_apology(call, fake_llm, fake_llm2):
    from callweaver.engine.conversation import MAX_TURN_REPLY_BYTES
    root = call.answer()
    fake_llm.responder = lambda body: Reply(text="blah " * 2000)
    root = call.say(root, "tell me everything")
    first = root.find("Say").text
    assert len(first.encode()) <= MAX_TURN_REPLY_BYTES and root.find("Gather") is not None
    # A wordless reply fails over (reason wordless_reply); every provider answering so gets the apology.
    fake_llm.responder = fake_llm2.responder = lambda body: Reply(text="   ")
    root = call.say(root, "and now?")
    assert "trouble" in root.find("Say").text.lower() and root.find("Gather") is not None


def test_the_first_provider_failing_fails_over_within_the_same_webhook(call, app, fake_llm, fake_llm2):
    root = call.answer()
    fake_llm.fault = "500"
    fake_llm2.responder = real_estate_brain
    root = call.say(root, "I want to buy a house")
    assert "find you a home" in said(root)
    (turn,) = _store(app).turns(call.tracking_id)
    assert turn["provider"] == "openai" and turn["failovers"][0]["provider"] == "azure"
    assert call.record.current_node == "buyer_requirements_node"


def test_a_gather_turn_reports_no_added_latency_it_did_not_measure(call, app, client):
    """A Gather turn's first "token" reaches the caller with the whole reply: its time minus the provider's first
    token is the model writing the rest, not our overhead. Only relay turns measure that (as /metrics does)."""
    root = call.answer()
    call.say(root, "I want to buy a house")
    data = client.get(f"/api/performance-metrics/{call.tracking_id}").get_json()
    assert data["metrics"]["addedLatency"]["samples"] == 0 and data["metrics"]["addedLatency"]["p50"] is None
    (turn,) = data["callData"]["turns"]
    assert turn["addedLatencyMs"] is None
    assert turn["firstTokenMs"] is not None and turn["providerTtftMs"] is not None  # these were measured
    detail = client.get(f"/api/call-log/{call.tracking_id}").get_json()
    assert detail["turns"][0]["addedLatencyMs"] is None


def test_a_caller_silent_through_both_listens_is_ended_as_silence_in_the_call_log(call, app, client, fake_llm):
    """Twilio plays the re-prompt after the first silent <Gather timeout>; after the second the call ends. The server
    must learn that it ended on silence (as a relay call records it), not report that the caller hung up."""
    root = call.answer()
    tags = [c.tag for c in root]
    assert tags.count("Gather") == 2 and tags[-1] == "Redirect"
    redirect = root.find("Redirect")
    assert redirect.get("method") == "POST" and redirect.text.startswith(PUBLIC + "/api/twiml-ai?")
    end = _twiml(call.twilio.post(redirect.text[len(PUBLIC):], {"CallSid": call.call_sid, "CallStatus": "in-progress"}))
    assert [c.tag for c in end] == ["Say", "Hangup"] and "Goodbye" in said(end)
    assert fake_llm.requests == []
    call.twilio.post(f"/api/call-status?trackingId={call.tracking_id}",
                     {"CallSid": call.call_sid, "CallStatus": "completed", "SequenceNumber": "3"})
    assert client.get(f"/api/call-log/{call.tracking_id}").get_json()["call"]["outcome"] == "silence"


def test_the_listen_after_an_apology_names_the_turn_after_the_one_that_failed(env, fake_twilio, fake_llm,
                                                                              monkeypatch):
    """An action URL used again with other words runs the call's next turn (GatherTurns.turn_for), not the one it
    names. When that turn fails, the apology's listen must name the turn after the one claimed: naming the turn
    after the URL's would claim the failed turn again, wait GATHER_REPLY_TIMEOUT_S for an answer that never comes,
    and apologise a second time."""
    fake_llm.responder = real_estate_brain
    app = create_app({**env, "GATHER_REPLY_TIMEOUT_S": "1"})
    client = app.test_client()
    call = GatherCall(app, client, Signer(client), fake_twilio)
    root = call.answer()
    action = _action(root)
    call.twilio.post(action, {"CallSid": call.call_sid, "SpeechResult": "I want to buy a house"})
    engine = app.extensions["callweaver"].engine
    real_turn = engine.answer_whole_turn
    monkeypatch.setattr(engine, "answer_whole_turn", boom)
    apology = _twiml(call.twilio.post(action, {"CallSid": call.call_sid, "SpeechResult": "something else"}))
    monkeypatch.setattr(engine, "answer_whole_turn", real_turn)
    english = app.extensions["callweaver"].languages.get("en-US")
    assert said(apology).startswith(english.line("apology"))
    answered = call.say(apology, "A three bedroom house near good schools")
    assert english.line("apology") not in said(answered), said(answered)
    assert call.record.current_node == "contact_details_node"


def test_a_silence_ending_whose_record_fails_still_says_goodbye(call, app, monkeypatch):
    """The end reason only labels the call: a store write that fails there (a full disk, a locked file) must not
    turn the silence goodbye into the apology (as on a relay call, where the write failing is logged only)."""
    from callweaver.store import StoreError

    root = call.answer()
    store = app.extensions["callweaver"].store

    def failing(tracking_id, change):  # the end reason's write (store.END_REASON_RULE)
        raise StoreError("injected: disk full")

    monkeypatch.setattr(store, "change_meta", failing)
    end = _twiml(call.twilio.post(root.find("Redirect").text[len(PUBLIC):],
                                  {"CallSid": call.call_sid, "CallStatus": "in-progress"}))
    english = app.extensions["callweaver"].languages.get("en-US")
    assert [c.tag for c in end] == ["Say", "Hangup"] and said(end) == english.line("goodbye"), said(end)


@pytest.fixture(scope="module")
def redis_server():
    from tests.fakes.redis_server import RedisServer
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def any_store(request, tmp_path):
    import uuid

    from callweaver.store import build_store
    if request.param == "sqlite":
        built = build_store(str(tmp_path / "cw.sqlite3"))
    else:
        built = build_store(str(tmp_path / "unused.sqlite3"), redis_url=request.getfixturevalue("redis_server").url,
                            key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    yield built
    built.close()


def test_exactly_one_of_many_simultaneous_requests_claims_a_turn_in_either_store(any_store):
    """Workers (or instances, with Redis) racing for one turn: one runs it, the others wait for its answer."""
    from callweaver.gather_turns import GatherTurns
    from callweaver.store import CallRecord
    any_store.create_call(CallRecord(tracking_id="call_race", path="traditional"))
    turns = GatherTurns(any_store)
    won = []
    racers = [threading.Thread(target=lambda: won.append(turns.claim("call_race", 3))) for _ in range(8)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(10)
    assert sorted(won) == [False] * 7 + [True]
    turns.remember("call_race", 3, "yes please", "<Response/>")
    record = any_store.get_call("call_race")
    assert turns.answered(record, 3, "yes please") == "<Response/>"
    assert turns.answered(record, 3, "no thanks") is None and turns.next_turn(record) == 4
    assert turns.claim("call_race", 4)  # the next turn is claimed afresh
    assert turns.wait_for_answer("call_race", 3, "yes please", until=0) == "<Response/>"


def test_a_claim_whose_reply_was_lost_is_still_the_claim_of_the_request_that_made_it(redis_server):
    """redis-py sends a write again when its connection fails before the reply (one retry, so a failover heals):
    a claim that landed but whose reply was lost was counted twice, and the request that made it took it for
    another's, waited for an answer nobody was writing and gave the caller the apology. The claim is now the
    request's own mark, written only where none is: written again, it is still that request's."""
    import uuid

    from callweaver.gather_turns import GatherTurns
    from callweaver.store import CallRecord, build_store
    from tests.fakes.loopback import ReplyLosingProxy

    proxy = ReplyLosingProxy(redis_server.port)
    store = build_store("", f"redis://127.0.0.1:{proxy.port}/0", key_prefix=f"cwtest:{uuid.uuid4().hex}:")
    try:
        store.create_call(CallRecord(tracking_id="call_lost", path="traditional"))
        turns = GatherTurns(store)
        proxy.lose_after = b"EXEC"  # the claim's MULTI/EXEC
        assert turns.claim("call_lost", 0) is True
        assert proxy.lost == 1  # the claim really landed with its reply lost
        assert turns.claim("call_lost", 0) is False  # any other request for that turn (a retried webhook) waits
        turns.remember("call_lost", 0, "yes please", "<Response/>")
        assert turns.claim("call_lost", 1) is True
    finally:
        store.close()
        proxy.stop()


def test_a_turn_an_earlier_release_counted_as_claimed_is_not_claimed_again(any_store):
    """A rolling deploy on one Redis: an instance of the earlier release took turn 3 (its claim a count, 1, under
    `gatherClaims`) and still runs it; Twilio's retry reaches an instance of this release. It must wait for that
    answer, not run the turn a second time (a second LLM request, maybe another reply)."""
    from callweaver.gather_turns import COUNTED_CLAIMS_META, GatherTurns
    from callweaver.store import CallRecord

    any_store.create_call(CallRecord(tracking_id="call_span", path="traditional",
                                     meta={COUNTED_CLAIMS_META: {"3": 1}}))
    turns = GatherTurns(any_store)
    assert turns.claim("call_span", 3) is False
    assert turns.claim("call_span", 4) is True  # a turn the earlier release never counted is claimed as before


def test_speech_with_confidence_zero_is_answered(call, fake_llm):
    """Twilio does not guarantee a Confidence (some speech models always report 0): the words are answered."""
    root = call.answer()
    root = call.say(root, "I want to buy a house")  # Confidence 0.93
    root = _twiml(call.twilio.post(_action(root), {"CallSid": call.call_sid, "SpeechResult": "three bedroom please",
                                                   "Confidence": "0"}))
    assert "three bedroom" in said(root).lower() and len(fake_llm.requests) == 2


def test_on_the_production_server_a_slow_reply_is_cut_in_time_and_a_retry_on_the_other_worker_waits(
        tmp_path, fake_twilio, fake_llm, fake_llm2):
    """gunicorn with 2 gevent workers (the deadline timer and the claim as deployed): the first attempt is cut at
    GATHER_REPLY_TIMEOUT_S with the apology; Twilio's retry, sent meanwhile (to either worker), gets that same
    answer; one LLM request in all."""
    from callweaver.simulate.webhooks import TwilioWebhooks, http
    from tests.conftest import AUTH_TOKEN, base_env
    from tests.fakes.live_server import LiveServer

    env = base_env(tmp_path, fake_twilio, fake_llm, fake_llm2)
    env.pop("PUBLIC_BASE_URL")
    env["GATHER_REPLY_TIMEOUT_S"] = "2"
    with LiveServer(env, workers=2) as live:
        hooks = TwilioWebhooks(live.url, AUTH_TOKEN)
        data = http("POST", live.url + "/api/make-call", json_body=make_call_body()).json()
        url = fake_twilio.creates()[-1].one("Url")
        root = ET.fromstring(hooks.post(url, {"CallSid": data["callSid"]}).text)
        action = root.find("Gather").get("action")
        fake_llm.responder = lambda body: Reply(text=" ".join(["word"] * 30), token_interval_s=0.3)
        form = {"CallSid": data["callSid"], "SpeechResult": "I want to buy a house"}
        results = {}

        def first():
            results["first"] = hooks.post(action, form)

        worker = threading.Thread(target=first)
        started = time.monotonic()
        worker.start()
        fake_llm.wait_for_requests(1)
        retries = [hooks.post(action, form) for _ in range(2)]
        worker.join(10)
        assert time.monotonic() - started < 3.5
        answers = {results["first"].text, *(r.text for r in retries)}
        assert len(answers) == 1
        assert "trouble" in said(ET.fromstring(answers.pop())).lower()
        assert len(fake_llm.requests) == 1


def test_a_call_ringing_in_on_a_stored_flow_in_a_language_the_table_lacks_is_spoken_in_the_default(
        app, client, twilio, fake_twilio, fake_llm):
    """A flow saved before its language was checked (or edited since): the caller hears the default language's
    voice and recogniser, never a voice Twilio would refuse."""
    store = _store(app)
    assert client.post("/api/make-call", json=make_call_body()).get_json()["success"]
    snapshot = store.get_workflow("wf_real_estate_property_dealer")
    snapshot["config"].setdefault("globalSettings", {})["defaultLanguage"] = "xx-XX"
    store.save_workflow("wf_odd", snapshot)
    from callweaver.engine.workflow import Workflow
    assert Workflow.from_snapshot(snapshot).default_language == "xx-XX"
    root = _twiml(twilio.post("/api/twiml-ai?id=wf_odd", {"CallSid": "CA" + "5" * 32, "From": "+15551230001"}))
    assert root.find("Say").get("language") == "en-US" and root.find("Gather").get("language") == "en-US"
    assert "Premier Properties" in said(root)  # the flow's own greeting


def test_an_answer_finished_after_the_caller_hung_up_is_not_kept_with_the_ended_call(call, app, fake_llm):
    """The caller hangs up while the model still writes: the terminal status callback drops the call's Gather meta,
    then the turn finishes and keeps its answer. Nothing can retry a webhook of an ended call, and the kept TwiML
    is what the caller was told: it must not outlive the call (transcript retention empties messages, not meta)."""
    from callweaver.gather_turns import GATHER_META_KEYS
    root = call.answer()
    action = _action(root)
    fake_llm.responder = lambda body: Reply(text="Wonderful, let's find you a home.", ttft_s=0.8)
    form = {"CallSid": call.call_sid, "SpeechResult": "I want to buy a house"}
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("turn", Signer(app.test_client()).post(action, form)))
    worker.start()
    fake_llm.wait_for_requests(1)
    status = call.twilio.post(f"/api/call-status?trackingId={call.tracking_id}",
                              {"CallSid": call.call_sid, "CallStatus": "completed", "SequenceNumber": "3"})
    assert status.status_code == 200
    worker.join(10)
    assert results["turn"].status_code == 200
    assert not set(GATHER_META_KEYS) & set(call.record.meta)


def test_a_turn_cancelled_before_its_llm_request_starts_never_sends_it(call, app, fake_llm):
    """The Gather deadline can pass while the turn is not yet streaming (a slow cache or store read): cancelling
    then must stop the turn before its request, not let it run to the provider's first token."""
    call.answer()
    fake_llm.responder = lambda body: Reply(text="Too late to be heard.", ttft_s=1.5)
    engine = app.extensions["callweaver"].engine
    turn = engine.start_turn(call.record, "I want to buy a house")
    turn.cancel()
    started = time.monotonic()
    assert "".join(turn) == ""
    assert time.monotonic() - started < 1.0
    assert fake_llm.requests == [] and not turn.result.completed


def test_a_turn_number_is_ascii_digits_only():
    """`str.isdigit` accepts superscripts and other scripts' digits; `int` refuses some of them (a 500)."""
    from callweaver.gather_turns import turn_param
    assert turn_param("12") == 12 and turn_param("0") == 0
    for raw in ("\u00b2", "\u0663", "-1", "1.0", "", None, "1" * 10):
        assert turn_param(raw) is None, raw


def test_a_lone_surrogate_never_reaches_the_twiml_as_a_character_reference():
    """The SDK serialises a lone surrogate (a JS string cut inside an emoji) as `&#55357;`, which no XML parser
    accepts: the character is dropped like the other characters XML cannot carry."""
    from twilio.twiml.voice_response import VoiceResponse

    from callweaver.routes.common import twiml_response
    vr = VoiceResponse()
    vr.say("Hi \ud83d there \U0001f600 \u4f60\u597d &#55357; \t")
    root = ET.fromstring(twiml_response(str(vr)).get_data())
    assert root.find("Say").text == "Hi  there \U0001f600 \u4f60\u597d &#55357; \t"


def test_an_apology_after_a_tool_moved_the_call_keeps_no_recording_of_the_node_it_left(app, client, fake_llm,
                                                                                         fake_llm2):
    """The model only called a transition tool and its follow-up failed (or ran past the Gather deadline): the call
    stays on its node with the apology, so the recording of the node the tool named must not play (a relay turn
    plays `entered_audio` before its words)."""
    from tests.helpers import load_workflow
    export = load_workflow()
    for node in export["nodes"]:
        if node["id"] == "buyer_requirements_node":
            node["data"]["audioUrl"] = "https://media.example.com/jingle.mp3"
    data = client.post("/api/make-call", json=make_call_body(nodes=export["nodes"])).get_json()
    svc = app.extensions["callweaver"]
    asked = []

    def tool_only_then_failing(body):
        asked.append(body)
        return Reply(text="", tool_calls=[("transition", {"edge_id": "edge_2"})]) if len(asked) == 1 \
            else Reply(fault="500")

    fake_llm.responder = tool_only_then_failing
    fake_llm2.responder = lambda body: Reply(fault="500")
    turn = svc.engine.start_turn(svc.store.get_call(data["trackingId"]), "I want to buy a house")
    assert "trouble" in "".join(turn).lower()
    assert turn.result.source == "apology" and turn.result.next_node == "inquiry_type_node"
    assert turn.result.entered_audio is None


def _ended_call_watch(store, tracking_id: str):
    """A lifecycle on `store` whose final status for `tracking_id` is recorded now; returns (when the report was
    asked for, the turns stored then) as they come, and when the status was recorded."""
    from callweaver.config import Settings
    from callweaver.lifecycle import CallLifecycle
    reported: list[tuple[float, int]] = []
    lifecycle = CallLifecycle(Settings(), store, None, None,
                              on_call_ended=lambda tid: reported.append((time.monotonic(), len(store.turns(tid)))))
    ended_at = time.monotonic()
    lifecycle.record_status(store.get_call(tracking_id),
                            {"CallSid": "CA" + "7" * 32, "CallStatus": "completed", "SequenceNumber": "9"})
    return reported, ended_at


def _wait_for(reported: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not reported and time.monotonic() < deadline:
        time.sleep(0.02)


def test_an_ended_calls_report_waits_for_a_turn_another_worker_is_answering_in_either_store(any_store):
    """Twilio's final status comes while a Gather turn is being answered by another worker (or instance): the
    final status drops the turn's claim, and the report, built at once, lacked the turn the store then got. It
    now waits for that turn's commit (its claim says by when), and goes as soon as it is in."""
    from callweaver.gather_turns import GatherTurns
    from callweaver.store import CallRecord
    any_store.create_call(CallRecord(tracking_id="call_busy", path="traditional", status="in-progress"))
    other_worker = GatherTurns(any_store)
    started = other_worker.start(any_store.get_call("call_busy"), 0, "my name is Zeb", until=time.monotonic() + 5)
    assert started.turn == 0 and started.sent is None and not started.busy  # it runs the turn
    reported, _ = _ended_call_watch(any_store, "call_busy")
    time.sleep(0.5)
    assert reported == []  # the turn is still being answered: no report yet
    any_store.append_turn("call_busy", {"path": "traditional", "firstTokenMs": 400})
    other_worker.remember("call_busy", 0, "my name is Zeb", "<Response/>")
    answered_at = time.monotonic()
    _wait_for(reported, 5)
    assert len(reported) == 1 and reported[0][1] == 1  # the report counts the committed turn
    assert reported[0][0] - answered_at < 1.5  # polled at most once a second


def test_an_ended_calls_report_waits_for_a_dead_workers_turn_only_until_its_budget_ran_out(any_store):
    """The worker answering the turn was killed: its claim says by when it would have committed (its budget and a
    margin), and the report goes then, not at the socket lease's end nor never."""
    from callweaver.gather_turns import COMMIT_MARGIN_S, GatherTurns
    from callweaver.store import CallRecord
    any_store.create_call(CallRecord(tracking_id="call_dead", path="traditional", status="in-progress"))
    GatherTurns(any_store).start(any_store.get_call("call_dead"), 0, "hello", until=time.monotonic() + 0.5)
    reported, ended_at = _ended_call_watch(any_store, "call_dead")
    _wait_for(reported, 10)
    assert len(reported) == 1 and reported[0][1] == 0
    assert 0.5 + COMMIT_MARGIN_S - 0.2 < reported[0][0] - ended_at < 0.5 + COMMIT_MARGIN_S + 1.2
