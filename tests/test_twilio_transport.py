"""The twilio SDK's transport (callweaver/twilio_client.py `PooledTwilioHttpClient`): Twilio sees exactly the requests
the SDK's own requests-based client sends, the SDK still raises its own errors, and connections are kept alive."""
from __future__ import annotations

import socket
import threading

import pytest
import requests
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from callweaver.twilio_client import STATUS_CALLBACK_EVENTS, PooledTwilioHttpClient, TwilioGateway
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.fakes.fake_twilio import TwilioError

# What the SDK itself sets on every request (client_base.get_headers + auth); requests adds only its own
# Accept-Encoding/Connection/User-Agent defaults, which the SDK's values or ours replace.
SDK_HEADERS = ("Authorization", "User-Agent", "X-Twilio-Client", "Accept-Charset", "Accept", "Content-Type",
               "Content-Length")


def _client(base_url: str, http_client) -> Client:
    client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=http_client)
    client.api.base_url = base_url
    return client


def _place_update_fetch(client: Client) -> None:
    call = client.calls.create(to="+15551234567", from_="+15005550006", url="https://example.test/api/twiml?id=a b",
                               method="POST", status_callback="https://example.test/api/call-status?trackingId=t1",
                               status_callback_method="POST", status_callback_event=STATUS_CALLBACK_EVENTS,
                               timeout=30, record=False)
    client.calls(call.sid).update(status="completed")
    client.calls(call.sid).fetch()


def _seen(request) -> tuple:
    headers = {name.lower(): value for name, value in request.headers.items()}
    return (request.method, request.path, request.body,
            {name: headers.get(name.lower()) for name in SDK_HEADERS})


def test_twilio_sees_the_same_requests_as_from_the_sdks_own_client(fake_twilio):
    _place_update_fetch(_client(fake_twilio.url, TwilioHttpClient(timeout=10, max_retries=0)))
    reference = [_seen(r) for r in fake_twilio.requests]
    fake_twilio.requests.clear()
    _place_update_fetch(_client(fake_twilio.url, PooledTwilioHttpClient(timeout=10)))
    ours = [_seen(r) for r in fake_twilio.requests]
    assert len(ours) == 3 and all(r.auth_ok for r in fake_twilio.requests)
    for (method, path, body, headers), (ref_method, ref_path, ref_body, ref_headers) in zip(ours, reference):
        assert (method, body, headers) == (ref_method, ref_body, ref_headers)
        assert path.split("/Calls")[0] == ref_path.split("/Calls")[0]  # the call SIDs differ, nothing else
    create = fake_twilio.creates()[0]
    assert create.params["StatusCallbackEvent"] == STATUS_CALLBACK_EVENTS and create.one("Record") == "false"


def test_requests_share_one_kept_alive_connection(fake_twilio):
    client = _client(fake_twilio.url, PooledTwilioHttpClient(timeout=10))
    _place_update_fetch(client)
    _place_update_fetch(client)
    assert len({r.client_port for r in fake_twilio.requests}) == 1


def test_requests_over_https_share_one_kept_alive_connection(tmp_path, monkeypatch):
    """Twilio's API is HTTPS: the pool's check that an idle TLS connection is still open must not raise. It peeked
    with MSG_PEEK, which raises ValueError on an SSLSocket, so every Twilio request after a worker's first failed
    (found by a review of the LLM client, which shares the pool)."""
    from tests.fakes.fake_twilio import FakeTwilio
    from tests.fakes.tls import localhost_tls

    cert_file, server_tls = localhost_tls(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))  # trusted as requests would trust it
    fake = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).start(tls=server_tls)
    try:
        assert fake.url.startswith("https://")
        _place_update_fetch(_client(fake.url, PooledTwilioHttpClient(timeout=10)))
        assert len(fake.requests) == 3 and all(r.auth_ok for r in fake.requests)
        assert len({r.client_port for r in fake.requests}) == 1  # one connection, kept alive
    finally:
        fake.stop()


