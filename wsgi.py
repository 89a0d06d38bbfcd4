"""Production entry point: gevent patches the standard library before anything else is imported. The app then
loads in the background while /health and /ping answer that it is starting (callweaver/boot.py): a cold start on
a fractional CPU answers its health check in a fraction of the time the imports take."""
from gevent import monkey

monkey.patch_all()

from callweaver import create_app  # noqa: E402  (must follow patch_all; the package root imports nothing)
from callweaver.boot import AppLoader  # noqa: E402

loader = AppLoader(modules=("callweaver.app",), build=create_app)
app = loader.wsgi
