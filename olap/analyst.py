"""Analyst SQL: read-only ClickHouse queries with time, memory and result-size limits.

Four layers keep analysts read-only:

0. One statement only: chDB executes `;`-separated statements one after the
   other (a SETTINGS clause would only cover the last). The text is handed to
   ClickHouse's own parser as a bound string (`formatQuery`, which executes
   nothing and refuses multi-statements), and only its canonical single
   statement is ever run.

1. ClickHouse's own parser (`EXPLAIN AST`, which executes nothing) must say the
   statement is a SELECT. This is not optional hardening: in chDB a non-SELECT
   statement carrying a SETTINGS clause leaves those settings on the shared
   session (seen with chDB 4.4 / clickhouse-connect 1.12), so a refused
   `DROP TABLE` would otherwise leave the loader's session read-only.
2. No `INTO OUTFILE`: chDB writes the file even under `readonly = 1`, i.e.
   anything the process may write (found in review). Refused on the
   canonical text, conservatively: a string literal saying it is refused too.
3. The SELECT runs with `readonly = 1` (no writes, no table functions, no
   changing settings from inside the query), time, memory and row limits, and
   `final = 1`, so ReplacingMergeTree duplicates are never visible and analysts
   need not remember FINAL.
"""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import re
import uuid
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

MAX_SQL_CHARS = 100_000
_SELECT_ROOTS = ("SelectWithUnionQuery", "SelectIntersectExceptQuery")
_INTO_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)
_INT64_RANGE = range(-(2**63), 2**63)


class AnalystQueryError(ValueError):
    """The query was refused or failed; the message is ClickHouse's (or ours)."""


@dataclass(frozen=True, slots=True)
class SqlLimits:
    max_execution_s: int
    max_memory_bytes: int
    max_result_rows: int


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]


def run_query(client: Client, sql: Any, limits: SqlLimits) -> QueryResult:
    if not isinstance(sql, str) or not sql.strip():
        raise AnalystQueryError("'sql' must be a non-empty string")
    if len(sql) > MAX_SQL_CHARS:
        raise AnalystQueryError(f"the query is longer than {MAX_SQL_CHARS} characters")
    text = single_statement(client, sql)
    kind = statement_kind(client, text)
    if kind not in _SELECT_ROOTS:
        raise AnalystQueryError(f"only SELECT queries are allowed (this is a {kind}); analyst SQL is readonly")
    if _INTO_OUTFILE.search(text):
        raise AnalystQueryError("INTO OUTFILE is not allowed: analyst SQL returns rows, it writes no files")
    settings = {
        "final": 1,
        "max_execution_time": limits.max_execution_s,
        "max_memory_usage": limits.max_memory_bytes,
        "max_result_rows": limits.max_result_rows,
        "result_overflow_mode": "throw",
        "readonly": 1,  # last: once it applies, no later setting in the clause may change
    }
    try:
        result = client.query(text, settings=settings)
    except ClickHouseError as exc:
        raise AnalystQueryError(_short(str(exc))) from None
    return QueryResult(columns=list(result.column_names),
                       types=[t.name for t in result.column_types],
                       rows=[[_jsonable(v) for v in row] for row in result.result_rows])


def _first_cell(client: Client, query: str, parameters: dict[str, str] | None = None) -> str:
    try:
        rows = client.query(query, parameters=parameters).result_rows
    except ClickHouseError as exc:
        raise AnalystQueryError(_short(str(exc))) from None
    if not rows:
        raise AnalystQueryError("the query could not be parsed")
    return str(rows[0][0])


def single_statement(client: Client, sql: str) -> str:
    """ClickHouse's canonical form of `sql` if it is exactly one statement (parsing only)."""
    return _first_cell(client, "SELECT formatQuery({q:String})", {"q": sql})


def statement_kind(client: Client, text: str) -> str:
    """The root AST node ClickHouse parses `text` into (parsing only; nothing is executed)."""
    return _first_cell(client, f"EXPLAIN AST {text}").split()[0]


def _short(message: str) -> str:
    # ClickHouse messages repeat the query and a long hint list; keep the useful head.
    message = message.replace("\n", " ").strip()
    return message[:600]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (uuid.UUID, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64_RANGE:
        return str(value)  # (U)Int128/256: JSON readers lose precision past 64 bits
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
