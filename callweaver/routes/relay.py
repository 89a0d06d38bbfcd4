"""ConversationRelay WebSocket: refuse unsigned upgrades, then hand every message to a RelaySession."""
from __future__ import annotations

import threading

import structlog
from flask import Blueprint, request

from ..engine import relay_protocol
from ..engine.relay_session import RelaySession
from ..extensions import sock
from ..security import websocket_url
from ..services import services, spawn
from .common import base_url, forbidden, verify_twilio
from .twiml import RELAY_PATH

bp = Blueprint("relay", __name__)
log = structlog.get_logger()


class LockedSender:
    """Serialised, complete frame writes: simple-websocket's send() may write part of a frame to a slow
    reader and interleave frames across greenlets, so frames are built under a lock and written with sendall."""

    def __init__(self, ws):
        self.ws = ws
        self._lock = threading.Lock()  # a gevent lock once wsgi.py has monkey-patched threading

    def send_json(self, message: dict) -> None:
        frame = relay_protocol.frame(message)  # built outside the lock
        with self._lock:
            if not self.ws.connected:
                raise ConnectionError("relay socket closed")
            self.ws.sock.sendall(frame)


@bp.before_app_request
def _refuse_unsigned_upgrade():
    """Checked before the handshake: an upgrade whose signature fails never becomes a socket."""
    if request.path != RELAY_PATH:
        return None
    query = request.query_string.decode("latin-1")
    url = websocket_url(base_url(), RELAY_PATH) + (f"?{query}" if query else "")
    ok, _record = verify_twilio(url=url, params={})
    return None if ok else forbidden()


@sock.route(RELAY_PATH, bp=bp)
def conversation_relay(ws):
    svc = services()
    session = RelaySession(svc.engine, LockedSender(ws), spawn=spawn)
    try:
        while True:
            message = ws.receive()
            if message is None:
                break
            session.handle(message)
    finally:
        session.close()
