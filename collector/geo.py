"""The country of a client address: ISO 3166-1 alpha-2, or None (docs/adr/0044-enrichment-at-the-edge.md).

By default from `iptocc` (the Regional Internet Registries' delegation data, embedded in the package:
no file, no network); with TALLY_GEOIP_DB from the operator's MaxMind DB file (GeoLite2 / GeoIP2
Country or City, DB-IP Lite Country: `country.iso_code`, else `registered_country.iso_code`).
Addresses that are not on the public internet (private, loopback, link-local, reserved, shared,
documentation ...) and anything that is not an address have no country. The address itself is
never kept: only the two letters go on with the event.

Computed once per request (collector/admission.py `put_context`) and cached per address.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_right
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import iptocc
import maxminddb

from collector.client_ip import address_text, intervals, parse_address, within
from core.config import ConfigError

CountryOf = Callable[[str], "str | None"]
CACHE_SIZE = 16_384  # addresses per worker process (~2 MB)
_CODE_RE = re.compile(r"[A-Z]{2}")
# Not on the public internet (IANA's special-purpose registries: not globally reachable), multicast, and
# reserved: no country. IPv4: as listed. IPv6: everything outside global unicast 2000::/3 (loopback,
# unspecified, link-local, unique local, multicast, the IPv4-mapped and NAT64 ranges, the reserved
# rest), and within it the IETF protocol assignments and the documentation prefix.
_NOT_PUBLIC_V4 = intervals(tuple(ipaddress.IPv4Network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4")))
_GLOBAL_UNICAST_V6 = intervals((ipaddress.IPv6Network("2000::/3"),))
_NOT_PUBLIC_V6 = intervals((ipaddress.IPv6Network("2001::/23"), ipaddress.IPv6Network("2001:db8::/32")))


_V4_STARTS = [first for _, first, _ in _NOT_PUBLIC_V4]  # sorted, not overlapping: one bisect per address


def public_address(text: str) -> str | None:
    """`text` as a public internet address (canonical text; an IPv4-mapped IPv6 address as its IPv4
    address), or None. Uses the C library's parser: a fraction of `ipaddress`'s cost per new address."""
    address = parse_address(text)
    if address is None:
        return None
    version, number = address
    if version == 4:
        index = bisect_right(_V4_STARTS, number) - 1
        public = index < 0 or number > _NOT_PUBLIC_V4[index][2]
    else:
        public = within(address, _GLOBAL_UNICAST_V6) and not within(address, _NOT_PUBLIC_V6)
    return address_text(address) if public else None


def _code(value: object) -> str | None:
    return value if isinstance(value, str) and _CODE_RE.fullmatch(value) else None


@lru_cache(maxsize=CACHE_SIZE)
def country_of(ip: str) -> str | None:
    """The country of `ip` by the embedded registry data (iptocc), or None."""
    address = public_address(ip)
    return None if address is None else _code(iptocc.country_code(address))


class GeoipFile:
    """Countries from a MaxMind DB file (TALLY_GEOIP_DB); `country_of` is cached per address."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.reader = maxminddb.open_database(str(path))
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise ConfigError("TALLY_GEOIP_DB", f"cannot open {path} as a MaxMind DB file ({exc})") from None
        self.country_of: CountryOf = lru_cache(maxsize=CACHE_SIZE)(self._lookup)

    def _lookup(self, ip: str) -> str | None:
        address = public_address(ip)
        if address is None:
            return None
        try:
            record: Any = self.reader.get(address)
        except (ValueError, maxminddb.InvalidDatabaseError):  # IPv6 in an IPv4-only file; a damaged record
            return None
        if not isinstance(record, dict):
            return None
        for key in ("country", "registered_country"):
            place = record.get(key)
            code = _code(place.get("iso_code")) if isinstance(place, dict) else None
            if code is not None:
                return code
        return None


def country_lookup(geoip_db: Path | None) -> CountryOf:
    """The lookup a collector uses: the operator's file when TALLY_GEOIP_DB is set, else the embedded data."""
    return country_of if geoip_db is None else GeoipFile(geoip_db).country_of
