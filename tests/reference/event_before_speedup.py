# The collector's core/event.py as of commit ba5718b, before the per-event cost work: the reference
# tests/test_event_differential.py compares the current module with. Never imported as a package module.
"""The event contract: one shape, its validation and its JSON encoding.

Every stage imports this module. The collector builds events with
`event_from_hit`; the spool, Kafka and both stores carry `Event.to_json()`
bytes; the workers decode with `decode_stored` (shape, types and store limits
checked in C, so that a broken record on the topic is rejected with a named
reason instead of being half-written); `Event.from_json` re-validates fully.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Annotated, Any, Literal

import msgspec
import orjson

EVENT_TYPES = ("impression", "pageview")
SCHEMA_VERSION = 1

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"
                        r"(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_HASH_RE = re.compile(r"^[0-9a-f]{32}$")
_MAX_URL = 2048
_MAX_UA = 512
_MAX_ID = 128
_MAX_VALUE = Decimal("1000000000")
_VALUE_QUANTUM = Decimal("0.000001")
# `site` (the site key) is read by the collector to authenticate the event; it is not stored in it.
_CLIENT_FIELDS = {"id", "domain", "url", "ts", "type", "value", "referrer", "site"}
_MAX_SITE_KEY = 128
_ASCII_DECIMAL_RE = re.compile(r"[0-9]{1,40}(?:\.[0-9]{1,40})?")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0x[0-9a-f]*")


class EventError(ValueError):
    """An event is invalid. `field` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "problem": self.problem}


@dataclass(frozen=True, slots=True)
class Event:
    hash: str
    domain: str
    url: str
    ts: datetime  # client event time, UTC
    received_at: datetime  # collector time, UTC
    type: str
    value: Decimal | None = None
    referrer: str | None = None
    user_agent: str | None = None
    browser: str | None = None
    os: str | None = None
    device: str | None = None
    country: str | None = None
    visitor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "hash": self.hash,
            "domain": self.domain,
            "url": self.url,
            "ts": _iso(self.ts),
            "received_at": _iso(self.received_at),
            "type": self.type,
            "value": None if self.value is None else str(self.value),
            "referrer": self.referrer,
            "user_agent": self.user_agent,
            "browser": self.browser,
            "os": self.os,
            "device": self.device,
            "country": self.country,
            "visitor": self.visitor,
        }

    def to_json(self) -> bytes:
        """One line of JSON, no trailing newline."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Event:
        """Decode and re-validate a stored event; raises EventError on anything malformed."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise EventError("$", f"not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise EventError("$", "must be a JSON object")
        if obj.get("v") != SCHEMA_VERSION:
            raise EventError("v", f"unsupported schema version {obj.get('v')!r}")
        h = obj.get("hash")
        if not isinstance(h, str) or not _HASH_RE.match(h):
            raise EventError("hash", "must be 32 lowercase hex characters")
        return cls(
            hash=h,
            domain=normalize_domain(obj.get("domain")),
            url=_url(obj.get("url"), "url", required=True),
            ts=_stored_time(obj.get("ts"), "ts"),
            received_at=_stored_time(obj.get("received_at"), "received_at"),
            type=_type(obj.get("type")),
            value=_value(obj.get("value")),
            referrer=_url(obj.get("referrer"), "referrer", required=False),
            user_agent=_opt_str(obj.get("user_agent"), "user_agent", _MAX_UA),
            browser=_opt_str(obj.get("browser"), "browser", 64),
            os=_opt_str(obj.get("os"), "os", 64),
            device=_opt_str(obj.get("device"), "device", 32),
            country=_opt_str(obj.get("country"), "country", 2),
            visitor=_opt_str(obj.get("visitor"), "visitor", 32),
        )


@dataclass(frozen=True, slots=True)
class HitContext:
    """What the collector knows about the request, besides the body."""

    received_at: datetime
    user_agent: str | None = None
    client_ip: str | None = None
    country: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    max_future_skew: timedelta = timedelta(minutes=5)
    max_past_age: timedelta = timedelta(days=7)


def event_hash(domain: str, client_id: str | None, *, ts: datetime | None = None, type: str | None = None,
               url: str | None = None, value: Decimal | None = None, referrer: str | None = None) -> str:
    """The event's unique hash (ADR 14). Without a client id: a random 128-bit id.

    With a client id: a digest of the id AND everything else the client sent that is stored
    (domain, ts to the millisecond as stored, type, url, value, referrer), all validated and
    normalised. An exact resend (a retry) gets the same hash and is counted once by both stores;
    the same id with any difference is a different event, in both stores.
    """
    if client_id is None:
        return os.urandom(16).hex()  # as uuid4().hex, without building a UUID object per event
    if ts is None or type is None or url is None:
        raise TypeError("event_hash: a client id needs the event's ts, type and url")
    content = orjson.dumps(["v2", domain, client_id, _iso(ts), type, url,
                            None if value is None else str(value), referrer])
    return hashlib.blake2b(content, digest_size=16).hexdigest()


