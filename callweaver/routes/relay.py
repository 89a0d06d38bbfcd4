"""ConversationRelay WebSocket: refuse unsigned upgrades, then hand every message to a RelaySession."""
from __future__ import annotations

import json

import structlog
from flask import Blueprint, Response, request

from ..engine.relay_session import RelaySession
from ..extensions import sock
from ..security import websocket_url
from ..services import services, spawn
from .common import base_url, signature_ok

bp = Blueprint("relay", __name__)
log = structlog.get_logger()

RELAY_PATH = "/api/conversationrelay-ws"


class LockedSender:
    """Serialised, complete frame writes: simple-websocket's send() may write part of a frame to a slow
    reader and interleave frames across greenlets, so frames are built under a lock and written with sendall."""

    def __init__(self, ws):
        from gevent.lock import Semaphore
        self.ws = ws
        self._lock = Semaphore()

    def send_json(self, message: dict) -> None:
        from wsproto.events import TextMessage
        data = json.dumps(message, ensure_ascii=False)
        with self._lock:
            if not self.ws.connected:
                raise ConnectionError("relay socket closed")
            self.ws.sock.sendall(self.ws.ws.send(TextMessage(data=data)))


@bp.before_app_request
def _refuse_unsigned_upgrade():
    """Checked before the handshake: an upgrade whose signature fails never becomes a socket."""
    if request.path != RELAY_PATH:
        return None
    query = request.query_string.decode("latin-1")
    url = websocket_url(base_url(), RELAY_PATH) + (f"?{query}" if query else "")
    svc = services()
    tracking_id = request.args.get("trackingId")
    token = svc.lifecycle.auth_token_for(svc.lifecycle.find(tracking_id, None) if tracking_id else None)
    if not signature_ok(token, url=url, params={}):
        log.warning("relay_upgrade_rejected", has_signature=bool(request.headers.get("X-Twilio-Signature")))
        return Response('{"success": false, "error": "Invalid Twilio signature"}', status=403,
                        mimetype="application/json")
    return None


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
