"""Run under gevent: several greenlets send relay frames to a slow TCP reader; exit 0 if every frame arrived whole.

`python -m tests.fakes.sender_check locked|naive` — naive is simple-websocket's own send(), for comparison.
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from wsproto.connection import Connection, ConnectionType  # noqa: E402
from wsproto.events import TextMessage  # noqa: E402

from callweaver.routes.relay import LockedSender  # noqa: E402

SENDERS, PER_SENDER = 4, 40


class ServerWs:
    def __init__(self, sock):
        self.ws = Connection(ConnectionType.SERVER)
        self.sock = sock
        self.connected = True


class NaiveSender:
    """simple-websocket 1.1's send(): one socket.send() of the frame, no lock."""

    def __init__(self, ws):
        self.ws = ws

    def send_json(self, message):
        self.ws.sock.send(self.ws.ws.send(TextMessage(data=json.dumps(message))))


def main(mode: str) -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ws = ServerWs(server)
    sender = LockedSender(ws) if mode == "locked" else NaiveSender(ws)
    received, errors = [], []

    def reader():
        conn = Connection(ConnectionType.CLIENT)
        pending = ""
        try:
            while len(received) < SENDERS * PER_SENDER:
                data = client.recv(256)
                if not data:
                    return
                conn.receive_data(data)
                for event in conn.events():
                    if isinstance(event, TextMessage):
                        pending += event.data
                        if event.message_finished:
                            received.append(json.loads(pending))
                            pending = ""
                gevent.sleep(0.001)
        except Exception as exc:  # a corrupted stream
            errors.append(repr(exc))

    def send(n):
        try:
            for i in range(PER_SENDER):
                sender.send_json({"type": "text", "token": f"{n}:{i}:" + "x" * 3000, "last": False})
        except Exception as exc:
            errors.append(repr(exc))

    r = gevent.spawn(reader)
    gevent.joinall([gevent.spawn(send, n) for n in range(SENDERS)], timeout=30)
    r.join(timeout=2 if errors else 10)
    ok = not errors and len(received) == SENDERS * PER_SENDER and all(
        [int(m["token"].split(":")[1]) for m in received if m["token"].startswith(f"{n}:")] == list(range(PER_SENDER))
        for n in range(SENDERS))
    print(json.dumps({"mode": mode, "received": len(received), "errors": errors[:3], "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
