"""Which addresses are on the public internet: the one rule for outbound LLM URLs (llm_http), request-supplied URLs
(security) and the public URL (config). The standard library only, since gunicorn's master reads the settings."""
from __future__ import annotations

import ipaddress


def is_public_address(address: str) -> bool:
    """An address on the public internet: not loopback, private, link-local, reserved or multicast."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_global and not ip.is_multicast
