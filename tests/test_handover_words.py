"""A caller who speaks while a stopping worker hands their call over (a deploy): the old session no longer answers
(its `end` {"reason": "handover"} is on the way), so the words are kept in the store, logged, and answered by the
resumed session after its welcome greeting, rather than lost without a trace."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from structlog.testing import capture_logs

from callweaver.engine import relay_session
from callweaver.engine.relay_session import RelaySession
from callweaver.services import spawn
from tests.fakes.fake_llm import Reply
from tests.test_call_audit import Call, agent_fell_silent

CARRIED_OVER = getattr(relay_session, "CARRIED_OVER", "carriedOver")  # (a name the code before it lacked)


def resumed_session(call: Call, twilio) -> tuple[RelaySession, list[dict]]:
    """Twilio asks the action URL after the handover's `end`; the TwiML reconnects and the new socket's `setup`."""
    resp = twilio.post(f"/api/connect-action?trackingId={call.tracking_id}",
                       {"CallSid": call.svc.store.get_call(call.tracking_id).call_sid, "SessionStatus": "ended",
                        "HandoffData": json.dumps({"reason": "handover"})})
    relay = ET.fromstring(resp.get_data(as_text=True)).find("Connect/ConversationRelay")
    assert relay is not None
    sent: list[dict] = []

    class Sender:
        def send_json(self, *messages: dict) -> None:
            sent.extend(messages)
    session = RelaySession(call.svc.engine, Sender(), spawn=spawn)
    session.handle(json.dumps({"type": "setup", "callSid": call.svc.store.get_call(call.tracking_id).call_sid,
                               "customParameters": {"trackingId": call.tracking_id, "resumed": "1"}}))
    return session, sent


def test_words_said_during_a_handover_are_logged_kept_and_answered_by_the_resumed_session(app, client, twilio,
                                                                                        fake_llm):
    call = Call(app, client)
    try:
        fake_llm.push(Reply(text="It has three bedrooms."))
        call.say("How many bedrooms")
        agent_fell_silent(call)
        call.session.hand_over()
        with capture_logs() as logs:
            call.send({"type": "prompt", "voicePrompt": "And the garden?", "lang": "en-US", "last": True})
        call.wait(lambda: call.sent and call.sent[-1]["type"] == "end")
        assert json.loads(call.sent[-1]["handoffData"])["reason"] == "handover"
        assert len(call.turns()) == 1  # not answered here
        assert "relay_words_at_handover_carried_over" in [e["event"] for e in logs]
        assert call.svc.store.get_call(call.tracking_id).meta[CARRIED_OVER]["text"] == "And the garden?"
    finally:
        call.session.close()

    fake_llm.push(Reply(text="Yes, a large garden with apple trees."))
    session, sent = resumed_session(call, twilio)
    try:
        call.wait(lambda: len(call.turns()) == 2)
        assert "".join(m.get("token", "") for m in sent if m["type"] == "text") == "Yes, a large garden with apple trees."
        assert fake_llm.requests[-1].messages[-1] == {"role": "user", "content": "And the garden?"}
        stored = call.svc.store.get_call(call.tracking_id)
        assert CARRIED_OVER not in stored.meta  # answered once
        assert stored.messages[-2:] == [{"role": "user", "content": "And the garden?"},
                                        {"role": "assistant", "content": "Yes, a large garden with apple trees."}]
    finally:
        session.close()


def test_words_said_over_a_goodbye_are_not_carried_over(app, client, fake_llm):
    """A closing line (here the end of the call for silence) ends the call: nothing is kept for a resumed session."""
    call = Call(app, client)
    try:
        call.session.silence_timeout_s = 0.01
        call.send({"type": "info", "name": "agentSpeaking", "value": "off"})
        call.session._reprompted = True
        call.session.clock = lambda: 1e12  # the silence is due
        call.session.check_silence()  # goodbye, then `end` {"reason": "silence"}
        call.session.hand_over()
        call.send({"type": "prompt", "voicePrompt": "wait", "lang": "en-US", "last": True})
        assert CARRIED_OVER not in (call.svc.store.get_call(call.tracking_id).meta or {})
    finally:
        call.session.close()


def test_words_kept_for_a_resume_that_never_came_are_dropped_when_the_call_ends(app, client, twilio, fake_llm):
    """The caller hangs up during the handover: the words kept for the resumed session are deleted with the call's
    end (they are no transcript: never purged with one, and RECORD_TRANSCRIPTS=0 promises timings only)."""
    call = Call(app, client)
    try:
        call.send({"type": "info", "name": "agentSpeaking", "value": "off"})
        call.session.hand_over()
        call.send({"type": "prompt", "voicePrompt": "My card number is 4111", "lang": "en-US", "last": True})
        assert CARRIED_OVER in call.svc.store.get_call(call.tracking_id).meta
    finally:
        call.session.close()
    stored = call.svc.store.get_call(call.tracking_id)
    resp = twilio.post(f"/api/call-status-optimized?trackingId={call.tracking_id}",
                       {"CallSid": stored.call_sid, "CallStatus": "completed", "SequenceNumber": "9"})
    assert resp.status_code < 300
    assert CARRIED_OVER not in (call.svc.store.get_call(call.tracking_id).meta or {})
