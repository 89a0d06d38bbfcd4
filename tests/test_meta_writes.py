"""A call's `meta` is written by several writers at once (turn commits, hang-up accounting, the terminal status
callback, TwiML); each merges only its own keys inside the store, so nothing stored is lost and stripped
credentials never come back. Run against both backends (SQLite and a real redis-server)."""

from __future__ import annotations

import multiprocessing
from types import SimpleNamespace

import pytest

from callweaver.config import Settings
from callweaver.engine.conversation import ConversationEngine, TurnResult
from callweaver.engine.languages import LanguageTable
from callweaver.lifecycle import CallLifecycle
from callweaver.store import CallRecord, build_store
from tests.test_store import redis_server, store, store_spec  # noqa: F401 (fixtures: both backends)

SEALED = "sealed-llm-credentials-blob"


@pytest.fixture
def languages() -> LanguageTable:
    return LanguageTable.load()


@pytest.fixture
def engine(store, languages) -> ConversationEngine:
    return ConversationEngine(store, None, languages, record_transcripts=False)


@pytest.fixture
def lifecycle(store, languages) -> CallLifecycle:
    return CallLifecycle(Settings(), store, None, languages)


def live_call(store, tracking_id: str = "call_1") -> CallRecord:
    store.create_call(CallRecord(tracking_id=tracking_id, call_sid="CA1", status="in-progress", credentials=SEALED,
                                 meta={"llm": SEALED, "setup": {"direction": "outbound-api"}}))
    return store.get_call(tracking_id)


def ending_turn(action: str = "end_call"):
    """A finished turn whose reply the caller heard and whose action (end the call) fires."""
    result = TurnResult(node_id="n1", language="en-US", action=action, completed=True, reply_text="Goodbye.")
    return SimpleNamespace(result=result, utterance="bye")


def unanswered(count: int = 1):
    """Speculations that never got a final transcript, each with one LLM request of 5 tokens."""
    return [SimpleNamespace(turn=SimpleNamespace(result=SimpleNamespace(llm_requests=1)), token_count=5)
            for _ in range(count)]


def hang_up(lifecycle: CallLifecycle, store, tracking_id: str = "call_1") -> None:
    """Twilio's terminal status callback, read and handled as the route does."""
    lifecycle.record_status(store.get_call(tracking_id), {"CallStatus": "completed", "SequenceNumber": "9",
                                                          "CallSid": "CA1"})


# -- the writers, interleaved ---------------------------------------------------------------------------------


def test_terminal_strip_between_a_session_reading_its_record_and_committing_an_action_stays_stripped(
        store, engine, lifecycle):
    session_record = live_call(store)  # the live session's own copy, read at setup
    hang_up(lifecycle, store)  # terminal callback: the sealed credentials leave the record
    engine.commit_turn(session_record, ending_turn(), path="optimized", timings={})

    stored = store.get_call("call_1")
    assert "llm" not in stored.meta and stored.credentials is None
    assert SEALED not in repr(stored.to_dict())
    assert stored.meta["pendingAction"] == "end_call"
    assert stored.meta["setup"] == {"direction": "outbound-api"}


def test_unanswered_speculations_written_while_a_turn_commits_are_both_kept(store, engine):
    session_record = live_call(store)
    engine.record_unanswered_speculations(session_record, unanswered(2), "call_ended")
    engine.commit_turn(session_record, ending_turn(), path="optimized", timings={})
    engine.record_unanswered_speculations(session_record, unanswered(1), "call_ended")

    meta = store.get_call("call_1").meta
    assert meta["unansweredSpeculations"] == {"speculations": 3, "llmRequests": 3, "tokens": 15}
    assert meta["pendingAction"] == "end_call"


class InterleavingStore:
    """The real store, except that `between` (another writer) runs just before the first write of a call record:
    it lands after everything the writer read, so a writer that sends back what it read undoes it."""

    RECORD_WRITES = ("update_call", "update_meta")

    def __init__(self, store, between):
        self._store, self._between = store, between

    def __getattr__(self, name):
        method = getattr(self._store, name)
        if name not in self.RECORD_WRITES:
            return method

        def write(*args, **kwargs):
            between, self._between = self._between, None
            if between is not None:
                between()
            return method(*args, **kwargs)

        return write


def test_terminal_strip_during_unanswered_speculation_accounting_stays_stripped(store, languages, lifecycle):
    live_call(store)
    racing = InterleavingStore(store, lambda: hang_up(lifecycle, store))
    ConversationEngine(racing, None, languages).record_unanswered_speculations(
        store.get_call("call_1"), unanswered(1), "call_ended")

    meta = store.get_call("call_1").meta
    assert "llm" not in meta
    assert meta["unansweredSpeculations"] == {"speculations": 1, "llmRequests": 1, "tokens": 5}


def test_two_unanswered_speculation_writers_interleaved_lose_no_count(store, languages, engine):
    record = live_call(store)
    racing = InterleavingStore(
        store, lambda: engine.record_unanswered_speculations(record, unanswered(1), "speech_ended"))
    ConversationEngine(racing, None, languages).record_unanswered_speculations(record, unanswered(2), "call_ended")

    assert store.get_call("call_1").meta["unansweredSpeculations"] == {"speculations": 3, "llmRequests": 3,
                                                                         "tokens": 15}


