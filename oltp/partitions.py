"""Time partitions of the PostgreSQL rollup tiers and the dedup window (ADR 18).

`rollup_15m` and `seen_events` are range-partitioned by UTC day, `rollup_1h` by UTC month and
`rollup_1d` by UTC year, on `bucket_start` (`ts` for seen_events); the tables by dimension and the value
bins of each tier (`TIER_TABLES`, ADR 46) like their tier, `dim_keys` by UTC day of `day_start`. Partitions are named
`<table>_p<YYYYMMDD | YYYYMM | YYYY>` after the UTC start of their range; retention (`maintain`, run
hourly by the rollup worker and by `tally retention`) only ever drops partitions named that way.
There is no DEFAULT partition: a row outside every partition is an error, so writers call
`ensure_partitions` first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

from core.config import Settings

# How long a partition known to exist (or a table known to be plain) is trusted without asking the
# catalog again. Retention in the same process calls `forget`; this bounds the damage of a drop done
# by another process (`tally retention`, another worker's pass).
CACHE_TTL_S = 300.0
# Only partitions whose range ends after now - TRUST_HORIZON (+ the cache TTL) are trusted from the
# cache: no retention setting (at least 1 day) can drop them meanwhile. Older ones (late, replayed or
# backfilled events) are checked in the catalog on every call, so a partition another process just
# dropped is re-created instead of failing the batch with "no partition of relation ... found for row".
TRUST_HORIZON = timedelta(days=1)
PLAIN_TTL_S = 10.0  # how long "this table is not partitioned (not migrated yet)" is believed
_LOCK_CLASS = 7202  # advisory lock class for partition DDL (7201 is ensure_schema's)


@dataclass(frozen=True)
class Granularity:
    """A partition period: day, month or year (UTC)."""

    name: str
    suffix_len: int  # digits in the partition name suffix

    def floor(self, t: datetime) -> datetime:
        t = _utc(t)
        if self.name == "day":
            return t.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.name == "month":
            return t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return t.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)

    def next(self, start: datetime) -> datetime:
        if self.name == "day":
            return start + timedelta(days=1)
        if self.name == "month":
            return start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
        return start.replace(year=start.year + 1)

    def suffix(self, start: datetime) -> str:
        return start.strftime({"day": "%Y%m%d", "month": "%Y%m", "year": "%Y"}[self.name])

    def parse(self, suffix: str) -> datetime | None:
        if len(suffix) != self.suffix_len or not suffix.isdigit():
            return None
        try:
            fmt = {"day": "%Y%m%d", "month": "%Y%m", "year": "%Y"}[self.name]
            return datetime.strptime(suffix, fmt).replace(tzinfo=UTC)
        except ValueError:
            return None


DAY = Granularity("day", 8)
MONTH = Granularity("month", 6)
YEAR = Granularity("year", 4)

# Partitioned table -> (partition key column, period). The allowlist of what this module touches.
TABLES: dict[str, tuple[str, Granularity]] = {
    "rollup_15m": ("bucket_start", DAY),
    "rollup_1h": ("bucket_start", MONTH),
    "rollup_1d": ("bucket_start", YEAR),
    "seen_events": ("ts", DAY),
    # Rollups by dimension, value bins and the cap's admitted values (migration 0010, ADR 46): like their tier;
    # dim_keys by the UTC day of its local day start, kept as long as the dedup window.
    "rollup_dim_15m": ("bucket_start", DAY),
    "rollup_dim_1h": ("bucket_start", MONTH),
    "rollup_dim_1d": ("bucket_start", YEAR),
    "rollup_cube_1h": ("bucket_start", MONTH),
    "rollup_cube_1d": ("bucket_start", YEAR),
    "value_bins_15m": ("bucket_start", DAY),
    "value_bins_1h": ("bucket_start", MONTH),
    "value_bins_1d": ("bucket_start", YEAR),
    "dim_keys": ("day_start", DAY),
    # Unique visitors' sketches (migration 0011, ADR 47): like their tier.
    "visitors_1h": ("bucket_start", MONTH),
    "visitors_1d": ("bucket_start", YEAR),
    "visitors_dim_1d": ("bucket_start", YEAR),
    # Pre-merged closed weeks of the daily tier (migration 0013, ADR 61): like it.
    "rollup_dim_1w": ("bucket_start", YEAR),
    "visitors_dim_1w": ("bucket_start", YEAR),
    "compacted_weeks": ("bucket_start", YEAR),
}
# Each tier's tables besides rollup_<tier> (same period, same retention).
TIER_TABLES: dict[str, tuple[str, ...]] = {
    "15m": ("rollup_dim_15m", "value_bins_15m"),
    "1h": ("rollup_dim_1h", "rollup_cube_1h", "value_bins_1h", "visitors_1h"),
    "1d": ("rollup_dim_1d", "rollup_cube_1d", "value_bins_1d", "visitors_1d", "visitors_dim_1d"),
}
# The closed weeks pre-merged from the daily tier by a background pass (ADR 61): kept as long as the daily tier, but
# not in TIER_TABLES, whose partitions the rollup sink ensures every batch (it never writes these; the pass does).
# compacted_weeks first: retention drops in this order, and a week recorded as compacted must never be read while
# its rows are already gone (a review: a week starting on 31 December with no row that day keeps its signature).
WEEK_TABLES = ("compacted_weeks", "rollup_dim_1w", "visitors_dim_1w")


@dataclass(frozen=True)
class Partition:
    """One partition of a table: rows with start <= key < end."""

    table: str
    name: str
    start: datetime
    end: datetime


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("partition bounds need timezone-aware datetimes")
    return t.astimezone(UTC)


def _spec(table: str) -> tuple[str, Granularity]:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"{table!r} is not a time-partitioned table ({', '.join(TABLES)})") from None


def partition_for(table: str, t: datetime) -> Partition:
    """The partition of `table` that holds key value `t`."""
    _, period = _spec(table)
    start = period.floor(t)
    return Partition(table, f"{table}_p{period.suffix(start)}", start, period.next(start))


def partitions_covering(table: str, lo: datetime, hi: datetime) -> list[Partition]:
    """Every partition of `table` needed for keys in [lo, hi] (inclusive), oldest first."""
    if _utc(hi) < _utc(lo):
        raise ValueError("hi is before lo")
    out = [partition_for(table, lo)]
    while out[-1].end <= _utc(hi):
        out.append(partition_for(table, out[-1].end))
    return out


def partitions_around(table: str, now: datetime, *, back: timedelta = timedelta(days=1),
                      ahead: int = 2) -> list[Partition]:
    """The partitions for keys from `now - back` through `ahead` whole periods after the current one."""
    last = partition_for(table, now)
    for _ in range(ahead):
        last = partition_for(table, last.end)
    return partitions_covering(table, _utc(now) - back, last.start)


def parse_partition_name(table: str, name: str) -> Partition | None:
    """The partition a name stands for if it follows this module's naming, else None."""
    _, period = _spec(table)
    prefix = f"{table}_p"
    if not name.startswith(prefix):
        return None
    start = period.parse(name[len(prefix):])
    return None if start is None else Partition(table, name, start, period.next(start))


