"""CallWeaver: AI phone calls from Call Flow Weaver workflows, over Twilio.

The package root stays import-light so the engine (plain Python) can be used without loading Flask.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

__version__ = "2.1.0"

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: Mapping[str, Any] | None = None) -> "Flask":
    """Build one worker's app (see callweaver.app); `config` overrides environment variables by name."""
    from .app import create_app as build
    return build(config)
