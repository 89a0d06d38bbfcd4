"""Per-client rate limits and the service-wide calls-per-day cap (the `limits` library's moving windows).

Limits are counted in Redis when REDIS_URL is set (every worker of every instance sees the same counts), else in
a SQLite file beside the call store, shared by the workers of one instance. Only the endpoints below are limited,
and only their views check a window: Twilio's signed webhooks, the relay socket and every other request run no
limiter code at all (flask-limiter's app-wide hooks cost ~50 µs on each of them, ~0.3 ms of a call's set-up).
"""
from __future__ import annotations

import functools
import hmac
import os
import sqlite3
import threading
import time
from typing import Callable

from flask import Flask, request
from limits import RateLimitItem, parse, parse_many
from limits.errors import StorageError
from limits.storage import MovingWindowSupport, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from .config import Settings
from .store.sqlite import BUSY_TIMEOUT_MS, use_wal

SQLITE_SCHEME = "callweaver+sqlite"
KEY_PREFIX = "callweaver"  # window keys: LIMITER/callweaver/<client>/<scope>/<amount>/<multiples>/<granularity>
DAILY_KEY = (KEY_PREFIX, "service", "calls-per-day")


def client_address(environ: dict, trusted_proxy_hops: int) -> str:
    """The client as the last trusted proxy saw it: with N trusted hops, the N-th X-Forwarded-For entry from the
    right (entries left of it are whatever the client wrote); with none, the socket's peer address."""
    if trusted_proxy_hops > 0:
        forwarded = [a.strip() for a in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if a.strip()]
        if forwarded:
            return forwarded[-min(trusted_proxy_hops, len(forwarded))][:64]
    return environ.get("REMOTE_ADDR") or "unknown"


def storage_uri(settings: Settings) -> str:
    if settings.redis_url:
        url = settings.redis_url
        return "redis+unix://" + url[len("unix://"):] if url.startswith("unix://") else url
    base, _ext = os.path.splitext(os.path.abspath(settings.db_path))
    return f"{SQLITE_SCHEME}://{base}-ratelimits.sqlite3"


def redis_limits_prefix(redis_key_prefix: str) -> str:
    """limits' key prefix (it adds ":" itself) under the deployment's REDIS_KEY_PREFIX."""
    return f"{redis_key_prefix}LIMITS"


def storage_full(exc: StorageError) -> bool:
    """Whether the limits' storage refused a write for want of space (Redis at `maxmemory`, a full disk)."""
    cause = exc.storage_error
    if isinstance(cause, sqlite3.Error):
        return getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    # Only a Redis storage raises a Redis error, and then redis is imported.
    return type(cause).__name__ == "OutOfMemoryError" and type(cause).__module__.startswith("redis")


class LimitReached(Exception):
    """A full window: the HTTP edge answers 429 with the JSON error and Retry-After (errors.py), and logs it."""

    def __init__(self, message: str, retry_after_s: int, *, limit: str, key: str):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.limit = limit
        self.key = key


def limit_reached(windows: MovingWindowRateLimiter, item: RateLimitItem, identifiers: tuple[str, ...],
                  message: str) -> LimitReached:
    """The refusal for a full window, retrying when its oldest slot frees."""
    reset_at = windows.get_window_stats(item, *identifiers).reset_time
    return LimitReached(f"Too many requests: {message}; try again later",
                        max(1, int(reset_at + 1 - time.time())), limit=str(item), key=item.key_for(*identifiers))


def limit_windows(settings: Settings) -> MovingWindowRateLimiter:
    """The moving windows of one process, in the storage every worker (and instance, with Redis) shares."""
    # wrap_exceptions: a storage failure (Redis down, an unusable SQLite file) raises limits' StorageError, which
    # the API answers with 503 (errors.py); the request is refused, never let through unlimited.
    options: dict = {}
    if settings.redis_url:
        # The call store's timeouts and reconnects: a hung Redis refuses a make-call as soon as the store would
        # (redis-py's default waited 5 s), and a failover's read-only old primary is left for the new one.
        from .store.redis import client_options

        # limits' own key prefix option: the windows are `<REDIS_KEY_PREFIX>LIMITS:LIMITER/...`, apart from another
        # deployment's on the same Redis.
        options = {**client_options(), "key_prefix": redis_limits_prefix(settings.redis_key_prefix)}
    return MovingWindowRateLimiter(storage_from_string(storage_uri(settings), wrap_exceptions=True, **options))