@lru_cache(maxsize=8192)  # a batch repeats it for every event (same key, day, domain, address, agent)
def visitor_key(key: bytes, day: str, domain: str, ip: str | None, ua: str | None) -> str | None:
    """An anonymised visitor key that rotates daily; the raw IP never leaves this function.

    `key` is a keyed-BLAKE2b MAC key of at most 64 bytes (see `mac_key`).
    """
    if not ip:
        return None
    msg = f"{day}\x00{domain}\x00{ip}\x00{ua or ''}".encode()
    return hashlib.blake2b(msg, key=key, digest_size=16).hexdigest()


def mac_key(secret: str) -> bytes:
    """Derive the 32-byte visitor MAC key from TALLY_SECRET (any length)."""
    return hashlib.blake2b(secret.encode(), digest_size=32, person=b"tally-visitor").digest()


def event_from_hit(body: Any, ctx: HitContext, limits: Limits, secret: bytes,
                   classify_ua: Any = None) -> Event:
    """Validate one client hit and stamp it. Raises EventError naming the first bad field."""
    if not isinstance(body, Mapping):
        raise EventError("$", "each event must be a JSON object")
    unknown = body.keys() - _CLIENT_FIELDS
    if unknown:
        raise EventError(min(unknown), f"unknown field (allowed: {', '.join(sorted(_CLIENT_FIELDS))})")
    domain = normalize_domain(body.get("domain"))
    site = body.get("site")
    if site is not None and (not isinstance(site, str) or not 0 < len(site) <= _MAX_SITE_KEY):
        raise EventError("site", f"must be a site key string of at most {_MAX_SITE_KEY} characters")
    client_id = body.get("id")
    if client_id is not None and (not isinstance(client_id, str) or not 0 < len(client_id) <= _MAX_ID):
        raise EventError("id", f"must be a non-empty string of at most {_MAX_ID} characters")
    received = ctx.received_at
    if client_id is not None and body.get("ts") is None:
        # A retry must be the same event: without its own time it would land in another bucket/day.
        raise EventError("ts", "is required when 'id' is sent, so that retries carry the same event time")
    ts = _client_time(body.get("ts"), received, limits)
    url = _url(body.get("url"), "url", required=True)
    event_type = _type(body.get("type", "pageview"))
    raw_value = body.get("value")
    # A string value is plain ASCII decimal only (Decimal() would also take '١٢٣', '1_000', ' 1', '1e3').
    if isinstance(raw_value, str) and not _ASCII_DECIMAL_RE.fullmatch(raw_value):
        raise EventError("value", f"{raw_value[:40]!r} is not a decimal number between 0 and {_MAX_VALUE} "
                         "in plain ASCII digits (optionally '.' and decimals), nor a JSON number")
    value = _value(raw_value)
    referrer = _url(body.get("referrer"), "referrer", required=False)
    for name, text in (("url", url), ("referrer", referrer)):
        if text is not None and _CONTROL_RE.search(text):
            raise EventError(name, "contains control characters (percent-encode them, as browsers do)")
    ua = ctx.user_agent[:_MAX_UA] if ctx.user_agent else None
    browser = os_name = device = None
    if ua and classify_ua is not None:
        browser, os_name, device = classify_ua(ua)
        # Cut to what both stores hold (see StoredEvent): never acknowledged here and refused later.
        browser, os_name, device = (browser or None) and browser[:64], (os_name or None) and os_name[:64], \
            (device or None) and device[:32]
    return Event(
        hash=event_hash(domain, client_id, ts=ts, type=event_type, url=url, value=value, referrer=referrer),
        domain=domain,
        url=url,
        ts=ts,
        received_at=received,
        type=event_type,
        value=value,
        referrer=referrer,
        user_agent=ua,
        browser=browser,
        os=os_name,
        device=device,
        country=ctx.country if ctx.country and re.fullmatch(r"[A-Z]{2}", ctx.country) else None,
        visitor=visitor_key(secret, _day(received), domain, ctx.client_ip, ua),
    )


