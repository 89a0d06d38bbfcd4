"""Redis call store: used when REDIS_URL is set, so many instances share every call's state."""

from __future__ import annotations

import copy
import functools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Iterable, Mapping

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from callweaver.config import DEFAULT_REDIS_KEY_PREFIX
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

# Calls read per round trip while a filtered call-log page walks the created-at index.
PAGE_SCAN_CHUNK = 500

# How long a counting write's "applied" marker outlives it: a lost reply is replayed at once (_transaction).
APPLIED_MARKER_TTL_S = 60


def _mark_applied(pipe: Any, marker: str | None) -> None:
    """Queue, inside a write's MULTI, the marker _transaction looks for before replaying it after a lost reply."""
    if marker is not None:
        pipe.set(marker, "1", ex=APPLIED_MARKER_TTL_S)

# Short, so an outage turns into a StoreError the hot path can degrade on instead of a hung turn.
SOCKET_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 1.0
# Errors after which redis-py drops the pooled connection (and, with a retry left, tries the command once more on a
# new one): a Redis restart closed it, or a failover left it on the old primary, now a replica that refuses every
# write (READONLY) while the host name already points at the promoted one.
RECONNECT_ON = (redis.ConnectionError, redis.ReadOnlyError)


def client_options(retries: int = 1) -> dict[str, Any]:
    """redis-py client options for every user of REDIS_URL (store, rate limits): short timeouts, reconnects."""
    return {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S,
            # One immediate retry heals a connection a restart or failover left behind; more would turn an outage
            # into a stall on the hot path.
            "retry": Retry(NoBackoff(), retries, supported_errors=RECONNECT_ON), "retry_on_timeout": False}

# Layout (all under the key prefix):
#   call:<tid>       hash, one JSON-encoded value per CallRecord field (field writes never clobber others)
#   statuses:<tid>   hash sequence -> {"status","receivedAt","payload"}
#   turns:<tid>      list of turn JSON, index = turn index
#   sid:<call_sid>   string -> tracking id
#   calls:created    zset tracking id by created_at (list_calls)
#   calls:ended      zset tracking id by ended_at (purge)
#   turns:by_time    zset "<10-digit index>/<tid>" by at (recent_turns reads the row from turns:<tid>; ties stay in
#                    turn order). An earlier release's members are "<10-digit index>:<turn JSON>", a second copy of
#                    the row: still read, amended and purged.
#   workflow:<id>    string, snapshot JSON
#   workflow_version:<hash>  string, snapshot JSON of one workflow version (calls hold only the hash); purged with
#                    the last call that references it
#   relay:<tid>      hash {owner, generation, expires_at} (the live relay socket), kept a day past its lease
#   counters         hash series -> cumulative value (incremented by the scripts that append a turn or end a call)
#   lease:<name>     string holder, expiring (periodic jobs that must run once per store)
#   report:<tid>     hash {holder, attempts, claim, before}: the call's end-of-call report, due (the report outbox);
#                    claim and before: the last claim's id and the holder it took over (a claim sent again)
#   reports:due      zset tracking id by the epoch its holder's lease runs out (due_reports)

# Every write script below answers a write sent again after its reply was lost (redis-py sends a command once more
# when its connection fails before the reply: RECONNECT_ON) as it answered the first time, changing nothing: the
# write is recognised by what it stores (a call's exact fields, a turn row or status entry with its own time).

# KEYS: call, sid index (or call again), calls:created, calls:ended, workflow version (or call again)
# ARGV: tracking id, has sid "1"/"0", created_at, ended_at or "", snapshot JSON or "", then field/value pairs
# Returns 1 created (or this very call already stored: sent again), 0 another call has the tracking id.
_CREATE_CALL = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 6, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then return 0 end
  end
  return 1
end
if ARGV[5] ~= '' then redis.call('SET', KEYS[5], ARGV[5], 'NX') end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
if ARGV[2] == '1' then redis.call('SET', KEYS[2], ARGV[1]) end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1]) end
return 1
"""

# Lua, before a write that sets a call's CallSid (KEYS[1] the call, KEYS[2] the new CallSid's index entry, `sid_prefix`
# the index's key prefix): the old CallSid's entry goes if it still names this call, so only the current CallSid
# finds it (as in SQLite, whose index is the call's own column) and purge leaves no entry behind.
_DROP_OLD_SID = """
local old = redis.call('HGET', KEYS[1], 'call_sid')
if old and old ~= 'null' then
  local old_key = sid_prefix .. cjson.decode(old)
  if old_key ~= KEYS[2] and redis.call('GET', old_key) == tracking_id then redis.call('DEL', old_key) end
