"""The production start command (render.yaml): `python -m callweaver.serve [gunicorn options]` runs
`gunicorn -c gunicorn.conf.py [options] wsgi:app` in this process, as `python -m gunicorn` would, once gunicorn's own
variables have been checked. Why: gunicorn reads WEB_CONCURRENCY as it is imported (its `workers` default), before
gunicorn.conf.py names a bad variable in one line, so `WEB_CONCURRENCY=two` stopped it with a traceback that printed
the value. Import-light: the standard library only until gunicorn runs."""
from __future__ import annotations

import os
import runpy
import sys

from .server_config import ConfigError, server_settings

CONFIG_FILE = "gunicorn.conf.py"
APP = "wsgi:app"


def main(options: list[str]) -> None:
    """Check gunicorn's variables (one line naming each bad one, exit status 1), then run gunicorn with `options`."""
    try:
        server_settings(os.environ)
    except ConfigError as bad:
        raise SystemExit(f"callweaver.serve: {bad}") from None
    # gunicorn parses sys.argv; run_module sets argv[0] to gunicorn's own __main__, so a re-exec (USR2) runs gunicorn.
    sys.argv = ["gunicorn", "-c", CONFIG_FILE, *options, APP]
    runpy.run_module("gunicorn", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
