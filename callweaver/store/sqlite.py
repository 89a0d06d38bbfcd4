"""SQLite (WAL) call store: the zero-setup default, shared by all workers on one machine."""

from __future__ import annotations

import copy
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Iterable, Mapping

import orjson

from callweaver.store import (
    CALL_LOG_FIELDS,
    CALL_LOG_META_KEYS,
    CALLS_ENDED_COUNTER,
    TERMINAL_STATUSES,
    PURGED_META_KEYS,
    CallRecord,
    MetaChange,
    ReportClaim,
    TURN_FIELDS,
    StoreError,
    StoreFull,
    WorkflowSnapshots,
    check_meta_keys,
    check_update_fields,
    counter_series,
    merge_meta,
    row_holds,
    stored_turn,
    unended_created_before,
)

# Call-log filters, kept as columns beside the JSON so filtering never parses a row's workflow snapshot.
CALL_FILTER_COLUMNS = ("status", "path", "language")
# Record fields also kept as indexed columns: the filters, and the workflow version, so retention finds the versions
# no call references without parsing any row's JSON.
CALL_JSON_COLUMNS = (*CALL_FILTER_COLUMNS, "workflow_hash")

# How long a writer waits for another process's write transaction before giving up.
BUSY_TIMEOUT_MS = 5000
WAL_SWITCH_RETRY_S = 0.01
PURGE_BATCH = 200  # calls deleted per write transaction by purge()
# The calls retention deletes (or empties) for a cutoff: ended before it, or never ended and created long enough
# before it (unended_created_before). Parameters: the cutoff, then unended_created_before(cutoff).
_EXPIRED = "ended_at < ? OR (ended_at IS NULL AND created_at < ?)"
# The meta keys dropped with a transcript, as json_remove paths, and the test for a call that still has any of them
# or its request credentials.
_PURGED_META_PATHS = ", ".join(f"'$.meta.{key}'" for key in PURGED_META_KEYS)
_HOLDS_SECRETS = " OR ".join(["json_extract(data, '$.credentials') IS NOT NULL",
                              *(f"json_type(data, '$.meta.{key}') IS NOT NULL" for key in PURGED_META_KEYS)])
# The workflow versions no call references (a row that a worker of an earlier release inserted has no
# workflow_hash column: its JSON is read instead).
_UNREFERENCED_VERSIONS = (
    "NOT EXISTS (SELECT 1 FROM cw_calls WHERE workflow_hash = version_hash)"
    " AND NOT EXISTS (SELECT 1 FROM cw_calls WHERE workflow_hash IS NULL"
    " AND json_extract(data, '$.workflow_hash') = version_hash)")
# The calls created since a time that have not ended (live_calls, count_live_calls).
_LIVE_CALLS = "FROM cw_calls INDEXED BY cw_calls_ended_at WHERE ended_at IS NULL AND created_at >= ?"

SCHEMA = """
CREATE TABLE IF NOT EXISTS cw_calls (
    tracking_id TEXT PRIMARY KEY,
    call_sid    TEXT,
    created_at  REAL NOT NULL,
    ended_at    REAL,
    data        TEXT NOT NULL,
    status      TEXT,
    path        TEXT,
    language    TEXT
);
CREATE INDEX IF NOT EXISTS cw_calls_call_sid ON cw_calls (call_sid);
CREATE INDEX IF NOT EXISTS cw_calls_created_at ON cw_calls (created_at);
CREATE INDEX IF NOT EXISTS cw_calls_ended_at ON cw_calls (ended_at);
CREATE TABLE IF NOT EXISTS cw_statuses (
    tracking_id TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    status      TEXT NOT NULL,
    received_at REAL NOT NULL,
    payload     TEXT NOT NULL,
    PRIMARY KEY (tracking_id, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cw_turns (
    tracking_id TEXT NOT NULL,
    turn_index  INTEGER NOT NULL,
    at          REAL NOT NULL,
    data        TEXT NOT NULL,
    PRIMARY KEY (tracking_id, turn_index)
);
CREATE INDEX IF NOT EXISTS cw_turns_at ON cw_turns (at);
CREATE TABLE IF NOT EXISTS cw_shared (
    key  TEXT PRIMARY KEY,
    data TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cw_relay_sockets (
    tracking_id TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cw_counters (
    series TEXT PRIMARY KEY,
    value  REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cw_leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cw_report_outbox (
    tracking_id TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    lease_until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cw_report_outbox_lease ON cw_report_outbox (lease_until);
CREATE TABLE IF NOT EXISTS cw_workflow_versions (
    version_hash TEXT PRIMARY KEY,
    snapshot     TEXT NOT NULL,
    saved_at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cw_workflows (
    workflow_id TEXT PRIMARY KEY,
    snapshot    TEXT NOT NULL,
    saved_at    REAL NOT NULL
);
"""


