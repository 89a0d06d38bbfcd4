"""Reply cache: utterance normalisation, keys, backends (memory, shared directory, real Redis), outages, safety."""
from __future__ import annotations

import ast
import os
import signal
import time
from pathlib import Path

import pytest

from callweaver.engine.cache import (
    MAX_REPLY_CHARS,
    CachedReply,
    ReplyCache,
    normalize_utterance,
    reply_is_safe_to_cache,
)
from callweaver.cache_backends import (
    SQLITE_CACHE_FILE,
    SQLITE_CACHE_PRUNE_EVERY_N_WRITES,
    SQLiteCache,
    build_cache_backend,
)

EN_FILLERS = ("um", "uh", "er")
ZH_FILLERS = ("呃", "嗯")
YUE_FILLERS = ("嗯", "呃", "啊", "喎")
KEY_ARGS = {"workflow_hash": "wfhash-1", "node_id": "node-greet", "language": "en-US",
            "heard_before": "Hi, this is Ava from Sunrise Realty. How can I help?"}
# Outage and reconnect bounds are deliberately loose: a loaded 2-core CI box must not make them flaky.
OUTAGE_BOUND_S = 1.5


def reply(text: str = "Hi, this is Ava from Sunrise Realty. How can I help?", **overrides) -> CachedReply:
    fields = {"text": text, "provider": "azure", "created_at": time.time(), "language": "en-US",
              "node_id": "node-greet"}
    fields.update(overrides)
    return CachedReply(**fields)


def memory_cache(**kwargs) -> ReplyCache:
    return ReplyCache(build_cache_backend("SimpleCache", redis_url=None, cache_dir="", default_timeout=300), **kwargs)


# --- normalisation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("said", "fillers", "expected"), [
    ("Um, hello??", EN_FILLERS, "hello"),
    ("HELLO!", (), "hello"),
    ("Who is this?", (), "who is this"),
    ("  uh   who is   THIS ", EN_FILLERS, "who is this"),
    ("I don't know", (), "i dont know"),
    ("Yes… yes.", (), "yes yes"),
])
def test_english_utterances_normalize_to_plain_lowercase_words(said, fillers, expected):
    assert normalize_utterance(said, fillers) == expected


def test_english_fillers_are_dropped_only_as_whole_words():
    # "um" inside "umbrella" and "er" inside "there" are real words, not fillers.
    assert normalize_utterance("Um, umbrella over there, er", EN_FILLERS) == "umbrella over there"


def test_multi_word_filler_is_dropped_as_a_phrase():
    assert normalize_utterance("You know, hi there", ("you know",)) == "hi there"
    assert normalize_utterance("You, hi", ("you know",)) == "you hi"


def test_spanish_accents_are_kept_and_inverted_marks_stripped():
    assert normalize_utterance("¿Quién es?") == "quién es"
    assert normalize_utterance("¡SÍ, por favor!") == "sí por favor"
    # Accents change meaning ("si" = if, "sí" = yes): they must not be folded away.
    assert normalize_utterance("sí") != normalize_utterance("si")


def test_chinese_without_spaces_drops_fillers_and_full_width_punctuation():
    assert normalize_utterance("呃，你好？", ZH_FILLERS) == "你好"
    assert normalize_utterance("嗯你好", ZH_FILLERS) == "你好"
    assert normalize_utterance("你好，我想问一下。", ZH_FILLERS) == normalize_utterance("你好我想问一下", ZH_FILLERS)
    assert normalize_utterance("「你好」……", ZH_FILLERS) == "你好"


def test_chinese_filler_inside_a_sentence_is_kept():
    # Only leading, trailing or standalone fillers are dropped; inside a sentence it may be part of the meaning.
    assert normalize_utterance("我嗯想问", ZH_FILLERS) == "我嗯想问"


def test_cantonese_fillers_are_dropped_at_either_end_and_when_repeated():
    assert normalize_utterance("嗯，你係邊個啊？", YUE_FILLERS) == "你係邊個"
    assert normalize_utterance("呃呃，喂？", YUE_FILLERS) == "喂"
    assert normalize_utterance("嗯嗯", YUE_FILLERS) == ""


def test_traditional_and_simplified_chinese_are_not_merged():
    assert normalize_utterance("你好嗎") != normalize_utterance("你好吗")


def test_full_width_forms_fold_to_ascii():
    assert normalize_utterance("ＨＥＬＬＯ！") == "hello"


# --- keys ----------------------------------------------------------------------------------------------------

def test_punctuation_case_and_filler_variants_map_to_one_key():
    cache = memory_cache()
    keys = {cache.key(**KEY_ARGS, utterance=said, fillers=EN_FILLERS)
            for said in ("Hello?", "hello", "HELLO!!", "Um, hello...", "uh hello", " hello ")}
    assert len(keys) == 1 and None not in keys


def test_chinese_punctuation_variants_map_to_one_key():
    cache = memory_cache()
    args = {**KEY_ARGS, "language": "zh-CN"}
    keys = {cache.key(**args, utterance=said, fillers=ZH_FILLERS) for said in ("你好？", "呃，你好", "你好!", "嗯 你好。")}
    assert len(keys) == 1 and None not in keys


@pytest.mark.parametrize("changed", [{"node_id": "node-other"}, {"language": "es-ES"},
                                     {"workflow_hash": "wfhash-2"}, {"utterance": "goodbye"},
                                     {"heard_before": "Shall I book the evening slot?"},
                                     {"prompt_variables": {"city": "Leeds"}},
                                     {"history": [{"role": "user", "content": "hi this is john"}]}])
def test_different_node_language_workflow_or_words_give_different_keys(changed):
    cache = memory_cache()
    base = {**KEY_ARGS, "utterance": "hello"}
    assert cache.key(**base) != cache.key(**{**base, **changed})


def test_the_last_assistant_line_is_normalised_and_prompt_variables_are_order_free():
    cache = memory_cache()
    base = {**KEY_ARGS, "utterance": "Yes.", "prompt_variables": {"a": "1", "b": "Two"}}
    same = {**base, "heard_before": "  hi, THIS is Ava from Sunrise Realty... how can i help ", "utterance": "yes",
            "prompt_variables": {"b": "two", "a": 1}}
    assert cache.key(**base) == cache.key(**same)
    assert cache.key(**base) != cache.key(**{**base, "prompt_variables": {"a": "1", "b": "Three"}})


def test_cantonese_and_mandarin_keys_differ_for_the_same_characters():
    cache = memory_cache()
    base = {**KEY_ARGS, "utterance": "你好"}
    assert cache.key(**{**base, "language": "zh-HK"}) != cache.key(**{**base, "language": "zh-CN"})


def test_key_fields_cannot_bleed_into_each_other():
    cache = memory_cache()
    assert cache.key(workflow_hash="a", node_id="b c", language="en", heard_before="", utterance="x") != \
        cache.key(workflow_hash="a b", node_id="c", language="en", heard_before="", utterance="x")
    assert cache.key(workflow_hash="a", node_id="b", language="en", heard_before="c d", utterance="x") != \
        cache.key(workflow_hash="a", node_id="b", language="en", heard_before="c", utterance="d x")


def test_key_contains_no_raw_caller_text():
    cache = memory_cache()
    key = cache.key(**KEY_ARGS, utterance="My name is Jonathan Smithers")
    assert key is not None and key.startswith("cw:reply:ctx1:")
    digest = key[len("cw:reply:ctx1:"):]
    assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    for word in ("jonathan", "smithers", "name", "node-greet", "wfhash"):
        assert word not in key.lower()


def test_empty_filler_only_or_long_utterances_get_no_key():
    cache = memory_cache(max_utterance_chars=80)
    assert cache.key(**KEY_ARGS, utterance="") is None
    assert cache.key(**KEY_ARGS, utterance="?!… ") is None
    assert cache.key(**KEY_ARGS, utterance="um, uh", fillers=EN_FILLERS) is None
    assert cache.key(**KEY_ARGS, utterance="word " * 30) is None
    assert cache.key(**KEY_ARGS, utterance="a" * 80) is not None


def test_get_and_put_with_no_key_do_nothing():
    cache = memory_cache()
    assert cache.get(None) is None
    assert cache.put(None, reply()) is False
    assert cache.stats()["puts"] == 0


# --- memory and shared-directory backends ---------------------------------------------------------------------

def test_put_then_get_round_trips_the_reply_on_simple_cache():
    cache = memory_cache()
    key = cache.key(**KEY_ARGS, utterance="Hello?")
    original = reply()
    assert cache.get(key) is None
    assert cache.put(key, original) is True
    assert cache.get(cache.key(**KEY_ARGS, utterance="hello")) == original
    assert cache.stats() == {"hits": 1, "misses": 1, "puts": 1, "errors": 0, "backend": "SimpleCache"}


def test_workers_sharing_a_cache_directory_see_each_others_replies(tmp_path):
    cache_dir = str(tmp_path / "reply-cache")
    worker_a = ReplyCache(build_cache_backend("FileSystemCache", redis_url=None, cache_dir=cache_dir,
                                              default_timeout=300))
    worker_b = ReplyCache(build_cache_backend("FileSystemCache", redis_url=None, cache_dir=cache_dir,
                                              default_timeout=300))
    key = worker_a.key(**KEY_ARGS, utterance="Who is this?")
    original = reply("This is Ava from Sunrise Realty.", provider="openai")
    assert worker_a.put(key, original) is True
    assert worker_b.get(worker_b.key(**KEY_ARGS, utterance="who is this")) == original
    assert worker_b.stats()["hits"] == 1 and worker_b.stats()["backend"] == "FileSystemCache"


def test_auto_backend_is_the_machine_wide_sqlite_cache_without_redis_and_redis_with_it(tmp_path):
    assert type(build_cache_backend("", redis_url=None, cache_dir=str(tmp_path), default_timeout=60)).__name__ \
        == "SQLiteCache"
    assert type(build_cache_backend("", redis_url="redis://127.0.0.1:1/0", cache_dir=str(tmp_path),
                                    default_timeout=60)).__name__ == "RedisCache"


def sqlite_backend(cache_dir) -> SQLiteCache:
    return build_cache_backend("SQLiteCache", redis_url=None, cache_dir=str(cache_dir), default_timeout=300)


def test_workers_sharing_the_sqlite_cache_see_each_others_replies(tmp_path):
    worker_a, worker_b = ReplyCache(sqlite_backend(tmp_path)), ReplyCache(sqlite_backend(tmp_path))
    key = worker_a.key(**KEY_ARGS, utterance="Who is this?")
    original = reply("This is Ava from Sunrise Realty.", provider="openai")
    assert worker_a.put(key, original) is True
    assert worker_b.get(worker_b.key(**KEY_ARGS, utterance="who is this")) == original
    assert worker_b.stats()["hits"] == 1 and worker_b.stats()["backend"] == "SQLiteCache"
    assert worker_b.health() == {"ok": True, "backend": "SQLiteCache", "error": None}


def test_sqlite_cache_add_has_one_winner_across_processes_until_the_entry_expires(tmp_path):
    now = [1_000_000.0]
    worker_a = SQLiteCache(str(tmp_path / "c.sqlite3"), clock=lambda: now[0])
    worker_b = SQLiteCache(str(tmp_path / "c.sqlite3"), clock=lambda: now[0])
    assert worker_a.add("marker", 1, timeout=60) is True
    assert worker_b.add("marker", 1, timeout=60) is False
    assert worker_a.add("marker", 1, timeout=60) is False
    now[0] += 61
    assert worker_b.has("marker") is False and worker_b.get("marker") is None
    assert worker_b.add("marker", 2, timeout=60) is True
    assert worker_a.get("marker") == 2
    assert worker_a.delete("marker") is True and worker_b.get("marker") is None


def test_sqlite_cache_stores_json_values_only_and_prunes_to_its_threshold(tmp_path):
    values = SQLiteCache(str(tmp_path / "values.sqlite3"))
    assert values.set("object", object()) is False
    assert values.set("plain", {"text": "hi", "n": [1, 2]}) is True and values.get("plain") == {"text": "hi", "n": [1, 2]}
    cache = SQLiteCache(str(tmp_path / "c.sqlite3"), threshold=10)
    for i in range(SQLITE_CACHE_PRUNE_EVERY_N_WRITES):
        cache.set(f"k{i}", i, timeout=1000 + i)
    kept = [i for i in range(SQLITE_CACHE_PRUNE_EVERY_N_WRITES) if cache.has(f"k{i}")]
    assert len(kept) <= 10 and kept[-1] == SQLITE_CACHE_PRUNE_EVERY_N_WRITES - 1  # the longest-lived stay


def test_sqlite_cache_write_waits_in_python_for_another_workers_write_lock(tmp_path):
    import sqlite3
    import threading

    cache = SQLiteCache(str(tmp_path / "c.sqlite3"))
    assert cache.set("warm", 1) is True  # creates the file and its table
    other_worker = sqlite3.connect(str(tmp_path / "c.sqlite3"), isolation_level=None, check_same_thread=False)
    other_worker.execute("BEGIN IMMEDIATE")  # holds the write lock
    release = threading.Timer(0.1, lambda: other_worker.execute("COMMIT"))
    release.start()
    try:
        assert cache.set("after", 2) is True
    finally:
        release.join()
        other_worker.close()
    assert cache.get("after") == 2


def test_sqlite_cache_is_a_flask_caching_backend(tmp_path):
    from flask import Flask
    from flask_caching import Cache

    app = Flask(__name__)
    cache = Cache(app, config={"CACHE_TYPE": "callweaver.cache_backends.SQLiteCache", "CACHE_DIR": str(tmp_path)})
    with app.app_context():
        cache.set("greeting", "hello", timeout=30)
        assert cache.get("greeting") == "hello"
    assert (tmp_path / SQLITE_CACHE_FILE).exists()


def test_prewarm_is_claimed_once_per_marker_by_workers_sharing_the_cache(tmp_path):
    worker_a, worker_b = ReplyCache(sqlite_backend(tmp_path)), ReplyCache(sqlite_backend(tmp_path))
    assert worker_a.claim_prewarm("flow-1:en-US", 600) is True
    assert worker_b.claim_prewarm("flow-1:en-US", 600) is False
    assert worker_b.claim_prewarm("flow-2:en-US", 600) is True
    worker_a.release_prewarm("flow-1:en-US")  # its call ended before the warm-up finished
    assert worker_b.claim_prewarm("flow-1:en-US", 600) is True
    assert ReplyCache(build_cache_backend("NullCache", redis_url=None, cache_dir="", default_timeout=60)) \
        .claim_prewarm("flow-1:en-US", 600) is False


def test_unknown_cache_type_and_redis_without_url_are_refused(tmp_path):
    with pytest.raises(ValueError):
        build_cache_backend("Memcached", redis_url=None, cache_dir=str(tmp_path), default_timeout=60)
    with pytest.raises(ValueError):
        build_cache_backend("RedisCache", redis_url=None, cache_dir=str(tmp_path), default_timeout=60)


def test_empty_and_overlong_replies_are_refused():
    cache = memory_cache()
    key = cache.key(**KEY_ARGS, utterance="hello")
    assert cache.put(key, reply("")) is False
    assert cache.put(key, reply("   ")) is False
    assert cache.put(key, reply("x" * (MAX_REPLY_CHARS + 1))) is False
    assert cache.get(key) is None
    assert cache.put(key, reply("x" * MAX_REPLY_CHARS)) is True


def test_entry_expires_after_its_ttl():
    cache = memory_cache(ttl_s=1)
    key = cache.key(**KEY_ARGS, utterance="hello")
    assert cache.put(key, reply()) is True
    assert cache.get(key) is not None
    time.sleep(2.5)
    assert cache.get(key) is None


