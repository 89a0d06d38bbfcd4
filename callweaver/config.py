"""Settings: every environment variable the app reads, typed and validated in one place (gunicorn.conf.py's own are
read by server_config.py). gunicorn's master runs Settings.from_env before it listens (gunicorn.conf.py), so this
module stays import-light: the standard library and the package's own import-light modules, no `limits`, no Flask."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping
from urllib.parse import parse_qs, urlparse

from .cors import DEFAULT_CORS_ORIGINS, CorsPolicy, read_cors_origins
from .engine.addresses import is_public_address
from .server_config import MAX_TCP_PORT, ConfigError, read_log_level, read_number
from .units import MAX_CALL_DURATION_LIMIT_S, SECONDS_PER_DAY

# Reply cache backends by flask-caching name; empty CACHE_TYPE picks RedisCache with a Redis URL, else SQLiteCache.
CACHE_TYPES = ("SQLiteCache", "SimpleCache", "FileSystemCache", "RedisCache", "NullCache")
MAX_RING_TIMEOUT_S = 60  # longest a placed call may ring before Twilio gives up
# Twilio waits 15 s for a webhook's answer, connecting included, then fails the call: a <Gather> turn's reply needs a
# moment left over to be written, sent and read.
MAX_GATHER_REPLY_TIMEOUT_S = 14
MAX_SILENCE_TIMEOUT_S = 600  # a caller silent for 10 minutes is gone; a longer wait is no silence handling
LOG_FORMATS = ("json", "console")
NODE_ENVS = ("development", "production", "test")  # NODE_ENV's known values, in any case
# What operators write for production besides its own name: read as production (with a warning to spell it out).
NODE_ENV_PRODUCTION_ALIASES = ("prod",)
# Store expiries: a longer one is no setting anyone means (and past ~1e14 s Redis refuses it on every write).
MAX_CACHE_TTL_S = 365 * SECONDS_PER_DAY
MAX_RETENTION_INTERVAL_S = 30 * SECONDS_PER_DAY
MAX_RATE_WINDOW_S = 366 * SECONDS_PER_DAY  # a rate limit's window is a store expiry too
# RATE_LIMIT_* values are the `limits` notation ("30 per minute", "10/second", "1 per 2 hours", "5/second;100/day"),
# read here without importing `limits`: it imports asyncio, ~1 s of a cold start at Render's 0.1 CPU, and gunicorn's
# master checks every setting before it listens (gunicorn.conf.py). Never wider than `limits.parse_many`: what is
# read here it reads as the same amounts and windows (tests/test_rate_limit_notation.py compares both over many
# strings), so the limiter a worker builds from a setting checked here cannot refuse it. Narrower only in what no one
# writes: ASCII spaces only, no window of 0 units (`limits` reads it as 1), no ':' before a separator.
RATE_WINDOWS_S = {"second": 1, "minute": 60, "hour": 3600, "day": SECONDS_PER_DAY, "month": 30 * SECONDS_PER_DAY,
                  "year": 360 * SECONDS_PER_DAY}  # `limits`' own lengths (its year is 12 of its 30-day months)
RATE_SEPARATORS_RE = re.compile(r"[,;|]")
RATE_ITEM_RE = re.compile(r"\s*([0-9]+)\s*(?:/|per)\s*([0-9]+)?\s*(second|minute|hour|day|month|year)s?\s*",
                          re.ASCII | re.IGNORECASE)
# A client that takes longer than this over 64 KiB of an answer is not reading it: a longer deadline would let each
# such connection hold its worker's slot for minutes again.
MAX_RESPONSE_WRITE_TIMEOUT_S = 300
MAX_RELAY_SOCKET_LEASE_S = 3600  # a killed worker's call keeps its socket claim this long at most
MIN_SECRET_CHARS = 16  # OPS_TOKEN, CALL_REPORT_SECRET, SECRET_KEY (with request credentials): none guessable
# Twilio's Auth Token: 32 hexadecimal characters (what its console shows); anything else fails at the first REST call.
TWILIO_AUTH_TOKEN_RE = re.compile(r"[0-9a-fA-F]{32}")
TWILIO_ACCOUNT_SID_RE = re.compile(r"AC[0-9a-fA-F]{32}")
# REDIS_KEY_PREFIX: what every key CallWeaver writes to Redis starts with (one Redis, several deployments).
DEFAULT_REDIS_KEY_PREFIX = "cw:"
REDIS_KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}")
E164_RE = re.compile(r"\+[1-9][0-9]{7,14}")  # ASCII digits only: "\d" would accept full-width ones

# NANP (+1) destinations that are not domestic US/Canada calls. +1900 is the NANP premium-rate code; +1976 is
# listed too (976 is the classic pay-per-call exchange). The rest are the area codes NANPA assigns to the
# Caribbean and Atlantic countries that share +1 but bill at international rates, the classic toll-fraud and
# "one-ring" destinations (Twilio groups them as separate countries in its Voice Dialing Geographic
# Permissions). US territories (+1340, +1670, +1671, +1684, +1787, +1939) bill as domestic and stay allowed.
# Sources: NANPA area-code list (nationalnanpa.com), Twilio "Voice Dialing Geographic Permissions" docs.
NANP_PREMIUM_PREFIXES = ("+1900", "+1976")
NANP_NON_US_CANADA_AREA_CODES = {
    "242": "Bahamas", "246": "Barbados", "264": "Anguilla", "268": "Antigua and Barbuda",
    "284": "British Virgin Islands", "345": "Cayman Islands", "441": "Bermuda", "473": "Grenada",
    "649": "Turks and Caicos Islands", "658": "Jamaica", "664": "Montserrat", "721": "Sint Maarten",
    "758": "Saint Lucia", "767": "Dominica", "784": "Saint Vincent and the Grenadines",
    "809": "Dominican Republic", "829": "Dominican Republic", "849": "Dominican Republic",
    "868": "Trinidad and Tobago", "869": "Saint Kitts and Nevis", "876": "Jamaica",
}
DEFAULT_BLOCKED_DESTINATION_PREFIXES = NANP_PREMIUM_PREFIXES + tuple(
    "+1" + code for code in NANP_NON_US_CANADA_AREA_CODES)


def _ssl_verify_flags(value: str) -> None:
    """redis-py's reading of ssl_include_verify_flags / ssl_exclude_verify_flags: names of ssl.VerifyFlags."""
    import ssl  # only for a URL naming these flags (~5 ms of CPU)

    for flag in value.replace("[", "").replace("]", "").split(","):
        if not hasattr(ssl.VerifyFlags, flag.strip()):
            raise ValueError("not an ssl.VerifyFlags name")


