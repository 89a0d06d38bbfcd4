"""Runs the real production server (`gunicorn -c gunicorn.conf.py wsgi:app`, gevent workers) on a loopback port.

Used by the offline demo and by the tests; it needs the repository checkout (gunicorn.conf.py, wsgi.py)."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from callweaver.boot import APP_LOADED

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GUNICORN_ARGS = ["-c", "gunicorn.conf.py", "wsgi:app"]


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 15) -> None:
    """SIGTERM, wait, then SIGKILL: how every server process started for tests or benchmarks is stopped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_200(port: int, path: str, headers: dict[str, str], started: float, deadline: float) -> float | None:
    """Seconds from `started` (time.monotonic) to this request's first 200 that its sender may read (with an Origin:
    whose Access-Control-Allow-Origin lets that page read it). It connects as soon as the port listens and then
    waits for the answer however long the start takes: no client timeout cuts a slow answer short."""
    origin = headers.get("Origin")
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(0.1, deadline - time.monotonic()))
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            readable = origin is None or resp.getheader("Access-Control-Allow-Origin") in (origin, "*")
            if resp.status == 200 and readable:
                return time.monotonic() - started
            time.sleep(0.05)
        except ConnectionRefusedError:
            time.sleep(0.005)  # not listening yet
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()
    return None


class LiveServer:
    def __init__(self, env: dict[str, str], workers: int | None = None, log_path: Path | None = None,
                 repo: Path = REPO, port: int | None = None, gunicorn_args: list[str] | None = None,
                 wrap: list[str] | None = None, browser_origin: str | None = None):
        """`workers` (else the env's WEB_CONCURRENCY, else 2) gevent workers; start() waits until all run.
        `gunicorn_args` replaces `-c gunicorn.conf.py wsgi:app` (the benches start a baseline app that way);
        `wrap` prefixes the command with one that execs it (the benches' CPU-quota mode); with `browser_origin`,
        start() also times the first cross-origin `GET /health` a page of that origin may read (browser_ready_s)."""
        self.repo = repo  # another checkout (a benchmark's baseline) runs its own code with this interpreter
        self.browser_origin = browser_origin
        self.wrap = wrap or []
        self.gunicorn_args = gunicorn_args or DEFAULT_GUNICORN_ARGS
        self.port = port or free_port()
        workers = workers or int(env.get("WEB_CONCURRENCY") or 2)
        self.workers = workers
        self.env = {**os.environ, **env, "PORT": str(self.port), "WEB_CONCURRENCY": str(workers),
                    "PUBLIC_BASE_URL": env.get("PUBLIC_BASE_URL", f"http://127.0.0.1:{self.port}")}
        self.log_path = log_path or Path(f"/tmp/callweaver-live-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "LiveServer":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", *self.gunicorn_args],
            cwd=self.repo, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()
        self.ready_s: float | None = None  # process start → first /ping 200 with every worker up
        self.loaded_s: float | None = None  # process start → every worker's app loaded (it logged app_loaded)
        self.browser_ready_s: float | None = None  # process start → first cross-origin /health 200 (browser_origin)
        deadline = self.started_at + timeout_s
        self._browser_probe = None
        if self.browser_origin:
            self._browser_probe = threading.Thread(target=self._probe_browser, args=(deadline,), daemon=True)
            self._browser_probe.start()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                # Once the port listens, the answer is awaited however slow the start (a CPU quota): a client
                # timeout would cut a slow first answer short and add its own retry delay to ready_s.
                with urllib.request.urlopen(self.url + "/ping", timeout=max(1.0, deadline - time.monotonic())) as r:
                    if r.status == 200 and len(self.worker_pids()) >= self.workers:
                        self.ready_s = time.monotonic() - self.started_at
                        return self._wait_until_loaded(deadline)
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer in {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")

    def _wait_until_loaded(self, deadline: float) -> "LiveServer":
        """Each worker answers /ping and /health while its app loads (callweaver/boot.py); callers expect the app
        itself, so wait until every worker has logged that it is loaded (a baseline app given by gunicorn_args
        loads before it listens)."""
        if DEFAULT_GUNICORN_ARGS[-1] not in self.gunicorn_args:
            self.loaded_s = self.ready_s
            return self
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log_path.read_text()[-3000:]}")
            if self.logs().count(APP_LOADED) >= self.workers:
                self.loaded_s = time.monotonic() - self.started_at
                if self._browser_probe is not None:
                    self._browser_probe.join(max(0.0, deadline - time.monotonic()))
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn's app did not load in time:\n{self.log_path.read_text()[-3000:]}")

    def _probe_browser(self, deadline: float) -> None:
        self.browser_ready_s = first_200(self.port, "/health", {"Origin": self.browser_origin}, self.started_at,
                                         deadline)

    def worker_pids(self) -> list[int]:
        if not self.proc:
            return []
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        return [int(p) for p in children]

    def worker_serving(self, client_port: int) -> int | None:
        """The worker pid holding the server end of the TCP connection from `client_port` (via /proc)."""
        wanted = None
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                cols = line.split()
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                if local_port == self.port and remote_port == client_port:
                    wanted = f"socket:[{cols[9]}]"
        if wanted is None:
            return None
        for pid in self.worker_pids():
            fd_dir = Path(f"/proc/{pid}/fd")
            try:
                for fd in fd_dir.iterdir():
                    try:
                        if os.readlink(fd) == wanted:
                            return pid
                    except OSError:
                        continue
            except OSError:
                continue
        return None

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