end
"""

# KEYS: call, sid index (or call again), calls:created, calls:ended, counters
# ARGV: tracking id, has sid "1"/"0", new created_at or "", ended "set"/"clear"/"", ended_at,
#       ended-calls series to count if this write ends the call (or ""), sid index prefix, pairs...
_UPDATE_CALL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[6] ~= '' then
  local ended = redis.call('HGET', KEYS[1], 'ended_at')
  if (not ended) or ended == 'null' then redis.call('HINCRBYFLOAT', KEYS[5], ARGV[6], 1) end
end
if ARGV[2] == '1' then
  local sid_prefix, tracking_id = ARGV[7], ARGV[1]
""" + _DROP_OLD_SID + """
end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
if ARGV[2] == '1' then redis.call('SET', KEYS[2], ARGV[1]) end
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1]) end
if ARGV[4] == 'set' then
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
elseif ARGV[4] == 'clear' then
  redis.call('ZREM', KEYS[4], ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: call, sid index. ARGV: tracking id, call_sid JSON, status JSON, updated_at JSON, sid index prefix.
# make-call's last write: the CallSid always; the REST answer's status only while no status callback has landed
# (Twilio may call back before its answer arrives, and a callback's status is the newer one).
_RECORD_PLACED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local sid_prefix, tracking_id = ARGV[5], ARGV[1]
""" + _DROP_OLD_SID + """
redis.call('HSET', KEYS[1], 'call_sid', ARGV[2], 'updated_at', ARGV[4])
if (tonumber(redis.call('HGET', KEYS[1], 'status_sequence') or '-1') or -1) < 0 then
  redis.call('HSET', KEYS[1], 'status', ARGV[3])
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# KEYS: calls:created. ARGV: key prefix, start, count, then field/JSON value pairs to match.
# One chunk of the created-at index, newest first, filtered inside Redis: returns {index size, matching ids...}.
_FILTER_CALLS = """
local ids = redis.call('ZREVRANGE', KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[2]) + tonumber(ARGV[3]) - 1)
local out = {redis.call('ZCARD', KEYS[1])}
for _, id in ipairs(ids) do
  local ok = true
  for i = 4, #ARGV, 2 do
    if redis.call('HGET', ARGV[1] .. id, ARGV[i]) ~= ARGV[i + 1] then ok = false; break end
  end
  if ok then table.insert(out, id) end
end
return out
"""

# KEYS: turns list, turns:by_time. ARGV: the last turn's JSON as read, its amended JSON. Replaces the row (and an
# earlier release's time-index member holding it, "<index>:<turn JSON>") unless another write changed it since: then 0.
_AMEND_LAST_TURN = """
local index = redis.call('LLEN', KEYS[1]) - 1
if index < 0 or redis.call('LINDEX', KEYS[1], -1) ~= ARGV[1] then return 0 end
redis.call('LSET', KEYS[1], -1, ARGV[2])
local member = string.format('%010d', index) .. ':'
local score = redis.call('ZSCORE', KEYS[2], member .. ARGV[1])
if score then
  redis.call('ZREM', KEYS[2], member .. ARGV[1])
  redis.call('ZADD', KEYS[2], score, member .. ARGV[2])
end
return 1
"""

# KEYS: call, statuses, calls:ended, counters, report, reports:due
# ARGV: tracking id, status JSON, sequence or "", entry JSON, received_at, terminal "1"/"0", updated_at,
#       ended-calls series of this status, report holder or "" (none recorded), its lease's end (epoch)
# Returns -1 unknown call, 0 recorded-or-duplicate but not current, 1 became current. This same entry already stored
# (sent again; a callback Twilio retries has another receivedAt), under its number or as the current entry (a final
# status renumbered below), answers 1 if it is the current one.
_APPEND_STATUS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local current = tonumber(redis.call('HGET', KEYS[1], 'status_sequence') or '-1') or -1
local sent = current
if ARGV[3] ~= '' then sent = tonumber(ARGV[3]) end
if redis.call('HGET', KEYS[2], tostring(sent)) == ARGV[4] then
  if sent == current then return 1 end
  return 0
end
-- a final status stored after the number it came with (taken by an unnumbered callback) is the current entry
if sent ~= current and redis.call('HGET', KEYS[2], tostring(current)) == ARGV[4] then return 1 end
local sequence
if ARGV[3] == '' then sequence = current + 1 else sequence = tonumber(ARGV[3]) end
local ended = redis.call('HGET', KEYS[1], 'ended_at')
local has_ended = ended and ended ~= 'null'
local ends_now = ARGV[6] == '1' and not has_ended
if redis.call('HSETNX', KEYS[2], tostring(sequence), ARGV[4]) == 0 then
  if not ends_now then return 0 end
  -- the number was taken by a callback that came without one: the final status goes after it, and ends the call
  sequence = math.max(sequence, current) + 1
  redis.call('HSETNX', KEYS[2], tostring(sequence), ARGV[4])
end
local changes = {'updated_at', ARGV[7]}
local became = 0
-- the status that ends the call becomes its status; an ended call stays ended: a late non-terminal status is
-- history only (END_REASON_RULE)
if ends_now or (sequence > current and (ARGV[6] == '1' or not has_ended)) then
  table.insert(changes, 'status'); table.insert(changes, ARGV[2])
  table.insert(changes, 'status_sequence'); table.insert(changes, tostring(math.max(sequence, current)))
  became = 1
end
if ends_now then
  table.insert(changes, 'ended_at'); table.insert(changes, ARGV[5])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
  redis.call('HINCRBYFLOAT', KEYS[4], ARGV[8], 1)
  if ARGV[9] ~= '' and redis.call('HSETNX', KEYS[5], 'holder', ARGV[9]) == 1 then
    redis.call('HSET', KEYS[5], 'attempts', 0)
    redis.call('ZADD', KEYS[6], ARGV[10], ARGV[1])
  end
end
redis.call('HSET', KEYS[1], unpack(changes))
return became
"""

# KEYS: report, reports:due   ARGV: holder, now, lease's end, attempts to add "1"/"0", create "1"/"0", tracking id,
# claim id (unique per call of claim_report: the same claim sent again after its reply was lost is recognised by it,
# and answered as the first time, its attempt not counted twice).
# Returns {attempts, holder before or ""}, or false: another holder's lease runs, or none is due (and not created).
_CLAIM_REPORT = """
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder and redis.call('HGET', KEYS[1], 'claim') == ARGV[7] then
  return {tonumber(redis.call('HGET', KEYS[1], 'attempts')), redis.call('HGET', KEYS[1], 'before') or ''}
end
if not holder then
  redis.call('ZREM', KEYS[2], ARGV[6])
  if ARGV[5] ~= '1' then return false end
  redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'attempts', tonumber(ARGV[4]), 'claim', ARGV[7], 'before', '')
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6])
  return {tonumber(ARGV[4]), ''}
end
if holder ~= ARGV[1] and tonumber(redis.call('ZSCORE', KEYS[2], ARGV[6]) or '0') > tonumber(ARGV[2]) then
  return false
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'claim', ARGV[7], 'before', holder)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6])
return {attempts, holder}
"""

