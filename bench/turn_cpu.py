"""The fixed CPU of a relay turn, in-process: everything a turn costs apart from waiting for and reading tokens.

An LLM stand-in (its own process) answers every request with the whole reply (~25 tokens, the relay bench's text)
in one write, so a turn's token reading is one wake-up and what remains is the turn's fixed work: the prompt
frame's parse and end-of-utterance handling, `engine.start_turn` (workflow turn, cache lookup, the request body),
the LLM exchange's head, the reply's frames, the commit (store, metrics, span, log line). Calls are placed and
answered through the app (make-call-optimized, the TwiML webhook; not counted), then each call's `RelaySession`
gets the `setup` message and talks: `--calls` greenlets, `--turns` prompts each, back to back, under gevent as in
a worker. The process's CPU (user+system, `getrusage`) over the talking phase ÷ turns, and, on the thread's CPU
clock, two parts of it: the prompt frame's receipt (parse, end of utterance, `start_turn`) and the commit, with the
store's `commit_turn` and the reply-cache write inside it. Each `--root` is a checkout (`git archive <commit> | tar
-x -C DIR`) in its own process, roots alternating round by round. `TURN_CPU_SET=KEY=VALUE,...` changes the app's
environment (what-ifs such as CACHE_TYPE=NullCache); `TURN_CPU_PROFILE_OUT=FILE` keeps the `--profile` data;
`TURN_CPU_MORE=1` also times the reply-cache lookup, `plan_turn`, the frame parse, the `turn_completed` line and
`turn_counters` (printed on stderr).

    python -m bench.turn_cpu --calls 100 --turns 4 --root /tmp/ref --root .
    python -m bench.turn_cpu --calls 100 --turns 4 --profile tottime    # plus a cProfile table (CPU clock)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RECEIPT, COMMIT, STORE, CACHE = ("prompt receipt (parse, start_turn)", "commit", "store.commit_turn",
                                 "reply-cache write")
# The parts of a turn's CPU, each apart from the others, so a row sums to the talking phase's CPU per turn.
STEPS = (RECEIPT, "commit: store.commit_turn", "commit: reply-cache write",
         "commit: the rest (counters, span, log line, record)",
         "the rest of the turn (LLM exchange, frames, greenlets, hub)")

# A tiny HTTP/1.1 server (stdlib only, threads): every POST gets the prebuilt SSE reply in one sendall.
ONE_WRITE_LLM = r'''
import json, socket, sys, threading
text = sys.argv[1]
words = text.split(" ")
tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
def event(delta, finish=None):
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"
body = event({"role": "assistant", "content": tokens[0]}) + b"".join(event({"content": t}) for t in tokens[1:])
body += event({}, "stop") + b"data: [DONE]\n\n"
reply = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n" + b"%X\r\n%s\r\n" % (len(body), body) + b"0\r\n\r\n")
def serve(conn):
    buf = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            buf = buf[length:]
            conn.sendall(reply)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


class FrameSink:
    """The socket's sender: counts the frames a reply would write."""

    def __init__(self) -> None:
        self.frames = 0

    def send_json(self, *messages: dict) -> None:
        from callweaver.engine import relay_protocol
        for message in messages:
            relay_protocol.frame(message)  # the frame is built as LockedSender builds it
        self.frames += len(messages)


