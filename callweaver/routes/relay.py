"""ConversationRelay WebSocket: refuse unsigned upgrades, then hand every message to a RelaySession.

Socket-level rules (the session never sees a socket that breaks them):
- the upgrade is signed and its trackingId names a live call that has no other live socket (a claim in the
  store, so it holds across workers and instances; renewed while the socket lives, released when it closes);
- `setup` arrives within RELAY_SETUP_TIMEOUT_S and names the signed trackingId, else the socket closes (1008);
- a message over RELAY_MAX_MESSAGE_BYTES closes the socket with 1009 (simple-websocket, SOCK_SERVER_OPTIONS).
"""
from __future__ import annotations

import contextvars
import socket
import threading
import time
import uuid

import structlog
from flask import Blueprint, g, request
from simple_websocket import ConnectionClosed

from ..background import Alarm, SocketReader
from ..engine import relay_protocol
from ..errors import ApiError
from ..engine.relay_session import RelaySession
from ..extensions import sock
from ..lifecycle import CALL_SID
from ..security import websocket_url
from ..services import services, spawn
from ..store import CallRecord, Store, StoreError, call_is_live
from .common import RELAY_PATH, base_url, forbidden, verify_twilio

bp = Blueprint("relay", __name__)
log = structlog.get_logger()
CLOSE_POLICY_VIOLATION = 1008
LINGER_S = 1.0  # a socket's task waits this long for the next message before it ends (RelaySocket._work)


class LockedSender:
    """Serialised, complete frame writes: simple-websocket's send() may write part of a frame to a slow
    reader and interleave frames across greenlets, so frames are built whole and written under a lock, completely."""

    __slots__ = ("ws", "_lock")  # one per live call

    def __init__(self, ws):
        self.ws = ws
        self._lock = threading.Lock()  # a gevent lock once wsgi.py has monkey-patched threading

    def send_json(self, *messages: dict) -> None:
        """The messages' frames, in order, in one write (built outside the lock)."""
        if len(messages) == 1:
            frame = relay_protocol.frame(messages[0])
        else:
            frame = b"".join(relay_protocol.frame(message) for message in messages)
        with self._lock:
            if not self.ws.connected:
                raise ConnectionError("relay socket closed")
            sock = self.ws.sock
            # One send() takes a whole small frame at once; gevent's sendall() would first ask the kernel for the
            # send buffer size (a getsockopt per frame) and run its chunking loop.
            sent = sock.send(frame)
            if sent < len(frame):
                sock.sendall(memoryview(frame)[sent:])


class RelayClaim:
    """This socket's claim on its call in the store: at most one live relay socket per call, across workers."""

    __slots__ = ("store", "tracking_id", "lease_s", "generation", "owner", "renew_at")  # one per live call

    def __init__(self, store: Store, record: CallRecord, lease_s: float):
        self.store, self.tracking_id, self.lease_s = store, record.tracking_id, lease_s
        self.generation = record.resume_count
        self.owner = uuid.uuid4().hex
        self.renew_at = 0.0

    def acquire(self) -> bool:
        claimed = self.store.claim_relay_socket(self.tracking_id, self.owner, self.generation, self.lease_s)
        self.renew_at = time.monotonic() + self.lease_s / 3
        return claimed

    def seconds_to_renewal(self) -> float:
        return max(0.0, self.renew_at - time.monotonic())

    def renew_if_due(self) -> bool:
        """False once another socket holds the call (its resume replaced this claim). A claim the store no longer
        has at all (a Redis restarted without its data, e.g. one without persistence) is taken again, which
        succeeds only while no other live socket holds the call."""
        if time.monotonic() < self.renew_at:
            return True
        self.renew_at = time.monotonic() + self.lease_s / 3
        try:
            return (self.store.renew_relay_socket(self.tracking_id, self.owner, self.lease_s)
                    or self.store.claim_relay_socket(self.tracking_id, self.owner, self.generation, self.lease_s))
        except StoreError:
            log.warning("relay_claim_renew_failed")
            return True  # a store outage must not hang up a live call; the lease covers it

    def release(self) -> None:
        try:
            self.store.release_relay_socket(self.tracking_id, self.owner)
        except StoreError:
            log.warning("relay_claim_release_failed")  # the lease runs out by itself


