"""gunicorn.conf.py worker hooks: the start-up objects are frozen out of the cyclic collector's passes."""
from __future__ import annotations

import gc
import runpy
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


def test_a_worker_loads_with_the_collector_off_then_freezes_what_it_loaded_and_collects_again():
    hooks = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    started = []
    worker = SimpleNamespace(wsgi=SimpleNamespace(extensions={
        "callweaver": SimpleNamespace(start_background_jobs=lambda: started.append(True))}))
    try:
        hooks["post_fork"](None, worker)
        assert not gc.isenabled()  # imports and app build: no passes over objects that live as long as the worker
        loaded = [[] for _ in range(10)]  # containers, which the collector tracks
        hooks["post_worker_init"](worker)
        assert started == [True]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(loaded)  # full passes no longer walk them
    finally:
        gc.unfreeze()
        gc.enable()
