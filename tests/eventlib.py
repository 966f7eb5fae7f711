"""Event helpers only the tests use (moved out of core/event.py, which holds what the product runs).

`event_to_dict(e)`: the stored record of `e` as a dict (what `Event.to_json()` writes, as an object to
edit); `event_from_json(data)`: decode a stored record and re-validate every field fully, raising
EventError on anything malformed (the workers' own decoder is `core.event.decode_stored`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import orjson

from core.event import (
    _APP_REFERRER_RE,
    COUNTRY_LEN,
    HASH_LEN,
    MAX_BROWSER,
    MAX_DEVICE,
    MAX_OS,
    MAX_PAGE,
    MAX_SOURCE,
    MAX_UA,
    MAX_UTM,
    SCHEMA_VERSION,
    VISITOR_LEN,
    Event,
    EventError,
    _parse_time,
    _type,
    _url,
    _value,
    normalize_domain,
)

_HASH_RE = re.compile(f"^[0-9a-f]{{{HASH_LEN}}}$")


def event_to_dict(e: Event) -> dict[str, Any]:
    """The record `e.to_json()` writes, as a dict."""
    record: dict[str, Any] = orjson.loads(e.to_json())
    return record


def event_from_json(data: bytes | str) -> Event:
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
        raise EventError("hash", f"must be {HASH_LEN} lowercase hex characters")
    url = _url(obj.get("url"), "url", required=True)
    assert url is not None
    return Event(
        hash=h,
        domain=normalize_domain(obj.get("domain")),
        url=url,
        ts=_stored_time(obj.get("ts"), "ts"),
        received_at=_stored_time(obj.get("received_at"), "received_at"),
        type=_type(obj.get("type")),
        value=_value(obj.get("value")),
        referrer=_referrer(obj.get("referrer")),
        user_agent=_opt_str(obj.get("user_agent"), "user_agent", MAX_UA),
        browser=_opt_str(obj.get("browser"), "browser", MAX_BROWSER),
        os=_opt_str(obj.get("os"), "os", MAX_OS),
        device=_opt_str(obj.get("device"), "device", MAX_DEVICE),
        country=_opt_str(obj.get("country"), "country", COUNTRY_LEN),
        visitor=_opt_str(obj.get("visitor"), "visitor", VISITOR_LEN),
        page=_opt_str(obj.get("page"), "page", MAX_PAGE),
        source=_opt_str(obj.get("source"), "source", MAX_SOURCE),
        utm_medium=_opt_str(obj.get("utm_medium"), "utm_medium", MAX_UTM),
        utm_campaign=_opt_str(obj.get("utm_campaign"), "utm_campaign", MAX_UTM),
    )


def _referrer(value: Any) -> str | None:
    if isinstance(value, str) and _APP_REFERRER_RE.fullmatch(value):  # an Android app's (ADR 45)
        return value
    return _url(value, "referrer", required=False)


def _opt_str(value: Any, name: str, max_len: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise EventError(name, f"must be a string of at most {max_len} characters")
    return value


def _stored_time(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise EventError(name, "must be an ISO-8601 string")
    return _parse_time(value, name)