# --- the in-process cache -------------------------------------------------------------------------

_cache_lock = threading.Lock()
_known: dict[tuple[str, str], dict[str, float]] = {}   # (database, table) -> partition name -> seen at
_plain: dict[tuple[str, str], float] = {}              # (database, table) -> when found unpartitioned


def _db_key(conn: psycopg.Connection) -> str:
    info = conn.info
    return f"{info.host}:{info.port}/{info.dbname}"


def forget(table: str | None = None) -> None:
    """Drop cached knowledge (of one table or all); call after dropping partitions, or when a write
    failed with "no partition of relation ... found for row"."""
    with _cache_lock:
        for cache in (_known, _plain):
            for key in [k for k in cache if table is None or k[1] == table]:
                del cache[key]


CHECK_VIOLATION = "23514"  # SQLSTATE of "no partition of relation ... found for row" (and of CHECK constraints)


def is_missing_partition(exc: BaseException) -> bool:
    """Whether `exc` is PostgreSQL refusing a row that no partition of one of TABLES takes.

    Told apart by what does not depend on the server's `lc_messages`: SQLSTATE 23514 (check_violation)
    whose diagnostics name the partitioned table itself and no constraint. A CHECK constraint names its
    constraint; a row outside a partition's bounds, inserted into that partition, names the partition."""
    if not isinstance(exc, psycopg.Error) or exc.sqlstate != CHECK_VIOLATION:
        return False
    return exc.diag.constraint_name is None and exc.diag.table_name in TABLES