def _dumps(value: Any) -> str:
    """Compact JSON; orjson (a call record with its workflow is ~12 KB, written on every webhook), with the
    standard library for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# A run of 19 digits may be an integer beyond 64 bits (20 digits, or 19 after a minus sign below -2**63), which
# orjson would read back as a float. (The classes written out: re scans them ~3× faster than "[0-9]{19}".)
_MAYBE_HUGE_INTEGER = re.compile("[0-9]" * 19)


def _loads(text: str) -> Any:
    """The inverse of _dumps; rows the standard library wrote may hold NaN or Infinity, which orjson refuses, or
    integers beyond 64 bits, which it reads as floats (so those go to the standard library, which keeps them)."""
    if _MAYBE_HUGE_INTEGER.search(text):
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _add_counters(conn: sqlite3.Connection, counters: Mapping[str, float]) -> None:
    """Add to cumulative counters inside the caller's write transaction."""
    if counters:
        conn.executemany(
            "INSERT INTO cw_counters (series, value) VALUES (?, ?)"
            " ON CONFLICT (series) DO UPDATE SET value = value + excluded.value",
            list(counters.items()),
        )


def _count_call_ended(conn: sqlite3.Connection, status: str | None) -> None:
    _add_counters(conn, {counter_series(CALLS_ENDED_COUNTER, {"status": status or "unknown"}): 1})


def use_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Put the file in WAL mode, waiting up to timeout_s for other connections: while another worker writes a file
    still in rollback-journal mode (every worker opens a fresh file at once), SQLite refuses the switch with BUSY
    at once, without calling the busy handler that `timeout` installs."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(WAL_SWITCH_RETRY_S)


