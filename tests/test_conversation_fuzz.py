"""Randomized, seeded conversations: many relay calls (and some <Gather> calls) on the real flow and on small random
flows, a random caller and a random model each turn, and the call's invariants checked after every step.

Bounded by default (CONVO_FUZZ_CALLS relay calls, well under a minute; CONVO_FUZZ_END_CALLS calls ended by end-call,
status callbacks and LLM faults on each store, SQLite and Redis, about half a minute each); a longer local run:
    CONVO_FUZZ_SEED=7 CONVO_FUZZ_CALLS=200 CONVO_FUZZ_END_CALLS=60 python -m pytest -q tests/test_conversation_fuzz.py
A violation names the seed, call and turn that reproduce it (the whole run is a function of the seed).
"""
from __future__ import annotations

import json
import os
import random
import re
import time
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import pytest

from callweaver.engine.languages import LanguageTable
from callweaver.simulate import RelayCaller, http
from callweaver.simulate.bodies import make_call_body as build_body
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC, Signer, base_env
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.live_server import LiveServer
from tests.helpers import load_workflow

SEED = int(os.environ.get("CONVO_FUZZ_SEED") or random.SystemRandom().randrange(1, 10 ** 6))
RELAY_CALLS = int(os.environ.get("CONVO_FUZZ_CALLS") or 14)
ONLY_CALL = os.environ.get("CONVO_FUZZ_CALL")  # replay one call of the seed (its index, as a failure names it)
GATHER_CALLS = max(2, RELAY_CALLS // 3)
MAX_TURNS = 6
STALL_S = 0.6        # LLM_STALL_TIMEOUT_S of the server under test: a slower token fails over
FIRST_TOKEN_S = 1.0  # LLM_FIRST_TOKEN_TIMEOUT_S (conftest.base_env)
# An `end` comes at most this long after Twilio reported our last words heard (agentSpeaking off after them): the
# grace for an interrupt (200 ms) and the hold of an "off" that may have crossed our words (reaction time + 200 ms),
# with room for a loaded machine; never the playback bound's seconds of silence.
LATE_END_S = 1.0

UTTERANCES = {
    "en-US": ["I want to buy a house", "Can you tell me more about renting?", "My name is Ann Lee",
              "I'd like to sell my flat", "What are your opening hours?", "Hmm, let me think.",
              "I need a human agent please", "That's everything, thank you"],
    "es-ES": ["Quiero comprar una casa", "¿Cuánto cuesta un piso en el centro?", "Me llamo Ana"],
    "fr-FR": ["Je voudrais louer un appartement", "Pouvez-vous répéter s'il vous plaît ?"],
    "de-DE": ["Ich möchte ein Haus kaufen", "Wie viel kostet das?"],
    "zh-HK": ["我想買樓", "唔該你講多次", "我想租一個兩房單位", "我叫陳大文"],
    "cmn-CN": ["我想买房子", "请再说一遍"],
    "ja-JP": ["家を買いたいです", "もう一度お願いします"],
    "hi-IN": ["मैं एक घर खरीदना चाहता हूँ"],
    "ar-SA": ["أريد شراء منزل"],
}
GOODBYES = [("en-US", "ok that's all, thanks bye"), ("en-US", "Goodbye!"), ("zh-HK", "唔該，拜拜"),
            ("es-ES", "gracias, adiós"), ("fr-FR", "merci, au revoir")]
REPLIES = {"en-US": ["Sure, I can help with that.", "Could you tell me a bit more?",
                     "Great. What budget do you have in mind?"],
           "es-ES": ["Claro, le ayudo con eso."],
           "zh-HK": ["好呀，我幫你睇吓。", "請問你嘅預算大概係幾多？"],
           "fr-FR": ["Bien sûr, je vous aide."], "de-DE": ["Gern, ich helfe Ihnen."]}


# ---- flows ---------------------------------------------------------------------------------------------------------
def random_flow(rng: random.Random, index: int) -> dict:
    """A small valid flow: start → conversation steps joined by ai_based (and some logical) edges → end/transfer."""
    steps = [f"step_{i}" for i in range(rng.randint(1, 4))]
    nodes = [{"id": "start", "type": "startNode", "data": {
        "label": "Start", "firstMessage": f"Hello, this is flow {index}. How can I help?",
        "globalPrompt": "You are a helpful phone assistant."}}]
    nodes += [{"id": s, "type": "conversationNode", "data": {"label": f"Step {s}", "prompt": f"Talk about {s}."}}
              for s in steps]
    exits = []
    if rng.random() < 0.8:
        nodes.append({"id": "end", "type": "endCall", "data": {"label": "End", **(
            {"endMessage": "Thanks for calling, goodbye."} if rng.random() < 0.8 else {})}})
        exits.append("end")
    if rng.random() < 0.6:
        nodes.append({"id": "transfer", "type": "transferCall", "data": {
            "label": "Transfer", "destination": f"+1555123{index % 10000:04d}",
            "transferMessage": "Connecting you to a colleague now."}})
        exits.append("transfer")
    edges = [{"id": "e_start", "source": "start", "target": steps[0], "type": "conditional",
              "data": {"type": "none", "isDefault": True}}]
    n = 0
    for i, source in enumerate(steps):
        targets = set(rng.sample(steps + exits, k=min(len(steps + exits), rng.randint(1, 3))))
        targets |= {steps[i + 1]} if i + 1 < len(steps) else set(exits)  # every step and exit is reachable
        for target in sorted(targets - {source}):
            n += 1
            edges.append({"id": f"e{n}", "source": source, "target": target, "type": "conditional",
                          "data": {"type": "ai_based", "aiCondition": f"The caller wants {target}"}})
    variables = [{"name": "wants_human", "type": "boolean", "description": "Caller asked for a person",
                  "nodeId": steps[-1]}]
    if "transfer" in exits and rng.random() < 0.5:
        edges.append({"id": "e_logic", "source": steps[-1], "target": "transfer", "type": "conditional",
                      "data": {"type": "logical", "logicalConditions": [
                          {"variable": "wants_human", "operator": "==", "value": True}]}})
    silence_s = 1.5 if rng.random() < 0.3 else 30  # short: the caller's silence is handled within the run
    config = {"globalSettings": {"defaultLanguage": "en-US", "silenceTimeout": silence_s, "maxCallDuration": 15}}
    return {"name": f"Random flow {index}", "config": config, "nodes": nodes, "edges": edges,
            "variables": variables}


def pick_flow(rng: random.Random, index: int) -> dict:
    """The real estate flow, the Cantonese clinic flow, or a small random one."""
    draw = rng.random()
    if draw < 0.3:
        return load_workflow()
    if draw < 0.45:
        return load_workflow("clinic_cantonese_transfer")
    return random_flow(rng, index)


def utterance(rng: random.Random, cantonese: bool) -> tuple[str, str]:
    """A language and something said in it; on a Cantonese call mostly Cantonese (recognition is fixed to it)."""
    if cantonese and rng.random() < 0.8:
        return "zh-HK", rng.choice(UTTERANCES["zh-HK"])
    lang, said = rng.choice(list(UTTERANCES.items()))
    return lang, rng.choice(said)


def goodbye(rng: random.Random, cantonese: bool) -> tuple[str, str]:
    """A goodbye the call's recognition can hear: Cantonese on a Cantonese call, else one of the others."""
    return rng.choice([g for g in GOODBYES if (g[0] == "zh-HK") == cantonese])


class Flow:
    """The graph the invariants are checked against (from the export, not the engine's parser)."""

    def __init__(self, export: dict):
        self.export = export
        self.kinds = {n["id"]: n["type"] for n in export["nodes"]}
        self.data = {n["id"]: n.get("data", {}) for n in export["nodes"]}
        self.out: dict[str, list[dict]] = {}
        for e in export["edges"]:
            self.out.setdefault(e["source"], []).append(e)

    def destination(self, node: str) -> str | None:
        """The transfer node's number, as written in the flow (E.164 once separators are dropped)."""
        raw = self.data.get(node, {}).get("destination")
        return re.sub(r"[\s().\-]", "", raw) if raw else None

    def ends(self) -> set[str]:
        return {i for i, k in self.kinds.items() if k == "endCall"}

    def next_allowed(self, node: str) -> set[str]:
        """The same node, or one an edge from it leads to (through pass-through start nodes)."""
        allowed, todo = {node}, [e["target"] for e in self.out.get(node, [])]
        while todo:
            target = todo.pop()
            if target in allowed or target not in self.kinds:
                continue
            allowed.add(target)
            if self.kinds[target] == "startNode":
                todo += [e["target"] for e in self.out.get(target, [])]
        return allowed


# ---- the model -----------------------------------------------------------------------------------------------------
def offered(body: dict) -> tuple[list[str], set[str]]:
    edges, tools = [], set()
    for tool in body.get("tools") or []:
        fn = tool.get("function", {})
        tools.add(fn.get("name"))
        if fn.get("name") == "transition":
            edges = list(fn["parameters"]["properties"]["edge_id"].get("enum", []))
    return edges, tools


@dataclass
class Brain:
    """The model's behaviour for the current turn: a queue of per-request behaviours, then plain replies."""

    rng: random.Random
    lang: str = "en-US"
    queue: list = field(default_factory=list)

    def __call__(self, body: dict) -> Reply:
        if self.queue:
            step = self.queue.pop(0)
            return step(body) if callable(step) else step
        return Reply(text=self.text())

    def text(self) -> str:
        return self.rng.choice(REPLIES.get(self.lang, REPLIES["en-US"]))


def model_behaviour(rng: random.Random, brain: Brain, backup: Brain, flow: Flow) -> str:
    """Choose and queue what the model does this turn; returns its name (for the report)."""
    kind = rng.choices(["plain", "transition", "tool_only", "bad_tools", "keys", "record", "wordless",
                        "fault_first", "fault_mid", "slow", "outage"],
                       weights=[5, 4, 2, 2, 1, 1, 1, 2, 2, 1, 1])[0]
    text = brain.text()

    def transition(words: str):
        def reply(body: dict) -> Reply:
            edges, _ = offered(body)
            calls = [("transition", {"edge_id": rng.choice(edges)})] if edges else []
            return Reply(text=words, tool_calls=calls)
        return reply

    if kind == "plain":
        brain.queue.append(Reply(text=text))
    elif kind == "transition":
        brain.queue.append(transition(text))
    elif kind == "tool_only":
        brain.queue.append(transition(""))
    elif kind == "bad_tools":
        bogus = rng.choice([{"edge_id": "edge_999"}, {"edge_id": 12}, {}, {"edge_id": None},
                            {"edge_id": "e_start"}, {"edge_id": "edge_1", "destination": "+19005550100"}])
        brain.queue.append(Reply(text=text, tool_calls=[("transition", bogus), ("transfer_call", {"to": "+1900"}),
                                                        ("no_such_tool", {"x": 1})]))
    elif kind == "keys":
        brain.queue.append(Reply(text=rng.choice(["", text]), tool_calls=[
            ("press_keys", {"digits": rng.choice(["1", "12#", "abc", "1" * 40, ""])})]))
    elif kind == "record":
        brain.queue.append(Reply(text=text, tool_calls=[("record_variables", {
            "wants_human": rng.choice([True, False, "yes", None]), "unknown": 1})]))
    elif kind == "wordless":
        brain.queue.append(Reply(text=rng.choice(["", "   ", '<break time="1s"/>'])))
        backup.queue.append(Reply(text=rng.choice(["", backup.text()])))
    elif kind == "fault_first":
        brain.queue.append(Reply(fault=rng.choice(["500", "429", "hang"])))
        backup.queue.append(Reply(text=backup.text()))
    elif kind == "fault_mid":
        long = "Let me explain how this works in a few words for you today."
        brain.queue.append(Reply(text=long, fault="drop", drop_after_tokens=rng.randint(1, 6)))
        backup.queue.append(Reply(text="and that is how it works."))
    elif kind == "slow":
        brain.queue.append(Reply(text="One moment please while I check that for you.", token_interval_s=STALL_S + 0.3))
        backup.queue.append(Reply(text="I checked, it is available."))
    elif kind == "outage":
        brain.queue.append(Reply(fault="500"))
        backup.queue.append(Reply(fault="500"))
    return kind


# ---- checks --------------------------------------------------------------------------------------------------------
def fold(text: str) -> str:
    """Text as compared between what was heard and what was stored: letters and digits only."""
    text = re.sub(r"<[^>]*>", "", text or "")
    return "".join(ch.lower() for ch in unicodedata.normalize("NFKC", text) if ch.isalnum())


class Violation(AssertionError):
    pass


@dataclass
class Context:
    seed: int
    call: int
    steps: list = field(default_factory=list)
    dump: object = lambda: ""  # what to print on a violation with CONVO_FUZZ_DUMP=1 (the server log)

    def fail(self, what: str) -> None:
        if os.environ.get("CONVO_FUZZ_DUMP"):
            print(self.dump())
        raise Violation(f"seed={self.seed} call={self.call}: {what}\nsteps so far: {self.steps}")


def call_detail(server_url: str, tracking_id: str) -> dict:
    return http("GET", f"{server_url}/api/call-log/{tracking_id}?mask=0").json()



def closing_line_outcome(ctx, caller, url: str, before: int, cycles: list, turns: int) -> str | None:
    """When the reply talked over (by keys or words) was a closing line fully sent first, its `end` came and the
    input ends with it: check the one end matches the stored turn's action, and return the call's outcome."""
    ends = [m for m in caller.received[before:] if m.get("type") == "end"]
    if not ends or len(cycles) != 1:
        return None
    detail = wait_turns(url, caller.tracking_id, turns)
    if len(ends) != 1 or detail["turns"][-1]["action"] != json.loads(ends[0]["handoffData"])["reason"]:
        ctx.fail(f"input over a closing line: ends {ends}, turn {detail['turns'][-1]}")
    return {"end": "end_node", "transfer": "transfer"}[json.loads(ends[0]["handoffData"])["reason"]]

def wait_turns(server_url: str, tracking_id: str, count: int, timeout_s: float = 8.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        detail = call_detail(server_url, tracking_id)
        if len(detail.get("turns") or []) >= count or time.monotonic() > deadline:
            return detail
        time.sleep(0.05)


def check_turn_rows(ctx: Context, flow: Flow, detail: dict, start_node: str) -> None:
    """Every committed turn: a node reachable from the one before, metrics non-negative or null."""
    node = start_node
    for i, turn in enumerate(detail["turns"]):
        if turn["nodeId"] != node and flow.kinds.get(node) != "startNode":
            ctx.fail(f"turn {i} ran on {turn['nodeId']} but the call was on {node}")
        nxt = turn["nextNodeId"]
        termination = turn.get("action") == "end" and nxt in flow.ends()
        if nxt not in flow.next_allowed(turn["nodeId"]) and not termination:
            ctx.fail(f"turn {i} moved {turn['nodeId']} -> {nxt}, not along an edge")
        for key in ("firstTokenMs", "lastTokenMs", "providerTtftMs", "addedLatencyMs"):
            value = turn.get(key)
            if value is not None and value < 0:
                ctx.fail(f"turn {i} {key}={value} is negative")
        if turn.get("firstTokenMs") is not None and turn.get("lastTokenMs") is not None \
                and turn["lastTokenMs"] < turn["firstTokenMs"]:
            ctx.fail(f"turn {i} lastTokenMs < firstTokenMs: {turn}")
        if turn.get("interrupted") and (turn.get("action")
                                        or nxt != turn["nodeId"] and turn.get("source") == "apology"):
            ctx.fail(f"turn {i} was interrupted yet fired {turn.get('action')} / moved to {nxt}")
        if turn.get("action") == "end" and flow.ends() and nxt not in flow.ends():
            ctx.fail(f"turn {i} ended the call on {nxt}, not an end node")
        if turn.get("action") == "transfer" and flow.kinds.get(nxt) != "transferCall":
            ctx.fail(f"turn {i} transferred from {nxt}, not a transfer node")
        node = nxt


def check_history_matches_transcript(ctx: Context, record) -> None:
    """What the model is told it said (the stored history) is what the caller heard (the transcript), turn by turn."""
    messages = list(record.messages or [])
    told = []
    for i, message in enumerate(messages):
        if message["role"] == "user":
            after = messages[i + 1] if i + 1 < len(messages) else None
            told.append((message["content"], after["content"] if after and after["role"] == "assistant" else ""))
    heard = [(entry["said"], entry["heard"]) for entry in record.transcript or []]
    if len(told) != len(heard):
        ctx.fail(f"{len(told)} caller turns in the history, {len(heard)} in the transcript")
    for (said, history), (said_t, heard_t) in zip(told, heard):
        if said != said_t or not fold(history).startswith(fold(heard_t)) or (
                fold(history) != fold(heard_t) and "[" not in history):  # (a tool refusal note, keys pressed)
            ctx.fail(f"history says {said!r} -> {history!r}; transcript {said_t!r} -> {heard_t!r}")


def read_cycles(ctx: Context, caller: RelayCaller, already: list, count: int) -> list[str]:
    """The text of the next `count` talk cycles (closed by last: true), `already` read included."""
    cycles, tokens = [], []
    pending = [m for m in already if m is not None]
    while len(cycles) < count:
        msg = pending.pop(0) if pending else caller.recv(timeout_s=10)
        if msg is None:
            ctx.fail(f"only {len(cycles)} of {count} talk cycles closed: {tokens}")
        if msg.get("type") == "text":
            tokens.append(msg.get("token") or "")
            if msg.get("last"):
                cycles.append("".join(tokens))
                tokens = []
        if msg.get("type") == "end":
            break
    return cycles


def read_cycle(ctx: Context, caller: RelayCaller) -> str:
    return read_cycles(ctx, caller, [], 1)[0]


# ---- the relay stack -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    primary, secondary = FakeLLM("primary").start(), FakeLLM("secondary").start()
    env = base_env(tmp, twilio, primary, secondary)
    env.pop("PUBLIC_BASE_URL")
    env.update(LLM_STALL_TIMEOUT_S=str(STALL_S), RATE_LIMIT_MAKE_CALL="1000 per minute",
               RATE_LIMIT_METRICS="1000/second", ALLOWED_DESTINATION_PREFIXES="+1,+852",
               MAX_CALLS_PER_DAY="100000", LOG_LEVEL=os.environ.get("CONVO_FUZZ_LOG_LEVEL", "WARNING"))
    server = LiveServer(env, workers=1).start()
    from callweaver import create_app
    store = create_app(env).extensions["callweaver"].store  # the server's database, read from here
    yield {"server": server, "twilio": twilio, "llm": primary, "llm2": secondary, "store": store}
    server.stop()
    for fake in (twilio, primary, secondary):
        fake.stop()


# error-level events a random conversation rightly causes: an outage, Twilio refusing frames (twilio_errors)
ALLOWED_ERROR_EVENTS = {"all_llm_providers_failed", "relay_twilio_error", "relay_ending_after_errors"}


def server_errors(logs: str) -> list[dict]:
    found = []
    for line in logs.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            if "Traceback" in line:
                found.append({"event": "traceback", "line": line})
            continue
        if not isinstance(event, dict):
            continue
        if event.get("exception") or (event.get("level") in ("error", "critical")
                                      and event.get("event") not in ALLOWED_ERROR_EVENTS):
            found.append(event)
    return found


def due_reprompt(message: dict, silent_since: float | None, silence_s: float, url: str, tracking_id: str) -> bool:
    """`message`, just received, is the call's silence re-prompt and was due: its line, in the call's language (its
    last turn's, else its own), at least `silence_s` after Twilio (the caller) reported it had played everything (the
    server counts the silence from no earlier than it received that "off")."""
    if silent_since is None or time.monotonic() - silent_since < silence_s:
        return False
    detail = call_detail(url, tracking_id)
    turns = detail.get("turns") or []
    lang = turns[-1]["language"] if turns and turns[-1].get("language") else detail["call"].get("language")
    line = LanguageTable.load().get(lang).line("reprompt")
    return message == {"type": "text", "token": line, "last": True}


def relay_call(stack, seed: int, index: int) -> list:
    steps: list = []
    try:
        return relay_call_steps(stack, seed, index, steps)
    except Violation:
        raise
    except Exception as exc:
        raise Violation(f"seed={seed} call={index}: {exc!r}\nsteps so far: {steps}") from exc


def relay_call_steps(stack, seed: int, index: int, steps: list) -> list:
    rng = random.Random(f"{seed}:{index}")
    ctx = Context(seed, index, steps, dump=stack["server"].logs)
    export = pick_flow(rng, index)
    flow = Flow(export)
    cantonese = export["config"].get("globalSettings", {}).get("defaultLanguage") == "zh-HK"
    body = build_body(export, "+15551234567", **{"from": "+15005550006", "record": False, "timeout": 30})
    brain, backup = Brain(rng), Brain(rng)
    stack["llm"].reset()
    stack["llm2"].reset()
    stack["llm"].responder, stack["llm2"].responder = brain, backup
    silence_s = export["config"].get("globalSettings", {}).get("silenceTimeout", 10)
    # Twilio speaking fast (replies play at once) or at a voice's pace (a closing line still plays when talked over)
    rate = 1500 if silence_s < 5 or rng.random() < 0.7 else 150
    caller = RelayCaller(stack["server"].url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15, speaking_rate_cps=rate,
                         closing_quiet_s=0.25)
    caller.place_call(body)
    caller.answer_placed(stack["twilio"].creates()[-1])
    caller.connect()
    url = stack["server"].url
    start = next(n["id"] for n in export["nodes"] if n["type"] == "startNode")
    expected_turns, ended, outcome = 0, None, "hang_up"
    for turn in range(rng.randint(1, MAX_TURNS)):
        lang, said = utterance(rng, cantonese)
        brain.lang = backup.lang = lang if lang in REPLIES else "en-US"
        brain.queue.clear()
        backup.queue.clear()
        action = rng.choices(["say", "empty", "long", "goodbye", "dtmf", "barge", "barge_late", "talk_over",
                              "barge_goodbye", "dtmf_over", "speak", "silence", "hangup", "keys_then_words",
                              "twilio_errors"],
                             weights=[8, 1, 1, 1, 2, 2, 1, 1, 1, 1, 4, 2 if silence_s < 5 else 0, 1, 1, 0.3])[0]
        quiet = ("empty", "goodbye", "barge_goodbye", "silence", "twilio_errors")  # no model turn to script
        behaviour = "-" if action in quiet else model_behaviour(rng, brain, backup, flow)
        if action in ("barge", "talk_over"):  # a reply long and slow enough to be talked over
            long_text = " ".join(f"word{i}" for i in range(40)) + "."
            moving = rng.random() < 0.4  # the reply also takes an edge (perhaps to an end or transfer)

            def long_slow(body: dict, long_text=long_text, moving=moving) -> Reply:
                edges, _ = offered(body)
                calls = [("transition", {"edge_id": rng.choice(edges)})] if moving and edges else []
                return Reply(text=long_text, token_interval_s=0.03, tool_calls=calls)
            brain.queue[:], backup.queue[:] = [long_slow], [long_slow]  # (the primary's circuit may be open)
            behaviour = "long_slow_moving" if moving else "long_slow"
        ctx.steps.append((turn, action, lang, said if action == "say" else "", behaviour))
        before = len(caller.received)
        if action == "empty":
            silent_at = caller.silent_at  # (Twilio's last "off": the caller has been silent since, if not earlier)
            sent = caller.prompt("   ")
            stray = caller.recv(timeout_s=0.4)
            if stray is not None and due_reprompt(stray, silent_at, silence_s, url, caller.tracking_id):
                # the silence before this prompt ran out as it was sent (a loaded machine: the steps before took
                # longer than a short silenceTimeout): that "are you still there?" answers the silence, not the
                # prompt, which must still go unanswered
                ctx.steps[-1] = (*ctx.steps[-1][:4], "silence_reprompt_first")
                stray = caller.recv(timeout_s=max(0.0, 0.4 - (time.monotonic() - sent)))
            if stray is not None:
                ctx.fail(f"an empty prompt was answered: {stray}")
            continue
        if action == "dtmf":
            digits = "".join(rng.choice("0123456789*") for _ in range(rng.randint(1, 4)))
            for d in digits + "#":
                caller.send({"type": "dtmf", "digit": d})
            from callweaver.simulate.caller import Reply as Heard
            reply = caller.read_reply(Heard(sent_at=time.monotonic()))
        elif action == "long":
            reply = caller.say(("I have a very long story to tell you about my house. " * 60).strip(), lang="en-US")
        elif action == "goodbye":
            lang, said = goodbye(rng, cantonese)
            ctx.steps[-1] = (turn, action, lang, said, behaviour)
            reply = caller.say(said, lang=lang)
            end = caller.wait_for_end(reply, LATE_END_S)  # (it may come that long after the goodbye played)
            if end is None or json.loads(end["handoffData"])["reason"] != "end":
                ctx.fail(f"a goodbye did not end the call: {reply.messages}")
        elif action == "barge":
            words = rng.randint(1, 6)
            partial = caller.say(said, lang=lang, stop_after_words=words)
            reported = partial.first_words(words)
            caller.interrupt(reported)
            caller.drain()
            expected_turns += 1
            detail = wait_turns(url, caller.tracking_id, expected_turns)
            row = detail["turns"][-1]
            if not row["interrupted"] and fold(reported) != fold(row["spoken"]):
                ctx.fail(f"barge-in turn not marked interrupted: {row}")
            if fold(row["heard"]) != fold(reported):
                ctx.fail(f"stored heard {row['heard']!r} but the caller heard {reported!r}")
            check_turn_rows(ctx, flow, detail, start)
            continue
        elif action == "barge_late":  # the whole reply was sent; Twilio was still speaking it
            reply = caller.say(said, lang=lang)
            expected_turns += 1
            if reply.end is not None:
                ended = json.loads(reply.end["handoffData"])
                outcome = {"end": "end_node", "transfer": "transfer"}.get(ended["reason"], "error")
                break
            words = reply.text.split()
            reported = " ".join(words[:rng.randint(1, max(1, len(words) - 1))])
            caller.interrupt(reported, played_ms=500)
            caller.drain(0.2)
            detail = wait_turns(url, caller.tracking_id, expected_turns)
            row = detail["turns"][-1]
            if fold(row["heard"]) != fold(reported) and "[pressed" not in (row["heard"] or ""):
                ctx.fail(f"late barge-in: stored heard {row['heard']!r} but the caller heard {reported!r}")
            if fold(reported) != fold(reply.text) and not row["interrupted"]:
                ctx.fail(f"late barge-in: the turn cut to {row['heard']!r} is not marked interrupted")
            check_turn_rows(ctx, flow, detail, start)
            continue
        elif action == "silence":  # the caller says nothing: "are you still there?", then goodbye and end
            # (counted from when the last line has played: Twilio's agentSpeaking off, else a slow-speech estimate)
            reprompt = caller.recv(timeout_s=silence_s + 10)
            lines = [reprompt]
            while reprompt is not None and not (reprompt.get("type") == "text" and reprompt.get("last")):
                reprompt = caller.recv(timeout_s=3)
                lines.append(reprompt)
            heard = "".join((m or {}).get("token") or "" for m in lines)
            if not heard.strip() or lines[-1] is None:
                ctx.fail(f"no reprompt after {silence_s}s of silence: {lines}")
            if rng.random() < 0.5:
                continue  # the caller answers the reprompt: the next turn
            closing = [caller.recv(timeout_s=silence_s + 10)]
            while closing[-1] is not None and closing[-1].get("type") != "end":
                closing.append(caller.recv(timeout_s=8))
            if closing[-1] is None or json.loads(closing[-1]["handoffData"])["reason"] != "silence":
                ctx.fail(f"no goodbye and end after a second silence: {closing}")
            ended, outcome = json.loads(closing[-1]["handoffData"]), "silence"
            break
        elif action == "hangup":  # the caller hangs up while the reply streams
            long_slow = Reply(text=" ".join(f"word{i}" for i in range(40)) + ".", token_interval_s=0.03)
            brain.queue[:], backup.queue[:] = [long_slow], [long_slow]
            ctx.steps[-1] = (turn, action, lang, said, "long_slow")
            partial = caller.say(said, lang=lang, stop_after_tokens=rng.randint(1, 4))
            caller.hangup()
            expected_turns += 1
            detail = wait_turns(url, caller.tracking_id, expected_turns)
            if len(detail["turns"]) != expected_turns:
                ctx.fail(f"hang-up mid-reply: {len(detail['turns'])} turns stored, expected {expected_turns}")
            row = detail["turns"][-1]
            if not fold(row["heard"]).startswith(fold(partial.text)) or not fold(row["spoken"]).startswith(
                    fold(row["heard"])):
                ctx.fail(f"hang-up mid-reply: stored heard {row['heard']!r}, caller had {partial.text!r}")
            check_turn_rows(ctx, flow, detail, start)
            break
        elif action == "twilio_errors":  # Twilio refuses what we send, three times in a row: apology, end (error)
            for _ in range(3):
                caller.send({"type": "error", "description": "Invalid message received (64107)"})
            got = [caller.recv(timeout_s=8)]
            while got[-1] is not None and got[-1].get("type") != "end":
                got.append(caller.recv(timeout_s=8))
            if got[-1] is None or json.loads(got[-1]["handoffData"])["reason"] != "error":
                ctx.fail(f"three Twilio errors did not end the call with an apology: {got}")
            if not "".join(m.get("token") or "" for m in got[:-1]).strip():
                ctx.fail(f"an error ending with no apology: {got}")
            ended, outcome = json.loads(got[-1]["handoffData"]), "error"
            break
        elif action == "keys_then_words":  # the caller types, then speaks before the entry ended: one turn
            for d in "42":
                caller.send({"type": "dtmf", "digit": d})
            reply = caller.say(said, lang=lang)
            expected_turns += 1
            if not reply.text.strip() and not [m for m in caller.received[before:] if m.get("type") == "sendDigits"]:
                ctx.fail(f"keys then words: no reply {reply.messages}")
            caller.drain(0.25)
            detail = wait_turns(url, caller.tracking_id, expected_turns, timeout_s=4)
            if len(detail["turns"]) != expected_turns or "42" not in (detail["turns"][-1]["said"] or ""):
                ctx.fail(f"keys then words: turns {[(t['said'], t['heard']) for t in detail['turns']]}")
            check_turn_rows(ctx, flow, detail, start)
            ends = [m for m in caller.received[before:] if m.get("type") == "end"]
            if not ends and detail["turns"][-1]["action"] in ("end", "transfer"):
                # (a closing line's end may come that long after it played; only then: a second of the caller's
                # silence after any other reply runs into a short silenceTimeout's re-prompt, read as the next reply)
                caller.wait_for_end(reply, LATE_END_S)
                ends = [m for m in caller.received[before:] if m.get("type") == "end"]
            if ends:
                ended = json.loads(ends[0]["handoffData"])
                outcome = {"end": "end_node", "transfer": "transfer"}[ended["reason"]]
                break
            continue
        elif action == "barge_goodbye":  # the caller talks over the goodbye before it has played: no end
            lang, said = goodbye(rng, cantonese)
            ctx.steps[-1] = (turn, action, lang, said, behaviour)
            node_before = call_detail(url, caller.tracking_id)["call"]["currentNode"]
            caller.prompt(said, lang=lang)
            heard = read_cycle(ctx, caller)
            words = heard.split()
            caller.interrupt(words[0] if len(words) > 1 else heard.strip()[:2], played_ms=300)  # (CJK: 2 characters)
            expected_turns += 1
            if any(m.get("type") == "end" for m in caller.drain(0.6)):
                ctx.fail("an end after the caller talked over the goodbye")
            detail = wait_turns(url, caller.tracking_id, expected_turns)
            row = detail["turns"][-1]
            if row["action"] is not None or not row["interrupted"] or detail["call"]["currentNode"] != node_before:
                ctx.fail(f"a goodbye talked over still moved the call: {row} now on {detail['call']['currentNode']}")
            check_turn_rows(ctx, flow, detail, start)
            continue
        elif action == "dtmf_over":  # keys typed while a reply streams: it stops, the keys are one new turn
            caller.prompt(said, lang=lang)
            first = caller.recv(timeout_s=5)
            for d in "12#":
                caller.send({"type": "dtmf", "digit": d})
            cycles = read_cycles(ctx, caller, [first], 2)
            late = caller.drain(0.5)
            closed = closing_line_outcome(ctx, caller, url, before, cycles, expected_turns + 1)
            if closed is not None:  # the reply was a closing line, fully sent before the keys: they end with it
                outcome = closed
                break
            if [m for m in late if m.get("type") == "text" and m.get("token")]:
                ctx.fail(f"keys over a reply: a third reply {late}")
            expected_turns += 2
            detail = wait_turns(url, caller.tracking_id, expected_turns)
            if len(detail["turns"]) != expected_turns:
                ctx.fail(f"keys over a reply: {len(detail['turns'])} turns stored, expected {expected_turns}")
            for row, heard in zip(detail["turns"][-2:], cycles):
                if fold(row["heard"]) != fold(heard) and "[pressed" not in (row["heard"] or ""):
                    ctx.fail(f"keys over a reply: stored heard {row['heard']!r}, caller heard {heard!r}")
            if not cycles[1].strip() and not [m for m in caller.received[before:] if m.get("type") == "sendDigits"]:
                ctx.fail("keys over a reply: the keys were not answered")
            check_turn_rows(ctx, flow, detail, start)
            if detail["turns"][-1]["action"]:
                # its end follows once Twilio has played both replies (the one cut, then the closing line)
                while not [m for m in caller.received[before:] if m.get("type") == "end"] and caller.recv(8):
                    pass
                caller.drain(0.3)
                ends = [m for m in caller.received[before:] if m.get("type") == "end"]
                if len(ends) != 1:
                    ctx.fail(f"keys over a reply: the turn's {detail['turns'][-1]['action']} sent {len(ends)} ends")
                ended = json.loads(ends[0]["handoffData"])
                outcome = {"end": "end_node", "transfer": "transfer"}[ended["reason"]]
                break
            continue
        elif action == "talk_over":
            caller.prompt(said, lang=lang)
            first = caller.recv(timeout_s=5)
            caller.prompt("Sorry, one more thing", lang="en-US")
            cycles = read_cycles(ctx, caller, [first], 2)
            late = caller.drain(0.5)
            closed = closing_line_outcome(ctx, caller, url, before, cycles, expected_turns + 1)
            if closed is not None:  # the reply was a closing line, fully sent before the keys: they end with it
                outcome = closed
                break
            if [m for m in late if m.get("type") == "text" and m.get("token")]:
                ctx.fail(f"keys over a reply: a third reply {late}")
            expected_turns += 2
            detail = wait_turns(url, caller.tracking_id, expected_turns)
            rows = detail["turns"][-2:]
            if len(detail["turns"]) != expected_turns:
                ctx.fail(f"talk-over: {len(detail['turns'])} turns stored, expected {expected_turns}")
            for row, heard in zip(rows, cycles):
                if fold(row["heard"]) != fold(heard):
                    ctx.fail(f"talk-over: stored heard {row['heard']!r}, caller heard {heard!r}")
            check_turn_rows(ctx, flow, detail, start)
            if caller.drain(0.3):
                ctx.fail("talk-over: more frames after both replies")
            continue
        elif action == "speak":  # interim transcripts word by word, voice activity: speculations start early
            final = rng.choice([None, None, said + " please", "something else entirely"])
            ctx.steps[-1] = (turn, action, lang, f"{said} -> {final}", behaviour)
            reply = caller.speak(said, lang=lang, words_per_minute=rng.choice([300, 900]),
                                 end_of_speech_ms=rng.choice([150, 400]), final=final,
                                 punctuated_partials=rng.random() < 0.5)
        else:
            reply = caller.say(said, lang=lang)
        expected_turns += 1
        # every prompt is answered, with words (or, at a phone menu, with keys only); never a second reply
        late = caller.drain(0.25)
        extra = [m for m in late if m.get("type") == "text" and m.get("token")]
        if extra:
            ctx.fail(f"a second reply to one prompt: {extra}")
        pressed = [m for m in caller.received[before:] if m.get("type") == "sendDigits"]
        if not reply.text.strip() and not pressed:
            ctx.fail(f"silence after {action}: {reply.messages + late}")
        if reply.end is not None and not reply.text.strip():
            ctx.fail(f"an end with no words before it: {reply.messages}")
        detail = wait_turns(url, caller.tracking_id, expected_turns)
        if len(detail["turns"]) != expected_turns:
            ctx.fail(f"{len(detail['turns'])} turns stored, expected {expected_turns}")
        row = detail["turns"][-1]
        if row["interrupted"] or fold(row["heard"]) != fold(reply.text) and "[pressed" not in (row["heard"] or ""):
            ctx.fail(f"stored heard {row['heard']!r} but the caller heard {reply.text!r}")
        apology_words = row["source"] == "apology"
        if behaviour == "outage" and not apology_words and not row["cacheHit"] and action != "speak":
            ctx.fail(f"outage turn not an apology: {row}")
        check_turn_rows(ctx, flow, detail, start)
        ends = [m for m in caller.received[before:] if m.get("type") == "end"]
        waited = time.monotonic()
        while row["action"] in ("end", "transfer") and not ends and time.monotonic() - waited < 10:
            caller.recv(timeout_s=1)  # its end waits for Twilio to report the closing line played (or a bound)
            ends = [m for m in caller.received[before:] if m.get("type") == "end"]
        if len(ends) > 1:
            ctx.fail(f"{len(ends)} end messages in one turn")
        if row["action"] in ("end", "transfer") and not ends:
            ctx.fail(f"turn action {row['action']} but no end message")
        if ends:
            handoff = json.loads(ends[0]["handoffData"])
            if handoff["reason"] != row["action"]:
                ctx.fail(f"end reason {handoff['reason']} but the turn's action is {row['action']}")
            if handoff["reason"] == "transfer":
                node = handoff.get("node")
                if handoff.get("destination") != flow.destination(node):
                    ctx.fail(f"transfer to {handoff.get('destination')} from node {node}")
            ended, outcome = handoff, {"end": "end_node", "transfer": "transfer"}.get(handoff["reason"], "error")
            break
    caller.hangup()  # (again, after a hang-up mid-reply: nothing)
    if ended is not None:  # Twilio closes the session and asks the action URL what next
        root = ET.fromstring(caller.connect_action("ended", ended).text)
        want = ["Dial"] if ended["reason"] == "transfer" else ["Hangup"]
        if [c.tag for c in root] != want or (want == ["Dial"] and root.find("Dial").text != ended["destination"]):
            ctx.fail(f"the action URL answered {ET.tostring(root)} to {ended}")
    if ended is None and caller.closed_by_server:
        ctx.fail("the server closed the socket without an end")
    total_ends = [m for m in caller.received if m.get("type") == "end"]
    if len(total_ends) > 1:
        ctx.fail(f"{len(total_ends)} end messages on one call")
    if caller.unheard_at_end and caller.unheard_at_end.strip():
        ctx.fail(f"the end came before Twilio had spoken {caller.unheard_at_end!r}: {total_ends}")
    if caller.end_after_silent_s is not None and caller.end_after_silent_s > LATE_END_S:
        ctx.fail(f"the end came {caller.end_after_silent_s:.1f}s after Twilio reported our last words heard "
                 f"(dead air before the hang-up): {total_ends}")
    check_history_matches_transcript(ctx, stack["store"].get_call(caller.tracking_id))
    caller.status("completed", 5)
    deadline = time.monotonic() + 5
    while (detail := call_detail(url, caller.tracking_id))["call"]["outcome"] == "in_progress" \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    if detail["call"]["outcome"] != outcome:
        ctx.fail(f"call log outcome {detail['call']['outcome']}, expected {outcome}")
    if detail["call"]["firstTokenP50Ms"] is None and "firstTokenP50Ms" not in (detail["call"].get("reasons") or {}):
        ctx.fail(f"null firstTokenP50Ms without a reason: {detail['call']}")
    return ctx.steps


@pytest.mark.timeout(max(120, RELAY_CALLS * 6))  # (a longer run: CONVO_FUZZ_CALLS)
def test_random_relay_conversations_keep_every_invariant(stack):
    started = time.monotonic()
    seen: dict[str, int] = {}
    for index in [int(ONLY_CALL)] if ONLY_CALL else range(RELAY_CALLS):
        for step in relay_call(stack, SEED, index):
            for name in (step[1], step[4]):
                seen[name] = seen.get(name, 0) + 1
    errors = server_errors(stack["server"].logs())
    assert not errors, f"seed={SEED}: error events in the server log: {errors[:5]}"
    print(f"seed={SEED}: {RELAY_CALLS} relay calls in {time.monotonic() - started:.1f}s, steps: {sorted(seen.items())}")


# ---- <Gather> calls ------------------------------------------------------------------------------------------------
@pytest.fixture
def gather_env(env):
    return {**env, "LLM_STALL_TIMEOUT_S": str(STALL_S), "RATE_LIMIT_MAKE_CALL": "1000 per minute",
            "MAX_CALLS_PER_DAY": "100000", "ALLOWED_DESTINATION_PREFIXES": "+1,+852"}


def gather_call(app, client, fake_twilio, fake_llm, fake_llm2, seed: int, index: int) -> list:
    from tests.test_gather_flow import GatherCall

    rng = random.Random(f"gather:{seed}:{index}")
    ctx = Context(seed, index)
    export = pick_flow(rng, 1000 + index)
    cantonese = export["config"].get("globalSettings", {}).get("defaultLanguage") == "zh-HK"
    flow = Flow(export)
    body = build_body(export, "+15551234567", **{"from": "+15005550006", "record": False, "timeout": 30})
    brain, backup = Brain(rng), Brain(rng)
    fake_llm.reset()
    fake_llm2.reset()
    fake_llm.responder, fake_llm2.responder = brain, backup
    call = GatherCall(app, client, Signer(client), fake_twilio, body)
    root = call.answer()
    store = app.extensions["callweaver"].store
    start = next(n["id"] for n in export["nodes"] if n["type"] == "startNode")
    outcome, expected_turns = "hang_up", 0
    for turn in range(rng.randint(1, MAX_TURNS)):
        brain.queue.clear()
        backup.queue.clear()
        lang, said = utterance(rng, cantonese)
        action = rng.choices(["say", "goodbye", "unheard", "long"], weights=[8, 1, 1, 1])[0]
        if action == "goodbye":
            lang, said = goodbye(rng, cantonese)
        elif action == "long":
            said = ("I have a very long story to tell you about my house. " * 60).strip()
        behaviour = "-" if action in ("goodbye", "unheard") else model_behaviour(rng, brain, backup, flow)
        ctx.steps.append((turn, action, lang, said if action != "unheard" else "", behaviour))
        gather = root.find("Gather")
        if gather is None:
            ctx.fail(f"the call still listens but the TwiML has no <Gather>: {ET.tostring(root)}")
        params = {"CallSid": call.call_sid, "Confidence": "0.9"}
        params.update(SpeechResult="" if action == "unheard" else said)  # (the Gather is speech only)
        resp = call.twilio.post(gather.get("action")[len(PUBLIC):], params)
        if resp.status_code != 200:
            ctx.fail(f"turn answered {resp.status_code}")
        root = ET.fromstring(resp.data)
        spoken = " ".join((s.text or "") for s in root.iter("Say")).strip()
        tags = [c.tag for c in root]
        turns = store.turns(call.tracking_id)
        expected_turns += action != "unheard"
        if len(turns) != expected_turns:
            ctx.fail(f"{len(turns)} turns stored, expected {expected_turns}")
        if action == "unheard":  # nothing transcribed: asked again, no turn
            if not spoken or root.find("Gather") is None:
                ctx.fail(f"nothing heard was not asked again: {resp.data!r}")
            continue
        row = turns[-1]
        if not spoken:
            ctx.fail(f"nothing said to the caller: {resp.data!r}")
        entry = store.get_call(call.tracking_id).transcript[-1]
        if fold(entry["heard"]) != fold(spoken) and not fold(spoken).startswith(fold(entry["heard"])):
            ctx.fail(f"transcript heard {entry['heard']!r} but the caller heard {spoken!r}")
        if behaviour == "outage" and row["source"] != "apology" and not row["cacheHit"]:
            ctx.fail(f"outage turn not an apology: {row}")
        check_turn_rows(ctx, flow, {"turns": turns}, start)
        if row["action"] == "end":
            if tags[-1] != "Hangup":
                ctx.fail(f"an end turn that does not hang up: {tags}")
            outcome = "end_node"
            break
        if row["action"] == "transfer":
            dial = root.find("Dial")
            if dial is None or dial.text != flow.destination(row["nextNodeId"]):
                ctx.fail(f"a transfer that does not dial the node's number: {resp.data!r}")
            outcome = "transfer"
            break
        if "Hangup" in tags or root.find("Dial") is not None:
            ctx.fail(f"the call ended without an end or transfer turn: {tags} {row}")
    call.twilio.post(f"/api/call-status?trackingId={call.tracking_id}",
                     {"CallSid": call.call_sid, "CallStatus": "completed", "SequenceNumber": "5"})
    check_history_matches_transcript(ctx, store.get_call(call.tracking_id))
    detail = client.get(f"/api/call-log/{call.tracking_id}").get_json()
    if detail["call"]["outcome"] != outcome:
        ctx.fail(f"call log outcome {detail['call']['outcome']}, expected {outcome}")
    return ctx.steps


@pytest.mark.timeout(max(120, GATHER_CALLS * 6))
def test_random_gather_conversations_keep_every_invariant(gather_env, fake_twilio, fake_llm, fake_llm2):
    from structlog.testing import capture_logs

    from callweaver import create_app

    app = create_app(gather_env)
    client = app.test_client()
    with capture_logs() as logs:
        for index in range(GATHER_CALLS):
            gather_call(app, client, fake_twilio, fake_llm, fake_llm2, SEED, index)
    errors = [e for e in logs if e.get("log_level") in ("error", "critical") and e["event"] not in ALLOWED_ERROR_EVENTS]
    assert not errors, f"seed={SEED}: error events: {errors[:5]}"


# ---- ends: end-call, Twilio's status callbacks and LLM faults, on SQLite and on Redis -----------------------------
# Each call runs a few turns (the model failing over, stalling, refusing), then ends while something else races it:
# POST /api/end-call (as the web app sends it) during the greeting, mid-reply, during the goodbye or after the call
# ended, once or twice at once; Twilio's signed status callbacks out of order, duplicated, and late after the relay
# socket closed. The call's end must be recorded once: one end reason, one final status that never reverts, one
# end-of-call report, one count of the ended call, and the turns stored once each.
END_CALLS = int(os.environ.get("CONVO_FUZZ_END_CALLS") or 6)  # per store (about 3 s a call)
END_MOMENTS = ["ringing", "greeting", "mid_reply", "goodbye", "after_end", "twice", "none"]
END_BODIES = ["json", "query"]  # what the web app sends: {callSid}, or ?callSid= with an empty JSON body
PROGRESS = [("initiated", 0), ("ringing", 1), ("in-progress", 2)]
REPORT_SECRET = "fuzz-report-secret-0123"


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def end_stack(request, tmp_path_factory):
    from tests.fakes.redis_server import RedisServer
    from tests.fakes.report_receiver import ReportReceiver

    tmp = tmp_path_factory.mktemp(f"ends-{request.param}")
    redis = RedisServer().start() if request.param == "redis" else None
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    primary, secondary = FakeLLM("primary").start(), FakeLLM("secondary").start()
    receiver = ReportReceiver().start()
    env = base_env(tmp, twilio, primary, secondary)
    env.pop("PUBLIC_BASE_URL")
    env.update(LLM_STALL_TIMEOUT_S=str(STALL_S), RATE_LIMIT_MAKE_CALL="1000 per minute",
               RATE_LIMIT_END_CALL="1000 per minute", RATE_LIMIT_METRICS="1000/second",
               ALLOWED_DESTINATION_PREFIXES="+1,+852", MAX_CALLS_PER_DAY="100000",
               CALL_REPORT_URL=receiver.url, CALL_REPORT_SECRET=REPORT_SECRET,
               LOG_LEVEL=os.environ.get("CONVO_FUZZ_LOG_LEVEL", "WARNING"))
    if redis is not None:
        env["REDIS_URL"] = redis.url
    server = LiveServer(env, workers=2).start()
    from callweaver import create_app
    store = create_app(env).extensions["callweaver"].store  # the server's store, read from here
    yield {"server": server, "twilio": twilio, "llm": primary, "llm2": secondary, "store": store,
           "receiver": receiver, "kind": request.param}
    server.stop()
    for fake in (twilio, primary, secondary, receiver):
        fake.stop()
    if redis is not None:
        redis.close()


def fault_behaviour(rng: random.Random, brain: Brain, backup: Brain, flow: Flow) -> str:
    """What the model does this turn: a fault (5xx, a stall mid-stream, a slow first token, both down) or, half the
    time, anything the relay calls do (model_behaviour)."""
    kind = rng.choice(["5xx", "stall_mid", "slow_first", "outage", "other", "other"])
    if kind == "5xx":
        brain.queue.append(Reply(fault=rng.choice(["500", "429"])))
        backup.queue.append(Reply(text=backup.text()))
    elif kind == "stall_mid":  # a first token, then a pause past the stall bound: the backup goes on
        brain.queue.append(Reply(text="Let me look that up for you right now.", token_interval_s=STALL_S + 0.4))
        backup.queue.append(Reply(text="It is available."))
    elif kind == "slow_first":
        brain.queue.append(Reply(text=brain.text(), ttft_s=FIRST_TOKEN_S + rng.choice([0.2, 0.6])))
        backup.queue.append(Reply(text=backup.text()))
    elif kind == "outage":
        brain.queue.append(Reply(fault="500"))
        backup.queue.append(Reply(fault=rng.choice(["500", "hang"])))
    else:
        return model_behaviour(rng, brain, backup, flow)
    return kind


class Hooks:
    """Twilio's side of one call's end, each answer kept: status callbacks and end-call requests, some at once."""

    def __init__(self, ctx: Context, caller: RelayCaller, url: str):
        self.ctx, self.caller, self.url = ctx, caller, url
        self.answers: list[tuple[str, int, str]] = []
        self.threads: list = []
        self.completed_sent: float | None = None  # when the final status callback went out
        self.ended_by_api: list[tuple[float, float]] = []  # (sent, answered) of each end-call Twilio took

    def status(self, status: str, sequence: int) -> None:
        if status == "completed" and self.completed_sent is None:
            self.completed_sent = time.monotonic()
        resp = self.caller.status(status, sequence)
        self.answers.append((f"status {status}/{sequence}", resp.status, resp.text))

    def end_call(self, how: str) -> None:
        sent = time.monotonic()
        sid = self.caller.call_sid
        if how in ("empty", "tracking"):  # no call SID (an empty body; the tracking id only): a JSON 400, no hang-up
            resp = http("POST", f"{self.url}/api/end-call",
                        json_body={} if how == "empty" else {"trackingId": self.caller.tracking_id})
            ok = resp.status == 400 and json.loads(resp.text).get("success") is False
            self.answers.append((f"end-call {how}", 200 if ok else resp.status, resp.text))
            return
        if how == "json":
            resp = http("POST", f"{self.url}/api/end-call", json_body={"callSid": sid})
        else:  # the web app's hangupCall: the SID in the query, an empty JSON body
            resp = http("POST", f"{self.url}/api/end-call?callSid={sid}",
                        headers={"Content-Type": "application/json"})
        self.answers.append((f"end-call {how}", resp.status, resp.text))
        if resp.status == 200:
            self.ended_by_api.append((sent, time.monotonic()))

    def soon(self, fn, *args, delay_s: float = 0.0) -> None:
        import threading

        def run():
            time.sleep(delay_s)
            fn(*args)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=20)
        if any(t.is_alive() for t in self.threads):
            self.ctx.fail("a webhook or end-call request did not return within 20 s")


def ended_call(stack, seed: int, index: int) -> list:
    steps: list = []
    try:
        return ended_call_steps(stack, seed, index, steps)
    except Violation:
        raise
    except Exception as exc:
        raise Violation(f"seed={seed} call={index} ({stack['kind']}): {exc!r}\nsteps so far: {steps}") from exc


def ended_call_steps(stack, seed: int, index: int, steps: list) -> list:
    rng = random.Random(f"ends:{stack['kind']}:{seed}:{index}")  # (each store its own calls)
    ctx = Context(seed, index, steps, dump=stack["server"].logs)
    steps.append(("store", stack["kind"]))  # (a violation names the store: replay with -k and [sqlite] / [redis])
    export = pick_flow(rng, index)
    export.setdefault("config", {}).setdefault("globalSettings", {})["silenceTimeout"] = 30  # no silence ending
    flow = Flow(export)
    cantonese = export["config"]["globalSettings"].get("defaultLanguage") == "zh-HK"
    body = build_body(export, "+15551234567", **{"from": "+15005550006", "record": False, "timeout": 30})
    brain, backup = Brain(rng), Brain(rng)
    stack["llm"].reset()
    stack["llm2"].reset()
    stack["llm"].responder, stack["llm2"].responder = brain, backup
    url = stack["server"].url
    caller = RelayCaller(url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15, speaking_rate_cps=1500, closing_quiet_s=0.25)
    caller.place_call(body)
    hooks = Hooks(ctx, caller, url)
    moment = rng.choice(END_MOMENTS)
    progress = [p for p in PROGRESS for _ in range(rng.choice([1, 1, 2]))]  # some sent twice (Twilio retries)
    rng.shuffle(progress)
    early = progress[:rng.randint(0, len(progress))]
    for status, sequence in early:  # before the call is answered (out of order)
        hooks.status(status, sequence)
    if moment == "ringing":  # hung up before it was answered: no TwiML, no socket
        steps.append(("moment", moment, "turns", 0))
        hooks.end_call(rng.choice(END_BODIES))
        hooks.status("completed", 3)
        for status, sequence in rng.sample(PROGRESS + [("completed", 3)], k=rng.randint(1, 3)):
            hooks.status(status, sequence)
        start = next(n["id"] for n in export["nodes"] if n["type"] == "startNode")
        check_ended_call(ctx, stack, caller, hooks, Flow(export), start, 0, None)
        return steps
    caller.answer_placed(stack["twilio"].creates()[-1])  # (the relay TwiML inline: Twilio fetches nothing)
    caller.connect()
    for status, sequence in progress[len(early):]:  # the rest while the call is live, at once
        hooks.soon(hooks.status, status, sequence, delay_s=rng.uniform(0, 0.3))
    start = next(n["id"] for n in export["nodes"] if n["type"] == "startNode")
    turns = rng.randint(0, 3) if moment != "greeting" else 0
    steps.append(("moment", moment, "turns", turns))
    expected_turns, ended, live = 0, None, True

    def end_now(delay_s: float = 0.0) -> None:
        """End-call from the web app now (or twice at once), and Twilio's reaction: the final status callback, at
        a random moment around end-call's answer, and the relay socket closed."""
        hows = [rng.choice(END_BODIES) for _ in range(2 if moment == "twice" else 1)]
        if rng.random() < 0.2:
            hows.insert(0, rng.choice(["empty", "tracking"]))
        steps.append(("end-call", hows, round(delay_s, 2)))
        for how in hows:
            hooks.soon(hooks.end_call, how, delay_s=delay_s)
        final_at = delay_s + rng.uniform(0.05, 0.4)
        for _ in range(rng.choice([1, 1, 2])):  # twice at once: Twilio retried while the first was answered
            hooks.soon(hooks.status, "completed", 3, delay_s=final_at)

    for turn in range(turns + (1 if moment in ("mid_reply", "goodbye") else 0)):
        last = turn == turns
        lang, said = utterance(rng, cantonese)
        if last and moment == "goodbye":
            lang, said = goodbye(rng, cantonese)
        brain.lang = backup.lang = lang if lang in REPLIES else "en-US"
        brain.queue.clear()
        backup.queue.clear()
        behaviour = "-" if last and moment == "goodbye" else fault_behaviour(rng, brain, backup, flow)
        if last and moment == "mid_reply":  # a reply long and slow enough to be ended mid-stream
            long_text = " ".join(f"word{i}" for i in range(30)) + "."
            brain.queue[:] = [Reply(text=long_text, token_interval_s=0.03)]
            backup.queue[:] = [Reply(text=long_text, token_interval_s=0.03)]
            behaviour = "long_slow"
        steps.append((turn, lang, said, behaviour))
        if last:  # the end-call comes while this reply streams (or the goodbye plays)
            before = len(caller.received)
            caller.prompt(said, lang=lang)
            expected_turns += 1
            first = caller.recv(timeout_s=8)
            if first is None:
                ctx.fail(f"no reply to {said!r} ({behaviour})")
            if rng.random() < 0.3:  # the socket closes first (the caller hung up), end-call and Twilio's status race it
                caller.drain(rng.uniform(0, 0.2))
                caller.hangup()
                end_now(rng.uniform(0, 0.1))
            else:
                end_now(rng.uniform(0, 0.3))
                caller.drain(rng.uniform(0.1, 0.6))
            live = False
            got_end = [m for m in caller.received[before:] if m.get("type") == "end"]
            if got_end:
                ended = json.loads(got_end[0]["handoffData"])
            break
        before = len(caller.received)
        reply = caller.say(said, lang=lang)
        expected_turns += 1
        caller.drain(0.2)
        row = wait_turns(url, caller.tracking_id, expected_turns)["turns"][-1]
        if row["action"] in ("end", "transfer"):  # a closing line: its end at most LATE_END_S after Twilio played it
            # (before the end waited for an "off" after the LAST words sent, a model speaking and only then calling
            # its tool to an end or transfer node waited out the playback bound here: 11.6 s of dead air for a
            # 32-character Cantonese transfer line at seed=31 call=5 of 79fc3a0's harness)
            reply.end = next((m for m in caller.received[before:] if m.get("type") == "end"), None)
            if caller.wait_for_end(reply, LATE_END_S) is None:
                ctx.fail(f"turn {turn}: no end within {LATE_END_S}s of the closing line {reply.text!r}")
            if caller.end_after_silent_s is None:
                ctx.fail(f"turn {turn}: the end came before Twilio reported the closing line {reply.text!r} heard "
                         f"(unspoken: {caller.unheard_at_end!r})")
            if caller.end_after_silent_s > LATE_END_S:
                ctx.fail(f"turn {turn}: the end came {caller.end_after_silent_s:.1f}s after Twilio reported the "
                         f"closing line {reply.text!r} heard (dead air before the hang-up)")
        pressed = [m for m in caller.received if m.get("type") == "sendDigits"]
        if not reply.text.strip() and not pressed:
            ctx.fail(f"turn {turn} ({behaviour}): no reply and no apology: {reply.messages}")
        if reply.end is not None:  # the flow ended the call (an end node, a transfer)
            ended = json.loads(reply.end["handoffData"])
            break
    if moment == "greeting":
        end_now(rng.uniform(0, 0.2))
        live = False
        caller.drain(rng.uniform(0.05, 0.3))
    if live and ended is None and moment in ("twice",):
        end_now(rng.uniform(0, 0.3))
        live = False
        caller.drain(0.3)
    if ended is not None and moment != "none" and live:  # end-call while the closing line plays, or just after
        end_now(rng.uniform(0, 0.3))
        live = False
    if ended is not None:  # Twilio asks the action URL what next, once the session ended
        resp = caller.connect_action("ended", ended)
        hooks.answers.append(("connect-action", resp.status, resp.text))
    caller.hangup()
    hooks.join()
    if hooks.completed_sent is None:  # the caller hung up (or the flow ended the call): Twilio reports it
        hooks.status("completed", 3)
    if moment == "after_end" or (moment == "none" and rng.random() < 0.5):
        end_now(rng.uniform(0, 0.1))  # too late: the call has ended
        hooks.join()
    # late and repeated callbacks after the socket closed: history at most, never the call's status
    for status, sequence in rng.sample(PROGRESS + [("completed", 3)], k=rng.randint(1, 3)):
        hooks.status(status, sequence)
    check_ended_call(ctx, stack, caller, hooks, flow, start, expected_turns, ended)
    return steps


def check_ended_call(ctx: Context, stack, caller: RelayCaller, hooks: Hooks, flow: Flow, start: str,
                     expected_turns: int, ended: dict | None) -> None:
    url, store, tid = stack["server"].url, stack["store"], caller.tracking_id
    if len([m for m in caller.received if m.get("type") == "end"]) > 1:
        ctx.fail(f"more than one end message on the socket: {[m for m in caller.received if m.get('type') == 'end']}")
    for what, status, text in hooks.answers:
        if status >= 500:
            ctx.fail(f"{what} answered {status}: {text[:300]}")
        if what.startswith("end-call") and status != 200:
            ctx.fail(f"{what} answered {status}: {text[:300]}")
    # one end-of-call report (it may wait for a pending hang-up's answer)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        reports = [json.loads(r.body) for r in stack["receiver"].reports if json.loads(r.body)["trackingId"] == tid]
        if reports:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # a second report would be sent by now
    reports = [json.loads(r.body) for r in stack["receiver"].reports if json.loads(r.body)["trackingId"] == tid]
    if len(reports) != 1:
        ctx.fail(f"{len(reports)} end-of-call reports: {[(r['status'], r['outcome']) for r in reports]}")
    detail = call_detail(url, tid)
    record = store.get_call(tid)
    if detail["call"]["status"] != "completed" or record.status != "completed":
        ctx.fail(f"final status {detail['call']['status']} / {record.status}, Twilio said completed last")
    history = store.status_history(tid)
    if [h["status"] for h in history].count("completed") != 1:
        ctx.fail(f"the final status stored {[h['status'] for h in history].count('completed')} times: {history}")
    meta = record.meta or {}
    from callweaver.store import END_CALL_META, QUEUED_END_REASON_META, end_call_pending
    if end_call_pending(meta) or QUEUED_END_REASON_META in meta:
        ctx.fail(f"the call's end is still unsettled: {meta}")
    outcome = detail["call"]["outcome"]
    if reports[0]["outcome"] != outcome or reports[0]["status"] != "completed":
        ctx.fail(f"the report says {reports[0]['outcome']}/{reports[0]['status']}, the call log {outcome}")
    # the outcome: the flow's end when it ended the call first; end-call's when Twilio took it while the call was live
    rows = store.turns(tid)
    flow_end = {"end": "end_node", "transfer": "transfer", "error": "error"}.get((ended or {}).get("reason"))
    closing = {"end": "end_node", "transfer": "transfer"}.get(rows[-1]["action"] if rows else None)
    api_first = [s for s, answered in hooks.ended_by_api if hooks.completed_sent and answered < hooks.completed_sent]
    if flow_end:
        allowed = {flow_end}
    elif closing:  # a closing turn, its line cut by the hang-up: its outcome if committed before end-call's claim
        allowed = {closing, "ended_by_api"} if hooks.ended_by_api else {closing}
    elif api_first:
        allowed = {"ended_by_api"}
    else:
        allowed = {"hang_up", "ended_by_api"} if hooks.ended_by_api else {"hang_up"}
    if outcome not in allowed:
        ctx.fail(f"outcome {outcome}, expected one of {allowed} (endReason {meta.get('endReason')}, "
                 f"end-call {meta.get(END_CALL_META)})")
    # the turns: each stored once, the transcript and the history agree with them
    if len(rows) != expected_turns or detail["call"]["turns"] != expected_turns:
        ctx.fail(f"{len(rows)} turn rows ({detail['call']['turns']} in the call log), {expected_turns} caller turns")
    if len(record.transcript or []) != len(rows):
        ctx.fail(f"{len(record.transcript or [])} transcript entries, {len(rows)} turn rows")
    check_history_matches_transcript(ctx, record)
    check_turn_rows(ctx, flow, {"turns": rows}, start)
    # the report is the call as stored once it ended: its turn count and its transcript are the stored ones
    report = reports[0]
    if report["metrics"]["totalProcessedRequests"] != len(rows):
        ctx.fail(f"the report counts {report['metrics']['totalProcessedRequests']} turns, {len(rows)} stored")
    said = [m["content"] for m in report["transcript"] if m["role"] == "user"]
    if said != [m["content"] for m in record.messages or [] if m["role"] == "user"]:
        ctx.fail(f"the report's transcript {report['transcript']} is not the stored history {record.messages}")


def calls_ended_count(store) -> float:
    from callweaver.store import CALLS_ENDED_COUNTER
    return sum(v for k, v in store.counters().items() if json.loads(k)[0] == CALLS_ENDED_COUNTER)


@pytest.mark.timeout(max(150, END_CALLS * 12))
def test_random_call_ends_keep_every_invariant(end_stack):
    started = time.monotonic()
    ended_before = calls_ended_count(end_stack["store"])
    seen: dict[str, int] = {}
    for index in [int(ONLY_CALL)] if ONLY_CALL else range(END_CALLS):
        for step in ended_call(end_stack, SEED, index):
            name = {"moment": lambda: step[1], "end-call": lambda: "end-call " + "+".join(step[1]),
                    "store": lambda: None}.get(step[0], lambda: step[3])()
            if name:
                seen[name] = seen.get(name, 0) + 1
    calls = 1 if ONLY_CALL else END_CALLS
    if calls_ended_count(end_stack["store"]) - ended_before != calls:
        pytest.fail(f"seed={SEED}: {calls} calls ended, counted {calls_ended_count(end_stack['store']) - ended_before}")
    errors = server_errors(end_stack["server"].logs())
    assert not errors, f"seed={SEED} ({end_stack['kind']}): error events in the server log: {errors[:5]}"
    print(f"seed={SEED} ({end_stack['kind']}): {calls} ended calls in {time.monotonic() - started:.1f}s, {seen}")
