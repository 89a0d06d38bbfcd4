"""What gunicorn.conf.py reads in gunicorn's master for gunicorn itself (it checks config.Settings there too), and the
one way a numeric variable is read (config.Settings reads every other one with it). Import-light on purpose: the
standard library only, since the master imports it before forking the workers."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

MAX_TCP_PORT = 65535
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Node loggers' names for the same levels (pino, winston): what a carried-over Node deploy's LOG_LEVEL may say.
LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "ERROR", "CRITICAL": "ERROR", "TRACE": "DEBUG"}


class ConfigError(ValueError):
    """Raised at start with every bad variable named, so a deploy fails loudly and early."""

    def __init__(self, problems: list[str]):
        super().__init__("Invalid configuration: " + "; ".join(problems))
        self.problems = problems


def read_number(env: Mapping[str, Any], name: str, default: Any, kind: type = float, low: float | None = None,
                high: float | None = None) -> tuple[Any, str | None]:
    """One numeric variable: its value (the default when unset or empty) and the problem with it, if any. Shared by
    Settings.from_env and server_settings (gunicorn's master), so both say the same about the same value."""
    raw = env.get(name)
    if raw is None or str(raw).strip() == "":
        return default, None
    try:
        val = kind(str(raw).strip())
        if not math.isfinite(val):  # "nan" passed every bound below; "inf" is no duration or size
            raise ValueError(raw)
    except ValueError:
        return default, f"{name} must be a {'whole ' if kind is int else ''}number (the value is not shown)"
    except OverflowError:  # a whole number too large for math.isfinite's float
        return default, f"{name} is too large"
    if low is not None and val < low:
        return default, f"{name} must be >= {low}"
    if high is not None and val > high:
        return default, f"{name} must be <= {high}"
    return val, None


def read_log_level(env: Mapping[str, Any]) -> tuple[str, str | None]:
    """LOG_LEVEL as one of LOG_LEVELS, and a warning when it named none: read as INFO, since a log level no logger
    here knows (winston's verbose) is no reason for a service that does not start. Shared by gunicorn's master and
    Settings, so both log at the same level."""
    raw = str(env.get("LOG_LEVEL") or "").strip()
    level = raw.upper() or "INFO"
    level = LOG_LEVEL_ALIASES.get(level, level)
    if level in LOG_LEVELS:
        return level, None
    return "INFO", f"LOG_LEVEL is {raw[:40]!r}, not DEBUG, INFO, WARNING or ERROR: read as INFO"


def server_settings(environ: Mapping[str, Any]) -> dict[str, Any]:
    """The variables gunicorn.conf.py reads in gunicorn's master, before any worker (and so before Settings) exists:
    typed, or ConfigError naming every bad one, so a typo stops gunicorn with a message instead of a traceback (or,
    for WEB_CONCURRENCY=0, a master that listens with no worker to answer). Import-light: the standard library."""
    problems: list[str] = []

    def whole(name: str, default: int, low: int, high: int | None = None) -> int:
        value, problem = read_number(environ, name, default, int, low, high)
        if problem:
            problems.append(problem)
        return value

    port = whole("PORT", 3000, 1, MAX_TCP_PORT)
    default_workers = max(1, min(os.cpu_count() or 1, 4))
    workers = whole("WEB_CONCURRENCY", default_workers, 1)
    worker_connections = whole("WORKER_CONNECTIONS", 1000, 1)
    timeout = whole("GUNICORN_TIMEOUT", 60, 0)  # gunicorn: 0 turns the worker timeout off
    graceful_timeout = whole("GUNICORN_GRACEFUL_TIMEOUT", 25, 0)
    log_level, _ = read_log_level(environ)  # a worker's Settings logs the warning (and /health lists it)
    if problems:
        raise ConfigError(problems)
    return {"port": port, "workers": workers, "worker_connections": worker_connections, "timeout": timeout,
            "graceful_timeout": graceful_timeout, "log_level": log_level,
            "forwarded_allow_ips": environ.get("FORWARDED_ALLOW_IPS", "*")}
