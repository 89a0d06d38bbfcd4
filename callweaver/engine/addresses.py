"""Which addresses are on the public internet: the one rule for outbound LLM URLs (llm_http), request-supplied URLs
(security) and the public URL (config). The standard library only, since gunicorn's master reads the settings."""
from __future__ import annotations

import ipaddress

NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052's well-known prefix: the last 32 bits are IPv4
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")      # deprecated IPv4-compatible addresses (RFC 4291 §2.5.5.1)
# RFC 8215's local-use NAT64 prefix: a site's own translator, to its own IPv4 network. IANA lists it as not globally
# reachable, but Python's ipaddress before 3.12.4 calls it global (and its IPv4 part sits around bits 64-71, so it is
# refused whole).
LOCAL_USE_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def is_public_address(address: str) -> bool:
    """An address on the public internet: not loopback, private, link-local, reserved or multicast, nor an IPv6
    address carrying one of those IPv4 addresses (NAT64, local-use NAT64, 6to4, Teredo, IPv4-compatible or -mapped),
    which the `ipaddress` module may call global but a NAT64 gateway or tunnel delivers to the IPv4 address inside."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not ip.is_global or ip.is_multicast:
        return False
    if ip.version == 6:
        if ip in LOCAL_USE_NAT64:
            return False
        teredo = ip.teredo
        inside = [ip.ipv4_mapped, ip.sixtofour, *(teredo or ())]
        if ip in NAT64_PREFIX or ip in IPV4_COMPATIBLE:
            inside.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(is_public_address(str(v4)) for v4 in inside if v4 is not None)
    return True
