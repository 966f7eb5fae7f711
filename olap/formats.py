"""Result formats: one table of what analyst SQL (and the API's CSV downloads) can answer in.

Each row names a format (`?format=` / the `format` field), the media type an `Accept` header names it
by, the `Content-Type` it is sent with and the encoder that writes it. The analyst server (olap/server.py)
answers with these content types and the API (api/sql.py, api/customers.py) negotiates and labels with
the same table, so the two cannot disagree again (ADR 39). Text formats carry `charset=utf-8`: the bytes
are UTF-8, and a spreadsheet that guesses otherwise garbles every non-ASCII name.

This module is pure Python (no ClickHouse client): the API process imports it.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import ipaddress
import math
import re
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Protocol

import orjson

_INT64_RANGE = range(-(2**63), 2**63)


class FormatError(ValueError):
    """A result this format cannot represent (e.g. two columns of one name for jsonl)."""


class Encoder(Protocol):
    """Writes one result: `start` once (column names and ClickHouse types), `rows` per block, `end` once."""

    def start(self, names: Sequence[str], types: Sequence[str]) -> bytes: ...

    def rows(self, block: Sequence[Sequence[Any]]) -> bytes: ...

    def end(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ResultFormat:
    name: str  # ?format= / {"format": ...}
    media_type: str  # what an Accept header names it by (compared without parameters, case-insensitively)
    content_type: str  # the Content-Type it is sent with
    encoder: Callable[[], Encoder]
    streamed: bool  # False: one document, written whole at the end (json)
    also_accepted: tuple[str, ...] = ()  # further media types an Accept header may use for it


# --- values ------------------------------------------------------------------------------------

_DATETIME_TYPE = re.compile(r"(?:(?:Nullable|LowCardinality)\()*DateTime(64)?(?:\((\d+))?")


def time_digits(type_name: str) -> int | None:
    """Fraction digits of a DateTime / DateTime64(p) column (also Nullable), None for any other type."""
    match = _DATETIME_TYPE.match(type_name)
    if match is None or type_name[match.end():match.end() + 1].isalnum():  # not e.g. "DateTimeX"
        return None
    if not match.group(1):
        return 0  # DateTime: seconds
    return int(match.group(2)) if match.group(2) else 3  # DateTime64(p), p = 3 when not given


def time_text(value: dt.datetime, digits: int | None = None) -> str:
    """ISO 8601 with the zone (ADR 52): `Z` for UTC, else the offset (`+01:00`). A naive value is UTC: the
    ClickHouse driver gives UTC columns' values naive. `digits`: the column's precision (DateTime64(3): three
    fraction digits, DateTime: none); None: as many as the value needs (none, 3 or 6)."""
    if digits is None:
        micro = value.microsecond
        digits = 0 if micro == 0 else 3 if micro % 1000 == 0 else 6
    spec = "seconds" if digits == 0 else "milliseconds" if digits <= 3 else "microseconds"
    offset = value.utcoffset()
    if offset is None or not offset:
        return value.replace(tzinfo=None).isoformat(timespec=spec) + "Z"
    return value.isoformat(timespec=spec)


# A DateTime/DateTime64 type's explicit zone: DateTime('Europe/Berlin'), DateTime64(3, 'Asia/Tokyo').
_TYPE_ZONE = re.compile(r"DateTime(?:64)?\((?:\d+,\s*)?'([^'\\]+)'\)")
# A type naming DateTime with no zone (what chDB's Native output reports for every DateTime('zone')).
_BARE_DATETIME = re.compile(r"\bDateTime(?![0-9(])")
# Zone names that are UTC: times in them are written with `Z` anyway.
_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "UCT", "Etc/UCT", "Universal", "Etc/Universal", "Zulu", "Etc/Zulu",
                        "GMT", "Etc/GMT", "GMT0", "Etc/GMT0", "Etc/GMT+0", "Etc/GMT-0", "Greenwich", "Etc/Greenwich"})
_WORDS = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+)*")
_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'")


def type_zone(type_name: str) -> str | None:
    """The one explicit time zone a type names (`DateTime('Europe/Berlin')`, also inside Nullable, Array, ...),
    or None for none or several."""
    zones = set(_TYPE_ZONE.findall(type_name))
    return zones.pop() if len(zones) == 1 else None


def loses_zones(types: Sequence[str]) -> bool:
    """Whether any of these result types is a DateTime without a zone: chDB's Native output (what the driver
    reads) writes `DateTime('zone')` as plain `DateTime` (ClickHouse's rule for clients below protocol revision
    54337), so such a column's zone must be asked for (DESCRIBE) to be shown."""
    return any(_BARE_DATETIME.search(t) for t in types)


