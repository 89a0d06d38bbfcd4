"""README and render.yaml stay true: every variable the service reads is documented and declared."""
from __future__ import annotations

import re

import yaml

from tests.fakes.live_server import REPO

SET_BY_PLATFORM = {"PORT", "RENDER_EXTERNAL_URL", "RENDER"}


SERVICE_SOURCES = ("callweaver/config.py", "callweaver/server_config.py", "callweaver/cors.py", "gunicorn.conf.py")


def variables_read(paths=SERVICE_SOURCES) -> set[str]:
    names = set()
    for path in paths:
        source = (REPO / path).read_text()
        names |= set(re.findall(r'(?:text|number|flag|url|rate|whole)\(\s*"([A-Z][A-Z0-9_]+)"', source))
        names |= set(re.findall(r'read_number\(\s*\w+,\s*"([A-Z][A-Z0-9_]+)"', source))
        for args in re.findall(r'url\(([^)]*)\)', source):  # url("PUBLIC_BASE_URL", "WEBHOOK_BASE_URL", ...)
            names |= set(re.findall(r'"([A-Z][A-Z0-9_]+)"', args))
        names |= set(re.findall(r'(?:os\.environ|env|environ)\.get\(\s*[\'"]([A-Z][A-Z0-9_]+)', source))
    return names


def test_every_variable_read_anywhere_in_the_code_is_documented():
    """Not only the service's settings: the tracing, Twilio transport and simulator modules read a few too."""
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"`\$?([A-Z][A-Z0-9_]+)`", readme))
    names = variables_read()
    for path in [*(REPO / "callweaver").rglob("*.py"), REPO / "gunicorn.conf.py", REPO / "wsgi.py"]:
        source = path.read_text()
        names |= set(re.findall(r'os\.environ(?:\.get\(|\[)\s*[\'"]([A-Z][A-Z0-9_]+)', source))
        names |= set(re.findall(r'_from_env\(\s*"([A-Z][A-Z0-9_]+)"', source))  # simulate: _port_from_env(...)
    assert {"OTEL_SERVICE_NAME", "REQUESTS_CA_BUNDLE", "CALLWEAVER_URL", "SIMULATOR_TWILIO_PORT"} <= names
    assert names - documented == set()


def test_every_variable_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", readme))
    names = variables_read()
    assert {"TWILIO_AUTH_TOKEN", "LLM_PROVIDERS", "WEB_CONCURRENCY", "WEBHOOK_BASE_URL"} <= names
    assert names - documented == set()


def test_every_variable_is_declared_in_render_yaml_with_secrets_unsynced():
    blueprint = yaml.safe_load((REPO / "render.yaml").read_text())
    web = next(s for s in blueprint["services"] if s["type"] == "web")
    declared = {v["key"]: v for v in web["envVars"]}
    assert variables_read() - SET_BY_PLATFORM - set(declared) == set()
    for secret in ("TWILIO_AUTH_TOKEN", "AZURE_OPENAI_API_KEY", "OPENAI_API_KEY", "TWILIO_ACCOUNT_SID"):
        assert declared[secret].get("sync") is False and "value" not in declared[secret]
    assert web["healthCheckPath"] == "/health"
    assert web["startCommand"] == "python -m callweaver.serve"  # gunicorn -c gunicorn.conf.py wsgi:app, checked
    assert declared["REDIS_URL"]["fromService"]["type"] == "keyvalue"


def test_the_readme_says_what_health_answers_when_the_store_fails():
    """/health answers a fixed message naming what failed; the store's own error (a file path, a Redis host) goes
    only to the server log as store_check_failed."""
    from callweaver.routes.health import STORE_CHECK_FAILED

    readme = (REPO / "README.md").read_text()
    assert "with the store's error" not in readme
    assert "store_check_failed" in readme
    assert all(message in readme for message in STORE_CHECK_FAILED.values())


# render.yaml's deliberate departures from the README's defaults (each explained in a comment there).
RENDER_OVERRIDES = {"NODE_ENV", "WEB_CONCURRENCY", "TRUSTED_PROXY_HOPS", "GEVENT_TRACK_GREENLET_TREE", "PYTHON_VERSION"}


def test_render_yaml_values_are_the_documented_defaults_and_every_secret_is_unsynced():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Environment variables"):]
    defaults = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and re.fullmatch(r"`[A-Z][A-Z0-9_]+`", cells[0]):
            literal = re.fullmatch(r"`([^`]*)`", cells[2])
            if literal:
                defaults[cells[0].strip("`")] = literal.group(1)
    blueprint = yaml.safe_load((REPO / "render.yaml").read_text())
    web = next(s for s in blueprint["services"] if s["type"] == "web")
    for var in web["envVars"]:
        if "value" in var and var["key"] in defaults and var["key"] not in RENDER_OVERRIDES:
            assert str(var["value"]) == defaults[var["key"]], var["key"]
    declared = {v["key"]: v for v in web["envVars"]}
    for secret in ("OPS_TOKEN", "CALL_REPORT_SECRET", "CALL_REPORT_URL", "CACHE_REDIS_URL", "OPENAI_BASE_URL"):
        assert declared[secret].get("sync") is False and "value" not in declared[secret], secret
    assert declared["SECRET_KEY"].get("generateValue") is True
