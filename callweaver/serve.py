"""The production start command (render.yaml): `python -m callweaver.serve [gunicorn options]` runs
`gunicorn -c gunicorn.conf.py [options] wsgi:app` in this process, as the `gunicorn` command would, once gunicorn's own
variables have been checked. Why: gunicorn reads WEB_CONCURRENCY as it is imported (its `workers` default), before
gunicorn.conf.py names a bad variable in one line, so `WEB_CONCURRENCY=two` stopped it with a traceback that printed
the value. Import-light: the standard library only until gunicorn runs."""
from __future__ import annotations

import os
import shutil
import sys

from .server_config import ConfigError, server_settings

CONFIG_FILE = "gunicorn.conf.py"
APP = "wsgi:app"


def gunicorn_script() -> str:
    """The `gunicorn` command installed with this interpreter's gunicorn. gunicorn's USR2 upgrade re-executes the
    master as `sys.executable` + `sys.argv`, so argv[0] must be a script that runs gunicorn: its package's
    __main__.py (what `python -m gunicorn` and runpy put there) does not, since run as a script its own folder comes
    first on sys.path and its `http` package hides the standard library's."""
    script = os.path.join(os.path.dirname(sys.executable), "gunicorn")  # a venv's (or pyenv's) bin, where pip put it
    return script if os.path.isfile(script) else shutil.which("gunicorn") or "gunicorn"


def main(options: list[str]) -> None:
    """Check gunicorn's variables (one line naming each bad one, exit status 1), then run gunicorn with `options`."""
    try:
        server_settings(os.environ)
    except ConfigError as bad:
        raise SystemExit(f"callweaver.serve: {bad}") from None
    sys.argv = [gunicorn_script(), "-c", CONFIG_FILE, *options, APP]  # gunicorn parses sys.argv
    from gunicorn.app.wsgiapp import run  # the `gunicorn` command's own entry point

    run(prog="gunicorn")


if __name__ == "__main__":
    main(sys.argv[1:])
