"""One live ConversationRelay socket: setup, prompt, interrupt, dtmf in; text, language, end out.

The session is the only in-memory state of a call and lives as long as its socket; everything that must
survive (history, node, variables, timings) is written to the store after every turn, so a lost socket resumes.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Protocol

import structlog

from .conversation import ConversationEngine, Turn, heard_prefix

log = structlog.get_logger()


class Sender(Protocol):
    def send_json(self, message: dict[str, Any]) -> None: ...


class RelaySession:
    """Reads on the socket's greenlet; each reply streams on its own greenlet so `interrupt` is seen at once."""

    def __init__(self, engine: ConversationEngine, sender: Sender, *, spawn: Callable, clock=time.monotonic):
        self.engine = engine
        self.sender = sender
        self.spawn = spawn
        self.clock = clock
        self.record = None
        self.call_sid: str | None = None
        self._reply = None           # task (services.Task) streaming, then committing, the current reply
        self._streaming = False      # True while that greenlet is still sending tokens
        self._turn: Turn | None = None
        self._sent = ""              # text of the current reply already sent to Twilio
        self._committed = True
        self._timings: dict[str, Any] = {}
        self.ended = False

    # ---- inbound ------------------------------------------------------------------------------
    def handle(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            log.error("relay_bad_message", error=str(exc)[:200], size=len(raw or ""))
            return
        kind = message.get("type")
        handler = {"setup": self._on_setup, "prompt": self._on_prompt, "interrupt": self._on_interrupt,
                   "dtmf": self._on_dtmf, "error": self._on_error, "info": self._on_info}.get(kind)
        if handler is None:
            log.warning("relay_unknown_message", message_type=str(kind)[:40])
            return
        try:
            handler(message)
        except Exception:
            # One bad message must not end the call: log it, apologise, keep listening.
            log.exception("relay_handler_failed", message_type=kind)
            self._speak_canned("apology")

    def _on_setup(self, message: dict) -> None:
        params = message.get("customParameters") or {}
        self.call_sid = message.get("callSid")
        tracking_id = params.get("trackingId")
        store = self.engine.store
        if not tracking_id and self.call_sid:
            tracking_id = store.find_tracking_id(self.call_sid)
        record = store.get_call(tracking_id) if tracking_id else None
        structlog.contextvars.bind_contextvars(tracking_id=tracking_id, call_sid=self.call_sid)
        if record is None:
            log.error("relay_setup_unknown_call", tracking_id=tracking_id, call_sid=self.call_sid)
            self._speak_canned("apology")
            return
        if self.call_sid and record.call_sid != self.call_sid:
            record = store.update_call(record.tracking_id, call_sid=self.call_sid) or record
        self.record = record
        log.info("relay_setup", tracking_id=record.tracking_id, resumed=bool(params.get("resumed")))

    def _on_prompt(self, message: dict) -> None:
        received = self.clock()
        if self.record is None:
            log.error("relay_prompt_before_setup")
            return
        if message.get("last") is False:
            return  # interim transcript (partialPrompts): wait for the final one
        text = (message.get("voicePrompt") or "").strip()
        if not text:
            return
        self._settle_previous()
        self._start_reply(text, received, lang=message.get("lang"))

    def _on_dtmf(self, message: dict) -> None:
        digit = str(message.get("digit", ""))[:8]
        if self.record is None:
            log.error("relay_dtmf_before_setup")
            return
        self._settle_previous()
        self._start_reply(f"[The caller pressed {digit} on the keypad]", self.clock())

    def _on_interrupt(self, message: dict) -> None:
        heard = heard_prefix(self._sent, message.get("utteranceUntilInterrupt"))
        log.info("relay_interrupt", heard_chars=len(heard), sent_chars=len(self._sent),
                 played_ms=message.get("durationUntilInterruptMs"))
        if self._reply is not None and self._streaming:
            self._cancel(heard=heard)
        elif self.record is not None:
            self._settle_previous()
            self._trim_heard(heard, message.get("utteranceUntilInterrupt"))

    def _settle_previous(self) -> None:
        """Before a new turn: cut off a reply still streaming; wait for a finished one's commit."""
        if self._reply is None:
            return
        if self._streaming:
            self._cancel(heard=self._sent)  # the caller spoke again before our reply finished
        else:
            self._reply.join(timeout=5)

    def _trim_heard(self, heard: str, reported: str | None) -> None:
        """Barge-in after the last token was sent (Twilio was still speaking it): keep only what was heard."""
        messages = list(self.record.messages or [])
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].get("role") == "assistant":
                cut = heard_prefix(messages[i]["content"], reported)
                if cut and cut != messages[i]["content"]:
                    messages[i] = {"role": "assistant", "content": cut}
                    updated = self.engine.store.update_call(self.record.tracking_id, messages=messages)
                    self.record = updated or self.record
                    log.info("relay_history_trimmed", heard_chars=len(cut))
                return

    def _on_error(self, message: dict) -> None:
        log.error("relay_twilio_error", description=str(message.get("description"))[:300])

    def _on_info(self, message: dict) -> None:
        log.info("relay_info", name=message.get("name"), value=message.get("value"))

    # ---- replies ------------------------------------------------------------------------------
    def _start_reply(self, utterance: str, received: float, lang: str | None = None) -> None:
        turn = self.engine.start_turn(self.record, utterance, lang=lang)
        self._turn, self._sent, self._committed, self._streaming = turn, "", False, True
        self._timings = {"receivedAt": received, "firstTokenMs": None, "lastTokenMs": None}
        self._reply = self.spawn(self._stream_reply, turn)

    def _stream_reply(self, turn: Turn) -> None:
        received = self._timings["receivedAt"]
        try:
            if turn.result.language_switched:
                self.sender.send_json(self._language_message(turn.result.language))
            for token in turn:
                if not self._streaming:
                    return  # cancelled: the canceller commits what was heard
                if not token:
                    continue
                self.sender.send_json({"type": "text", "token": token, "last": False})
                if self._timings["firstTokenMs"] is None:
                    self._timings["firstTokenMs"] = round((self.clock() - received) * 1000, 3)
                self._sent += token
            if not self._streaming:
                return
            self.sender.send_json({"type": "text", "token": "", "last": True})
            self._timings["lastTokenMs"] = round((self.clock() - received) * 1000, 3)
        except Exception:
            log.exception("relay_reply_failed")
            self._streaming = False
            turn.close()
            self._commit(turn, heard=self._sent, interrupted=True)
            self._reply = None
            return
        self._streaming = False  # fully sent; a new prompt now waits for the commit instead of cancelling
        self._commit(turn, heard=None, interrupted=False)
        self._reply = None
        action = turn.result.action if turn.result.completed else None
        if action == "end":
            self.sender.send_json({"type": "end", "handoffData": json.dumps({"reason": "end",
                                                                            "node": turn.result.next_node})})
            self.ended = True
        elif action == "transfer":
            self.sender.send_json({"type": "end", "handoffData": json.dumps(
                {"reason": "transfer", "destination": turn.result.destination, "node": turn.result.next_node})})
            self.ended = True

    def _language_message(self, code: str) -> dict[str, Any]:
        """Switch the voice; switch recognition too unless it is auto-detecting (`multi`)."""
        message: dict[str, Any] = {"type": "language", "ttsLanguage": code}
        if not (self.record and (self.record.meta or {}).get("multilingualStt")):
            message["transcriptionLanguage"] = code
        return message

    def _cancel(self, heard: str) -> None:
        """Barge-in: stop sending, close the LLM stream, keep only what was heard.

        Cancellation is cooperative (a flag plus closing the provider's socket) so a frame being written is
        never cut in half; a greenlet that does not finish promptly is killed as a last resort.
        """
        task, turn = self._reply, self._turn
        self._streaming = False
        if turn is not None:
            turn.cancel()
        if task is not None:
            task.join(timeout=1.0)
            if not task.dead:
                task.kill(timeout=1.0)
        self._reply = None
        if turn is not None:
            if self._timings.get("lastTokenMs") is None and self._timings.get("firstTokenMs") is not None:
                self._timings["lastTokenMs"] = round((self.clock() - self._timings["receivedAt"]) * 1000, 3)
            self._commit(turn, heard=heard, interrupted=True)

    def _commit(self, turn: Turn, *, heard: str | None, interrupted: bool) -> None:
        if self._committed or self.record is None:
            return
        self._committed = True
        timings = {k: v for k, v in self._timings.items() if k != "receivedAt"}
        try:
            updated = self.engine.commit_turn(self.record, turn, path="optimized", timings=timings,
                                              heard_text=heard, interrupted=interrupted)
            if updated is not None:
                self.record = updated
        except Exception:
            log.exception("relay_commit_failed", tracking_id=self.record.tracking_id)

    def _speak_canned(self, key: str) -> None:
        entry = self.engine.languages.get(self.record.language if self.record else None)
        try:
            self.sender.send_json({"type": "text", "token": entry.line(key), "last": True})
        except Exception:
            log.exception("relay_send_failed")

    def close(self) -> None:
        """Socket gone: stop any reply; what was sent so far counts as heard."""
        if self._reply is not None and self._streaming:
            self._cancel(heard=self._sent)
        elif self._reply is not None:
            self._reply.join(timeout=5)