class SQLiteStore:
    """One SQLite file; one connection per process, opened on first use so it is never shared across a fork."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._snapshots = WorkflowSnapshots(_dumps, _loads)

    # -- connection -------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # autocommit; writes open their own BEGIN IMMEDIATE
            check_same_thread=False,  # greenlets/threads share it, serialised by self._lock
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            use_wal(conn, BUSY_TIMEOUT_MS / 1000)
            # WAL + NORMAL: a commit survives a crashed process; only an OS crash can lose the last ones.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")  # several workers may start at once
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            self._add_filter_columns(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _add_filter_columns(conn: sqlite3.Connection) -> None:
        """Stores made before a column (CALL_JSON_COLUMNS) get it, filled from the rows' JSON (once)."""
        present = {row[1] for row in conn.execute("PRAGMA table_info(cw_calls)")}
        for name in CALL_JSON_COLUMNS:
            if name not in present:
                conn.execute(f"ALTER TABLE cw_calls ADD COLUMN {name} TEXT")
                conn.execute(f"UPDATE cw_calls SET {name} = json_extract(data, '$.{name}')")
        # Covering index: a filtered page and its count never read the rows (whose JSON may be large).
        conn.execute("CREATE INDEX IF NOT EXISTS cw_calls_log ON cw_calls (created_at, status, path, language)")
        conn.execute("CREATE INDEX IF NOT EXISTS cw_calls_workflow_hash ON cw_calls (workflow_hash)")

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """The process's connection under its lock; backend errors surface as StoreError."""
        pid = os.getpid()
        if self._pid != pid:
            # A forked worker: abandon the parent's handle and lock unclosed; closing
            # them here could release locks the parent still holds.
            self._lock = threading.Lock()
            self._conn = None
            self._pid = pid
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._open()
                yield self._conn
            except (sqlite3.Error, OSError) as exc:
                full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                raise (StoreFull if full else StoreError)(f"sqlite store {self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database write lock at once, so read-modify-write is atomic."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # Never leave the shared connection inside a transaction: the next caller's BEGIN would fail.
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close this process's connection (tests, shutdown); the next call reopens it."""
        if self._pid != os.getpid():
            self._conn = None  # inherited from the parent: not ours to close
            return
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    # -- calls ----------------------------------------------------------------

    def create_call(self, record: CallRecord, workflow_id: str | None = None) -> None:
        data, version = self._snapshots.detach(vars(record))  # vars: no deep copy (to_dict) needed
        with self._write() as conn:
            if version is not None:
                conn.execute("INSERT OR IGNORE INTO cw_workflow_versions (version_hash, snapshot, saved_at)"
                             " VALUES (?, ?, ?)", (*version, time.time()))
            try:
                conn.execute(
                    "INSERT INTO cw_calls (tracking_id, call_sid, created_at, ended_at, data, status, path, language,"
                    " workflow_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.tracking_id,
                        record.call_sid,
                        record.created_at,
                        record.ended_at,
                        _dumps(data),
                        record.status,
                        record.path,
                        record.language,
                        record.workflow_hash,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"call {record.tracking_id!r} already exists") from exc
            if workflow_id:  # its JSON is already encoded for its version: saved with the call, in one write
                self._save_workflow(conn, workflow_id, version[1] if version else _dumps(record.workflow))

    def get_call(self, tracking_id: str) -> CallRecord | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT data FROM cw_calls WHERE tracking_id = ?", (tracking_id,)
            ).fetchone()
        return self._record(row[0]) if row else None

    def _record(self, stored_json: str | dict) -> CallRecord:
        """A stored call as a record, its workflow snapshot resolved from its version (cached per worker)."""
        data = _loads(stored_json) if isinstance(stored_json, str) else stored_json
        return CallRecord.from_dict(self._snapshots.attach(data, self._workflow_version))

    def _workflow_version(self, version_hash: str) -> str | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT snapshot FROM cw_workflow_versions WHERE version_hash = ?", (version_hash,)
            ).fetchone()
        return row[0] if row else None

    def find_tracking_id(self, call_sid: str) -> str | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT tracking_id FROM cw_calls WHERE call_sid = ?"
                " ORDER BY created_at DESC LIMIT 1",
                (call_sid,),
            ).fetchone()
        return row[0] if row else None

    def update_call(self, tracking_id: str, **fields: Any) -> CallRecord | None:
        check_update_fields(fields)
        with self._write() as conn:
            row = conn.execute(
                "SELECT data FROM cw_calls WHERE tracking_id = ?", (tracking_id,)
            ).fetchone()
            if row is None:
                return None
            data = _loads(row[0])
            ends_now = data.get("ended_at") is None and fields.get("ended_at") is not None
            data["updated_at"] = time.time()
            data.update(copy.deepcopy(fields))  # the returned record never aliases the caller's objects
            self._write_data(conn, tracking_id, data)
            if ends_now:
                _count_call_ended(conn, data.get("status"))
        return self._record(data)

    def record_placed(self, tracking_id: str, call_sid: str, status: str) -> bool:
        # One UPDATE, its own transaction (autocommit): only the two columns and three JSON keys that change are
        # written, so SQLite rewrites neither the record's JSON through Python nor the indexes of unchanged columns
        # (update_call: 110 µs, this: 50 µs; docs/performance-history.md, "Issue 12w").
        # A status callback that landed first (Twilio may call it before its REST answer arrives) is newer than
        # the answer's status: its status stays; only the CallSid is recorded then.
        now = _dumps(time.time())
        with self._connection() as conn:
            changed = conn.execute(
                "UPDATE cw_calls SET call_sid = ?,"
                " status = CASE WHEN COALESCE(json_extract(data, '$.status_sequence'), -1) < 0 THEN ? ELSE status END,"
                " data = CASE WHEN COALESCE(json_extract(data, '$.status_sequence'), -1) < 0"
                " THEN json_set(data, '$.call_sid', ?, '$.status', ?, '$.updated_at', json(?))"
                " ELSE json_set(data, '$.call_sid', ?, '$.updated_at', json(?)) END"
                " WHERE tracking_id = ?",
                (call_sid, status, call_sid, status, now, call_sid, now, tracking_id),
            ).rowcount
        return changed > 0

    def update_meta(self, tracking_id: str, changes: Mapping[str, Any] | None = None, *,
                    remove: Iterable[str] = (), add: Mapping[str, Mapping[str, float]] | None = None,
                    first: Mapping[str, Mapping[str, Any]] | None = None) -> dict | None:
        check_meta_keys(changes, remove, add, first)
        with self._write() as conn:  # the write lock is held from the read on: no writer lands in between
            row = conn.execute(
                "SELECT json_extract(data, '$.meta') FROM cw_calls WHERE tracking_id = ?", (tracking_id,)
            ).fetchone()
            if row is None:
                return None
            meta = merge_meta(_loads(row[0]) if row[0] else {}, changes, remove, add, first)
            self._write_meta(conn, tracking_id, meta)
        return meta

    def change_meta(self, tracking_id: str, change: MetaChange) -> tuple[dict | None, bool]:
        with self._write() as conn:  # the write lock is held from the read on: no writer lands in between
            row = conn.execute(
                "SELECT json_extract(data, '$.meta'), ended_at FROM cw_calls WHERE tracking_id = ?", (tracking_id,)
            ).fetchone()
            if row is None:
                return None, False
            meta = _loads(row[0]) if row[0] else {}
            new = change(copy.deepcopy(meta), row[1] is not None)
            if new is None:
                return meta, False
            self._write_meta(conn, tracking_id, new)
        return new, True

    @staticmethod
    def _write_meta(conn: sqlite3.Connection, tracking_id: str, meta: dict) -> None:
        """Only the meta is decoded and re-encoded; the rest of the record (its workflow snapshot) stays in SQL."""
        conn.execute(
            "UPDATE cw_calls SET data = json_set(data, '$.meta', json(?), '$.updated_at', ?) WHERE tracking_id = ?",
            (_dumps(meta), time.time(), tracking_id),
        )

    @staticmethod
    def _write_data(conn: sqlite3.Connection, tracking_id: str, data: dict) -> str:
        """Store a record's dict as is: the hot path skips dataclass copies (a workflow snapshot is large)."""
        stored_json = _dumps(data)
        conn.execute(
            "UPDATE cw_calls SET call_sid = ?, created_at = ?, ended_at = ?, data = ?, status = ?, path = ?,"
            " language = ?, workflow_hash = ? WHERE tracking_id = ?",
            (data.get("call_sid"), data["created_at"], data.get("ended_at"), stored_json, data.get("status"),
             data.get("path"), data.get("language"), data.get("workflow_hash"), tracking_id),
        )
        return stored_json

    def list_calls(self, since: float = 0.0, active_only: bool = False) -> list[CallRecord]:
        query = "SELECT data FROM cw_calls WHERE created_at >= ?"
        if active_only:
            query += " AND ended_at IS NULL"
        with self._connection() as conn:
            rows = conn.execute(query + " ORDER BY created_at", (since,)).fetchall()
        return [self._record(row[0]) for row in rows]

    def call_page(self, limit: int, offset: int = 0, *, status: str | None = None, path: str | None = None,
                  language: str | None = None) -> tuple[list[CallRecord], int]:
        conditions, params = [], []
        for name, value in zip(CALL_FILTER_COLUMNS, (status, path, language)):
            if value is not None:
                conditions.append(f"{name} = ?")
                params.append(value)
        where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
        # The page is chosen on the created_at index and the filter columns; only its rows' JSON is read, and
        # only the list's fields leave SQLite (the workflow snapshot and history stay on disk).
        columns = ", ".join([*(f"json_extract(data, '$.{name}')" for name in CALL_LOG_FIELDS),
                             *(f"json_extract(data, '$.meta.{key}')" for key in CALL_LOG_META_KEYS)])
        newest_first = "ORDER BY created_at DESC, rowid DESC"
        with self._connection() as conn:
            (total,) = conn.execute(f"SELECT COUNT(*) FROM cw_calls{where}", params).fetchone()
            rows = conn.execute(
                f"SELECT {columns} FROM cw_calls WHERE rowid IN"
                f" (SELECT rowid FROM cw_calls{where} {newest_first} LIMIT ? OFFSET ?) {newest_first}",
                (*params, limit, offset),
            ).fetchall()
        fields = len(CALL_LOG_FIELDS)
        return [CallRecord.from_dict({**dict(zip(CALL_LOG_FIELDS, row)), "meta": {
            key: value for key, value in zip(CALL_LOG_META_KEYS, row[fields:]) if value is not None}})
            for row in rows], total

    def live_calls(self, since: float = 0.0) -> list[CallRecord]:
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT data {_LIVE_CALLS} ORDER BY created_at",
                (since,),
            ).fetchall()
        return [self._record(row[0]) for row in rows]

    def count_live_calls(self, since: float = 0.0) -> int:
        with self._connection() as conn:
            (count,) = conn.execute(
                f"SELECT COUNT(*) {_LIVE_CALLS}",
                (since,),
            ).fetchone()
        return count

    def count_calls(self, since: float = 0.0) -> int:
        with self._connection() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM cw_calls WHERE created_at >= ?", (since,)).fetchone()
        return count

    # -- status callbacks -----------------------------------------------------

    def append_status(
        self,
        tracking_id: str,
        status: str,
        sequence: int | None,
        payload: dict,
        received_at: float | None = None,
        report_holder: str | None = None,
        report_lease_s: float = 0.0,
    ) -> bool:
        """Record a Twilio status callback; Twilio may deliver out of order, so SequenceNumber wins."""
        received_at = time.time() if received_at is None else float(received_at)
        with self._write() as conn:
            # Only the two values the decision needs leave SQLite, and the write edits the stored JSON in C
            # (json_set): the record is never decoded or re-encoded by Python (one write per callback).
            row = conn.execute(
                "SELECT json_extract(data, '$.status_sequence'), json_extract(data, '$.ended_at') FROM cw_calls"
                " WHERE tracking_id = ?", (tracking_id,)
            ).fetchone()
            if row is None:
                return False
            current_sequence = -1 if row[0] is None else int(row[0])
            sequence = current_sequence + 1 if sequence is None else int(sequence)
            ends_now = status in TERMINAL_STATUSES and row[1] is None
            insert = ("INSERT OR IGNORE INTO cw_statuses"
                      " (tracking_id, sequence, status, received_at, payload) VALUES (?, ?, ?, ?, ?)")
            payload_json = _dumps(payload)
            if not conn.execute(insert, (tracking_id, sequence, status, received_at, payload_json)).rowcount:
                if not ends_now:
                    return False  # a retried callback: already recorded
                # The number was taken by a callback that came without one (numbered by the store): the final status
                # is recorded after it, and ends the call all the same (END_REASON_RULE).
                sequence = max(sequence, current_sequence) + 1
                conn.execute(insert, (tracking_id, sequence, status, received_at, payload_json))
            # The status that ends the call becomes its status; an ended call stays ended: a late non-terminal
            # status is history only (END_REASON_RULE).
            became_current = ends_now or (sequence > current_sequence
                                          and (status in TERMINAL_STATUSES or row[1] is None))
            sequence = max(sequence, current_sequence)
            # Times go in as JSON text (json(?)): SQLite would print a REAL with 15 digits, Python's float round-trips.
            paths, params = ["'$.updated_at', json(?)"], [_dumps(time.time())]
            if became_current:
                paths += ["'$.status', ?", "'$.status_sequence', ?"]
                params += [status, sequence]
            if ends_now:
                paths.append("'$.ended_at', json(?)")
                params.append(_dumps(received_at))
            conn.execute(
                f"UPDATE cw_calls SET data = json_set(data, {', '.join(paths)}),"
                " status = CASE WHEN ? THEN ? ELSE status END, ended_at = COALESCE(ended_at, ?)"
                " WHERE tracking_id = ?",
                (*params, became_current, status, received_at if ends_now else None, tracking_id),
            )
            if ends_now:
                _count_call_ended(conn, status)
                if report_holder is not None:
                    conn.execute("INSERT OR IGNORE INTO cw_report_outbox (tracking_id, holder, attempts, lease_until)"
                                 " VALUES (?, ?, 0, ?)", (tracking_id, report_holder, time.time() + report_lease_s))
        return became_current

    def status_history(self, tracking_id: str) -> list[dict]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT status, sequence, received_at, payload FROM cw_statuses"
                " WHERE tracking_id = ? ORDER BY sequence",
                (tracking_id,),
            ).fetchall()
        return [
            {"status": status, "sequence": sequence, "receivedAt": received_at, "payload": _loads(payload)}
            for status, sequence, received_at, payload in rows
        ]

    # -- turns ----------------------------------------------------------------

    def append_turn(self, tracking_id: str, turn: dict, counters: Mapping[str, float] | None = None) -> int:
        with self._write() as conn:
            return self._insert_turn(conn, tracking_id, stored_turn(tracking_id, turn), counters)

    @staticmethod
    def _insert_turn(conn: sqlite3.Connection, tracking_id: str, stored: dict,
                     counters: Mapping[str, float] | None) -> int:
        """The next turn row of a call and its counters, inside the caller's write transaction."""
        (turn_index,) = conn.execute(
            "SELECT COALESCE(MAX(turn_index) + 1, 0) FROM cw_turns WHERE tracking_id = ?",
            (tracking_id,),
        ).fetchone()
        conn.execute(
            "INSERT INTO cw_turns (tracking_id, turn_index, at, data) VALUES (?, ?, ?, ?)",
            (tracking_id, turn_index, stored["at"], _dumps(stored)),
        )
        _add_counters(conn, counters or {})
        return turn_index

    def commit_turn(self, tracking_id: str, fields: dict[str, Any], turn: dict,
                    counters: Mapping[str, float] | None = None, transcript_entry: dict | None = None) -> int | None:
        check_update_fields(fields, TURN_FIELDS)
        # SQLite edits the stored JSON in C (json_set; `[#]` appends): Python never decodes the record.
        paths, params = ["'$.updated_at', ?"], [time.time()]
        for name, value in fields.items():
            paths.append(f"'$.{name}', json(?)")
            params.append(_dumps(value))
        if transcript_entry is not None:
            paths.append("'$.transcript[#]', json(?)")
            params.append(_dumps(transcript_entry))
        stored = stored_turn(tracking_id, turn)
        with self._write() as conn:
            changed = conn.execute(
                f"UPDATE cw_calls SET data = json_set(data, {', '.join(paths)}), language = COALESCE(?, language)"
                " WHERE tracking_id = ?",
                (*params, fields.get("language"), tracking_id),
            ).rowcount
            if not changed:
                return None
            return self._insert_turn(conn, tracking_id, stored, counters)

    def amend_last_turn(self, tracking_id: str, changes: Mapping[str, Any],
                        expect: Mapping[str, Any] | None = None) -> bool:
        with self._write() as conn:
            row = conn.execute(
                "SELECT turn_index, data FROM cw_turns WHERE tracking_id = ? ORDER BY turn_index DESC LIMIT 1",
                (tracking_id,),
            ).fetchone()
            if row is None:
                return False
            turn = _loads(row[1])
            if not row_holds(turn, expect):
                return False
            conn.execute("UPDATE cw_turns SET data = ? WHERE tracking_id = ? AND turn_index = ?",
                         (_dumps({**turn, **changes}), tracking_id, row[0]))
            return True

    def add_counters(self, counters: Mapping[str, float]) -> None:
        with self._write() as conn:
            _add_counters(conn, counters)

    def counters(self) -> dict[str, float]:
        with self._connection() as conn:
            return dict(conn.execute("SELECT series, value FROM cw_counters").fetchall())

    def turns(self, tracking_id: str) -> list[dict]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT data FROM cw_turns WHERE tracking_id = ? ORDER BY turn_index",
                (tracking_id,),
            ).fetchall()
        return [_loads(row[0]) for row in rows]

    def turns_of(self, tracking_ids: list[str]) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {tracking_id: [] for tracking_id in tracking_ids}
        if not tracking_ids:
            return found
        marks = ", ".join("?" * len(tracking_ids))
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT tracking_id, data FROM cw_turns WHERE tracking_id IN ({marks})"
                " ORDER BY tracking_id, turn_index",
                list(tracking_ids),
            ).fetchall()
        for tracking_id, data in rows:
            found[tracking_id].append(_loads(data))
        return found

    def recent_turns(self, since: float) -> list[dict]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT data, turn_index FROM cw_turns WHERE at >= ? ORDER BY at, tracking_id, turn_index",
                (since,),
            ).fetchall()
        return [{**_loads(data), "index": turn_index} for data, turn_index in rows]

    # -- workflows --------------------------------------------------------------

    def save_workflow(self, workflow_id: str, snapshot: dict) -> None:
        """The web app sends the same flow with every call: an unchanged snapshot rewrites nothing (its ~12 KB row
        was ~5 WAL pages per make-call); `saved_at` is when this snapshot was first saved under the id."""
        with self._write() as conn:
            self._save_workflow(conn, workflow_id, _dumps(snapshot))

    @staticmethod
    def _save_workflow(conn: sqlite3.Connection, workflow_id: str, encoded: str) -> None:
        conn.execute(
            "INSERT INTO cw_workflows (workflow_id, snapshot, saved_at) VALUES (?, ?, ?)"
            " ON CONFLICT (workflow_id) DO UPDATE SET snapshot = excluded.snapshot,"
            " saved_at = excluded.saved_at WHERE cw_workflows.snapshot IS NOT excluded.snapshot",
            (workflow_id, encoded, time.time()),
        )

    def get_workflow(self, workflow_id: str) -> dict | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT snapshot FROM cw_workflows WHERE workflow_id = ?", (workflow_id,)
            ).fetchone()
        return _loads(row[0]) if row else None

    # -- relay socket claims ------------------------------------------------------

    def claim_relay_socket(self, tracking_id: str, owner: str, generation: int, lease_s: float) -> bool:
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT owner, generation, expires_at FROM cw_relay_sockets WHERE tracking_id = ?", (tracking_id,)
            ).fetchone()
            if row is not None and row[2] > now and row[1] >= generation and row[0] != owner:
                return False
            conn.execute(
                "INSERT INTO cw_relay_sockets (tracking_id, owner, generation, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (tracking_id) DO UPDATE SET owner = excluded.owner,"
                " generation = excluded.generation, expires_at = excluded.expires_at",
                (tracking_id, owner, generation, now + lease_s),
            )
        return True

    def renew_relay_socket(self, tracking_id: str, owner: str, lease_s: float) -> bool:
        with self._write() as conn:
            return conn.execute(
                "UPDATE cw_relay_sockets SET expires_at = ? WHERE tracking_id = ? AND owner = ?",
                (time.time() + lease_s, tracking_id, owner),
            ).rowcount == 1

    def release_relay_socket(self, tracking_id: str, owner: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM cw_relay_sockets WHERE tracking_id = ? AND owner = ?", (tracking_id, owner))

    def relay_socket_held(self, tracking_id: str) -> bool:
        with self._connection() as conn:
            row = conn.execute("SELECT expires_at FROM cw_relay_sockets WHERE tracking_id = ?",
                               (tracking_id,)).fetchone()
        return row is not None and row[0] > time.time()

    # -- end-of-call report outbox ------------------------------------------------

    def claim_report(self, tracking_id: str, holder: str, lease_s: float, *, attempt: bool = False,
                     create: bool = False) -> ReportClaim | None:
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT holder, attempts, lease_until FROM cw_report_outbox WHERE tracking_id = ?",
                               (tracking_id,)).fetchone()
            if row is None:
                if not create:
                    return None
                claim = ReportClaim(int(attempt))
                conn.execute("INSERT INTO cw_report_outbox (tracking_id, holder, attempts, lease_until)"
                             " VALUES (?, ?, ?, ?)", (tracking_id, holder, claim.attempts, now + lease_s))
                return claim
            if row[0] != holder and row[2] > now:
                return None
            claim = ReportClaim(int(row[1]) + int(attempt), row[0])
            conn.execute("UPDATE cw_report_outbox SET holder = ?, attempts = ?, lease_until = ? WHERE tracking_id = ?",
                         (holder, claim.attempts, now + lease_s, tracking_id))
        return claim

    def due_reports(self, now: float, limit: int) -> list[str]:
        with self._connection() as conn:
            return [row[0] for row in conn.execute(
                "SELECT tracking_id FROM cw_report_outbox WHERE lease_until <= ? ORDER BY lease_until LIMIT ?",
                (now, limit))]

    def finish_report(self, tracking_id: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM cw_report_outbox WHERE tracking_id = ?", (tracking_id,))

    # -- operations -------------------------------------------------------------

    # -- small shared records (circuit breakers) -------------------------------

    def read_shared(self, key: str) -> dict | None:
        with self._connection() as conn:
            row = conn.execute("SELECT data FROM cw_shared WHERE key = ?", (key,)).fetchone()
        return _loads(row[0]) if row else None

    def update_shared(self, key: str, change: Callable[[dict | None], dict | None]) -> tuple[dict | None, bool]:
        with self._write() as conn:
            row = conn.execute("SELECT data FROM cw_shared WHERE key = ?", (key,)).fetchone()
            current = _loads(row[0]) if row else None
            new = change(copy.deepcopy(current))
            if new is None:
                return current, False
            conn.execute("INSERT INTO cw_shared (key, data) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                         "data = excluded.data", (key, _dumps(new)))
        return new, True

    def ping(self) -> float:
        started = time.perf_counter()
        with self._connection() as conn:
            conn.execute("SELECT 1").fetchone()
        return (time.perf_counter() - started) * 1000

    def memory(self) -> None:
        """Bound by its disk, not by memory."""
        return None

    def purge(self, older_than: float) -> int:
        """In transactions of PURGE_BATCH calls: one transaction over a backlog (the first purge of a large store)
        would hold the write lock, and the worker's event loop, for its whole length while calls are live. Then the
        workflow versions no call references any more go, in one write transaction: a call created meanwhile
        (its version inserted in its own write transaction) either came first and keeps it, or stores it again."""
        deleted = 0
        while True:
            with self._write() as conn:
                batch = [row[0] for row in conn.execute(
                    f"SELECT tracking_id FROM cw_calls WHERE {_EXPIRED} LIMIT ?",
                    (older_than, unended_created_before(older_than), PURGE_BATCH))]
                marks = ",".join("?" * len(batch))
                for table in ("cw_turns", "cw_statuses", "cw_relay_sockets", "cw_report_outbox", "cw_calls"):
                    if batch:
                        conn.execute(f"DELETE FROM {table} WHERE tracking_id IN ({marks})", batch)
            deleted += len(batch)
            if len(batch) < PURGE_BATCH:
                break
            time.sleep(0)  # under gevent, live calls' greenlets run between two batches
        with self._write() as conn:  # one indexed look-up per version
            conn.execute(f"DELETE FROM cw_workflow_versions WHERE {_UNREFERENCED_VERSIONS}")
        return deleted

    def purge_transcripts(self, older_than: float) -> int:
        """One write transaction: the secrets and kept words of every expired call that still has any (a call
        with no transcript too, and without the purge mark), then the transcripts, counted."""
        expired = (older_than, unended_created_before(older_than))
        with self._write() as conn:
            conn.execute(
                f"UPDATE cw_calls SET data = json_set(json_remove(data, {_PURGED_META_PATHS}), '$.credentials', NULL)"
                f" WHERE ({_EXPIRED}) AND ({_HOLDS_SECRETS})", expired)
            return conn.execute(
                "UPDATE cw_calls SET data = json_set(data,"
                " '$.messages', json('[]'), '$.transcript', json('[]'), '$.meta.transcriptPurgedAt', ?)"
                f" WHERE ({_EXPIRED})"
                " AND (json_array_length(data, '$.messages') > 0 OR json_array_length(data, '$.transcript') > 0)",
                (time.time(), *expired),
            ).rowcount

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT expires_at FROM cw_leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] > now:
                return False
            conn.execute(
                "INSERT INTO cw_leases (name, holder, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
                (name, holder, now + ttl_s),
            )
        return True