def test_terminal_strip_keeps_keys_written_after_the_callback_read_the_record(store, engine, lifecycle):
    record = live_call(store)
    seen_by_callback = store.get_call("call_1")
    engine.record_unanswered_speculations(record, unanswered(1), "call_ended")  # lands after the callback's read
    lifecycle.record_status(seen_by_callback, {"CallStatus": "completed", "SequenceNumber": "9"})

    meta = store.get_call("call_1").meta
    assert "llm" not in meta and store.get_call("call_1").credentials is None
    assert meta["unansweredSpeculations"]["speculations"] == 1


# -- the store operation ------------------------------------------------------------------------------------


def test_update_meta_sets_removes_and_adds_only_the_named_keys(store):
    store.create_call(CallRecord(tracking_id="c", meta={"keep": [1, "二"], "gone": 1, "count": {"a": 2}}))
    before = store.get_call("c").updated_at

    meta = store.update_meta("c", {"new": {"x": None}}, remove=["gone", "absent"],
                             add={"count": {"a": 3, "b": 1}, "fresh": {"n": 2}})

    expected = {"keep": [1, "二"], "new": {"x": None}, "count": {"a": 5, "b": 1}, "fresh": {"n": 2}}
    assert meta == expected
    stored = store.get_call("c")
    assert stored.meta == expected and stored.updated_at >= before


def test_update_meta_first_sets_an_entry_only_where_there_is_none_so_writing_it_again_changes_nothing(store):
    """A claim's mark: the first writer's stays, and the same write sent again (its reply lost) leaves it as it is."""
    store.create_call(CallRecord(tracking_id="c", meta={"claims": {"0": "a"}}))

    assert store.update_meta("c", first={"claims": {"0": "b", "1": "b"}}) == {"claims": {"0": "a", "1": "b"}}
    assert store.update_meta("c", first={"claims": {"1": "b"}, "other": {"x": 1}}) == {
        "claims": {"0": "a", "1": "b"}, "other": {"x": 1}}
    assert store.get_call("c").meta == {"claims": {"0": "a", "1": "b"}, "other": {"x": 1}}
    with pytest.raises(ValueError):
        store.update_meta("c", first={"a.b": {"x": 1}})

def test_update_meta_of_an_unknown_call_writes_nothing(store):
    assert store.update_meta("nobody", {"a": 1}) is None
    assert store.get_call("nobody") is None


def test_whole_meta_writes_are_refused_so_no_writer_sends_a_stale_copy(store):
    store.create_call(CallRecord(tracking_id="c", meta={"llm": SEALED}))
    with pytest.raises(ValueError):
        store.update_call("c", meta={})
    with pytest.raises(ValueError):
        store.commit_turn("c", {"meta": {}}, {"n": 0})
    with pytest.raises(ValueError):
        store.update_meta("c", {"a.b": 1})  # a key is one top-level name, never a path
    assert store.get_call("c").meta == {"llm": SEALED}


def _add_and_set_repeatedly(spec: dict, writer: str, iterations: int, barrier, results) -> None:
    """Child process: add to a shared count and set an own key, over and over."""
    store = build_store(**spec)
    try:
        barrier.wait(timeout=120)
        for i in range(iterations):
            store.update_meta("shared", {writer: i}, add={"count": {"n": 1}})
        results.put((writer, None))
    except Exception as exc:  # reported to the parent, which fails the test with it
        results.put((writer, repr(exc)))


def test_two_processes_merging_meta_lose_no_count_and_no_key(store, store_spec):
    store.create_call(CallRecord(tracking_id="shared"))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    iterations = 60
    workers = [ctx.Process(target=_add_and_set_repeatedly, args=(store_spec, name, iterations, barrier, results))
               for name in ("first", "second")]
    for worker in workers:
        worker.start()
    reports = sorted(results.get(timeout=180) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)

    assert reports == [("first", None), ("second", None)]
    assert store.get_call("shared").meta == {"first": iterations - 1, "second": iterations - 1,
                                             "count": {"n": 2 * iterations}}


def test_purging_transcripts_marks_meta_and_keeps_the_keys_other_writers_set(store):
    store.create_call(CallRecord(tracking_id="old", created_at=10.0, meta={"setup": {"direction": "inbound"}},
                                 messages=[{"role": "user", "content": "hi"}]))
    store.update_meta("old", add={"unansweredSpeculations": {"speculations": 1}})
    store.update_call("old", ended_at=20.0)

    assert store.purge_transcripts(older_than=30.0) == 1
    meta = store.get_call("old").meta
    assert meta["transcriptPurgedAt"] > 0
    assert meta["setup"] == {"direction": "inbound"} and meta["unansweredSpeculations"] == {"speculations": 1}
    assert store.purge_transcripts(older_than=30.0) == 0  # nothing left to purge: meta untouched


def test_a_turn_of_a_call_the_store_no_longer_has_is_logged_as_not_stored(store, engine):
    """Redis restarted without its data (or the call was purged) while the call was live: the store writes
    nothing for the turn, and the log says so with the call's id rather than reporting the turn completed."""
    import structlog.testing

    session_record = CallRecord(tracking_id="gone", call_sid="CA1", status="in-progress")
    with structlog.testing.capture_logs() as logs:
        updated = engine.commit_turn(session_record, ending_turn(), path="optimized", timings={})
    assert updated is None and store.get_call("gone") is None
    assert [e["tracking_id"] for e in logs if e["event"] == "turn_not_stored" and e["log_level"] == "error"] == ["gone"]
