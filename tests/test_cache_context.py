"""The reply cache never answers a different question: on the real server with prewarm on, a caller hears what
the LLM would have said in their own conversation."""
from __future__ import annotations

import time

import pytest

from callweaver.engine.cache import normalize_utterance
from callweaver.engine.languages import LanguageTable
from callweaver.simulate import RelayCaller, http
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import make_call_body

PREWARM_UTTERANCES = LanguageTable.load().get("en-US").prewarm_utterances


def slot_brain(body: dict) -> Reply:
    """A model whose answer to "Yes." depends on the question it asked last (the morning or the evening slot)."""
    messages = body.get("messages", [])
    said = normalize_utterance(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
    asked = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
    if "morning" in said or "evening" in said:
        slot = "morning" if "morning" in said else "evening"
        return Reply(text=f"Shall I book the {slot} slot?")
    if said == "yes":
        for slot in ("morning", "evening"):
            if f"{slot} slot" in asked:
                return Reply(text=f"Done, the {slot} slot is yours.")
        return Reply(text="Great, how can I help you today?")
    if said == "hello":
        return Reply(text="Hello there! How can I help?" if "slot" not in asked else "Still here. Anything else?")
    return Reply(text="I see, tell me more.")


@pytest.fixture(scope="module")
def prewarm_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache-context")
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    llm = FakeLLM("primary", ttft_s=0.02, token_interval_s=0.001).start()
    llm.responder = slot_brain
    env = base_env(tmp, twilio, llm)
    env.pop("PUBLIC_BASE_URL")
    env.update(CACHE_TYPE="FileSystemCache", CACHE_PREWARM="1")
    server = LiveServer(env, workers=2).start()
    # A first call warms the cache for the greeting while its phone rings; every later call finds it warm.
    RelayCaller(server.url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15).place_call(make_call_body())
    llm.wait_for_requests(len(PREWARM_UTTERANCES), timeout_s=20)
    time.sleep(0.5)  # the last prewarmed reply is written right after its stream ends
    yield {"server": server, "twilio": twilio, "llm": llm}
    server.stop()
    twilio.stop()
    llm.stop()


def _call(stack, lines: list[str]) -> list[dict]:
    """One call; per turn what the caller heard and the server's record of it."""
    caller = RelayCaller(stack["server"].url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
    caller.place_call(make_call_body())
    caller.answer_placed(stack["twilio"].creates()[-1])
    caller.connect()
    heard = [caller.say(line).text for line in lines]
    caller.hangup()
    turns = http("GET", f"{stack['server'].url}/api/performance-metrics/{caller.tracking_id}").json()
    return [{"said": line, "heard": text, **turn}
            for line, text, turn in zip(lines, heard, turns["callData"]["turns"])]


def test_two_calls_differing_in_an_earlier_turn_each_hear_their_own_answer(prewarm_stack):
    morning = _call(prewarm_stack, ["I'd like the morning slot.", "Yes."])
    evening = _call(prewarm_stack, ["I'd like the evening slot.", "Yes."])
    assert morning[1]["heard"] == "Done, the morning slot is yours."
    assert evening[1]["heard"] == "Done, the evening slot is yours."
    assert not morning[1]["cacheHit"] and not evening[1]["cacheHit"]
    # the same conversation again: its context repeats, so now the cache answers, with the right slot
    again = _call(prewarm_stack, ["I'd like the evening slot.", "Yes."])
    assert again[1]["heard"] == "Done, the evening slot is yours." and again[1]["cacheHit"]


def test_a_prewarmed_reply_is_served_only_to_callers_answering_the_greeting(prewarm_stack):
    lines = ["Hello?", "Tell me about your listings.", *PREWARM_UTTERANCES]
    turns = _call(prewarm_stack, lines)
    assert turns[0]["cacheHit"] and turns[0]["heard"] == "Hello there! How can I help?"  # answers the greeting
    after_another_line = turns[2:]
    assert after_another_line and not any(t["cacheHit"] for t in after_another_line), after_another_line
    assert all(t["source"] == "llm" for t in after_another_line)
