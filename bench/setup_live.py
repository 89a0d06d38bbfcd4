"""Set-up CPU per call on the real server, by step: the gunicorn gevent worker's CPU (utime+stime) while N calls
each make one step, 20 at a time, ÷ N. Steps: make-call-optimized (with the twilio SDK's REST call to the stand-in),
the signed TwiML webhook (none when the checkout placed the call with its TwiML inline: the step then costs the
worker nothing), the signed socket upgrade + `setup`, and the signed status callbacks Twilio sends while a
call is set up: one per event the checkout subscribes to before `completed` (its `callweaver/twilio_client.py`
STATUS_CALLBACK_EVENTS), in Twilio's order and with Twilio's CallStatus (`answered` arrives as `in-progress`);
`GET /ping` first, as the floor any request pays (gunicorn, gevent, Flask, the access line).
`python -m bench.relay` reports the first three steps together ("worker CPU per call set-up"). Each `--root` is a
checkout (e.g. `git archive <commit> | tar -x -C DIR`) whose server is started in turn, round by round, against
the same fake LLM and Twilio stand-in, so a reference runs in the same invocation.

    python -m bench.setup_live --calls 200                                   # this checkout, about 20 s
    python -m bench.setup_live --calls 200 --rounds 3 --root /tmp/ref --root .
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import ast  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

from gevent.pool import Pool  # noqa: E402

from bench.callers import RelayCall, destination  # noqa: E402
from bench.report import machine_summary, markdown_table  # noqa: E402
from bench.stack import BenchStack, cpu_s  # noqa: E402
from callweaver.simulate.webhooks import http  # noqa: E402

WORKFLOW = "real_estate_property_dealer"
CONCURRENCY = 20
WARM_UP_CALLS = 5
# Twilio's CallStatus for each StatusCallbackEvent a call can send while it is set up (`completed` comes at its end).
SET_UP_EVENTS = {"initiated": "initiated", "ringing": "ringing", "answered": "in-progress"}
STEPS = ("GET /ping", "make-call", "TwiML webhook", "socket upgrade + setup", "status callbacks")
SET_UP = STEPS[1:4]  # what bench.relay's "worker CPU per call set-up" row covers


def set_up_statuses(root: Path) -> tuple[str, ...]:
    """The CallStatus values Twilio posts while a call of `root`'s code is set up: the events it subscribes to."""
    tree = ast.parse((root / "callweaver" / "twilio_client.py").read_text())
    events = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(target, "id", None) == "STATUS_CALLBACK_EVENTS" for target in node.targets))
    return tuple(SET_UP_EVENTS[event] for event in events if event in SET_UP_EVENTS)


def measure(stack: BenchStack, root: Path, calls: int, first_number: int) -> dict[str, float]:
    """ms of worker CPU per call for each step, on a fresh server from `root`."""
    statuses_sent = set_up_statuses(root)
    with stack.server(repo=root) as server:
        pid = stack.worker_pid(server)
        for warm in [RelayCall(stack, server.url, destination(first_number + calls + i), WORKFLOW)
                     for i in range(WARM_UP_CALLS)]:
            warm.set_up()
            warm.hang_up()
        placed = [RelayCall(stack, server.url, destination(first_number + i), WORKFLOW) for i in range(calls)]

        def statuses(call: RelayCall) -> None:
            for sequence, status in enumerate(statuses_sent):
                answer = call.caller.status(status, sequence)
                if answer.status != 200:
                    raise RuntimeError(f"status callback refused ({answer.status})")

        def ping(_call: RelayCall) -> None:
            if http("GET", server.url + "/ping").status != 200:
                raise RuntimeError("/ping failed")

        actions: tuple[Callable[[RelayCall], None], ...] = (
            ping, RelayCall.place, lambda call: call.caller.answer_placed(stack.create_for(call.to)),
            lambda call: call.caller.connect(), statuses)
        spent: dict[str, float] = {}
        pool = Pool(CONCURRENCY)
        try:
            for step, action in zip(STEPS, actions):
                before = cpu_s(pid)
                pool.map(action, placed)
                time.sleep(0.3)  # the last answers' access lines and socket reads
                spent[step] = (cpu_s(pid) - before) * 1000 / calls
            spent["callbacks"] = len(statuses_sent)
        finally:
            for call in placed:
                call.hang_up()
        return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1, help="rounds over the roots")
    parser.add_argument("--root", action="append", default=[], help="a checkout to measure (repeatable)")
    args = parser.parse_args()
    roots = [Path(root).resolve() for root in args.root or ["."]]
    runs: dict[Path, list[dict[str, float]]] = {root: [] for root in roots}
    with BenchStack("setup-live") as stack:
        for round_index in range(args.rounds):
            for root_index, root in enumerate(roots):
                first = (round_index * len(roots) + root_index) * 10 * (args.calls + WARM_UP_CALLS)
                runs[root].append(measure(stack, root, args.calls, first))
    print(f"#### Set-up CPU per call on the real server, by step: {args.calls} calls, {CONCURRENCY} at a time, "
          f"one gevent worker\n\n{machine_summary()}. Command: `python -m bench.setup_live --calls {args.calls}"
          f"{' --rounds ' + str(args.rounds) if args.rounds > 1 else ''}"
          f"{''.join(' --root ' + r for r in args.root)}` (one value per round)\n")

    def cell(values: list[float]) -> str:
        return " / ".join(f"{value:.2f}" for value in values)

    rows = [[f"{root} ({root_runs[0]['callbacks']:.0f} callbacks)"]
            + [cell([run[step] for run in root_runs]) for step in STEPS]
            + [cell([sum(run[step] for step in SET_UP) for run in root_runs]),
               cell([sum(run[step] for step in STEPS[1:]) for run in root_runs])]
            for root, root_runs in runs.items()]
    print(markdown_table(["checkout (ms of worker CPU per call)", *STEPS, "set-up as bench.relay counts it",
                          "set-up with the callbacks"], rows))


if __name__ == "__main__":
    main()
