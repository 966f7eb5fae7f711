"""The event contract: one shape, its validation and its JSON encoding.

Every stage imports this module. The collector builds events with
`event_from_hit`; the spool, Kafka and both stores carry `Event.to_json()`
bytes; the workers decode with `decode_stored` (shape, types and store limits
checked in C, so that a broken record on the topic is rejected with a named
reason instead of being half-written). Each limit is stated once, below, and
both the collector's checks and `StoredEvent`'s types are built from it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Annotated, Any, Literal, get_args

import msgspec
import orjson

from core.enrich import NO_KEEP, enrich
from core.urls import UrlRule

EventType = Literal["impression", "pageview"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
SchemaVersion = Literal[1]
SCHEMA_VERSION: int = get_args(SchemaVersion)[0]

# What both stores hold (and so the longest the collector ever stamps): each limit once.
MAX_DOMAIN = 253
MAX_URL = 2048
MAX_UA = 512
MAX_BROWSER = 64
MAX_OS = 64
MAX_DEVICE = 32
COUNTRY_LEN = 2
MAX_PAGE = MAX_URL  # the URL's path (plus the site's own kept query parameters)
MAX_SOURCE = 64  # a source name: a known family ("Google") or a registrable domain, or utm_source
MAX_UTM = 128  # utm_medium / utm_campaign
VISITOR_LEN = 32  # hex digits of `visitor_key`
HASH_LEN = 32  # hex digits of `event_hash`

# \Z, not $: `$` also matches before a final newline ('bob.test\n' was a valid host name: an attack review)
_DOMAIN_RE = re.compile(rf"^(?=.{{1,{MAX_DOMAIN}}}\Z)([a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?)"
                        r"(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\Z")
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


class Event(msgspec.Struct, frozen=True, gc=False):
    """One validated event. Immutable; built in C (a frozen dataclass cost ~1 us more per event, ADR 25).

    `gc=False`: every field is an atom (str, datetime, Decimal, None), so an Event is never in a cycle.
    """

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
    # Enrichment (issue 17, ADR 45, core/enrich.py): the page path, the traffic source and the campaign tags.
    page: str | None = None
    source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None

    def to_json(self) -> bytes:
        """One line of JSON, no trailing newline: the stored record (`StoredEvent` reads it back)."""
        value = self.value
        return orjson.dumps({
            "v": SCHEMA_VERSION,
            "hash": self.hash,
            "domain": self.domain,
            "url": self.url,
            "ts": _iso(self.ts),
            "received_at": _iso(self.received_at),
            "type": self.type,
            "value": None if value is None else str(value),
            "referrer": self.referrer,
            "user_agent": self.user_agent,
            "browser": self.browser,
            "os": self.os,
            "device": self.device,
            "country": self.country,
            "visitor": self.visitor,
            "page": self.page,
            "source": self.source,
            "utm_medium": self.utm_medium,
            "utm_campaign": self.utm_campaign,
        })


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
                   classify_ua: Any = None, urls: UrlRule | None = None) -> Event:
    """Validate one client hit and stamp it. Raises EventError naming the first bad field.

    `urls`: the site's URL rule (core/urls.py), applied to `url` and `referrer` once they are valid and
    before the hash is computed, so the hash covers what is stored; None stores them as sent.
    `page`, `source`, `utm_medium`, `utm_campaign` are derived from the stored url and referrer and the
    domain (core/enrich.py, ADR 45), so they add nothing to the hash. A referrer is an absolute http(s)
    URL or an Android app's `android-app://<package>/...`.

    Checks run in a fixed order (shape, unknown fields, domain, site, id, ts, url, type, value,
    referrer, control characters in url then referrer), so a hit with several problems is always
    refused for the same one. `classify_ua(user_agent) -> (browser, os, device)` must be a pure
    function of its argument: it is called once per `ctx` (one request), not once per event.
    Cost (ADR 25, "Per-event validation cost"): what is the same for every event of a request (user
    agent, its classification, country, day) is computed once per `ctx`; a well-formed url or
    referrer is checked by one regex; values that repeat come from a small cache; anything else falls
    back to the plain checks (`_url`, `_type`, `_value`), which word the refusals as before.
    """
    if type(body) is not dict and not isinstance(body, Mapping):
        raise EventError("$", "each event must be a JSON object")
    if not _CLIENT_FIELDS.issuperset(body):
        unknown = body.keys() - _CLIENT_FIELDS
        raise EventError(min(unknown), f"unknown field (allowed: {', '.join(sorted(_CLIENT_FIELDS))})")
    get: Callable[..., Any] = body.get
    domain = get("domain")
    domain = _normal_domain(domain) if type(domain) is str else normalize_domain(domain)
    client_id = _client_id(get("site"), get("id"))
    received = ctx.received_at
    ts = _hit_time(get("ts"), client_id, received, limits)
    url = get("url")
    url_clean = type(url) is str and len(url) <= MAX_URL and _CLEAN_URL_RE.fullmatch(url) is not None
    if not url_clean:
        checked = _url(url, "url", required=True)
        assert checked is not None  # required: `_url` raised otherwise
        url = checked
    event_type = get("type", "pageview")
    if event_type not in EVENT_TYPES:
        _type(event_type)
    raw_value = get("value")
    value = None if raw_value is None else _hit_value(raw_value)
    url, referrer = _hit_links(url, url_clean, get("referrer"), urls)
    per_request = _per_request
    if per_request[0] is not ctx or per_request[1] is not classify_ua:
        per_request = _request_fields(ctx, classify_ua)
    _, _, ua, browser, os_name, device, country, day, client_ip = per_request
    # Derived from the stored url and referrer (so from what the hash covers): the hash is as before.
    page, source, utm_medium, utm_campaign = enrich(url, referrer, domain,
                                                    NO_KEEP if urls is None else urls.page_keep)
    return Event(
        event_hash(domain, client_id, ts=ts, type=event_type, url=url, value=value, referrer=referrer),
        domain, url, ts, received, event_type, value, referrer, ua, browser, os_name, device, country,
        visitor_key(secret, day, domain, client_ip, ua) if client_ip else None,
        page, source, utm_medium, utm_campaign,
    )


def _client_id(site: Any, client_id: Any) -> str | None:
    """The hit's own id (None: none sent), once its `site` key and `id` have the allowed shapes."""
    if site is not None and (not isinstance(site, str) or not 0 < len(site) <= _MAX_SITE_KEY):
        raise EventError("site", f"must be a site key string of at most {_MAX_SITE_KEY} characters")
    if client_id is not None and (not isinstance(client_id, str) or not 0 < len(client_id) <= _MAX_ID):
        raise EventError("id", f"must be a non-empty string of at most {_MAX_ID} characters")
    return client_id


