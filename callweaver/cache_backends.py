"""The reply cache's storage, built on flask-caching's backends (SimpleCache, FileSystemCache, RedisCache)."""
from __future__ import annotations

from typing import Any

from .engine.cache import LOCAL_CACHE_MAX_ENTRIES, REDIS_SOCKET_TIMEOUT_S


def build_cache_backend(cache_type: str, *, redis_url: str | None, cache_dir: str, default_timeout: int) -> Any:
    """The reply cache's backend from settings.

    Auto ("") picks Redis when there is one (shared by every instance), else a per-process SimpleCache: a
    lookup or write costs microseconds on the worker's only thread, where FileSystemCache (shared by the
    workers of one machine, CACHE_TYPE=FileSystemCache) costs two file creations per write (measured ~1 ms).
    """
    from flask_caching.backends import FileSystemCache, NullCache, RedisCache, SimpleCache

    kind = (cache_type or "").strip()
    if not kind:
        kind = "RedisCache" if redis_url else "SimpleCache"
    if kind == "SimpleCache":
        return SimpleCache(threshold=LOCAL_CACHE_MAX_ENTRIES, default_timeout=default_timeout)
    if kind == "FileSystemCache":
        return FileSystemCache(cache_dir, threshold=LOCAL_CACHE_MAX_ENTRIES, default_timeout=default_timeout)
    if kind == "NullCache":
        return NullCache(default_timeout=default_timeout)
    if kind == "RedisCache":
        if not redis_url:
            raise ValueError("CACHE_TYPE=RedisCache needs a Redis URL (REDIS_URL)")
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries and short timeouts: the cache is optional, so a down Redis must cost one quick miss.
        client = redis.Redis.from_url(
            redis_url,
            socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        return RedisCache(host=client, default_timeout=default_timeout)
    raise ValueError(f"unknown cache type {cache_type!r}: SimpleCache, FileSystemCache, RedisCache or NullCache")
