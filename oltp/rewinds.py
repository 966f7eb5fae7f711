"""Rewind requests in PostgreSQL: how `tally replay` asks running consumer groups to re-read the topic.

The consumer groups keep their offsets in their own stores (ADR 5) and their positions in memory,
so `tally replay` cannot move them itself. It writes one row per (group, partition) here; every
worker of the group checks this table every few seconds (workers/rewind.py), applies the rows of
the partitions it holds (store the lower offset, seek) and marks them done with an outcome. Both
groups reach PostgreSQL (the loader through the analyst server's settings), the embedded stack
and production alike (ADR 23).

A row also keeps `reread_until`, the group's position when the rewind was applied: records below
it were processed before, which is what the rollup group's guard needs to know after a restart.

Every function opens its own short connection (or takes one) and raises psycopg errors as they are.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from oltp.schema import ensure_schema

_migrated: set[str] = set()  # DSNs this process brought to the newest schema revision


def _ensure_migrated(dsn: str) -> None:
    """The table is migration 0005's (oltp/migrations): bring the database to the newest revision once per
    DSN in this process, so `tally replay` and a worker that starts before any other still find it."""
    if dsn in _migrated:
        return
    ensure_schema(dsn)
    _migrated.add(dsn)


@dataclass(frozen=True, slots=True)
class RewindRow:
    id: int
    request_id: str
    partition: int
    next_offset: int
    topic_id: str


def request(dsn: str, groups: list[str], topic: str, topic_id: str, offsets: dict[int, int]) -> str:
    """Record one rewind request for `groups` (one row per group and partition), in one transaction.

    Returns the request id. Durable when it returns; the workers pick it up on their next check.
    """
    _ensure_migrated(dsn)
    request_id = str(uuid.uuid4())
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO consumer_rewinds (request_id, consumer_group, topic, topic_id, partition, next_offset)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [(request_id, g, topic, topic_id, p, o) for g in groups for p, o in sorted(offsets.items())])
    return request_id


@dataclass(frozen=True, slots=True)
class RowStatus:
    group: str
    partition: int
    next_offset: int
    outcome: str | None  # None while pending
    done_at: datetime | None


def status(dsn: str, request_id: str) -> list[RowStatus]:
    """Every row of one request, pending ones with outcome None."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT consumer_group, partition, next_offset, outcome, done_at FROM consumer_rewinds"
            " WHERE request_id = %s ORDER BY consumer_group, partition", (request_id,)).fetchall()
    return [RowStatus(*r) for r in rows]


def cancel_pending(dsn: str, request_id: str, reason: str) -> int:
    """Mark the rows of a request that no worker applied yet as cancelled; returns how many.

    A worker applying a row at this very moment may still apply it (its acknowledgement then finds
    the row done): a rewind is harmless to apply, the stores count each event once.
    """
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        with conn.transaction():
            cur = conn.execute("UPDATE consumer_rewinds SET done_at = now(), outcome = %s"
                               " WHERE request_id = %s AND done_at IS NULL", (f"cancelled: {reason}"[:500], request_id))
            return cur.rowcount


class PostgresRewinds:
    """What a worker of one group reads and writes here (workers/rewind.py's `RewindRequests`)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            _ensure_migrated(self.dsn)
            self._conn = psycopg.connect(self.dsn, connect_timeout=5, autocommit=True)
        return self._conn

    def pending(self, group: str, topic: str) -> list[RewindRow]:
        """Rows of `group` on `topic` no worker has applied yet, oldest first."""
        rows = self._run("SELECT id, request_id::text, partition, next_offset, topic_id FROM consumer_rewinds"
                         " WHERE consumer_group = %s AND topic = %s AND done_at IS NULL ORDER BY id",
                         (group, topic))
        return [RewindRow(*r) for r in rows]

    def reread_marks(self, group: str, topic: str, topic_id: str) -> dict[int, tuple[int, int]]:
        """partition -> (highest `reread_until`, newest row id) over rewinds of this incarnation."""
        rows = self._run("SELECT partition, max(reread_until), max(id) FROM consumer_rewinds"
                         " WHERE consumer_group = %s AND topic = %s AND topic_id IN (%s, '')"
                         " AND reread_until IS NOT NULL GROUP BY partition", (group, topic, topic_id))
        return {int(p): (int(until), int(i)) for p, until, i in rows}

    def mark_rereading(self, rows: list[RewindRow], reread_until: dict[int, int]) -> None:
        """Before the lower offsets are stored: remember where each row's re-read span ends (durable on return)."""
        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany("UPDATE consumer_rewinds SET reread_until = GREATEST(COALESCE(reread_until, 0), %s)"
                                " WHERE id = %s", [(reread_until[r.partition], r.id) for r in rows])
        except psycopg.OperationalError:
            self.close()
            raise

    def acknowledge(self, ids: list[int], outcome: str) -> None:
        """Mark rows done with `outcome` (rows already done, e.g. cancelled, keep theirs)."""
        if ids:
            self._run("UPDATE consumer_rewinds SET done_at = now(), outcome = %s WHERE id = ANY(%s)"
                      " AND done_at IS NULL", (outcome[:500], ids), fetch=False)

    def _run(self, sql: str, params: tuple[Any, ...], *, fetch: bool = True) -> list[tuple[Any, ...]]:
        try:
            cur = self._connection().execute(sql, params)
            return cur.fetchall() if fetch else []
        except psycopg.OperationalError:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
