"""deploy/: the Grafana dashboard and the Prometheus alerts only use metric names a live /metrics scrape exposes,
every expression in them passes `promtool check rules`, and each alert fires when it should (`promtool test rules`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.live_server import REPO
from tests.scripted_brain import real_estate_brain
from tests.test_gather_flow import GatherCall
from tests.test_one_turn_pipeline import relay_call

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "callweaver-dashboard.json"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan", "le"}
REQUIRED_ALERTS = {"first-token p95": "callweaver_turn_first_token_ms_bucket",
                   "failover rate": "callweaver_provider_failures_total",
                   "open circuit": "callweaver_provider_circuit_state",
                   "error rate": 'status="failed"',
                   "no traffic": "== 0"}


def promtool() -> str:
    """The promtool path; skip locally without it, but fail in CI, where .ci/run installs it."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed but CI is set; .ci/run should have installed it")
        pytest.skip("promtool is not installed (apt-get install -y prometheus)")
    return path


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    exprs = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            exprs.append(expr)
    return exprs


def alert_test_series() -> set[str]:
    """Metric names of the synthetic series alerts_test.yml feeds promtool."""
    return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", series["series"]).group(0)
            for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for series in test["input_series"]}


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects: identifiers that are not functions, keywords or label names."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                           # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                          # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


@pytest.fixture
def scraped_names(app, client, twilio, fake_twilio, fake_llm, fake_llm2) -> set[str]:
    """Sample names of a real /metrics scrape after real traffic: turns that failed over on both paths (added latency
    is measured on relay turns only), and a failed call."""
    fake_llm.fault = "500"                   # the primary fails: the turn fails over to the secondary
    fake_llm2.responder = real_estate_brain
    call = GatherCall(app, client, twilio, fake_twilio)
    call.say(call.answer(), "I want to buy a house")
    relay_call(app, client)
    failed = GatherCall(app, client, twilio, fake_twilio)
    assert twilio.post(f"/api/call-status?trackingId={failed.tracking_id}",
                       {"CallSid": failed.call_sid, "CallStatus": "failed", "SequenceNumber": "1"}).status_code == 200
    scrape = client.get("/metrics")
    assert scrape.status_code == 200
    return {sample.name for family in text_string_to_metric_families(scrape.get_data(as_text=True))
            for sample in family.samples}


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.95, sum by (le, path) (rate(a_bucket{path="x"}[5m]))) > 1500') \
        == {"a_bucket"}
    assert metric_names("(sum(increase(b_count[1h])) or vector(0)) == 0 and on(job) c") == {"b_count", "c"}


def test_every_metric_the_dashboard_and_alerts_use_is_on_the_live_scrape(scraped_names):
    assert {"callweaver_turn_first_token_ms_bucket", "callweaver_provider_circuit_state"} <= scraped_names
    used = {name: "alerts.yml" for rule in alert_rules() for name in metric_names(rule["expr"])}
    used |= {name: "callweaver-dashboard.json" for expr in dashboard_expressions() for name in metric_names(expr)}
    used |= {name: "alerts_test.yml" for name in alert_test_series()}
    assert len(used) >= 5
    unknown = {name: where for name, where in used.items() if name not in scraped_names}
    assert unknown == {}, f"not exposed by /metrics (exposed: {sorted(scraped_names)})"


def test_alerts_cover_the_operator_checklist():
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    assert all(rule.get("alert") and rule.get("annotations", {}).get("summary") for rule in alert_rules())
    missing = [what for what, needle in REQUIRED_ALERTS.items() if needle not in exprs]
    assert missing == []


def test_alert_rules_pass_promtool():
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_each_alert_fires_on_its_situation_and_not_on_a_healthy_service():
    """promtool's rule unit tests (alerts_test.yml): every alert fires, at the right time, with its labels."""
    result = subprocess.run([promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_dashboard_queries_parse(tmp_path):
    """Each panel query becomes a recording rule, so promtool's PromQL parser checks it too."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"callweaver:dashboard_query_{i}", "expr": expr} for i, expr in enumerate(dashboard_expressions())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "callweaver" and len(dashboard["panels"]) >= 6
