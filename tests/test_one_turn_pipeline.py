"""Both call paths commit their turns through the engine's one pipeline (ConversationEngine.commit_turn).

The same scripted conversation, once over ConversationRelay (a RelaySession fed Twilio's frames) and once over
the <Gather> webhooks, must leave the same turn records: only the path and the measured times may differ.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.conftest import PUBLIC
from tests.helpers import InProcessRelayCall, make_call_body
from tests.scripted_brain import real_estate_brain

CONVERSATION = ["I want to buy a house", "A three bedroom house", "My name is Ann"]
# Measured per run, or naming the path and the call: everything else must be the same on both paths.
VARYING = {"path", "firstTokenMs", "lastTokenMs", "providerTtftMs", "at", "trackingId"}


@pytest.fixture
def env(env):
    return {**env, "CACHE_TYPE": "NullCache"}  # a cache hit on the second call would differ from the first


@pytest.fixture
def commits(app, monkeypatch):
    """Every commit_turn call, by path: the spy proves which engine function each path used."""
    engine = app.extensions["callweaver"].engine
    seen: list[str] = []
    commit = engine.commit_turn

    def spy(record, turn, **kwargs):
        seen.append(kwargs["path"])
        return commit(record, turn, **kwargs)

    monkeypatch.setattr(engine, "commit_turn", spy)
    return seen


def gather_call(client, twilio, fake_twilio) -> str:
    data = client.post("/api/make-call", json=make_call_body()).get_json()
    assert data["success"], data
    path = fake_twilio.creates()[-1].one("Url")[len(PUBLIC):]
    root = ET.fromstring(twilio.post(path, {"CallSid": data["callSid"], "CallStatus": "in-progress"}).data)
    for speech in CONVERSATION:
        action = root.find("Gather").get("action")[len(PUBLIC):]
        root = ET.fromstring(twilio.post(action, {"CallSid": data["callSid"], "SpeechResult": speech}).data)
    return data["trackingId"]


def relay_call(app, client) -> str:
    call = InProcessRelayCall(app, client)
    for speech in CONVERSATION:
        call.say(speech, "en-US")
    return call.tracking_id


def test_relay_and_gather_paths_commit_identical_turn_records(app, client, twilio, fake_twilio, fake_llm, commits):
    fake_llm.responder = real_estate_brain
    store = app.extensions["callweaver"].store
    relay_turns = store.turns(relay_call(app, client))
    gather_turns = store.turns(gather_call(client, twilio, fake_twilio))

    assert commits == ["optimized"] * len(CONVERSATION) + ["traditional"] * len(CONVERSATION)
    assert [t["path"] for t in relay_turns + gather_turns] == commits
    assert [t["nextNodeId"] for t in relay_turns] != [t["nodeId"] for t in relay_turns]  # the call moved on
    strip = lambda turns: [{k: v for k, v in t.items() if k not in VARYING} for t in turns]  # noqa: E731
    assert strip(relay_turns) == strip(gather_turns)
    for turn in relay_turns + gather_turns:
        assert turn["firstTokenMs"] is not None and turn["lastTokenMs"] is not None
