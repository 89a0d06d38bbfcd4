"""A workflow's own LLM account is used for its call only when ALLOW_REQUEST_CREDENTIALS=1, kept encrypted."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from callweaver import create_app
from tests.conftest import PUBLIC, Signer
from tests.fakes.fake_llm import FakeLLM, Reply
from tests.helpers import make_call_body

WORKFLOW_KEY = "workflow-own-key-0123456789"


@pytest.fixture
def own_llm():
    with FakeLLM("workflow-account") as fake:
        yield fake


def _body(own_llm):
    body = make_call_body()
    body["config"] = {**body["config"], "llm": {"provider": "azure_openai", "azure": {
        "apiKey": WORKFLOW_KEY, "endpoint": own_llm.azure_full_endpoint("wf-deploy")}}}
    return body


def _one_turn(app, fake_twilio, body):
    client, twilio = app.test_client(), Signer(app.test_client())
    data = client.post("/api/make-call", json=body).get_json()
    url = fake_twilio.creates()[-1].one("Url")[len(PUBLIC):]
    root = ET.fromstring(twilio.post(url, {"CallSid": data["callSid"]}).data)
    action = root.find("Gather").get("action")[len(PUBLIC):]
    root = ET.fromstring(twilio.post(action, {"CallSid": data["callSid"], "SpeechResult": "hi there"}).data)
    return data, root, twilio


def test_workflow_llm_account_is_used_first_when_allowed(env, fake_twilio, fake_llm, own_llm):
    app = create_app({**env, "ALLOW_REQUEST_CREDENTIALS": "1", "ALLOW_PRIVATE_LLM_URLS": "1"})  # fake LLM: http://127.0.0.1
    own_llm.push(Reply(text="From the workflow's own account."))
    data, root, twilio = _one_turn(app, fake_twilio, _body(own_llm))
    assert "workflow's own account" in root.find("Say").text
    (req,) = own_llm.requests
    assert req.headers["api-key"] == WORKFLOW_KEY and "/deployments/wf-deploy/" in req.path
    assert fake_llm.requests == []
    store = app.extensions["callweaver"].store
    record = store.get_call(data["trackingId"])
    assert record.meta["llm"] and WORKFLOW_KEY not in json.dumps(record.to_dict())  # encrypted at rest
    twilio.post(f"/api/call-status?trackingId={data['trackingId']}",
                {"CallSid": data["callSid"], "CallStatus": "completed", "SequenceNumber": "4"})
    assert "llm" not in store.get_call(data["trackingId"]).meta  # deleted when the call ends


def test_workflow_llm_account_falls_back_to_the_servers_providers(env, fake_twilio, fake_llm, own_llm):
    app = create_app({**env, "ALLOW_REQUEST_CREDENTIALS": "1", "ALLOW_PRIVATE_LLM_URLS": "1"})  # fake LLM: http://127.0.0.1
    own_llm.fault = "500"
    fake_llm.push(Reply(text="Server account answered."))
    _data, root, _ = _one_turn(app, fake_twilio, _body(own_llm))
    assert "Server account answered." in root.find("Say").text


def test_workflow_llm_account_is_ignored_by_default(env, fake_twilio, fake_llm, own_llm):
    app = create_app(env)
    fake_llm.push(Reply(text="Server account."))
    _data, root, _ = _one_turn(app, fake_twilio, _body(own_llm))
    assert own_llm.requests == [] and "Server account." in root.find("Say").text


@pytest.mark.parametrize("endpoint, reason", [
    ("http://llm.example.com/openai/deployments/d/chat/completions", "must use https"),
    ("https://127.0.0.1:9/openai/deployments/d/chat/completions", "non-public address"),
    ("https://169.254.169.254/openai/deployments/d", "non-public address"),
    ("https://[::1]/openai/deployments/d", "non-public address"),
    ("https://localhost/openai/deployments/d", "non-public address"),
    # IPv6 addresses that carry an IPv4 one, which Python's ipaddress calls global: NAT64 (the well-known prefix: an
    # IPv6-only host's NAT64 gateway reaches 10.0.0.5 and the like), IPv4-compatible, 6to4 (found by the outbound audit)
    ("https://[64:ff9b::a00:5]/openai/deployments/d", "non-public address"),
    ("https://[64:ff9b::a9fe:a9fe]/openai/deployments/d", "non-public address"),
    ("https://[::127.0.0.1]/openai/deployments/d", "non-public address"),
    ("https://[2002:7f00:1::]/openai/deployments/d", "non-public address"),
    ("https://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/openai/deployments/d", "non-public address"),  # Teredo: 10.0.0.1
    # RFC 8215's local-use NAT64 prefix 64:ff9b:1::/48 (IANA: not globally reachable; Python before 3.12.4 calls it
    # global): a site's own NAT64 gateway maps it to its IPv4 network, 10.0.0.1 here (found by the outbound review)
    ("https://[64:ff9b:1:a00:1::]/openai/deployments/d", "non-public address"),
    ("https://[64:ff9b:1::a00:1]/openai/deployments/d", "non-public address"),
    # not URLs at all: urlsplit or its port raised ValueError, a 500
    ("https://llm.example.com:99999/openai/deployments/d", "must be an absolute https URL"),
    ("https://llm.example.com:port/openai/deployments/d", "must be an absolute https URL"),
    ("https://[::1/openai/deployments/d", "must be an absolute https URL"),
])
def test_request_supplied_llm_urls_must_be_public_https(env, fake_twilio, own_llm, endpoint, reason):
    """SSRF: with ALLOW_REQUEST_CREDENTIALS=1 a caller-supplied LLM URL is fetched by the server, so it must be https
    and must not resolve to a private, loopback or link-local address; refused with 400 before any call is placed."""
    app = create_app({**env, "ALLOW_REQUEST_CREDENTIALS": "1"})
    body = _body(own_llm)
    body["config"]["llm"]["azure"]["endpoint"] = endpoint
    resp = app.test_client().post("/api/make-call", json=body)
    assert resp.status_code == 400 and reason in resp.get_json()["error"]
    assert "config.llm.azure.endpoint" in resp.get_json()["error"]
    assert fake_twilio.creates() == [] and own_llm.requests == []

    body = _body(own_llm)
    body["config"]["llm"] = {"provider": "openai", "openai": {"apiKey": WORKFLOW_KEY, "baseUrl": endpoint}}
    resp = app.test_client().post("/api/make-call", json=body)
    assert resp.status_code == 400 and "config.llm.openai.baseUrl" in resp.get_json()["error"]


def test_a_request_supplied_llm_host_is_checked_again_when_a_connection_is_made(env, own_llm):
    """DNS rebinding: the host was resolved and found public when make-call accepted the URL, but resolved again
    when the LLM was called, so a name that then answered 127.0.0.1 (or 169.254.169.254) reached the server's own
    network. A call's own account now connects only to an address it has just checked (found by review)."""
    import time

    from callweaver.engine.llm_http import ConnectFailed, ConnectionPool, Endpoint

    endpoint = Endpoint(f"http://localhost:{own_llm.port}/v1/chat/completions", {})
    with pytest.raises(ConnectFailed, match="non-public"):
        ConnectionPool(endpoint, public_only=True).take(time.monotonic() + 5)
    sock, _reused = ConnectionPool(endpoint).take(time.monotonic() + 5)  # the server's own providers: unchanged
    sock.close()

    sealed = {"kind": "openai", "apiKey": WORKFLOW_KEY, "baseUrl": "https://llm.example.com/v1"}
    for settings, public_only in (({}, True), ({"ALLOW_PRIVATE_LLM_URLS": "1"}, False)):
        svc = create_app({**env, "ALLOW_REQUEST_CREDENTIALS": "1", **settings}).extensions["callweaver"]
        chains = svc.chain_for
        chains._open_credentials = lambda blob: sealed
        record = type("Record", (), {"meta": {"llm": "sealed-blob"}})()
        own = chains(record)._providers[0]
        assert own.name == "workflow-openai" and own.config.public_only is public_only
        assert own.pool().public_only is public_only


