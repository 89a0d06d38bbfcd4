"""Which browser pages may read the API's answers (CORS): one policy, read from CORS_ORIGINS here, that configures
the app's flask-cors (callweaver/app.py) and answers for the worker's loader (callweaver/boot.py), which serves a
browser's /health and /ping while the app is still loading, so both give the same headers for the same request.

Import-light on purpose (the standard library only): the loader uses it before Flask is imported."""
from __future__ import annotations

import re
from typing import Iterable, Mapping

# The original backend's origins (its backend/server.js): local dev servers, the deployed web app, the backend.
DEFAULT_CORS_ORIGINS = (
    "http://localhost:8080",
    "http://localhost:3000",
    "https://kimiya-ai.vercel.app",
    "https://kimiyi-ai.onrender.com",
)
ANY_ORIGIN = "*"
ALLOWED_METHODS = ("GET", "POST", "PUT", "DELETE", "OPTIONS")
ALLOWED_HEADERS = ("Content-Type", "Authorization", "X-Requested-With")
# Characters that make flask-cors read a configured origin as a regular expression; CORS_ORIGINS names exact
# origins, so the one policy below matches exactly what flask-cors matches.
PATTERN_CHARACTERS = frozenset("*\\[]?$^()")
# What a browser sends as Origin: scheme, host and an optional port, nothing else (no path, no user, no query).
ORIGIN_RE = re.compile(r"https?://[^/\s:@?#]+(:[0-9]{1,5})?", re.IGNORECASE)

Header = tuple[str, str]
# The request headers CORS answers depend on (WSGI environ key → header name).
CORS_REQUEST_HEADERS = {"HTTP_ORIGIN": "Origin", "HTTP_ACCESS_CONTROL_REQUEST_METHOD": "Access-Control-Request-Method",
                        "HTTP_ACCESS_CONTROL_REQUEST_HEADERS": "Access-Control-Request-Headers",
                        "HTTP_ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK": "Access-Control-Request-Private-Network"}


def cors_request_headers(environ: Mapping[str, object]) -> dict[str, str]:
    """The headers of a WSGI request that `CorsPolicy.headers` reads, for answers given outside Flask."""
    return {name: str(environ[key]) for key, name in CORS_REQUEST_HEADERS.items() if key in environ}


def read_cors_origins(env: Mapping[str, object]) -> tuple[tuple[str, ...], list[str]]:
    """CORS_ORIGINS (config.py's Settings reads it through here): the origins, and the problems with the value."""
    raw = env.get("CORS_ORIGINS")
    text = "" if raw is None else str(raw).strip()
    if not text:
        return DEFAULT_CORS_ORIGINS, []
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    problems = []
    if not origins:
        problems.append("CORS_ORIGINS names no origin (the value is not shown)")
    elif ANY_ORIGIN in origins and len(origins) > 1:
        problems.append("CORS_ORIGINS is either * (any origin, served without credentials) or a list of origins, "
                        "not both")
    for entry, origin in enumerate(origins, 1):
        if origin != ANY_ORIGIN and PATTERN_CHARACTERS.intersection(origin):
            problems.append(f"CORS_ORIGINS entries are exact origins such as https://app.example.com (no patterns); "
                            f"entry {entry} is not (the value is not shown)")
        elif origin != ANY_ORIGIN and not ORIGIN_RE.fullmatch(origin):
            # It would never equal a browser's Origin: the web app's requests would all be refused, with no word.
            problems.append(f"CORS_ORIGINS entries are origins: http:// or https://, a host and an optional port, "
                            f"nothing after it (such as https://app.example.com); entry {entry} is not (the value is "
                            "not shown)")
    return origins, problems


class CorsPolicy:
    """CORS_ORIGINS as the answer's headers. A listed origin is echoed back with credentials allowed; `*` alone lets
    any page read the answers, never with credentials (`*` with credentials would let any page act with a visitor's
    cookies; browsers refuse it anyway)."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.origins = origins
        self.any_origin = origins == (ANY_ORIGIN,)
        self._folded = frozenset(o.casefold() for o in origins)

    @classmethod
    def from_env(cls, env: Mapping[str, object]) -> "CorsPolicy | None":
        """The policy CORS_ORIGINS sets, or None when it is invalid (the app then refuses to start, config.py)."""
        origins, problems = read_cors_origins(env)
        return None if problems else cls(origins)

    def allows(self, origin: str) -> bool:
        """Whether a browser page of `origin` may read the answers (origins compare case-insensitively)."""
        return self.any_origin or origin.casefold() in self._folded

    def flask_cors_options(self, browserless_paths: Iterable[str] = ()) -> dict:
        """The app's `flask_cors.CORS(app, **options)`; every option that `headers` answers for is set here.
        `browserless_paths` are never read by a browser page (Twilio's webhooks, the relay socket): their answers
        carry no CORS headers, and flask-cors does no work for them (~25 µs of every such request)."""
        excluded = "|".join(re.escape(path) for path in browserless_paths)
        return {"resources": re.compile(f"(?!(?:{excluded})$)" if excluded else ".*"),
                "origins": ANY_ORIGIN if self.any_origin else list(self.origins),
                "supports_credentials": not self.any_origin, "send_wildcard": self.any_origin,
                "methods": list(ALLOWED_METHODS), "allow_headers": list(ALLOWED_HEADERS), "expose_headers": None,
                "max_age": None, "vary_header": True, "always_send": True, "allow_private_network": False}

    def headers(self, method: str, request_headers: Mapping[str, str]) -> list[Header]:
        """The CORS headers flask-cors (6.x) adds, with `flask_cors_options()`, to the answer to a request with these
        headers (title-cased names, e.g. "Origin"): the loader's answers while the app loads. tests/test_boot.py
        compares them with the loaded app's for allowed, refused and absent origins, preflights included."""
        origin = request_headers.get("Origin")
        if origin:
            if self.any_origin:
                allowed = ANY_ORIGIN
            elif self.allows(origin):
                allowed = origin
            else:
                return []  # flask-cors adds nothing at all for a refused origin, not even Vary
        else:  # always_send: flask-cors answers a request without an Origin too
            allowed = ANY_ORIGIN if self.any_origin else sorted(self.origins)[0]
        out: list[Header] = [("Access-Control-Allow-Origin", allowed)]
        if not self.any_origin:
            out.append(("Access-Control-Allow-Credentials", "true"))
        if request_headers.get("Access-Control-Request-Private-Network") == "true":
            out.append(("Access-Control-Allow-Private-Network", "false"))
        methods = ", ".join(sorted(ALLOWED_METHODS))
        requested_method = request_headers.get("Access-Control-Request-Method", "").upper()
        # flask-cors tests the requested method against its joined list of methods (a substring test), kept as is
        if method == "OPTIONS" and requested_method and requested_method in methods:
            requested = request_headers.get("Access-Control-Request-Headers")
            if requested:
                allowed_headers = {h.casefold() for h in ALLOWED_HEADERS}
                matching = sorted(h.strip() for h in requested.split(",") if h.strip().casefold() in allowed_headers)
                if matching:
                    out.append(("Access-Control-Allow-Headers", ", ".join(matching)))
            out.append(("Access-Control-Allow-Methods", methods))
        if allowed != ANY_ORIGIN and len(self.origins) > 1:
            out.append(("Vary", "Origin"))
        return out
