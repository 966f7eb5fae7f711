"""ClickHouse's own output formats for analyst SQL on the ClickHouse-compatible endpoint (ADR 50).

For these, ClickHouse itself encodes the result (clickhouse-connect `raw_stream(query, fmt=...)` in the
analyst server) under the same byte cap and deadline as tally's own formats (olap/formats.py). Only the
formats listed here: no format that reads a schema or template file (Protobuf, CapnProto, Template), none
that writes anywhere but the response.

This module is pure Python (no ClickHouse client): the API process imports it.
"""

from __future__ import annotations

import re

from olap.formats import FORMATS

_TSV = "text/tab-separated-values; charset=UTF-8"
_CSV = "text/csv; charset=UTF-8; header=absent"
_CSV_HEADER = "text/csv; charset=UTF-8; header=present"
_JSON = "application/json; charset=UTF-8"
_NDJSON = "application/x-ndjson; charset=UTF-8"
_BINARY = "application/octet-stream"
_TEXT = "text/plain; charset=UTF-8"

# name -> the Content-Type ClickHouse sends it with. Names as ClickHouse spells them; looked up without case.
CH_FORMATS: dict[str, str] = {
    "TabSeparated": _TSV, "TSV": _TSV, "TabSeparatedRaw": _TSV, "TSVRaw": _TSV, "Raw": _TSV,
    "TabSeparatedWithNames": _TSV, "TSVWithNames": _TSV, "TabSeparatedRawWithNames": _TSV,
    "TSVRawWithNames": _TSV, "TabSeparatedWithNamesAndTypes": _TSV, "TSVWithNamesAndTypes": _TSV,
    "TabSeparatedRawWithNamesAndTypes": _TSV, "TSVRawWithNamesAndTypes": _TSV,
    "CSV": _CSV, "CSVWithNames": _CSV_HEADER, "CSVWithNamesAndTypes": _CSV_HEADER,
    "JSON": _JSON, "JSONStrings": _JSON, "JSONCompact": _JSON, "JSONCompactStrings": _JSON,
    "JSONColumns": _JSON, "JSONCompactColumns": _JSON, "JSONColumnsWithMetadata": _JSON,
    "JSONObjectEachRow": _JSON,
    "JSONEachRow": _NDJSON, "NDJSON": _NDJSON, "JSONLines": _NDJSON, "JSONStringsEachRow": _NDJSON,
    "JSONCompactEachRow": _NDJSON, "JSONCompactEachRowWithNames": _NDJSON,
    "JSONCompactEachRowWithNamesAndTypes": _NDJSON, "JSONCompactStringsEachRow": _NDJSON,
    "JSONCompactStringsEachRowWithNames": _NDJSON, "JSONCompactStringsEachRowWithNamesAndTypes": _NDJSON,
    "Native": _BINARY, "RowBinary": _BINARY, "RowBinaryWithNames": _BINARY,
    "RowBinaryWithNamesAndTypes": _BINARY, "Arrow": _BINARY, "ArrowStream": _BINARY, "Parquet": _BINARY,
    "ORC": _BINARY, "Avro": _BINARY, "MsgPack": _BINARY,
    "Pretty": _TEXT, "PrettyCompact": _TEXT, "PrettyCompactMonoBlock": _TEXT, "PrettySpace": _TEXT,
    "PrettyNoEscapes": _TEXT, "PrettyCompactNoEscapes": _TEXT, "PrettySpaceNoEscapes": _TEXT,
    "PrettyMonoBlock": _TEXT, "Vertical": _TEXT, "Markdown": _TEXT, "Values": _TEXT, "TSKV": _TEXT,
    "XML": "application/xml; charset=UTF-8", "Null": _TEXT,
}
DEFAULT_FORMAT = "TabSeparated"  # ClickHouse's HTTP default when neither the query nor the request names one

_BY_LOWER = {name.lower(): name for name in CH_FORMATS}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")


def ch_format_named(name: object) -> str | None:
    """The allowlisted ClickHouse format `name` spells (any case), as ClickHouse spells it; else None."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return None
    return _BY_LOWER.get(name.lower())


def is_ch_format(name: str) -> bool:
    """Whether `name` (a request's `format`) is one of these, rather than one of tally's own (json, csv, ...)."""
    return name not in FORMATS and ch_format_named(name) == name


def unknown_format_message(name: object) -> str:
    shown = str(name)[:64]
    return (f"format {shown!r} is not served by the analyst endpoint; use one of "
            f"{', '.join(sorted(CH_FORMATS))} (docs/clickhouse-http.md)")
