"""Reconcile: do the PostgreSQL 15-minute rollups agree with ClickHouse's deduplicated raw events? (ADR 20)

`reconcile(conn, source, lo, hi, ...)` compares, per (domain, event type, UTC quarter hour) with
lo <= bucket_start < hi, the rollup row (events, valued, value_sum, value_min, value_max) with the same
figures computed from `tally.events FINAL` by `source` (olap/aggregates.py: ClickHouseAggregates or
RemoteAggregates; any object with `aggregates`, `events` and `loader_offsets`).

The two stores are written by two consumer groups that are never exactly at the same offsets, and
late events (a `ts` up to 7 days old) keep arriving in old buckets. So a plain comparison (pass 1,
no lock) may show differences that are only events in flight. Every key that differs in pass 1 is
checked again exactly (pass 2, `_exact`):

1. wait (no lock) until the loader's offsets in ClickHouse reach the rollup worker's in PostgreSQL;
2. in one PostgreSQL transaction, `LOCK TABLE rollup_15m IN SHARE MODE`: the rollup sink's next
   batch waits, so rollups, `seen_events` and the rollup offsets stand still; check again that the
   loader has reached those offsets (a short wait), so ClickHouse holds every event PostgreSQL counted;
3. fetch those keys' events from ClickHouse and aggregate in PostgreSQL only the ones PostgreSQL has
   seen (`seen_events`), plus those ClickHouse received more than `settle_s` before that never reached
   PostgreSQL: what remains different is a real difference, not an event in flight.

Then the rollups by dimension (rollup_dim_15m) are compared with ClickHouse's non-bot events grouped by
dimension value, on a sample of the domains and quarter hours that agree (oltp/reconcile_dims.py, ADR 46).

Keys whose bucket is older than the dedup window (`seen_events` is pruned) keep their pass-1 result:
no event that old can still be in flight. Contract: reads only; the lock is held for one ClickHouse
query; raises `NotSettled` when the loader does not reach the rollup worker's offsets in `wait_s`,
and the source's errors (olap.aggregates.AggregatesError) or psycopg errors when a store fails.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import psycopg

from core.batch import same_incarnation
from oltp.reconcile_dims import compare_dimensions
from oltp.rows import one

QUARTER = timedelta(minutes=15)
FIELDS = ("events", "valued", "value_sum", "value_min", "value_max")
MAX_EXACT_KEYS = 5000  # pass 2 names its keys to ClickHouse; beyond this it asks for the whole range

Key = tuple[str, str, datetime]  # (domain, event type, bucket start UTC)

class Source(Protocol):
    def aggregates(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[tuple[Any, ...]]: ...
    def events(self, lo: datetime, hi: datetime, domain: str | None = None,
               keys: Any = None) -> list[tuple[Any, ...]]: ...
    def loader_offsets(self, group: str, topic: str) -> dict[int, tuple[str, int]]: ...
    def visitors(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[tuple[Any, ...]]: ...
    def dimensions(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[tuple[Any, ...]]: ...


class NotSettled(Exception):
    """The loader did not reach the rollup worker's offsets in time: the stores cannot be compared now."""


@dataclass(frozen=True, slots=True)
class Totals:
    events: int = 0
    valued: int = 0
    value_sum: Decimal | None = None
    value_min: Decimal | None = None
    value_max: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Difference:
    domain: str
    event_type: str
    bucket_start: datetime
    field: str
    pg: int | Decimal | None
    ch: int | Decimal | None

    @property
    def diff(self) -> int | Decimal | None:
        """pg - ch (a missing value counts as 0)."""
        if self.pg is None and self.ch is None:
            return None
        return (self.pg or 0) - (self.ch or 0)

    def as_json(self) -> dict[str, Any]:
        def s(x: object) -> object:
            return str(x) if isinstance(x, Decimal) else x
        return {"domain": self.domain, "type": self.event_type, "bucket": self.bucket_start.isoformat(),
                "field": self.field, "pg": s(self.pg), "ch": s(self.ch), "diff": s(self.diff)}


@dataclass
class Report:
    lo: datetime
    hi: datetime
    domain: str | None
    buckets: int = 0          # (domain, type, bucket) keys present in either store
    rechecked: int = 0        # keys that differed in pass 1 and were checked exactly
    differences: list[Difference] = field(default_factory=list)

    @property
    def mismatched_buckets(self) -> int:
        return len({(d.domain, d.event_type, d.bucket_start) for d in self.differences})

    def as_json(self) -> dict[str, Any]:
        return {"from": self.lo.isoformat(), "to": self.hi.isoformat(), "domain": self.domain,
                "buckets_compared": self.buckets, "rechecked": self.rechecked,
                "mismatched_buckets": self.mismatched_buckets, "differences": [d.as_json() for d in self.differences]}


