"""Which LLM providers answer a call: the server's chain, or the call's own LLM account in front of it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from .vendors import call_account_config

# Chains (and their HTTP clients) are kept for this many recent calls that brought their own LLM account.
MAX_CALL_CHAINS = 64


class CallChains:
    """`chains(record)`: the server's provider chain, or — for a call that brought its own LLM account (kept
    sealed in the record, ALLOW_REQUEST_CREDENTIALS=1) — that account first with the server's behind it."""

    def __init__(self, server_chain: Any, open_credentials: Callable[[str], dict | None],
                 default_openai_model: str, max_chains: int = MAX_CALL_CHAINS, public_only: bool = True):
        """`public_only`: the accounts' URLs came from requests; connect to public addresses only."""
        self.server_chain = server_chain
        self._public_only = public_only
        self._open_credentials = open_credentials  # sealed blob → the account, or None when it cannot be opened
        self._default_openai_model = default_openai_model
        self._max_chains = max_chains
        self._chains: OrderedDict[str, Any] = OrderedDict()

    def __call__(self, record: Any) -> Any:
        sealed = (record.meta or {}).get("llm") if record is not None else None
        if not sealed:
            return self.server_chain
        chain = self._chains.get(sealed)
        if chain is None:
            credentials = self._open_credentials(sealed)
            if not credentials:
                return self.server_chain
            config = call_account_config(credentials, self._default_openai_model, self._public_only)
            chain = self._chains[sealed] = self.server_chain.with_first(config)
            while len(self._chains) > self._max_chains:
                self._chains.popitem(last=False)
        return chain