class CallsPerDay:
    """The service's cap on placed calls (MAX_CALLS_PER_DAY), across the workers sharing the limit storage (an
    instance's SQLite file; every instance with REDIS_URL).

    A make-call takes its slot in one atomic step once it has passed every check, right before Twilio is asked
    to place the call. Reading the window before the call and taking the slot after it let two workers with one
    slot left both place a call. Requests refused before that point never use the cap; an attempt Twilio refuses
    keeps its slot, which errs on the side of the operator's bill."""

    def __init__(self, settings: Settings, windows: MovingWindowRateLimiter) -> None:
        self.windows = windows
        self.item = parse(f"{settings.max_calls_per_day} per day")
        self.message = f"the service places at most {settings.max_calls_per_day} calls a day (MAX_CALLS_PER_DAY)"

    def take_slot(self) -> None:
        """Take one slot of today's calls, or raise LimitReached when none is left."""
        if not self.windows.hit(self.item, *DAILY_KEY):
            raise limit_reached(self.windows, self.item, DAILY_KEY, self.message)


class OpsTokenGuesses:
    """Guesses at OPS_TOKEN, per client (RATE_LIMIT_OPS_AUTH): every request presenting a token takes a slot of its
    client's window first, in one atomic hit, so past the limit even the right token is refused and a guess there
    tells nothing. The right token then clears its client's window: an operator's Prometheus scraping every 15 s, or
    a dashboard refreshing, never adds up; only wrong guesses in a row do. The same wrong token again is no new guess:
    it takes a slot once per the limit's longest window (`once`), else a stale password (a dashboard tab polling every
    2 s with the one its browser cached before OPS_TOKEN was rotated) kept its client's window full, and the right
    token got 429 from that address for as long as the tab was open. While the storage is down every token is
    refused (503), as every limited request is (the operator's pages read the same store then down)."""

    SCOPE = "ops-auth"

    def __init__(self, settings: Settings, windows: MovingWindowRateLimiter) -> None:
        self.windows = windows
        self.items = sorted(parse_many(settings.rate_limit_ops_auth))  # the shortest window first
        longest = max(self.items, key=lambda item: item.get_expiry())
        self.once = type(longest)(1, longest.multiples)  # one slot per wrong token within the longest window
        self.key = settings.ops_token.encode()
        self.message = (f"at most {settings.rate_limit_ops_auth} operator token attempts per client "
                        "(RATE_LIMIT_OPS_AUTH)")

    def presented(self, client: str, token: str, right: bool) -> None:
        """A request from `client` presented `token` (`right`: it is OPS_TOKEN); raise LimitReached when the client's
        window is full. A wrong token is remembered by its HMAC under OPS_TOKEN (never as itself), and only once it
        took a slot, so a flood of refused guesses stores nothing."""
        identifiers = (KEY_PREFIX, client, self.SCOPE)
        this_token = None if right else (*identifiers, hmac.new(
            self.key, token.encode("utf-8", "surrogatepass"), "sha256").hexdigest()[:32])
        again = this_token is not None and not self.windows.test(self.once, *this_token)
        for item in self.items:
            if not (self.windows.test(item, *identifiers) if again else self.windows.hit(item, *identifiers)):
                raise limit_reached(self.windows, item, identifiers, self.message)
        if this_token is not None and not again:
            self.windows.hit(self.once, *this_token)
        if right:
            for item in self.items:
                self.windows.clear(item, *identifiers)


