"""CLI: place a simulated call on a running CallWeaver and talk to it by typing (or from a script file)."""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from ..server_config import MAX_TCP_PORT, read_number
from .bodies import make_call_body
from .caller import END_OF_SPEECH_MS, NORMAL_WORDS_PER_MINUTE, RelayCaller
from .twilio_rest import TwilioRestStandIn


PROG = "python -m callweaver.simulate"


def _port_from_env(name: str, default: int) -> int:
    """A port given by an environment variable, or a one-line exit naming it (argparse's defaults are built first)."""
    port, problem = read_number(os.environ, name, default, int, 1, MAX_TCP_PORT)
    if problem:
        raise SystemExit(f"{PROG}: {problem} (a port number)")
    return port


def _port_is_free(port: int) -> bool:
    """Whether the demo's server could listen on 127.0.0.1:`port` (gunicorn otherwise retries for 5 s, then fails)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind(("127.0.0.1", port))
        except (OSError, OverflowError):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--base-url", default=os.environ.get("CALLWEAVER_URL", "http://127.0.0.1:3000"),
                   help="CallWeaver to call (default %(default)s)")
    p.add_argument("--workflow", help="a Call Flow Weaver export (JSON); omit for a global-prompt-only call")
    p.add_argument("--prompt", default="You are a friendly assistant.", help="globalPrompt when no workflow")
    p.add_argument("--to", default="+15551234567")
    p.add_argument("--script", help="file with one caller utterance per line (default: type them; with --demo, "
                                    "a line ending in '[barge in]' talks over the agent's reply to it)")
    p.add_argument("--lang", default="en-US",
                   help="language reported with each utterance (prompt.lang); with --demo, the call's language too")
    p.add_argument("--partials", action="store_true",
                   help="speak word by word as interim transcripts (partialPrompts), then the final one")
    p.add_argument("--words-per-minute", type=float, default=NORMAL_WORDS_PER_MINUTE,
                   help="speaking rate with --partials (default %(default)s)")
    p.add_argument("--end-of-speech-ms", type=float, default=END_OF_SPEECH_MS,
                   help="wait between the last interim transcript and the final one (default %(default)s)")
    p.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN", ""),
                   help="the TWILIO_AUTH_TOKEN CallWeaver runs with (webhooks are signed with it)")
    p.add_argument("--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID", "AC" + "0" * 32))
    p.add_argument("--twilio-port", type=int, default=_port_from_env("SIMULATOR_TWILIO_PORT", 3099),
                   help="port of the Twilio REST stand-in started here; run CallWeaver with "
                        "TWILIO_API_BASE_URL=http://127.0.0.1:<port> (default %(default)s)")
    demo = p.add_argument_group("offline demo (--demo): starts everything itself, needs no keys")
    demo.add_argument("--demo", action="store_true",
                      help="start the real server, a Twilio stand-in and a stand-in LLM, and play the bundled "
                           "example workflow over ConversationRelay")
    demo.add_argument("--llm-ttft-ms", type=float, default=350.0,
                      help="stand-in LLM: milliseconds before its first token (default %(default)s)")
    demo.add_argument("--llm-token-ms", type=float, default=45.0,
                      help="stand-in LLM: milliseconds between words (default %(default)s)")
    demo.add_argument("--db", default="instance/demo.sqlite3",
                      help="SQLite file the demo server stores calls in (default %(default)s)")
    demo.add_argument("--port", type=int, default=None, help="demo server port (default: a free one)")
    demo.add_argument("--keep-serving", dest="keep_serving", action="store_true", default=None,
                      help="keep the server up after the call so its dashboard page can be opened "
                           "(default when run from a terminal)")
    demo.add_argument("--exit", dest="keep_serving", action="store_false",
                      help="stop the server as soon as the call is over")
    args = p.parse_args(argv)
    if args.demo:
        from .demo import run_demo
        script = None
        if args.script:
            with open(args.script, encoding="utf-8") as fh:
                script = [line.strip() for line in fh if line.strip()]
        keep = sys.stdin.isatty() if args.keep_serving is None else args.keep_serving
        if args.port is not None and not _port_is_free(args.port):
            p.exit(1, f"{PROG}: --port {args.port} is in use (or not a port this user may open): choose another, "
                      "or leave --port out for a free one\n")
        try:
            result = run_demo(script=script, llm_ttft_ms=args.llm_ttft_ms, llm_token_ms=args.llm_token_ms,
                              db_path=args.db, port=args.port, keep_serving=keep, lang=args.lang)
        except RuntimeError as exc:  # the server did not start (its log's tail names why) or refused the call
            p.exit(1, f"{PROG} --demo: {exc}\n")
        return 0 if result.outcome == "end_node" else 1
    if not args.auth_token:
        p.error("--auth-token (or TWILIO_AUTH_TOKEN) is required: webhooks are signed with it")

    if args.workflow:
        with open(args.workflow, encoding="utf-8") as fh:
            body = make_call_body(json.load(fh), args.to)
    else:
        body = make_call_body(None, args.to, globalPrompt=args.prompt)
    try:
        standin = TwilioRestStandIn(args.account_sid, args.auth_token).start(port=args.twilio_port)
    except OSError as exc:
        p.exit(1, f"{PROG}: cannot serve the Twilio REST stand-in on 127.0.0.1:{args.twilio_port} "
                  f"({exc.strerror or exc}); choose another port with --twilio-port or SIMULATOR_TWILIO_PORT (and the same in CallWeaver's "
                  "TWILIO_API_BASE_URL)\n")
    caller = RelayCaller(args.base_url, args.auth_token, args.account_sid)
    try:
        try:
            placed = caller.place_call(body)
        except OSError as exc:
            reason = getattr(exc, "reason", None) or exc
            p.exit(1, f"{PROG}: CallWeaver is not answering at {args.base_url} ({reason}); start it first (README, "
                      "terminal 1) or point --base-url or CALLWEAVER_URL at it\n")
        except RuntimeError as exc:  # CallWeaver answered with an error: its message says what to set
            p.exit(1, f"{PROG}: {exc}\n")
        print(f"call placed: {placed['callSid']}  trackingId={caller.tracking_id}")
        create = standin.creates()[-1]
        caller.answer_placed(create)
        print(f"relay: {caller.twiml.url}  language={caller.twiml.attributes.get('language')}")
        print(f"agent (welcome greeting): {caller.twiml.attributes.get('welcomeGreeting')}")
        caller.connect()
        lines = open(args.script, encoding="utf-8").read().splitlines() if args.script else None
        while True:
            if lines is not None:
                if not lines:
                    break
                text = lines.pop(0).strip()
                if not text:
                    continue
                print(f"caller: {text}")
            else:
                try:
                    text = input("caller> ").strip()
                except EOFError:
                    break
                if not text:
                    continue
            print("agent: ", end="", flush=True)
            refused = len(caller.twilio.errors)
            if args.partials:
                reply = caller.speak(text, args.lang, words_per_minute=args.words_per_minute,
                                     end_of_speech_ms=args.end_of_speech_ms)
            else:
                reply = caller.say(text, args.lang)
            print(reply.text)
            for error in caller.twilio.errors[refused:]:
                print(f"        Twilio refused a message: {error['description']}")
            print(f"        first token {reply.first_token_ms:.1f} ms, last {reply.last_token_ms or 0:.1f} ms"
                  if reply.first_token_ms is not None else "        (no reply text)")
            if reply.end:
                handoff = json.loads(reply.end.get("handoffData") or "{}")
                print(f"session ended: {handoff}")
                twiml = caller.connect_action("ended", handoff)
                print(f"connect action TwiML: {twiml.text}")
                break
        metrics = caller.hooks.url(f"/api/performance-metrics/{caller.tracking_id}")
        print(f"per-turn timings: {metrics}")
        return 0
    finally:
        caller.hangup()
        standin.stop()
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
