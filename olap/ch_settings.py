"""The ClickHouse settings analyst clients may send to the ClickHouse-compatible endpoint (ADR 50).

By allowlist, as everywhere: a URL parameter is
- a request parameter of the endpoint itself (`TRANSPORT`: query, database, formats, ids, sessions,
  compression, progress headers): handled or ignored by the API, never sent to ClickHouse;
- `readonly` 1 or 2 (read-only already: accepted, ignored); any other value changes read-only-ness: refused;
- a harmless setting (`FORWARDED`, each with the values it may take: output format options, how times are
  written, input parsing): checked here, re-checked by the analyst server, passed to ClickHouse before
  the server's own limits;
- a limit the client may only lower (`LOWERED`: `max_execution_time`): the smaller value applies;
- `param_<name>`: a query parameter (ADR 53);
- anything else is refused, saying why: code 164 (READONLY) for a limit or resource (`max_*`, `min_*`,
  `*_overflow_mode`, ...) and for access or audit (`allow_*`, `log_*`, `readonly`, ...), code 115
  (UNKNOWN_SETTING) for any other name.

The same names are taken in a trailing `SETTINGS` clause of the query (olap/ch_query.py `take_settings`).

This module is pure Python (no ClickHouse client): the API process imports it. docs/clickhouse-http.md
lists what is here; tests/test_clickhouse_http.py checks that the two agree.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Callable, Mapping

READONLY_CODE = 164
UNKNOWN_SETTING_CODE = 115
BAD_ARGUMENTS_CODE = 36

# Request parameters the endpoint handles itself (or accepts and ignores); never forwarded to ClickHouse.
TRANSPORT = frozenset({
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "user", "wait_end_of_query", "enable_http_compression", "http_zlib_compression_level",
    "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "cancel_http_readonly_queries_on_client_close", "buffer_size",
    "http_wait_end_of_query", "http_response_buffer_size", "compress", "decompress", "add_http_cors_header",
    "http_native_compression_disable_checksumming_on_decompress", "output_format_parallel_formatting",
})

_BOOL = frozenset({"0", "1", "true", "false"})


def _one_of(*values: str) -> Callable[[str], bool]:
    allowed = frozenset(values)
    return lambda v: v.lower() in allowed


def _bool(value: str) -> bool:
    return value.lower() in _BOOL


def _char(value: str) -> bool:
    return len(value) == 1 and value not in "\r\n"


def _short_text(value: str) -> bool:
    return len(value) <= 16 and "\n" not in value and "\r" not in value


def _int_in(low: int, high: int) -> Callable[[str], bool]:
    return lambda v: v.isdigit() and low <= int(v) <= high


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _zone(value: str) -> bool:
    """An IANA time zone name (tzdata's list, as ClickHouse's)."""
    return len(value) <= 64 and value in _zones()


# Forwarded to ClickHouse: how the result is written or input literals parsed, never how much is read,
# computed or returned (ClickHouse enforces those with the server's own limits).
FORWARDED: dict[str, Callable[[str], bool]] = {
    "date_time_output_format": _one_of("simple", "iso", "unix_timestamp"),
    "date_time_input_format": _one_of("basic", "best_effort", "best_effort_us"),
    "date_time_64_output_format_cut_trailing_zeros_align_to_groups_of_thousands": _bool,
    "cast_string_to_dynamic_use_inference": _bool,
    "output_format_json_quote_64bit_integers": _bool,
    "output_format_json_quote_64bit_floats": _bool,
    "output_format_json_quote_denormals": _bool,
    "output_format_json_quote_decimals": _bool,
    "output_format_json_escape_forward_slashes": _bool,
    "output_format_json_named_tuples_as_objects": _bool,
    "output_format_json_array_of_rows": _bool,
    "output_format_json_validate_utf8": _bool,
    "output_format_json_pretty_print": _bool,
    "output_format_write_statistics": _bool,
    "output_format_decimal_trailing_zeros": _bool,
    "output_format_csv_crlf_end_of_line": _bool,
    "output_format_tsv_crlf_end_of_line": _bool,
    "format_csv_delimiter": _char,
    "format_csv_null_representation": _short_text,
    "format_tsv_null_representation": _short_text,
    "bool_true_representation": _short_text,
    "bool_false_representation": _short_text,
    "output_format_arrow_string_as_string": _bool,
    "output_format_arrow_fixed_string_as_fixed_byte_array": _bool,
    "output_format_arrow_low_cardinality_as_dictionary": _bool,
    "output_format_arrow_compression_method": _one_of("lz4_frame", "zstd", "none"),
    "output_format_parquet_string_as_string": _bool,
    "output_format_parquet_compression_method": _one_of("snappy", "lz4", "brotli", "zstd", "gzip", "none"),
    "output_format_native_encode_types_in_binary_format": _bool,
    "output_format_binary_encode_types_in_binary_format": _bool,
    "output_format_pretty_color": _one_of("0", "1", "auto", "true", "false"),
    "output_format_pretty_grid_charset": _one_of("utf-8", "ascii"),
    "output_format_pretty_row_numbers": _bool,
    "output_format_pretty_max_rows": _int_in(1, 10_000),
    "output_format_pretty_max_value_width": _int_in(1, 10_000),
    # Extra LIMIT / OFFSET on the result (Grafana's row limit): they only ever return fewer rows; the server sets
    # neither, so there is no limit of its own to raise.
    "limit": _int_in(0, 10**12),
    "offset": _int_in(0, 10**12),
    # How Native is written (BlockInfo, custom serialization flags) for the client's protocol revision;
    # ClickHouse servers honour it, chDB writes revision 0 whatever it is told (clients then negotiate 0).
    "client_protocol_version": _int_in(0, 1_000_000),
    # How a query is computed, never how much: the zone of times without one (and of now(), toDate(...)),
    # the min/max row of a result (the ClickHouse formats write it; tally's own formats take no settings),
    # which name a column gets, NULL for the unmatched side of an outer JOIN instead of the type's default.
    "session_timezone": _zone,
    "extremes": _bool,
    "prefer_column_name_to_alias": _bool,
    "join_use_nulls": _bool,
}

# A query id (`query_id`): printable ASCII without blanks (UUIDs, the ids tools make), so it is safe in a response
# header, a log line and `tally sql-log`.
MAX_QUERY_ID_CHARS = 100
QUERY_ID = re.compile(rf"[!-~]{{1,{MAX_QUERY_ID_CHARS}}}")
QUERY_ID_RULE = (f"query_id must be 1 to {MAX_QUERY_ID_CHARS} printable ASCII characters without blanks or control "
                 "characters (a UUID, for example)")

# Forwarded as HTTP parameters of ClickHouse's interface, not settings: a SETTINGS clause cannot carry them.
HTTP_PARAMETERS = frozenset({"client_protocol_version"})


def _seconds(value: str) -> bool:
    try:
        return 0 <= float(value) <= 1e9
    except ValueError:
        return False


# Limits a client may lower, never raise: the analyst server applies the smaller of the client's value and
# its own (0, ClickHouse's "no limit", leaves its own). Grafana sends its query timeout as max_execution_time.
LOWERED: dict[str, Callable[[str], bool]] = {"max_execution_time": _seconds}


def lowered(asked: str, limit: float) -> float:
    """The limit to apply when a client asks for `asked` (checked by LOWERED) and the server's is `limit`."""
    value = float(asked)
    return min(value, limit) if value > 0 else limit