@pytest.mark.parametrize("provider", ["openai", "azure_openai"])
def test_a_calls_own_llm_account_gets_nothing_of_the_servers_environment(env, fake_twilio, fake_llm, own_llm,
                                                                          monkeypatch, provider):
    """The openai SDK fills what its client is not given from the environment: the server's OPENAI_ORG_ID and
    OPENAI_PROJECT_ID went out as `OpenAI-Organization`/`OpenAI-Project` headers to whatever URL a make-call body
    named, and an own OpenAI account with no `baseUrl` sent the body's key to the server's OPENAI_BASE_URL (the
    operator's gateway) instead of OpenAI. A request's account now gets only what the request gave (found by the
    outbound audit)."""
    from callweaver.engine.vendors import OPENAI_API_BASE_URL, build_sdk_client, call_account_config, chat_endpoint

    monkeypatch.setenv("OPENAI_ORG_ID", "org-server-own-organization")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj_server_own_project")
    monkeypatch.setenv("OPENAI_BASE_URL", own_llm.url)  # the operator's gateway, as the SDK would read it
    app = create_app({**env, "ALLOW_REQUEST_CREDENTIALS": "1", "ALLOW_PRIVATE_LLM_URLS": "1"})  # fake LLM: http://127.0.0.1
    body = _body(own_llm)
    if provider == "openai":
        body["config"]["llm"] = {"provider": "openai", "openai": {"apiKey": WORKFLOW_KEY, "baseUrl": own_llm.url}}
    own_llm.push(Reply(text="From the workflow's own account."))
    _data, root, _ = _one_turn(app, fake_twilio, body)
    assert "workflow's own account" in root.find("Say").text
    (req,) = own_llm.requests
    assert "openai-organization" not in req.headers and "openai-project" not in req.headers
    assert "server-own" not in json.dumps(req.headers)

    config = call_account_config({"kind": "openai", "apiKey": WORKFLOW_KEY}, "gpt-4o-mini")
    endpoint = chat_endpoint(config, build_sdk_client(config))
    assert f"https://{endpoint.host}/v1/" == OPENAI_API_BASE_URL + "/" and endpoint.port == 443
    server = app.extensions["callweaver"].providers._providers[-1]  # the server's own: still read as configured
    assert server.name == "openai" and server.pool().endpoint.port == fake_llm2_port(env)