def _hit_time(raw_ts: Any, client_id: str | None, received: datetime, limits: Limits) -> datetime:
    """The hit's event time: its `ts` within `limits` of `received`, or `received` when it sent none."""
    if raw_ts is None:
        if client_id is not None:
            # A retry must be the same event: without its own time it would land in another bucket/day.
            raise EventError("ts", "is required when 'id' is sent, so that retries carry the same event time")
        return received
    if type(raw_ts) is int and 0 <= raw_ts < 32503680000000:  # the tag's Date.now()
        ts = datetime.fromtimestamp(raw_ts / 1000.0, tz=UTC)
        if ts > received + limits.max_future_skew or ts < received - limits.max_past_age:
            _client_time(raw_ts, received, limits)  # raises, naming the limit
        return ts
    return _client_time(raw_ts, received, limits)


def _hit_value(raw_value: Any) -> Decimal | None:
    """A sent (non-null) `value` as a Decimal: repeated values from a cache."""
    if type(raw_value) is str:
        # A string value is plain ASCII decimal only (Decimal() would also take '١٢٣', '1_000', ' 1', '1e3').
        if not _ASCII_DECIMAL_RE.fullmatch(raw_value):
            raise _not_plain_decimal(raw_value)
        return _cached_value(raw_value)
    if type(raw_value) is int or type(raw_value) is float:
        return _cached_value(raw_value)
    if isinstance(raw_value, str) and not _ASCII_DECIMAL_RE.fullmatch(raw_value):
        raise _not_plain_decimal(raw_value)
    return _value(raw_value)


