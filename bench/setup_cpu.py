"""Set-up CPU per call, by request, in-process: make-call-optimized (with the twilio SDK's REST call to the stand-in,
which runs in its own process), the signed TwiML webhook (none when the checkout placed the call with its TwiML
inline, as Twilio then requests nothing) and four signed status callbacks, each timed with the
thread's CPU clock. The socket upgrade is left out (the test client has no WebSocket); `python -m bench.relay`
measures the whole set-up on the real server. Each `--root` is a checkout (e.g. `git archive <commit> | tar -x -C
DIR`), measured in its own process, the roots alternating round by round, so a reference runs in the same invocation.

    python -m bench.setup_cpu --calls 200          # about 10 s
    python -m bench.setup_cpu --calls 200 --root /tmp/ref --root .   # a reference beside this checkout
    python -m bench.setup_cpu --calls 200 --profile cumulative   # plus a cProfile table (slows everything ~5×)
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.callers import call_body, destination
from bench.stack import ACCOUNT_SID, AUTH_TOKEN, server_env
from callweaver.simulate.webhooks import twilio_signature

BASE = "http://127.0.0.1:3000"  # PUBLIC_BASE_URL: what the webhooks are signed for
STATUSES = ("initiated", "ringing", "answered", "in-progress")
STEPS = ("make-call-optimized", "TwiML webhook", "4 status callbacks")
WARM_UP_CALLS = 5


def start_twilio_stand_in() -> tuple[subprocess.Popen, str]:
    """The REST stand-in in its own process, so its CPU is not this process's. A call SID written to its stdin is
    answered with a line: the `Url` the call's create gave Twilio, or an empty line (its TwiML went inline)."""
    proc = subprocess.Popen([sys.executable, "-c", (
        "import sys\nfrom callweaver.simulate.twilio_rest import TwilioRestStandIn\n"
        f"s = TwilioRestStandIn({ACCOUNT_SID!r}, {AUTH_TOKEN!r}).start()\nprint(s.url, flush=True)\n"
        # by the call's own number (each bench call has one): a reference checkout's stand-in may keep no `placed`
        "for sid in sys.stdin:\n    to = s.calls[sid.strip()]['to']\n"
        "    print(next(r for r in reversed(s.creates()) if r.one('To') == to).one('Url') or '', flush=True)\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def twiml_url(stand_in: subprocess.Popen, call_sid: str) -> str | None:
    """The URL Twilio fetches on answer for `call_sid` (None: its create carried the TwiML inline)."""
    stand_in.stdin.write(call_sid + "\n")
    stand_in.stdin.flush()
    return stand_in.stdout.readline().strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile", choices=("cumulative", "tottime"), help="print a cProfile table")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the roots (with --root)")
    parser.add_argument("--root", action="append", default=[], help="a checkout to measure (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.root:
        from bench.report import compare_checkouts  # this checkout's; the children import the measured one's

        compare_checkouts(str(Path(__file__).resolve()), args.root, args.calls, args.rounds, STEPS,
                          f"ms CPU per call, {args.calls} calls, in-process")
        return
    spent = measure(args.calls, args.profile)
    if args.child:
        print(json.dumps(spent))
        return
    from bench.report import print_parts
    print_parts("request", f"CPU per call (ms), {args.calls} calls, in-process", spent, "all of them")


def measure(calls: int, profile_sort: str | None = None) -> dict[str, float]:
    """ms of this thread's CPU per call, by step, after a few warm-up calls."""
    stand_in, twilio_url = start_twilio_stand_in()
    try:
        os.environ.update(server_env(Path(tempfile.mkdtemp(prefix="callweaver-setup-cpu-")), "http://127.0.0.1:9/v1",
                                     twilio_url, PUBLIC_BASE_URL=BASE))
        from callweaver import create_app
        app = create_app()
        app.extensions["callweaver"].wait_until_warm()
        client = app.test_client()

        def signed(path: str, params: dict) -> None:
            resp = client.post(path, data=params,
                               headers={"X-Twilio-Signature": twilio_signature(AUTH_TOKEN, BASE + path, params)})
            assert resp.status_code == 200, resp.data

        def one_call(index: int, spent: dict[str, float]) -> None:
            started = time.thread_time()
            resp = client.post("/api/make-call-optimized", json=call_body(destination(index), "real_estate_property_dealer"))
            data = resp.get_json()
            assert resp.status_code == 200, data
            sid, tid = data["callSid"], data["optimization"]["trackingId"]
            placed = time.thread_time()
            url = twiml_url(stand_in, sid)  # outside the timed steps (the pipe's few µs are the bench's)
            asked = time.thread_time()
            if url is not None:
                assert url.startswith(BASE + "/api/twiml-optimized?"), url
                signed(url[len(BASE):],
                       {"AccountSid": ACCOUNT_SID, "CallSid": sid, "From": "+15005550006", "To": destination(index),
                        "Direction": "outbound-api", "ApiVersion": "2010-04-01", "CallStatus": "in-progress"})
            answered = time.thread_time()
            for sequence, status in enumerate(STATUSES):
                signed(f"/api/call-status-optimized?trackingId={tid}",
                       {"AccountSid": ACCOUNT_SID, "CallSid": sid, "CallStatus": status, "SequenceNumber": str(sequence),
                        "CallbackSource": "call-progress-events", "ApiVersion": "2010-04-01",
                        "Direction": "outbound-api"})
            done = time.thread_time()
            spent["make-call-optimized"] += placed - started
            spent["TwiML webhook"] += answered - asked
            spent["4 status callbacks"] += done - answered

        for i in range(WARM_UP_CALLS):
            one_call(100000 + i, dict.fromkeys(STEPS, 0.0))
        spent = dict.fromkeys(STEPS, 0.0)
        profile = cProfile.Profile(time.thread_time)
        if profile_sort:
            profile.enable()
        for i in range(calls):
            one_call(i, spent)
        profile.disable()
        if profile_sort:
            pstats.Stats(profile, stream=sys.stderr).sort_stats(profile_sort).print_stats(60)
        return {name: seconds * 1000 / calls for name, seconds in spent.items()}
    finally:
        stand_in.kill()


if __name__ == "__main__":
    main()
