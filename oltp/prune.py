"""Retention of the ingestion status tables (ingestion_15m, collector_refusals; ADR 18 and migration 0006).

They hold one row per domain and quarter hour of arrival (and refusal reason), the shape of rollup_15m,
and are kept as long as it is (TALLY_RETENTION_15M_DAYS; 0 = forever): a customer's ingestion status
never reaches further back than the 15-minute tier it explains. They are a few bytes per row next to
the rollups, so expired rows are deleted by time (an index on bucket_start finds them) instead of
living in time partitions. `rejected_records` is capped by row count where it is written
(oltp/rollup_sink.py) and `analyst_queries` is an audit log, kept.

`prune_sessions` deletes dashboard sessions (api/session.py, migration 0007) that expired or whose
token was revoked; the same retention pass runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from oltp.rows import one

STATUS_TABLES = ("ingestion_15m", "collector_refusals")
BATCH_ROWS = 50_000  # rows deleted per transaction: short locks, bounded WAL per commit


@dataclass(frozen=True, slots=True)
class StatusRetention:
    table: str
    keep_days: int  # 0 = kept forever
    cutoff: datetime | None  # rows with bucket_start before it expire; None when kept forever
    expired_rows: int  # found (dry run) or deleted


def prune_status(conn: psycopg.Connection, keep_days: int, now: datetime, *,
                 dry_run: bool = False) -> list[StatusRetention]:
    """Delete (or with `dry_run` count) the status rows whose quarter hour started before
    `now - keep_days`, in transactions of at most BATCH_ROWS rows; committed when it returns. `conn`
    must not be inside a transaction (ValueError). A failure leaves the earlier batches deleted.
    Unless `dry_run`, it first deletes ended dashboard sessions (`prune_sessions`), whatever `keep_days`."""
    if keep_days < 0:
        raise ValueError("keep_days must be >= 0")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("prune_status needs a connection outside any transaction")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not dry_run:
        prune_sessions(conn, now)
    if keep_days == 0:
        return [StatusRetention(t, 0, None, 0) for t in STATUS_TABLES]
    cutoff = now - timedelta(days=keep_days)
    results = []
    for table in STATUS_TABLES:  # names from the constant above, never from input
        if dry_run:
            with conn.transaction():
                n = one(conn.execute(f"SELECT count(*) FROM {table} WHERE bucket_start < %s", (cutoff,)))[0]
        else:
            n = 0
            while True:
                with conn.transaction():
                    deleted = conn.execute(
                        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
                        f"SELECT ctid FROM {table} WHERE bucket_start < %s LIMIT %s))", (cutoff, BATCH_ROWS)).rowcount
                n += deleted
                if deleted < BATCH_ROWS:
                    break
        results.append(StatusRetention(table, keep_days, cutoff, n))
    return results


def prune_sessions(conn: psycopg.Connection, now: datetime) -> int:
    """Delete the dashboard sessions that expired before `now` or belong to a revoked token (such a session
    is refused anyway: this only frees the rows). Returns how many; committed when it returns."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    with conn.transaction():
        return conn.execute(
            "DELETE FROM dashboard_sessions s WHERE s.expires_at <= %s"
            " OR EXISTS (SELECT 1 FROM api_tokens t WHERE t.id = s.token_id AND t.revoked_at IS NOT NULL)",
            (now,)).rowcount
