"""What the request guard (callweaver/request_guard.py) costs per request: this checkout's guard beside a reference
guard (the same module at `--baseline-ref`, loaded from git into this process), alternating, in one run.

Each request is a bodyless GET through the guard to a WSGI app that answers a small JSON body at once; the answer
is consumed as gunicorn does (iterate, then close). Under gevent (patched first, as in a worker), where the guard
arms its write deadlines. CPU time per request (time.process_time), median of the rounds; nothing else runs here.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

from bench.common import REPO, machine_summary  # noqa: E402
from callweaver import request_guard  # noqa: E402

BODY = b'{"status": "ok"}'


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))])
    return [BODY]


def start_response(status, headers, exc_info=None):
    return None


def reference_module(ref: str) -> types.ModuleType:
    """callweaver/request_guard.py as it is at `ref`, imported as a module of the callweaver package."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:callweaver/request_guard.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("callweaver._reference_request_guard", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "callweaver"
    sys.modules[spec.name] = module
    exec(compile(source, f"{ref}:callweaver/request_guard.py", "exec"), module.__dict__)
    return module


def guard_of(module: types.ModuleType):
    options = {"max_body_bytes": 1 << 20, "read_timeout_s": 10.0, "max_uploads_per_client": 20,
               "trusted_proxy_hops": 0}
    try:
        return module.RequestBodyGuard(app, write_timeout_s=10.0, max_answers_per_client=20, **options).__call__
    except TypeError:  # a reference without answer bounds
        return module.RequestBodyGuard(app, **options).__call__


def cpu_per_request_us(guard, requests: int) -> float:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/health", "REMOTE_ADDR": "127.0.0.1", "CONTENT_LENGTH": ""}
    started = time.process_time()
    for _ in range(requests):
        answer = guard(dict(environ), start_response)
        for _piece in answer:
            pass
        close = getattr(answer, "close", None)
        if close is not None:
            close()
    return (time.process_time() - started) / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="main", help="git commit of the reference request guard")
    parser.add_argument("--requests", type=int, default=20000, help="requests per round (at most 200000)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per guard (at most 30)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 200_000 or not 1 <= args.rounds <= 30:
        parser.error("bounded by design: --requests 1..200000, --rounds 1..30")
    guards = {f"reference {args.baseline_ref}": guard_of(reference_module(args.baseline_ref)),
              "this checkout": guard_of(request_guard)}
    bare = {"no guard (the app alone)": app}
    results: dict[str, list[float]] = {name: [] for name in [*bare, *guards]}
    for name, guard in {**bare, **guards}.items():
        cpu_per_request_us(guard, min(args.requests, 2000))  # warm-up
    for _ in range(args.rounds):
        for name, guard in {**bare, **guards}.items():
            results[name].append(cpu_per_request_us(guard, args.requests))
    print(f"### Request guard: CPU per bodyless request, {args.rounds} alternating rounds of {args.requests}\n")
    print(f"Machine: {machine_summary()}.\n")
    print("| code | median µs/request | min | max |\n|---|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
