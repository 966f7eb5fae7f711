"""Who a client is, for every per-client bound (the collector's rate shares and pixel counting, ADR 29 and
31; the API server's connection and request bounds, ADR 35): one rule, so both edges agree."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPV6_PREFIX = 56  # an IPv6 client counts by its /56: what ISPs delegate to one home (some a /48)


@lru_cache(maxsize=4096)
def client_key(address: str) -> str:
    """An IPv4 address as is, an IPv6 address by its /56 (one home's delegation: otherwise one subscriber
    would have 256 or more /64s, and 2^72 addresses), an IPv4-mapped IPv6 address as its IPv4 address.
    Anything unparsable is kept as given."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    host_bits = 128 - IPV6_PREFIX
    return f"{ipaddress.IPv6Address(int(ip) >> host_bits << host_bits)}/{IPV6_PREFIX}"