@bp.before_app_request
def _refuse_unsigned_upgrade():
    """Checked before the handshake: an upgrade that is unsigned, names no live call, or names a call that
    already has its socket never becomes a socket (so replays of one captured upgrade cost nothing)."""
    if request.path != RELAY_PATH:
        return None
    query = request.query_string.decode("latin-1")
    url = websocket_url(base_url(), RELAY_PATH) + (f"?{query}" if query else "")
    ok, record = verify_twilio(url=url, params={})
    if not ok:
        return forbidden()
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return None  # not a socket: routing answers it
    if not call_is_live(record) or record.tracking_id != request.args.get("trackingId"):
        log.warning("relay_socket_refused", reason="no live call")
        raise ApiError(403, "No live call for this relay socket")
    svc = services()
    claim = RelayClaim(svc.store, record, svc.settings.relay_socket_lease_s)
    try:
        claimed = claim.acquire()
    except StoreError:
        log.exception("relay_claim_failed")
        raise ApiError(503, "Call state is unavailable")
    if not claimed:
        log.warning("relay_socket_refused", reason="call already has a live socket")
        raise ApiError(409, "This call already has a live relay socket")
    g.relay_claim = claim
    return None


@bp.teardown_app_request
def _release_claim(_exc):
    claim = g.pop("relay_claim", None)
    if claim is not None:
        claim.release()


def check_setup(message: relay_protocol.Inbound | None, signed_tracking_id: str) -> tuple[bool, str | None]:
    """(is this a `setup` message, why it may not start this socket's session or None).

    The trackingId in `customParameters` must be the one in the signed URL, so a socket can never be
    pointed at another call; the callSid, when given, must look like one (it is logged and stored)."""
    if not isinstance(message, relay_protocol.Setup):
        return False, None  # another message, or a bad frame (already logged by parse)
    if message.custom_parameters.get("trackingId") != signed_tracking_id:
        return True, "setup trackingId does not match the signed URL"
    if message.call_sid is not None and not CALL_SID.fullmatch(message.call_sid):
        return True, "setup callSid is not a Call SID"
    return True, None


@sock.route(RELAY_PATH, bp=bp)
def conversation_relay(ws):
    svc = services()
    session = RelaySession(svc.engine, LockedSender(ws), spawn=spawn,
                           text_hold_s=svc.settings.relay_text_hold_ms / 1000,
                           silence_timeout_s=svc.settings.silence_timeout_s)
    svc.add_live_session(session)
    try:
        RelaySocket(ws, session, g.relay_claim, svc.settings.relay_setup_timeout_s, svc.heap_trimmer).serve()
    finally:
        svc.live_sessions.discard(session)
        session.close()


