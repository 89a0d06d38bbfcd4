"""The ops dashboard page, rendered by a real headless Chromium against the app serving measured store data."""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import pytest
from flask import Flask
from werkzeug.serving import make_server

from callweaver import create_app
from callweaver.store import CallRecord
from tests.conftest import base_env

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT_COPY = REPO_ROOT / "docs" / "dashboard.png"
# Set to 1 to refresh the committed docs/dashboard.png from this test's screenshot.
UPDATE_SCREENSHOT_ENV = "UPDATE_DASHBOARD_SCREENSHOT"
# Virtual time, not wall time: Chromium fast-forwards timers while idle, so a loaded machine only runs slower.
VIRTUAL_TIME_BUDGET_MS = 8000
CHROMIUM_TIMEOUT_S = 180
SCREEN_W, SCREEN_H = 1280, 900
HOSTILE_NODE = '<img src="x" data-probe="injected">contact_details_node'

pytestmark = pytest.mark.timeout(400)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium() -> str:
    """Skip locally without Chromium, but fail in CI, where .ci/run installs it: a silent skip would hide the test."""
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set; .ci/run should have installed it")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return binary


@pytest.fixture
def dashboard_app(tmp_path, fake_twilio, fake_llm, fake_llm2) -> Flask:
    return create_app(base_env(tmp_path, fake_twilio, fake_llm, fake_llm2))


@pytest.fixture
def served(dashboard_app: Flask) -> Iterator[str]:
    """The app on a real loopback port, so the browser loads the page and polls the API over HTTP."""
    server = make_server("127.0.0.1", 0, dashboard_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def run_chromium(binary: str, profile_dir: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile_dir.mkdir(parents=True, exist_ok=True)
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile_dir}",
            f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", *extra, url]
    # Own session, so a hung run is ended with all its renderer and GPU children, not just the parent.
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HOME": str(profile_dir)}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s (a blocking dialog, or a hung page?)")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def dump_dom(binary: str, tmp_path: Path, url: str) -> str:
    result = run_chromium(binary, tmp_path / "profile-dom", url, "--dump-dom")
    assert result.returncode == 0 and "<body" in result.stdout, result.stderr[-3000:]
    return result.stdout