@lru_cache(maxsize=1024)  # the receive time repeats for every event of a request, and often as its ts
def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@lru_cache(maxsize=64)
def _day(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d")


def normalize_domain(value: Any) -> str:
    if not isinstance(value, str):
        raise EventError("domain", "is required and must be a string")
    return _normal_domain(value)


@lru_cache(maxsize=65536)  # host names repeat across events; refusals raise and are never cached
def _normal_domain(value: str) -> str:
    domain = value.strip().lower().rstrip(".")
    if not _DOMAIN_RE.match(domain) or "." not in domain and domain != "localhost":
        raise EventError("domain", f"{value[:80]!r} is not a valid host name")
    # As the WHATWG URL host parser reads it ("ends in a number"): a last label of decimal digits or of
    # 0x-hex digits makes the host an IPv4 address (Chromium reads http://1.0x7f/ as 1.0.0.127).
    if _NUMERIC_LABEL_RE.fullmatch(domain.rsplit(".", 1)[-1]):
        raise EventError("domain", f"{value[:80]!r} is an IP address; sites are registered by host name")
    return domain


def _url(value: Any, name: str, *, required: bool) -> str | None:
    if value is None or value == "":
        if required:
            raise EventError(name, "is required")
        return None
    if not isinstance(value, str):
        raise EventError(name, "must be a string")
    if len(value) > _MAX_URL:
        raise EventError(name, f"is longer than {_MAX_URL} characters")
    if not (value.startswith("http://") or value.startswith("https://")):
        raise EventError(name, "must be an absolute http(s) URL")
    return value


def _type(value: Any) -> str:
    if value not in EVENT_TYPES:
        raise EventError("type", f"must be one of {', '.join(EVENT_TYPES)}")
    return value


def _value(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise EventError("value", "must be a decimal number or a string holding one")
    if isinstance(value, float) and not math.isfinite(value):
        raise EventError("value", "must be finite")
    try:
        dec = Decimal(str(value))
    except InvalidOperation:
        raise EventError("value", f"{str(value)[:40]!r} is not a decimal number") from None
    if not dec.is_finite() or dec < 0 or dec > _MAX_VALUE:
        raise EventError("value", f"must be between 0 and {_MAX_VALUE}")
    if dec != dec.quantize(_VALUE_QUANTUM):
        raise EventError("value", "has more than 6 decimal places")
    return dec.quantize(_VALUE_QUANTUM).normalize() if dec else Decimal(0)


def _opt_str(value: Any, name: str, max_len: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise EventError(name, f"must be a string of at most {max_len} characters")
    return value


def _parse_time(value: Any, name: str) -> datetime:
    if isinstance(value, bool):
        raise EventError(name, "must be an ISO-8601 time with offset or epoch milliseconds")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0 <= value < 32503680000000:
            raise EventError(name, "epoch milliseconds out of range")
        return datetime.fromtimestamp(value / 1000.0, tz=UTC)
    if isinstance(value, str) and 10 <= len(value) <= 40 and value.isascii():
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            pass
        else:
            if dt.tzinfo is None:
                raise EventError(name, "must carry a UTC offset (e.g. 2026-01-01T10:00:00Z)")
            if not 1970 <= dt.year <= 2999:  # also keeps astimezone() away from year 1 / 9999 overflows
                raise EventError(name, "must be between the years 1970 and 2999")
            return dt.astimezone(UTC)
    raise EventError(name, "must be an ISO-8601 time with offset or epoch milliseconds")


def _client_time(value: Any, received: datetime, limits: Limits) -> datetime:
    if value is None:
        return received
    ts = _parse_time(value, "ts")
    if ts > received + limits.max_future_skew:
        raise EventError("ts", f"is more than {int(limits.max_future_skew.total_seconds())}s in the future")
    if ts < received - limits.max_past_age:
        raise EventError("ts", f"is older than {int(limits.max_past_age.total_seconds())}s")
    return ts


def _stored_time(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise EventError(name, "must be an ISO-8601 string")
    return _parse_time(value, name)


# ---------------------------------------------------------------- the consumers' decoder (ADR 14)
#
# What the workers run on every record of the topic. It is not `Event.from_json`: the collector has
# already made the semantic checks, so this one checks shape and types (in C, msgspec) plus what a
# store would choke on, and names the field when it refuses. Unknown fields are ignored (newer
# writers may add some). Both workers use it, so both set aside exactly the same records.


def _limited(max_len: int, min_len: int = 0) -> Any:
    return Annotated[str, msgspec.Meta(min_length=min_len, max_length=max_len)]


class StoredEvent(msgspec.Struct, gc=False):
    """One event as read back from the topic. `value` is a Decimal (or None) once decoded."""

    v: Literal[1]
    hash: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
    domain: _limited(253, 1)
    url: _limited(_MAX_URL, 1)
    ts: Annotated[datetime, msgspec.Meta(tz=True)]
    received_at: Annotated[datetime, msgspec.Meta(tz=True)]
    type: Literal["impression", "pageview"]
    value: str | int | float | None = None
    referrer: _limited(_MAX_URL) | None = None
    user_agent: _limited(_MAX_UA) | None = None
    browser: _limited(64) | None = None
    os: _limited(64) | None = None
    device: _limited(32) | None = None
    country: _limited(2) | None = None
    visitor: _limited(32) | None = None


_STORED = msgspec.json.Decoder(StoredEvent)
# Times both stores hold: PostgreSQL timestamptz and ClickHouse DateTime64(3) (up to 2299).
_STORE_MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
_STORE_MAX_TIME = datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)
_MISSING_RE = re.compile(r"Object missing required field `(\w+)`")
_checked_domains: set[str] = set()  # host names already found normal: checked once per process


def decode_stored(data: bytes) -> StoredEvent:
    """Decode one record value for the stores; raises EventError naming the field on anything malformed."""
    try:
        e = _STORED.decode(data)
    except msgspec.ValidationError as exc:
        problem, at, where = str(exc).partition(" - at `$.")
        field = where.rstrip("`").split("[", 1)[0].split(".", 1)[0] if at else "$"
        missing = _MISSING_RE.match(problem)
        raise EventError(missing.group(1) if missing and field == "$" else field, problem) from None
    except msgspec.DecodeError as exc:
        raise EventError("$", f"not valid JSON ({exc})") from None
    if e.domain not in _checked_domains:
        if normalize_domain(e.domain) != e.domain:
            raise EventError("domain", f"{e.domain[:80]!r} is not a normalised host name")
        if len(_checked_domains) >= 100_000:
            _checked_domains.clear()
        _checked_domains.add(e.domain)
    if not _STORE_MIN_TIME <= e.ts <= _STORE_MAX_TIME:
        raise EventError("ts", "must be between the years 1970 and 2299")
    if not _STORE_MIN_TIME <= e.received_at <= _STORE_MAX_TIME:
        raise EventError("received_at", "must be between the years 1970 and 2299")
    if e.value is not None:
        e.value = _value(e.value)
    return e


# ---------------------------------------------------------------- refusal counts (ingestion status)
#
# The collector does not talk to PostgreSQL, yet a customer must see what it refused. So each
# collector process appends, every few seconds, one count record per (domain, reason) to its spool:
# it travels with the events (spool -> shipper -> topic, same partition key) and the rollup worker
# adds it to `collector_refusals` in the same transaction as its offsets, deduplicated by `hash`
# like an event. The loader skips them. They are told apart from events by `"kind":"refusals"`.

REFUSALS_KIND = "refusals"
REFUSALS_MARK = b'"kind":"refusals"'  # as orjson writes it (no spaces): the consumers' cheap test


class RefusalCount(msgspec.Struct, gc=False):
    """`count` events for `domain` refused for `reason` by one collector process up to `window_end`."""

    v: Literal[1]
    kind: Literal["refusals"]
    hash: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
    domain: _limited(253, 1)
    reason: Annotated[str, msgspec.Meta(pattern="^[a-z_]{1,40}$")]
    count: Annotated[int, msgspec.Meta(ge=1, le=10**12)]
    window_end: Annotated[datetime, msgspec.Meta(tz=True)]


_REFUSALS = msgspec.json.Decoder(RefusalCount)


def refusal_count_json(domain: str, reason: str, count: int, window_end: datetime) -> bytes:
    """One count record, as the collector spools it."""
    return orjson.dumps({"v": SCHEMA_VERSION, "kind": REFUSALS_KIND, "hash": os.urandom(16).hex(),
                         "domain": domain, "reason": reason, "count": count, "window_end": _iso(window_end)})


def decode_refusal_count(data: bytes) -> RefusalCount:
    """Decode one count record; raises EventError naming the field on anything malformed."""
    try:
        return _REFUSALS.decode(data)
    except msgspec.ValidationError as exc:
        problem, at, where = str(exc).partition(" - at `$.")
        raise EventError(where.rstrip("`").split(".", 1)[0] if at else "$", problem) from None
    except msgspec.DecodeError as exc:
        raise EventError("$", f"not valid JSON ({exc})") from None
