"""ApiError: a client-visible failure with its HTTP status, raised anywhere below the routes."""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Mapped by errors.init_errors to {"success": false, "error": message, **extra} with `status`."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra
