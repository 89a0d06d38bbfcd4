"""CLI: place a simulated call on a running CallWeaver and talk to it by typing (or from a script file)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .bodies import make_call_body
from .caller import RelayCaller
from .twilio_rest import TwilioRestStandIn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m callweaver.simulate", description=__doc__)
    p.add_argument("--base-url", default=os.environ.get("CALLWEAVER_URL", "http://127.0.0.1:3000"),
                   help="CallWeaver to call (default %(default)s)")
    p.add_argument("--workflow", help="a Call Flow Weaver export (JSON); omit for a global-prompt-only call")
    p.add_argument("--prompt", default="You are a friendly assistant.", help="globalPrompt when no workflow")
    p.add_argument("--to", default="+15551234567")
    p.add_argument("--script", help="file with one caller utterance per line (default: type them)")
    p.add_argument("--lang", default="en-US", help="language reported with each utterance (prompt.lang)")
    p.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN", ""),
                   help="the TWILIO_AUTH_TOKEN CallWeaver runs with (webhooks are signed with it)")
    p.add_argument("--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID", "AC" + "0" * 32))
    p.add_argument("--twilio-port", type=int, default=int(os.environ.get("SIMULATOR_TWILIO_PORT", "3099")),
                   help="port of the Twilio REST stand-in started here; run CallWeaver with "
                        "TWILIO_API_BASE_URL=http://127.0.0.1:<port> (default %(default)s)")
    args = p.parse_args(argv)
    if not args.auth_token:
        p.error("--auth-token (or TWILIO_AUTH_TOKEN) is required: webhooks are signed with it")

    standin = TwilioRestStandIn(args.account_sid, args.auth_token).start(port=args.twilio_port)
    if args.workflow:
        with open(args.workflow, encoding="utf-8") as fh:
            body = make_call_body(json.load(fh), args.to)
    else:
        body = make_call_body(None, args.to, globalPrompt=args.prompt)
    caller = RelayCaller(args.base_url, args.auth_token, args.account_sid)
    try:
        placed = caller.place_call(body)
        print(f"call placed: {placed['callSid']}  trackingId={caller.tracking_id}")
        create = standin.creates()[-1]
        caller.answer(create.one("Url"))
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
