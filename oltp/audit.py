"""The analyst-SQL audit log: one row per query in `analyst_queries` (schema in oltp/schema.py, AUDIT).

`record` takes a psycopg Connection, a psycopg_pool ConnectionPool or a DSN, and the entry either
as an object with the fields as attributes (the analyst server's AuditEntry), a mapping, or
keywords. `last(dsn, n)` returns the newest n, newest first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from oltp.rows import one

STATUSES = ("ok", "refused", "failed", "timeout", "too_large", "busy", "cancelled")
FIELDS = ("token_id", "started_at", "sql", "format", "status", "rows", "bytes", "duration_ms", "error", "client",
          "query_id")
MAX_SQL_CHARS = 100_000
# A query the API tier refused before it reached the analyst server is kept up to the longest query analysts may
# send at all (16 KiB, olap/analyst.py MAX_SQL_BYTES): a refused request must not store more than a real one
# (a 1 MiB body refused for its settings would write 100,000 characters a request).
MAX_REFUSED_SQL_CHARS = 16 * 1024
MAX_ERROR_CHARS = 2_000
MAX_CLIENT_CHARS = 200  # the User-Agent is cut to this
MAX_QUERY_ID_CHARS = 100

Target = str | psycopg.Connection | ConnectionPool
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    token_id: str | None
    started_at: datetime
    sql: str
    format: str
    status: str
    rows: int
    bytes: int
    duration_ms: int
    error: str | None
    client: str | None = None  # the request's User-Agent
    query_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "token_id": self.token_id,
                "started_at": self.started_at.astimezone(UTC).isoformat(), "sql": self.sql,
                "format": self.format, "status": self.status, "rows": self.rows, "bytes": self.bytes,
                "duration_ms": self.duration_ms, "error": self.error, "client": self.client,
                "query_id": self.query_id}


@contextmanager
def _connection(target: Target) -> Iterator[psycopg.Connection]:
    if isinstance(target, ConnectionPool):
        with target.connection() as conn:
            yield conn
    elif isinstance(target, psycopg.Connection):
        yield target
    else:
        with psycopg.connect(target, connect_timeout=5) as conn:
            yield conn


def _fields(entry: object | None, values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FIELDS:
        if name in values:
            out[name] = values[name]
        elif isinstance(entry, Mapping) and name in entry:
            out[name] = entry[name]
        elif entry is not None and not isinstance(entry, Mapping) and hasattr(entry, name):
            out[name] = getattr(entry, name)
    missing = [n for n in ("sql", "format", "status") if out.get(n) is None]
    if missing:
        raise ValueError(f"audit record needs {', '.join(missing)}")
    if out["status"] not in STATUSES:
        raise ValueError(f"audit status must be one of {', '.join(STATUSES)}, not {out['status']!r}")
    out.setdefault("token_id", None)
    out["started_at"] = out.get("started_at") or datetime.now(UTC)
    out["sql"] = str(out["sql"])[:MAX_SQL_CHARS]
    out["rows"] = max(0, int(out.get("rows") or 0))
    out["bytes"] = max(0, int(out.get("bytes") or 0))
    out["duration_ms"] = max(0, round(float(out.get("duration_ms") or 0)))
    error = out.get("error")
    out["error"] = None if error is None else str(error)[:MAX_ERROR_CHARS]
    for name, limit in (("client", MAX_CLIENT_CHARS), ("query_id", MAX_QUERY_ID_CHARS)):
        value = out.get(name)
        out[name] = None if value is None else str(value)[:limit]
    return out


def record(target: Target, entry: object | None = None, /, **values: Any) -> int:
    """Store one analyst query; returns its id."""
    row = _fields(entry, values)
    with _connection(target) as conn:
        with conn.transaction():
            cur = conn.execute(
                "INSERT INTO analyst_queries (token_id, started_at, sql, format, status, rows, bytes, duration_ms,"
                " error, client, query_id) VALUES (%(token_id)s, %(started_at)s, %(sql)s, %(format)s, %(status)s,"
                " %(rows)s, %(bytes)s, %(duration_ms)s, %(error)s, %(client)s, %(query_id)s) RETURNING id", row)
            return int(one(cur)[0])


def record_refusal(target: Target, *, sql: str, format: str, error: str, token_id: str | None = None,
                   client: str | None = None, query_id: str | None = None) -> int | None:
    """Store a query the API tier refused itself, before the analyst server (which audits the rest) was asked:
    status `refused`, no rows. Never raises: a refusal is answered even when PostgreSQL is down (logged).
    Callers pass the query text and the client's words only, never a token or a password."""
    def text(value: str | None) -> str | None:  # PostgreSQL text holds no NUL
        return None if value is None else value.replace("\x00", "\\0")

    try:
        return record(target, token_id=token_id, sql=text(sql[:MAX_REFUSED_SQL_CHARS]),
                      format=text(format[:40]) or "-", status="refused",
                      rows=0, bytes=0, duration_ms=0, error=text(error), client=text(client), query_id=query_id)
    except (psycopg.Error, OSError, ValueError):
        log.exception("audit: could not store a refused analyst query")
        return None


def last(target: Target, n: int = 20) -> list[AuditRecord]:
    """The newest `n` records, newest first."""
    if n < 1:
        raise ValueError("n must be at least 1")
    with _connection(target) as conn:
        rows = conn.execute(
            "SELECT id, token_id, started_at, sql, format, status, rows, bytes, duration_ms, error, client, query_id"
            " FROM analyst_queries ORDER BY started_at DESC, id DESC LIMIT %s", (n,)).fetchall()
    return [AuditRecord(*row) for row in rows]
