"""The benchmarks are bounded by design: an invocation that would take more of the shared machine is refused before
any server or attacker starts."""
from __future__ import annotations

import subprocess
import sys

from bench.common import REPO

NOTHING_STARTED = 42  # the exit status of the stand-in for the first step that starts anything


def abuse_exit(*argv: str) -> subprocess.CompletedProcess:
    """bench/abuse.py's main with `argv`, its first step that starts anything replaced by an exit (in a process of its
    own: the module patches the standard library with gevent on import)."""
    code = ("import sys, bench.abuse as abuse\n"
            f"abuse.baseline_checkout = lambda *a, **k: sys.exit({NOTHING_STARTED})\n"
            f"abuse.main({list(argv)!r})\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_the_slow_read_attack_is_bounded_to_what_the_machines_kernel_memory_allows():
    """Each slow-read connection makes the server's socket buffer up to ~4 MiB of kernel memory (docs/performance.md),
    so 1000 of them (the other attacks' bound, and the default) asked for ~4 GiB of the shared machine's memory on the
    baseline, whose writes never give up; `--attacks` also ran it by default."""
    refused = abuse_exit("--attacks", "slow-read", "--connections", "1000")
    assert refused.returncode == 2 and "slow-read" in refused.stderr, refused.stderr[-500:]
    assert abuse_exit("--attacks", "slow-read", "--connections", "150").returncode == NOTHING_STARTED
    assert abuse_exit("--connections", "1000").returncode == NOTHING_STARTED  # the default attacks, as on main
