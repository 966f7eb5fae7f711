"""Rebuild: recompute the PostgreSQL rollups of a range from ClickHouse's raw events, while ingestion runs (ADR 20).

`rebuild(conn, source, lo, hi, groups)` works chunk by chunk (a UTC day by default); each chunk is ONE
PostgreSQL transaction:

1. (before the transaction, no lock) wait until the loader's offsets in ClickHouse reach the rollup
   worker's, so the lock below is held briefly;
2. `LOCK TABLE rollup_15m IN SHARE ROW EXCLUSIVE MODE`: the rollup sink's next batch waits (its one
   statement locks rollup_15m before it inserts any `seen_events` row, so the two cannot deadlock),
   two rebuilds exclude each other, readers go on; check that the loader has reached the rollup
   worker's (now frozen) offsets: ClickHouse then holds every event PostgreSQL counted;
3. fetch the chunk's events from `tally.events FINAL` (source.events), stage them, and insert their
   hashes into `seen_events`: when the rollup worker reaches one of them later, it will not count it
   again (and events ClickHouse does not have yet are not in the new rollups, so the worker counts
   them when it gets to them: nothing twice, nothing missed);
4. delete the chunk's `rollup_15m` rows (of one domain with `domain`) and insert them again from the
   staged events; then `oltp.tiers.rederive` recomputes the coarser tiers for the chunk, and
   `oltp.rebuild_dims.rebuild_dimensions` the rollups by dimension, the cube, the value bins and the
   admitted values of the cap from ClickHouse's events (ADR 46); commit.

Contract: when `rebuild_chunk` returns, the chunk's rollups equal ClickHouse's events for it, committed
atomically; if it raises, the chunk is as it was. Idempotent: a second run writes the same rows.
Raises reconcile.NotSettled (the loader is behind or stopped), the source's errors, psycopg errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import psycopg.errors

from oltp.partitions import ensure_partitions
from oltp.rebuild_dims import rebuild_dimensions
from oltp.reconcile import (
    Groups,
    NotSettled,
    Source,
    rollup_offsets,
    stage_ch_events,
    wait_for_loader,
)
from oltp.tiers import ensure_tier_partitions, rederive
from oltp.visitors import rebuild_visitors

DAY = timedelta(days=1)

_INSERT_SEEN = """
INSERT INTO seen_events (hash, ts) SELECT DISTINCT ON (hash) hash, ts FROM rebuild_events WHERE ts >= %s
ORDER BY hash ON CONFLICT DO NOTHING
"""

_DELETE = """
DELETE FROM rollup_15m WHERE bucket_start >= %s AND bucket_start < %s AND (%s::text IS NULL OR domain = %s)
"""

_INSERT_ROLLUPS = """
INSERT INTO rollup_15m (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
SELECT domain, event_type, date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
       count(*), count(value), sum(value), min(value), max(value)
FROM rebuild_events GROUP BY 1, 2, 3
"""


@dataclass(frozen=True, slots=True)
class ChunkResult:
    lo: datetime
    hi: datetime
    events: int     # events in ClickHouse for the chunk
    rows: int       # rollup_15m rows written
    deleted: int    # rollup_15m rows removed first
    tiers: bool     # whether the coarser tiers were re-derived (always, since oltp.tiers exists)
    dimensions: int = 0  # non-bot events the rollups by dimension were recomputed from (hour/day-widened chunk)


def chunks(lo: datetime, hi: datetime, size: timedelta = DAY) -> Iterator[tuple[datetime, datetime]]:
    """[lo, hi) cut at multiples of `size` since the epoch (UTC days by default)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    start = lo
    while start < hi:
        end = min(hi, epoch + ((start - epoch) // size + 1) * size)
        yield start, end
        start = end


def _ensure_partitions(conn: psycopg.Connection, lo: datetime, hi: datetime, dedup_from: datetime) -> None:
    """Create, before the chunk's transaction, every partition it may write to (rollup_15m, seen_events and the
    coarser tiers, with margins for local days), if the tables are partitioned: DDL inside the locked
    transaction could wait on a sink batch that waits on us."""
    last = hi - timedelta(microseconds=1)
    ensure_partitions(conn, "rollup_15m", lo, last)
    if last >= dedup_from:
        ensure_partitions(conn, "seen_events", max(lo, dedup_from), last)
    ensure_tier_partitions(conn, lo - timedelta(hours=1), hi + timedelta(hours=1),
                           lo - timedelta(days=2), hi + timedelta(days=2))
    conn.commit()


_RETRIED = (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable)


def rebuild_chunk(conn: psycopg.Connection, source: Source, lo: datetime, hi: datetime, groups: Groups, *,
                  domain: str | None = None, wait_s: float = 60.0, dedup_days: float = 9.0,
                  attempts: int = 3, dimension_cap: int = 1000) -> ChunkResult:
    """Rebuild one chunk (see the module docstring). Leaves no transaction open.

    A deadlock with a sink batch (possible when the batch notes a domain's zone for the daily tier first)
    or a lock wait over 30 s rolls the chunk back; it is tried again, `attempts` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return _rebuild_chunk_once(conn, source, lo, hi, groups, domain=domain, wait_s=wait_s,
                                       dedup_days=dedup_days, cap=dimension_cap)
        except _RETRIED:
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _rebuild_chunk_once(conn: psycopg.Connection, source: Source, lo: datetime, hi: datetime, groups: Groups, *,
                        domain: str | None, wait_s: float, dedup_days: float, cap: int) -> ChunkResult:
    dedup_from = datetime.now(UTC) - timedelta(days=dedup_days)
    _ensure_partitions(conn, lo, hi, dedup_from)
    target = rollup_offsets(conn, groups.rollup, groups.topic)
    conn.commit()
    if not wait_for_loader(source, target, group=groups.loader, topic=groups.topic, wait_s=wait_s):
        raise NotSettled(f"the loader (group {groups.loader}) has not reached the rollup worker's offsets in "
                         f"{wait_s:g} s; is it running? Nothing was changed for {lo.isoformat()}")
    with conn.transaction():
        conn.execute("SET LOCAL lock_timeout = '30s'")
        conn.execute("LOCK TABLE rollup_15m IN SHARE ROW EXCLUSIVE MODE")
        frozen = rollup_offsets(conn, groups.rollup, groups.topic)
        if not wait_for_loader(source, frozen, group=groups.loader, topic=groups.topic, wait_s=min(wait_s, 10.0)):
            raise NotSettled(f"the loader (group {groups.loader}) did not reach the rollup worker's offsets; "
                             f"nothing was changed for {lo.isoformat()}")
        rows = source.events(lo, hi, domain)
        stage_ch_events(conn, "rebuild_events", rows)
        conn.execute(_INSERT_SEEN, (dedup_from,))
        deleted = conn.execute(_DELETE, (lo, hi, domain, domain)).rowcount
        written = conn.execute(_INSERT_ROLLUPS).rowcount
        rederive(conn, lo, hi, domain=domain)  # 1h and 1d from 15m, in this transaction
        # the rollups by dimension and the cap's admitted values (ADR 46), before the sketches keyed by them
        dims = rebuild_dimensions(conn, source, lo, hi, domain=domain, dedup_from=dedup_from, cap=cap)
        rebuild_visitors(conn, source, lo, hi, domain, cap=cap)  # the visitor sketches, from ClickHouse (ADR 47)
    return ChunkResult(lo, hi, len(rows), written, deleted, True, dims)


def rebuild(conn: psycopg.Connection, source: Source, lo: datetime, hi: datetime, groups: Groups, *,
            domain: str | None = None, chunk: timedelta = DAY, wait_s: float = 60.0, dedup_days: float = 9.0,
            progress: Callable[[ChunkResult], None] | None = None, dimension_cap: int = 1000) -> list[ChunkResult]:
    """Rebuild [lo, hi) chunk by chunk, oldest first; `progress` is called after each committed chunk.

    A failure stops at that chunk: the chunks before it are rebuilt (committed), it and the later ones are
    unchanged; running the same command again is safe."""
    done = []
    for a, b in chunks(lo, hi, chunk):
        result = rebuild_chunk(conn, source, a, b, groups, domain=domain, wait_s=wait_s, dedup_days=dedup_days,
                               dimension_cap=dimension_cap)
        done.append(result)
        if progress is not None:
            progress(result)
    return done
