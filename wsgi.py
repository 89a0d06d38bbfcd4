"""Production entry point: gevent patches the standard library before anything else is imported. The app then
loads in the background while /health and /ping answer that it is starting (callweaver/boot.py): a cold start on
a fractional CPU answers its health check in a fraction of the time the imports take."""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

from callweaver import create_app  # noqa: E402  (must follow patch_all; the package root imports nothing)
from callweaver.boot import AppLoader  # noqa: E402
from callweaver.cors import CorsPolicy  # noqa: E402

# The CORS policy create_app will configure (the same environment): a browser's /health is answered meanwhile.
loader = AppLoader(modules=("callweaver.app",), build=create_app, cors=CorsPolicy.from_env(os.environ))
app = loader.wsgi