def test_entry_older_than_ttl_by_the_injected_clock_is_a_miss():
    now = [1_000_000.0]
    cache = memory_cache(ttl_s=60, clock=lambda: now[0])
    key = cache.key(**KEY_ARGS, utterance="hello")
    cache.put(key, reply(created_at=now[0]))
    now[0] += 59
    assert cache.get(key) is not None
    now[0] += 2
    assert cache.get(key) is None


def test_unreadable_entry_is_a_miss_not_an_error():
    cache = memory_cache()
    key = cache.key(**KEY_ARGS, utterance="hello")
    cache.backend.set(key, "not an entry")
    assert cache.get(key) is None
    assert cache.stats()["misses"] == 1 and cache.stats()["errors"] == 0


class ExplodingBackend:
    """A backend whose every call fails, like a cache server that went away."""

    def get(self, key):
        raise ConnectionError("backend down")

    def set(self, key, value, timeout=None):
        raise ConnectionError("backend down")

    def delete(self, key):
        raise ConnectionError("backend down")


def test_backend_failures_become_misses_and_are_counted_not_raised():
    cache = ReplyCache(ExplodingBackend())
    key = cache.key(**KEY_ARGS, utterance="hello")
    for _ in range(5):
        assert cache.get(key) is None
        assert cache.put(key, reply()) is False
    assert cache.stats() == {"hits": 0, "misses": 0, "puts": 0, "errors": 10, "backend": "ExplodingBackend"}
    health = cache.health()
    assert health["ok"] is False and "backend down" in health["error"]


def test_backend_errors_are_logged_at_most_once_a_minute(monkeypatch):
    from callweaver.engine import cache as cache_module
    logged = []
    monkeypatch.setattr(cache_module.log, "warning", lambda event, **fields: logged.append((event, fields)))
    now = [5_000.0]
    cache = ReplyCache(ExplodingBackend(), clock=lambda: now[0])
    for _ in range(20):
        cache.get("cw:reply:x")
        now[0] += 1
    assert len(logged) == 1
    now[0] += 60
    cache.get("cw:reply:x")
    assert len(logged) == 2
    assert logged[1][1]["errors_not_logged"] == 19


def test_health_reports_a_working_round_trip():
    assert memory_cache().health() == {"ok": True, "backend": "SimpleCache", "error": None}


def test_null_cache_stores_nothing_and_reports_unhealthy(tmp_path):
    cache = ReplyCache(build_cache_backend("NullCache", redis_url=None, cache_dir=str(tmp_path), default_timeout=60))
    key = cache.key(**KEY_ARGS, utterance="hello")
    cache.put(key, reply())
    assert cache.get(key) is None
    assert cache.health()["ok"] is False


# --- real Redis ------------------------------------------------------------------------------------------------

@pytest.fixture
def redis_server():
    from tests.fakes.redis_server import RedisServer
    server = RedisServer().start()
    yield server
    server.close()


def redis_cache(url: str, **kwargs) -> ReplyCache:
    return ReplyCache(build_cache_backend("RedisCache", redis_url=url, cache_dir="", default_timeout=300), **kwargs)


def test_redis_round_trip_is_shared_between_instances(redis_server):
    instance_a, instance_b = redis_cache(redis_server.url), redis_cache(redis_server.url)
    key = instance_a.key(**KEY_ARGS, utterance="Hello?")
    original = reply()
    assert instance_a.put(key, original) is True
    assert instance_b.get(key) == original
    assert instance_b.health() == {"ok": True, "backend": "RedisCache", "error": None}


def test_redis_entry_expires_after_its_ttl(redis_server):
    cache = redis_cache(redis_server.url, ttl_s=1)
    key = cache.key(**KEY_ARGS, utterance="hello")
    assert cache.put(key, reply()) is True
    assert cache.get(key) is not None
    time.sleep(2.5)
    assert cache.get(key) is None


