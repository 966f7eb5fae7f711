"""Analyst SQL: read-only ClickHouse queries with time, memory and result-size limits.

Queries run with `readonly = 1` (no writes, no DDL, no changing settings from
inside the query) and `final = 1`, so ReplacingMergeTree duplicates are never
visible and analysts need not remember FINAL.
"""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import uuid
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

MAX_SQL_CHARS = 100_000


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
    text = sql.strip().rstrip(";").strip()
    settings = {
        "readonly": 1,
        "final": 1,
        "max_execution_time": limits.max_execution_s,
        "max_memory_usage": limits.max_memory_bytes,
        "max_result_rows": limits.max_result_rows,
        "result_overflow_mode": "throw",
    }
    try:
        result = client.query(text, settings=settings)
    except ClickHouseError as exc:
        raise AnalystQueryError(_short(str(exc))) from None
    return QueryResult(columns=list(result.column_names),
                       types=[t.name for t in result.column_types],
                       rows=[[_jsonable(v) for v in row] for row in result.result_rows])


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
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
