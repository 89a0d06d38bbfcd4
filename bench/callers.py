"""Scripted callers: call bodies, relay (ConversationRelay) and <Gather> callers, their turns, and the
stored turn rows a run is read back from."""

from __future__ import annotations

import json
import random
import socket
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import gevent
import gevent.pool
import orjson

from callweaver.simulate.caller import RelayCaller, RelayTwiml
from callweaver.simulate.webhooks import TwilioWebhooks, http, new_call_sid
from bench.report import describe
from bench.stack import ACCOUNT_SID, AUTH_TOKEN, BenchStack, PHONE, WORKFLOWS

from callweaver.engine.reply_text import SENTENCE_END  # noqa: E402  (the end of a reply's first sentence)

# Words for utterances that can never repeat across calls or turns (so they miss the reply cache).
TOPIC_WORDS = ("garden", "river", "school", "station", "harbour", "museum", "library", "stadium", "orchard",
               "bakery", "canal", "meadow", "quarry", "lighthouse", "vineyard", "airport", "market", "chapel",
               "terrace", "bridge", "forest", "plaza", "pier", "workshop")


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


BENCH_SILENCE_TIMEOUT_S = 600  # the longest silenceTimeout a flow may set (workflow/parse.py)


def call_body(to: str, workflow: str | None = "real_estate_property_dealer") -> dict:
    """A make-call body in the web app's shape (contract.md §2)."""
    body: dict[str, Any] = {"to": to, "from": PHONE, "record": False, "timeout": 30}
    if workflow:
        wf = load_workflow(workflow)
        start = next(n for n in wf["nodes"] if n["type"] == "startNode")
        # The flow's silenceTimeout (10 s) would re-prompt and then end calls the benchmarks hold idle (set-up of
        # hundreds of calls, the idle-memory phase): the silence timer stays armed, as in production, at its
        # longest (10 minutes), so it costs what it costs and never fires during a run.
        config = {**wf["config"], "globalSettings": {**wf["config"].get("globalSettings", {}),
                                                     "silenceTimeout": BENCH_SILENCE_TIMEOUT_S}}
        body.update(workflowId="wf_" + workflow, nodes=wf["nodes"], edges=wf["edges"],
                    globalPrompt=start["data"].get("globalPrompt", ""), config=config,
                    variables=wf.get("variables", []))
    return body


def destination(index: int, run: int = 0) -> str:
    """A distinct US number per call, so each call's Twilio create can be found by its `To`."""
    return f"+1555{run % 10}{index:06d}"


def unique_utterance(rng: random.Random, call_index: int, turn_index: int) -> str:
    """A caller line that never repeats (turn number plus random words), so it always misses the cache."""
    first, second = rng.sample(TOPIC_WORDS, 2)
    return f"Turn {turn_index + 1} of caller {call_index}: is there a place near the {first} or the {second}?"


@dataclass
class TurnSample:
    """One turn as the caller saw it (client clock: time.monotonic in the load generator)."""

    utterance: str
    first_token_ms: float | None
    last_token_ms: float | None
    text: str
    ended: bool = False
    sent_at: float = 0.0  # time.monotonic() when the prompt was sent (CLOCK_MONOTONIC: comparable across processes)
    text_frames: int = 0  # `text` frames with a non-empty token (the closing empty one not counted)
    first_sentence_ms: float | None = None  # prompt sent → the frame that ends the reply's first sentence read