# KEYS: report, reports:due   ARGV: tracking id.  Only DEL and ZREM: runs at `maxmemory` too (_PURGE_CALL).
_FINISH_REPORT = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
"""

# A turn row that is already the call's last (the same row, with its own time: sent again) is answered with its index.
_TURN_SENT_AGAIN = """
if redis.call('LINDEX', KEYS[TURNS], -1) == ARGV[1] then return redis.call('LLEN', KEYS[TURNS]) - 1 end
"""

# The time index's member naming a call's turn row (ARGV[3]: the tracking id): the row itself is stored once, in the
# call's turn list.
_INDEX_TURN = """
redis.call('ZADD', KEYS[TIME_INDEX], ARGV[2], string.format('%010d', index) .. '/' .. ARGV[3])
"""

# KEYS: turns list, turns:by_time, counters   ARGV: turn JSON, at, tracking id, then series/increment pairs
_APPEND_TURN = _TURN_SENT_AGAIN.replace("TURNS", "1") + """
local index = redis.call('RPUSH', KEYS[1], ARGV[1]) - 1
""" + _INDEX_TURN.replace("TIME_INDEX", "2") + """
for i = 4, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[3], ARGV[i], ARGV[i + 1]) end
return index
"""

# KEYS: call, turns list, turns:by_time, counters
# ARGV: turn JSON, at, tracking id, transcript entry JSON or "", number of field/value pairs, the pairs, then
# series/increment pairs. The transcript entry is spliced into the stored JSON array as text: nothing is decoded.
# -1: unknown call.
_COMMIT_TURN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
""" + _TURN_SENT_AGAIN.replace("TURNS", "2") + """
local pairs_end = 5 + 2 * tonumber(ARGV[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 6, pairs_end))
if ARGV[4] ~= '' then
  local transcript = redis.call('HGET', KEYS[1], 'transcript')
  if (not transcript) or transcript == 'null' or transcript == '[]' then
    transcript = '[' .. ARGV[4] .. ']'
  else
    transcript = string.sub(transcript, 1, -2) .. ',' .. ARGV[4] .. ']'
  end
  redis.call('HSET', KEYS[1], 'transcript', transcript)
end
local index = redis.call('RPUSH', KEYS[2], ARGV[1]) - 1
""" + _INDEX_TURN.replace("TIME_INDEX", "3") + """
for i = pairs_end + 1, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[4], ARGV[i], ARGV[i + 1]) end
return index
"""

# KEYS: call, turns list, statuses, relay claim, calls:created, calls:ended, turns:by_time, report, reports:due
# ARGV: tracking id, sid index prefix.  Deletes one purged call with its index entries; returns 1 if it existed.
# Only commands Redis runs at `maxmemory` (reads, DEL, ZREM; a MULTI is refused whole there), so retention still
# frees a full Redis that refuses every other write (`noeviction`).
_PURGE_CALL = """
local sid = redis.call('HGET', KEYS[1], 'call_sid')
if sid and sid ~= 'null' then
  local sid_key = ARGV[2] .. cjson.decode(sid)
  if redis.call('GET', sid_key) == ARGV[1] then redis.call('DEL', sid_key) end
end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
for index, item in ipairs(items) do
  local position = string.format('%010d', index - 1)
  redis.call('ZREM', KEYS[7], position .. '/' .. ARGV[1], position .. ':' .. item)
end
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[8])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
return existed
"""

# KEYS: calls:created, then the versions' keys. ARGV: the call key prefix, then each version's hash as a call stores
# it (JSON), in KEYS' order (ARGV[i] names KEYS[i]). Deletes those versions no call references, looking at every call
# in this one script: a call created concurrently (its own script stores its version if absent) is either seen
# here, or comes after and stores its version again. Only reads and DEL, so it runs at `maxmemory` too (_PURGE_CALL).
_DROP_WORKFLOW_VERSIONS = """
local wanted, left = {}, #ARGV - 1
for i = 2, #ARGV do wanted[ARGV[i]] = i end
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local version = redis.call('HGET', ARGV[1] .. id, 'workflow_hash')
  if version and wanted[version] then
    wanted[version] = nil
    left = left - 1
    if left == 0 then return 0 end
  end
end
local deleted = 0
for version, i in pairs(wanted) do deleted = deleted + redis.call('DEL', KEYS[i]) end
return deleted
"""

# A claim's hash outlives its lease (as SQLite's row does), so its owner's late renewal (a store outage or a
# stalled worker longer than the lease) keeps the call while no other socket took it; the lease itself is
# `expires_at`, in ms on Redis's own clock (TIME), so instances with skewed clocks agree on it.
RELAY_CLAIM_KEPT_MS = 86_400_000

# KEYS: relay claim   ARGV: owner, generation, lease ms, kept ms.  Returns 1 claimed, 0 held by another owner.
_CLAIM_RELAY = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local owner = redis.call('HGET', KEYS[1], 'owner')
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_at') or '')
if owner and owner ~= ARGV[1] and (expires == nil or expires > now)
    and tonumber(redis.call('HGET', KEYS[1], 'generation')) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'generation', ARGV[2], 'expires_at', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]))
return 1
"""

# KEYS: relay claim   ARGV: owner, lease ms (0 = release), kept ms.  Returns 1 when the owner held the claim.
_RENEW_RELAY = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]); return 1 end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[1], 'expires_at', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
"""

