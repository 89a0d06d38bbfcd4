"""wsgi.py's loader with the app's load held until a file exists (HELD_WSGI_RELEASE), so a test can watch the real
loader answer under real gunicorn while the app is loading, then the loaded app answer the same requests."""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

import gevent  # noqa: E402

from callweaver import create_app  # noqa: E402
from callweaver.boot import AppLoader  # noqa: E402
from callweaver.cors import CorsPolicy  # noqa: E402


def held_build():
    while not os.path.exists(os.environ["HELD_WSGI_RELEASE"]):
        gevent.sleep(0.05)
    return create_app()


loader = AppLoader(modules=("callweaver.app",), build=held_build, cors=CorsPolicy.from_env(os.environ))
app = loader.wsgi