# The query arguments redis-py reads from a Redis URL with a function that may refuse the value (its parse_url; the
# others it passes on as text or reads as flags, which never fails). The worker's rate limiter builds its Redis
# client from the URL as it starts, so a value refused there stopped the worker after its /health 200: read here
# with the same functions, without importing redis (~0.2 s of CPU, asyncio included). Compared with redis-py's own
# parse_url in tests/test_refused_at_start.py.
REDIS_URL_ARGUMENT_READERS = {
    "db": int, "socket_read_size": int, "max_connections": int, "health_check_interval": int, "ssl_min_version": int,
    "protocol": int, "socket_timeout": float, "socket_connect_timeout": float, "timeout": float,
    "ssl_include_verify_flags": _ssl_verify_flags, "ssl_exclude_verify_flags": _ssl_verify_flags,
}


def _redis_query_problem(name: str, query: str) -> str | None:
    """What redis-py would refuse in a Redis URL's query (as its parse_url reads it: the first value of each)."""
    for argument, values in parse_qs(query).items():
        reader = REDIS_URL_ARGUMENT_READERS.get(argument)
        if reader is None or not values:
            continue
        try:
            reader(values[0])
        except ValueError:
            return (f"{name} must be a Redis URL whose {argument} Redis can read; redis-py refuses its value (the "
                    "value is not shown)")
    return None


def _url_problem(name: str, raw: str, schemes: tuple[str, ...]) -> str | None:
    """What is wrong with a URL setting, said without its value: a URL may carry a password (`redis://:pw@host`) or
    a secret path (a webhook), and this message is printed before any secret is registered for redaction."""
    try:
        parsed = urlparse(raw)
        port = parsed.port
    except ValueError:
        return f"{name} must be an absolute {'/'.join(schemes)} URL; its port is not a number from 0 to 65535"
    if parsed.scheme not in schemes:
        scheme = parsed.scheme if re.fullmatch(r"[a-z][a-z0-9+.-]{0,15}", parsed.scheme) else ""
        found = f"its scheme is {scheme!r}" if scheme else "it has no scheme (such as https://)"
        return f"{name} must be an absolute {'/'.join(schemes)} URL; {found}"
    if not parsed.netloc or (parsed.scheme != "unix" and not parsed.hostname):
        return f"{name} must be an absolute {'/'.join(schemes)} URL; it names no host"
    if port == 0:
        return f"{name} must be an absolute {'/'.join(schemes)} URL; port 0 is no port"
    if parsed.scheme in ("redis", "rediss", "unix"):
        return _redis_query_problem(name, parsed.query)
    return None


