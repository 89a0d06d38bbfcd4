"""Builders for request bodies in the web app's shapes."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlencode

from callweaver.simulate.bodies import make_call_body as build_body

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "workflows"


def load_workflow(name: str = "real_estate_property_dealer") -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def make_call_body(to: str = "+15551234567", workflow: str | None = "real_estate_property_dealer", **extra) -> dict:
    """What PlaygroundModal.handleMakeCall sends (contract.md §2), with stale bundle credentials."""
    defaults = {"from": "+15005550006", "record": False, "timeout": 30,
                "twilioAccountSid": "AC" + "0" * 32, "twilioAuthToken": "stale-bundle-token"}
    export = load_workflow(workflow) if workflow else None
    body = build_body(export, to, **defaults)
    if export:
        body["workflowId"] = "wf_" + workflow
    body.update(extra)
    return body


def twiml_optimized_path(tracking_id: str, workflow_id: str = "wf_real_estate_property_dealer") -> str:
    """/api/twiml-optimized for a call: the URL make-call gives Twilio when the TwiML cannot go inline, and the one a
    test posts to for the webhook's answer (an optimized call is placed with its TwiML inline, test_inline_twiml)."""
    return f"/api/twiml-optimized?{urlencode({'id': workflow_id, 'trackingId': tracking_id})}"


class InProcessRelayCall:
    """A relay call placed through the app's test client and driven frame by frame through a RelaySession, with no
    socket: every message the session sends is kept in `sent`."""

    def __init__(self, app, client, body: dict | None = None) -> None:
        from callweaver.engine.relay_session import RelaySession
        from callweaver.services import spawn

        data = client.post("/api/make-call-optimized", json=body or make_call_body()).get_json()
        assert data["success"], data
        self.svc = app.extensions["callweaver"]
        self.tracking_id: str = data["optimization"]["trackingId"]
        self.sent: list[dict] = []
        sent = self.sent

        class Sender:
            def send_json(self, *messages: dict) -> None:
                sent.extend(messages)

        self.session = RelaySession(self.svc.engine, Sender(), spawn=spawn)
        self.session.handle(json.dumps({"type": "setup", "callSid": data["callSid"], "direction": "outbound-api",
                                        "customParameters": {"trackingId": self.tracking_id}}))

    def turns(self) -> list:
        return self.svc.store.turns(self.tracking_id)

    def say(self, text: str, lang: str, timeout_s: float = 10.0, settle_s: float = 0.0) -> list[dict]:
        """Send one final prompt and wait until its turn is committed (then `settle_s` more, for what the session
        sends after the commit); what the session sent meanwhile."""
        import time

        before, number = len(self.sent), len(self.turns()) + 1
        self.session.handle(json.dumps({"type": "prompt", "voicePrompt": text, "lang": lang, "last": True}))
        deadline = time.monotonic() + timeout_s
        while len(self.turns()) < number and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.turns()) == number, self.sent
        time.sleep(settle_s)
        return self.sent[before:]
