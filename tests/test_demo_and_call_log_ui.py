"""The offline demo end to end, and the call-log pages in headless Chromium against the calls the demo made."""
from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from callweaver.call_log import outcome_of
from callweaver.engine.metrics import percentile
from callweaver.simulate.demo import LABEL, run_demo
from callweaver.store.sqlite import SQLiteStore
from tests.fakes.browser import Browser
from tests.fakes.live_server import REPO
from tests.test_dashboard import chromium, dashboard_app, served  # noqa: F401  (chromium: skips locally without it, fails in CI)

# Set to 1 to refresh docs/call-log.png and docs/call-detail.png from this test's screenshots.
UPDATE_SCREENSHOTS_ENV = "UPDATE_CALL_LOG_SCREENSHOTS"
FAST_LLM = {"llm_ttft_ms": 30.0, "llm_token_ms": 5.0}

pytestmark = pytest.mark.timeout(400)


def js_ms(value: float | None) -> str:
    """The pages' fmtMs: one decimal, rounded half up, no trailing zero."""
    if value is None:
        return "\u2014"
    return f"{math.floor(value * 10 + 0.5) / 10:g} ms"


def test_demo_plays_the_example_flow_to_its_end_node_with_no_keys(tmp_path):
    script = tmp_path / "caller.txt"
    script.write_text("Hello, I want to sell my flat.\nIt's a two bedroom flat in the city centre.\n"
                      "I'm Bo, on 555 0199.\nThat's all, please end the call.\n")
    db = tmp_path / "demo.sqlite3"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWILIO_", "OPENAI_", "AZURE_OPENAI_", "REDIS_"))}  # no keys at all

    out = subprocess.run([sys.executable, "-m", "callweaver.simulate", "--demo", "--exit", "--script", str(script),
                          "--db", str(db), "--llm-ttft-ms", "30", "--llm-token-ms", "5"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)

    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(line.startswith(LABEL) and "stand-in" in line for line in lines)
    assert any("caller: Hello, I want to sell my flat." in line for line in lines)
    assert any("node inquiry_type_node → seller_details_node" in line for line in lines)
    assert sum("server: first token" in line for line in lines) == 4
    url = re.search(r"this call on the dashboard: (http://127\.0\.0\.1:\d+/dashboard/calls/(\S+))$", lines[-1])
    assert url, lines[-1]
    store = SQLiteStore(str(db))
    record = store.get_call(url.group(2))
    turns = store.turns(record.tracking_id)
    assert record.current_node == "end_call_node" and record.status == "completed"
    assert outcome_of(record, turns) == "end_node" and len(turns) == 4
    store.close()


def test_call_log_and_timeline_in_chromium_match_the_store(chromium, tmp_path):  # noqa: F811
    db = str(tmp_path / "demo.sqlite3")
    refresh_docs = os.environ.get(UPDATE_SCREENSHOTS_ENV) == "1"
    speed = {} if refresh_docs else FAST_LLM  # the docs' screenshots show the demo's default stand-in speed
    calls = 3 if refresh_docs else 2
    earlier = [run_demo(db_path=db, out=io.StringIO(), **speed) for _ in range(calls - 1)]
    checked: dict = {}

    def browse() -> None:
        """Runs while the demo's server is still up, with two real calls in its store."""
        base = second_url_holder["out"].getvalue().split("this call on the dashboard: ")[1].split("/dashboard/")[0]
        store = SQLiteStore(db)
        with Browser(chromium, tmp_path / "profile") as browser:
            browser.open(base + "/dashboard/calls")
            rows = browser.evaluate("""Array.from(document.querySelectorAll('#call-rows tr[data-tracking-id]'))
                .map(tr => ({id: tr.dataset.trackingId, turns: tr.querySelector('.cell-turns').textContent,
                             p50: tr.querySelector('.cell-p50').textContent,
                             failovers: tr.querySelector('.cell-failovers').textContent,
                             cache: tr.querySelector('.cell-cache').textContent,
                             outcome: tr.querySelector('.cell-outcome').textContent}))""")
            plot = browser.evaluate("[document.getElementById('latency-plot').dataset.rendered,"
                                    " document.getElementById('latency-plot').dataset.points,"
                                    " document.querySelectorAll('#latency-plot canvas').length]")
            if refresh_docs:
                browser.screenshot(REPO / "docs" / "call-log.png")
            # the list shows the store's calls, newest first, with the store's numbers
            records, total = store.call_page(50)
            assert total == calls and [r["id"] for r in rows] == [r.tracking_id for r in records]
            for row, record in zip(rows, records):
                turns = store.turns(record.tracking_id)
                first_tokens = [t["firstTokenMs"] for t in turns if t.get("firstTokenMs") is not None]
                assert row["turns"] == str(len(turns)) and len(turns) == 5
                assert row["p50"] == js_ms(percentile(first_tokens, 50))
                assert row["failovers"] == str(sum(len(t.get("failovers") or []) for t in turns))
                assert row["cache"] == str(sum(1 for t in turns if t.get("cacheHit")))
                assert row["outcome"] == "end node" == outcome_of(record, turns).replace("_", " ")
            assert plot[0] == "true" and int(plot[1]) >= 1 and plot[2] == 1

            # a click on a call opens its timeline
            target = rows[1]["id"]
            browser.evaluate(f"document.querySelector('tr[data-tracking-id=\"{target}\"] a.call-link').click()")
            browser.wait_ready(path=f"/dashboard/calls/{target}")
            timeline = browser.evaluate("""Array.from(document.querySelectorAll('#timeline li.turn')).map(li => ({
                said: li.querySelector('.said') ? li.querySelector('.said').lastChild.textContent : null,
                heard: li.querySelector('.heard-text') ? li.querySelector('.heard-text').textContent : null,
                unheard: li.querySelector('.unheard') ? li.querySelector('.unheard').textContent : null,
                who: Array.from(li.querySelectorAll('.who')).map(w => w.textContent),
                facts: Object.fromEntries(Array.from(li.querySelectorAll('.facts dt')).map(
                    dt => [dt.textContent, dt.nextElementSibling.textContent]))}))""")
            summary = browser.evaluate("['d-turns', 'd-p50', 'd-outcome', 'd-path'].map("
                                       "id => document.getElementById(id).textContent)")
            if refresh_docs:
                browser.screenshot(REPO / "docs" / "call-detail.png")
            record = store.get_call(target)
            turns = store.turns(target)
            assert len(timeline) == len(turns) == len(record.transcript) == 5
            for shown, turn, said in zip(timeline, turns, record.transcript):
                assert shown["said"] == said["said"] and shown["heard"] == said["heard"]
                assert shown["facts"]["first token"] == js_ms(turn["firstTokenMs"])
                assert shown["facts"]["last token"] == js_ms(turn["lastTokenMs"])
                assert shown["facts"]["node"] == f"{turn['nodeId']} → {turn['nextNodeId']}"
                assert shown["facts"]["provider"] == f"{turn['provider']} (TTFT {js_ms(turn['providerTtftMs'])})"
                assert shown["facts"]["cache hit"] == ("yes" if turn.get("cacheHit") else "no")
            assert timeline[0]["said"] == "Hi, I'd like to buy a house."
            assert summary[0] == "5" and summary[2] == "end node" and summary[3] == "optimized"
            # the demo's caller barges in on the second reply: the timeline shows only what they heard
            barged = timeline[1]
            assert turns[1]["interrupted"] and record.transcript[1]["interrupted"]
            assert barged["who"] == ["caller said", "caller heard (interrupted)"]
            spoken = record.transcript[1]["spoken"]
            assert len(barged["heard"].split()) == 4 and spoken.startswith(barged["heard"])
            assert barged["unheard"] == ((" " + spoken[len(barged["heard"]):].strip()) if spoken.strip() != barged["heard"] else None)
            assert turns[1]["nodeId"] == turns[1]["nextNodeId"]  # an interrupted reply never moves the flow
        store.close()
        checked["done"] = True

    second_url_holder = {"out": io.StringIO()}
    last = run_demo(db_path=db, out=second_url_holder["out"], keep_serving=True, wait=browse, **speed)

    assert checked.get("done") and {r.outcome for r in [*earlier, last]} == {"end_node"}


def test_call_log_pages_use_only_the_apps_own_static_files(tmp_path):
    from callweaver import create_app
    from tests.conftest import base_env
    from tests.fakes.fake_twilio import FakeTwilio
    twilio = FakeTwilio("AC" + "a1" * 16, "f" * 32).start()
    try:
        client = create_app(base_env(tmp_path, twilio)).test_client()
        for path in ("/dashboard/calls", "/dashboard/calls/call_x"):
            html = client.get(path).get_data(as_text=True)
            sources = re.findall(r"<(?:script|link)[^>]*\b(?:src|href)=\"([^\"]+)\"", html)
            assert sources and all(s.startswith("/static/") for s in sources), sources
            for source in sources:
                assert client.get(source).status_code == 200, source
        assert "MIT" in (Path(REPO) / "callweaver" / "static" / "uplot" / "LICENSE").read_text()
    finally:
        twilio.stop()


# What a caller, an LLM or a workflow author controls, made to run script if it were ever parsed as markup.
HOSTILE = '<img src="x" onerror="window.__xss=1" data-probe="1"><script>window.__xss=2</script>'


def test_call_pages_show_hostile_text_as_text_and_failovers_as_stored(chromium, dashboard_app, served,  # noqa: F811
                                                                     tmp_path):
    """Caller speech, LLM replies, tool-call names and arguments, node names, the workflow's name and a provider's
    failover, as the engine stores them (providers.py: {"provider", "reason", "spoken_chars"}), in the real pages."""
    from callweaver.store import CallRecord
    store = dashboard_app.extensions["callweaver"].store
    now = time.time()
    store.create_call(CallRecord(
        tracking_id="call_hostile", path="optimized", status="completed", language="en-US", to="+14155550123",
        created_at=now - 90, ended_at=now - 5, current_node=HOSTILE, meta={"endReason": "silence"},
        workflow={"name": "Flow " + HOSTILE, "nodes": []},
        transcript=[{"said": "hi " + HOSTILE, "heard": "hello " + HOSTILE, "spoken": "hello " + HOSTILE,
                     "interrupted": False,
                     "toolCalls": [{"name": "save_" + HOSTILE, "arguments": {"name": HOSTILE}}]}]))
    store.append_turn("call_hostile", {
        "path": "optimized", "source": "llm", "provider": "openai", "providerTtftMs": 400.0, "firstTokenMs": 1450.0,
        "lastTokenMs": 2000.0, "nodeId": HOSTILE, "nextNodeId": "end_" + HOSTILE, "at": now - 30,
        "failovers": [{"provider": "azure", "reason": "first_token_timeout", "spoken_chars": 0}]})

    with Browser(chromium, tmp_path / "profile") as browser:
        browser.open(served + "/dashboard/calls")
        listed = browser.evaluate("""[window.__xss === undefined, document.querySelectorAll('[data-probe]').length,
            document.querySelector('tr[data-tracking-id="call_hostile"] .cell-outcome').textContent]""")
        browser.open(served + "/dashboard/calls/call_hostile")
        shown = browser.evaluate("""({xss: window.__xss === undefined, probes: document.querySelectorAll('[data-probe]').length,
            said: document.querySelector('.said').lastChild.textContent,
            heard: document.querySelector('.heard-text').textContent,
            tools: document.querySelector('.tools').textContent,
            workflow: document.getElementById('d-workflow').textContent,
            outcome: document.getElementById('d-outcome').textContent,
            facts: Object.fromEntries(Array.from(document.querySelectorAll('.facts dt')).map(
                dt => [dt.textContent, dt.nextElementSibling.textContent]))})""")

    assert listed == [True, 0, "silence"]
    assert shown["xss"] and shown["probes"] == 0
    assert shown["said"] == "hi " + HOSTILE and shown["heard"] == "hello " + HOSTILE
    assert shown["tools"] == "save_" + HOSTILE + " " + json.dumps({"name": HOSTILE}, separators=(",", ":"))
    assert shown["workflow"] == "Flow " + HOSTILE and shown["outcome"] == "silence"
    assert shown["facts"]["node"] == f"{HOSTILE} → end_{HOSTILE}"
    assert shown["facts"]["failover"] == "azure (first_token_timeout) → openai"
