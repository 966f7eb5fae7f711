"""Signed pixel URLs: `GET /i.gif?site=…&domain=…&url=…&type=…&exp=…&sig=…`.

The rule, which a customer's server can follow without our code:
`sig` = hex HMAC-SHA256, keyed with the site's secret, over the canonical query string:
every parameter except `sig`, sorted by name, each `name=value` percent-encoded
(RFC 3986: only letters, digits and `-._~` stay as they are), joined with `&`.
In Python: `urllib.parse.urlencode(sorted(params.items()), quote_via=urllib.parse.quote, safe="")`.
`exp` is the expiry in Unix seconds, at most TALLY_PIXEL_MAX_TTL_S (default 7 days) after the fetch;
a parameter may appear only once.

A fetch counts once per (URL, client address) and quarter hour: `pixel_hit` gives the event an id
derived from the signature and the client's address only (an IPv6 address by its /56, as the rate
limiter keys it; keyed so the id does not reveal it) and the start of the UTC quarter hour as its time,
so refetches from one address in the same quarter hour are one event in both stores (the event hash,
ADR 14), whatever User-Agent they send: the sender chooses it. Several people behind one address (an
office NAT, a mail provider's image proxy) opening the same email in one quarter hour count once.
See docs/adr/0031-pixel-lifetime-and-dedup.md.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote, urlencode

PARAMS = ("site", "domain", "url", "type", "exp", "value", "referrer")  # what a pixel may carry besides sig
REQUIRED = ("site", "domain", "url", "exp")


class PixelError(ValueError):
    """The pixel URL is unusable; `field` names the parameter at fault."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def canonical(params: Mapping[str, str]) -> str:
    """The string that is signed: every parameter but `sig`, sorted, RFC 3986 percent-encoded."""
    return urlencode(sorted((k, v) for k, v in params.items() if k != "sig"), quote_via=quote, safe="")


def signature(secret: str, params: Mapping[str, str]) -> str:
    return hmac.new(secret.encode(), canonical(params).encode(), hashlib.sha256).hexdigest()


def signed_query(secret: str, params: Mapping[str, str]) -> str:
    """The query string of a signed pixel URL (canonical order, `sig` last)."""
    return f"{canonical(params)}&sig={signature(secret, params)}"


def check_shape(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The pixel's parameters as a dict, refusing repeats, unknown names and missing ones (no secret needed)."""
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in PARAMS and name != "sig":
            raise PixelError(name, f"unknown parameter (allowed: {', '.join(PARAMS)}, sig)")
        if name in params:
            raise PixelError(name, "appears more than once")
        params[name] = value
    for name in (*REQUIRED, "sig"):
        if not params.get(name):
            raise PixelError(name, "is required")
    if not params["exp"].isascii() or not params["exp"].isdigit() or len(params["exp"]) > 12:
        raise PixelError("exp", "must be the expiry in Unix seconds (ASCII digits)")
    return params


def verify(secret: str, params: Mapping[str, str], now_s: float) -> None:
    """Raise PixelError unless `sig` is right for `secret` and `exp` has not passed."""
    expected = signature(secret, params)
    if not hmac.compare_digest(expected.encode(), params.get("sig", "").lower().encode()):
        raise PixelError("sig", "does not match the site's secret over the canonical query string")
    if int(params["exp"]) < now_s:
        raise PixelError("exp", "the signed URL has expired")


def check_lifetime(exp: int, now_s: float, max_ttl_s: int) -> None:
    """Raise PixelError unless `exp` is at most `max_ttl_s` seconds after `now_s` (TALLY_PIXEL_MAX_TTL_S):
    a signed URL is a bearer credential that counts events, so it may not live for ever."""
    if exp > now_s + max_ttl_s:
        raise PixelError("exp", f"is more than {max_ttl_s} s ({max_ttl_s / 86400:g} days, TALLY_PIXEL_MAX_TTL_S) "
                         "in the future; sign the URL with a shorter lifetime")


QUARTER_S = 900  # a pixel URL counts once per client per UTC quarter hour (the finest rollup tier)


def pixel_hit(params: Mapping[str, str], key: bytes, client: str | None, now_s: float) -> dict[str, object]:
    """The event a verified pixel stands for: what it carries but its key, expiry and signature, plus an
    `id` and `ts` that make refetches from one client address within one quarter hour the same event
    (ADR 31).

    `key`: a secret MAC key (the collector's visitor key), so the stored hash does not reveal the client's
    address; `client`: its address as the rate limiter keys it (IPv6 by its /56). Not the User-Agent: the
    sender chooses it, so one leaked URL fetched with a thousand User-Agents would count a thousand times."""
    event: dict[str, object] = {k: v for k, v in params.items() if k not in ("site", "exp", "sig")}
    msg = "\x00".join((params["sig"].lower(), client or "")).encode()
    event["id"] = "px_" + hashlib.blake2b(msg, key=key, digest_size=16, person=b"tally-pixel").hexdigest()
    event["ts"] = int(now_s) // QUARTER_S * QUARTER_S * 1000  # epoch ms of the quarter hour's start
    return event