class DomIndex(HTMLParser):
    """Attributes and text content of every element with an id, from Chromium's serialised DOM."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.attrs: dict[str, dict[str, str | None]] = {}
        self.texts: dict[str, list[str]] = {}
        self.body_attrs: dict[str, str | None] = {}
        self.all_text: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attr_map = dict(attrs)
        if tag == "body":
            self.body_attrs = attr_map
        element_id = attr_map.get("id")
        if element_id:
            self.attrs[element_id] = attr_map
            self.texts.setdefault(element_id, [])
        if tag not in self.VOID:
            self._open.append((tag, element_id))

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        if any(tag in ("script", "style") for tag, _ in self._open):
            return
        self.all_text.append(data)
        for _, element_id in self._open:
            if element_id:
                self.texts[element_id].append(data)

    def text(self, element_id: str) -> str:
        return " ".join("".join(self.texts[element_id]).split())

    @property
    def page_text(self) -> str:
        return " ".join("".join(self.all_text).split())


def nearest_rank_p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(0.5 * len(ordered))) - 1]


def seed_realistic_traffic(store, now: float, third_call_node: str = "contact_details_node") -> dict:
    """Ten minutes of turns on both paths, with cache hits, one failover and one apology; returns what was put in."""
    rng = random.Random(20240611)
    calls = [
        CallRecord(tracking_id="opt_live_1", path="optimized", status="in-progress", language="en-US",
                   current_node="buyer_requirements_node", created_at=now - 560),
        CallRecord(tracking_id="opt_live_2", path="optimized", status="in-progress", language="es-ES",
                   current_node="inquiry_type_node", created_at=now - 190),
        CallRecord(tracking_id="opt_live_3", path="optimized", status="in-progress", language="yue-HK",
                   current_node=third_call_node, created_at=now - 75),
        CallRecord(tracking_id="trad_live_1", path="traditional", status="in-progress", language="en-US",
                   current_node="seller_details_node", created_at=now - 420),
        CallRecord(tracking_id="opt_done_1", path="optimized", status="completed", language="en-US",
                   current_node="end_call_node", created_at=now - 590, ended_at=now - 300),
    ]
    for record in calls:
        store.create_call(record)

    first_token_ms = {"optimized": [], "traditional": []}
    buckets: set[int] = set()
    for minute in range(10):
        bucket_start = (now - 600) // 60 * 60 + 60 * (minute + 1)
        for turn_no in range(6):
            # never before its bucket: in the first second of a minute `now - 1` is still in the previous one
            at = max(bucket_start, min(now - 1, bucket_start + 5 + turn_no * 8 + rng.randint(0, 3)))
            cache_hit = turn_no == 0 and minute % 2 == 0
            failover = minute == 4 and turn_no == 3
            apology = minute == 7 and turn_no == 5
            if cache_hit:
                first = float(rng.randint(24, 61))
                turn = {"source": "cache", "cacheHit": True, "providerTtftMs": None, "provider": None}
            elif apology:
                first = float(rng.randint(1500, 1700))
                turn = {"source": "apology", "cacheHit": False, "providerTtftMs": None, "provider": None}
            else:
                first = float(rng.randint(340, 560) + (700 if failover else 0))
                turn = {"source": "llm", "cacheHit": False, "providerTtftMs": first - rng.randint(11, 34),
                        "provider": "openai" if failover else "azure"}
            if failover:
                turn["failovers"] = [{"provider": "azure", "reason": "first_token_timeout", "spoken_chars": 0}]
            if turn_no == 1:  # a speculation adopted, then one discarded, every minute
                turn.update(speculation="adopted", speculationsStarted=1, savedMs=float(rng.randint(250, 300)),
                            speculationSignal="end_of_speech", speculationSignals={"end_of_speech": 1})
            elif turn_no == 2:
                turn.update(speculation="discarded", speculationsStarted=1, speculationsDiscarded=1,
                            speculativeLlmRequests=1, speculativeTokens=6, speculationSignals={"stable_window": 1})
            turn.update(path="optimized", firstTokenMs=first, lastTokenMs=first + rng.randint(600, 1900), at=at)
            store.append_turn(calls[turn_no % 3].tracking_id, turn)
            first_token_ms["optimized"].append(first)
            buckets.add(int(at // 60 * 60))
        if minute % 2 == 1 or minute == 9:
            at = max(bucket_start, min(now - 1, bucket_start + 30 + rng.randint(0, 9)))
            first = float(rng.randint(1150, 1520))
            store.append_turn("trad_live_1", {
                "path": "traditional", "source": "llm", "cacheHit": False, "provider": "azure",
                "providerTtftMs": first - rng.randint(700, 900), "firstTokenMs": first,
                "lastTokenMs": first + rng.randint(300, 700), "at": at})
            first_token_ms["traditional"].append(first)
            buckets.add(int(at // 60 * 60))
    return {"live_calls": sum(1 for c in calls if c.ended_at is None), "buckets": buckets,
            "first_token_ms": first_token_ms}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_dashboard_renders_measured_latency_cache_and_live_calls_in_headless_chromium(
        chromium, dashboard_app, served, tmp_path):
    seeded = seed_realistic_traffic(dashboard_app.extensions["callweaver"].store, time.time(), HOSTILE_NODE)

    html = dump_dom(chromium, tmp_path, served + "/dashboard")
    dom = DomIndex(html)

    assert dom.body_attrs.get("data-state") == "ready"
    chart = dom.attrs["latency-chart"]
    assert chart.get("data-rendered") == "true"
    assert int(chart["data-points"]) >= len(seeded["buckets"]) >= 10

    opt, trad = seeded["first_token_ms"]["optimized"], seeded["first_token_ms"]["traditional"]
    opt_p50, trad_p50 = nearest_rank_p50(opt), nearest_rank_p50(trad)
    assert f"{opt_p50:g} ms" in dom.page_text
    assert dom.text("ftl-optimized-p50") == f"{opt_p50:g} ms"
    assert dom.text("ftl-traditional-p50") == f"{trad_p50:g} ms"
    assert dom.text("ftl-optimized-samples") == str(len(opt))
    assert dom.text("ftl-traditional-samples") == str(len(trad))
    assert dom.text("live-count") == str(seeded["live_calls"])
    assert dom.text("failover-count") == "1"
    assert dom.text("error-count") == "1"
    assert dom.text("cache-rate") != "\u2014"
    assert "azure" in dom.text("provider-list") and "openai" in dom.text("provider-list")
    assert dom.text("pre-adoption") == "50%" and "10 of 20 speculated turns adopted" in dom.text("pre-caption")
    assert dom.text("pre-extra") == "0.2"  # 10 discarded speculations over 60 relay turns
    assert "caller stopped speaking: 10 adopted of 10" in dom.text("pre-signals")
    assert "unchanged transcript: 0 adopted of 10" in dom.text("pre-signals")
    assert "opt_live_3" in dom.text("live-rows") and "opt_done_1" not in dom.text("live-rows")
    # a workflow author's node name is shown as text, never parsed as markup
    assert HOSTILE_NODE in dom.text("live-rows")
    assert "<img" not in html.lower()


def test_dashboard_shows_dash_and_reason_when_nothing_was_measured(chromium, served, tmp_path):
    dom = DomIndex(dump_dom(chromium, tmp_path, served + "/dashboard"))

    assert dom.body_attrs.get("data-state") == "ready"
    assert dom.attrs["latency-chart"].get("data-rendered") == "true"
    assert dom.attrs["latency-chart"].get("data-points") == "0"
    for cell in ("ftl-optimized-p50", "ftl-traditional-p95", "cache-rate", "error-rate"):
        assert dom.text(cell) == "\u2014", cell
    assert dom.attrs["ftl-optimized-p50"].get("title") == "no measured turns in this window"
    assert "no measured turns in this window" in dom.text("ftl-reasons")
    assert dom.text("live-count") == "0"
    assert dom.text("ftl-optimized-samples") == "0"
    assert "no error rate" in dom.text("fail-reason")
    assert dom.text("pre-adoption") == "\u2014" and dom.text("pre-extra") == "\u2014"


def test_dashboard_page_is_self_contained_with_no_external_url(dashboard_app):
    """The machines it runs on may have no internet: every style and script is the app's own static file."""
    client = dashboard_app.test_client()
    page = client.get("/dashboard")

    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    sources = re.findall(r"<(?:script|link|img|iframe)[^>]*\b(?:src|href)=\"([^\"]+)\"", html, re.IGNORECASE)
    assert sources and all(s.startswith("/static/") for s in sources), sources
    texts = [html]
    for source in sources:
        served = client.get(source)
        assert served.status_code == 200, source
        texts.append(served.get_data(as_text=True))
        served.close()
    for text in texts:
        assert "@import" not in text and "url(" not in text
        # the SVG namespace is an identifier, never fetched; nothing else may name a scheme
        assert re.findall(r"(?:https?:)?//[\w.-]+\.\w+", text.replace("http://www.w3.org/2000/svg", "")) == []
    assert 'id="latency-chart"' in html and any("api/dashboard-data" in text for text in texts)


def test_dashboard_screenshot_is_a_full_window_png(chromium, dashboard_app, served, tmp_path):
    seed_realistic_traffic(dashboard_app.extensions["callweaver"].store, time.time())
    shot = tmp_path / "dashboard.png"

    result = run_chromium(chromium, tmp_path / "profile-shot", served + "/dashboard", f"--screenshot={shot}",
                          f"--window-size={SCREEN_W},{SCREEN_H}", "--hide-scrollbars")

    assert result.returncode == 0 and shot.exists(), result.stderr[-3000:]
    assert png_size(shot) == (SCREEN_W, SCREEN_H)
    assert shot.stat().st_size > 20_000  # a blank or error page compresses far smaller than a drawn dashboard
    if os.environ.get(UPDATE_SCREENSHOT_ENV) == "1":
        SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_COPY)
