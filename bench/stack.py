"""The stack a benchmark starts: the fake LLM process, the Twilio stand-in, the real gunicorn server, limits.

Everything listens on 127.0.0.1 and every wait has a deadline."""

from __future__ import annotations

import compileall
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gevent

from callweaver.simulate.twilio_rest import TwilioRequest, TwilioRestStandIn
from tests.fakes.live_server import LiveServer, stop_process


REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "tests" / "fixtures" / "workflows"
ACCOUNT_SID = "AC" + "b7" * 16
AUTH_TOKEN = "0123456789abcdef" * 2
PHONE = "+15005550006"
DEFAULT_TTFT_MS = 300.0
DEFAULT_TOKEN_INTERVAL_MS = 20.0
READY_TIMEOUT_S = 30.0
OPEN_FILES_WANTED = 65536




def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise RLIMIT_NOFILE (soft, up to hard) for this process and the servers it starts; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS from /proc/<pid>/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/<pid>/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def set_apparatus_nice(nice: int) -> int:
    """Run this process (the load generator) and the fake LLM it starts at `nice` (e.g. -10: ahead of the server,
    which BenchStack.server starts at 0), so a frame that has arrived is read when it arrives, not when a core
    comes free: on a small machine the callers and the LLM would otherwise queue behind the very worker they
    measure, and their delay would count as the server's. In production they run on other machines. Returns the
    nice value in effect (0 when this user may not raise priority)."""
    if not nice:
        return 0
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    except PermissionError:
        return 0
    return nice


def stop_on_sigterm() -> None:
    """SIGTERM becomes SystemExit in the main greenlet, so `with` blocks stop the servers this bench started."""
    main = gevent.getcurrent()

    def exit_main() -> None:
        main.throw(SystemExit(128 + signal.SIGTERM))

    gevent.signal_handler(signal.SIGTERM, exit_main)


class FakeLLMProcess:
    """`python -m bench.fake_llm_server` as a child process: the LLM gets its own interpreter and GIL."""

    def __init__(self, ttft_ms: float = DEFAULT_TTFT_MS, token_interval_ms: float = DEFAULT_TOKEN_INTERVAL_MS,
                 reply_text: str | None = None, log_path: Path | None = None):
        self.ttft_ms = ttft_ms
        self.token_interval_ms = token_interval_ms
        self.reply_text = reply_text
        self.log_path = log_path or Path(tempfile.gettempdir()) / "callweaver-bench-fake-llm.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.stats_port: int | None = None

    @property
    def url(self) -> str:
        """OpenAI-compatible base URL for OPENAI_BASE_URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeLLMProcess":
        command = [sys.executable, "-m", "bench.fake_llm_server", "--ttft-ms", str(self.ttft_ms),
                   "--token-interval-ms", str(self.token_interval_ms)]
        if self.reply_text is not None:
            command += ["--reply-text", self.reply_text]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True)
        with gevent.Timeout(READY_TIMEOUT_S, TimeoutError("fake LLM did not start")):
            line = self.proc.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"fake LLM exited early:\n{self.log_path.read_text()[-2000:]}")
        ready = json.loads(line)
        self.port, self.stats_port = ready["port"], ready["statsPort"]
        return self

    def stats(self) -> dict:
        """What the fake received so far (requests, streaming, finished, delivered TTFT)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def requests_since(self, index: int) -> list[dict]:
        """Per request from `index` on: the caller's last line and the TTFT the fake delivered (its own clock)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/requests?since={index}", timeout=30) as resp:
            return json.loads(resp.read())

    def loop_lags(self, start: float, end: float) -> list[float]:
        """How late (ms) the fake LLM process's lag probe woke between two time.monotonic() instants."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/loop-lag?start={start!r}&end={end!r}",
                                    timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if getattr(self, "_log", None):
            self._log.close()


def compile_sources(repo: Path) -> None:
    """The build step of render.yaml's buildCommand: the app's (and the baseline's) bytecode is compiled before the
    server starts, so a cold start does not compile sources (this machine sets PYTHONDONTWRITEBYTECODE)."""
    for name in ("callweaver", "bench"):
        compileall.compile_dir(str(repo / name), quiet=1)
    for name in ("wsgi.py", "gunicorn.conf.py"):
        compileall.compile_file(str(repo / name), quiet=1)


