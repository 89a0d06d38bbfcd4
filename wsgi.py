"""Production entry point: gevent patches the standard library before anything else is imported. The app then
loads in the background while /health and /ping answer that it is starting (callweaver/boot.py): a cold start on
a fractional CPU answers its health check in a fraction of the time the imports take."""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from callweaver import create_app as build_app  # noqa: E402  (must follow patch_all; the package root imports nothing)
from callweaver.boot import AppLoader  # noqa: E402
from callweaver.cors import CorsPolicy  # noqa: E402
from callweaver.server_config import ConfigError  # noqa: E402  (import-light: the standard library)

if TYPE_CHECKING:  # flask is imported by the app's loader, off the request path, not here
    from flask import Flask

# The CORS policy create_app will configure (the same environment): a browser's /health is answered meanwhile.
loader = AppLoader(modules=("callweaver.app",), build=build_app, cors=CorsPolicy.from_env(os.environ))
app = loader.wsgi


def create_app() -> "Flask":
    """The factory `flask --app wsgi <command>` finds (callweaver/cli.py): a bad setting ends the command with one
    line naming it, as it stops a worker, rather than a traceback."""
    try:
        return build_app()
    except ConfigError as bad:
        import click
        raise click.ClickException(str(bad)) from None