def fake_llm2_port(env: dict) -> int:
    from urllib.parse import urlsplit
    return urlsplit(env["OPENAI_BASE_URL"]).port


def test_a_make_call_body_cannot_choose_what_the_servers_llm_account_runs(env, fake_twilio, fake_llm, fake_llm2):
    """make-call is open, and its flow's `config.llm.model` went to the server's own OpenAI-kind provider: any public
    request could pick the most expensive model the operator's key (or gateway: OPENAI_BASE_URL) can reach, a
    thousand times gpt-4o-mini's price per token, or a name it refuses. The server's providers now run their
    configured models; a temperature outside 0–2 or a max_tokens below 1 (refused by every provider) is ignored
    (found by the outbound audit)."""
    app = create_app({**env, "LLM_PROVIDERS": "openai"})
    body = make_call_body()
    body["config"] = {**body["config"], "llm": {"provider": "openai", "model": "o1-pro", "temperature": 7,
                                                "maxTokens": 0, "openai": {"model": "o1-pro"}}}
    fake_llm2.push(Reply(text="Server account."))
    _data, root, _ = _one_turn(app, fake_twilio, body)
    assert "Server account." in root.find("Say").text
    (req,) = fake_llm2.requests
    assert req.body["model"] == "gpt-4o-mini" and "temperature" not in req.body and "max_tokens" not in req.body
    assert fake_llm.requests == []


def test_a_refused_llm_host_does_not_say_whether_it_resolved(env, fake_twilio, own_llm):
    """The refusal said "does not resolve" for a name with no address and "resolves to a non-public address" for one
    with a private address: a public make-call could map which names the server's own (internal) DNS knows. Both
    now get the same answer (found by the outbound audit)."""
    app = create_app({**env, "ALLOW_REQUEST_CREDENTIALS": "1"})
    errors = []
    for host in ("localhost", "no-such-host.invalid"):
        body = _body(own_llm)
        body["config"]["llm"]["azure"]["endpoint"] = f"https://{host}/openai/deployments/d/chat/completions"
        resp = app.test_client().post("/api/make-call", json=body)
        assert resp.status_code == 400
        errors.append(resp.get_json()["error"].replace(host, "HOST"))
    assert errors[0] == errors[1] and "public" in errors[0]
    assert fake_twilio.creates() == []