def _public_url_problem(public: str | None) -> tuple[str, str] | None:
    """What is wrong with the public URL (PUBLIC_BASE_URL, WEBHOOK_BASE_URL or RENDER_EXTERNAL_URL) and how bad:
    "refused" when it cannot be one (a query or fragment would end up in every callback URL), "unreachable" when
    Twilio cannot reach it (this machine or a private network: fine with the simulator's stand-in, never in
    production). Said without the URL, which was read from one of three variables."""
    if not public:
        return None
    parsed = urlparse(public)
    if parsed.query or parsed.fragment:
        return ("PUBLIC_BASE_URL (or WEBHOOK_BASE_URL) must be an origin with an optional path, without '?' or '#': "
                "every callback URL is made by appending to it", "refused")
    host = (parsed.hostname or "").lower()
    try:
        private = not is_public_address(host)  # the rule outbound LLM URLs follow: loopback, private, shared, ...
    except ValueError:  # a name, not an address
        private = host == "localhost" or host.endswith(".localhost") or host.endswith(".local")
    if private:
        return (f"PUBLIC_BASE_URL (or WEBHOOK_BASE_URL) names {host}, an address on this machine or a private "
                "network: Twilio's servers cannot reach it, so every webhook and relay socket of a real call would "
                "be lost", "unreachable")
    return None


def rate_limit_items(value: str) -> tuple[tuple[int, int], ...] | None:
    """A rate limit in the `limits` notation as its (amount, window in seconds) items, or None when it is not one
    (see RATE_ITEM_RE): how a RATE_LIMIT_* setting is checked without importing `limits`."""
    items = []
    for part in RATE_SEPARATORS_RE.split(value):
        match = RATE_ITEM_RE.fullmatch(part)
        try:  # int() refuses more than sys.get_int_max_str_digits() digits (ValueError), as it does in `limits`
            if match is None or int(match[2] or 1) == 0:
                return None
            items.append((int(match[1]), RATE_WINDOWS_S[match[3].lower()] * int(match[2] or 1)))
        except ValueError:
            return None
    return tuple(items)


def to_e164(raw: str) -> str | None:
    """A phone number as the original normalised it (formatting stripped, 00 for +, +1 before 10 US digits, +
    otherwise), or None when that is no E.164 number. TWILIO_PHONE_NUMBER and a request's numbers alike: Twilio
    itself takes a US number formatted for people, so a Node deploy's "(415) 555-1212" placed calls."""
    number = re.sub(r"[\s\-().]", "", raw)
    if number.startswith("00"):
        number = "+" + number[2:]
    if not number.startswith("+"):
        number = ("+1" if len(number) == 10 else "+") + number
    return number if E164_RE.fullmatch(number) else None


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    v = value.strip().lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected a boolean (1/0/true/false; the value is not shown)")