def measure(calls: int, turns: int, profile_sort: str | None) -> dict[str, float]:
    import cProfile
    import gc
    import pstats
    import resource
    import tempfile
    import time

    import gevent
    from bench.callers import call_body, destination
    from bench.fake_llm_server import DEFAULT_REPLY_TEXT
    from bench.setup_cpu import BASE, start_twilio_stand_in
    from bench.stack import ACCOUNT_SID, AUTH_TOKEN, server_env
    from callweaver.simulate.webhooks import twilio_signature

    llm = subprocess.Popen([sys.executable, "-c", ONE_WRITE_LLM, DEFAULT_REPLY_TEXT], stdout=subprocess.PIPE, text=True)
    stand_in, twilio_url = start_twilio_stand_in()
    try:
        llm_url = f"http://127.0.0.1:{llm.stdout.readline().strip()}/v1"
        os.environ.update(server_env(Path(tempfile.mkdtemp(prefix="callweaver-turn-cpu-")), llm_url, twilio_url,
                                     PUBLIC_BASE_URL=BASE, LOG_LEVEL="INFO"))
        for setting in filter(None, os.environ.get("TURN_CPU_SET", "").split(",")):  # KEY=VALUE,... (what-ifs)
            os.environ.update([setting.split("=", 1)])
        from callweaver import create_app
        from callweaver.background import spawn
        from callweaver.engine.relay_session import RelaySession
        app = create_app()
        svc = app.extensions["callweaver"]
        svc.wait_until_warm()
        client = app.test_client()

        def place(index: int) -> dict:
            resp = client.post("/api/make-call-optimized",
                               json=call_body(destination(index), "real_estate_property_dealer"))
            data = resp.get_json()
            assert resp.status_code == 200, data
            sid, tid = data["callSid"], data["optimization"]["trackingId"]
            path = f"/api/twiml-optimized?id=wf_real_estate_property_dealer&trackingId={tid}"
            params = {"AccountSid": ACCOUNT_SID, "CallSid": sid, "From": "+15005550006", "To": destination(index),
                      "Direction": "outbound-api", "ApiVersion": "2010-04-01", "CallStatus": "in-progress"}
            resp = client.post(path, data=params,
                               headers={"X-Twilio-Signature": twilio_signature(AUTH_TOKEN, BASE + path, params)})
            assert resp.status_code == 200, resp.data
            return {"type": "setup", "sessionId": "VX" + "0" * 32, "accountSid": ACCOUNT_SID, "callSid": sid,
                    "from": "+15005550006", "to": destination(index), "direction": "outbound-api",
                    "callStatus": "RINGING", "customParameters": {"trackingId": tid}}

        split = dict.fromkeys((RECEIPT, COMMIT, STORE, CACHE), 0.0)

        class TimedSession(RelaySession):
            """Times the receipt of a frame (parse, end of utterance, `start_turn`) and the commit, on the CPU clock
            (neither switches greenlets: the store, cache and log calls do not wait on sockets)."""

            __slots__ = ()

            def handle(self, raw):
                started = time.thread_time()
                super().handle(raw)
                split[RECEIPT] += time.thread_time() - started

            def _commit(self, turn, **kwargs):
                started = time.thread_time()
                super()._commit(turn, **kwargs)
                split[COMMIT] += time.thread_time() - started

        def timed(owner, name: str, step: str) -> None:
            """Time one method of the commit on the CPU clock (the instance attribute shadows the method)."""
            method = getattr(owner, name)

            def run(*args, **kwargs):
                started = time.thread_time()
                try:
                    return method(*args, **kwargs)
                finally:
                    split[step] += time.thread_time() - started
            setattr(owner, name, run)

        timed(svc.engine.store, "commit_turn", STORE)
        if svc.engine.cache is not None:
            timed(svc.engine.cache, "put", CACHE)
        if os.environ.get("TURN_CPU_MORE"):
            import callweaver.engine.conversation as conv
            import callweaver.engine.llm_http as lh
            for extra in ("cache.get", "plan_turn", "Exchange.start", "relay_protocol.parse", "log.info", "turn_counters"):
                split[extra] = 0.0
            timed(svc.engine.cache, "get", "cache.get")
            timed(conv, "plan_turn", "plan_turn")
            timed(lh.Exchange, "start", "Exchange.start")
            from callweaver.engine import relay_protocol as rp
            timed(rp, "parse", "relay_protocol.parse")
            timed(conv, "turn_counters", "turn_counters")

            class TimedLog:
                def __init__(self, inner):
                    self.inner = inner

                def info(self, *a, **k):
                    started = time.thread_time()
                    self.inner.info(*a, **k)
                    split["log.info"] += time.thread_time() - started

                def __getattr__(self, name):
                    return getattr(self.inner, name)
            conv.log = TimedLog(conv.log)

        def talk(setup: dict, index: int, count: int) -> None:
            session = TimedSession(svc.engine, FrameSink(), spawn=spawn,
                                   text_hold_s=svc.settings.relay_text_hold_ms / 1000)
            RelaySession.handle(session, json.dumps(setup))  # the set-up is not a turn
            for turn in range(count):
                session.handle(json.dumps({"type": "prompt", "lang": "en-US", "last": True, "voicePrompt":
                                           f"Turn {turn + 1} of caller {index}: is there a place near the park?"}))
                reply = session._reply
                if reply is not None:
                    reply.join()
            session.close()

        warm = [place(100000 + i) for i in range(3)]
        gevent.joinall([gevent.spawn(talk, setup, 100000 + i, 2) for i, setup in enumerate(warm)])
        setups = [place(i) for i in range(calls)]
        gc.collect()
        gc.freeze()  # as gunicorn.conf.py does once the worker has loaded: collections walk only the calls' objects
        for key in split:
            split[key] = 0.0
        profile = cProfile.Profile(time.thread_time)
        before = resource.getrusage(resource.RUSAGE_SELF)
        if profile_sort:
            profile.enable()
        gevent.joinall([gevent.spawn(talk, setup, i, turns) for i, setup in enumerate(setups)], raise_error=True)
        profile.disable()
        after = resource.getrusage(resource.RUSAGE_SELF)
        if profile_sort:
            pstats.Stats(profile, stream=sys.stderr).sort_stats(profile_sort).print_stats(70)
            if os.environ.get("TURN_CPU_PROFILE_OUT"):
                profile.dump_stats(os.environ["TURN_CPU_PROFILE_OUT"])
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        turns_done = svc.store.get_call(setups[0]["customParameters"]["trackingId"])
        assert turns_done is not None and len(turns_done.messages) >= 2 * turns, "the turns did not complete"
        per_turn = {key: seconds * 1000 / (calls * turns) for key, seconds in split.items()}
        parts = [per_turn[RECEIPT], per_turn[STORE], per_turn[CACHE], per_turn[COMMIT] - per_turn[STORE] - per_turn[CACHE]]
        if os.environ.get("TURN_CPU_MORE"):
            print({k: round(v, 4) for k, v in per_turn.items()}, file=sys.stderr)
        return dict(zip(STEPS, [*parts, cpu * 1000 / (calls * turns) - per_turn[RECEIPT] - per_turn[COMMIT]]))
    finally:
        stand_in.kill()
        llm.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the roots (with --root)")
    parser.add_argument("--profile", choices=("cumulative", "tottime"), help="print a cProfile table")
    parser.add_argument("--root", action="append", default=[], help="a checkout to measure (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.root:
        from bench.report import compare_checkouts
        os.environ["TURN_CPU_TURNS"] = str(args.turns)
        compare_checkouts(str(Path(__file__).resolve()), args.root, args.calls, args.rounds, STEPS,
                          f"ms CPU per turn, {args.calls} calls × {args.turns} turns, in-process, one-write replies",
                          digits=3)
        return
    turns = int(os.environ.get("TURN_CPU_TURNS", args.turns))
    spent = measure(args.calls, turns, args.profile)
    if args.child:
        print(json.dumps(spent))
        return
    from bench.report import print_parts
    print_parts("part of a turn", f"CPU per turn (ms), {args.calls} calls × {turns} turns, one-write replies", spent,
                "all (the talking phase)", digits=3)


if __name__ == "__main__":
    from gevent import monkey
    monkey.patch_all()
    main()
