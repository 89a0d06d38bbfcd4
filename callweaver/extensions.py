"""Stateless extension handles, bound to the app in create_app."""
from flask_sock import Sock

sock = Sock()