def is_partitioned(conn: psycopg.Connection, table: str) -> bool:
    """Whether `table` is a partitioned table in this database (asks the catalog)."""
    _spec(table)
    row = conn.execute("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(%s)",
                       (table,)).fetchone()
    return row is not None


def ensure_partitions(conn: psycopg.Connection, table: str, lo: datetime, hi: datetime) -> None:
    """Create any missing partition of `table` covering keys in [lo, hi].

    Idempotent and safe when several processes call it at once (creation is serialised by an
    advisory lock per table and uses IF NOT EXISTS). Cheap when the partitions exist: an in-process
    cache answers without a round trip for CACHE_TTL_S, for partitions of the last day and later;
    older ones (which retention may drop) cost one catalog query per call. A no-op while `table` is
    not partitioned (a database not yet migrated). Best called outside a transaction: on an idle connection the
    DDL is committed before it returns (in its own short transaction, so the brief lock it takes on
    the parent table is not held for a whole batch); inside a transaction it joins that
    transaction. Raises ValueError for a table that is not time-partitioned or naive datetimes,
    psycopg errors for database failures (nothing half-created: each partition is one statement).
    """
    needed = partitions_covering(table, lo, hi)
    key = (_db_key(conn), table)
    now = time.monotonic()
    trusted_after = datetime.now(UTC) - TRUST_HORIZON + timedelta(seconds=CACHE_TTL_S)
    with _cache_lock:
        if now - _plain.get(key, -1e18) < PLAIN_TTL_S:
            return
        seen = _known.get(key, {})
        missing = [p for p in needed if now - seen.get(p.name, -1e18) >= CACHE_TTL_S or p.end <= trusted_after]
    if not missing:
        return
    with conn.transaction():  # idle connection: BEGIN..COMMIT; inside a transaction: a savepoint
        if not is_partitioned(conn, table):
            with _cache_lock:
                _plain[key] = now
            return
        exists = _existing(conn, [p.name for p in missing])
        to_create = [p for p in missing if p.name not in exists]
        if to_create:
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, table))
            for p in to_create:
                conn.execute(create_statement(p))
    with _cache_lock:
        seen = _known.setdefault(key, {})
        for p in missing:
            seen[p.name] = now


def ensure_partitions_for(conn: psycopg.Connection, table: str, instants: Iterable[datetime]) -> None:
    """Like `ensure_partitions`, but only for the partitions holding these instants (no gap filling:
    a batch with one event from last year and the rest from today creates two partitions)."""
    starts: dict[datetime, datetime] = {}
    for t in instants:
        p = partition_for(table, t)
        starts.setdefault(p.start, p.start)
    for start in sorted(starts):
        ensure_partitions(conn, table, start, start)


def _existing(conn: psycopg.Connection, names: list[str]) -> set[str]:
    rows = conn.execute("SELECT c.relname FROM pg_class c WHERE c.relname = ANY(%s)"
                        " AND c.relnamespace = current_schema()::regnamespace", (names,)).fetchall()
    return {r[0] for r in rows}


# Tables whose rows are updated in place batch after batch: room left on each page so that an update can
# stay on it (a HOT update, no new index entries; ADR 46).
FILLFACTOR = dict.fromkeys(("rollup_dim_15m", "rollup_dim_1h", "rollup_dim_1d", "rollup_cube_1h", "rollup_cube_1d"), 70)


def create_statement(p: Partition) -> str:
    """DDL creating partition `p` if missing (names and bounds come from this module, not input)."""
    storage = f" WITH (fillfactor = {FILLFACTOR[p.table]})" if p.table in FILLFACTOR else ""
    return (f'CREATE TABLE IF NOT EXISTS "{p.name}" PARTITION OF "{p.table}"'
            f" FOR VALUES FROM ('{p.start.isoformat()}') TO ('{p.end.isoformat()}'){storage}")


def list_partitions(conn: psycopg.Connection, table: str) -> list[Partition]:
    """The partitions of `table` named by this module, oldest first (others are ignored)."""
    _spec(table)
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(%s)", (table,)).fetchall()
    parts = [p for p in (parse_partition_name(table, r[0]) for r in rows) if p is not None]
    return sorted(parts, key=lambda p: p.start)


