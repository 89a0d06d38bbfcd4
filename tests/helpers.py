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
