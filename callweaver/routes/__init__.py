"""HTTP and WebSocket edge: one blueprint per concern; each only parses, calls the services and shapes output."""
from flask import Flask


def register_blueprints(app: Flask) -> None:
    from . import call_log, calls, chat, health, metrics, relay, twiml
    for module in (health, calls, twiml, relay, chat, metrics, call_log):
        app.register_blueprint(module.bp)
