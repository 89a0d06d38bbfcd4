"""Production entry point: gevent patches the standard library before anything else is imported."""
from gevent import monkey

monkey.patch_all()

from callweaver import create_app  # noqa: E402  (must follow patch_all)

app = create_app()