class ServerFrames:
    """The server's side of a relay socket, read the cheap way for a load generator with hundreds of callers.

    websocket-client reads a frame with several small socket reads (header, length, payload), each arming its own
    timeout, and checks the UTF-8 in pure Python; at 800 callers that made the load generator late to read
    frames that had already arrived. Here one read takes whatever the kernel holds and splits it into frames; each
    text frame is stamped with the moment that read returned (the moment the caller read it) and then goes
    through the caller's Twilio model exactly as `RelayCaller.recv` does, so what the server gets back (the
    model's `agentSpeaking` info messages, pongs) is unchanged. Takes over the socket's reading once made:
    websocket-client never reads ahead of the frame it returns, so nothing is left in its buffer."""

    READ_BYTES = 65536

    def __init__(self, caller: RelayCaller) -> None:
        self.caller = caller
        self.sock = caller.ws.sock
        self.buffer = bytearray()
        self.fragments: list[bytes] = []
        self.ready: deque[tuple[float, dict]] = deque()  # (read at, message), already applied to the model
        self.closed = False

    def next(self, deadline: float) -> tuple[float, dict] | None:
        """The next message and the time.monotonic() at which it was read; None on deadline or close. While
        waiting, Twilio's playback model keeps time (agentSpeaking off when it falls silent), as in RelayCaller."""
        twilio = self.caller.twilio
        while not self.ready:
            if self.closed:
                return None
            for info in twilio.tick():
                self.caller.send(info)
            now = time.monotonic()
            event_at = twilio.playback.next_event_at()
            wait = min(deadline, event_at) - now if event_at is not None else deadline - now
            if wait <= 0 and now >= deadline:
                return None
            self.sock.settimeout(max(wait, 0.001))
            try:
                data = self.sock.recv(self.READ_BYTES)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            read_at = time.monotonic()
            if not data:
                self.closed = self.caller.closed_by_server = True
                return None
            self.buffer += data
            self._split(read_at)
        return self.ready.popleft()

    def _split(self, read_at: float) -> None:
        """Every complete frame in the buffer → `ready` (server frames are never masked, RFC 6455 §5.1)."""
        buffer, pos, size = self.buffer, 0, len(self.buffer)
        while size - pos >= 2:
            first, length = buffer[pos], buffer[pos + 1] & 0x7F
            head = 2
            if length == 126:
                head, length = 4, int.from_bytes(buffer[pos + 2:pos + 4], "big")
            elif length == 127:
                head, length = 10, int.from_bytes(buffer[pos + 2:pos + 10], "big")
            if size - pos < head + length:
                break
            payload = bytes(buffer[pos + head:pos + head + length])
            pos += head + length
            self._frame(first & 0x0F, bool(first & 0x80), payload, read_at)
        del buffer[:pos]

    def _frame(self, opcode: int, fin: bool, payload: bytes, read_at: float) -> None:
        if opcode == 0x9:  # ping
            self.caller.ws.pong(payload)
            return
        if opcode == 0x8:  # close
            self.closed = self.caller.closed_by_server = True
            return
        if opcode not in (0x0, 0x1, 0x2):
            return
        self.fragments.append(payload)
        if not fin:
            return
        raw = b"".join(self.fragments)
        self.fragments = []
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            message = raw.decode(errors="replace")
        twilio = self.caller.twilio
        accepted, replies = twilio.receive(message)
        for reply in replies:
            self.caller.send(reply)
        if not isinstance(message, dict):
            message = {"type": "invalid", "raw": message}
        elif accepted and message.get("type") == "end":
            message = {**message, "unheard": twilio.playback.stop()}  # Twilio closes the session: speech stops
        self.ready.append((read_at, message))