class RelaySocket:
    """One live relay socket. Its handler (gunicorn's request greenlet, which lives as long as the socket anyway)
    runs simple-websocket's reader loop itself (`SocketReader.run_here_or_wait`); what that loop buffers, the
    claim's renewal, the setup deadline and the caller's silence (RelaySession.check_silence) are handled by a task
    started when one of them is due (the socket's event calls `wake`, an `Alarm` the deadlines) and ended when nothing is: an idle call holds one greenlet, not two
    (docs/performance-history.md, "Issue 12x"). One such task at a time, so messages are handled in order, all in
    one context: the call's log bindings made at `setup` hold for its later messages."""

    __slots__ = ("ws", "session", "claim", "setup_deadline", "trimmer", "context", "lock", "worker", "nudge", "due",
                 "alarm", "ended", "reader_done", "set_up_now")  # one per live call

    def __init__(self, ws, session: RelaySession, claim: RelayClaim, setup_timeout_s: float, trimmer) -> None:
        self.ws, self.session, self.claim, self.trimmer = ws, session, claim, trimmer
        self.setup_deadline: float | None = time.monotonic() + setup_timeout_s
        self.context = contextvars.copy_context()
        self.lock = threading.Lock()  # a gevent lock under gevent, never held across a switch
        self.worker = None  # the task handling what is due, while it runs
        self.nudge = None  # that task's wake-up while it waits for more
        self.due = False
        self.alarm: Alarm | None = None
        self.ended = False  # closed by us
        self.reader_done = False  # the reader loop has returned: the socket is closed
        self.set_up_now = False  # `setup` handled by the running task

    def serve(self) -> None:
        """Until the socket has closed and what it delivered has been handled. The reader and the event are the
        ones app.py's SOCK_SERVER_OPTIONS gave simple-websocket (its `thread` and `event`)."""
        reader = self.ws.thread
        if not isinstance(reader, SocketReader):
            raise TypeError("the relay socket's reader must be a SocketReader (app.py SOCK_SERVER_OPTIONS)")
        self.ws.event.on_set = self.wake
        self.session.on_quiet = self.wake  # a reply's talk cycle closed: the silence deadline moved
        if self.ws.event.is_set():  # frames the reader buffered before the hook was in place
            self.wake()
        self._set_alarm()
        try:
            reader.run_here_or_wait()
        finally:
            self.ws.event.on_set = self.session.on_quiet = None
            if self.alarm is not None:
                self.alarm.cancel()
        self.reader_done = True
        self.wake()  # whatever the loop buffered last
        worker = self.worker
        if worker is not None:
            worker.join()
        if self.alarm is not None:  # set again by a task that ran meanwhile
            self.alarm.cancel()
        # The call's log bindings (made at `setup`, in the tasks' context) for what the handler logs from here on:
        # the session's close at hang-up, the claim's release.
        structlog.contextvars.bind_contextvars(**self.context.run(structlog.contextvars.get_contextvars))

    def wake(self) -> None:
        """Something may be due (a message buffered, a deadline passed): start the task unless it runs. Never
        blocks (the alarm calls it from gevent's hub)."""
        with self.lock:
            self.due = True
            if self.worker is None:
                self.worker = spawn(self._work)
            elif self.nudge is not None:
                self.nudge.set()

    def _work(self) -> None:
        """What is due; then up to LINGER_S for more, so a turn's frames (the prompt, Twilio's `info` frames) share
        one task rather than paying for a new greenlet each. Not after `setup` (the caller speaks first, and the heap
        is trimmed once this task ends) nor after a wake with no message (the claim's renewal every few seconds would
        otherwise keep a task alive for a share of every idle call's life)."""
        nudge = threading.Event()  # gevent's Event under gevent
        talking = False  # the last batch had a message other than `setup`: wait for more
        try:
            while True:
                if self._take_due(nudge):
                    talking = self.context.run(self._handle_due)
                elif (not talking or self.reader_done or not nudge.wait(LINGER_S)) and self._stop_unless_due():
                    break
        except BaseException as error:
            with self.lock:
                self.worker = self.nudge = None
            if not isinstance(error, Exception):
                raise  # the task was killed (GreenletExit) or the process is stopping
            # As an error in the handler's own loop did before: logged, and the socket closed (its reader loop then
            # ends, and serve() returns) rather than a call left without its claim's renewals or setup deadline.
            self.context.run(log.exception, "relay_socket_task_failed")
            self._end("relay_socket_closed_after_failure", "internal error")
            return
        if self.set_up_now:
            # The last step of a call's set-up: the task that handled `setup` has ended, so what it held (its
            # saved C stack, its frames) is free before the heap is trimmed.
            self.set_up_now = False
            self.trimmer.call_set_up()

    def _take_due(self, nudge) -> bool:
        with self.lock:
            due, self.due = self.due, False
            if not due:
                nudge.clear()
                self.nudge = nudge  # the next wake sets it
            return due

    def _stop_unless_due(self) -> bool:
        with self.lock:
            if self.due:
                return False
            self.worker = self.nudge = None
            return True

    def _handle_due(self) -> bool:
        """Every buffered message in order, then the deadlines (what the handler's loop did after each wait).
        Whether a message other than `setup` was among them."""
        ws, claim = self.ws, self.claim
        talking = False
        while not self.ended:
            try:
                raw = ws.receive(timeout=0)
            except ConnectionClosed:
                return False  # the reader loop has ended; serve() returns
            if raw is None:
                break
            message = relay_protocol.parse(raw)
            is_setup, problem = check_setup(message, claim.tracking_id)
            if problem is not None:
                self._end("relay_setup_refused", problem)
                return False
            if message is not None:
                self.session.handle_message(message)
            if is_setup:
                self.setup_deadline = None
                self.set_up_now = True
            talking = not is_setup
        if self.ended or not ws.connected:
            return False
        if self.setup_deadline is not None and time.monotonic() >= self.setup_deadline:
            self._end("relay_setup_timeout", "setup not received in time")
        elif not claim.renew_if_due():
            self._end("relay_socket_replaced", "another socket took over this call")
        else:
            self.session.check_silence()
            self._set_alarm()
        return talking

    def _set_alarm(self) -> None:
        """The alarm for the next deadline. A pending alarm due no later is kept rather than rebuilt after every
        batch of messages: firing early only wakes a task that finds nothing due and sets the alarm again."""
        if not self.ws.connected:
            return
        now = time.monotonic()
        at = now + self.claim.seconds_to_renewal()
        if self.setup_deadline is not None:
            at = min(at, self.setup_deadline)
        silence_at = self.session.silence_check_at()  # on the session's clock: time.monotonic, as here
        if silence_at is not None:
            at = min(at, silence_at)
        if self.alarm is not None:
            if self.alarm.pending_by(at):
                return
            self.alarm.cancel()
        self.alarm = Alarm(at - now, self.wake)

    def _end(self, event: str, reason: str) -> None:
        """Close with 1008, and end the reader loop (blocked reading in the handler) as gunicorn closing the
        connection after the handler returned did."""
        self.ended = True
        _close(self.ws, event, reason)
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the peer closed it already
            pass


def _close(ws, event: str, reason: str) -> None:
    log.warning(event, reason=reason)
    try:
        ws.close(reason=CLOSE_POLICY_VIOLATION, message=reason)
    except Exception:  # already closed by the peer
        pass