def _hit_links(url: str, url_clean: bool, referrer: Any, urls: UrlRule | None) -> tuple[str, str | None]:
    """(url, referrer) as stored: the referrer checked, neither holding control characters, the site's URL
    rule applied. `url` has passed `_url` already (`url_clean`: by the one-regex test)."""
    referrer_clean = referrer is None or (type(referrer) is str and len(referrer) <= MAX_URL
                                          and _CLEAN_URL_RE.fullmatch(referrer) is not None)
    if not referrer_clean and not (type(referrer) is str and len(referrer) <= MAX_URL
                                   and _APP_REFERRER_RE.fullmatch(referrer)):
        referrer = _url(referrer, "referrer", required=False)
    if not url_clean and _CONTROL_RE.search(url):
        raise EventError("url", "contains control characters (percent-encode them, as browsers do)")
    if not referrer_clean and referrer is not None and _CONTROL_RE.search(referrer):
        raise EventError("referrer", "contains control characters (percent-encode them, as browsers do)")
    if urls is not None and urls.keep is not None:
        url = urls.page(url)
        referrer = urls.referrer(referrer, url)
    return url, referrer


def _not_plain_decimal(raw_value: str) -> EventError:
    return EventError("value", f"{raw_value[:40]!r} is not a decimal number between 0 and {_MAX_VALUE} "
                      "in plain ASCII digits (optionally '.' and decimals), nor a JSON number")


# A well-formed absolute http(s) URL without control characters: what `_url` accepts and `_CONTROL_RE`
# finds nothing in (length checked apart). Anything else takes the plain checks, which name the problem.
_CLEAN_URL_RE = re.compile(r"https?://[^\x00-\x1f\x7f-\x9f]*")
# A referrer may also be an Android app (Chrome's `document.referrer` for a link opened from the Gmail app:
# `android-app://com.google.android.gm/`): a package name, then anything without control characters.
_APP_REFERRER_RE = re.compile(r"android-app://[A-Za-z0-9_.]{1,255}(?:/[^\x00-\x1f\x7f-\x9f]*)?")
_COUNTRY_RE = re.compile(f"[A-Z]{{{COUNTRY_LEN}}}")
# (ctx, classify_ua, user_agent, browser, os, device, country, day, client_ip) of the last request seen;
# replaced whole (one atomic store), read once per event, trusted only for the very same ctx object.
_per_request: tuple[Any, ...] = (None, None)


def _request_fields(ctx: HitContext, classify_ua: Any) -> tuple[Any, ...]:
    """What every event of the request behind `ctx` gets alike (computed once per request)."""
    global _per_request
    ua = ctx.user_agent[:MAX_UA] if ctx.user_agent else None
    browser = os_name = device = None
    if ua and classify_ua is not None:
        browser, os_name, device = classify_ua(ua)
        # Cut to what both stores hold (see StoredEvent): never acknowledged here and refused later.
        browser, os_name, device = (browser or None) and browser[:MAX_BROWSER], \
            (os_name or None) and os_name[:MAX_OS], (device or None) and device[:MAX_DEVICE]
    country = ctx.country if ctx.country and _COUNTRY_RE.fullmatch(ctx.country) else None
    fields = (ctx, classify_ua, ua, browser, os_name, device, country, _day(ctx.received_at), ctx.client_ip)
    _per_request = fields
    return fields


@lru_cache(maxsize=4096, typed=True)  # typed: 1, 1.0 and '1' stay apart; refusals raise and are never cached
def _cached_value(value: str | float) -> Decimal | None:
    """`_value` of an exact str / int / float (values repeat across events; a Decimal is immutable)."""
    return _value(value)


@lru_cache(maxsize=1024)  # the receive time repeats for every event of a request, and often as its ts
def _iso(dt: datetime) -> str:
    if dt.tzinfo is UTC:  # every time the collector holds: isoformat's own fields, half the cost
        # %-formatting: 0.7 us here, the f-string with format specs 1.3 us (once per request's receive time)
        return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031
            dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, dt.microsecond // 1000)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@lru_cache(maxsize=64)
