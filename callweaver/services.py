"""Services: the store, clients and engine of one worker, built lazily (after the fork) and shared by routes."""
from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable

import structlog
from flask import current_app

from .call_report import CallReporter, default_holder
from .config import Settings
from .cache_backends import build_cache_backend
from .engine.cache import ReplyCache, reply_cache_prefix
from .engine.conversation import ConversationEngine, SpeculationPolicy
from .engine.languages import LanguageTable
from .engine.metrics import MetricsReader, RecentTurns
from .engine.tracing import CallTracer, NullTracer, build_tracer
from .heap import HeapTrimmer, glibc_malloc_trim
from .gather_turns import GatherTurns
from .lifecycle import CallLifecycle
from .overload import WorkerLoad
from .rate_limits import CallsPerDay, OpsTokenGuesses, limit_windows
from .background import OsThreadWork, Task, spawn
from .retention import run_periodically
from .store import Store, build_store
from .twilio_client import TwilioGateway

if TYPE_CHECKING:
    from limits.strategies import MovingWindowRateLimiter

    from .engine.relay_session import RelaySession

log = structlog.get_logger()


@dataclass
class Services:
    settings: Settings
    _sdk_warm_up: OsThreadWork | None = field(default=None, init=False, repr=False)
    # This worker's live relay sessions (registered by the relay route), so a stopping worker can hand them over.
    live_sessions: set[RelaySession] = field(default_factory=set, init=False, repr=False)
    # Set once hand_over_live_calls told the live calls to hand over: a socket accepted later is told at once.
    stopping: bool = field(default=False, init=False, repr=False)
    # By when (time.monotonic) their `end` must go out: before gunicorn kills the worker (None: no bound given).
    handover_deadline: float | None = field(default=None, init=False, repr=False)

    def add_live_session(self, session: RelaySession) -> None:
        """Register a relay session (the relay route). gunicorn's gevent worker closes its listener only on its
        next loop, so a socket may still be accepted after SIGTERM: it is told to hand over as it is added."""
        self.live_sessions.add(session)
        if self.stopping:
            session.hand_over(self.handover_deadline)

    def hand_over_live_calls(self, within_s: float | None = None) -> int:
        """The worker is stopping (gunicorn.conf.py: SIGTERM, as Render sends on every deploy): every live call
        ends its session at its next clean point and reconnects on a running instance (RelaySession.hand_over).
        How many calls were told: none without Redis, as no other instance can read the call from this one's
        SQLite file (Render starts the new instance on a fresh disk): they keep this worker until they end or
        gunicorn's graceful_timeout runs out. `within_s`: every handover's `end` goes out within that many seconds
        (gunicorn.conf.py: its graceful_timeout less a margin), whatever is still playing. The waiting end-of-call
        reports are handed back after that: one store write each, which a slow store must not put before the calls."""
        sessions = list(self.live_sessions)
        if not self.settings.redis_url:
            log.warning("worker_stopping", live_calls=len(sessions), handed_over=0,
                        reason="no store shared with other instances (REDIS_URL)")
            self.hand_back_reports()
            return 0
        self.handover_deadline = None if within_s is None else time.monotonic() + within_s
        self.stopping = True  # first: a session added from now on hands over itself (add_live_session)
        log.warning("worker_stopping", live_calls=len(sessions), handed_over=len(sessions))
        for session in sessions:
            try:
                session.hand_over(self.handover_deadline)
            except Exception:
                record = session.record  # (the task's log context is the SIGTERM's, empty)
                log.exception("relay_hand_over_failed", tracking_id=record.tracking_id if record else None,
                              call_sid=session.call_sid)
        self.hand_back_reports()
        return len(sessions)

    def hand_back_reports(self) -> int:
        """The worker is stopping: the end-of-call reports it only waits to retry go back to the store's outbox at
        once, for a running worker (any instance with Redis; with SQLite, this machine's next worker) to resume."""
        if not self.settings.call_report_url:
            return 0
        try:
            handed = self.call_reporter.hand_back_waiting()
        except Exception:
            log.exception("call_reports_hand_back_failed")
            return 0
        if handed:
            log.info("call_reports_handed_back", reports=handed)
        return handed

    @cached_property
    def store(self) -> Store:
        # (A SQLite store makes its directory when it first opens: a directory that cannot be made is then a
        # StoreError, which /health reports and the API answers with 503, rather than a worker that cannot start.)
        return build_store(self.settings.db_path, self.settings.redis_url, self.settings.redis_key_prefix)

    @cached_property
    def twilio(self) -> TwilioGateway:
        return TwilioGateway(self.settings.twilio_account_sid, self.settings.twilio_auth_token,
                             self.settings.twilio_api_base_url)

    @cached_property
    def languages(self) -> LanguageTable:
        return LanguageTable.load()

    @cached_property
    def lifecycle(self) -> CallLifecycle:
        return CallLifecycle(self.settings, self.store, self.twilio, self.languages, on_call_ended=self.call_ended,
                             take_call_slot=CallsPerDay(self.settings, self.limit_windows).take_slot,
                             overloaded=self.worker_load.overloaded,
                             report_holder=self.worker_name if self.settings.call_report_url else None)

    @cached_property
    def worker_load(self) -> WorkerLoad:
        """This worker's event-loop lag (probed once start_background_jobs ran) and make-call's admission check."""
        return WorkerLoad(self.settings.overload_loop_lag_ms)

    @cached_property
    def worker_name(self) -> str:
        """This worker process in the end-of-call report outbox (built after the fork: its own pid)."""
        return default_holder()

    @cached_property
    def gather_turns(self) -> GatherTurns:
        """A Gather call's answers kept per turn, so a webhook Twilio retries is answered, never run, again."""
        return GatherTurns(self.store, clock=self.engine.clock)  # the clock webhooks are timed on

    @cached_property
    def limit_windows(self) -> MovingWindowRateLimiter:
        """The rate limits' windows (per client, and the calls-per-day cap), in the storage every worker shares."""
        return limit_windows(self.settings)

    @cached_property
    def ops_token_guesses(self) -> OpsTokenGuesses:
        """Requests presenting an OPS_TOKEN, limited per client (RATE_LIMIT_OPS_AUTH)."""
        return OpsTokenGuesses(self.settings, self.limit_windows)

    @cached_property
    def call_reporter(self) -> CallReporter | None:
        s = self.settings
        if not s.call_report_url:
            return None
        return CallReporter(self.store, s.call_report_url, s.call_report_secret, spawn=spawn,
                            max_attempts=s.call_report_max_attempts, backoff_s=s.call_report_backoff_s,
                            settle_s=self.lifecycle.end_call_wait_s, holder=self.worker_name,
                            lease_s=s.call_report_lease_s)

    @cached_property
    def providers(self):
        from .engine.providers import build_provider_chain
        return build_provider_chain(self.settings, circuit_states=self.store)

    @cached_property
    def reply_cache(self) -> ReplyCache:
        s = self.settings
        backend = build_cache_backend(s.cache_type, redis_url=s.cache_redis_url, cache_dir=s.cache_dir,
                                      default_timeout=s.cache_ttl_s)
        return ReplyCache(backend, ttl_s=s.cache_ttl_s, key_prefix=reply_cache_prefix(s.redis_key_prefix))

    @cached_property
    def metrics(self) -> MetricsReader:
        """The windowed JSON metrics, over this worker's copy of the recent turns (topped up per poll): every
        route's figures come from it, so no request reads a whole window from the store again."""
        return MetricsReader(self.store, recent=RecentTurns(self.store))

    @cached_property
    def tracer(self) -> NullTracer | CallTracer:
        """The calls' tracer. The OpenTelemetry SDK reads its own OTEL_* variables as it is built, and refuses some
        (OTEL_BSP_SCHEDULE_DELAY=0, a non-numeric OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT): gunicorn's master does not check
        those, so a refusal here comes after the worker's loader answered /health 200. Tracing is optional: the
        worker serves untraced and says why (`tracing_not_started`) rather than stopping."""
        try:
            return build_tracer(self.settings.otel_exporter_otlp_endpoint)
        except Exception as exc:
            log.error("tracing_not_started", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            return NullTracer()

    @cached_property
    def chain_for(self):
        """Each call's provider chain (its own LLM account first, when it brought one)."""
        from .engine.call_chains import CallChains
        return CallChains(self.providers, self.lifecycle.credential_box.open_json, self.settings.openai_model,
                          public_only=not self.settings.allow_private_llm_urls)

    @cached_property
    def engine(self) -> ConversationEngine:
        s = self.settings
        speculation = SpeculationPolicy(enabled=s.preemptive_generation, stable_ms=s.preemptive_stable_ms,
                                        max_per_turn=s.preemptive_max_speculations, max_chars=s.preemptive_max_chars,
                                        end_of_utterance=s.preemptive_end_of_utterance,
                                        incomplete_ms=s.preemptive_incomplete_ms,
                                        cadence_margin_ms=s.preemptive_cadence_margin_ms,
                                        speaker_events=s.preemptive_speaker_events)
        return ConversationEngine(self.store, self.providers, self.languages, self.reply_cache,
                                  chain_for=self.chain_for, tracer=self.tracer,
                                  record_transcripts=self.settings.record_transcripts, speculation=speculation)

    @cached_property
    def heap_trimmer(self) -> HeapTrimmer:
        """Hands the C heap's free pages back once a burst of call set-ups is over (glibc only)."""
        return HeapTrimmer(spawn, glibc_malloc_trim())

    def call_ended(self, tracking_id: str) -> None:
        """Twilio reported the call's final status: record its root span and queue its end-of-call report.
        With RECORD_TRANSCRIPTS=0 the history the call needed while live is emptied first: timings only."""
        if not self.settings.record_transcripts:
            try:
                self.engine.forget_history(tracking_id)
            except Exception:
                log.exception("transcript_drop_failed", tracking_id=tracking_id)
        if self.tracer.enabled:
            try:
                record = self.store.get_call(tracking_id)
                if record is not None:
                    self.tracer.record_call(record, turns=len(self.store.turns(tracking_id)))
            except Exception:
                log.exception("call_span_failed", tracking_id=tracking_id)
        if self.call_reporter is not None:
            self.call_reporter.call_ended(tracking_id)

    def warm_up(self) -> None:
        """Import and build the hot-path objects at worker start, so the first call's first turn pays nothing.

        The store, languages, engine and cache are built here, before the worker serves. The SDK clients (the openai
        import: about half of a worker's boot CPU; the twilio client's call resources) are built right after, in an OS thread while the
        worker already serves: /health and /ping answer at once, and every other request waits (cooperatively,
        app.py) until they are built, so a call's turns never pay for them."""
        self.engine  # noqa: B018  (builds store handle, provider chain, languages, cache)
        self.reply_cache.connect()
        self._sdk_warm_up = OsThreadWork(self._build_sdk_clients)

    def _build_sdk_clients(self) -> None:
        try:
            self.providers.warm_up()
            self.twilio.warm_up()
        except Exception:  # a client that cannot be built fails its requests as before, lazily
            log.exception("sdk_warm_up_failed")

    def wait_until_warm(self) -> None:
        """Block (cooperatively under gevent) until warm_up's background part has finished."""
        if self._sdk_warm_up is not None and not self._sdk_warm_up.done:
            self._sdk_warm_up.wait()

    def when_warm(self, fn: Callable[[], None]) -> Task:
        """Run `fn` off the request path once warm_up's background part has finished (gunicorn's post_worker_init
        freezes what the warm-up built out of the collector's passes)."""
        def work() -> None:
            self.wait_until_warm()
            fn()

        return spawn(work)

    def prepare_call(self, tracking_id: str) -> Task | None:
        """While the phone rings, off the request path: warm the cache for the entry node."""
        if not self.settings.cache_prewarm:
            return None

        def work() -> None:
            try:
                record = self.store.get_call(tracking_id)
                if record is not None:
                    self.engine.prewarm(record)
            except Exception:
                log.exception("prewarm_failed", tracking_id=tracking_id)

        return spawn(work)

    def start_background_jobs(self) -> Task:
        """Per worker, at start (gunicorn's post_worker_init): the event-loop lag probe (OVERLOAD_LOOP_LAG_MS);
        retention, run once per store per interval; and, with CALL_REPORT_URL, the sweep resuming the end-of-call
        reports a stopped worker left (CALL_REPORT_SWEEP_S)."""
        s = self.settings
        # On the worker's own loop, once the SDK clients are built: the warm-up thread's imports (seconds at 0.1 CPU)
        # hold the loop once, at boot, and must not refuse the first calls after it. A no-op without gevent.
        self.when_warm(self.worker_load.start)
        if self.call_reporter is not None:
            spawn(self.call_reporter.run_sweeps, s.call_report_sweep_s)
        return spawn(functools.partial(run_periodically, self.store, retention_days=s.retention_days,
                                       transcript_retention_days=s.transcript_retention_days,
                                       interval_s=s.retention_interval_s,
                                       holder=f"{socket.gethostname()}:{os.getpid()}"))


def services() -> Services:
    """The current worker's services (routes call this; the engine gets them through constructors)."""
    return current_app.extensions["callweaver"]
