"""The reply cache's storage: flask-caching's backends (SimpleCache, FileSystemCache, RedisCache) and SQLiteCache,
a flask-caching backend in one SQLite file that every worker of a machine shares."""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any, Callable

from flask_caching.backends.base import BaseCache

from .engine.cache import LOCAL_CACHE_MAX_ENTRIES, REDIS_SOCKET_TIMEOUT_S

# SQLiteCache: file name inside CACHE_DIR; an operation waits at most this long for another worker's write,
# in steps of SQLITE_CACHE_RETRY_S slept in Python (a gevent sleep), never inside SQLite's C busy handler, whose
# sleep would freeze every call on the worker.
SQLITE_CACHE_FILE = "reply-cache.sqlite3"
SQLITE_CACHE_BUSY_TIMEOUT_S = 0.5
SQLITE_CACHE_RETRY_S = 0.002
# Expired and surplus entries are pruned on one write in this many (the count query is not free).
SQLITE_CACHE_PRUNE_EVERY_N_WRITES = 200

_SQLITE_CACHE_SCHEMA = """
CREATE TABLE IF NOT EXISTS cw_cache (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    expires_at REAL NOT NULL  -- epoch seconds; 0 = never
) WITHOUT ROWID
"""


class SQLiteCache(BaseCache):
    """A flask-caching backend in one SQLite (WAL) file, shared by every worker process on a machine.

    Why not FileSystemCache: a lookup here is one indexed read of a page the OS already caches, a write is one
    row (no temp file + rename + count file), and `add` is atomic across processes (one INSERT), which the
    prewarm markers need. Values are JSON (the reply cache stores plain dicts and strings); anything else is
    refused (`set` returns False) instead of being pickled.
    """

    def __init__(self, path: str, *, threshold: int = LOCAL_CACHE_MAX_ENTRIES, default_timeout: int = 300,
                 ignore_delete_many_errors: bool = False, clock: Callable[[], float] = time.time) -> None:
        super().__init__(default_timeout=default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        self.path = path
        self.threshold = threshold
        self._clock = clock
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._writes = 0

    @classmethod
    def factory(cls, app: Any, config: dict, args: list, kwargs: dict) -> "SQLiteCache":
        """flask-caching's CACHE_TYPE hook: the file lives in CACHE_DIR."""
        directory = config.get("CACHE_DIR") or "instance/cache"
        kwargs.setdefault("threshold", config.get("CACHE_THRESHOLD", LOCAL_CACHE_MAX_ENTRIES))
        kwargs.setdefault("default_timeout", config.get("CACHE_DEFAULT_TIMEOUT", 300))
        return cls(os.path.join(directory, SQLITE_CACHE_FILE), *args, **kwargs)

    # -- connection (one per process, opened after the fork) -------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # A cache may lose its last writes in an OS crash; it must never make a turn wait for fsync.
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute(_SQLITE_CACHE_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _execute(self, sql: str, params: tuple = ()) -> tuple[Any, int]:
        """(first row or None, rows changed). While another worker holds the write lock (SQLITE_BUSY) this
        retries up to the busy timeout, sleeping outside the connection's lock, so this worker's lookups
        never queue behind a waiting write."""
        deadline = time.monotonic() + SQLITE_CACHE_BUSY_TIMEOUT_S
        while True:
            if self._pid != os.getpid():  # inherited across a fork: never use the parent's handle
                self._pid, self._lock, self._conn = os.getpid(), threading.Lock(), None
            try:
                with self._lock:
                    if self._conn is None:
                        self._conn = self._open()
                    cursor = self._conn.execute(sql, params)
                    return cursor.fetchone(), cursor.rowcount
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(SQLITE_CACHE_RETRY_S)

    def close(self) -> None:
        """Close this process's connection (tests); the next operation reopens it."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- the cachelib API ----------------------------------------------------------------------------------

    def _expires_at(self, timeout: Any) -> float:
        seconds = self._normalize_timeout(timeout)
        return 0.0 if seconds == 0 else self._clock() + seconds

    def get(self, key: str) -> Any:
        row, _ = self._execute("SELECT value, expires_at FROM cw_cache WHERE key = ?", (key,))
        if row is None or (row[1] and row[1] <= self._clock()):
            return None
        return json.loads(row[0])

    def has(self, key: str) -> bool:
        row, _ = self._execute("SELECT 1 FROM cw_cache WHERE key = ? AND (expires_at = 0 OR expires_at > ?)",
                               (key, self._clock()))
        return row is not None

    def set(self, key: str, value: Any, timeout: Any = None) -> bool:
        try:
            encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):
            return False
        self._execute("INSERT INTO cw_cache (key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT(key) DO "
                      "UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                      (key, encoded, self._expires_at(timeout)))
        self._after_write()
        return True

    def add(self, key: str, value: Any, timeout: Any = None) -> bool:
        """Store only if absent or expired, in one statement: of two workers adding at once, exactly one wins."""
        try:
            encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):
            return False
        now = self._clock()
        _, changed = self._execute(
            "INSERT INTO cw_cache (key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "value = excluded.value, expires_at = excluded.expires_at "
            "WHERE cw_cache.expires_at != 0 AND cw_cache.expires_at <= ?",
            (key, encoded, self._expires_at(timeout), now))
        self._after_write()
        return changed == 1

    def delete(self, key: str) -> bool:
        return self._execute("DELETE FROM cw_cache WHERE key = ?", (key,))[1] == 1

    def clear(self) -> bool:
        self._execute("DELETE FROM cw_cache")
        return True

    def _after_write(self) -> None:
        """Now and then drop expired entries, then the soonest-expiring ones beyond the threshold."""
        self._writes += 1
        if self._writes % SQLITE_CACHE_PRUNE_EVERY_N_WRITES:
            return
        self._execute("DELETE FROM cw_cache WHERE expires_at != 0 AND expires_at <= ?", (self._clock(),))
        surplus = self._execute("SELECT COUNT(*) FROM cw_cache")[0][0] - self.threshold
        if surplus > 0:
            self._execute("DELETE FROM cw_cache WHERE key IN (SELECT key FROM cw_cache WHERE expires_at != 0 "
                          "ORDER BY expires_at LIMIT ?)", (surplus,))


class UnavailableCache(BaseCache):
    """A backend that could not be built (FileSystemCache whose CACHE_DIR cannot be made or read). Every operation
    fails with that error, which the reply cache counts as a miss and its health check reports, as SQLiteCache does
    with a directory it cannot make: the worker serves without the cache rather than stopping after its loader has
    answered /health 200 (gunicorn's master checks the settings, not the file system)."""

    def __init__(self, kind: str, error: OSError) -> None:
        super().__init__()
        self.reason = f"{kind} could not be built in CACHE_DIR: {type(error).__name__}: {error.strerror or error}"

    def _unavailable(self, *_args: Any, **_kwargs: Any) -> Any:
        raise OSError(self.reason)

    get = set = add = delete = has = clear = _unavailable


def build_cache_backend(cache_type: str, *, redis_url: str | None, cache_dir: str, default_timeout: int) -> Any:
    """The reply cache's backend from settings.

    Auto ("") picks Redis when there is one (shared by every instance), else SQLiteCache in CACHE_DIR (shared by
    every worker of the machine): a call's webhooks and its relay socket may land on different workers, and
    a per-process cache would miss on the other one. bench/cache.py compares it with FileSystemCache and the
    per-process SimpleCache (`python -m bench.cache --backends`).
    """
    from flask_caching.backends import FileSystemCache, NullCache, RedisCache, SimpleCache

    kind = (cache_type or "").strip()
    if not kind:
        kind = "RedisCache" if redis_url else "SQLiteCache"
    if kind == "SQLiteCache":
        return SQLiteCache(os.path.join(cache_dir, SQLITE_CACHE_FILE), threshold=LOCAL_CACHE_MAX_ENTRIES,
                           default_timeout=default_timeout)
    if kind == "SimpleCache":
        return SimpleCache(threshold=LOCAL_CACHE_MAX_ENTRIES, default_timeout=default_timeout)
    if kind == "FileSystemCache":
        try:  # it makes and lists CACHE_DIR as it is built
            return FileSystemCache(cache_dir, threshold=LOCAL_CACHE_MAX_ENTRIES, default_timeout=default_timeout)
        except OSError as exc:
            return UnavailableCache(kind, exc)
    if kind == "NullCache":
        return NullCache(default_timeout=default_timeout)
    if kind == "RedisCache":
        if not redis_url:
            raise ValueError("CACHE_TYPE=RedisCache needs a Redis URL (REDIS_URL)")
        import redis

        from .store.redis import client_options

        # No retries and short timeouts: the cache is optional, so a down Redis must cost one quick miss (a failed
        # connection is still dropped, so the next lookup reconnects: after a failover, to the new primary).
        client = redis.Redis.from_url(redis_url, **{**client_options(retries=0),
                                                    "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
                                                    "socket_connect_timeout": REDIS_SOCKET_TIMEOUT_S})
        return RedisCache(host=client, default_timeout=default_timeout)
    raise ValueError(f"unknown cache type {cache_type!r}: "
                     "SQLiteCache, SimpleCache, FileSystemCache, RedisCache or NullCache")
