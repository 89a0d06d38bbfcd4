"""Each LLM vendor's differences in one small place: how its settings name it, how its SDK client is built, its
chat-completions URL and the model a request names. Azure: resource URL + deployment + api-version, `api-key`
header; OpenAI-compatible: `base_url` and a bearer key (self-hosted servers may need none). A new vendor is a new
`kind` here; the chain, the HTTP path and the SSE parsing stay as they are.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

import structlog

from .llm_http import Endpoint

if TYPE_CHECKING:
    import openai

log = structlog.get_logger()

DEFAULT_AZURE_API_VERSION = "2025-01-01-preview"
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
# Where an OpenAI account goes when it names no base URL (the SDK's documented default, written out so that a
# request's own account never picks up the server's OPENAI_BASE_URL).
OPENAI_API_BASE_URL = "https://api.openai.com/v1"
SELF_HOSTED_API_KEY = "not-needed"


@dataclass(frozen=True)
class ProviderConfig:
    """One LLM endpoint; `model` is the Azure deployment for kind "azure"."""

    name: str
    kind: str  # "azure" | "openai"
    api_key: str
    model: str
    base_url: str | None = None
    azure_endpoint: str | None = None
    api_version: str | None = None
    public_only: bool = False  # a URL a request supplied: connect to public addresses only (llm_http.ConnectionPool)
    # A call's own account from a request: its client takes nothing from the server's environment (see build_sdk_client)
    request_account: bool = False

    def __repr__(self) -> str:  # never let the key reach a log line or a traceback
        return (f"ProviderConfig(name={self.name!r}, kind={self.kind!r}, model={self.model!r}, "
                f"base_url={self.base_url!r}, azure_endpoint={self.azure_endpoint!r}, api_version={self.api_version!r})")


def parse_azure_endpoint(url: str) -> tuple[str, str | None, str | None]:
    """Accept the original backend's full chat-completions URL or a plain resource URL.

    Returns (resource_url, deployment or None, api_version or None), so users keep their old AZURE_OPENAI_ENDPOINT.
    """
    text = url.strip()
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    # A gateway (API Management) may serve the resource under a path: keep what comes before /openai, as the SDK
    # keeps an azure_endpoint's path.
    prefix = re.split(r"/openai(?:/|$)", parts.path, maxsplit=1)[0].rstrip("/")
    resource_url = f"{parts.scheme}://{parts.netloc}{prefix}"
    match = re.search(r"/openai/deployments/([^/?#]+)", parts.path)
    deployment = unquote(match.group(1)) if match else None
    api_versions = parse_qs(parts.query).get("api-version")
    return resource_url, deployment, (api_versions[0] if api_versions else None)


def _hide_trio_when_gevent_patched() -> None:
    """httpcore2 imports trio when it is installed, and trio's import crashes once gevent has patched `select`
    (it removes epoll). The sync client never uses trio, so under gevent we make trio look absent."""
    if "trio" in sys.modules or "gevent.monkey" not in sys.modules:
        return
    from gevent import monkey

    if monkey.is_module_patched("select"):
        sys.modules["trio"] = None  # type: ignore[assignment]  # `import trio` now raises ImportError


def _openai_sdk():
    """The openai SDK, imported when the first provider client is built (Services.warm_up at worker start), so
    importing this module stays light for everything that does not talk to an LLM."""
    _hide_trio_when_gevent_patched()
    import openai
    return openai


def build_sdk_client(config: ProviderConfig) -> "openai.OpenAI":
    """The SDK client: the configuration surface (base URL, keys, api-version, headers).

    The SDK fills what it is not given from the environment (OPENAI_BASE_URL, OPENAI_ORG_ID, OPENAI_PROJECT_ID):
    right for the server's providers, never for a request's own account, whose URL the request chose: the server's
    organization and project would go there as headers, and an account naming no URL would go to the server's."""
    openai = _openai_sdk()
    isolated: dict[str, Any] = {}
    if config.request_account:
        isolated["default_headers"] = {"OpenAI-Organization": openai.omit, "OpenAI-Project": openai.omit}
    if config.kind == "azure":
        return openai.AzureOpenAI(
            azure_endpoint=config.azure_endpoint or "",
            api_key=config.api_key,
            api_version=config.api_version or DEFAULT_AZURE_API_VERSION,
            max_retries=0, **isolated,
        )
    base_url = config.base_url or (OPENAI_API_BASE_URL if config.request_account else None)
    return openai.OpenAI(base_url=base_url, api_key=config.api_key or SELF_HOSTED_API_KEY, max_retries=0, **isolated)


