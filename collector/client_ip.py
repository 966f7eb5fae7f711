"""Who the client is: the socket peer, or, behind a proxy the operator trusts, what it forwarded.

One function for the three server paths (the Flask app, the WSGI fast path, the RSGI path): the address
it returns is the one the visitor key, the country, the per-address rate shares and refusal caps and
the pixel's address key are derived from (docs/adr/0044-enrichment-at-the-edge.md). It is never stored.

`X-Forwarded-For` is believed only when the peer is in TALLY_TRUSTED_PROXIES (default: none, so the
header is ignored and nobody can choose their own address). A trusted proxy appends the address it
received the request from, so the list is read from the right: the client is the rightmost address
that is not itself a trusted proxy (if every one is, the leftmost). Anything to the left of that
address was written by the client and proves nothing. A header that is not a clean list of IP
addresses means the peer is the client (never an error: the request is answered as if it had none).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = tuple[int, int]  # (4 or 6, the address as an integer): parsed by the C library, ~20x ipaddress
Interval = tuple[int, int, int]  # (4 or 6, first, last)

MAX_HOPS = 32  # hops read from the right: a longer chain of trusted proxies is not one
MAX_HEADER = 2048  # characters read from the right end of the header: 32 hops of the longest IPv6 text and more
_MAPPED = 0xFFFF  # ::ffff:0:0/96, IPv4-mapped IPv6 addresses, >> 32


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str | None:
    """The client's address: `peer` (the socket's, as WSGI's REMOTE_ADDR), unless `peer` is in `trusted`
    and `forwarded_for` (every `X-Forwarded-For` header, comma-joined) names one (module doc)."""
    if not trusted or not forwarded_for or not peer:
        return peer  # the common case costs one test
    networks = intervals(tuple(trusted))
    if not _trusted_peer(peer, networks):
        return peer  # only a trusted peer's headers reach the cache below, and bounded
    if len(forwarded_for) > MAX_HEADER:  # the right end is the proxies'; a cut first hop is dropped
        forwarded_for = forwarded_for[-MAX_HEADER:].partition(",")[2]
    return _forwarded(forwarded_for, networks) or peer


@lru_cache(maxsize=1024)
def _trusted_peer(peer: str, trusted: tuple[Interval, ...]) -> bool:
    address = parse_address(peer)
    return address is not None and within(address, trusted)


@lru_cache(maxsize=4096)
def _forwarded(forwarded_for: str, trusted: tuple[Interval, ...]) -> str | None:
    """The rightmost untrusted hop of the rightmost MAX_HOPS; else the last trusted hop read (see the module
    docstring); None when the rightmost hop is not an address."""
    last_trusted: Address | None = None
    for part in reversed(forwarded_for.rsplit(",", MAX_HOPS)[-MAX_HOPS:]):
        hop = _hop(part.strip())
        if hop is None:
            break
        if not within(hop, trusted):
            return address_text(hop)
        last_trusted = hop
    return None if last_trusted is None else address_text(last_trusted)


def _hop(text: str) -> Address | None:
    """One X-Forwarded-For entry: an address, possibly with a port (`a.b.c.d:port`, `[v6]:port`)."""
    if text.startswith("["):
        end = text.find("]")
        if end > 0 and text[end + 1:end + 2] == ":" and text[end + 2:].isdigit():
            text = text[:end + 1]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if port.isdigit():
            text = host
    return parse_address(text)


def parse_address(text: str) -> Address | None:
    """An address as servers and proxies write it (IPv6 possibly in brackets; no zone, no port): an
    IPv4-mapped IPv6 address is its IPv4 address. None when it is not one."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return 4, int.from_bytes(inet_pton(AF_INET, text), "big")
    except (OSError, ValueError):  # ValueError: a NUL or a character that is not ASCII
        pass
    try:
        number = int.from_bytes(inet_pton(AF_INET6, text), "big")
    except (OSError, ValueError):
        return None
    return (4, number & 0xFFFFFFFF) if number >> 32 == _MAPPED else (6, number)


def address_text(address: Address) -> str:
    """The canonical text of an address (IPv6 compressed, lower case)."""
    version, number = address
    return inet_ntop(AF_INET, number.to_bytes(4, "big")) if version == 4 \
        else inet_ntop(AF_INET6, number.to_bytes(16, "big"))


@lru_cache(maxsize=64)
def intervals(networks: tuple[Network, ...]) -> tuple[Interval, ...]:
    """Networks as (version, first, last) integer intervals, for `within`."""
    return tuple((net.version, int(net.network_address), int(net.broadcast_address)) for net in networks)


def within(address: Address, networks: tuple[Interval, ...]) -> bool:
    version, number = address
    return any(v == version and first <= number <= last for v, first, last in networks)