@dataclass(frozen=True)
class Settings:
    """Frozen view of the environment; the engine gets plain values from here, never Flask config."""

    port: int = 3000
    node_env: str = "development"
    public_base_url: str | None = None
    # Twilio
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_phone_number: str = ""
    twilio_api_base_url: str | None = None
    twilio_validate_signatures: bool = True
    allow_request_credentials: bool = False
    allow_private_llm_urls: bool = False
    allowed_destination_prefixes: tuple[str, ...] = ("+1",)
    # Workflow ids whose stored flow (what a call ringing in on /api/twiml-ai?id=… runs) only the operator writes
    pinned_workflow_ids: frozenset[str] = frozenset()
    blocked_destination_prefixes: tuple[str, ...] = DEFAULT_BLOCKED_DESTINATION_PREFIXES
    record_calls: bool = False
    call_timeout_s: int = 30
    max_call_duration_s: int = 3600
    silence_timeout_s: float = 20.0  # a relay caller silent this long is asked "are you still there?" (0 = never)
    gather_reply_timeout_s: float = 10.0  # a <Gather> turn's reply must exist by then (Twilio waits 15 s in all)
    # Abuse limits (the `limits` notation: "30 per minute", "10/second") and operator surfaces
    rate_limit_make_call: str = "30 per minute"
    rate_limit_chat: str = "60 per minute"
    rate_limit_end_call: str = "60 per minute"
    rate_limit_call_status: str = "60 per minute"
    rate_limit_metrics: str = "30 per minute"
    rate_limit_ops_auth: str = "10 per minute"  # requests presenting an OPS_TOKEN guess, per client
    max_calls_per_day: int = 1000
    # make-call refuses (503) while this worker's event loop runs later than this (ms; 0 = never): overload.py
    overload_loop_lag_ms: float = 500.0
    trusted_proxy_hops: int = 0
    ops_token: str = ""
    on_render: bool = False
    # LLM providers
    llm_providers: tuple[str, ...] = ("azure", "openai")
    azure_openai_api_key: str = ""
    azure_openai_endpoint: str = ""
    azure_openai_deployment: str = ""
    azure_openai_api_version: str = "2025-01-01-preview"
    openai_api_key: str = ""
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    llm_first_token_timeout_s: float = 1.5
    llm_connect_timeout_s: float = 2.0
    llm_stall_timeout_s: float = 5.0
    llm_circuit_failures: int = 3
    llm_circuit_cooldown_s: float = 30.0
    llm_hedge_after_s: float | str | None = None  # seconds, "p95" (the provider's own), or None (off)
    # Preemptive generation: relay turns started on stable interim transcripts (partialPrompts)
    preemptive_generation: bool = True
    preemptive_stable_ms: float = 400.0
    preemptive_max_speculations: int = 2
    preemptive_max_chars: int = 200
    preemptive_end_of_utterance: bool = True
    preemptive_incomplete_ms: float = 1000.0
    preemptive_cadence_margin_ms: float = 40.0
    preemptive_speaker_events: bool = True
    # State
    db_path: str = "instance/callweaver.sqlite3"
    redis_url: str | None = None
    redis_key_prefix: str = DEFAULT_REDIS_KEY_PREFIX
    cache_type: str = ""
    cache_redis_url: str | None = None
    cache_dir: str = "instance/cache"
    cache_ttl_s: int = 86400
    cache_prewarm: bool = True
    metrics_window_s: int = 3600
    retention_days: int = 30
    transcript_retention_days: int = 30
    record_transcripts: bool = True
    mask_phone_numbers: bool = True
    retention_interval_s: int = 3600
    # Web
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    secret_key: str = ""
    max_body_bytes: int = 1024 * 1024
    # /api/chat's client messages and globalPrompt together, in characters: what one open request may spend
    chat_max_chars: int = 80_000
    # Transport limits (README "Security"): slow bodies and the relay socket
    body_read_timeout_s: float = 10.0        # whole body within this, else 408
    max_uploads_per_client: int = 20         # bodies one client may be sending at once, per worker (0 = no cap)
    response_write_timeout_s: float = 10.0   # each 64 KiB of an answer taken within this, else the connection closes
    max_answers_per_client: int = 20         # answers being written to one client at once, per worker (0 = no cap)
    relay_setup_timeout_s: float = 5.0       # socket closed (1008) without a valid setup by then
    relay_max_message_bytes: int = 64 * 1024 # larger relay message → close 1009
    relay_socket_lease_s: float = 30.0       # a call's live-socket claim expires after this unless renewed
    relay_text_hold_ms: float = 80.0         # after a reply's first token, its tokens go out one frame per clause
    log_level: str = "INFO"
    log_format: str = "json"
    # Observability
    call_report_url: str | None = None
    call_report_secret: str = ""
    call_report_max_attempts: int = 10
    call_report_backoff_s: float = 2.0
    call_report_lease_s: float = 60.0  # a stopped worker's report is resumed that long after its next attempt was due
    call_report_sweep_s: float = 30.0  # how often each worker looks for reports a stopped worker left
    otel_exporter_otlp_endpoint: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    # Those of the warnings that name an opening a stranger could use (signature checks off, operator pages open):
    # logged at start with the others, never listed by the public /health.
    exposure_warnings: tuple[str, ...] = field(default_factory=tuple)

    @cached_property
    def cors(self) -> CorsPolicy:
        """CORS_ORIGINS as a policy: the app's CORS headers, its Origin check and the loader's answers share it."""
        return CorsPolicy(self.cors_origins)

    @property
    def production(self) -> bool:
        """NODE_ENV=production or running on Render: no header-derived URLs, operator pages need OPS_TOKEN."""
        return self.node_env == "production" or self.on_render

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every configured secret value, for log redaction: the tokens and keys, and the password of any URL
        setting that carries one (`redis://:password@host`, a gateway's `https://user:password@host`)."""
        urls = (self.redis_url, self.cache_redis_url, self.call_report_url, self.openai_base_url,
                self.azure_openai_endpoint, self.public_base_url, self.twilio_api_base_url,
                self.otel_exporter_otlp_endpoint)
        passwords = tuple(password for u in urls if u and (password := _url_password(u)))
        return tuple(s for s in (self.twilio_auth_token, self.azure_openai_api_key, self.openai_api_key,
                                 self.secret_key, self.ops_token, self.call_report_secret, *passwords) if s)

    @property
    def public_warnings(self) -> tuple[str, ...]:
        """The warnings the public /health lists: all but the exposure warnings, which would tell anyone what is
        open (the start-up log has every one)."""
        return tuple(w for w in self.warnings if w not in self.exposure_warnings)

    @property
    def signatures_enforced(self) -> bool:
        """On unless TWILIO_VALIDATE_SIGNATURES=0 (local tunnels); with no auth token, webhooks are then refused."""
        return self.twilio_validate_signatures

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> "Settings":
        """Read variables (overrides win, same names as the environment); raise ConfigError naming each bad one."""
        env: dict[str, Any] = dict(os.environ if environ is None else environ)
        if overrides:
            env.update({k: v for k, v in overrides.items() if isinstance(k, str) and k.isupper()})
        problems: list[str] = []
        warnings: list[str] = []
        exposures: list[str] = []
        values: dict[str, Any] = {}

        def text(name: str, default: str = "") -> str:
            raw = env.get(name)
            return default if raw is None else str(raw).strip()

        def number(name: str, default: float, kind: type = float, low: float | None = None,
                   high: float | None = None) -> Any:
            value, problem = read_number(env, name, default, kind, low, high)
            if problem:
                problems.append(problem)
            return value

        def flag(name: str, default: bool) -> bool:
            try:
                return _flag(None if env.get(name) is None else str(env.get(name)), default)
            except ValueError as e:
                problems.append(f"{name}: {e}")
                return default

        def url(name: str, *aliases: str, schemes=("http", "https")) -> str | None:
            for key in (name, *aliases):
                raw = text(key)
                if raw:
                    problem = _url_problem(key, raw, schemes)
                    if problem:
                        problems.append(problem)
                        return None
                    return raw.rstrip("/")
            return None

        values["port"] = number("PORT", 3000, int, 1, MAX_TCP_PORT)
        # Compared in any case: "Production" read as development would drop the production rules. Any other value
        # (staging, dev: what a carried-over Node deploy may have) is read as Node reads it, not production, with a
        # warning rather than a refusal: a worker that stops after Render's health check passed is an outage.
        values["node_env"] = (text("NODE_ENV", "development") or "development").lower()
        if values["node_env"] in NODE_ENV_PRODUCTION_ALIASES:
            warnings.append(f"NODE_ENV is {text('NODE_ENV')!r}: read as production; set NODE_ENV=production")
            values["node_env"] = "production"
        elif values["node_env"] not in NODE_ENVS:
            warnings.append(f"NODE_ENV is {text('NODE_ENV')[:40]!r}, not {', '.join(NODE_ENVS[:-1])} or "
                            f"{NODE_ENVS[-1]}: read as development, as Node reads it (the production rules apply with "
                            "NODE_ENV=production or on Render)")
        # Render sets RENDER_EXTERNAL_URL for every web service: a trustworthy default for the public URL.
        values["public_base_url"] = url("PUBLIC_BASE_URL", "WEBHOOK_BASE_URL", "RENDER_EXTERNAL_URL")
        values["twilio_account_sid"] = text("TWILIO_ACCOUNT_SID")
        values["twilio_auth_token"] = text("TWILIO_AUTH_TOKEN")
        values["twilio_phone_number"] = text("TWILIO_PHONE_NUMBER")
        values["twilio_api_base_url"] = url("TWILIO_API_BASE_URL")
        sid = values["twilio_account_sid"]
        if sid and not TWILIO_ACCOUNT_SID_RE.fullmatch(sid):
            problems.append("TWILIO_ACCOUNT_SID must be 'AC' followed by 32 hex characters")
        if values["twilio_auth_token"] and not TWILIO_AUTH_TOKEN_RE.fullmatch(values["twilio_auth_token"]):
            problems.append("TWILIO_AUTH_TOKEN must be the account's Auth Token, 32 hexadecimal characters "
                            f"(got {len(values['twilio_auth_token'])} characters; the value is not shown)")
        phone = values["twilio_phone_number"]
        if phone:
            values["twilio_phone_number"] = to_e164(phone) or ""
            if not values["twilio_phone_number"]:
                problems.append("TWILIO_PHONE_NUMBER must be E.164 (+15551234567; the value is not shown)")
        values["twilio_validate_signatures"] = flag("TWILIO_VALIDATE_SIGNATURES", True)
        if not values["twilio_validate_signatures"]:
            warnings.append("TWILIO_VALIDATE_SIGNATURES is 0: Twilio webhook signatures are NOT checked "
                            "(use only for local tunnels)")
            exposures.append(warnings[-1])
        values["allow_request_credentials"] = flag("ALLOW_REQUEST_CREDENTIALS", False)
        values["allow_private_llm_urls"] = flag("ALLOW_PRIVATE_LLM_URLS", False)
        prefixes = tuple(p.strip() for p in text("ALLOWED_DESTINATION_PREFIXES", "+1").split(",") if p.strip())
        for entry, p in enumerate(prefixes, 1):
            if p != "*" and not re.fullmatch(r"\+[0-9]{1,6}", p):
                problems.append(f"ALLOWED_DESTINATION_PREFIXES entries must look like +1 or +44 (or *); entry {entry} "
                                "does not (the value is not shown)")
        values["allowed_destination_prefixes"] = prefixes or ("+1",)
        # Empty reads as unset, as everywhere else (a blank dashboard field must not turn the blocklist off): `none`
        # blocks nothing.
        raw_blocked = text("BLOCKED_DESTINATION_PREFIXES")
        blocked = (DEFAULT_BLOCKED_DESTINATION_PREFIXES if not raw_blocked else () if raw_blocked.lower() == "none"
                   else tuple(p.strip() for p in raw_blocked.split(",") if p.strip()))
        for entry, p in enumerate(blocked, 1):
            if not re.fullmatch(r"\+[0-9]{1,8}", p):
                problems.append(f"BLOCKED_DESTINATION_PREFIXES entries must look like +1900 or +1876; entry {entry} "
                                "does not (the value is not shown)")
        values["blocked_destination_prefixes"] = blocked
        values["pinned_workflow_ids"] = frozenset(i.strip() for i in text("PINNED_WORKFLOW_IDS").split(",")
                                                  if i.strip())
        values["record_calls"] = flag("RECORD_CALLS", False)
        values["call_timeout_s"] = number("CALL_TIMEOUT_S", 30, int, 5, MAX_RING_TIMEOUT_S)
        values["max_call_duration_s"] = number("MAX_CALL_DURATION_S", 3600, int, 60, MAX_CALL_DURATION_LIMIT_S)
        values["silence_timeout_s"] = number("SILENCE_TIMEOUT_S", 20.0, float, 0, MAX_SILENCE_TIMEOUT_S)
        values["gather_reply_timeout_s"] = number("GATHER_REPLY_TIMEOUT_S", 10.0, float, 1, MAX_GATHER_REPLY_TIMEOUT_S)

        def rate(name: str, default: str) -> str:
            value = text(name, default) or default
            items = rate_limit_items(value)
            if items is None:
                problems.append(f"{name} must be a rate limit such as '30 per minute', '10/second' or "
                                "'5/second;100/day' (the value is not shown)")
                return default
            if any(amount < 1 for amount, _window in items):
                problems.append(f"{name} allows no request at all: every one would be refused (429)")
                return default
            if any(window > MAX_RATE_WINDOW_S for _amount, window in items):
                problems.append(f"{name} has a window longer than a year")
                return default
            return value

        values["rate_limit_make_call"] = rate("RATE_LIMIT_MAKE_CALL", "30 per minute")
        values["rate_limit_chat"] = rate("RATE_LIMIT_CHAT", "60 per minute")
        values["rate_limit_end_call"] = rate("RATE_LIMIT_END_CALL", "60 per minute")
        values["rate_limit_call_status"] = rate("RATE_LIMIT_CALL_STATUS", values["rate_limit_end_call"])
        values["rate_limit_metrics"] = rate("RATE_LIMIT_METRICS", "30 per minute")
        values["rate_limit_ops_auth"] = rate("RATE_LIMIT_OPS_AUTH", "10 per minute")
        values["max_calls_per_day"] = number("MAX_CALLS_PER_DAY", 1000, int, 1)
        values["overload_loop_lag_ms"] = number("OVERLOAD_LOOP_LAG_MS", 500.0, float, 0)
        values["on_render"] = bool(text("RENDER"))
        # Render's proxy appends the client's address to X-Forwarded-For; elsewhere the header is the client's own.
        values["trusted_proxy_hops"] = number("TRUSTED_PROXY_HOPS", 1 if values["on_render"] else 0, int, 0)
        values["ops_token"] = text("OPS_TOKEN")
        if values["ops_token"] and len(values["ops_token"]) < MIN_SECRET_CHARS:
            problems.append("OPS_TOKEN must be at least 16 characters (it guards live-call data)")

        providers = tuple(p.strip().lower() for p in text("LLM_PROVIDERS", "azure,openai").split(",") if p.strip())
        for entry, p in enumerate(providers, 1):
            if p not in {"azure", "openai"}:
                problems.append(f"LLM_PROVIDERS entries must be azure or openai; entry {entry} is neither (the value "
                                "is not shown)")
        values["llm_providers"] = providers or ("azure", "openai")
        values["azure_openai_api_key"] = text("AZURE_OPENAI_API_KEY")
        values["azure_openai_endpoint"] = url("AZURE_OPENAI_ENDPOINT") or ""
        values["azure_openai_deployment"] = text("AZURE_OPENAI_DEPLOYMENT")
        values["azure_openai_api_version"] = text("AZURE_OPENAI_API_VERSION", "2025-01-01-preview") or "2025-01-01-preview"
        values["openai_api_key"] = text("OPENAI_API_KEY")
        values["openai_base_url"] = url("OPENAI_BASE_URL")
        values["openai_model"] = text("OPENAI_MODEL", "gpt-4o-mini") or "gpt-4o-mini"
        values["llm_first_token_timeout_s"] = number("LLM_FIRST_TOKEN_TIMEOUT_S", 1.5, float, 0.05)
        values["llm_connect_timeout_s"] = number("LLM_CONNECT_TIMEOUT_S", 2.0, float, 0.05)
        values["llm_stall_timeout_s"] = number("LLM_STALL_TIMEOUT_S", 5.0, float, 0.05)
        values["llm_circuit_failures"] = number("LLM_CIRCUIT_FAILURES", 3, int, 1)
        values["llm_circuit_cooldown_s"] = number("LLM_CIRCUIT_COOLDOWN_S", 30.0, float, 0)
        hedge = text("LLM_HEDGE_AFTER_MS").lower()
        if hedge in ("", "off", "0"):
            values["llm_hedge_after_s"] = None
        elif hedge == "p95":
            values["llm_hedge_after_s"] = "p95"
        else:
            values["llm_hedge_after_s"] = number("LLM_HEDGE_AFTER_MS", 0.0, float, 1.0) / 1000 or None
        values["preemptive_generation"] = flag("PREEMPTIVE_GENERATION", True)
        values["preemptive_stable_ms"] = number("PREEMPTIVE_STABLE_MS", 400.0, float, 0)
        values["preemptive_max_speculations"] = number("PREEMPTIVE_MAX_SPECULATIONS", 2, int, 1)
        values["preemptive_max_chars"] = number("PREEMPTIVE_MAX_CHARS", 200, int, 1)
        values["preemptive_end_of_utterance"] = flag("PREEMPTIVE_END_OF_UTTERANCE", True)
        values["preemptive_incomplete_ms"] = number("PREEMPTIVE_INCOMPLETE_MS", 1000.0, float, 0)
        values["preemptive_cadence_margin_ms"] = number("PREEMPTIVE_CADENCE_MARGIN_MS", 40.0, float, 0)
        values["preemptive_speaker_events"] = flag("PREEMPTIVE_SPEAKER_EVENTS", True)

        values["db_path"] = text("CALLWEAVER_DB", "instance/callweaver.sqlite3") or "instance/callweaver.sqlite3"
        values["redis_url"] = url("REDIS_URL", schemes=("redis", "rediss", "unix"))
        values["redis_key_prefix"] = text("REDIS_KEY_PREFIX") or DEFAULT_REDIS_KEY_PREFIX
        if not REDIS_KEY_PREFIX_RE.fullmatch(values["redis_key_prefix"]):
            problems.append("REDIS_KEY_PREFIX must be 1-64 letters, digits or _ . : { } -")
            values["redis_key_prefix"] = DEFAULT_REDIS_KEY_PREFIX
        cache_type = text("CACHE_TYPE")
        if cache_type and cache_type not in CACHE_TYPES:
            problems.append(f"CACHE_TYPE must be one of {', '.join(CACHE_TYPES)} (the value is not shown)")
        values["cache_type"] = cache_type
        values["cache_redis_url"] = url("CACHE_REDIS_URL", schemes=("redis", "rediss", "unix")) or values["redis_url"]
        if cache_type == "RedisCache" and not values["cache_redis_url"]:
            problems.append("CACHE_TYPE=RedisCache needs a Redis: set CACHE_REDIS_URL or REDIS_URL")
        values["cache_dir"] = text("CACHE_DIR", "instance/cache") or "instance/cache"
        values["cache_ttl_s"] = number("CACHE_TTL_S", 86400, int, 0, MAX_CACHE_TTL_S)
        values["cache_prewarm"] = flag("CACHE_PREWARM", True)
        # at most the public default window: one a worker keeps
        values["metrics_window_s"] = number("METRICS_WINDOW_S", 3600, int, 1, SECONDS_PER_DAY)
        values["retention_days"] = number("RETENTION_DAYS", 30, int, 1)
        values["transcript_retention_days"] = number("TRANSCRIPT_RETENTION_DAYS", 30, int, 1)
        values["record_transcripts"] = flag("RECORD_TRANSCRIPTS", True)
        values["mask_phone_numbers"] = flag("MASK_PHONE_NUMBERS", True)
        values["retention_interval_s"] = number("RETENTION_INTERVAL_S", 3600, int, 1, MAX_RETENTION_INTERVAL_S)

        values["cors_origins"], cors_problems = read_cors_origins(env)  # shared with the worker's loader
        problems.extend(cors_problems)
        values["secret_key"] = text("SECRET_KEY")
        if values["allow_request_credentials"] and len(values["secret_key"]) < MIN_SECRET_CHARS:
            problems.append(f"ALLOW_REQUEST_CREDENTIALS=1 needs SECRET_KEY of {MIN_SECRET_CHARS}+ characters (request "
                            "credentials are kept encrypted with it)")
        values["max_body_bytes"] = number("MAX_BODY_BYTES", 1024 * 1024, int, 1024)
        values["chat_max_chars"] = number("CHAT_MAX_CHARS", 80_000, int, 1)
        values["body_read_timeout_s"] = number("BODY_READ_TIMEOUT_S", 10.0, float, 0.1)
        values["max_uploads_per_client"] = number("MAX_UPLOADS_PER_CLIENT", 20, int, 0)
        values["response_write_timeout_s"] = number("RESPONSE_WRITE_TIMEOUT_S", 10.0, float, 0.1,
                                                    MAX_RESPONSE_WRITE_TIMEOUT_S)
        values["max_answers_per_client"] = number("MAX_ANSWERS_PER_CLIENT", 20, int, 0)
        values["relay_setup_timeout_s"] = number("RELAY_SETUP_TIMEOUT_S", 5.0, float, 0.1)
        values["relay_max_message_bytes"] = number("RELAY_MAX_MESSAGE_BYTES", 64 * 1024, int, 1024)
        values["relay_socket_lease_s"] = number("RELAY_SOCKET_LEASE_S", 30.0, float, 1.0, MAX_RELAY_SOCKET_LEASE_S)
        values["relay_text_hold_ms"] = number("RELAY_TEXT_HOLD_MS", 80.0, float, 0)
        values["log_level"], log_level_warning = read_log_level(env)
        if log_level_warning:
            warnings.append(log_level_warning)
        values["log_format"] = (text("LOG_FORMAT", "json") or "json").lower()
        if values["log_format"] not in LOG_FORMATS:  # morgan's "combined" from a Node deploy: no reason not to start
            warnings.append(f"LOG_FORMAT is {text('LOG_FORMAT')[:40]!r}, not json or console: read as json")
            values["log_format"] = "json"

        values["call_report_url"] = url("CALL_REPORT_URL")
        values["call_report_secret"] = text("CALL_REPORT_SECRET")
        if values["call_report_url"] and len(values["call_report_secret"]) < MIN_SECRET_CHARS:
            problems.append("CALL_REPORT_URL needs CALL_REPORT_SECRET (16+ characters): reports are HMAC-signed")
        values["call_report_max_attempts"] = number("CALL_REPORT_MAX_ATTEMPTS", 10, int, 1)
        values["call_report_backoff_s"] = number("CALL_REPORT_BACKOFF_S", 2.0, float, 0.01)
        values["call_report_lease_s"] = number("CALL_REPORT_LEASE_S", 60.0, float, 1.0)
        values["call_report_sweep_s"] = number("CALL_REPORT_SWEEP_S", 30.0, float, 1.0)
        values["otel_exporter_otlp_endpoint"] = url("OTEL_EXPORTER_OTLP_ENDPOINT")

        production = values["node_env"] == "production" or values["on_render"]
        alias = text("WEBHOOK_BASE_URL").rstrip("/")
        if text("PUBLIC_BASE_URL") and alias and alias != text("PUBLIC_BASE_URL").rstrip("/"):
            warnings.append("PUBLIC_BASE_URL and WEBHOOK_BASE_URL (its alias) differ: PUBLIC_BASE_URL is used")
        public_problem = _public_url_problem(values["public_base_url"])
        render_url = text("RENDER_EXTERNAL_URL").rstrip("/")
        if (public_problem and public_problem[1] == "unreachable" and values["on_render"] and render_url
                and not _url_problem("RENDER_EXTERNAL_URL", render_url, ("http", "https"))
                and not _public_url_problem(render_url)):
            # A development .env imported on Render: Render's own URL certainly reaches this service, and a refusal
            # here would come after Render's health check passed (an outage, not a failed deploy).
            warnings.append(public_problem[0] + "; on Render, RENDER_EXTERNAL_URL is used instead")
            values["public_base_url"], public_problem = render_url, None
        if public_problem and (production or public_problem[1] == "refused"):
            problems.append(public_problem[0])
        elif public_problem and not values["twilio_api_base_url"]:  # the simulator's stand-in reaches loopback
            warnings.append(public_problem[0])
        if (not production and values["public_base_url"] and not public_problem and not values["ops_token"]):
            warnings.append("OPS_TOKEN is not set and NODE_ENV is not production: the dashboard, call log and "
                            "/metrics answer only this machine, not PUBLIC_BASE_URL; set OPS_TOKEN to reach them "
                            "there (or NODE_ENV=production to turn them off)")
            exposures.append(warnings[-1])
        if production and not values["public_base_url"]:
            problems.append("PUBLIC_BASE_URL is required in production (NODE_ENV=production or on Render): set "
                            "PUBLIC_BASE_URL (or WEBHOOK_BASE_URL; Render's RENDER_EXTERNAL_URL also counts) so "
                            "Twilio callback URLs never follow a request's Host/X-Forwarded-* headers")
        if production and values["allow_private_llm_urls"]:
            problems.append("ALLOW_PRIVATE_LLM_URLS=1 is for development only: unset it in production")
        if production and not values["twilio_validate_signatures"]:
            problems.append("TWILIO_VALIDATE_SIGNATURES=0 is for local tunnels only: unset it in production (set "
                            "PUBLIC_BASE_URL to the URL Twilio calls if signatures fail behind a proxy)")
        if production and not values["ops_token"]:
            warnings.append("OPS_TOKEN is not set: /dashboard, /api/dashboard-data and /metrics are off")
        if not values["public_base_url"] and not production:
            warnings.append("PUBLIC_BASE_URL is not set: callback URLs follow each request's Host/X-Forwarded-* "
                            "headers; set it in production")
        if values["twilio_account_sid"] and not values["twilio_auth_token"]:
            warnings.append("TWILIO_ACCOUNT_SID is set but TWILIO_AUTH_TOKEN is not: calls cannot be placed")
        if problems:
            raise ConfigError(problems)
        values["warnings"] = tuple(warnings)
        values["exposure_warnings"] = tuple(exposures)
        return cls(**values)


def _url_password(url: str) -> str | None:
    try:
        return urlparse(url).password
    except ValueError:  # not a URL we could read; from_env reports it
        return None