class RelayCall:
    """An optimized call: make-call-optimized, the TwiML webhook, then the ConversationRelay socket."""

    def __init__(self, stack: BenchStack, base_url: str, to: str, workflow: str | None, timeout_s: float = 20.0):
        self.stack, self.to, self.workflow = stack, to, workflow
        self.caller = RelayCaller(base_url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.samples: list[TurnSample] = []
        self.frames: ServerFrames | None = None

    @property
    def tracking_id(self) -> str | None:
        return self.caller.tracking_id

    def place(self) -> None:
        self.caller.place_call(call_body(self.to, self.workflow))

    def answer_and_connect(self) -> None:
        self.caller.answer_placed(self.stack.create_for(self.to))
        self.caller.connect()

    def set_up(self) -> None:
        self.place()
        self.answer_and_connect()

    def say(self, utterance: str) -> TurnSample:
        """Speak one final transcript and read the streamed reply up to `last: true` (or an `end`)."""
        if self.frames is None or self.frames.sock is not self.caller.ws.sock:
            self.frames = ServerFrames(self.caller)
        sent = self.caller.prompt(utterance)
        deadline = sent + self.timeout_s
        first_ms = sentence_ms = None
        tokens: list[str] = []
        while True:
            read = self.frames.next(deadline)
            if read is None:
                raise TimeoutError(f"no complete reply within {self.timeout_s}s")
            now, message = read
            kind = message.get("type")
            if kind == "end":
                return TurnSample(utterance, first_ms, (now - sent) * 1000, "".join(tokens), ended=True)
            if kind != "text":
                continue
            if message.get("token"):
                tokens.append(message["token"])
                if first_ms is None:
                    first_ms = (now - sent) * 1000
                if sentence_ms is None and SENTENCE_END.search(message["token"]):
                    sentence_ms = (now - sent) * 1000
            if message.get("last"):
                sample = TurnSample(utterance, first_ms, (now - sent) * 1000, "".join(tokens), sent_at=sent,
                                    text_frames=len(tokens), first_sentence_ms=sentence_ms)
                self.samples.append(sample)
                return sample

    def hang_up(self) -> None:
        try:
            self.caller.hangup()
        except Exception:
            pass


class NaiveCall(RelayCall):
    """A call to the naive baseline relay: no make-call, no TwiML, no signature; just the socket and `setup`."""

    def place(self) -> None:
        pass

    def answer_and_connect(self) -> None:
        ws_url = self.caller.base_url.replace("http://", "ws://", 1) + "/ws"
        self.caller.twiml = RelayTwiml.parse(
            f'<Response><Connect action=""><ConversationRelay url="{ws_url}"/></Connect></Response>')
        self.caller.connect(sign=False)


class GatherCall:
    """A traditional call: make-call, the TwiML webhook, then signed <Gather> action posts with SpeechResult."""

    def __init__(self, stack: BenchStack, base_url: str, to: str, workflow: str | None, timeout_s: float = 20.0):
        self.stack, self.to, self.workflow, self.base_url = stack, to, workflow, base_url
        self.hooks = TwilioWebhooks(base_url, AUTH_TOKEN, ACCOUNT_SID)
        self.timeout_s = timeout_s
        self.call_sid: str | None = None
        self.tracking_id: str | None = None
        self.action: str | None = None
        self.samples: list[TurnSample] = []

    def _params(self, **extra: str) -> dict[str, str]:
        return {"AccountSid": ACCOUNT_SID, "CallSid": self.call_sid or new_call_sid(), "From": PHONE,
                "To": self.to, "Direction": "outbound-api", "ApiVersion": "2010-04-01", **extra}

    def _next_action(self, xml: str) -> str | None:
        gather = ET.fromstring(xml).find("Gather")
        return gather.get("action") if gather is not None else None

    def set_up(self) -> None:
        resp = http("POST", self.base_url + "/api/make-call", json_body=call_body(self.to, self.workflow),
                    timeout_s=self.timeout_s)
        data = resp.json()
        if resp.status != 200:
            raise RuntimeError(f"make-call failed ({resp.status}): {data.get('error')}")
        self.call_sid, self.tracking_id = data["callSid"], data.get("trackingId")
        answer = self.hooks.post(self.stack.create_for(self.to).one("Url"), self._params(CallStatus="in-progress"))
        if answer.status != 200:
            raise RuntimeError(f"twiml-ai failed ({answer.status})")
        self.action = self._next_action(answer.text)
        if not self.action:
            raise RuntimeError("no <Gather action> in the greeting TwiML")

    def say(self, utterance: str) -> TurnSample:
        """Post the speech result; the reply exists only once the whole TwiML response has arrived."""
        sent = time.monotonic()
        resp = self.hooks.post(self.action, self._params(SpeechResult=utterance, Confidence="0.93"))
        elapsed_ms = (time.monotonic() - sent) * 1000
        if resp.status != 200:
            raise RuntimeError(f"Gather action failed ({resp.status})")
        root = ET.fromstring(resp.text)
        spoken = " ".join((s.text or "") for s in root.iter("Say"))
        self.action = self._next_action(resp.text) or self.action
        sample = TurnSample(utterance, elapsed_ms, elapsed_ms, spoken, ended=root.find("Gather") is None)
        if not sample.ended:
            self.samples.append(sample)
        return sample

    def hang_up(self) -> None:
        pass


def cache_backend(base_url: str) -> str:
    """The reply cache's backend as the worker reports it (GET /api/health-optimized), e.g. "SimpleCache"."""
    resp = http("GET", f"{base_url}/api/health-optimized", timeout_s=30)
    try:
        return str(resp.json()["services"]["cache"]["backend"])
    except (KeyError, TypeError, ValueError):
        return "unknown"


def fetch_turns(base_url: str, tracking_ids: list[str], concurrency: int = 20) -> dict[str, list[dict]]:
    """Server-measured turns per call from GET /api/performance-metrics/<trackingId> (callData.turns)."""
    out: dict[str, list[dict]] = {}

    def one(tracking_id: str) -> None:
        resp = http("GET", f"{base_url}/api/performance-metrics/{tracking_id}", timeout_s=30)
        out[tracking_id] = resp.json()["callData"]["turns"] if resp.status == 200 else []

    pool = gevent.pool.Pool(concurrency)
    for tracking_id in tracking_ids:
        pool.spawn(one, tracking_id)
    pool.join(timeout=120)
    pool.kill()
    return out


def server_added_ms(turn: dict) -> float | None:
    """Our overhead on an LLM turn, from the server's own clock: firstTokenMs − providerTtftMs."""
    if turn.get("source") != "llm" or turn.get("firstTokenMs") is None or turn.get("providerTtftMs") is None:
        return None
    return turn["firstTokenMs"] - turn["providerTtftMs"]


def converse(calls: list, scripts: list[list[str]], *, rng: random.Random, stagger_s: float,
             think_s: tuple[float, float], deadline: float, errors: dict[str, int],
             before_first_turn: Callable[[Any], None] | None = None) -> float:
    """Every call talks at once: it starts at a random offset within `stagger_s`, optionally runs
    `before_first_turn` (e.g. place the call, let it ring, answer), then says its script, pausing `think_s`
    between turns. Stops at `deadline` (still-running calls are killed); returns the seconds it took.
    Turns land in each call's `samples`; failures are counted in `errors` by kind."""

    def count(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    plans = [(call, script, rng.uniform(0, stagger_s), [rng.uniform(*think_s) for _ in script])
             for call, script in zip(calls, scripts)]

    def talk(call: Any, script: list[str], offset_s: float, pauses_s: list[float]) -> None:
        gevent.sleep(offset_s)
        if before_first_turn is not None:
            try:
                before_first_turn(call)
            except Exception as exc:
                count(f"setup: {describe(exc)}")
                return
        for index, utterance in enumerate(script):
            if time.monotonic() > deadline:
                count("turn: bench time limit")
                return
            try:
                sample = call.say(utterance)
            except Exception as exc:
                count(f"turn: {describe(exc)}")
                return
            if sample.ended:
                count("turn: call ended unexpectedly")
                return
            if index < len(script) - 1:
                gevent.sleep(pauses_s[index])

    started = time.monotonic()
    talkers = [gevent.spawn(talk, *plan) for plan in plans]
    gevent.joinall(talkers, timeout=max(1.0, deadline - time.monotonic()))
    unfinished = [g for g in talkers if not g.dead]
    if unfinished:
        errors["turn: still talking at the bench time limit"] = len(unfinished)
        gevent.killall(unfinished, timeout=5)
    return time.monotonic() - started