class RateLimits:
    """The per-client windows of one app: per client and scope (make-call, llm, end-call, call-status, metrics).

    A limited request takes one slot of each of its client's windows (one storage hit per window, `hit` refuses
    when the window is full). The calls-per-day cap is CallsPerDay, taken inside make-call."""

    def __init__(self, settings: Settings, windows: MovingWindowRateLimiter) -> None:
        self.settings = settings
        self.windows = windows

    def limited(self, view: Callable, scope: str, variable: str, limit: str) -> Callable:
        """`view`, refused with 429 once its client has used `limit` (shared by every view of the scope)."""
        items = sorted(parse_many(limit))  # the shortest window first
        message = f"at most {limit} per client ({variable})"

        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            client = client_address(request.environ, self.settings.trusted_proxy_hops)
            for item in items:
                if not self.windows.hit(item, KEY_PREFIX, client, scope):
                    raise limit_reached(self.windows, item, (KEY_PREFIX, client, scope), message)
            return view(*args, **kwargs)

        return wrapper


def init_rate_limits(app: Flask, settings: Settings, windows: MovingWindowRateLimiter) -> RateLimits:
    """Wrap the limited views (after the blueprints are registered); nothing else is touched."""
    rate_limits = RateLimits(settings, windows)
    per_client = {  # scope: (variable, limit, endpoints sharing it)
        "make-call": ("RATE_LIMIT_MAKE_CALL", settings.rate_limit_make_call,
                      ("calls.make_call", "calls.make_call_optimized")),
        "llm": ("RATE_LIMIT_CHAT", settings.rate_limit_chat, ("chat.chat", "metrics.test_optimization")),
        "end-call": ("RATE_LIMIT_END_CALL", settings.rate_limit_end_call, ("calls.end_call",)),
        # The poll also asks Twilio's REST API with the server's credentials; in its own window, so polling a call
        # never uses up the client's hang-ups.
        "call-status": ("RATE_LIMIT_CALL_STATUS", settings.rate_limit_call_status, ("calls.call_status_poll",)),
        # Public aggregates read and sort every turn of their window (up to a day's) on a worker serving live calls.
        "metrics": ("RATE_LIMIT_METRICS", settings.rate_limit_metrics,
                    ("metrics.aggregate_metrics", "metrics.performance_comparison")),
    }
    for scope, (variable, limit, endpoints) in per_client.items():
        for endpoint in endpoints:
            app.view_functions[endpoint] = rate_limits.limited(app.view_functions[endpoint], scope, variable, limit)
    return rate_limits


