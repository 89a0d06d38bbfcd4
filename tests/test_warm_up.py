"""Worker start: the providers' SDK clients are built in an OS thread after the app is built; health checks answer
meanwhile, and every other request waits until they are built (so no call's turn pays for them)."""
from __future__ import annotations

import threading

from callweaver.engine.providers import ProviderChain

SETTLE_S = 0.3      # how long a request is given to (wrongly) get past the warm-up gate
WAIT_S = 15.0       # generous bound on a request that may proceed


def test_health_answers_while_sdk_clients_are_built_and_other_requests_wait(env, monkeypatch):
    release = threading.Event()
    building = threading.Event()
    built_by = []
    original = ProviderChain.warm_up

    def slow_warm_up(chain: ProviderChain) -> None:
        building.set()
        release.wait(WAIT_S)
        built_by.append(threading.current_thread())
        original(chain)

    monkeypatch.setattr(ProviderChain, "warm_up", slow_warm_up)
    from callweaver import create_app
    app = create_app(env)  # returns while the SDK clients are still being built
    assert building.wait(WAIT_S)
    client = app.test_client()
    assert client.get("/health").status_code == 200
    assert client.get("/ping").status_code == 200

    answered = []
    waiting = threading.Thread(target=lambda: answered.append(app.test_client().get("/api/twilio-config")))
    waiting.start()
    waiting.join(SETTLE_S)
    assert not answered, "a request that may need the SDK clients was answered before they were built"
    release.set()
    waiting.join(WAIT_S)
    assert answered and answered[0].status_code == 200
    assert built_by and built_by[0] is not threading.main_thread()
    assert all(p._pool is not None for p in app.extensions["callweaver"].providers._providers)


def test_a_failed_warm_up_does_not_block_requests(env, monkeypatch):
    def broken(chain: ProviderChain) -> None:
        raise RuntimeError("cannot build")

    monkeypatch.setattr(ProviderChain, "warm_up", broken)
    from callweaver import create_app
    app = create_app(env)
    assert app.test_client().get("/api/twilio-config").status_code == 200
