"""Cold start, sample by sample: a fresh `gunicorn -c gunicorn.conf.py wsgi:app` (one gevent worker), optionally under
a cgroup CPU quota as on Render's free plan, from process start to

- the first `GET /ping` 200 and the first `GET /health` 200 (Render's health check: no Origin),
- the first cross-origin `GET /health` 200 as the web app's browser sends it (`Origin: https://kimiya-ai.vercel.app`,
  a simple GET, no preflight) whose `Access-Control-Allow-Origin` lets the page read it,
- the app loaded (the worker's `app_loaded` line),

with the CPU the server's processes had used by the browser's 200 (master and worker, from /proc schedstat).
Each probe connects as soon as the port listens and then waits for its answer (no client timeout cuts a slow
answer short, and no retry adds its own delay). Each `--root` is a checkout (e.g. `git archive <commit> | tar -x -C
DIR`); the roots alternate run by run, so a reference runs in the same invocation.

    flock /work/bench.lock python -m bench.cold_start --cpu-quota 0.1 --runs 4 --root /tmp/ref --root .
    # as on Render: an interpreter whose environment holds requirements.txt only
    python -m venv /tmp/venv && /tmp/venv/bin/pip install -r requirements.txt
    flock /work/bench.lock python -m bench.cold_start --cpu-quota 0.1 --runs 4 --python /tmp/venv/bin/python
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from bench.relay import WEB_APP_ORIGIN, cpu_quota  # noqa: E402
from bench.report import machine_summary, markdown_table, percentile, progress  # noqa: E402
from bench.stack import compile_sources, server_env  # noqa: E402
from callweaver.boot import APP_LOADED  # noqa: E402
from callweaver.simulate.live_server import first_200, free_port, stop_process  # noqa: E402

UNUSED_URL = "http://127.0.0.1:9"  # the LLM and Twilio are never called during a cold start
PROBES = {
    "first /ping 200": ("/ping", {}),
    "first /health 200 (no Origin)": ("/health", {}),
    "first cross-origin /health 200 (the web app's)": ("/health", {"Origin": WEB_APP_ORIGIN}),
}
BROWSER = "first cross-origin /health 200 (the web app's)"
LOADED = "app loaded"
CPU_AT_BROWSER = ("gunicorn master's CPU by the browser's 200 (s)", "worker's CPU by the browser's 200 (s)")


@dataclass
class Sample:
    root: str
    seconds: dict[str, float | None] = field(default_factory=dict)
    cpu_s: tuple[float | None, float | None] = (None, None)  # master, worker(s)


def process_cpu_s(pid: int) -> float:
    """CPU time of one process, every thread (the worker's import thread too), from schedstat."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total_ns += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total_ns / 1e9


def server_cpu_s(pid: int) -> tuple[float, float]:
    """CPU time of gunicorn's master and of its workers together."""
    try:
        workers = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        workers = []
    return process_cpu_s(pid), sum(process_cpu_s(w) for w in workers)


def one_start(root: Path, wrap: list[str], data_dir: Path, timeout_s: float, python: str) -> Sample:
    port = free_port()
    env = {**server_env(data_dir, UNUSED_URL, UNUSED_URL), "PORT": str(port), "WEB_CONCURRENCY": "1",
           "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}"}
    log_path = data_dir / "gunicorn.log"
    sample = Sample(str(root))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*wrap, python, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
                                 "-c", "gunicorn.conf.py", "wsgi:app"], cwd=root, env={**os.environ, **env},
                                stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        deadline = started + timeout_s
        try:
            def probe(name: str) -> None:
                path, headers = PROBES[name]
                sample.seconds[name] = first_200(port, path, headers, started, deadline)
                if name == BROWSER and sample.seconds[name] is not None:
                    sample.cpu_s = server_cpu_s(proc.pid)

            probes = [gevent.spawn(probe, name) for name in PROBES]
            while time.monotonic() < deadline and APP_LOADED not in log_path.read_text():
                if proc.poll() is not None:
                    raise RuntimeError(f"gunicorn exited early:\n{log_path.read_text()[-3000:]}")
                gevent.sleep(0.02)
            sample.seconds[LOADED] = time.monotonic() - started if time.monotonic() < deadline else None
            gevent.joinall(probes, timeout=max(0.0, deadline - time.monotonic()))
        finally:
            stop_process(proc)
    return sample


def distributions(python: str) -> str:
    """How many distributions the server's interpreter sees (gevent's patch_all reads every one's entry points once
    per event it emits)."""
    try:
        return subprocess.run([python, "-c", "import importlib.metadata as m; print(len(list(m.distributions())))"],
                              capture_output=True, text=True, timeout=60).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def cells(values: list[float | None]) -> str:
    return " / ".join("—" if v is None else f"{v:.2f}" for v in values)


def summary(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "—"
    return f"{percentile(known, 50):.2f} ({min(known):.2f}–{max(known):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-quota", type=float, default=None, help="run the server under this many CPUs")
    parser.add_argument("--runs", type=int, default=3, help="starts per checkout")
    parser.add_argument("--root", action="append", default=[], help="a checkout to measure (repeatable; default .)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs gunicorn, e.g. a virtualenv holding only requirements.txt "
                             "(what Render installs) rather than this machine's every package")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="give up on a start after this")
    args = parser.parse_args(argv)
    roots = [Path(r).resolve() for r in (args.root or ["."])]
    for root in roots:
        compile_sources(root)  # render.yaml's build step
    samples: dict[Path, list[Sample]] = {root: [] for root in roots}
    with tempfile.TemporaryDirectory(prefix="callweaver-cold-start-") as tmp, cpu_quota(args.cpu_quota) as wrap:
        for run in range(args.runs):
            for root in roots:  # alternating, so each checkout sees the same machine state
                data_dir = Path(tmp) / f"{root.name}-{run}"
                data_dir.mkdir()
                progress(f"{root}: start {run + 1} of {args.runs}" + (f", {args.cpu_quota} CPU" if wrap else ""))
                samples[root].append(one_start(root, wrap, data_dir, args.timeout_s, args.python))
    quota = f", {args.cpu_quota} CPU quota" if args.cpu_quota else ""
    print(f"### Cold start: process → first answers, 1 gevent worker{quota}, {args.runs} starts per checkout\n")
    print(f"{machine_summary()}; server interpreter {args.python} ({distributions(args.python)} installed "
          f"distributions, whose entry points gevent's monkey-patching reads). "
          f"Command: `python -m bench.cold_start {' '.join(argv or sys.argv[1:])}`\n")
    names = [*PROBES, LOADED]
    rows = []
    for root, runs in samples.items():
        for name in names:
            values = [s.seconds.get(name) for s in runs]
            rows.append([str(root), f"process → {name} (s)", cells(values), summary(values)])
        for i, name in enumerate(CPU_AT_BROWSER):
            cpu = [s.cpu_s[i] for s in runs]
            rows.append([str(root), name, cells(cpu), summary(cpu)])
    print(markdown_table(["checkout", "measure", "each start, in order", "median (min–max)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