def _day(dt: datetime) -> str:
    # date().isoformat() is strftime's "%Y-%m-%d" for 4-digit years, at a fifth of the cost (once per request).
    return dt.date().isoformat() if dt.year >= 1000 else dt.strftime("%Y-%m-%d")


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
    if len(value) > MAX_URL:
        raise EventError(name, f"is longer than {MAX_URL} characters")
    if not (value.startswith("http://") or value.startswith("https://")):
        raise EventError(name, "must be an absolute http(s) URL")
    return value


def _type(value: Any) -> str:
    if value not in EVENT_TYPES:
        raise EventError("type", f"must be one of {', '.join(EVENT_TYPES)}")
    return str(value)


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


# ---------------------------------------------------------------- the consumers' decoder (ADR 14)
#
# What the workers run on every record of the topic. It is not `Event.from_json`: the collector has
# already made the semantic checks, so this one checks shape and types (in C, msgspec) plus what a
# store would choke on, and names the field when it refuses. Unknown fields are ignored (newer
# writers may add some). Both workers use it, so both set aside exactly the same records.


Domain = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DOMAIN)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_URL)]
Referrer = Annotated[str, msgspec.Meta(max_length=MAX_URL)]
UserAgent = Annotated[str, msgspec.Meta(max_length=MAX_UA)]
Browser = Annotated[str, msgspec.Meta(max_length=MAX_BROWSER)]
OsName = Annotated[str, msgspec.Meta(max_length=MAX_OS)]
Device = Annotated[str, msgspec.Meta(max_length=MAX_DEVICE)]
Country = Annotated[str, msgspec.Meta(max_length=COUNTRY_LEN)]
Visitor = Annotated[str, msgspec.Meta(max_length=VISITOR_LEN)]
Page = Annotated[str, msgspec.Meta(max_length=MAX_PAGE)]
Source = Annotated[str, msgspec.Meta(max_length=MAX_SOURCE)]
Utm = Annotated[str, msgspec.Meta(max_length=MAX_UTM)]
HashLength = Annotated[str, msgspec.Meta(min_length=HASH_LEN, max_length=HASH_LEN)]


class StoredEvent(msgspec.Struct, gc=False):
    """One event as read back from the topic. `value` is a Decimal (or None) once decoded."""

    v: SchemaVersion
    # 32 lowercase hex digits: the length here, the digits by `_check_hex` (one regex per batch, ADR 27)
    hash: HashLength
    domain: Domain
    url: Url
    ts: Annotated[datetime, msgspec.Meta(tz=True)]
    received_at: Annotated[datetime, msgspec.Meta(tz=True)]
    type: EventType
    value: str | int | float | None = None  # a Decimal once `_checked` (msgspec takes no Decimal | str union)
    referrer: Referrer | None = None
    user_agent: UserAgent | None = None
    browser: Browser | None = None
    os: OsName | None = None
    device: Device | None = None
    country: Country | None = None
    visitor: Visitor | None = None
    # Records written before issue 17 carry none of these: they decode as None.
    page: Page | None = None
    source: Source | None = None
    utm_medium: Utm | None = None
    utm_campaign: Utm | None = None


_STORED = msgspec.json.Decoder(StoredEvent)
# Times both stores hold: PostgreSQL timestamptz and ClickHouse DateTime64(3) (up to 2299).
_STORE_MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
_STORE_MAX_TIME = datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)
_MISSING_RE = re.compile(r"Object missing required field `(\w+)`")
_checked_domains: set[str] = set()  # host names already found normal: checked once per process


_HEX_RUN = re.compile("[0-9a-f]*").fullmatch
_BAD_HASH = f"Expected `str` matching regex '^[0-9a-f]{{{HASH_LEN}}}$'"


def decode_stored(data: bytes) -> StoredEvent:
    """Decode one record value for the stores; raises EventError naming the field on anything malformed."""
    e = _decode_struct(data)
    if not _HEX_RUN(e.hash):
        raise EventError("hash", _BAD_HASH)
    return _checked(e)