def server_env(data_dir: Path, llm_url: str, twilio_url: str, **overrides: str) -> dict[str, str]:
    """The service's environment for a bench: one gevent worker, the fake LLM as the only provider."""
    env = {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_PHONE_NUMBER": PHONE,
        "TWILIO_API_BASE_URL": twilio_url, "CALLWEAVER_DB": str(data_dir / "cw.sqlite3"),
        "CACHE_DIR": str(data_dir / "cache"), "LOG_LEVEL": "INFO", "SECRET_KEY": "bench-secret-key",
        "CACHE_PREWARM": "0", "LLM_PROVIDERS": "openai", "OPENAI_API_KEY": "sk-bench-0000",
        "OPENAI_BASE_URL": llm_url, "AZURE_OPENAI_API_KEY": "", "AZURE_OPENAI_ENDPOINT": "", "REDIS_URL": "",
        "GUNICORN_GRACEFUL_TIMEOUT": "5", "ALLOWED_DESTINATION_PREFIXES": "+1", "WORKER_CONNECTIONS": "5000",
        # the load generator is one client placing thousands of calls: lift the per-client limits
        "RATE_LIMIT_MAKE_CALL": "100000 per minute", "RATE_LIMIT_END_CALL": "100000 per minute",
        "MAX_CALLS_PER_DAY": "1000000",
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


class BenchStack:
    """The fake LLM (own process) and the Twilio REST stand-in (this process), shared by the servers a bench starts."""

    def __init__(self, name: str, ttft_ms: float = DEFAULT_TTFT_MS,
                 token_interval_ms: float = DEFAULT_TOKEN_INTERVAL_MS, reply_text: str | None = None,
                 apparatus_nice: int = 0):
        self.name = name
        self.apparatus_nice = apparatus_nice
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"callweaver-bench-{name}-"))
        self.llm = FakeLLMProcess(ttft_ms, token_interval_ms, reply_text, log_path=self.work_dir / "fake-llm.log")
        self.twilio = TwilioRestStandIn(ACCOUNT_SID, AUTH_TOKEN)
        self._runs = 0
        self.last_server_log: str = ""

    def __enter__(self) -> "BenchStack":
        raise_open_files_limit()
        stop_on_sigterm()
        self.apparatus_nice = set_apparatus_nice(self.apparatus_nice)
        self.llm.start()  # inherits this process's priority
        self.twilio.start()  # listens with a backlog of 1024, enough for the calls a bench places at once
        return self

    def __exit__(self, *exc_info) -> None:
        self.twilio.stop()
        self.llm.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    @contextmanager
    def server(self, workers: int = 1, repo: Path = REPO, naive: bool = False, wrap: list[str] | None = None,
               config: str | None = None, browser_origin: str | None = None,
               **env_overrides: str) -> Iterator[LiveServer]:
        """A fresh `gunicorn -c gunicorn.conf.py wsgi:app` (from `repo`) with its own database and cache directory,
        or with `naive` the baseline relay (bench/naive_relay.py) on the same gunicorn gevent worker class.
        `wrap` prefixes the server command with one that execs it (bench/relay.py's CPU-quota mode); `config`
        replaces the gunicorn config file (bench/idle_call_memory.py's probe); `browser_origin` also times the first
        cross-origin /health that origin's page may read (LiveServer)."""
        self._runs += 1
        compile_sources(repo)
        data_dir = self.work_dir / f"run{self._runs}"
        data_dir.mkdir()
        env = server_env(data_dir, self.llm.url, self.twilio.url, **env_overrides)
        if self.apparatus_nice:  # the server starts at nice 0 whatever the apparatus runs at
            wrap = ["nice", "-n", str(-self.apparatus_nice), *(wrap or [])]
        gunicorn_args = ["-c", config, "wsgi:app"] if config else None
        if naive:
            gunicorn_args = ["-c", config or "/dev/null", "-k", "gevent", "-w", str(workers), "--worker-connections", "5000",
                             "bench.naive_relay:app"]
        server = LiveServer(env, workers=workers, log_path=data_dir / "gunicorn.log", repo=repo,
                            gunicorn_args=gunicorn_args, wrap=wrap, browser_origin=browser_origin).start(timeout_s=120)
        try:
            yield server
        finally:
            server.stop()
            self.last_server_log = server.logs()

    def worker_pid(self, server: LiveServer) -> int:
        pids = server.worker_pids()
        if len(pids) != 1:
            raise RuntimeError(f"expected one gunicorn worker, found {pids}")
        return pids[0]

    def create_for(self, to: str) -> TwilioRequest:
        """The Twilio create the service sent for the newest call to `to` (each bench call has its own number): its
        `Url` for Twilio to fetch, or its TwiML inline (`RelayCaller.answer_placed`)."""
        for request in reversed(self.twilio.creates()):
            if request.one("To") == to:
                return request
        raise RuntimeError(f"no Twilio create for {to}")
