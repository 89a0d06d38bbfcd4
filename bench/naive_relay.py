"""The naive ConversationRelay baseline every relay table is measured against: flask-sock plus the openai SDK,
one streamed completion per prompt, history in a list. No store, cache, metrics, signatures or call set-up.

It keeps one in-memory list of (caller line, ms from prompt to first token sent) so the bench can pair its
server-side first token with the fake LLM's own TTFT, exactly as it does with CallWeaver's stored turns.
Run: `gunicorn -k gevent -w 1 --bind 127.0.0.1:PORT bench.naive_relay:app` with OPENAI_BASE_URL/OPENAI_API_KEY.
"""
import json
import os
import sys
import time

sys.modules.setdefault("trio", None)  # httpcore2's optional trio import crashes under gevent's patched `select`
from flask import Flask, jsonify
from flask_sock import Sock
import httpx2
import openai

app = Flask(__name__)
sock = Sock(app)
# A pool as large as the calls a worker holds (the SDK's default keeps 100 idle connections).
client = openai.OpenAI(base_url=os.environ.get("OPENAI_BASE_URL"), api_key=os.environ.get("OPENAI_API_KEY", "x"),
                       max_retries=0, http_client=openai.DefaultHttpxClient(
                           limits=httpx2.Limits(max_connections=2000, max_keepalive_connections=2000)))
MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
first_tokens: list[tuple[str, float]] = []  # bench-only: (caller line, prompt → first token sent, ms)


@app.get("/ping")
def ping():
    return "ok"


@app.get("/turns")
def turns():
    return jsonify([{"lastUser": line, "firstTokenMs": ms} for line, ms in first_tokens])


@sock.route("/ws")
def relay(ws):
    history = [{"role": "system", "content": "You are a helpful phone agent. Keep replies short."}]
    while True:
        raw = ws.receive()
        if raw is None:
            return
        message = json.loads(raw)
        if message.get("type") != "prompt":
            continue
        received = time.monotonic()
        history.append({"role": "user", "content": message["voicePrompt"]})
        reply, first = [], True
        for chunk in client.chat.completions.create(model=MODEL, messages=history, stream=True):
            token = chunk.choices[0].delta.content if chunk.choices else None
            if token:
                ws.send(json.dumps({"type": "text", "token": token, "last": False}))
                if first:
                    first_tokens.append((message["voicePrompt"], (time.monotonic() - received) * 1000))
                    first = False
                reply.append(token)
        ws.send(json.dumps({"type": "text", "token": "", "last": True}))
        history.append({"role": "assistant", "content": "".join(reply)})
