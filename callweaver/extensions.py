"""Stateless extension handles, bound to the app in create_app."""
from flask_caching import Cache
from flask_sock import Sock

cache = Cache()
sock = Sock()
