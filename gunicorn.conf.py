"""gunicorn settings: gevent workers so one worker holds many live ConversationRelay sockets."""
import gc
import json
import os

from callweaver.config import Settings  # import-light: the standard library only (no `limits`, no Flask)
from callweaver.server_config import ConfigError, server_settings


def checked_server_settings(environ):
    """gunicorn's own variables (server_settings), needed now. Should one be bad, the settings a worker's app would
    refuse (Settings.from_env) are named in the same line; otherwise they are checked in on_starting, where the
    environment is the workers' own."""
    try:
        return server_settings(environ)
    except ConfigError as bad:
        problems = list(bad.problems)
    try:
        Settings.from_env(environ)
    except ConfigError as bad:
        problems.extend(p for p in bad.problems if p not in problems)  # PORT is read by both, in the same words
    raise ConfigError(problems)


def refused_in_one_line(check, environ):
    """`check(environ)`, or a ConfigError as one line and exit status 1 (a SystemExit passes gunicorn's "Failed to
    read config file", which prints a traceback)."""
    try:
        return check(environ)
    except ConfigError as bad:
        raise SystemExit(f"gunicorn.conf.py: {bad}") from None


SERVER = refused_in_one_line(checked_server_settings, os.environ)


def on_starting(server):
    """Every setting a worker's app would refuse (Settings.from_env: ~8 ms of CPU with its import) stops gunicorn
    here, before it listens. Checked only in the worker, it came after the worker's loader had answered /health 200
    (callweaver/boot.py), and Render, having seen the deploy healthy, routed traffic to a service that was gone: an
    outage instead of a failed deploy. Here, not as this file is read: values given as gunicorn's `-e`/`--env` option
    (its raw_env setting) are in os.environ only from now on, and they win over the environment in every worker."""
    refused_in_one_line(Settings.from_env, os.environ)


bind = f"0.0.0.0:{SERVER['port']}"
worker_class = "gevent"
workers = SERVER["workers"]  # WEB_CONCURRENCY, else the cores (at most 4)
worker_connections = SERVER["worker_connections"]
# With gevent the heartbeat keeps running while greenlets wait on I/O, so long calls are safe.
timeout = SERVER["timeout"]
graceful_timeout = SERVER["graceful_timeout"]
# A handover's `end` goes out this long before graceful_timeout runs out (hand_over_calls_on_sigterm): time for it
# to reach Twilio and for the socket to close before gunicorn kills the worker.
HANDOVER_MARGIN_S = 3.0
# The gevent worker also bounds reading each request line and headers by `keepalive` seconds; request bodies
# are bounded by the app itself (callweaver/request_guard.py: BODY_READ_TIMEOUT_S, MAX_BODY_BYTES).
keepalive = 5
preload_app = False          # clients (SQLite, Redis, httpx pools) must be built per worker, after the fork
control_socket_disable = True
forwarded_allow_ips = SERVER["forwarded_allow_ips"]
# gunicorn maps these request headers into the WSGI environ for peers in forwarded_allow_ips (`*` by default: every
# client). Its default, SCRIPT_NAME and PATH_INFO, let a request header move the app's root (the same routes answered
# under any prefix a client chose, and URLs built from the root followed it): no proxy in front of CallWeaver sets
# them, so none is honoured (X-Forwarded-For/-Proto are read as before).
forwarder_headers = ""
accesslog = "-"
logger_class = "callweaver.logging.AccessLogger"   # redacts secret query parameters, escapes every value
errorlog = "-"
loglevel = SERVER["log_level"].lower()
# No format may read a record's thread: callweaver/logging.py turns the look-up off process-wide (logThreads), so a
# --log-config with %(thread)d would fail on every line and %(threadName)s would print None.
access_log_format = json.dumps({
    "event": "access", "remote": "%(h)s", "method": "%(m)s", "path": "%(U)s", "query": "%(q)s",
    "status": "%(s)s", "bytes": "%(B)s", "duration_ms": "%(M)s",
    "request_id": "%({x-request-id}o)s",
    # the call the request was about, handed over by the app (callweaver/app.py _init_request_logging)
    "tracking_id": "%({callweaver.tracking_id}e)s", "call_sid": "%({callweaver.call_sid}e)s",
})


def post_fork(server, worker):
    """The worker imports and builds the app with the cyclic collector off: those objects live as long as the
    worker, and each full pass over them during the imports cost 30-85 ms of CPU (docs/performance-history.md). Until it
    serves, the installed packages' entry points are read once (entry_points_read_once). Its greenlets are spawned
    without gevent's spawn-tree records (greenlet_tree_untracked)."""
    gc.disable()
    entry_points_read_once()
    greenlet_tree_untracked()


def greenlet_tree_untracked():
    """gevent's track_greenlet_tree setting (on by default, for its debugging reports) makes every greenlet it spawns
    keep its spawner, the spawner's locals and a capture of the spawning stack: each live call's request greenlet
    holds them while the call is idle, and every spawn pays for the capture. Off, unless the operator set gevent's
    own GEVENT_TRACK_GREENLET_TREE (docs/performance-history.md, "Issue 12o")."""
    if os.environ.get("GEVENT_TRACK_GREENLET_TREE") is None:
        import gevent
        gevent.config.track_greenlet_tree = False