def names_a_zone(text: str, values: Iterable[str] = ()) -> bool:
    """Whether a query's string literals or parameter values name a time zone other than UTC: only then can a
    result column be a DateTime('zone') whose zone the Native output drops (the analyst tables' times are UTC,
    and ClickHouse takes a zone only as a constant)."""
    zones = _zone_names()
    texts = [*_QUOTED.findall(text), *values]
    return any(word in zones for piece in texts for word in _WORDS.findall(piece))


_ZONES: frozenset[str] | None = None


def _zone_names() -> frozenset[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = frozenset(zoneinfo.available_timezones()) - _UTC_NAMES
    return _ZONES


def in_zone(value: Any, zone: str) -> Any:
    """A value of a DateTime('zone') column as the driver gave it (naive UTC) with its zone, also inside arrays
    and tuples; aware values (DateTime64) and other values unchanged."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            return value
        return value.replace(tzinfo=dt.UTC).astimezone(zoneinfo.ZoneInfo(zone))
    if isinstance(value, (list, tuple)):
        return [in_zone(v, zone) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return time_text(value)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (uuid.UUID, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value not in _INT64_RANGE:
        return str(value)  # (U)Int128/256 and big UInt64: JSON readers lose precision past 64 bits
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    return value


# Spreadsheets run a cell that starts with one of these as a formula (OWASP "CSV injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _neutral(text: str) -> str:
    """A text cell a spreadsheet will not run: one starting with = + - @ TAB or CR gets a leading '."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _cell(value: Any, digits: int | None = None) -> str:
    """One csv/tsv cell: string values (String, FixedString, Enum, LowCardinality(String)) neutralised;
    numbers, dates and the JSON of arrays, maps and tuples as they are (-5 stays -5); times with their zone
    (`digits`: the column's precision, see `time_text`)."""
    if isinstance(value, dt.datetime):
        return time_text(value, digits)
    text = _text(value)
    return _neutral(text) if isinstance(value, (str, bytes)) else text


def _text(value: Any) -> str:
    """One value as csv/tsv text: JSON for arrays, maps and tuples; ISO 8601 for times."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return orjson.dumps(_jsonable(value)).decode()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dt.datetime):
        return time_text(value)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return str(value)


def csv_text(rows: Iterable[Sequence[object]]) -> str:
    """RFC 4180 lines (CRLF ends, quoted only where needed; None is an empty field), cells as given."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


# --- encoders ----------------------------------------------------------------------------------


def _padded(digits: list[int | None]) -> Iterator[int | None]:
    """A column's precision for each value of a row: None past the known columns (never drops a value)."""
    return chain(digits, repeat(None))


def _value(value: Any, digits: int | None) -> Any:
    """One value of a column for json/jsonl: a time with its zone at the column's precision."""
    return time_text(value, digits) if isinstance(value, dt.datetime) else _jsonable(value)


class _Json:
    """{"columns", "types", "rows", "row_count"}: one document, built from per-block parts."""

    def __init__(self) -> None:
        self.count = 0
        self.digits: list[int | None] = []

    def start(self, names: Sequence[str], types: Sequence[str]) -> bytes:
        self.digits = [time_digits(t) for t in types]
        return b'{"columns":' + orjson.dumps(list(names)) + b',"types":' + orjson.dumps(list(types)) + b',"rows":['

    def rows(self, block: Sequence[Sequence[Any]]) -> bytes:
        if not block:
            return b""
        digits = self.digits
        body = orjson.dumps([[_value(v, d) for v, d in zip(row, _padded(digits), strict=False)]
                             for row in block])[1:-1]
        sep = b"," if self.count else b""
        self.count += len(block)
        return sep + body

    def end(self) -> bytes:
        return b'],"row_count":' + str(self.count).encode() + b"}"


class _Jsonl:
    """One JSON object per row, keyed by column name."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.digits: list[int | None] = []

    def start(self, names: Sequence[str], types: Sequence[str]) -> bytes:
        self.digits = [time_digits(t) for t in types]
        duplicates = sorted({n for n in names if list(names).count(n) > 1})
        if duplicates:
            raise FormatError(f"column name {duplicates[0]!r} appears twice; give the columns distinct aliases "
                              "for jsonl")
        self.names = list(names)
        return b""

    def rows(self, block: Sequence[Sequence[Any]]) -> bytes:
        names, digits = self.names, self.digits
        return b"".join(orjson.dumps({n: _value(v, d) for n, v, d in zip(names, row, _padded(digits), strict=False)})
                        + b"\n" for row in block)

    def end(self) -> bytes:
        return b""


class _Csv:
    """RFC 4180: a header row, CRLF line ends, fields quoted when they hold a comma, quote or line break.
    NULL is an empty field."""

    def __init__(self) -> None:
        self.digits: list[int | None] = []

    def start(self, names: Sequence[str], types: Sequence[str]) -> bytes:
        self.digits = [time_digits(t) for t in types]
        return csv_text([[_neutral(n) for n in names]]).encode()

    def rows(self, block: Sequence[Sequence[Any]]) -> bytes:
        digits = self.digits
        return csv_text([["" if v is None else _cell(v, d)
                          for v, d in zip(row, _padded(digits), strict=False)]
                         for row in block]).encode()

    def end(self) -> bytes:
        return b""


_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})


class _Tsv:
    """ClickHouse's TabSeparatedWithNames: a header row; backslash, tab, newline, CR and NUL escaped
    with a backslash; NULL is \\N."""

    def __init__(self) -> None:
        self.digits: list[int | None] = []

    def start(self, names: Sequence[str], types: Sequence[str]) -> bytes:
        self.digits = [time_digits(t) for t in types]
        return ("\t".join(_neutral(n).translate(_TSV_ESCAPES) for n in names) + "\n").encode()

    def rows(self, block: Sequence[Sequence[Any]]) -> bytes:
        digits = self.digits
        return "".join("\t".join("\\N" if v is None else _cell(v, d).translate(_TSV_ESCAPES)
                                 for v, d in zip(row, _padded(digits), strict=False)) + "\n"
                       for row in block).encode()

    def end(self) -> bytes:
        return b""


# --- the table ---------------------------------------------------------------------------------

FORMATS: dict[str, ResultFormat] = {f.name: f for f in (
    ResultFormat("json", "application/json", "application/json", _Json, streamed=False),
    ResultFormat("csv", "text/csv", "text/csv; charset=utf-8", _Csv, streamed=True),
    ResultFormat("tsv", "text/tab-separated-values", "text/tab-separated-values; charset=utf-8", _Tsv,
                 streamed=True),
    ResultFormat("jsonl", "application/x-ndjson", "application/x-ndjson", _Jsonl, streamed=True,
                 also_accepted=("application/jsonl",)),
)}

_BY_MEDIA_TYPE = {media: f for f in FORMATS.values() for media in (f.media_type, *f.also_accepted)}


def format_named(name: str) -> ResultFormat | None:
    """The format a `?format=` value names (case-insensitive), or None."""
    return FORMATS.get(name.lower())


def format_for_accept(media_types: Iterable[str]) -> ResultFormat | None:
    """The first of an Accept header's media types (best first) that names a format, or None. Parameters
    (`; charset=utf-8`) and case do not matter; wildcards name none (the caller's default applies)."""
    for media in media_types:
        found = _BY_MEDIA_TYPE.get(media.split(";", 1)[0].strip().lower())
        if found is not None:
            return found
    return None
