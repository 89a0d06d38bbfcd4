"""Shared fixtures: real loopback fakes for Twilio and the LLM vendors, the app, and the live gunicorn server."""
from __future__ import annotations

import pytest

from callweaver.simulate.webhooks import twilio_signature
from tests.fakes.fake_twilio import FakeTwilio

ACCOUNT_SID = "AC" + "a1" * 16
AUTH_TOKEN = "f" * 31 + "1"
PHONE = "+15005550006"
PUBLIC = "https://callweaver.test"


@pytest.fixture
def fake_twilio():
    fake = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_llm():
    from tests.fakes.fake_llm import FakeLLM
    fake = FakeLLM("primary").start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_llm2():
    from tests.fakes.fake_llm import FakeLLM
    fake = FakeLLM("secondary").start()
    yield fake
    fake.stop()


def base_env(tmp_path, fake_twilio, fake_llm=None, fake_llm2=None) -> dict[str, str]:
    env = {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_PHONE_NUMBER": PHONE,
        "TWILIO_API_BASE_URL": fake_twilio.url, "CALLWEAVER_DB": str(tmp_path / "cw.sqlite3"),
        "CACHE_DIR": str(tmp_path / "cache"), "PUBLIC_BASE_URL": PUBLIC, "LOG_LEVEL": "WARNING",
        "SECRET_KEY": "test-secret-key-16", "CACHE_PREWARM": "0", "LLM_PROVIDERS": "azure,openai",
        "AZURE_OPENAI_API_KEY": "", "OPENAI_API_KEY": "", "REDIS_URL": "",
    }
    if fake_llm is not None:
        env.update(AZURE_OPENAI_API_KEY="azure-test-key-123",
                   AZURE_OPENAI_ENDPOINT=fake_llm.azure_full_endpoint(), LLM_FIRST_TOKEN_TIMEOUT_S="1.0")
    if fake_llm2 is not None:
        env.update(OPENAI_API_KEY="sk-test-openai-000000", OPENAI_BASE_URL=fake_llm2.url)
    return env


@pytest.fixture
def env(tmp_path, fake_twilio, fake_llm, fake_llm2):
    return base_env(tmp_path, fake_twilio, fake_llm, fake_llm2)


@pytest.fixture
def app(env):
    from callweaver import create_app
    return create_app(env)


@pytest.fixture
def client(app):
    return app.test_client()


class Signer:
    """Signs Flask-test-client webhooks as Twilio would for the configured PUBLIC_BASE_URL."""

    def __init__(self, client, token: str = AUTH_TOKEN, public: str = PUBLIC):
        self.client, self.token, self.public = client, token, public

    def post(self, path_and_query: str, params: dict, *, sign: bool = True, signature: str | None = None):
        headers = {}
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        elif sign:
            headers["X-Twilio-Signature"] = twilio_signature(self.token, self.public + path_and_query, params)
        return self.client.post(path_and_query, data=params, headers=headers)

    def get(self, path_and_query: str, *, sign: bool = True):
        headers = {"X-Twilio-Signature": twilio_signature(self.token, self.public + path_and_query, {})} if sign else {}
        return self.client.get(path_and_query, headers=headers)


@pytest.fixture
def twilio(client):
    return Signer(client)


@pytest.fixture
def receiver():
    """A local end-of-call report receiver (CALL_REPORT_URL), answering at once."""
    from tests.fakes.report_receiver import ReportReceiver
    r = ReportReceiver().start()
    yield r
    r.stop()