def test_redis_outage_costs_a_quick_miss_and_recovers_after_restart(redis_server):
    cache = redis_cache(redis_server.url)
    key = cache.key(**KEY_ARGS, utterance="hello")
    assert cache.put(key, reply()) is True

    redis_server.stop()
    started = time.monotonic()
    assert cache.get(key) is None
    assert time.monotonic() - started < OUTAGE_BOUND_S
    started = time.monotonic()
    assert cache.put(key, reply()) is False
    assert time.monotonic() - started < OUTAGE_BOUND_S
    assert cache.stats()["errors"] == 2
    assert cache.health()["ok"] is False

    redis_server.start()  # same port; the data is gone (no persistence), the connection must come back
    assert cache.get(key) is None
    assert cache.put(key, reply()) is True
    assert cache.get(key) is not None
    assert cache.health()["ok"] is True


def test_hung_redis_costs_a_miss_bounded_by_the_socket_timeout(redis_server):
    """A frozen server accepts connections but never answers: only the socket timeout (no retries) bounds it."""
    process = getattr(redis_server, "_process", None)
    if process is None or not hasattr(signal, "SIGSTOP"):
        pytest.skip("needs the redis-server process to freeze it")
    cache = redis_cache(redis_server.url)
    key = cache.key(**KEY_ARGS, utterance="hello")
    assert cache.put(key, reply()) is True
    os.kill(process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert cache.get(key) is None
        assert cache.put(key, reply()) is False
        assert time.monotonic() - started < 2 * OUTAGE_BOUND_S
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert cache.stats()["errors"] == 2
    assert cache.get(key) is not None


# --- what may be cached -------------------------------------------------------------------------------------------

def safe(text: str, *, variables=None, tool_calls=None, node_cacheable=True, **extra) -> bool:
    return reply_is_safe_to_cache(text, variables=variables or {}, tool_calls=tool_calls or [],
                                  node_cacheable=node_cacheable, **extra)


def test_plain_reply_is_safe_to_cache():
    assert safe("Hi! This is Ava from Sunrise Realty. Are you looking to buy or sell?",
                variables={"customer_name": "Jonathan", "budget": "", "bedrooms": None})


def test_reply_containing_a_variable_value_is_unsafe_case_insensitively():
    assert not safe("Thanks, JONATHAN, I will note that.", variables={"customer_name": "Jonathan"})
    assert not safe("A place in downtown austin, got it.", variables={"area": "Downtown Austin"})


def test_one_character_variable_values_do_not_block_caching():
    assert safe("Great, a lovely choice.", variables={"initial": "a"})


def test_reply_in_a_turn_with_tool_calls_is_unsafe():
    assert not safe("Let me transfer you now.", tool_calls=[{"name": "goto_node", "arguments": "{}"}])


def test_reply_at_a_non_cacheable_node_or_from_a_personalised_prompt_is_unsafe():
    assert not safe("Hello there.", node_cacheable=False)


@pytest.mark.parametrize("text", ["Call us at 5551234567.", "That is 555-123-4567.", "The price is $1,250,000.",
                                  "See you on 2024-05-01.", "Your code is 4821."])
def test_reply_with_long_numbers_is_unsafe(text):
    assert not safe(text)


def test_short_numbers_are_fine():
    assert safe("We have 3 bedrooms and 2 baths in most units.")


def test_reply_with_an_email_address_is_unsafe():
    assert not safe("Write to jane.doe@example.com and we will reply.")


def test_empty_reply_is_unsafe():
    assert not safe("")


# --- layering ---------------------------------------------------------------------------------------------------

def test_cache_module_does_not_import_flask_at_module_level():
    tree = ast.parse(Path(__file__).resolve().parents[1].joinpath("callweaver/engine/cache.py").read_text())
    top_level_imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top_level_imports if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in top_level_imports if isinstance(node, ast.ImportFrom)]
    assert not [name for name in names if name.split(".")[0] in {"flask", "flask_caching"}]


def test_conversations_split_differently_between_lines_give_different_keys():
    cache = memory_cache()
    base = {**KEY_ARGS, "utterance": "hello"}
    one = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]
    other = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}]
    swapped = [{"role": "assistant", "content": "a b"}, {"role": "user", "content": "c"}]
    keys = {cache.key(**base, history=h) for h in (one, other, swapped)}
    assert len(keys) == 3 and cache.key(**base, history=list(one)) in keys
