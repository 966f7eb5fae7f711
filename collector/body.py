"""Reading a `POST /collect` body: which content types, UTF-8 only, JSON, no repeated keys.

Browsers send the JS tag's batches as `text/plain` (what `fetch` with a string body and
`navigator.sendBeacon` with a text Blob send: a CORS "simple request", no preflight), servers as
`application/json`; the body is the same JSON either way (docs/adr/0015-browser-edge.md).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from core.event import EventError

ACCEPTED_TYPES = ("application/json", "text/plain")
ACCEPTED_TEXT = "application/json or text/plain (charset UTF-8, or none)"
# The fields of an event object whose repeats are looked for in the raw body (any other name is
# refused as unknown anyway, repeated or not).
_FIELDS = ("id", "domain", "url", "ts", "type", "value", "referrer", "site")
_QUOTED = {name: f'"{name}"'.encode() for name in _FIELDS}
_FIELD_SET = frozenset(_FIELDS)


class BodyError(ValueError):
    """The body cannot be read: HTTP `status`, error `code`, a message, and extra fields for the answer."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def content_type_ok(mimetype: str, params: dict[str, str]) -> bool:
    """`application/json` or `text/plain`, with no charset or UTF-8 (any spelling case), nothing else."""
    if mimetype not in ACCEPTED_TYPES:
        return False
    charset = params.get("charset")
    return charset is None or charset.strip().strip('"').lower() in ("utf-8", "utf8")


def parse_events(raw: bytes) -> list[Any]:
    """The body's events (a JSON object is a batch of one). Raises BodyError (non-UTF-8, not JSON)
    or EventError-carrying BodyError for an event object with a repeated key."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "UTF-8" in str(exc):  # orjson's words for bytes that are not UTF-8 (or lone surrogates)
            raise BodyError(400, "invalid_encoding", f"the body must be UTF-8 encoded JSON: {exc}",
                            field="body") from None
        raise BodyError(400, "malformed_json", f"body is not valid JSON: {exc}") from None
    items = body if isinstance(body, list) else [body]
    index, name = repeated_key(raw, items)
    if name is not None:
        err = EventError(name, "appears more than once in the event object")
        raise BodyError(400, "invalid_event", f"event {index}: {err}", index=index, **err.as_dict())
    return items


class _Repeated(dict[str, Any]):
    """A JSON object in which `repeated` appeared more than once (the last value kept, like orjson)."""

    repeated: str | None = None


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _Repeated(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                obj.repeated = name
                break
            seen.add(name)
    return obj


def repeated_key(raw: bytes, items: list[Any]) -> tuple[int, str | None]:
    """(index, name) of the first event object with a repeated key, else (0, None).

    orjson keeps the last of repeated keys silently; a client that sends `"url"` twice means one of
    them and we cannot know which, so such an event is refused. The exact check re-parses the body
    with the standard library, which is slow, so it runs only when the raw body could hold a repeat:
    a `"field"` appears more often in the bytes than the parsed events have that field, or a key
    may be spelled with `\\u` escapes. Ordinary tag and server traffic never takes the slow path.
    """
    # Each field an event object holds appears in the bytes at least once as `"field"`, so some field
    # appears more often than the objects hold it exactly when the totals over all fields differ.
    suspicious = b"\\u" in raw or sum([raw.count(quoted) for quoted in _QUOTED.values()]) > sum(
        [len(item.keys() & _FIELD_SET) for item in items if isinstance(item, dict)])
    if not suspicious:
        return 0, None
    try:
        body = json.loads(raw, object_pairs_hook=_pairs)  # orjson already found it valid JSON
    except RecursionError:  # nesting only events' values could hold, and those are refused anyway
        raise BodyError(400, "malformed_json", "the body is nested too deeply") from None
    for index, item in enumerate(body if isinstance(body, list) else [body]):
        if isinstance(item, _Repeated) and item.repeated is not None:
            return index, item.repeated
    return 0, None