def chat_endpoint(config: ProviderConfig, client: Any) -> Endpoint:
    """Where the provider's chat completions go: Azure addresses a deployment in the URL."""
    return Endpoint.from_sdk_client(client, config.model if config.kind == "azure" else None)


def request_model(config: ProviderConfig, requested: str | None) -> str:
    """The model a turn asks for: a workflow's own choice only on its own OpenAI account (a request's); the server's
    providers always run their configured model (a public make-call body must not pick what the operator's key
    pays for), and an Azure provider its deployment."""
    return requested if (requested and config.kind != "azure" and config.request_account) else config.model


def unconfigured_providers(settings: Any) -> dict[str, str]:
    """Each provider LLM_PROVIDERS names that is left out, with the variables it lacks: what the start-up log and
    /health tell the operator (variable names only, never values)."""
    missing: dict[str, str] = {}
    for name in getattr(settings, "llm_providers", ("azure", "openai")):
        if name == "azure":
            api_key = getattr(settings, "azure_openai_api_key", None)
            endpoint = getattr(settings, "azure_openai_endpoint", None)
            if not api_key or not endpoint:
                missing[name] = " and ".join(n for n, v in (("AZURE_OPENAI_API_KEY", api_key),
                                                             ("AZURE_OPENAI_ENDPOINT", endpoint)) if not v)
            elif not (getattr(settings, "azure_openai_deployment", None) or parse_azure_endpoint(endpoint)[1]):
                missing[name] = "AZURE_OPENAI_DEPLOYMENT (AZURE_OPENAI_ENDPOINT names no deployment)"
        elif name == "openai":
            if not getattr(settings, "openai_api_key", None) and not getattr(settings, "openai_base_url", None):
                missing[name] = "OPENAI_API_KEY (or OPENAI_BASE_URL for a self-hosted server)"
    return missing


def provider_configs(settings: Any) -> list[ProviderConfig]:
    """The server's providers from Settings, in LLM_PROVIDERS order; named but unconfigured ones are left out."""
    configs: list[ProviderConfig] = []
    missing = unconfigured_providers(settings)
    for name in getattr(settings, "llm_providers", ("azure", "openai")):
        if name in missing:
            log.warning("llm_provider_not_configured", provider=name, missing=missing[name])
        elif name == "azure":
            endpoint = settings.azure_openai_endpoint
            resource_url, url_deployment, url_api_version = parse_azure_endpoint(endpoint)
            configs.append(ProviderConfig(
                name="azure", kind="azure", api_key=settings.azure_openai_api_key,
                model=getattr(settings, "azure_openai_deployment", None) or url_deployment,
                azure_endpoint=resource_url,
                # the version inside the user's full URL wins over the settings default
                api_version=url_api_version or getattr(settings, "azure_openai_api_version", None)
                or DEFAULT_AZURE_API_VERSION,
            ))
        elif name == "openai":
            api_key = getattr(settings, "openai_api_key", None)
            base_url = getattr(settings, "openai_base_url", None)
            configs.append(ProviderConfig(
                name="openai", kind="openai", api_key=api_key or SELF_HOSTED_API_KEY,
                model=getattr(settings, "openai_model", None) or DEFAULT_OPENAI_MODEL, base_url=base_url or None,
            ))
        else:
            log.warning("llm_provider_unknown", provider=name)
    return configs


def call_account_config(credentials: Mapping[str, Any], default_openai_model: str,
                        public_only: bool = True) -> ProviderConfig:
    """The provider a call's own LLM account (as the lifecycle accepted it from the make-call body) describes;
    `public_only` unless ALLOW_PRIVATE_LLM_URLS (its URL came from a request)."""
    if credentials["kind"] == "azure":
        resource, deployment, version = parse_azure_endpoint(credentials["endpoint"])
        return ProviderConfig(name="workflow-azure", kind="azure", api_key=credentials["apiKey"],
                              model=credentials.get("deployment") or deployment or "",
                              azure_endpoint=resource,
                              api_version=credentials.get("apiVersion") or version or DEFAULT_AZURE_API_VERSION,
                              public_only=public_only, request_account=True)
    return ProviderConfig(name="workflow-openai", kind="openai", api_key=credentials["apiKey"],
                          model=credentials.get("model") or default_openai_model,
                          base_url=credentials.get("baseUrl"), public_only=public_only, request_account=True)
