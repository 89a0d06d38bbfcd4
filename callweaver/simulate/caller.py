"""A scripted caller that plays Twilio's part of an optimized call: webhooks, TwiML, the ConversationRelay socket."""
from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import websocket  # websocket-client

from ..engine.speech import SENTENCE_END_MARKS
from .relay_model import TwilioRelayModel
from .twilio_rest import TwilioRequest
from .webhooks import HttpResult, TwilioWebhooks, http, new_call_sid, twilio_signature

NORMAL_WORDS_PER_MINUTE = 160.0   # conversational English (about 2.7 words a second)
END_OF_SPEECH_MS = 500.0          # what a recogniser's end-pointing waits after the last word
# Silence after which Twilio's voice activity detection reports clientSpeaking off (assumed: not documented).
VAD_HANGOVER_MS = 200.0
AGENT_FELL_SILENT = {"type": "info", "name": "agentSpeaking", "value": "off"}
_SENTENCE_MARKS = re.compile(f"[{re.escape(SENTENCE_END_MARKS)}]")


@dataclass
class RelayTwiml:
    """The parts of <Connect><ConversationRelay> a caller needs, parsed from CallWeaver's TwiML."""

    xml: str
    url: str
    action: str
    attributes: dict[str, str]
    parameters: dict[str, str]
    languages: list[dict[str, str]] = field(default_factory=list)  # the <Language> children, in order

    @classmethod
    def parse(cls, xml: str) -> "RelayTwiml":
        root = ET.fromstring(xml)
        connect = root.find("Connect")
        relay = connect.find("ConversationRelay") if connect is not None else None
        if relay is None:
            raise ValueError(f"no <Connect><ConversationRelay> in TwiML: {xml[:300]}")
        params = {p.get("name"): p.get("value") for p in relay.findall("Parameter")}
        return cls(xml=xml, url=relay.get("url"), action=connect.get("action"), attributes=dict(relay.attrib),
                   parameters=params, languages=[dict(lang.attrib) for lang in relay.findall("Language")])


@dataclass
class Reply:
    """One talk cycle as the caller received it, with client-side timings (monotonic, ms)."""

    tokens: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)   # every message received during the cycle
    sent_at: float = 0.0
    first_token_ms: float | None = None
    last_token_ms: float | None = None
    end: dict | None = None                               # the `end` message, if the session ended
    language: dict | None = None                          # a `language` message, if one came
    unheard_at_end: str | None = None                     # closing text still unspoken when `end` came
    while_speaking: list[dict] = field(default_factory=list)  # what came while the caller was still talking

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def first_words(self, count: int) -> str:
        """The first `count` words received, as Twilio reports what a caller heard (`utteranceUntilInterrupt`):
        a `text` frame may carry several words, and a caller may barge in after any of them."""
        return " ".join(self.text.split()[:count])


