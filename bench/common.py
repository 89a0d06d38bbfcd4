"""Shared benchmark harness: fake LLM process, real gunicorn server, scripted Twilio callers, percentiles, tables.

Import this only after `gevent.monkey.patch_all()` (the bench modules do that first): the load generator runs
hundreds of callers as greenlets. Everything listens on 127.0.0.1 and every wait has a deadline.
"""
import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gevent
import gevent.pool

from callweaver.engine.metrics import nearest_rank as percentile  # noqa: F401  (the benches import it from here)
from callweaver.simulate.caller import RelayCaller, RelayTwiml
from callweaver.simulate.twilio_rest import TwilioRestStandIn
from callweaver.simulate.webhooks import TwilioWebhooks, http, new_call_sid
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

# Words for utterances that can never repeat across calls or turns (so they miss the reply cache).
TOPIC_WORDS = ("garden", "river", "school", "station", "harbour", "museum", "library", "stadium", "orchard",
               "bakery", "canal", "meadow", "quarry", "lighthouse", "vineyard", "airport", "market", "chapel",
               "terrace", "bridge", "forest", "plaza", "pier", "workshop")


# ---------------------------------------------------------------------------------------------- numbers

def describe(exc: BaseException) -> str:
    """An error kind for the tables: the exception type and the start of its message."""
    text = str(exc).splitlines()[0][:90] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fmt_ms(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are str()-ed as given."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(message: str) -> None:
    """Progress goes to stderr so stdout holds only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_summary() -> str:
    """Date, CPU count and model, Python version: the context every table needs."""
    import platform
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs ({model or platform.machine()}), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


# ---------------------------------------------------------------------------------------------- processes

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

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if getattr(self, "_log", None):
            self._log.close()


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
                 token_interval_ms: float = DEFAULT_TOKEN_INTERVAL_MS, reply_text: str | None = None):
        self.name = name
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"callweaver-bench-{name}-"))
        self.llm = FakeLLMProcess(ttft_ms, token_interval_ms, reply_text, log_path=self.work_dir / "fake-llm.log")
        self.twilio = TwilioRestStandIn(ACCOUNT_SID, AUTH_TOKEN)
        self._runs = 0
        self.last_server_log: str = ""

    def __enter__(self) -> "BenchStack":
        raise_open_files_limit()
        stop_on_sigterm()
        self.llm.start()
        self.twilio.start()  # listens with a backlog of 1024, enough for the calls a bench places at once
        return self

    def __exit__(self, *exc_info) -> None:
        self.twilio.stop()
        self.llm.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    @contextmanager
    def server(self, workers: int = 1, repo: Path = REPO, naive: bool = False, wrap: list[str] | None = None,
               **env_overrides: str) -> Iterator[LiveServer]:
        """A fresh `gunicorn -c gunicorn.conf.py wsgi:app` (from `repo`) with its own database and cache directory,
        or with `naive` the baseline relay (bench/naive_relay.py) on the same gunicorn gevent worker class.
        `wrap` prefixes the server command with one that execs it (bench/relay.py's CPU-quota mode)."""
        self._runs += 1
        data_dir = self.work_dir / f"run{self._runs}"
        data_dir.mkdir()
        env = server_env(data_dir, self.llm.url, self.twilio.url, **env_overrides)
        gunicorn_args = None
        if naive:
            gunicorn_args = ["-c", "/dev/null", "-k", "gevent", "-w", str(workers), "--worker-connections", "5000",
                             "bench.naive_relay:app"]
        server = LiveServer(env, workers=workers, log_path=data_dir / "gunicorn.log", repo=repo,
                            gunicorn_args=gunicorn_args, wrap=wrap).start(timeout_s=120)
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

    def twiml_url_for(self, to: str) -> str:
        """The TwiML URL the service gave Twilio for the newest call to `to` (each bench call has its own number)."""
        for request in reversed(self.twilio.creates()):
            if request.one("To") == to:
                return request.one("Url")
        raise RuntimeError(f"no Twilio create for {to}")


# ---------------------------------------------------------------------------------------------- calls

def add_load_options(parser: argparse.ArgumentParser, *, stagger_s: float, seed: int,
                     server_env_example: str = "CACHE_TYPE=NullCache") -> None:
    """Options every load benchmark shares: call pacing, the fake LLM's speed, server environment, seed."""
    parser.add_argument("--stagger-s", type=float, default=stagger_s, help="calls start within this many seconds")
    parser.add_argument("--think-min-s", type=float, default=1.0, help="shortest pause after a reply")
    parser.add_argument("--think-max-s", type=float, default=2.0, help="longest pause after a reply")
    parser.add_argument("--ttft-ms", type=float, default=DEFAULT_TTFT_MS, help="fake LLM time to first token")
    parser.add_argument("--token-interval-ms", type=float, default=DEFAULT_TOKEN_INTERVAL_MS,
                        help="fake LLM ms per token")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help=f"extra environment for the server (repeatable), e.g. {server_env_example}")
    parser.add_argument("--seed", type=int, default=seed)


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    """`--server-env KEY=VALUE` options → a dict (e.g. CACHE_TYPE=NullCache to measure without the cache)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--server-env wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def call_body(to: str, workflow: str | None = "real_estate_property_dealer") -> dict:
    """A make-call body in the web app's shape (contract.md §2)."""
    body: dict[str, Any] = {"to": to, "from": PHONE, "record": False, "timeout": 30}
    if workflow:
        wf = load_workflow(workflow)
        start = next(n for n in wf["nodes"] if n["type"] == "startNode")
        body.update(workflowId="wf_" + workflow, nodes=wf["nodes"], edges=wf["edges"],
                    globalPrompt=start["data"].get("globalPrompt", ""), config=wf["config"],
                    variables=wf.get("variables", []))
    return body


def destination(index: int, run: int = 0) -> str:
    """A distinct US number per call, so each call's Twilio create can be found by its `To`."""
    return f"+1555{run % 10}{index:06d}"


def unique_utterance(rng: random.Random, call_index: int, turn_index: int) -> str:
    """A caller line that never repeats (turn number plus random words), so it always misses the cache."""
    first, second = rng.sample(TOPIC_WORDS, 2)
    return f"Turn {turn_index + 1} of caller {call_index}: is there a place near the {first} or the {second}?"


@dataclass
class TurnSample:
    """One turn as the caller saw it (client clock: time.monotonic in the load generator)."""

    utterance: str
    first_token_ms: float | None
    last_token_ms: float | None
    text: str
    ended: bool = False
    sent_at: float = 0.0  # time.monotonic() when the prompt was sent (CLOCK_MONOTONIC: comparable across processes)


class RelayCall:
    """An optimized call: make-call-optimized, the TwiML webhook, then the ConversationRelay socket."""

    def __init__(self, stack: BenchStack, base_url: str, to: str, workflow: str | None, timeout_s: float = 20.0):
        self.stack, self.to, self.workflow = stack, to, workflow
        self.caller = RelayCaller(base_url, AUTH_TOKEN, ACCOUNT_SID, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.samples: list[TurnSample] = []

    @property
    def tracking_id(self) -> str | None:
        return self.caller.tracking_id

    def place(self) -> None:
        self.caller.place_call(call_body(self.to, self.workflow))

    def answer_and_connect(self) -> None:
        self.caller.answer(self.stack.twiml_url_for(self.to))
        self.caller.connect()

    def set_up(self) -> None:
        self.place()
        self.answer_and_connect()

    def say(self, utterance: str) -> TurnSample:
        """Speak one final transcript and read the streamed reply up to `last: true` (or an `end`)."""
        sent = self.caller.prompt(utterance)
        deadline = sent + self.timeout_s
        first_ms = None
        tokens: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete reply within {self.timeout_s}s")
            message = self.caller.recv(timeout_s=remaining)
            now = time.monotonic()
            if message is None:
                raise TimeoutError(f"no complete reply within {self.timeout_s}s")
            kind = message.get("type")
            if kind == "end":
                return TurnSample(utterance, first_ms, (now - sent) * 1000, "".join(tokens), ended=True)
            if kind != "text":
                continue
            if message.get("token"):
                tokens.append(message["token"])
                if first_ms is None:
                    first_ms = (now - sent) * 1000
            if message.get("last"):
                sample = TurnSample(utterance, first_ms, (now - sent) * 1000, "".join(tokens), sent_at=sent)
                self.samples.append(sample)
                return sample

    def hang_up(self) -> None:
        try:
            self.caller.hangup()
        except Exception:
            pass


class NaiveCall(RelayCall):
    """A call to the naive baseline relay: no make-call, no TwiML, no signature; just the socket and `setup`."""

    def place(self) -> None:
        pass

    def answer_and_connect(self) -> None:
        ws_url = self.caller.base_url.replace("http://", "ws://", 1) + "/ws"
        self.caller.twiml = RelayTwiml.parse(
            f'<Response><Connect action=""><ConversationRelay url="{ws_url}"/></Connect></Response>')
        self.caller.connect(sign=False)


class GatherCall:
    """A traditional call: make-call, the TwiML webhook, then signed <Gather> action posts with SpeechResult."""

    def __init__(self, stack: BenchStack, base_url: str, to: str, workflow: str | None, timeout_s: float = 20.0):
        self.stack, self.to, self.workflow, self.base_url = stack, to, workflow, base_url
        self.hooks = TwilioWebhooks(base_url, AUTH_TOKEN, ACCOUNT_SID)
        self.timeout_s = timeout_s
        self.call_sid: str | None = None
        self.tracking_id: str | None = None
        self.action: str | None = None
        self.samples: list[TurnSample] = []

    def _params(self, **extra: str) -> dict[str, str]:
        return {"AccountSid": ACCOUNT_SID, "CallSid": self.call_sid or new_call_sid(), "From": PHONE,
                "To": self.to, "Direction": "outbound-api", "ApiVersion": "2010-04-01", **extra}

    def _next_action(self, xml: str) -> str | None:
        gather = ET.fromstring(xml).find("Gather")
        return gather.get("action") if gather is not None else None

    def set_up(self) -> None:
        resp = http("POST", self.base_url + "/api/make-call", json_body=call_body(self.to, self.workflow),
                    timeout_s=self.timeout_s)
        data = resp.json()
        if resp.status != 200:
            raise RuntimeError(f"make-call failed ({resp.status}): {data.get('error')}")
        self.call_sid, self.tracking_id = data["callSid"], data.get("trackingId")
        answer = self.hooks.post(self.stack.twiml_url_for(self.to), self._params(CallStatus="in-progress"))
        if answer.status != 200:
            raise RuntimeError(f"twiml-ai failed ({answer.status})")
        self.action = self._next_action(answer.text)
        if not self.action:
            raise RuntimeError("no <Gather action> in the greeting TwiML")

    def say(self, utterance: str) -> TurnSample:
        """Post the speech result; the reply exists only once the whole TwiML response has arrived."""
        sent = time.monotonic()
        resp = self.hooks.post(self.action, self._params(SpeechResult=utterance, Confidence="0.93"))
        elapsed_ms = (time.monotonic() - sent) * 1000
        if resp.status != 200:
            raise RuntimeError(f"Gather action failed ({resp.status})")
        root = ET.fromstring(resp.text)
        spoken = " ".join((s.text or "") for s in root.iter("Say"))
        self.action = self._next_action(resp.text) or self.action
        sample = TurnSample(utterance, elapsed_ms, elapsed_ms, spoken, ended=root.find("Gather") is None)
        if not sample.ended:
            self.samples.append(sample)
        return sample

    def hang_up(self) -> None:
        pass


def cache_backend(base_url: str) -> str:
    """The reply cache's backend as the worker reports it (GET /api/health-optimized), e.g. "SimpleCache"."""
    resp = http("GET", f"{base_url}/api/health-optimized", timeout_s=30)
    try:
        return str(resp.json()["services"]["cache"]["backend"])
    except (KeyError, TypeError, ValueError):
        return "unknown"


def fetch_turns(base_url: str, tracking_ids: list[str], concurrency: int = 20) -> dict[str, list[dict]]:
    """Server-measured turns per call from GET /api/performance-metrics/<trackingId> (callData.turns)."""
    out: dict[str, list[dict]] = {}

    def one(tracking_id: str) -> None:
        resp = http("GET", f"{base_url}/api/performance-metrics/{tracking_id}", timeout_s=30)
        out[tracking_id] = resp.json()["callData"]["turns"] if resp.status == 200 else []

    pool = gevent.pool.Pool(concurrency)
    for tracking_id in tracking_ids:
        pool.spawn(one, tracking_id)
    pool.join(timeout=120)
    pool.kill()
    return out


def server_added_ms(turn: dict) -> float | None:
    """Our overhead on an LLM turn, from the server's own clock: firstTokenMs − providerTtftMs."""
    if turn.get("source") != "llm" or turn.get("firstTokenMs") is None or turn.get("providerTtftMs") is None:
        return None
    return turn["firstTokenMs"] - turn["providerTtftMs"]


def converse(calls: list, scripts: list[list[str]], *, rng: random.Random, stagger_s: float,
             think_s: tuple[float, float], deadline: float, errors: dict[str, int],
             before_first_turn: Callable[[Any], None] | None = None) -> float:
    """Every call talks at once: it starts at a random offset within `stagger_s`, optionally runs
    `before_first_turn` (e.g. place the call, let it ring, answer), then says its script, pausing `think_s`
    between turns. Stops at `deadline` (still-running calls are killed); returns the seconds it took.
    Turns land in each call's `samples`; failures are counted in `errors` by kind."""

    def count(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    plans = [(call, script, rng.uniform(0, stagger_s), [rng.uniform(*think_s) for _ in script])
             for call, script in zip(calls, scripts)]

    def talk(call: Any, script: list[str], offset_s: float, pauses_s: list[float]) -> None:
        gevent.sleep(offset_s)
        if before_first_turn is not None:
            try:
                before_first_turn(call)
            except Exception as exc:
                count(f"setup: {describe(exc)}")
                return
        for index, utterance in enumerate(script):
            if time.monotonic() > deadline:
                count("turn: bench time limit")
                return
            try:
                sample = call.say(utterance)
            except Exception as exc:
                count(f"turn: {describe(exc)}")
                return
            if sample.ended:
                count("turn: call ended unexpectedly")
                return
            if index < len(script) - 1:
                gevent.sleep(pauses_s[index])

    started = time.monotonic()
    talkers = [gevent.spawn(talk, *plan) for plan in plans]
    gevent.joinall(talkers, timeout=max(1.0, deadline - time.monotonic()))
    unfinished = [g for g in talkers if not g.dead]
    if unfinished:
        errors["turn: still talking at the bench time limit"] = len(unfinished)
        gevent.killall(unfinished, timeout=5)
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------- relay load

@dataclass
class RelayLoadResult:
    """Everything one relay load run measured; the benches turn it into tables."""

    calls: int
    turns_per_call: int
    calls_connected: int = 0
    turns_completed: int = 0
    turns_stored: int = 0
    llm_turns: int = 0
    apology_turns: int = 0
    failover_turns: int = 0
    setup_s: float = 0.0
    talk_s: float = 0.0
    rss_before_kib: int = 0
    rss_connected_kib: int = 0
    server_added_ms: list[float] = field(default_factory=list)
    server_first_token_ms: list[float] = field(default_factory=list)
    provider_ttft_ms: list[float] = field(default_factory=list)
    client_first_token_ms: list[float] = field(default_factory=list)
    # Paired per turn with the fake LLM's own record of the same request (matched by the unique caller line):
    server_minus_delivered_ms: list[float] = field(default_factory=list)
    client_minus_delivered_ms: list[float] = field(default_factory=list)
    # The same overhead split in two legs on the machine-wide monotonic clock:
    to_llm_ms: list[float] = field(default_factory=list)    # caller sends prompt → fake LLM has read the request
    from_llm_ms: list[float] = field(default_factory=list)  # fake LLM writes first token → caller reads it
    errors: dict[str, int] = field(default_factory=dict)
    llm_stats: dict = field(default_factory=dict)
    # CPU seconds used during the talk phase, per process: "worker", "fake LLM", "load generator".
    talk_cpu_s: dict[str, float] = field(default_factory=dict)
    cache_backend: str = ""  # the reply cache's backend as the worker reported it
    setup_cpu_ms_per_call: float | None = None  # worker CPU while all calls were set up (none talking) ÷ calls

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def memory_per_call_kib(self) -> float | None:
        if not self.calls_connected or not self.rss_connected_kib:  # arrival mode: never all idle at once
            return None
        return (self.rss_connected_kib - self.rss_before_kib) / self.calls_connected

    @property
    def turns_per_s(self) -> float | None:
        return self.turns_completed / self.talk_s if self.talk_s > 0 else None

    def core_share(self, process: str) -> float | None:
        """CPU used during the talk phase as a fraction of one core (1.0 = one core busy all the time)."""
        if self.talk_s <= 0 or process not in self.talk_cpu_s:
            return None
        return self.talk_cpu_s[process] / self.talk_s

    @property
    def worker_cpu_ms_per_turn(self) -> float | None:
        if not self.turns_completed or "worker" not in self.talk_cpu_s:
            return None
        return self.talk_cpu_s["worker"] * 1000 / self.turns_completed


def naive_first_tokens(base_url: str) -> dict[str, float]:
    """The naive relay's server-side first tokens: caller line → ms from prompt received to first token sent
    (the union over its workers)."""
    out: dict[str, float] = {}
    for _ in range(12):  # each worker keeps its own list: new connections land on every worker sooner or later
        resp = http("GET", f"{base_url}/turns", timeout_s=60)
        out.update((row["lastUser"], row["firstTokenMs"]) for row in resp.json())
    return out


def run_relay_load(stack: BenchStack, server: LiveServer, *, calls: int, turns: int, stagger_s: float,
                   think_s: tuple[float, float], seed: int, workflow: str | None = "real_estate_property_dealer",
                   setup_concurrency: int = 25, time_limit_s: float = 180.0,
                   run_index: int = 0, naive: bool = False, arrival: bool = False) -> RelayLoadResult:
    """N concurrent optimized calls talking `turns` cache-missing turns each; bounded in count and in time.

    1. warm-up call (one turn) so one-time costs (first upstream connection, lazy imports) are not per-call memory;
    2. RSS of the worker; 3. set up all N calls (socket open, `setup` sent) and let them sit idle; 4. RSS again;
    5. each call starts talking at a random offset within `stagger_s`, pausing `think_s` between turns;
    6. hang up all, then read every call's server-measured turns from the per-call metrics endpoint.
    With `arrival`, step 3 is skipped: each call is placed (make-call, TwiML, signed socket) at its offset,
    while the earlier calls already talk. With `naive` the server is bench/naive_relay.py (no set-up at all).
    """
    rng = random.Random(seed)
    result = RelayLoadResult(calls=calls, turns_per_call=turns)
    base_url = server.url
    pids = server.worker_pids()
    pid = pids[0]
    started = time.monotonic()
    hard_deadline = started + time_limit_s
    call_class = NaiveCall if naive else RelayCall

    for worker_index in range(len(pids)):  # one warm-up call per worker, as far as the kernel spreads them
        warm = call_class(stack, base_url, destination(999_999 - worker_index - 10 * run_index, run_index), workflow)
        warm.set_up()
        warm.say(f"Warm-up turn {worker_index} before the measured calls start.")
        warm.hang_up()
    result.cache_backend = "none (naive relay)" if naive else cache_backend(base_url)
    gevent.sleep(1.0)
    result.rss_before_kib = sum(rss_kib(p) for p in pids)
    llm_before = stack.llm.stats()

    live = [call_class(stack, base_url, destination(i, run_index), workflow) for i in range(calls)]
    connected: list[RelayCall] = []

    def set_up(call: RelayCall) -> None:
        try:
            call.set_up()
            connected.append(call)
        except Exception as exc:
            result.error(f"setup: {describe(exc)}")

    processes = {"worker": pids, "fake LLM": [stack.llm.proc.pid], "load generator": [os.getpid()]}

    def cpu_now() -> dict[str, float]:
        return {name: sum(cpu_s(p) for p in group) for name, group in processes.items()}

    if not arrival:
        cpu_setup_before = cpu_now()["worker"]
        t0 = time.monotonic()
        pool = gevent.pool.Pool(setup_concurrency)
        for call in live:
            pool.spawn(set_up, call)
        pool.join(timeout=max(5.0, hard_deadline - time.monotonic()))
        pool.kill()
        result.setup_s = time.monotonic() - t0
        result.calls_connected = len(connected)
        gevent.sleep(1.5)  # let the worker finish reading every `setup` message before measuring
        if connected:
            result.setup_cpu_ms_per_call = (cpu_now()["worker"] - cpu_setup_before) * 1000 / len(connected)
        result.rss_connected_kib = sum(rss_kib(p) for p in pids)
        progress(f"{len(connected)}/{calls} calls connected in {result.setup_s:.1f}s; "
                 f"worker RSS {result.rss_before_kib} → {result.rss_connected_kib} KiB")
        talkers = connected
    else:
        talkers = live

    scripts = [[unique_utterance(rng, i, t) for t in range(turns)] for i in range(len(talkers))]
    cpu_before = cpu_now()
    result.talk_s = converse(talkers, scripts, rng=rng, stagger_s=stagger_s, think_s=think_s,
                             deadline=hard_deadline, errors=result.errors,
                             before_first_turn=(lambda call: call.set_up()) if arrival else None)
    cpu_after = cpu_now()
    result.talk_cpu_s = {name: cpu_after[name] - cpu_before[name] for name in processes}
    if arrival:
        connected = [call for call in live if call.caller.ws is not None]
        result.calls_connected = len(connected)
    result.turns_completed = sum(len(call.samples) for call in connected)
    result.client_first_token_ms = [s.first_token_ms for call in connected for s in call.samples
                                    if s.first_token_ms is not None]
    for call in connected:
        call.hang_up()
    gevent.sleep(1.0)  # sessions commit interrupted turns on close; let them land before reading
    result.llm_stats = {"before": llm_before, "after": stack.llm.stats()}

    delivered = {r["lastUser"]: r for r in stack.llm.requests_since(llm_before["requests"])
                 if r["stream"] and r["ttftMs"] is not None}
    server_first: dict[str, float] = {}  # caller line → server-side ms from prompt received to first token sent
    if naive:
        server_first = naive_first_tokens(base_url)
        result.turns_stored = result.llm_turns = len([u for call in connected for u in
                                                      (s.utterance for s in call.samples) if u in server_first])
        result.server_first_token_ms = [server_first[s.utterance] for call in connected for s in call.samples
                                        if s.utterance in server_first]
    else:
        stored = fetch_turns(base_url, [c.tracking_id for c in connected if c.tracking_id])
        for call in connected:
            server_turns = stored.get(call.tracking_id or "", [])
            if len(server_turns) != len(call.samples):
                continue  # a turn cut off by the time limit: pairing by position would be wrong
            for sample, turn in zip(call.samples, server_turns):
                if turn.get("source") == "llm" and turn.get("firstTokenMs") is not None:
                    server_first[sample.utterance] = turn["firstTokenMs"]
        for turns_of_call in stored.values():
            for turn in turns_of_call:
                result.turns_stored += 1
                if turn.get("source") == "apology":
                    result.apology_turns += 1
                if turn.get("failovers"):
                    result.failover_turns += 1
                if turn.get("firstTokenMs") is not None:
                    result.server_first_token_ms.append(turn["firstTokenMs"])
                if turn.get("providerTtftMs") is not None:
                    result.provider_ttft_ms.append(turn["providerTtftMs"])
                added = server_added_ms(turn)
                if added is not None:
                    result.llm_turns += 1
                    result.server_added_ms.append(added)
    for call in connected:
        for sample in call.samples:
            fake = delivered.get(sample.utterance)
            if fake is None:
                continue
            if sample.utterance in server_first:
                result.server_minus_delivered_ms.append(server_first[sample.utterance] - fake["ttftMs"])
            if sample.first_token_ms is not None:
                result.client_minus_delivered_ms.append(sample.first_token_ms - fake["ttftMs"])
                result.to_llm_ms.append((fake["receivedAt"] - sample.sent_at) * 1000)
                first_token_at = sample.sent_at + sample.first_token_ms / 1000
                result.from_llm_ms.append((first_token_at - fake["firstTokenAt"]) * 1000)
    if result.apology_turns:
        result.errors["server: apology turns (every provider failed)"] = result.apology_turns
    if result.failover_turns:
        result.errors["server: turns with a provider failover"] = result.failover_turns
    missing = result.turns_completed - result.turns_stored
    if missing > 0:
        result.errors["server: turns not stored"] = missing
    return result


def client_added_ms(result: RelayLoadResult, ttft_ms: float) -> list[float]:
    """Cross-check from the caller's side: first token seen minus the fake LLM's configured TTFT."""
    return [value - ttft_ms for value in result.client_first_token_ms]


def distribution_cells(values: list[float]) -> list[str]:
    return [fmt_ms(percentile(values, 50)), fmt_ms(percentile(values, 95)), fmt_ms(percentile(values, 99))]