def test_twilio_errors_are_the_sdks_own_exceptions(fake_twilio):
    fake_twilio.error = TwilioError(status=400, code=21211, message="The 'To' number is not a valid phone number.")
    caught = []
    for http_client in (TwilioHttpClient(timeout=10, max_retries=0), PooledTwilioHttpClient(timeout=10)):
        with pytest.raises(TwilioRestException) as error:
            _client(fake_twilio.url, http_client).calls.create(to="+1555", from_="+15005550006",
                                                               url="https://example.test/")
        caught.append((error.value.status, error.value.code, error.value.msg, error.value.method))
    assert caught[0] == caught[1]
    assert caught[0][:2] == (400, 21211) and "not a valid phone number" in caught[0][2]
    with pytest.raises(TwilioRestException) as missing:
        _client(fake_twilio.url, PooledTwilioHttpClient(timeout=10)).calls("CA" + "0" * 32).fetch()
    assert missing.value.status == 404


def test_unreachable_twilio_raises_what_requests_raises():
    with socket.socket() as listener:  # a port nobody listens on once closed
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    client = _client(f"http://127.0.0.1:{port}", PooledTwilioHttpClient(timeout=5))
    with pytest.raises(requests.exceptions.ConnectionError):
        client.calls.create(to="+15551234567", from_="+15005550006", url="https://example.test/")


def test_a_silent_twilio_times_out_as_requests_does():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts (the kernel does) and never answers
    try:
        client = _client(f"http://127.0.0.1:{listener.getsockname()[1]}", PooledTwilioHttpClient(timeout=0.3))
        with pytest.raises(requests.exceptions.Timeout):
            client.calls.create(to="+15551234567", from_="+15005550006", url="https://example.test/")
    finally:
        listener.close()


def test_a_call_sid_cannot_add_headers_or_escape_its_path(fake_twilio):
    client = _client(fake_twilio.url, PooledTwilioHttpClient(timeout=10))
    with pytest.raises(TwilioRestException):
        client.calls("CA1\r\nX-Injected: 1\r\n").fetch()
    (seen,) = fake_twilio.requests
    assert "X-Injected" not in seen.headers  # line breaks dropped (urlsplit), the space escaped
    assert seen.target.endswith("/Calls/CA1X-Injected:%201.json")


def test_the_environments_proxy_carries_twilio_requests(fake_twilio, monkeypatch):
    """HTTP_PROXY as requests reads it: the stand-in plays the proxy and receives the absolute-form request."""
    monkeypatch.setenv("HTTP_PROXY", fake_twilio.url)
    monkeypatch.setenv("http_proxy", fake_twilio.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    for http_client in (TwilioHttpClient(timeout=10, max_retries=0), PooledTwilioHttpClient(timeout=10)):
        _client("http://api.twilio.test", http_client).calls.create(to="+15551234567", from_="+15005550006",
                                                                    url="https://example.test/")
    reference, ours = fake_twilio.requests
    assert ours.target == reference.target == f"http://api.twilio.test/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
    assert ours.body == reference.body and ours.auth_ok


def test_one_off_credentials_use_the_same_transport_and_their_own_auth(fake_twilio):
    gateway = TwilioGateway(ACCOUNT_SID, "not-the-token", fake_twilio.url)
    gateway.create_call(to="+15551234567", from_number="+15005550006", url="https://example.test/",
                        status_callback="https://example.test/s", timeout_s=30, time_limit_s=3600,
                        record=False, credentials=(ACCOUNT_SID, AUTH_TOKEN))
    assert [r.auth_ok for r in fake_twilio.requests] == [True]
    assert gateway.client((ACCOUNT_SID, AUTH_TOKEN)).http_client is gateway.client().http_client


def test_the_transport_is_safe_across_threads(fake_twilio):
    client = _client(fake_twilio.url, PooledTwilioHttpClient(timeout=10))
    errors = []

    def place() -> None:
        try:
            client.calls.create(to="+15551234567", from_="+15005550006", url="https://example.test/")
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=place) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(fake_twilio.creates()) == 8