class RelayCaller:
    """Places a call through make-call-optimized and talks to CallWeaver the way Twilio would.

    Every message CallWeaver sends goes through a `TwilioRelayModel`: malformed messages and undeclared
    languages are answered with an `error` (and not applied), and with `debug="speaker-events"` in the
    TwiML a playback model speaking `speaking_rate_cps` characters per second reports `agentSpeaking`.
    """

    def __init__(self, base_url: str, auth_token: str, account_sid: str = "AC" + "0" * 32,
                 timeout_s: float = 30.0, speaking_rate_cps: float = 80.0, closing_quiet_s: float = 0.5,
                 vad_hangover_ms: float = VAD_HANGOVER_MS, client_speaking_events: bool = True):
        self.base_url = base_url.rstrip("/")
        self.hooks = TwilioWebhooks(self.base_url, auth_token, account_sid)
        self.auth_token = auth_token
        self.account_sid = account_sid
        self.timeout_s = timeout_s
        self.speaking_rate_cps = speaking_rate_cps
        self.closing_quiet_s = closing_quiet_s  # how long to listen for an `end` once a reply has played
        self.vad_hangover_s = vad_hangover_ms / 1000  # the caller's silence before clientSpeaking off
        # False: a Twilio that sends no clientSpeaking events even when asked (tests the server's text fallback).
        self.client_speaking_events = client_speaking_events
        self.call_sid: str | None = None
        self.tracking_id: str | None = None
        self.twiml: RelayTwiml | None = None
        self.ws: websocket.WebSocket | None = None
        self.call_url: str | None = None
        self.twilio: TwilioRelayModel | None = None
        self.received: list[dict] = []       # every message CallWeaver sent on the current socket
        self._unread: list[dict] = []        # messages read ahead while waiting for an `end`, not yet returned
        self.closed_by_server = False
        # When Twilio (this caller) last reported agentSpeaking off after the last words it was sent (None: words
        # came since, or no "off" yet), and how long after that report CallWeaver's `end` came: measured on the
        # monotonic clock, less the time the caller was not reading the socket meanwhile (an `end` waiting unread
        # counts from no later than when reading resumed). None: no `end`, or none after such an "off".
        self.silent_at: float | None = None
        self.end_after_silent_s: float | None = None
        self.unheard_at_end: str | None = None  # what Twilio had not yet spoken when the `end` came (None: no end)
        self._away_s = 0.0                    # time not spent reading the socket since `silent_at`
        self._left_at: float | None = None    # when the last `recv` returned
        self.caller = {"from": "+15005550006", "to": "+15551234567", "direction": "outbound-api",
                       "callerName": "Ann Example", "forwardedFrom": "+15005550009", "callType": "PSTN",
                       "parentCallSid": ""}

    # ---- call set-up ----------------------------------------------------------------------------
    def place_call(self, body: dict) -> dict:
        resp = http("POST", self.base_url + "/api/make-call-optimized", json_body=body, timeout_s=self.timeout_s)
        data = resp.json()
        if resp.status != 200:
            raise RuntimeError(f"make-call-optimized failed ({resp.status}): {data.get('error')}")
        self.call_sid, self.tracking_id = data["callSid"], data["optimization"]["trackingId"]
        return data

    def answer(self, twiml_url: str | None = None) -> RelayTwiml:
        """Twilio fetching the call's TwiML once the callee picks up."""
        url = twiml_url or self.call_url or f"/api/twiml-optimized?id=&trackingId={self.tracking_id}"
        resp = self.hooks.post(url, self._call_params(CallStatus="in-progress"))
        if resp.status != 200:
            raise RuntimeError(f"twiml-optimized failed ({resp.status}): {resp.text[:300]}")
        self.twiml = RelayTwiml.parse(resp.text)
        return self.twiml

    def answer_placed(self, create: TwilioRequest) -> RelayTwiml:
        """Twilio answering the call `create` placed: it fetches the create's `Url` (`answer`), or, with none, runs
        the create's `Twiml` as given, requesting nothing from CallWeaver (Twilio ignores `Twiml` beside a `Url`)."""
        if create.one("Url") or not create.one("Twiml"):
            return self.answer(create.one("Url"))
        self.twiml = RelayTwiml.parse(create.one("Twiml"))
        return self.twiml

    def setup_message(self) -> dict:
        """The documented `setup` message, every field filled the way Twilio fills it."""
        return {"type": "setup", "sessionId": "VX" + "0" * 32, "accountSid": self.account_sid,
                "parentCallSid": self.caller["parentCallSid"], "callSid": self.call_sid,
                "from": self.caller["from"], "to": self.caller["to"], "forwardedFrom": self.caller["forwardedFrom"],
                "callType": self.caller["callType"], "callerName": self.caller["callerName"],
                "direction": self.caller["direction"], "callStatus": "RINGING",
                "customParameters": dict(self.twiml.parameters)}

    def connect(self, signature: str | None = None, sign: bool = True, setup: bool = True) -> None:
        """Open the relay socket with a signed upgrade (URL from the TwiML, empty params), then send `setup`."""
        url = self.twiml.url
        headers = []
        if signature is not None:
            headers.append(f"X-Twilio-Signature: {signature}")
        elif sign:
            headers.append(f"X-Twilio-Signature: {twilio_signature(self.auth_token, url, {})}")
        self.ws = websocket.create_connection(url, header=headers, timeout=self.timeout_s)
        self.twilio = TwilioRelayModel.from_twiml(self.twiml.attributes,
                                                  [lang["code"] for lang in self.twiml.languages],
                                                  self.speaking_rate_cps)
        self.received, self._unread, self.closed_by_server = [], [], False
        self.silent_at = self.end_after_silent_s = self.unheard_at_end = self._left_at = None
        self._away_s = 0.0
        if setup:
            self.send(self.setup_message())

    def _call_params(self, **extra: str) -> dict[str, str]:
        return {"AccountSid": self.account_sid, "CallSid": self.call_sid or new_call_sid(),
                "From": "+15005550006", "To": "+15551234567", "Direction": "outbound-api",
                "ApiVersion": "2010-04-01", **extra}

    # ---- talking --------------------------------------------------------------------------------
    def send(self, message: dict | str) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))
        if message == AGENT_FELL_SILENT:
            self.silent_at, self._away_s = time.monotonic(), 0.0

    def _tick(self) -> None:
        for info in self.twilio.tick():
            self.send(info)

    def recv(self, timeout_s: float | None = None) -> dict | None:
        """The next message from CallWeaver, after Twilio's model applied it (None on timeout/close).

        While waiting, the playback model keeps speaking and reports `agentSpeaking off` when it falls silent.
        """
        if self._unread:
            return self._unread.pop(0)
        if self._left_at is not None and self.silent_at is not None:
            self._away_s += max(0.0, time.monotonic() - max(self._left_at, self.silent_at))
        try:
            return self._read(timeout_s)
        finally:
            self._left_at = time.monotonic()

    def _read(self, timeout_s: float | None) -> dict | None:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        while True:
            self._tick()
            now = time.monotonic()
            event_at = self.twilio.playback.next_event_at()
            wait = min(deadline, event_at) - now if event_at is not None else deadline - now
            if wait <= 0 and now >= deadline:
                return None
            self.ws.settimeout(max(wait, 0.001))
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except websocket.WebSocketConnectionClosedException:
                self.closed_by_server = True
                return None
            if not raw:
                self.closed_by_server = True
                return None
            try:
                msg = json.loads(raw)
            except ValueError:
                msg = raw
            self.received.append(msg)
            accepted, replies = self.twilio.receive(msg)
            if accepted and (msg.get("type") == "play" or msg.get("type") == "text" and msg.get("token")):
                self.silent_at = None  # words to speak: an earlier "off" is not about them
            if accepted and msg.get("type") == "end" and self.silent_at is not None:
                self.end_after_silent_s = time.monotonic() - self.silent_at - self._away_s
            for reply in replies:
                self.send(reply)
            if accepted and msg.get("type") == "end":
                self.unheard_at_end = self.twilio.playback.stop()  # Twilio closes the session: speech stops
                msg = {**msg, "unheard": self.unheard_at_end}
            return msg if isinstance(msg, dict) else {"type": "invalid", "raw": raw}

    def prompt(self, text: str, lang: str = "en-US") -> float:
        sent = time.monotonic()
        self.send({"type": "prompt", "voicePrompt": text, "lang": lang, "last": True})
        return sent

    def say(self, text: str, lang: str = "en-US", *, stop_after_tokens: int | None = None,
            stop_after_words: int | None = None) -> Reply:
        """Speak one utterance and read the streamed reply until `last: true` (and a following `end`, if any), or
        until `stop_after_tokens` `text` frames or `stop_after_words` words have come."""
        reply = Reply(sent_at=self.prompt(text, lang))
        return self.read_reply(reply, stop_after_tokens=stop_after_tokens, stop_after_words=stop_after_words)

    def speak(self, text: str, lang: str = "en-US", *, words_per_minute: float = NORMAL_WORDS_PER_MINUTE,
              end_of_speech_ms: float = END_OF_SPEECH_MS, final: str | None = None,
              interrupt_after_words: int | None = None, punctuated_partials: bool = True,
              pauses_s: dict[int, float] | None = None) -> Reply:
        """Speak as Twilio reports speech with `partialPrompts`: the growing transcript as `prompt` `last:false`
        word by word at `words_per_minute`, then, `end_of_speech_ms` after the last word (the recogniser's
        end-pointing), the final `prompt` `last:true` — `final` when the recogniser settled on other words.
        `interrupt_after_words`: Twilio reports a barge-in once that many words were heard.
        `punctuated_partials=False`: a recogniser that leaves sentence marks (. ? !) out of interim transcripts.
        `pauses_s`: {n: seconds} — the caller hesitates that much longer after word n (1-based) and goes on.

        With speaker events in the TwiML, Twilio's voice activity is reported too: `clientSpeaking` on as the
        caller starts, off once they have been silent for the VAD hangover (`vad_hangover_ms`) — at the end, before
        the final, and in a hesitation longer than the hangover, followed by on when they go on. Words follow each
        other without silence; the silence is the hesitation and the end of speech.

        Whatever CallWeaver sends while the caller speaks is kept and read as the start of the reply.
        """
        words = text.split() if punctuated_partials else _SENTENCE_MARKS.sub("", text).split()
        word_s = 60.0 / words_per_minute
        self.client_speaking(True)
        for count in range(1, len(words) + 1):
            if count > 1:
                self.silence((pauses_s or {}).get(count - 1, 0.0), resumes=True)
                self.listen(word_s)
            self.partial(" ".join(words[:count]), lang)
            if interrupt_after_words == count:
                self.interrupt()
        self.silence(end_of_speech_ms / 1000, resumes=False)
        reply = Reply(sent_at=self.prompt(final if final is not None else text, lang),
                      while_speaking=list(self._unread))
        return self.read_reply(reply)

    def silence(self, seconds: float, *, resumes: bool) -> None:
        """The caller is silent for `seconds`: past the VAD hangover Twilio reports clientSpeaking off (at the end of
        an utterance always, before its final), and on again when the caller `resumes` after that."""
        if seconds <= 0:
            return
        if resumes and seconds <= self.vad_hangover_s:
            self.listen(seconds)
            return
        hangover = min(self.vad_hangover_s, seconds)
        self.listen(hangover)
        self.client_speaking(False)
        self.listen(seconds - hangover)
        if resumes:
            self.client_speaking(True)

    def client_speaking(self, speaking: bool) -> None:
        """Twilio's `info` clientSpeaking on/off, when the TwiML asked for speaker events."""
        if not self.client_speaking_events:
            return
        for message in self.twilio.client_speaking(speaking):
            self.send(message)

    def partial(self, text: str, lang: str = "en-US") -> None:
        """One interim transcript (`prompt` with `last: false`)."""
        self.send({"type": "prompt", "voicePrompt": text, "lang": lang, "last": False})

    def listen(self, seconds: float) -> None:
        """Let time pass on the line (playback goes on), keeping whatever CallWeaver sends for the next read."""
        deadline = time.monotonic() + seconds
        held = []
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(timeout_s=left) if not self._unread else self._unread.pop(0)
            if msg is not None:
                held.append(msg)
        self._unread.extend(held)

    def read_reply(self, reply: Reply, *, stop_after_tokens: int | None = None,
                   stop_after_words: int | None = None) -> Reply:
        while True:
            msg = self.recv()
            if msg is None:
                raise TimeoutError(f"no reply within {self.timeout_s}s; got {reply.text!r}")
            reply.messages.append(msg)
            now = time.monotonic()
            if msg.get("type") == "language":
                reply.language = msg
                continue
            if msg.get("type") == "end":
                reply.end, reply.unheard_at_end = msg, msg.get("unheard")
                return reply
            if msg.get("type") != "text":
                continue
            if msg.get("token"):
                reply.tokens.append(msg["token"])
                if reply.first_token_ms is None:
                    reply.first_token_ms = (now - reply.sent_at) * 1000
            if stop_after_tokens is not None and len(reply.tokens) >= stop_after_tokens:
                return reply
            if stop_after_words is not None and len(reply.text.split()) >= stop_after_words:
                return reply
            if msg.get("last"):
                reply.last_token_ms = (now - reply.sent_at) * 1000
                self._read_closing(reply)
                return reply

    def _read_closing(self, reply: Reply) -> None:
        """After `last: true`: an `end` may follow once the closing line has played; wait that long, then a bit."""
        playing_until = self.twilio.playback.next_event_at()
        self.wait_for_end(reply, self.closing_quiet_s + max(0.0, (playing_until or 0.0) - time.monotonic()))

    def wait_for_end(self, reply: Reply, timeout_s: float) -> dict | None:
        """The `end` that followed `reply`: already read with it, or coming within `timeout_s` (kept in `reply`).
        Anything else that comes first is the start of something else: left for the next read."""
        if reply.end is None:
            follow = self.recv(timeout_s=timeout_s)
            if follow is not None and follow.get("type") != "end":
                self._unread.append(follow)
            elif follow is not None:
                reply.messages.append(follow)
                reply.end, reply.unheard_at_end = follow, follow.get("unheard")
        return reply.end

    def interrupt(self, heard: str | None = None, played_ms: int | None = None, *,
                  silent_first_s: float | None = None) -> None:
        """Barge in: Twilio stops speaking and reports what was spoken (by default, the playback model's).
        `silent_first_s`: Twilio first reports the stopped playback (agentSpeaking off, with speaker events on) and
        sends the interrupt this many seconds later, as it may."""
        playback = self.twilio.playback
        measured_ms = playback.played_ms()
        playback.stop()
        self.twilio.cycle_open = False
        if silent_first_s is not None and self.twilio.speaker_events:
            self.send({"type": "info", "name": "agentSpeaking", "value": "off"})
            time.sleep(silent_first_s)
        self.send({"type": "interrupt",
                   "utteranceUntilInterrupt": playback.cycle_heard if heard is None else heard,
                   "durationUntilInterruptMs": measured_ms if played_ms is None else played_ms})

    def drain(self, quiet_s: float = 0.3) -> list[dict]:
        """Read and drop whatever is still in flight (e.g. tokens sent before an interrupt took effect)."""
        out = []
        while (msg := self.recv(timeout_s=quiet_s)) is not None:
            out.append(msg)
        return out

    def connect_action(self, session_status: str, handoff: dict | None = None, **extra: str) -> HttpResult:
        params = self._call_params(SessionStatus=session_status, SessionId="VX" + "0" * 32,
                                   SessionDuration="42", **extra)
        if handoff is not None:
            params["HandoffData"] = json.dumps(handoff)
        return self.hooks.post(self.twiml.action, params)

    def status(self, status: str, sequence: int) -> HttpResult:
        return self.hooks.status_callback(f"/api/call-status-optimized?trackingId={self.tracking_id}",
                                          self.call_sid, status, sequence)

    def hangup(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            finally:
                self.ws = None