def post_worker_init(worker):
    """The worker's app loads in the background (wsgi.py, callweaver/boot.py); once it is built, and before any
    waiting request is let through, app_loaded runs. The worker serves from now on, so entry points are read afresh
    again before anything of the app is imported."""
    entry_points_read_afresh()
    loader = worker.wsgi.__self__  # wsgi.py's `app` is the bound method AppLoader.wsgi
    loader.when_loaded(app_loaded)
    hand_over_calls_on_sigterm(loader, within_s=max(0.0, graceful_timeout - HANDOVER_MARGIN_S))


def hand_over_calls_on_sigterm(loader, within_s: float):
    """Render sends SIGTERM on every deploy. gunicorn's graceful shutdown (its documented TERM for a worker) only
    stops accepting connections; live relay sockets then run on until graceful_timeout, when the master kills the
    worker in the middle of whatever the caller was hearing. So the first SIGTERM first tells the live calls to hand
    themselves over (Services.hand_over_live_calls: each finishes and plays the reply in flight, then reconnects on a
    running instance), then puts back the handler the worker had and delivers the signal to it: gunicorn shuts down
    as documented, and its wait for open connections ends once the calls are gone (bounded by graceful_timeout).
    Only the standard library's signal API is used; no gunicorn method is called or wrapped. A second SIGTERM goes
    to gunicorn alone. Every handover's `end` goes out within `within_s` of the SIGTERM, whatever still plays: a
    reply and its playback could otherwise outlast graceful_timeout."""
    import signal
    import gevent
    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        # Off the signal handler, as gunicorn's gevent worker does for SIGQUIT.
        gevent.spawn(loader.when_loaded, lambda app: app.extensions["callweaver"].hand_over_live_calls(within_s))
        signal.signal(signal.SIGTERM, gunicorn_handler)
        signal.raise_signal(signal.SIGTERM)  # handled by gunicorn once this handler returns

    signal.signal(signal.SIGTERM, on_sigterm)


def entry_points_read_once():
    """Next, gunicorn's gevent worker monkey-patches the standard library (`gevent.monkey.patch_all()`), and gevent
    emits 25 plugin events meanwhile, for each of which it reads the entry points of every installed distribution
    (`importlib.metadata.entry_points(group=...)`): 45-130 ms of CPU, a second at Render's 0.1 CPU, before the worker
    can answer its first health check (docs/performance-history.md, "Issue 12g"); gevent has no setting to skip them. Nothing
    is installed while a worker starts, so they are read once and each call selects from that, exactly as
    `entry_points(**selection)` selects from all of them, until entry_points_read_afresh puts the standard function
    back. Only the worker's own start runs meanwhile (the app's imports begin once it serves)."""
    from importlib import metadata
    read_afresh = metadata.entry_points
    if hasattr(read_afresh, "read_afresh"):
        return
    everything = read_afresh()

    def read_once(**selection):
        return everything.select(**selection) if selection else everything

    read_once.read_afresh = read_afresh
    metadata.entry_points = read_once


def entry_points_read_afresh():
    from importlib import metadata
    metadata.entry_points = getattr(metadata.entry_points, "read_afresh", metadata.entry_points)


# The cyclic collector's thresholds while the worker serves (gc.set_threshold; CPython's defaults are 700, 10, 10).
# With 800 calls on one worker each pass is a pause for every call. A young pass walks what was allocated since the
# last one and is still alive; a generation-1 pass walks that for its last 10 young passes, at the start of talking
# the objects of the last few hundred calls set up. The young generations keep CPython's thresholds, so no young or
# generation-1 pass walks more than ~7000 allocations' worth: longest pass at 800 calls x 3 turns 10.5-20.6 ms of
# CPU, against 28-48 ms for generation-1 passes with a young threshold of 7000, for ~40 % more GC CPU (~0.05 ms per
# turn) (docs/performance-history.md, "Issue 12q").
# Full passes walk every call in flight (35-112 ms at 800 calls), and only they free the cyclic garbage an ended call
# leaves in the oldest generation (~88 objects, among them flask-sock's socket server holding its environ and
# socket: an estimated 8-20 KiB per call). One every 100 generation-1 passes (~700 000 net allocations) is 10 times
# rarer than CPython's default and still bounds that backlog to roughly 1-2 thousand ended calls; with 1000 (or
# 12p's (7000, 10, 100)) a worker would hold 15-20 thousand ended calls' garbage, an estimated 120-390 MiB, and then
# stop every call for the one long pass (review of issue 12q; the estimate is not measured over hours).
LIVE_CALL_GC_THRESHOLDS = (700, 10, 100)


def app_loaded(app):
    """Start the worker's background jobs (retention) on the worker's own hub. Then move everything loaded so far
    out of the collector's reach (gc.freeze): a full pass over ~145k start-up objects took 75-85 ms in the middle of
    live calls; without them it takes a few ms. Then the collector runs again, with LIVE_CALL_GC_THRESHOLDS. The SDK
    clients are still being built in the warm-up thread then (callweaver/services.py), so what they load is frozen too once that thread has
    finished (with whatever the first requests held at that moment)."""
    services = app.extensions["callweaver"]
    services.start_background_jobs()
    gc.freeze()
    gc.set_threshold(*LIVE_CALL_GC_THRESHOLDS)
    gc.enable()
    services.when_warm(gc.freeze)