# --- retention: dropping whole partitions ---------------------------------------------------------

@dataclass(frozen=True)
class TableRetention:
    """What retention finds for one table: its partitions and the expired ones (end <= cutoff)."""

    table: str
    keep_days: int  # 0 = kept forever
    cutoff: datetime | None  # None when kept forever
    partitioned: bool
    partitions: tuple[Partition, ...]
    expired: tuple[Partition, ...]


def keep_days_from(settings: Settings) -> dict[str, int]:
    """Days each table is kept, from Settings (TALLY_RETENTION_*_DAYS, TALLY_DEDUP_WINDOW_DAYS): a tier's
    tables by dimension and value bins (TIER_TABLES) as long as the tier, `dim_keys` as the dedup window (no
    event older than that is counted again, so its day's admitted values are no longer asked)."""
    tiers = {"15m": int(settings.retention_15m_days), "1h": int(settings.retention_1h_days),
             "1d": int(settings.retention_1d_days)}
    keep = {f"rollup_{tier}": days for tier, days in tiers.items()}
    keep["seen_events"] = int(settings.dedup_window_days)
    for tier, tables in TIER_TABLES.items():
        keep.update(dict.fromkeys(tables, tiers[tier]))
    keep.update(dict.fromkeys(WEEK_TABLES, tiers["1d"]))
    keep["dim_keys"] = int(settings.dedup_window_days)
    return keep


def plan_retention(conn: psycopg.Connection, keep_days: dict[str, int], now: datetime) -> list[TableRetention]:
    """Which partitions are expired at `now`: those whose whole range ends at or before
    `now - keep_days` (a partition still holding one row inside the period is kept). Reads only."""
    plans = []
    for table, days in keep_days.items():
        _spec(table)
        if days < 0:
            raise ValueError(f"keep_days for {table} must be >= 0")
        with conn.transaction():
            partitioned = is_partitioned(conn, table)
            parts = tuple(list_partitions(conn, table)) if partitioned else ()
        cutoff = None if days == 0 else _utc(now) - timedelta(days=days)
        expired = () if cutoff is None else tuple(p for p in parts if p.end <= cutoff)
        plans.append(TableRetention(table, days, cutoff, partitioned, parts, expired))
    return plans


def drop_partitions(conn: psycopg.Connection, partitions: Iterable[Partition], *,
                    lock_timeout_s: float = 10.0) -> list[Partition]:
    """Drop these partitions, each in its own short transaction; returns those dropped. `conn` must
    not be inside a transaction (ValueError).

    Only names this module made are accepted (ValueError otherwise). Each DROP waits at most
    `lock_timeout_s` for the parent's lock (readers of the tier) and raises psycopg.errors.LockNotAvailable
    after that; the partitions dropped before stay dropped (retention is simply run again later).
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        # inside a transaction every DROP would keep its locks to the end (thousands of partitions:
        # "out of shared memory") and one failure would undo them all
        raise ValueError("drop_partitions needs a connection outside any transaction")
    dropped = []
    for p in partitions:
        if parse_partition_name(p.table, p.name) != p:
            raise ValueError(f"{p.name!r} is not a partition name of {p.table}")
        with conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
            conn.execute(f'DROP TABLE IF EXISTS "{p.name}"')
        forget(p.table)
        dropped.append(p)
    return dropped


def maintain(conn: psycopg.Connection, keep_days: dict[str, int], now: datetime, *,
             ahead: int = 2, dry_run: bool = False) -> list[TableRetention]:
    """One retention pass: create the partitions for now and `ahead` periods after it, then drop the
    expired ones (unless `dry_run`). Returns the plan it acted on. `conn` must not be inside a
    transaction (ValueError), since every step commits on its own."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("maintain needs a connection outside any transaction")
    plans = plan_retention(conn, keep_days, now)
    if not dry_run:
        for plan in plans:
            if plan.partitioned:
                around = partitions_around(plan.table, now, back=timedelta(0), ahead=ahead)
                ensure_partitions(conn, plan.table, around[0].start, around[-1].start)
            drop_partitions(conn, plan.expired)
    return plans
