"""Analyst SQL: one SELECT over the analyst tables, checked by allowlist on ClickHouse's own parse tree,
run with limits that ClickHouse enforces, and encoded here as json, csv, tsv or jsonl (olap/formats.py).

`prepare` parses only; it executes nothing the analyst wrote:

1. `formatQuerySingleLine` of the text, passed as a bound string: ClickHouse's parser, one statement
   only (chDB would otherwise run `;`-separated statements one after the other), comments dropped.
   That canonical text is the only thing ever run.
2. `parseQueryToJSON` of the canonical text gives the parse tree as data, and
   `formatQueryFromJSON` of that tree must give the canonical text back: the tree holds the whole
   query, so a check of the tree is a check of what runs. All three are one round trip.
3. `olap.allowlist.check` walks the tree: a SELECT (SHOW, DESCRIBE, EXISTS: first turned into the
   SELECT over the curated catalog that answers them, olap/catalog.py), analyst tables and CTEs in scope,
   allowlisted table functions and functions, no SETTINGS / FORMAT / INTO OUTFILE; then
   `check_parameters` matches its query parameters (`{name:Type}`) to the values sent (ADR 53).

The text form of `EXPLAIN AST` is not used: it prints aliases and identifiers raw, so a quoted alias
holding a newline adds made-up lines to the dump (seen with chDB 4.4: `1 AS `a\\n  Function file``),
and it does not print CTE names at all (`WithElement (children 1)`), so `FROM name` could not be
told apart from a table of that name. `parseQueryToJSON` needs ClickHouse 26.8+; on an older
server every query is refused with a message saying so (fail closed).

`stream` runs the canonical text with ClickHouse-side limits (`max_execution_time`,
`max_memory_usage`, `max_result_rows`, `max_result_bytes` with `result_overflow_mode = 'throw'`,
`max_threads`, `final = 1`, `readonly = 1` last on a writable session), with the query parameters'
values bound by ClickHouse (`param_<name>`; never pasted into the text), and counts the rows and the
encoded bytes it produces itself; closing the generator closes the ClickHouse stream, which cancels
the query.
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from olap import catalog
from olap.allowlist import (
    ANALYST_TABLES,
    Refused,
    catalog_database,
    check,
    check_parameters,
    function_table,
    not_a_select,
)
from olap.ch_settings import LOWERED, lowered
from olap.formats import FORMATS, FormatError, ResultFormat, in_zone, loses_zones, names_a_zone, type_zone
from olap.schema import EVENT_COLUMNS

# The longest analyst query text, in bytes of UTF-8. A query's cost inside one block grows with its length
# (twelve constant terms of one expensive call: twelve times the time), so the cap bounds that too.
MAX_SQL_BYTES = 16 * 1024
# Rows per block: ClickHouse checks the time limit (and KILL QUERY) between blocks, so smaller blocks
# bound the work between two checks (ClickHouse's default is 65,409).
MAX_BLOCK_ROWS = 8192
# Elements `range` may produce per call and block (ClickHouse's function_range_max_elements_in_block, default
# 500,000,000): 32 per row of a full block. Quadratic array work on one such array (`hasAll(range(n),
# arrayReverse(range(n)))`) costs about 2 s at this cap on the reference machine, 32 s at 1,000,000 (ADR 32).
# A cheap cap on the commonest form only: arrays made otherwise are bounded by the memory limit, and the
# watchdog's overrun exit bounds the time.
MAX_RANGE_ELEMENTS = 32 * MAX_BLOCK_ROWS
# Result types nested deeper than this (Array(Array(...)), tuples, maps) are refused: the driver's type
# parser recurses per level (RecursionError near 350) and orjson stops at 255.
MAX_RESULT_NESTING = 32

# ClickHouse error codes that mean something to the caller.
_TIMEOUT_CODES = {159: "TIMEOUT_EXCEEDED", 160: "TOO_SLOW"}
_TOO_LARGE_CODES = {396: "TOO_MANY_ROWS_OR_BYTES"}
_REFUSED_CODES = {164: "READONLY", 497: "ACCESS_DENIED", 62: "SYNTAX_ERROR"}
_UNKNOWN_FUNCTION = 46
# A query parameter's value that does not parse as its type says "... for query parameter 'name'" (codes vary
# with the type: 457 BAD_QUERY_PARAMETER, 26, 27, 32, 41, ...).
_BAD_PARAMETER = re.compile(r"for query parameter '\w+'")
_NO_JSON = re.compile(r"AST node of type '([^'\n]{1,80})' does not support JSON serialization")


class AnalystQueryError(ValueError):
    """A refused or failed analyst query. `code`: refused | failed | timeout | too_large."""

    def __init__(self, code: str, message: str, ch_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ch_code = ch_code  # ClickHouse's error code, when ClickHouse raised it (olap/ch_errors.py)


@dataclass(frozen=True, slots=True)
class SqlLimits:
    max_execution_s: float
    max_memory_bytes: int
    max_result_rows: int
    max_result_bytes: int = 64 << 20
    max_threads: int = 2
    max_block_rows: int = MAX_BLOCK_ROWS
    max_range_elements: int = MAX_RANGE_ELEMENTS


@dataclass
class QueryStats:
    rows: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]] = field(default_factory=list)


# --- parsing -----------------------------------------------------------------------------------


PREPARED_CACHE_SIZE = 256  # statements `prepare` remembers
PREPARED_MAX_BYTES = 32 * 1024  # one remembered entry's SQL, parameter names and values and text at most: 8 MiB in all
# Per client (its server's parser decides too): the last accepted statements, most recent last.
_PREPARED: weakref.WeakKeyDictionary[Client, OrderedDict[Hashable, str]] = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def prepare(client: Client, sql: object, database: str, params: Mapping[str, str] | None = None, *,
            system_catalog: bool = False) -> str:
    """The canonical single statement for `sql`, if analysts may run it with these query parameters (the
    values of its `{name:Type}`, olap/params.py; pass the same to `stream`). Parsing only. `system_catalog`:
    `system.<x>` names the curated catalog views (the ClickHouse-compatible endpoint's tools; olap/catalog.py).

    Raises AnalystQueryError(code="refused") naming the table, function, clause or parameter refused.

    The check is a pure function of its inputs (the client's server's parser, this code's allowlist), so an
    accepted statement is remembered per client (the last PREPARED_CACHE_SIZE of at most PREPARED_MAX_BYTES
    each, by SQL, database, parameter values and catalog mode):
    a dashboard or a freshness probe asking the same again skips the parse round trip (ADR 56). Refusals are
    not remembered.
    """
    key = _prepared_key(sql, database, params, system_catalog)
    if key is not None:
        with _PREPARED_LOCK:
            remembered = _PREPARED.setdefault(client, OrderedDict())
            known = remembered.get(key)
            if known is not None:
                remembered.move_to_end(key)
                return known
    text = _prepare(client, sql, database, params, system_catalog=system_catalog)
    if key is not None and _entry_bytes(sql, params, text) <= PREPARED_MAX_BYTES:
        with _PREPARED_LOCK:
            remembered[key] = text
            while len(remembered) > PREPARED_CACHE_SIZE:
                remembered.popitem(last=False)
    return text


def _entry_bytes(sql: object, params: Mapping[str, str] | None, text: str) -> int:
    """What remembering a statement holds (SQL, parameters, canonical text), in characters."""
    return len(str(sql)) + len(text) + sum(len(str(k)) + len(str(v)) for k, v in (params or {}).items())


def _prepared_key(sql: object, database: str, params: object, system_catalog: bool) -> Hashable | None:
    """What `prepare` remembers an accepted statement by; None (not remembered) for input it refuses anyway."""
    if not isinstance(sql, str) or (params is not None and not isinstance(params, dict)):
        return None
    values = params or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        return None
    return sql, database, tuple(sorted(values.items())), system_catalog


def _prepare(client: Client, sql: object, database: str, params: Mapping[str, str] | None = None, *,
             system_catalog: bool = False) -> str:
    if not isinstance(sql, str) or not sql.strip():
        raise AnalystQueryError("refused", "'sql' must be a non-empty string")
    size = len(sql.encode("utf-8", "surrogatepass"))
    if size > MAX_SQL_BYTES:
        raise AnalystQueryError("refused", f"the query is {size} bytes long; analyst SQL is limited to "
                                           f"{MAX_SQL_BYTES} bytes (16 KiB) of UTF-8")
    try:
        rows = client.query(
            "SELECT formatQuerySingleLine({q:String}) AS text, parseQueryToJSON(text) AS tree, "
            "formatQueryFromJSON(tree) = text AS faithful", parameters={"q": sql}).result_rows
    except ClickHouseError as exc:
        if _code_of(exc) == _UNKNOWN_FUNCTION and "parseQueryToJSON" in str(exc):
            raise AnalystQueryError("refused", "analyst SQL needs ClickHouse 26.8 or later (parseQueryToJSON); "
                                               "this server is older, so every query is refused") from None
        unserialisable = _NO_JSON.search(str(exc))
        if unserialisable:  # DESCRIBE, EXISTS, ...: statements the JSON form does not cover
            if statement := _catalog_statement(client, None, sql, database, system_catalog):
                return prepare(client, statement, database, params, system_catalog=True)
            raise AnalystQueryError("refused", str(not_a_select(_leading_keywords(client, sql)))) from None
        raise AnalystQueryError("refused", _short(str(exc))) from None
    if not rows:
        raise AnalystQueryError("refused", "the query could not be parsed")
    text, tree_json, faithful = rows[0]
    if not faithful:
        raise AnalystQueryError("refused", "the query uses syntax whose parse tree ClickHouse cannot represent "
                                           "faithfully, so it cannot be checked; rewrite it")
    try:
        tree = json.loads(tree_json)
        statement = None  # SHOW ...: answered by a SELECT over the curated catalog (ADR 51)
        if isinstance(tree, dict) and tree.get("type") != "SelectWithUnionQuery":
            statement = _catalog_statement(client, str(text), sql, database, system_catalog)
        if statement is None:
            unqualified = check(tree, database, system_catalog=system_catalog)
            check_parameters(tree, params)
            # `FROM events`: tally.events; system.<x>: the curated views (ADR 51)
            rewritten = catalog.resolve(client, tree, database, unqualified)
    except Refused as exc:
        raise AnalystQueryError("refused", str(exc)) from None
    except AnalystQueryError:
        raise
    except (ValueError, RecursionError):
        raise AnalystQueryError("refused", "the query could not be checked (nested too deeply?)") from None
    if statement is not None:
        return prepare(client, statement, database, params, system_catalog=True)
    return rewritten or str(text)


def _catalog_statement(client: Client, text: str | None, sql: str, database: str,
                       system_catalog: bool = False) -> str | None:
    """SHOW / DESCRIBE / EXISTS as the SELECT over the curated catalog that answers it (olap/catalog.py), or None
    for any other statement. `text`: ClickHouse's canonical form of `sql`, asked for here when None."""

    def catalog_columns(table: str) -> list[tuple[str, str]]:  # a CATALOG_TABLES name: the curated view's columns
        rows = client.query(f"DESCRIBE TABLE {catalog_database(database)}.{table}").result_rows
        return [(str(r[0]), str(r[1])) for r in rows]

    try:
        if text is None:
            canonical = client.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": sql})
            text = str(canonical.result_rows[0][0])
        return catalog.statement_as_select(text, database, catalog_columns if system_catalog else None)
    except Refused as exc:
        raise AnalystQueryError("refused", str(exc)) from None
    except ClickHouseError as exc:
        raise AnalystQueryError("refused", _short(str(exc))) from None


_KEYWORDS = re.compile(r"[A-Z]+(?: [A-Z]+){0,2}")


def _leading_keywords(client: Client, sql: str) -> str:
    """The statement's first keywords (SHOW CREATE DATABASE, DESCRIBE TABLE, SHOW GRANTS), for messages."""
    try:
        text = str(client.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": sql}).result_rows[0][0])
    except ClickHouseError:
        return "this statement"
    found = _KEYWORDS.match(text)
    return found.group(0) if found else "this statement"


# --- running -----------------------------------------------------------------------------------

_SESSION_VALUES: weakref.WeakKeyDictionary[Client, dict[str, str]] = weakref.WeakKeyDictionary()


def session_value(client: Client, sql: str) -> str:
    """The one value `sql` (a constant of the client's session, e.g. `SELECT timezone()`) answers, asked once per
    client and statement. Raises AnalystQueryError when ClickHouse fails."""
    known = _SESSION_VALUES.setdefault(client, {})
    if sql not in known:
        try:
            known[sql] = str(client.query(sql).result_rows[0][0])
        except ClickHouseError as exc:
            raise AnalystQueryError("failed", _short(str(exc)), _code_of(exc)) from None
    return known[sql]


def _session_readonly(client: Client) -> int:
    """The `readonly` value the client's session starts with (asked once per client)."""
    return int(session_value(client, "SELECT getSetting('readonly')"))


def _settings(client: Client, limits: SqlLimits, tag: str | None = None,
              harmless: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The query's settings: `harmless` first (olap/ch_settings.py, output format options), then the limits,
    then `readonly = 1` last, so nothing set before it can raise what follows."""
    settings: dict[str, Any] = dict(harmless or {})
    settings |= {
        "final": 1,  # ReplacingMergeTree duplicates are never visible
        "max_execution_time": limits.max_execution_s,
        "timeout_overflow_mode": "throw",
        "max_memory_usage": limits.max_memory_bytes,
        # Big GROUP BY / ORDER BY spill to disk at half the memory cap instead of failing.
        "max_bytes_before_external_group_by": limits.max_memory_bytes // 2,
        "max_bytes_before_external_sort": limits.max_memory_bytes // 2,
        "max_result_rows": limits.max_result_rows,
        "max_result_bytes": limits.max_result_bytes,
        "result_overflow_mode": "throw",
        "max_threads": limits.max_threads,
        "max_block_size": limits.max_block_rows,
        "function_range_max_elements_in_block": limits.max_range_elements,
        "allow_introspection_functions": 0,
    }
    for name in LOWERED.keys() & settings.keys() & (harmless or {}).keys():  # a client may lower these only
        settings[name] = lowered(str((harmless or {})[name]), float(settings[name]))
    if tag:
        settings["log_comment"] = tag  # how the watchdog finds the query in system.processes to kill it
    readonly = _session_readonly(client)
    if readonly == 0:
        settings["readonly"] = 1  # last: once it applies, no later setting may change anything
    elif readonly == 1:
        # Under readonly = 1 ClickHouse refuses every per-query setting, limits included.
        raise AnalystQueryError("failed", "the ClickHouse user for analyst SQL has readonly = 1, so per-query "
                                          "limits cannot be set; give it readonly = 2 with constraints "
                                          "(docs/clickhouse-analyst-user.sql)")
    return settings


def stream(client: Client, text: str, limits: SqlLimits, fmt: str, stats: QueryStats,
           tag: str | None = None, params: Mapping[str, str] | None = None) -> Iterator[bytes]:
    """Run `text` (what `prepare` returned) with its query parameters' values (what `prepare` was given),
    bound by ClickHouse, and yield it encoded as `fmt`; json is one document.

    Updates `stats` as it goes. Raises AnalystQueryError on overflow, timeout or failure, possibly
    after some chunks (never for json, which is yielded whole at the end). Nothing is yielded before
    the first rows arrive (or the query ends), so errors ClickHouse raises early come before any output.
    Closing the generator cancels the query. `tag` goes to ClickHouse as `log_comment` (see olap/watchdog.py).
    """
    result_format = FORMATS.get(fmt)
    if result_format is None:
        raise AnalystQueryError("refused", f"format must be one of {', '.join(FORMATS)}")
    if _with_totals(text):
        raise AnalystQueryError("refused", _TOTALS_REFUSED)
    settings = _settings(client, limits, tag)
    bound = _bound(text, params)
    out = _Output(limits.max_result_bytes, stats)
    try:
        zoned = (_describe(client, text, settings, bound)[1]
                 if names_a_zone(text, (params or {}).values()) and not _is_explain(text) else None)
        yield from _encode(client, text, settings, limits, result_format, out, bound, zoned)
    except ClickHouseError as exc:
        raise _classify(exc) from None
    except RecursionError:  # the driver's type parser, on a type nested a few hundred levels deep
        raise _too_deep() from None
    except FormatError as exc:
        raise AnalystQueryError("failed", str(exc)) from None
    if out.pending:
        yield out.flush()


class _Output:
    """Encoded bytes not handed out yet. Refuses to encode past `limit` bytes; `stats.bytes` counts what
    was handed out."""

    def __init__(self, limit: int, stats: QueryStats) -> None:
        self.limit = limit
        self.stats = stats
        self.pending: list[bytes] = []  # json: the document's parts; others: output not yielded yet
        self.produced = 0  # bytes encoded so far

    def emit(self, chunk: bytes) -> None:
        if self.produced + len(chunk) > self.limit:
            raise AnalystQueryError("too_large", f"the result is larger than {self.limit} bytes "
                                                 f"(max result bytes); aggregate more or add a LIMIT")
        self.produced += len(chunk)
        self.pending.append(chunk)

    def flush(self) -> bytes:
        chunk = b"".join(self.pending)
        self.pending.clear()
        self.stats.bytes += len(chunk)
        return chunk


def _encode(client: Client, text: str, settings: dict[str, Any], limits: SqlLimits, result_format: ResultFormat,
            out: _Output, bound: dict[str, Any] | None = None, zoned: list[str] | None = None) -> Iterator[bytes]:
    """The query's blocks through the format's encoder into `out`; a streamed format yields per block.
    `zoned`: the result's types as DESCRIBE gives them, with the zones chDB's Native output drops (or None)."""
    encoder = result_format.encoder()
    deadline = time.monotonic() + float(limits.max_execution_s) + 1.0
    started = False
    with _row_blocks(client, text, settings, bound) as (names, types, blocks):
        _check_nesting(types)
        types, zones = _zones(types, zoned)
        for block in blocks:
            if not started:
                out.emit(encoder.start(names, types))
                started = True
            out.stats.rows += len(block)
            if out.stats.rows > limits.max_result_rows:
                raise AnalystQueryError("too_large", f"the result has more than {limits.max_result_rows} rows "
                                                     f"(max rows: {limits.max_result_rows}); aggregate more or "
                                                     f"add a LIMIT")
            out.emit(encoder.rows(_in_zones(block, zones) if zones else block))
            if time.monotonic() > deadline:
                raise AnalystQueryError("timeout", f"the query ran longer than {limits.max_execution_s} s "
                                                   f"(max execution time)")
            if result_format.streamed:
                yield out.flush()
    if not started:
        if not names:  # chDB sends no header block for an empty result; a server does
            names, types = _describe(client, text, settings, bound)
        out.emit(encoder.start(names, types))
    out.emit(encoder.end())


def _zones(types: list[str], zoned: list[str] | None) -> tuple[list[str], dict[int, str]]:
    """The result's types with their zones back (from `zoned`, DESCRIBE's types) and the columns whose values
    need their zone: those that came as a plain DateTime although DESCRIBE names a zone (formats.loses_zones)."""
    if zoned is None or len(zoned) != len(types) or not loses_zones(types):
        return types, {}
    zones = {i: zone for i, (got, real) in enumerate(zip(types, zoned, strict=True))
             if loses_zones([got]) and (zone := type_zone(real)) is not None}
    return (zoned if zones else types), zones


def _in_zones(block: Sequence[Sequence[Any]], zones: Mapping[int, str]) -> list[list[Any]]:
    return [[in_zone(v, zones[i]) if i in zones else v for i, v in enumerate(row)] for row in block]


# WITH TOTALS outside quotes of the canonical text (formatQuerySingleLine writes it so; comments are gone).
_QUOTED_PARTS = re.compile(r"'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`|\"(?:[^\"\\]|\\.)*\"")
_TOTALS = re.compile(r"\bWITH TOTALS\b")
_TOTALS_REFUSED = ("WITH TOTALS is not available in tally's json, jsonl, csv and tsv results: the driver's block "
                   "stream does not carry the totals row, and it would be lost silently. Use GROUP BY ... WITH "
                   "ROLLUP (the totals come as an ordinary row, keys at their default values), or ask the "
                   "ClickHouse-compatible endpoint (TALLY_CLICKHOUSE_HTTP_PORT), whose FORMAT JSON has \"totals\" "
                   "and whose CSV and TabSeparated write the totals row after an empty line")


def _with_totals(text: str) -> bool:
    """Whether the canonical text asks for WITH TOTALS anywhere (a subquery's totals reach the result too)."""
    return bool(_TOTALS.search(_QUOTED_PARTS.sub("''", text)))


def _is_explain(text: str) -> bool:
    return text.startswith("EXPLAIN ")  # `prepare`'s canonical text: the statement's keyword comes first


@contextmanager
def _row_blocks(client: Client, text: str, settings: dict[str, Any],
                bound: dict[str, Any] | None) -> Iterator[tuple[list[str], list[str], Iterable[Sequence[Any]]]]:
    """The query's column names, types and blocks of rows. An EXPLAIN (ADR 51) is read whole, as one block:
    chDB cannot stream it ("Streaming query is not supported"), and its answer is a page of text."""
    if _is_explain(text):
        result = client.query(text, parameters=bound, settings=settings)
        yield list(result.column_names), [t.name for t in result.column_types], [result.result_rows]
        return
    with client.query_row_block_stream(text, parameters=bound, settings=settings) as blocks:
        yield list(blocks.source.column_names), [t.name for t in blocks.source.column_types], blocks


class _ClickHouseText:
    """A query parameter's value for clickhouse-connect, sent as the text it is: the driver escapes a `str` for
    ClickHouse (`a\\tb` would arrive as a backslash and a t, `['a','b']` with its quotes escaped, no longer an
    array) and sends other objects as `str(value)`, which is ClickHouse's own `param_<name>` text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


# A `{name:Type}` placeholder as clickhouse-connect finds them: with none in the text, it would format the values
# into the text itself (`%(name)s`) instead of sending them for ClickHouse to bind.
_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*:[^}]+\}")


def _bound(text: str, params: Mapping[str, str] | None) -> dict[str, Any] | None:
    """The parameters for clickhouse-connect's server-side binding, or None without any."""
    if not params:
        return None
    if not _PLACEHOLDER.search(text):  # prepare refuses values the query does not use: this cannot happen
        raise AnalystQueryError("refused", "query parameters were sent for a query that has no {name:Type}")
    return {name: _ClickHouseText(value) for name, value in params.items()}


def _too_deep() -> AnalystQueryError:
    return AnalystQueryError("refused", f"the result's type is nested more than {MAX_RESULT_NESTING} levels deep "
                                        "(arrays, tuples or maps inside each other); flatten it, e.g. with "
                                        "arrayFlatten or toString")


def _check_nesting(types: Sequence[str]) -> None:
    for name in types:
        if _nesting(name) > MAX_RESULT_NESTING:
            raise _too_deep()


def _nesting(type_name: str) -> int:
    """How deep the parentheses of a type name go. Parentheses inside quotes do not count: Enum labels
    ('...') and tuple element names (`...` or "..."), with backslash escapes; a doubled quote closes and
    reopens, which comes to the same."""
    depth = deepest = 0
    quote: str | None = None
    escaped = False
    for char in type_name:
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "'`\"":
            quote = char
        else:
            depth += (char == "(") - (char == ")")
            deepest = max(deepest, depth)
    return deepest


def _describe(client: Client, text: str, settings: dict[str, Any],
              bound: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """Column names and types of a query that returned no rows (chDB sends no header block then)."""
    rows = client.query(f"DESCRIBE TABLE ({text})", parameters=bound, settings=settings).result_rows
    return [str(r[0]) for r in rows], [str(r[1]) for r in rows]


def run_query(client: Client, sql: Any, limits: SqlLimits, database: str = "tally",
              params: Mapping[str, str] | None = None) -> QueryResult:
    """prepare + run, as columns/types/rows (the json format's values), for the JSON path and tests."""
    text = prepare(client, sql, database, params)
    document = orjson.loads(b"".join(stream(client, text, limits, "json", QueryStats(), params=params)))
    return QueryResult(columns=document["columns"], types=document["types"], rows=document["rows"])


def _code_of(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    match = re.search(r"Code: (\d+)", str(exc))
    return int(match.group(1)) if match else None


def _classify(exc: ClickHouseError) -> AnalystQueryError:
    code, message = _code_of(exc), _short(str(exc))
    if code in _TIMEOUT_CODES:
        return AnalystQueryError("timeout", message, code)
    if code in _TOO_LARGE_CODES:
        return AnalystQueryError("too_large", message, code)
    if code in _REFUSED_CODES or _BAD_PARAMETER.search(message):
        return AnalystQueryError("refused", message, code)
    return AnalystQueryError("failed", message, code)


def _short(message: str) -> str:
    # ClickHouse messages repeat the query ("In scope ...") and a long hint list; keep the useful head.
    message = message.replace("\n", " ").strip()
    for cut in (". In scope ", ": In scope "):
        head, sep, _ = message.partition(cut)
        if sep:
            message = head.rstrip(" .:") + "."
    return message[:600]


_HINT = re.compile(r"\s*Maybe you meant:?\s*(\[[^\]]*\]|\S+?)\s*[.?]?(?=\s|$)")


def public_message(message: str, database: str) -> str:
    """A ClickHouse message as analysts may see it: "Maybe you meant ..." hints are kept only when every
    name they suggest is one analysts may use (an analyst table or its columns, an allowed function);
    otherwise the hint is dropped, so it cannot name other tables (`tally.consumer_offsets`) or functions."""
    table = function_table()
    tables = set(ANALYST_TABLES) | {f"{database}.{t}" for t in ANALYST_TABLES}

    def safe(name: str) -> bool:
        return name in tables or name in EVENT_COLUMNS or table.allows(name)

    def keep_or_drop(match: re.Match[str]) -> str:
        names = [n.strip().strip("'`\"") for n in match.group(1).strip("[]").split(",")]
        return match.group(0) if names and all(n and safe(n) for n in names) else ""

    return _HINT.sub(keep_or_drop, message)