def floor_quarter(t: datetime) -> datetime:
    t = t.astimezone(UTC)
    return t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)


def ceil_quarter(t: datetime) -> datetime:
    f = floor_quarter(t)
    return f if f == t.astimezone(UTC) else f + QUARTER


def _totals(events: int, valued: int, s: Any, mn: Any, mx: Any) -> Totals:
    if not valued:
        return Totals(int(events), 0)
    return Totals(int(events), int(valued), *(None if x is None else Decimal(x) for x in (s, mn, mx)))


def from_rows(rows: Iterable[tuple[Any, ...]]) -> dict[Key, Totals]:
    """(domain, type, bucket, events, valued, sum, min, max) rows -> {key: Totals}."""
    return {(d, t, b.astimezone(UTC)): _totals(n, v, s, mn, mx) for d, t, b, n, v, s, mn, mx in rows}


def pg_totals(conn: psycopg.Connection, lo: datetime, hi: datetime, domain: str | None = None) -> dict[Key, Totals]:
    """The rollup_15m rows with lo <= bucket_start < hi (of one domain, or all)."""
    rows = conn.execute(
        "SELECT domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max FROM rollup_15m"
        " WHERE bucket_start >= %s AND bucket_start < %s AND (%s::text IS NULL OR domain = %s)",
        (lo, hi, domain, domain)).fetchall()
    return from_rows(rows)


def compare(pg: dict[Key, Totals], ch: dict[Key, Totals], keys: Iterable[Key] | None = None) -> list[Difference]:
    """Every field that differs, key by key (a key missing on one side counts as zero events), sorted."""
    out = []
    for key in sorted(set(pg) | set(ch) if keys is None else set(keys)):
        a, b = pg.get(key, Totals()), ch.get(key, Totals())
        for name in FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            if x != y:
                out.append(Difference(*key, name, x, y))
    return out


def rollup_offsets(conn: psycopg.Connection, group: str, topic: str) -> dict[int, tuple[str, int]]:
    rows = conn.execute("SELECT partition, topic_id, next_offset FROM consumer_offsets"
                        " WHERE consumer_group = %s AND topic = %s", (group, topic)).fetchall()
    return {int(p): (tid, int(o)) for p, tid, o in rows}


def loader_reached(pg: dict[int, tuple[str, int]], ch: dict[int, tuple[str, int]]) -> bool:
    """Whether the loader's stored offsets are at or past the rollup worker's, partition by partition.

    A partition whose two offsets belong to different topic incarnations (known ids that differ, after the
    topic was recreated) cannot be ordered and is skipped: both groups re-read the new incarnation from its
    start and the retained spool segments are shipped again to it (ADR 16)."""
    for partition, (pg_id, pg_next) in pg.items():
        ch_id, ch_next = ch.get(partition, ("", 0))
        if partition in ch and not same_incarnation(pg_id, ch_id):
            continue
        if ch_next < pg_next:
            return False
    return True