class SQLiteLimitStorage(Storage, MovingWindowSupport):
    """limits storage in one SQLite file, so every worker of an instance counts against the same windows.

    Registered with limits under the `callweaver+sqlite://<path>` scheme. Each acquire is one IMMEDIATE
    transaction, so concurrent workers cannot both take the last slot of a window.

    A window's hits are numbered per key (`seq`) and their times never decrease with it, so a window is checked
    without counting its rows: it is full when the hit `limit - amount` places before the newest is still inside
    it, and its size is the newest number minus the oldest one inside it (both index look-ups, whatever the
    window holds: the calls-per-day window holds a day's calls). Hits that left their window are deleted once a
    minute per worker (a scan of the table; nothing reads them meanwhile).
    """

    STORAGE_SCHEME = [SQLITE_SCHEME]
    SWEEP_INTERVAL_S = 60.0

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options: float | str | bool) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.path = uri.split("://", 1)[1]
        self._lock = threading.Lock()
        self._pid = 0
        self._conn: sqlite3.Connection | None = None
        self._sweep_at = 0.0

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        return sqlite3.Error, OSError  # OSError: the file's directory cannot be made

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never share a connection across a fork
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            use_wal(conn, BUSY_TIMEOUT_MS / 1000)
            # WAL + NORMAL (as the call store): no fsync per hit; an OS crash may forget the last hits, never
            # corrupt the file. With FULL each hit paid an fsync (~65 µs of CPU, ~160 µs blocking the worker).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")  # the workers' first requests open the file at once
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS window_hits (key TEXT NOT NULL, seq INTEGER NOT NULL, "
                             "at REAL NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (key, seq)) WITHOUT ROWID")
                conn.execute("CREATE INDEX IF NOT EXISTS window_hits_at ON window_hits (key, at)")
                conn.execute("CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, count INTEGER NOT NULL, "
                             "expires_at REAL NOT NULL)")
                self._adopt_unnumbered_hits(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @staticmethod
    def _adopt_unnumbered_hits(conn: sqlite3.Connection) -> None:
        """A file written before hits were numbered keeps its live windows (today's calls count on)."""
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'hits'").fetchone():
            conn.execute("INSERT OR IGNORE INTO window_hits (key, seq, at, expires_at) SELECT key, "
                         "ROW_NUMBER() OVER (PARTITION BY key ORDER BY at, rowid), at, expires_at FROM hits "
                         "WHERE expires_at > ?", (time.time(),))
            conn.execute("DROP TABLE hits")

    def _transaction(self, work):
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    # moving window (the strategy the app uses)
    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False

        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()  # read under the write lock: times never decrease along a key's numbers
            newest = conn.execute("SELECT seq, at FROM window_hits WHERE key = ? ORDER BY seq DESC LIMIT 1",
                                  (key,)).fetchone()
            last, last_at = newest if newest else (0, now)
            blocking = conn.execute("SELECT at FROM window_hits WHERE key = ? AND seq = ?",
                                    (key, last - (limit - amount))).fetchone()
            if blocking and blocking[0] > now - expiry:
                return False
            at = max(now, last_at)
            conn.executemany("INSERT INTO window_hits (key, seq, at, expires_at) VALUES (?, ?, ?, ?)",
                             [(key, last + i, at, at + expiry) for i in range(1, amount + 1)])
            if now >= self._sweep_at:
                conn.execute("DELETE FROM window_hits WHERE expires_at <= ?", (now,))
                self._sweep_at = now + self.SWEEP_INTERVAL_S
            return True

        return self._transaction(work)

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        with self._lock:
            now = time.time()
            # One statement, so one snapshot: another worker's sweep or clear between two reads could leave no
            # newest hit (a TypeError, a 500) or a count from two states.
            row = self._connection().execute(
                "SELECT at, seq, (SELECT MAX(seq) FROM window_hits WHERE key = ?1) FROM window_hits "
                "WHERE key = ?1 AND at > ?2 ORDER BY at, seq LIMIT 1", (key, now - expiry)).fetchone()
        if row is None:
            return now, 0
        oldest_at, oldest_seq, newest_seq = row
        return oldest_at, newest_seq - oldest_seq + 1

    # fixed-window counters (required by the Storage interface)
    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM counters WHERE key = ? AND expires_at <= ?", (key, now))
            conn.execute("INSERT INTO counters (key, count, expires_at) VALUES (?, ?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET count = count + excluded.count", (key, amount, now + expiry))
            return conn.execute("SELECT count FROM counters WHERE key = ?", (key,)).fetchone()[0]

        return self._transaction(work)

    def get(self, key: str) -> int:
        with self._lock:
            row = self._connection().execute("SELECT count FROM counters WHERE key = ? AND expires_at > ?",
                                             (key, time.time())).fetchone()
        return row[0] if row else 0

    def get_expiry(self, key: str) -> float:
        with self._lock:
            row = self._connection().execute("SELECT expires_at FROM counters WHERE key = ?", (key,)).fetchone()
        return row[0] if row else time.time()

    def check(self) -> bool:
        try:
            with self._lock:
                self._connection().execute("SELECT 1")
            return True
        except sqlite3.Error:
            return False

    def reset(self) -> int | None:
        def work(conn: sqlite3.Connection) -> int:
            return (conn.execute("DELETE FROM window_hits").rowcount
                    + conn.execute("DELETE FROM counters").rowcount)

        return self._transaction(work)

    def clear(self, key: str) -> None:
        self._transaction(lambda conn: (conn.execute("DELETE FROM window_hits WHERE key = ?", (key,)),
                                        conn.execute("DELETE FROM counters WHERE key = ?", (key,))))
