"""The engine is plain Python: importing any of its modules must not import Flask."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import callweaver.engine
from tests.fakes.live_server import REPO


def test_no_engine_module_imports_flask():
    modules = [f"callweaver.engine.{m.name}" for m in pkgutil.iter_modules(callweaver.engine.__path__)]
    assert "callweaver.engine.conversation" in modules and "callweaver.engine.providers" in modules
    code = ("import sys, importlib\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m == 'flask' or m.startswith(('flask.', 'flask_')))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"engine pulled in: {out.stdout.strip()}"