def wait_for_loader(source: Source, target: dict[int, tuple[str, int]], *, group: str, topic: str,
                    wait_s: float, poll_s: float = 0.25) -> bool:
    """Poll the loader's offsets until they reach `target` (True) or `wait_s` passes (False)."""
    deadline = time.monotonic() + wait_s
    while True:
        if loader_reached(target, source.loader_offsets(group, topic)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


@dataclass(frozen=True)
class Groups:
    """Which offsets tell where each store is: the rollup group (PostgreSQL) and the loader group (ClickHouse)."""

    rollup: str
    loader: str
    topic: str


def stage_ch_events(conn: psycopg.Connection, table: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """Copy ClickHouse event rows into a temporary table dropped at commit."""
    conn.execute(f"CREATE TEMP TABLE {table} (hash uuid, domain text, event_type text, ts timestamptz,"
                 " value numeric(24, 6), received_at timestamptz) ON COMMIT DROP")
    with conn.cursor().copy(f"COPY {table} (hash, domain, event_type, ts, value, received_at) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


_SEEN_AGGREGATES = """
SELECT e.domain, e.event_type, date_bin('15 minutes', e.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
       count(*), count(e.value), sum(e.value), min(e.value), max(e.value)
FROM recon_events e
WHERE e.received_at < %s OR EXISTS (SELECT 1 FROM seen_events s WHERE s.hash = e.hash AND s.ts = e.ts)
GROUP BY 1, 2, 3
"""


def _exact(conn: psycopg.Connection, source: Source, keys: list[Key], groups: Groups, *, domain: str | None,
           wait_s: float, settle_s: float) -> list[Difference]:
    """Pass 2 for `keys` (see the module docstring). Leaves no transaction open."""
    lo = min(k[2] for k in keys)
    hi = max(k[2] for k in keys) + QUARTER
    target = rollup_offsets(conn, groups.rollup, groups.topic)
    conn.commit()
    if not wait_for_loader(source, target, group=groups.loader, topic=groups.topic, wait_s=wait_s):
        raise NotSettled(f"the loader (group {groups.loader}) has not reached the rollup worker's offsets in "
                         f"{wait_s:g} s; is it running?")
    with conn.transaction():
        conn.execute("SET LOCAL lock_timeout = '30s'")
        conn.execute("LOCK TABLE rollup_15m IN SHARE MODE")
        locked_at = datetime.now(UTC)
        frozen = rollup_offsets(conn, groups.rollup, groups.topic)
        if not wait_for_loader(source, frozen, group=groups.loader, topic=groups.topic, wait_s=min(wait_s, 10.0)):
            raise NotSettled(f"the loader (group {groups.loader}) did not reach the rollup worker's offsets")
        pg = pg_totals(conn, lo, hi, domain)
        rows = source.events(lo, hi, domain, keys if len(keys) <= MAX_EXACT_KEYS else None)
        stage_ch_events(conn, "recon_events", rows)
        ch = from_rows(conn.execute(_SEEN_AGGREGATES, (locked_at - timedelta(seconds=settle_s),)).fetchall())
    return compare(pg, ch, keys)


def reconcile(conn: psycopg.Connection, source: Source, lo: datetime, hi: datetime, groups: Groups, *,
              domain: str | None = None, wait_s: float = 60.0, settle_s: float = 300.0,
              dedup_days: float = 9.0, now: Callable[[], datetime] | None = None,
              seed: int | None = None) -> Report:
    """Compare the stores over the quarter hours lo <= bucket_start < hi (see the module docstring), then the
    rollups by dimension on a sample of the keys that agree (oltp/reconcile_dims.py; `seed` fixes the sample)."""
    report = Report(lo, hi, domain)
    pg = pg_totals(conn, lo, hi, domain)
    conn.commit()
    ch = from_rows(source.aggregates(lo, hi, domain))
    report.buckets = len(set(pg) | set(ch))
    first = compare(pg, ch)
    differing = {(d.domain, d.event_type, d.bucket_start) for d in first}
    agreeing = [k for k in sorted(set(pg) & set(ch)) if k not in differing]
    dims = [Difference(*d) for d in compare_dimensions(conn, source, agreeing, random.Random(seed))]
    if not first:
        report.differences = dims
        return report
    dedup_from = (now or (lambda: datetime.now(UTC)))() - timedelta(days=dedup_days) + QUARTER
    keys = sorted({(d.domain, d.event_type, d.bucket_start) for d in first})
    recent = [k for k in keys if k[2] >= dedup_from]
    old = set(keys) - set(recent)
    report.differences = [d for d in first if (d.domain, d.event_type, d.bucket_start) in old]
    if recent:
        report.rechecked = len(recent)
        report.differences += _exact(conn, source, recent, groups, domain=domain, wait_s=wait_s, settle_s=settle_s)
    report.differences += dims
    report.differences.sort(key=lambda d: (d.domain, d.event_type, d.bucket_start,
                                           FIELDS.index(d.field) if d.field in FIELDS else len(FIELDS), d.field))
    return report


def record_run(conn: psycopg.Connection, source: str, lo: datetime, hi: datetime, domain: str | None,
               report: Report | None, error: str | None = None) -> None:
    """Store one run's outcome in `reconcile_runs` (migration 0005; committed when this returns). `report`
    None means the run failed."""
    with conn.transaction():
        if report is None:
            conn.execute("INSERT INTO reconcile_runs (source, range_from, range_to, domain, status, error)"
                         " VALUES (%s, %s, %s, %s, 'failed', %s)", (source, lo, hi, domain, (error or "")[:1000]))
        else:
            conn.execute("INSERT INTO reconcile_runs (source, range_from, range_to, domain, buckets, mismatches,"
                         " status) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                         (source, lo, hi, domain, report.buckets, report.mismatched_buckets,
                          "differences" if report.differences else "ok"))


def latest_mismatches(conn: psycopg.Connection) -> int | None:
    """Mismatched buckets found by the newest scheduled run that completed (None: no run yet).

    For the Prometheus gauge `tally_reconcile_mismatches`, read at scrape time."""
    if one(conn.execute("SELECT to_regclass('reconcile_runs')"))[0] is None:
        return None
    row = conn.execute("SELECT mismatches FROM reconcile_runs WHERE source = 'schedule' AND status <> 'failed'"
                       " ORDER BY ran_at DESC, id DESC LIMIT 1").fetchone()
    return None if row is None else int(row[0])
