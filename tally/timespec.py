"""The one time syntax of every `tally` command (ADR 40).

A duration is digits and a unit: `90s`, `10m`, `24h`, `7d` (ASCII digits, at most 9 of them). A point
in time is either a duration, meaning that long before now, or an ISO-8601 time with a UTC offset
(`2026-11-23T10:00:00Z`, `...+05:45`). Options that take a length of time (`--wait`, `--timeout`,
`--ttl`, `--last`) take a duration; a bare number there still means seconds, as before. An ISO-8601
time lies between 1970 and 9000 (UTC), as the API's `from`/`to` do; a duration further back than 1970
means 1970.

Every parser raises `TimeSyntaxError` (a ValueError) whose message names the option and the value.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # a duration further back than this means "from the start"
LATEST = datetime(9000, 1, 1, tzinfo=UTC)  # an ISO time must be before this (and not before EPOCH)
_DURATION = re.compile(r"([0-9]{1,9})([smhd])")
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")
EXAMPLES = "10m, 24h or 7d"


class TimeSyntaxError(ValueError):
    """A time or duration that does not parse, or is out of range; the message names the option."""


def parse_duration(text: str, flag: str) -> timedelta:
    """`10m`, `24h`, `7d`, `90s` -> timedelta."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise TimeSyntaxError(f"{flag} {text!r} is not a duration like {EXAMPLES}")
    return timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])


def parse_seconds(text: str, flag: str, *, low: float, high: float) -> float:
    """A duration (`30s`, `2m`) or a bare number of seconds (`30`, `0.5`), within [low, high]."""
    text = text.strip()
    seconds = float(text) if _SECONDS.fullmatch(text) else parse_duration(text, flag).total_seconds()
    if not low <= seconds <= high:
        raise TimeSyntaxError(f"{flag} must be between {_short(low)} and {_short(high)} (got {text})")
    return seconds


def _short(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"{seconds / UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def parse_time(text: str, flag: str, now: datetime | None = None) -> datetime:
    """A duration ago (`10m`: ten minutes before `now`, at the earliest 1970) or an ISO-8601 time with
    an offset (or Z) -> aware UTC datetime."""
    now = now or datetime.now(UTC)
    stripped = text.strip()
    if _DURATION.fullmatch(stripped):
        try:
            return max(now - parse_duration(stripped, flag), EPOCH)
        except OverflowError:
            return EPOCH
    try:
        value = datetime.fromisoformat(stripped.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TimeSyntaxError(f"{flag} {text!r} is not an ISO-8601 time (e.g. 2026-11-23T10:00:00Z) nor a "
                              f"duration ago like {EXAMPLES}") from None
    if value.tzinfo is None:
        raise TimeSyntaxError(f"{flag} {text!r} has no UTC offset; add Z or +hh:mm")
    utc = _utc(value)
    if utc is None or not EPOCH <= utc < LATEST:
        raise TimeSyntaxError(f"{flag} {text!r} is out of range: a time lies between "
                              f"{EPOCH:%Y-%m-%dT%H:%M:%SZ} and {LATEST:%Y-%m-%dT%H:%M:%SZ}")
    return utc


def _utc(value: datetime) -> datetime | None:
    """`value` in UTC, or None where that is outside datetime's years 1..9999
    (0001-01-01T00:00+01:00 is in the year 0 in UTC, 9999-12-31T23:00-05:00 in 10000)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return None


def time_help(what: str) -> str:
    """The help text of an option taking a point in time."""
    return f"{what}: how long ago ({EXAMPLES}) or ISO-8601 with offset (2026-11-23T09:00:00Z)"
