"""Relay frames stay whole with a slow reader and concurrent greenlet senders (simple-websocket's send() can't)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.fakes.live_server import REPO


def _run(mode: str) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "tests.fakes.sender_check", mode], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


def test_locked_sender_keeps_frames_whole_and_ordered_under_gevent():
    code, report = _run("locked")
    assert code == 0 and report["ok"] and report["received"] == 160, report


def test_the_naive_send_it_replaces_breaks_under_the_same_load():
    """Shows the check can fail: one unlocked socket.send() per frame from several greenlets corrupts the stream."""
    code, report = _run("naive")
    assert code == 1 and not report["ok"], report
