"""The one-command offline demo: `python -m callweaver.simulate --demo` — no Twilio account, no LLM key.

It starts the real server (gunicorn, gevent workers), the Twilio REST stand-in and a stand-in LLM on loopback,
places a call with the bundled example workflow, and plays a scripted caller over the real ConversationRelay
socket. The stand-in LLM streams canned but plausible replies at a settable speed and calls the `transition`
tool the way a model following our instructions does, so the flow walks its steps to the end node. Every line it
prints says the replies come from a stand-in, never a real model.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from .bodies import make_call_body
from .caller import RelayCaller
from .live_server import LiveServer, free_port
from .llm_standin import FakeLLM, Reply
from .twilio_rest import TwilioRestStandIn
from .webhooks import http

EXAMPLE_WORKFLOW = Path(__file__).with_name("examples") / "real_estate_property_dealer.json"
# A line ending in BARGE_IN: the caller talks over the agent's reply to it after BARGE_IN_AFTER_WORDS words.
BARGE_IN = "[barge in]"
BARGE_IN_AFTER_WORDS = 4
DEMO_CALLER_SCRIPT = (
    "Hi, I'd like to buy a house.",
    "A three bedroom house near a good school. [barge in]",
    "Sorry, one more thing: it needs a garden, and up to 600 thousand.",
    "My name is Ann Lee and my contact number is 555 0134.",
    "That's everything, thanks. You can end the call.",
)
LABEL = "[demo · stand-in LLM, stand-in Twilio]"
DEMO_TO = "+15551230134"
# "- edge_2: <condition> (next step: Buyer Requirements Gathering)" lines of the transition tool's description.
_EDGE_LINE = re.compile(r"^- (?P<edge>\S+): .*\(next step: (?P<label>[^)]*)\)\s*$", re.MULTILINE)
STANDIN_REPLIES = (
    "Wonderful, thank you. I've noted that, so let's go on to {step}.",
    "Got it, that's really helpful. Next, {step}.",
    "Thanks, I have that down. Now for {step}.",
)
_WORD = re.compile(r"[a-z]{3,}")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _overlap(caller: set[str], label: set[str]) -> int:
    """Words in common, counting a stem match (buy ~ buyer, sell ~ seller) as one."""
    return sum(1 for word in label if any(word.startswith(c) or c.startswith(word) for c in caller))


def standin_brain(body: dict) -> Reply:
    """Answer like a model following our tool instructions: a short reply, then `transition` to the offered
    step whose name best matches what the caller said (or the only step offered)."""
    said = next((str(m.get("content") or "") for m in reversed(body.get("messages") or [])
                 if m.get("role") == "user"), "")
    edges: list[tuple[str, str]] = []
    for tool in body.get("tools") or []:
        fn = tool.get("function") or {}
        if fn.get("name") == "transition":
            edges = [(m["edge"], m["label"]) for m in _EDGE_LINE.finditer(fn.get("description") or "")]
    caller_words = _words(said)
    scored = sorted(((_overlap(caller_words, _words(label)), edge, label) for edge, label in edges), reverse=True)
    if scored and (scored[0][0] > 0 or len(scored) == 1):
        _, edge, label = scored[0]
        turn = sum(1 for m in body.get("messages") or [] if m.get("role") == "user")
        text = STANDIN_REPLIES[turn % len(STANDIN_REPLIES)].format(step=label.lower())
        if {"end", "call"} <= _words(label):
            text = "Perfect, I have everything I need."
        return Reply(text=text, tool_calls=[("transition", {"edge_id": edge})])
    return Reply(text="I see. Could you tell me a little more about that?")


@dataclass
class DemoResult:
    tracking_id: str
    call_page_url: str
    final_node: str | None
    outcome: str | None


def run_demo(*, script: list[str] | None = None, llm_ttft_ms: float = 350.0, llm_token_ms: float = 45.0,
             db_path: str = "instance/demo.sqlite3", port: int | None = None, keep_serving: bool = False,
             out: TextIO = sys.stdout, wait: Callable[[], None] | None = None, lang: str = "en-US") -> DemoResult:
    """Play one whole call in `lang` (the call's language and each utterance's prompt.lang; the caller's lines are
    the script's, English by default); print each turn with its timings and the call's dashboard URL."""

    def say(text: str) -> None:
        print(f"{LABEL} {text}", file=out, flush=True)

    account_sid, auth_token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
    lines = list(script or DEMO_CALLER_SCRIPT)
    with open(EXAMPLE_WORKFLOW, encoding="utf-8") as fh:
        export = json.load(fh)
    twilio = TwilioRestStandIn(account_sid, auth_token).start()
    llm = FakeLLM("stand-in", ttft_s=llm_ttft_ms / 1000, token_interval_s=llm_token_ms / 1000).start()
    llm.responder = standin_brain
    env = {"TWILIO_ACCOUNT_SID": account_sid, "TWILIO_AUTH_TOKEN": auth_token,
           "TWILIO_PHONE_NUMBER": "+15005550006", "TWILIO_API_BASE_URL": twilio.url,
           "LLM_PROVIDERS": "openai", "OPENAI_BASE_URL": llm.url, "OPENAI_API_KEY": "sk-stand-in-not-a-real-key",
           "AZURE_OPENAI_API_KEY": "", "REDIS_URL": "", "CALLWEAVER_DB": os.path.abspath(db_path), "CACHE_TYPE": "SimpleCache",
           "CACHE_PREWARM": "0", "LOG_LEVEL": "WARNING", "NODE_ENV": "development", "OPS_TOKEN": "",
           "CALL_REPORT_URL": "", "OTEL_EXPORTER_OTLP_ENDPOINT": "", "RENDER": ""}
    server = LiveServer(env, workers=1, port=port or free_port())
    try:
        say(f"replies come from a local stand-in LLM (first token after {llm_ttft_ms:g} ms, a word every "
            f"{llm_token_ms:g} ms) and a Twilio stand-in: no keys, nothing leaves this machine")
        server.start()
        say(f"real CallWeaver server (gunicorn, gevent) at {server.url}; workflow: {export.get('name')}")
        caller = RelayCaller(server.url, auth_token, account_sid)
        caller.place_call(make_call_body(export, DEMO_TO, language=lang))
        caller.status("initiated", 0)
        caller.status("ringing", 1)
        caller.answer_placed(twilio.creates()[-1])
        caller.status("in-progress", 2)
        say(f"call {caller.tracking_id} answered in {caller.twiml.attributes.get('language')}; "
            f"ConversationRelay socket {caller.twiml.url}")
        say(f"agent (greeting): {caller.twiml.attributes.get('welcomeGreeting')}")
        caller.connect()
        ended = None
        for index, line in enumerate(lines):
            text, barge_in = line.removesuffix(BARGE_IN).strip(), line.endswith(BARGE_IN)
            say(f"caller: {text}")
            if barge_in:
                reply = caller.say(text, lang, stop_after_words=BARGE_IN_AFTER_WORDS)
                heard = reply.first_words(BARGE_IN_AFTER_WORDS)
                caller.interrupt(heard)
                caller.drain()
                say(f"agent:  {heard} … (the caller barged in here)")
            else:
                reply = caller.say(text, lang)
                say(f"agent:  {reply.text}")
            turn = _server_turn(server.url, caller.tracking_id, index)
            say("        " + _timings(reply.first_token_ms, reply.last_token_ms, turn))
            if reply.end:
                ended = json.loads(reply.end.get("handoffData") or "{}")
                break
        if ended is not None:
            caller.connect_action("ended", ended)
            say(f"session ended by the flow ({ended.get('reason')})")
        caller.hangup()
        caller.status("completed", 3)
        detail = http("GET", f"{server.url}/api/call-log/{caller.tracking_id}").json()
        call = detail.get("call") or {}
        page = f"{server.url}/dashboard/calls/{caller.tracking_id}"
        say(f"call ended: {call.get('outcome')} at node {call.get('currentNode')}, {call.get('turns')} turns, "
            f"p50 first token {call.get('firstTokenP50Ms')} ms")
        say(f"this call on the dashboard: {page}")
        result = DemoResult(caller.tracking_id, page, call.get("currentNode"), call.get("outcome"))
        if keep_serving:
            say("the server keeps running so you can open that page; press Ctrl-C (or Enter) to stop it")
            try:
                (wait or _wait_for_enter)()
            except KeyboardInterrupt:
                pass
        return result
    finally:
        server.stop()
        llm.stop()
        twilio.stop()


def _server_turn(base_url: str, tracking_id: str, index: int) -> dict:
    """The turn as the server measured and stored it (it is committed just after the last token)."""
    for _ in range(50):
        turns = http("GET", f"{base_url}/api/call-log/{tracking_id}").json().get("turns") or []
        if len(turns) > index:
            return turns[index]
        time.sleep(0.05)
    return {}


def _timings(first_ms: float | None, last_ms: float | None, turn: dict) -> str:
    def ms(value) -> str:
        return "—" if value is None else f"{value:.0f} ms"

    provider = turn.get("provider") or turn.get("source") or "—"
    last = "the rest was cut off" if last_ms is None else f"last after {ms(last_ms)}"
    return (f"caller heard first word after {ms(first_ms)}, {last}; server: first token "
            f"{ms(turn.get('firstTokenMs'))}, {provider} TTFT {ms(turn.get('providerTtftMs'))}, "
            f"cache {'hit' if turn.get('cacheHit') else 'miss'}, node {turn.get('nodeId')} → {turn.get('nextNodeId')}")


def _wait_for_enter() -> None:
    sys.stdin.readline()
