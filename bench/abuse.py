"""Abuse benchmark: /health latency while the real server is attacked, this checkout next to a baseline checkout.

Three attacks, each against a fresh `gunicorn -c gunicorn.conf.py wsgi:app` on 127.0.0.1 and bounded in time:
- slow bodies: N connections each declare a 1 MB JSON body on POST /api/chat and send one byte every few
  seconds; a connection the server answers or closes is reopened at its next tick, so each of the N attackers
  keeps one connection going for the whole window at one network action per tick (slow, not a flood);
- socket replay: one captured signed ConversationRelay upgrade (URL + X-Twilio-Signature of a live call)
  replayed N times; every socket that opens is held open, silent, until the window ends;
- slow reads: N connections each with a small receive buffer pipeline `--pipelined` GETs of a public static file
  (~50 KB) and never read the answers; each tick a connection sends one more request, and one the server has
  closed (the send fails) is reopened at the next tick.
During each window a probe opens a new connection every `--probe-interval-s` and times GET /health to the last
byte. The attackers use source address 127.0.0.2 (all of 127/8 is loopback on Linux), the probe 127.0.0.1, as an
attacker and a health checker would be two clients. The baseline is the original code (`git archive` of
`--baseline-ref` into a temporary directory, or `--baseline-dir`), run with the same interpreter and settings.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all)
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

from bench.common import (REPO, BenchStack, call_body, describe, destination, fmt_ms, machine_summary,  # noqa: E402
                          markdown_table, parse_env_pairs, percentile, progress)
from callweaver.simulate.caller import RelayCaller  # noqa: E402
from callweaver.simulate.webhooks import twilio_signature  # noqa: E402
from bench.common import ACCOUNT_SID, AUTH_TOKEN  # noqa: E402

TARGET_P99_MS = 100.0
BASELINE_REF = "f8d780c"
ATTACKER_ADDRESS = "127.0.0.2"
PROBE_ADDRESS = "127.0.0.1"


@dataclass
class Probes:
    """GET /health timings (ms) during one window; a probe with no answer within the timeout is a failure."""

    timeout_s: float
    latencies_ms: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    def cells(self) -> list[str]:
        total = len(self.latencies_ms) + sum(self.failures.values())
        # A failed probe counts as slower than any answer, so p99 shows it as "no answer" once failures pass 1 %.
        ordered = sorted(self.latencies_ms) + [float("inf")] * sum(self.failures.values())
        p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
        return [str(total), str(sum(self.failures.values())), _ms(p50, self.timeout_s), _ms(p99, self.timeout_s)]


def _ms(value: float | None, timeout_s: float) -> str:
    if value is None:
        return "—"
    return f"no answer in {timeout_s:g} s" if value == float("inf") else fmt_ms(value)


def probe_health(port: int, probes: Probes, until: float, interval_s: float) -> None:
    """One new connection per probe (as a load balancer's health check), timed to the response's last byte."""
    request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            with gevent.Timeout(probes.timeout_s, TimeoutError("timeout")):
                with socket.create_connection(("127.0.0.1", port), source_address=(PROBE_ADDRESS, 0)) as sock:
                    sock.sendall(request)
                    response = b""
                    while chunk := sock.recv(65536):
                        response += chunk
            if not response.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"status {response[:12]!r}")
            probes.latencies_ms.append((time.monotonic() - started) * 1000)
        except BaseException as exc:  # gevent.Timeout is a BaseException
            kind = describe(exc)
            probes.failures[kind] = probes.failures.get(kind, 0) + 1
        gevent.sleep(max(0.0, interval_s - (time.monotonic() - started)))


@dataclass
class AttackStats:
    opened: int = 0
    answers: dict[str, int] = field(default_factory=dict)   # first line of each server answer (or close code)
    errors: dict[str, int] = field(default_factory=dict)

    def count(self, bucket: dict[str, int], key: str) -> None:
        bucket[key] = bucket.get(key, 0) + 1

    def outcome(self) -> str:
        parts = [f"{self.opened} opened"]
        parts += [f"{n}× {k}" for k, n in sorted(self.answers.items(), key=lambda kv: -kv[1])]
        parts += [f"{n}× {k}" for k, n in sorted(self.errors.items(), key=lambda kv: -kv[1])]
        return "; ".join(parts)


def slow_body_connection(port: int, until: float, byte_interval_s: float, declared: int, stats: AttackStats) -> None:
    """Declare `declared` bytes and send one every `byte_interval_s`; when the server answers or closes, open a
    new connection at the next tick. One network action per tick keeps this a slow attack, not a flood."""
    head = (f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Origin: http://localhost:8080\r\nContent-Length: {declared}\r\n\r\n").encode()
    while time.monotonic() < until:
        tick = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5,
                                          source_address=(ATTACKER_ADDRESS, 0)) as sock:
                sock.sendall(head)
                stats.opened += 1
                sent = 0
                while time.monotonic() < until and sent < declared:
                    sock.sendall(b" ")
                    sent += 1
                    tick = time.monotonic()
                    sock.settimeout(max(0.01, min(byte_interval_s, until - tick)))
                    try:
                        answer = sock.recv(4096)
                    except socket.timeout:
                        continue
                    stats.count(stats.answers, answer.split(b"\r\n", 1)[0].decode("latin-1")[:40]
                                if answer else "closed without an answer")
                    break
        except OSError as exc:
            stats.count(stats.errors, describe(exc))
        gevent.sleep(max(0.0, min(tick + byte_interval_s, until) - time.monotonic()))


def run_connection_attack(port: int, args: argparse.Namespace, label: str, connection: Callable[..., None],
                          *extra: object) -> tuple[Probes, AttackStats]:
    """Open `args.connections` attacker connections (`connection(port, until, byte_interval_s, *extra, stats)`) over
    the ramp, then probe `/health` through the window while they run."""
    stats = AttackStats()
    until = time.monotonic() + args.ramp_s + args.window_s
    attackers = gevent.pool.Group()
    for i in range(args.connections):
        attackers.spawn(connection, port, until, args.byte_interval_s, *extra, stats)
        if i % 50 == 49:
            gevent.sleep(args.ramp_s * 50 / args.connections)  # all connections open within the ramp
    progress(f"{label}: {stats.opened} connections opened; probing /health for {args.window_s:g} s")
    probes = Probes(args.probe_timeout_s)
    probe_health(port, probes, until, args.probe_interval_s)
    attackers.join(timeout=15)
    attackers.kill(block=True, timeout=5)
    return probes, stats


SLOW_READ_PATH = "/static/uplot/uPlot.iife.min.js"  # public, ~50 KB: a few answers fill a small receive buffer
# Every slow-read connection makes the server's socket buffer up to ~4 MiB of kernel memory (on the baseline, whose
# writes never give up, for the whole window): 200 of them are ~800 MiB of the shared machine.
MAX_SLOW_READ_CONNECTIONS = 200


def slow_read_connection(port: int, until: float, tick_s: float, pipelined: int, stats: AttackStats) -> None:
    """Ask for `pipelined` answers on a connection with a 4 KiB receive buffer and never read them; each tick send
    one more request. The first answer's status line is peeked at (nothing is read); a connection the server has
    closed (the send fails) is counted and reopened at the next tick."""
    request = f"GET {SLOW_READ_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while time.monotonic() < until:
        tick = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        status = None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(5)
            sock.bind((ATTACKER_ADDRESS, 0))
            sock.connect(("127.0.0.1", port))
        except OSError as exc:
            stats.count(stats.errors, describe(exc))
            sock.close()
            gevent.sleep(max(0.0, min(tick + tick_s, until) - time.monotonic()))
            continue
        try:
            sock.sendall(request * pipelined)
            stats.opened += 1
            while time.monotonic() < until:
                gevent.sleep(max(0.0, min(tick + tick_s, until) - time.monotonic()))
                tick = time.monotonic()
                if status is None:
                    try:
                        status = sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT)[:12] or None
                    except (BlockingIOError, socket.timeout):
                        pass
                sock.send(request)
        except OSError as exc:
            kind = describe(exc)
            stats.count(stats.answers, f"closed by the server (first answer {status.decode('latin-1')[9:12]})"
                        if status else f"closed by the server, no answer seen ({kind})")
        finally:
            sock.close()
        gevent.sleep(max(0.0, min(tick + tick_s, until) - time.monotonic()))


def replay_upgrade(url: str, headers: list[str], until: float, stats: AttackStats) -> None:
    """One replay of the captured upgrade; an accepted socket is held open, silent, until the window ends."""
    import websocket
    try:
        port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(ATTACKER_ADDRESS, 0))
        ws = websocket.create_connection(url, header=headers, timeout=10, socket=sock)
    except websocket.WebSocketBadStatusException as exc:
        stats.count(stats.answers, f"HTTP {exc.status_code}")
        return
    except Exception as exc:
        stats.count(stats.errors, describe(exc))
        return
    stats.opened += 1
    try:
        while time.monotonic() < until:
            ws.settimeout(max(0.01, until - time.monotonic()))
            try:
                frame = ws.recv_frame()
            except websocket.WebSocketTimeoutException:
                continue
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
                stats.count(stats.answers, f"socket closed by the server ({code})")
                return
    except Exception as exc:
        stats.count(stats.answers, f"socket dropped by the server ({type(exc).__name__})")
    finally:
        ws.close(timeout=0.5)


def run_replay(stack: BenchStack, port: int, args: argparse.Namespace) -> tuple[Probes, AttackStats, str]:
    """A live call's signed upgrade, captured once, replayed `connections` times while the call stays on."""
    base = f"http://127.0.0.1:{port}"
    to = destination(1, 7)
    caller = RelayCaller(base, AUTH_TOKEN, ACCOUNT_SID, timeout_s=15)
    caller.place_call(call_body(to))
    caller.answer_placed(stack.create_for(to))
    caller.connect()  # the real call's own socket, with its setup
    url = caller.twiml.url
    headers = [f"X-Twilio-Signature: {twilio_signature(AUTH_TOKEN, url, {})}"]
    stats = AttackStats()
    until = time.monotonic() + args.ramp_s + args.window_s
    attackers = gevent.pool.Group()
    for i in range(args.connections):
        attackers.spawn(replay_upgrade, url, headers, until, stats)
        if i % 50 == 49:
            gevent.sleep(args.ramp_s * 50 / args.connections)
    progress(f"replay: {stats.opened} replayed sockets open; probing /health for {args.window_s:g} s")
    probes = Probes(args.probe_timeout_s)
    probe_health(port, probes, until, args.probe_interval_s)
    attackers.join(timeout=15)
    attackers.kill(block=True, timeout=5)
    try:
        caller.prompt("Is the real call still answered?")
        reply = caller.recv(timeout_s=10)
        real_call = "answered" if reply and reply.get("type") in {"text", "language"} else "no reply"
    except Exception as exc:
        real_call = f"failed ({describe(exc)})"
    caller.hangup()
    return probes, stats, real_call


def idle_probes(port: int, args: argparse.Namespace) -> Probes:
    probes = Probes(args.probe_timeout_s)
    probe_health(port, probes, time.monotonic() + args.idle_s, args.probe_interval_s)
    return probes


def measure(stack: BenchStack, name: str, repo: Path, args: argparse.Namespace, env: dict[str, str]) -> list[list]:
    rows = []
    with stack.server(workers=args.workers, repo=repo, **env) as server:
        progress(f"{name}: server on port {server.port} ({args.workers} workers)")
        rows.append(["none (idle)", name, *idle_probes(server.port, args).cells(), "—"])
        if "slow-body" in args.attacks:
            probes, stats = run_connection_attack(server.port, args, "slow bodies", slow_body_connection,
                                                  1024 * 1024)
            rows.append([f"slow bodies ×{args.connections}", name, *probes.cells(), stats.outcome()])
            gevent.sleep(args.settle_s)
        if "replay" in args.attacks:
            probes, stats, real_call = run_replay(stack, server.port, args)
            rows.append([f"signed-upgrade replay ×{args.connections}", name, *probes.cells(),
                         f"{stats.outcome()}; the real call: {real_call}"])
            gevent.sleep(args.settle_s)
        if "slow-read" in args.attacks:
            probes, stats = run_connection_attack(server.port, args, "slow reads", slow_read_connection,
                                                  args.pipelined)
            rows.append([f"slow reads ×{args.connections}", name, *probes.cells(), stats.outcome()])
    return rows


def baseline_checkout(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(checkout to run, temporary directory to delete afterwards)."""
    if args.no_baseline:
        return None, None
    if args.baseline_dir:
        return Path(args.baseline_dir).resolve(), None
    tmp = Path(tempfile.mkdtemp(prefix="callweaver-baseline-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tmp, tmp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000, help="attack connections (at most 1000)")
    parser.add_argument("--window-s", type=float, default=30.0, help="probe window per attack, after the ramp")
    parser.add_argument("--ramp-s", type=float, default=5.0, help="attack connections open within this time")
    parser.add_argument("--byte-interval-s", type=float, default=5.0,
                        help="slow body: seconds between bytes; slow read: seconds between requests")
    parser.add_argument("--pipelined", type=int, default=100,
                        help="slow read: requests sent at once per connection (~50 KB answers each: 100 outgrow the "
                             "4 MiB a socket may buffer, so the server's writes block)")
    parser.add_argument("--attacks", default="slow-body,replay",
                        help="comma-separated: slow-body, replay, slow-read (only when named: at most "
                             f"{MAX_SLOW_READ_CONNECTIONS} connections)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle /health probing before the attacks")
    parser.add_argument("--settle-s", type=float, default=3.0, help="pause between the two attacks")
    parser.add_argument("--probe-interval-s", type=float, default=0.1)
    parser.add_argument("--probe-timeout-s", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (WEB_CONCURRENCY)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of the code to compare with")
    parser.add_argument("--baseline-dir", help="an existing checkout to use as the baseline instead")
    parser.add_argument("--no-baseline", action="store_true", help="measure this checkout only")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for both servers (repeatable)")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 1000 or args.window_s > 120 or not 1 <= args.pipelined <= 200:
        parser.error("bounded by design: --connections 1..1000, --window-s at most 120, --pipelined 1..200")
    args.attacks = {a.strip() for a in args.attacks.split(",") if a.strip()}
    if not args.attacks or args.attacks - {"slow-body", "replay", "slow-read"}:
        parser.error("--attacks: slow-body, replay and/or slow-read")
    if "slow-read" in args.attacks and args.connections > MAX_SLOW_READ_CONNECTIONS:
        parser.error(f"bounded by design: slow-read with at most {MAX_SLOW_READ_CONNECTIONS} --connections (each "
                     "makes the server's socket buffer up to ~4 MiB of kernel memory)")
    env = parse_env_pairs(args.server_env)
    env.setdefault("LOG_LEVEL", "WARNING")
    baseline, tmp = baseline_checkout(args)
    rows: list[list] = []
    try:
        with BenchStack("abuse") as stack:
            if baseline is not None:
                rows += measure(stack, f"baseline {args.baseline_ref if not args.baseline_dir else baseline}",
                                baseline, args, env)
            rows += measure(stack, "this checkout", REPO, args, env)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ours = [r for r in rows if r[1] == "this checkout" and r[0] != "none (idle)"]
    print(f"### Abuse: /health while the real server is attacked ({args.workers} gevent workers)\n")
    print(f"Machine: {machine_summary()}. {args.connections} attack connections from {ATTACKER_ADDRESS}, opened "
          f"within {args.ramp_s:g} s; /health probed from {PROBE_ADDRESS} every {args.probe_interval_s:g} s for "
          f"{args.window_s:g} s (new connection each, {args.probe_timeout_s:g} s timeout). Slow bodies: 1 MB "
          f"declared on POST /api/chat, one byte every {args.byte_interval_s:g} s. Slow reads: {args.pipelined} "
          f"pipelined GETs of {SLOW_READ_PATH} per connection (4 KiB receive buffer, never read), one more every "
          f"{args.byte_interval_s:g} s.\n")
    print(markdown_table(["attack", "code", "/health probes", "failed", "p50 ms", "p99 ms", "attack outcome"],
                         rows))
    met = all(r[5] not in {"—"} and not r[5].startswith("no answer") and float(r[5]) < TARGET_P99_MS
              for r in ours)
    print(f"\nTarget: /health p99 < {TARGET_P99_MS:g} ms during either attack (this checkout): "
          f"{'met' if met else '**not met**'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