# Refused with READONLY (164), each class with its reason; any other name: UNKNOWN_SETTING (115).
# Limits and resources: how long, how much memory, how many rows, bytes or threads, how it is scheduled.
_LIMIT = re.compile(r"(max|min|distributed|parallel|async)_.*|"
                    r".*_(overflow_mode|timeout|limit|threads|size|bytes|rows|memory)|priority|workload|queue.*")
# Access: what analyst SQL may read or do, and what is logged of it.
_ACCESS = re.compile(r"(allow|log|insert)_.*|final|profile|readonly|.*introspection.*|.*ddl.*|sql_dialect|"
                     r"dialect|additional_table_filters|additional_result_filter")
_WHY_LIMIT = ("it would change a limit the analyst endpoint sets itself (time, memory, rows, bytes, threads, "
              "scheduling: TALLY_SQL_* on the server; max_execution_time may only be lowered)")
_WHY_ACCESS = "it would change what analyst SQL may read or do, or what is logged of it (access and audit)"
_WHY_UNKNOWN = ("the analyst endpoint accepts only the harmless settings listed in docs/clickhouse-http.md "
                "and in its system.settings")


class SettingRefused(ValueError):
    """A setting the endpoint does not allow; `code` is ClickHouse's (164 or 115)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refuse(name: str, value: str) -> SettingRefused:
    shown = name[:80]
    if name == "readonly":
        return SettingRefused(READONLY_CODE, f"Cannot modify 'readonly' setting to {value[:8]!r}: the analyst "
                                             "endpoint is read-only (readonly = 1 or 2 is accepted)")
    if _LIMIT.fullmatch(name):
        return SettingRefused(READONLY_CODE, f"Cannot modify '{shown}' setting: {_WHY_LIMIT}")
    if _ACCESS.fullmatch(name):
        return SettingRefused(READONLY_CODE, f"Cannot modify '{shown}' setting: {_WHY_ACCESS}")
    return SettingRefused(UNKNOWN_SETTING_CODE, f"Setting '{shown}' is not accepted: {_WHY_UNKNOWN}")


def check_forwarded(settings: Mapping[str, object]) -> dict[str, str]:
    """`settings` as ClickHouse gets them, if every one is allowed with its value; else SettingRefused."""
    out: dict[str, str] = {}
    for name, value in settings.items():
        text = value if isinstance(value, str) else str(value)
        valid = FORWARDED.get(name) or LOWERED.get(name)
        if valid is None:
            raise _refuse(name, text)
        if not valid(text):
            raise SettingRefused(BAD_ARGUMENTS_CODE,
                                 f"setting {name} cannot be {text[:40]!r} on the analyst endpoint")
        out[name] = text
    return out


def split_request_settings(args: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A request's URL parameters as (settings to forward, query parameters from `param_<name>`); the
    endpoint's own parameters are left out. Raises SettingRefused for any other name or a value not allowed."""
    forwarded: dict[str, str] = {}
    params: dict[str, str] = {}
    for name, value in args.items():
        if name.startswith("param_") and len(name) > len("param_"):
            params[name[len("param_"):]] = value
        elif name in TRANSPORT:
            continue
        elif name == "readonly":
            if value.strip() not in ("1", "2"):
                raise _refuse(name, value)
        else:
            forwarded[name] = value
    return check_forwarded(forwarded), params