def decode_stored_many(values: list[bytes]) -> list[StoredEvent] | None:
    """Decode every value as `decode_stored` would, or return None if any of them is malformed (the
    caller then decodes them one by one, to learn which and why). The same checks, fewer Python steps:
    the hashes' digits are checked by one regex over all of them."""
    try:
        events = [_STORED.decode(v) for v in values]
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if not _HEX_RUN("".join([e.hash for e in events])):  # every hash is 32 long: all 32 hex digits
        return None
    try:
        for e in events:
            _checked(e)
    except EventError:
        return None
    return events


def _decode_struct(data: bytes) -> StoredEvent:
    try:
        return _STORED.decode(data)
    except msgspec.ValidationError as exc:
        problem, at, where = str(exc).partition(" - at `$.")
        field = where.rstrip("`").split("[", 1)[0].split(".", 1)[0] if at else "$"
        missing = _MISSING_RE.match(problem)
        raise EventError(missing.group(1) if missing and field == "$" else field, problem) from None
    except msgspec.DecodeError as exc:
        raise EventError("$", f"not valid JSON ({exc})") from None


def _checked(e: StoredEvent) -> StoredEvent:
    """What msgspec's types cannot say: a normalised host name, times both stores hold, a decimal value."""
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
        e.value = _value(e.value)  # type: ignore[assignment]  # the field's stated exception: a Decimal from here on
    return e


# ---------------------------------------------------------------- refusal counts (ingestion status)
#
# The collector does not talk to PostgreSQL, yet a customer must see what it refused. So each
# collector process appends, every few seconds, one count record per (domain, reason) to its spool:
# it travels with the events (spool -> shipper -> topic, same partition key) and the rollup worker
# adds it to `collector_refusals` in the same transaction as its offsets, deduplicated by `hash`
# like an event. The loader skips them. They are told apart from events by `"kind":"refusals"`.
# A record may carry the reason's most recent offending `value` (the event's domain, the page's origin:
# what the site owner fixes in the tag); records without one (all before issue 17) decode as None.

RefusalsKind = Literal["refusals"]
REFUSAL_VALUE_MAX = 200  # characters of an offending value kept (collector/refusals.py cuts it to this)
REFUSALS_KIND: str = get_args(RefusalsKind)[0]
REFUSALS_MARK = f'"kind":"{REFUSALS_KIND}"'.encode()  # as orjson writes it (no spaces): the consumers' cheap test


class RefusalCount(msgspec.Struct, gc=False):
    """`count` events for `domain` refused for `reason` by one collector process up to `window_end`."""

    v: SchemaVersion
    kind: RefusalsKind
    hash: Annotated[str, msgspec.Meta(pattern=f"^[0-9a-f]{{{HASH_LEN}}}$")]
    domain: Domain
    reason: Annotated[str, msgspec.Meta(pattern="^[a-z_]{1,40}$")]
    count: Annotated[int, msgspec.Meta(ge=1, le=10**12)]
    window_end: Annotated[datetime, msgspec.Meta(tz=True)]
    value: Annotated[str, msgspec.Meta(max_length=REFUSAL_VALUE_MAX)] | None = None


_REFUSALS = msgspec.json.Decoder(RefusalCount)


def refusal_count_json(domain: str, reason: str, count: int, window_end: datetime, value: str | None = None) -> bytes:
    """One count record, as the collector spools it (`value`: the reason's most recent offending value)."""
    record = {"v": SCHEMA_VERSION, "kind": REFUSALS_KIND, "hash": os.urandom(16).hex(),
              "domain": domain, "reason": reason, "count": count, "window_end": _iso(window_end)}
    if value is not None:
        record["value"] = value[:REFUSAL_VALUE_MAX]
    return orjson.dumps(record)


def decode_refusal_count(data: bytes) -> RefusalCount:
    """Decode one count record; raises EventError naming the field on anything malformed."""
    try:
        return _REFUSALS.decode(data)
    except msgspec.ValidationError as exc:
        problem, at, where = str(exc).partition(" - at `$.")
        raise EventError(where.rstrip("`").split(".", 1)[0] if at else "$", problem) from None
    except msgspec.DecodeError as exc:
        raise EventError("$", f"not valid JSON ({exc})") from None