# KEYS: relay claim.  Returns 1 while an owner holds it within its lease (on Redis's clock, as the claim is made).
_RELAY_HELD = """
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_at') or '')
if expires == nil then return 0 end
local time = redis.call('TIME')
if expires > tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) then return 1 end
return 0
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json_number(value: float) -> str:
    """A float as both a JSON number and a Redis score."""
    return repr(float(value))


def _refusal(exc: redis.ResponseError) -> str:
    """Redis's refusal without the command it refused: redis-py names a pipelined command with its arguments
    ("Command # 1 (HSET <key> meta {...}) of pipeline caused error: ..."), a call's meta included (what the caller
    said). Raised `from None`, so a logged traceback does not carry it either."""
    return str(exc).split(" of pipeline caused error: ", 1)[-1]


def _glob_escape(text: str) -> str:
    """`text` matched literally by a SCAN/KEYS pattern (a key prefix may hold glob characters)."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _increments(counters: Mapping[str, float] | None) -> list[str]:
    """Counter increments as flat series/value script arguments."""
    flat: list[str] = []
    for series, value in (counters or {}).items():
        flat += [series, repr(float(value))]
    return flat


class RedisStore:
    """Call state in Redis; the client is built on first use so no socket crosses a fork."""

    def __init__(self, url: str, key_prefix: str = DEFAULT_REDIS_KEY_PREFIX) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._snapshots = WorkflowSnapshots(_dumps, json.loads)

    # -- connection -------------------------------------------------------

    def _redis(self) -> redis.Redis:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._client = None
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                client = redis.Redis.from_url(self.url, decode_responses=True, health_check_interval=30,
                                              **client_options())
                self._scripts = {
                    "create_call": client.register_script(_CREATE_CALL),
                    "update_call": client.register_script(_UPDATE_CALL),
                    "record_placed": client.register_script(_RECORD_PLACED),
                    "append_status": client.register_script(_APPEND_STATUS),
                    "append_turn": client.register_script(_APPEND_TURN),
                    "commit_turn": client.register_script(_COMMIT_TURN),
                    "amend_last_turn": client.register_script(_AMEND_LAST_TURN),
                    "filter_calls": client.register_script(_FILTER_CALLS),
                    "claim_relay": client.register_script(_CLAIM_RELAY),
                    "renew_relay": client.register_script(_RENEW_RELAY),
                    "relay_held": client.register_script(_RELAY_HELD),
                    "purge_call": client.register_script(_PURGE_CALL),
                    "drop_workflow_versions": client.register_script(_DROP_WORKFLOW_VERSIONS),
                    "claim_report": client.register_script(_CLAIM_REPORT),
                    "finish_report": client.register_script(_FINISH_REPORT),
                }
                self._client = client
            return self._client

    @contextmanager
    def _backend(self) -> Iterator[redis.Redis]:
        """The client; Redis and socket failures surface as StoreError."""
        try:
            yield self._redis()
        except redis.OutOfMemoryError as exc:
            raise StoreFull(f"redis store: {type(exc).__name__}: {_refusal(exc)}") from None
        except redis.ResponseError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {_refusal(exc)}") from None
        except (redis.RedisError, OSError) as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        with self._backend():
            return self._scripts[name](keys=keys, args=args)

    def close(self) -> None:
        """Drop this process's connections (tests, shutdown)."""
        client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            client.close()

    def _key(self, *parts: str) -> str:
        return self.key_prefix + ":".join(parts)

    @staticmethod
    def _transaction(client: redis.Redis, apply: Callable[[Any], Any], key: str,
                     applied_marker: str | None = None) -> Any:
        """As client.transaction(apply, key, value_from_callable=True): WATCH, `apply` (reads, then MULTI and its
        writes), EXEC, replayed while another client writes the key in between. But a connection failing under the
        WATCH (RECONNECT_ON, READONLY included) is replayed once, as any other command: redis-py reports it as a
        WatchError too, and its transaction() replays that forever, so a Redis that stays read-only (a failover's
        old primary, a REDIS_URL naming a replica) would never let the caller return.

        A write that ADDS (counts) passes `applied_marker`, a key its `apply` sets with its write (_mark_applied):
        after a lost reply the replay first looks for it, and a write that landed is not added again."""
        failed = 0
        value = None
        with client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if failed and applied_marker is not None and pipe.exists(applied_marker):
                        pipe.unwatch()
                        return value  # the EXEC whose reply was lost landed: this attempt's answer stands
                    value = apply(pipe)
                    pipe.execute()
                    return value
                except redis.WatchError as exc:
                    # redis-py raises it while handling the connection's error: that error is its __context__.
                    if isinstance(exc.__context__, RECONNECT_ON):
                        failed += 1
                        if failed > 1:
                            raise exc.__context__ from None

    # -- calls ----------------------------------------------------------------

    def create_call(self, record: CallRecord, workflow_id: str | None = None) -> None:
        data, version = self._snapshots.detach(vars(record))
        pairs: list[str] = []
        for name, value in data.items():
            pairs += [name, _dumps(value)]
        call_key = self._key("call", record.tracking_id)
        sid_key = self._key("sid", record.call_sid) if record.call_sid else call_key
        created = self._script(
            "create_call",
            [call_key, sid_key, self._key("calls", "created"), self._key("calls", "ended"),
             self._key("workflow_version", version[0]) if version else call_key],
            [
                record.tracking_id,
                "1" if record.call_sid else "0",
                _json_number(record.created_at),
                "" if record.ended_at is None else _json_number(record.ended_at),
                version[1] if version else "",
                *pairs,
            ],
        )
        if not created:
            raise StoreError(f"call {record.tracking_id!r} already exists")
        if workflow_id:
            self.save_workflow(workflow_id, record.workflow)

    def get_call(self, tracking_id: str) -> CallRecord | None:
        with self._backend() as client:
            fields = client.hgetall(self._key("call", tracking_id))
        return self._record_from_hash(fields)

    def _record_from_hash(self, fields: dict | list) -> CallRecord | None:
        """A stored call as a record, its workflow snapshot resolved from its version (cached per worker)."""
        if isinstance(fields, list):  # a Lua reply is a flat [field, value, ...] list
            fields = dict(zip(fields[::2], fields[1::2]))
        if not fields:
            return None
        data = {key: json.loads(value) for key, value in fields.items()}
        return CallRecord.from_dict(self._snapshots.attach(data, self._workflow_version))

    def _workflow_version(self, version_hash: str) -> str | None:
        with self._backend() as client:
            return client.get(self._key("workflow_version", version_hash))

    def find_tracking_id(self, call_sid: str) -> str | None:
        with self._backend() as client:
            return client.get(self._key("sid", call_sid))

    def update_call(self, tracking_id: str, **fields: Any) -> CallRecord | None:
        check_update_fields(fields)
        fields = {"updated_at": time.time(), **fields}
        pairs: list[str] = []
        for name, value in fields.items():
            pairs += [name, _dumps(value)]
        call_sid = fields.get("call_sid")
        ended_action, ended_score, ended_series = "", "", ""
        if "ended_at" in fields:
            if fields["ended_at"] is None:
                ended_action = "clear"
            else:
                ended_action, ended_score = "set", _json_number(fields["ended_at"])
                status = fields.get("status")
                if status is None:
                    with self._backend() as client:
                        stored = client.hget(self._key("call", tracking_id), "status")
                    status = json.loads(stored) if stored else None
                ended_series = counter_series(CALLS_ENDED_COUNTER, {"status": status or "unknown"})
        reply = self._script(
            "update_call",
            [
                self._key("call", tracking_id),
                self._key("sid", call_sid) if call_sid else self._key("call", tracking_id),
                self._key("calls", "created"),
                self._key("calls", "ended"),
                self._key("counters"),
            ],
            [
                tracking_id,
                "1" if call_sid else "0",
                _json_number(fields["created_at"]) if "created_at" in fields else "",
                ended_action,
                ended_score,
                ended_series,
                self._key("sid", ""),
                *pairs,
            ],
        )
        return self._record_from_hash(reply) if reply else None

    def record_placed(self, tracking_id: str, call_sid: str, status: str) -> bool:
        reply = self._script("record_placed", [self._key("call", tracking_id), self._key("sid", call_sid)],
                             [tracking_id, _dumps(call_sid), _dumps(status), _dumps(time.time()),
                              self._key("sid", "")])
        return bool(reply)

    def update_meta(self, tracking_id: str, changes: Mapping[str, Any] | None = None, *,
                    remove: Iterable[str] = (), add: Mapping[str, Mapping[str, float]] | None = None,
                    first: Mapping[str, Mapping[str, Any]] | None = None) -> dict | None:
        """WATCH the call, read its meta, MULTI/EXEC the merge: `apply` is replayed if any other writer touched the
        call in between (_transaction), so the merge always starts from what is stored."""
        check_meta_keys(changes, remove, add, first)
        remove = list(remove)
        call_key = self._key("call", tracking_id)

        def apply(pipe) -> dict | None:
            stored = pipe.hmget(call_key, ["tracking_id", "meta"])
            if stored[0] is None:
                return None
            meta = merge_meta(json.loads(stored[1]) if stored[1] else {}, changes, remove, add, first)
            pipe.multi()
            pipe.hset(call_key, mapping={"meta": _dumps(meta), "updated_at": _dumps(time.time())})
            _mark_applied(pipe, marker)
            return meta

        marker = self._key("applied", uuid.uuid4().hex) if add else None  # counts must not be added twice
        with self._backend() as client:
            return self._transaction(client, apply, call_key, marker)

    def change_meta(self, tracking_id: str, change: MetaChange) -> tuple[dict | None, bool]:
        """WATCH the call, read its meta and end, MULTI/EXEC `change`'s meta: replayed if any other writer touched the
        call in between (_transaction), a terminal status callback included."""
        call_key = self._key("call", tracking_id)

        def apply(pipe) -> tuple[dict | None, bool]:
            stored = pipe.hmget(call_key, ["tracking_id", "meta", "ended_at"])
            if stored[0] is None:
                return None, False
            meta = json.loads(stored[1]) if stored[1] else {}
            ended = stored[2] is not None and json.loads(stored[2]) is not None
            new = change(copy.deepcopy(meta), ended)
            if new is None:
                return meta, False
            pipe.multi()
            pipe.hset(call_key, mapping={"meta": _dumps(new), "updated_at": _dumps(time.time())})
            return new, True

        with self._backend() as client:
            return self._transaction(client, apply, call_key)

    def list_calls(self, since: float = 0.0, active_only: bool = False) -> list[CallRecord]:
        with self._backend() as client:
            tracking_ids = client.zrangebyscore(self._key("calls", "created"), since, "+inf")
            pipe = client.pipeline(transaction=False)
            for tracking_id in tracking_ids:
                pipe.hgetall(self._key("call", tracking_id))
            hashes = pipe.execute() if tracking_ids else []
        records = [record for record in map(self._record_from_hash, hashes) if record is not None]
        if active_only:
            records = [record for record in records if record.ended_at is None]
        return records

    def call_page(self, limit: int, offset: int = 0, *, status: str | None = None, path: str | None = None,
                  language: str | None = None) -> tuple[list[CallRecord], int]:
        wanted = {name: _dumps(value) for name, value in (("status", status), ("path", path),
                                                           ("language", language)) if value is not None}
        created_key = self._key("calls", "created")
        with self._backend() as client:
            if not wanted:
                total = client.zcard(created_key)
                page_ids = client.zrevrange(created_key, offset, offset + limit - 1) if limit > 0 else []
            else:
                # Filters walk the index newest first inside Redis, a chunk per round trip (short scripts, so
                # other clients are never held up), and only matching ids come back.
                pairs = [item for name_value in wanted.items() for item in name_value]
                total, page_ids, start, size = 0, [], 0, 1
                while start < size:
                    size, *matches = self._scripts["filter_calls"](
                        keys=[created_key], args=[self._key("call", ""), start, PAGE_SCAN_CHUNK, *pairs])
                    page_ids += matches[max(0, offset - total):max(0, offset + limit - total)]
                    total += len(matches)
                    start += PAGE_SCAN_CHUNK
            pipe = client.pipeline(transaction=False)
            for tracking_id in page_ids:
                pipe.hmget(self._key("call", tracking_id), [*CALL_LOG_FIELDS, "meta"])
            rows = pipe.execute() if page_ids else []
        records = []
        for *values, meta in rows:
            if values[0] is not None:  # purged between the index read and this one
                meta = json.loads(meta) if meta else {}
                records.append(CallRecord.from_dict({
                    **{name: json.loads(value) for name, value in zip(CALL_LOG_FIELDS, values) if value is not None},
                    "meta": {key: meta[key] for key in CALL_LOG_META_KEYS if meta.get(key) is not None}}))
        return records, total

    def _live_tracking_ids(self, client, since: float) -> list[str]:
        # Created since, then those with no end score (redis-py 8 returns ZDIFF WITHSCORES as a flat list).
        created = client.zrangebyscore(self._key("calls", "created"), since, "+inf")
        ended = client.zmscore(self._key("calls", "ended"), created) if created else []
        return [tid for tid, ended_at in zip(created, ended) if ended_at is None]

    def count_live_calls(self, since: float = 0.0) -> int:
        with self._backend() as client:
            return len(self._live_tracking_ids(client, since))

    def live_calls(self, since: float = 0.0) -> list[CallRecord]:
        with self._backend() as client:
            tracking_ids = self._live_tracking_ids(client, since)
            pipe = client.pipeline(transaction=False)
            for tracking_id in tracking_ids:
                pipe.hgetall(self._key("call", tracking_id))
            hashes = pipe.execute() if tracking_ids else []
        return [record for record in map(self._record_from_hash, hashes) if record is not None]

    def count_calls(self, since: float = 0.0) -> int:
        with self._backend() as client:
            return int(client.zcount(self._key("calls", "created"), since, "+inf"))

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
        entry = {"status": status, "receivedAt": received_at, "payload": payload}
        result = self._script(
            "append_status",
            [self._key("call", tracking_id), self._key("statuses", tracking_id), self._key("calls", "ended"),
             self._key("counters"), self._key("report", tracking_id), self._key("reports", "due")],
            [
                tracking_id,
                _dumps(status),
                "" if sequence is None else str(int(sequence)),
                _dumps(entry),
                _json_number(received_at),
                "1" if status in TERMINAL_STATUSES else "0",
                _json_number(time.time()),
                counter_series(CALLS_ENDED_COUNTER, {"status": status}),
                report_holder or "",
                _json_number(time.time() + report_lease_s),
            ],
        )
        return result == 1

    def status_history(self, tracking_id: str) -> list[dict]:
        with self._backend() as client:
            entries = client.hgetall(self._key("statuses", tracking_id))
        history = []
        for sequence, entry_json in entries.items():
            entry = json.loads(entry_json)
            history.append(
                {
                    "status": entry["status"],
                    "sequence": int(sequence),
                    "receivedAt": entry["receivedAt"],
                    "payload": entry["payload"],
                }
            )
        history.sort(key=lambda item: item["sequence"])
        return history

    # -- turns ----------------------------------------------------------------

    def append_turn(self, tracking_id: str, turn: dict, counters: Mapping[str, float] | None = None) -> int:
        stored = stored_turn(tracking_id, turn)
        index = self._script(
            "append_turn",
            [self._key("turns", tracking_id), self._key("turns", "by_time"), self._key("counters")],
            [_dumps(stored), _json_number(stored["at"]), tracking_id, *_increments(counters)],
        )
        return int(index)

    def commit_turn(self, tracking_id: str, fields: dict[str, Any], turn: dict,
                    counters: Mapping[str, float] | None = None, transcript_entry: dict | None = None) -> int | None:
        check_update_fields(fields, TURN_FIELDS)
        pairs = ["updated_at", _dumps(time.time())]
        for name, value in fields.items():
            pairs += [name, _dumps(value)]
        stored = stored_turn(tracking_id, turn)
        index = int(self._script(
            "commit_turn",
            [self._key("call", tracking_id), self._key("turns", tracking_id), self._key("turns", "by_time"),
             self._key("counters")],
            [_dumps(stored), _json_number(stored["at"]), tracking_id,
             "" if transcript_entry is None else _dumps(transcript_entry), str(len(pairs) // 2), *pairs,
             *_increments(counters)],
        ))
        return None if index < 0 else index

    def amend_last_turn(self, tracking_id: str, changes: Mapping[str, Any],
                        expect: Mapping[str, Any] | None = None) -> bool:
        keys = [self._key("turns", tracking_id), self._key("turns", "by_time")]
        with self._backend() as client:
            last = client.lindex(keys[0], -1)
        if last is None:
            return False
        turn = json.loads(last)
        if not row_holds(turn, expect):
            return False
        # The script amends it only if it is still the last row, unchanged since read here.
        return bool(self._script("amend_last_turn", keys, [last, _dumps({**turn, **changes})]))

    def add_counters(self, counters: Mapping[str, float]) -> None:
        if not counters:
            return
        with self._backend() as client:
            pipe = client.pipeline(transaction=True)
            for series, value in counters.items():
                pipe.hincrbyfloat(self._key("counters"), series, float(value))
            pipe.execute()

    def counters(self) -> dict[str, float]:
        with self._backend() as client:
            return {series: float(value) for series, value in client.hgetall(self._key("counters")).items()}

    def turns(self, tracking_id: str) -> list[dict]:
        with self._backend() as client:
            items = client.lrange(self._key("turns", tracking_id), 0, -1)
        return [json.loads(item) for item in items]

    def turns_of(self, tracking_ids: list[str]) -> dict[str, list[dict]]:
        if not tracking_ids:
            return {}
        with self._backend() as client:
            pipe = client.pipeline(transaction=False)
            for tracking_id in tracking_ids:
                pipe.lrange(self._key("turns", tracking_id), 0, -1)
            lists = pipe.execute()
        return {tracking_id: [json.loads(item) for item in items] for tracking_id, items in zip(tracking_ids, lists)}

    def recent_turns(self, since: float) -> list[dict]:
        """The time index's members in the window, then their rows from the calls' turn lists, one range per call,
        in one pipelined round trip (a row purged in between is left out, as if read a moment later)."""
        with self._backend() as client:
            members = client.zrangebyscore(self._key("turns", "by_time"), since, "+inf")
            # A member is "<index>/<tracking id>" (an earlier release's: "<index>:<turn JSON>"); the index is the
            # turn's within its call.
            spans: dict[str, list[int]] = {}
            for member in members:
                if member[10] == "/":
                    span = spans.setdefault(member[11:], [int(member[:10])] * 2)
                    span[0], span[1] = min(span[0], int(member[:10])), max(span[1], int(member[:10]))
            pipe = client.pipeline(transaction=False)
            for tracking_id, (first, last) in spans.items():
                pipe.lrange(self._key("turns", tracking_id), first, last)
            ranges = pipe.execute() if spans else []
        rows = {tracking_id: (first, items) for (tracking_id, (first, _)), items in zip(spans.items(), ranges)}
        out = []
        for member in members:
            index = int(member[:10])
            if member[10] == "/":
                first, items = rows[member[11:]]
                turn_json = items[index - first] if index - first < len(items) else None
            else:
                turn_json = member[11:]
            if turn_json is not None:
                out.append({**json.loads(turn_json), "index": index})
        return out

    # -- workflows --------------------------------------------------------------

    def save_workflow(self, workflow_id: str, snapshot: dict) -> None:
        with self._backend() as client:
            client.set(self._key("workflow", workflow_id), _dumps(snapshot))

    def get_workflow(self, workflow_id: str) -> dict | None:
        with self._backend() as client:
            value = client.get(self._key("workflow", workflow_id))
        return json.loads(value) if value is not None else None

    # -- relay socket claims ------------------------------------------------------

    def claim_relay_socket(self, tracking_id: str, owner: str, generation: int, lease_s: float) -> bool:
        return self._script("claim_relay", [self._key("relay", tracking_id)],
                            [owner, str(int(generation)), str(max(1, int(lease_s * 1000))), RELAY_CLAIM_KEPT_MS]) == 1

    def renew_relay_socket(self, tracking_id: str, owner: str, lease_s: float) -> bool:
        return self._script("renew_relay", [self._key("relay", tracking_id)],
                            [owner, str(max(1, int(lease_s * 1000))), RELAY_CLAIM_KEPT_MS]) == 1

    def release_relay_socket(self, tracking_id: str, owner: str) -> None:
        self._script("renew_relay", [self._key("relay", tracking_id)], [owner, "0", RELAY_CLAIM_KEPT_MS])

    def relay_socket_held(self, tracking_id: str) -> bool:
        return self._script("relay_held", [self._key("relay", tracking_id)], []) == 1

    # -- operations -------------------------------------------------------------

    # -- small shared records (circuit breakers) -------------------------------

    def read_shared(self, key: str) -> dict | None:
        with self._backend() as client:
            raw = client.get(self._key("shared", key))
        return json.loads(raw) if raw else None

    def update_shared(self, key: str, change: Callable[[dict | None], dict | None]) -> tuple[dict | None, bool]:
        """WATCH, read, MULTI/EXEC: `apply` is replayed if another instance wrote the key in between (_transaction)."""
        name = self._key("shared", key)

        def apply(pipe) -> tuple[dict | None, bool]:
            raw = pipe.get(name)
            current = json.loads(raw) if raw else None
            new = change(current)
            if new is None:
                return current, False
            pipe.multi()
            pipe.set(name, _dumps(new))
            _mark_applied(pipe, marker)
            return new, True

        marker = self._key("applied", uuid.uuid4().hex)  # a breaker's change counts failures: never twice
        with self._backend() as client:
            return self._transaction(client, apply, name, marker)

    def claim_report(self, tracking_id: str, holder: str, lease_s: float, *, attempt: bool = False,
                     create: bool = False) -> ReportClaim | None:
        """Leases are on each instance's clock (time.time): a skewed instance may take a report over early, which
        the receiver's dedupe key (the tracking id) covers, as any second delivery."""
        now = time.time()
        claimed = self._script("claim_report", [self._key("report", tracking_id), self._key("reports", "due")],
                               [holder, _json_number(now), _json_number(now + lease_s), "1" if attempt else "0",
                                "1" if create else "0", tracking_id, uuid.uuid4().hex])
        if not claimed:
            return None
        return ReportClaim(int(claimed[0]), claimed[1] or None)

    def due_reports(self, now: float, limit: int) -> list[str]:
        with self._backend() as client:
            return client.zrangebyscore(self._key("reports", "due"), "-inf", _json_number(now), start=0, num=limit)

    def finish_report(self, tracking_id: str) -> None:
        self._script("finish_report", [self._key("report", tracking_id), self._key("reports", "due")],
                     [tracking_id])

    def ping(self) -> float:
        with self._backend() as client:
            started = time.perf_counter()
            client.ping()
            return (time.perf_counter() - started) * 1000

    def _expired_tracking_ids(self, client: redis.Redis, older_than: float) -> list[str]:
        """The calls retention deletes (or empties) for a cutoff: ended before it, or never ended and created long
        enough before it (unended_created_before)."""
        ended = client.zrangebyscore(self._key("calls", "ended"), "-inf", f"({_json_number(older_than)}")
        old = client.zrangebyscore(self._key("calls", "created"), "-inf",
                                   f"({_json_number(unended_created_before(older_than))}")
        ended_at = client.zmscore(self._key("calls", "ended"), old) if old else []
        return ended + [tracking_id for tracking_id, end in zip(old, ended_at) if end is None]

    def memory(self) -> dict | None:
        """None where INFO is refused (some managed services disable it)."""
        with self._backend() as client:
            try:
                info = client.info("memory")
            except redis.ResponseError:
                return None
        return {"usedBytes": int(info["used_memory"]), "maxBytes": int(info.get("maxmemory", 0)),
                "policy": info.get("maxmemory_policy")}

    def purge(self, older_than: float) -> int:
        ended_key = self._key("calls", "ended")
        with self._backend() as client:
            tracking_ids = self._expired_tracking_ids(client, older_than)
        purged = 0
        for tracking_id in tracking_ids:  # one short script per call: other clients are never held up long
            purged += int(self._script("purge_call", [
                self._key("call", tracking_id), self._key("turns", tracking_id), self._key("statuses", tracking_id),
                self._key("relay", tracking_id), self._key("calls", "created"), ended_key,
                self._key("turns", "by_time"), self._key("report", tracking_id), self._key("reports", "due")],
                [tracking_id, self._key("sid", "")]))
        self._drop_unreferenced_workflow_versions()
        return purged

    def _drop_unreferenced_workflow_versions(self) -> int:
        """Delete the workflow versions no call references (those of purged calls, and any an earlier release
        left): found by reads in chunks, then confirmed and deleted by one script that looks at every call again
        (_DROP_WORKFLOW_VERSIONS), run only when there is a version to delete. Returns how many went."""
        version_prefix = self._key("workflow_version", "")
        with self._backend() as client:
            versions = {key[len(version_prefix):]
                        for key in client.scan_iter(match=_glob_escape(version_prefix) + "*", count=1000)}
            if not versions:
                return 0
            tracking_ids = client.zrange(self._key("calls", "created"), 0, -1)
            for start in range(0, len(tracking_ids), PAGE_SCAN_CHUNK):
                pipe = client.pipeline(transaction=False)
                for tracking_id in tracking_ids[start:start + PAGE_SCAN_CHUNK]:
                    pipe.hget(self._key("call", tracking_id), "workflow_hash")
                versions.difference_update(json.loads(version) for version in pipe.execute() if version)
                if not versions:
                    return 0
        unreferenced = sorted(versions)
        return int(self._script("drop_workflow_versions",
                                [self._key("calls", "created"), *(version_prefix + v for v in unreferenced)],
                                [self._key("call", ""), *map(_dumps, unreferenced)]))

    def purge_transcripts(self, older_than: float) -> int:
        purged_at = time.time()
        fields = ["messages", "transcript", "credentials", "meta"]

        def said(messages: str | None, transcript: str | None) -> bool:
            return any(value not in (None, "[]", "null") for value in (messages, transcript))

        def holds_secrets(credentials: str | None, meta: str | None) -> bool:
            kept = json.loads(meta) if meta else None
            return credentials not in (None, "null") or any(key in (kept or {}) for key in PURGED_META_KEYS)

        def empty(pipe, call_key: str) -> bool:
            """One call, as SQLite's UPDATEs: its credentials and PURGED_META_KEYS go, and any history and
            transcript with the purge mark, in one write (WATCH/MULTI), nothing else (updated_at stays the call's
            last activity); True when a transcript was emptied."""
            exists, messages, transcript, credentials, meta = pipe.hmget(call_key, ["tracking_id", *fields])
            emptied = exists is not None and said(messages, transcript)
            if exists is None or not (emptied or holds_secrets(credentials, meta)):
                return False
            changes = {"transcriptPurgedAt": purged_at} if emptied else {}
            mapping = {"credentials": "null", "meta": _dumps(merge_meta(json.loads(meta) if meta else {}, changes,
                                                                        remove=PURGED_META_KEYS))}
            if emptied:
                mapping.update(messages="[]", transcript="[]")
            pipe.multi()
            pipe.hset(call_key, mapping=mapping)
            return emptied

        purged = 0
        with self._backend() as client:
            tracking_ids = self._expired_tracking_ids(client, older_than)
            for start in range(0, len(tracking_ids), PAGE_SCAN_CHUNK):
                chunk = tracking_ids[start:start + PAGE_SCAN_CHUNK]
                pipe = client.pipeline(transaction=False)
                for tracking_id in chunk:
                    pipe.hmget(self._key("call", tracking_id), fields)
                for tracking_id, values in zip(chunk, pipe.execute()):
                    if said(*values[:2]) or holds_secrets(*values[2:]):  # only these are read again
                        call_key = self._key("call", tracking_id)
                        purged += self._transaction(client, functools.partial(empty, call_key=call_key),
                                                    call_key)
        return purged

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """As the Store says, except on a Redis at `maxmemory` that refuses writes (`noeviction`): the lease cannot
        be written there, so every worker takes it and the retention purge (harmless to repeat) frees the store."""
        try:
            with self._backend() as client:
                return bool(client.set(self._key("lease", name), holder, nx=True, px=max(1, int(ttl_s * 1000))))
        except StoreFull:
            return True
