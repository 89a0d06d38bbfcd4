"""gunicorn.conf.py worker hooks: once the worker's app has loaded, the start-up objects are frozen out of the cyclic
collector's passes."""
from __future__ import annotations

import gc
import runpy
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from callweaver.services import OsThreadWork, Services

REPO = Path(__file__).resolve().parents[1]
SIGTERM_HANDLER_AT_IMPORT = signal.getsignal(signal.SIGTERM)


@pytest.fixture(autouse=True)
def sigterm_handler_restored():
    """post_worker_init installs the worker's SIGTERM handler process-wide: put pytest's back after each test."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


class FakeServices:
    """The hooks' view of the worker's services: background jobs, and work to run once the warm-up has finished."""

    def __init__(self) -> None:
        self.started: list[bool] = []
        self.after_warm_up: list = []

    def start_background_jobs(self) -> None:
        self.started.append(True)

    def when_warm(self, fn) -> None:
        self.after_warm_up.append(fn)


class FakeLoader:
    """wsgi.py's AppLoader as the hooks see it: `app` is its bound method `wsgi`; work queued for once it has loaded."""

    def __init__(self, services: FakeServices) -> None:
        self.app = SimpleNamespace(extensions={"callweaver": services})
        self.queued: list = []

    def wsgi(self, environ, start_response):  # noqa: ANN001
        raise AssertionError("not served in these tests")

    def when_loaded(self, fn) -> None:
        self.queued.append(fn)

    def finish_loading(self) -> None:
        for fn in self.queued:
            fn(self.app)


def worker_loading(services: FakeServices) -> tuple[SimpleNamespace, FakeLoader]:
    loader = FakeLoader(services)
    return SimpleNamespace(wsgi=loader.wsgi), loader


def test_a_worker_loads_with_the_collector_off_then_freezes_what_it_loaded_and_collects_again(monkeypatch):
    untracked_greenlet_tree(monkeypatch)
    hooks = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    services = FakeServices()
    worker, loader = worker_loading(services)
    try:
        hooks["post_fork"](None, worker)
        assert not gc.isenabled()  # imports and app build: no passes over objects that live as long as the worker
        loaded = [[] for _ in range(10)]  # containers, which the collector tracks
        hooks["post_worker_init"](worker)
        assert services.started == [] and not gc.isenabled()  # the app is still loading in the background
        loader.finish_loading()
        assert services.started == [True]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(loaded)  # full passes no longer walk them
    finally:
        gc.unfreeze()
        gc.enable()


def untracked_greenlet_tree(monkeypatch) -> None:
    """post_fork switches gevent's track_greenlet_tree off for the process; put it back after the test."""
    import gevent
    monkeypatch.setattr(gevent.config, "track_greenlet_tree", gevent.config.track_greenlet_tree)


def test_a_worker_spawns_greenlets_without_spawn_tree_records_unless_the_operator_asked(monkeypatch):
    """gevent's track_greenlet_tree would make each live call's request greenlet keep its spawner, the spawner's
    locals and a capture of the spawning stack; the operator's own GEVENT_TRACK_GREENLET_TREE still wins."""
    import gevent
    untracked_greenlet_tree(monkeypatch)
    hooks = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    monkeypatch.delenv("GEVENT_TRACK_GREENLET_TREE", raising=False)
    gevent.config.track_greenlet_tree = True
    hooks["greenlet_tree_untracked"]()
    assert gevent.config.track_greenlet_tree is False
    greenlet = gevent.spawn(lambda: None)
    assert not hasattr(greenlet, "spawning_stack") or greenlet.spawning_stack is None
    greenlet.join()

    gevent.config.track_greenlet_tree = True
    monkeypatch.setenv("GEVENT_TRACK_GREENLET_TREE", "true")
    hooks["greenlet_tree_untracked"]()
    assert gevent.config.track_greenlet_tree is True


def test_what_the_warm_up_thread_builds_is_frozen_once_it_has_finished():
    hooks = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    services = FakeServices()
    worker, loader = worker_loading(services)
    try:
        hooks["post_fork"](None, worker)
        hooks["post_worker_init"](worker)
        loader.finish_loading()
        assert len(services.after_warm_up) == 1
        frozen_before = gc.get_freeze_count()
        built_by_warm_up = [[] for _ in range(10)]  # the SDK clients, imported modules
        services.after_warm_up[0]()
        assert gc.get_freeze_count() >= frozen_before + len(built_by_warm_up)
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_work_queued_for_after_the_warm_up_runs_only_once_it_has_finished():
    services = Services.__new__(Services)  # only the warm-up's state: no app, store or clients
    release = threading.Event()
    ran: list[bool] = []
    services._sdk_warm_up = OsThreadWork(release.wait)
    task = services.when_warm(lambda: ran.append(True))
    task.join(timeout=0.2)
    assert ran == []
    release.set()
    task.join(timeout=10)
    assert ran == [True]


def test_until_the_worker_serves_entry_points_are_read_once_then_afresh_again():
    """gevent's monkey-patching reads every installed distribution's entry points for each of its 25 plugin
    events; while the worker starts they are read once, with the same answers, and the standard function is back
    before the worker serves (and so before the app is imported)."""
    from importlib import metadata
    hooks = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    standard = metadata.entry_points
    worker, _loader = worker_loading(FakeServices())
    try:
        hooks["post_fork"](None, worker)
        read_once = metadata.entry_points
        assert read_once is not standard
        for group in ("gevent.plugins.monkey.will_patch_all", "gevent.plugins.monkey.did_patch_all",
                      "console_scripts"):
            assert list(read_once(group=group)) == list(standard(group=group))
        hooks["post_worker_init"](worker)
        assert metadata.entry_points is standard
    finally:
        metadata.entry_points = standard
        gc.enable()


def test_once_the_worker_serves_the_collector_runs_with_the_live_call_thresholds():
    hooks = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    services = FakeServices()
    worker, loader = worker_loading(services)
    defaults = gc.get_threshold()
    try:
        hooks["post_fork"](None, worker)
        hooks["post_worker_init"](worker)
        loader.finish_loading()
        assert gc.get_threshold() == hooks["LIVE_CALL_GC_THRESHOLDS"]
    finally:
        gc.set_threshold(*defaults)
        gc.unfreeze()
        gc.enable()


def test_the_live_call_thresholds_keep_young_passes_short_and_full_passes_rare_but_bounded():
    """At 800 calls a generation-1 pass over 10 young passes of 7000 allocations each paused every call for 28-48 ms;
    over 10 of 700, 10-21 ms. Full passes stay ~7 million net allocations apart, as issue 12p set them
    (docs/performance-history.md, "Issue 12q")."""
    young, middle, old = runpy.run_path(str(REPO / "gunicorn.conf.py"))["LIVE_CALL_GC_THRESHOLDS"]
    assert young * middle <= 7000
    # Full passes rarer than CPython's default (700, 10, 10), but often enough that ended calls' cyclic garbage
    # (only a full pass frees it) cannot pile up to hundreds of MiB: (700, 10, 1000) let ~15-20 thousand calls' wait.
    assert 700 * 10 * 10 < young * middle * old <= 1_000_000


def test_the_hooks_tests_leave_the_process_sigterm_handler_as_they_found_it():
    """post_worker_init installs a SIGTERM handler for the worker process; in pytest's process it must not outlive
    the test that called it (this runs after them, in file order)."""
    assert signal.getsignal(signal.SIGTERM) is SIGTERM_HANDLER_AT_IMPORT
