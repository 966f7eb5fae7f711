"""PostgreSQL schema: SQLAlchemy Core metadata of the head revision, built by Alembic migrations.

`ensure_schema(dsn)` is what every process calls at start-up (and `tally migrate`): it upgrades the
database to the newest revision in oltp/migrations/versions/ under an advisory lock, so concurrent
first starts are safe and a database at head costs one small query. `metadata` describes the
head schema; tests/test_migrations.py checks that the migrations produce exactly it. To change the
schema: add a revision AND update `metadata` (ADR 18). Sections, by owner:

- CORE (oltp/rollup_sink.py): consumer offsets, the dedup window, the 15-minute tier, rejected records
- TIERS (oltp/rollup_sink.py): the 1-hour and 1-day tiers
- TOKENS and dashboard sessions (oltp/tokens.py, api/session.py), SITES (oltp/sites.py), AUDIT (oltp/audit.py)
- INGESTION (oltp/rollup_sink.py, read by oltp/ingestion.py)
- DIMENSIONS (oltp/rollup_sink.py, ADR 46): rollups by dimension, the cube, value bins, the cap's admitted values
- VISITORS (oltp/visitors.py, called by oltp/rollup_sink.py; ADR 47): unique-visitor sketches
- RECONCILE (oltp/reconcile.py), REWINDS (oltp/rewinds.py)

rollup_15m, rollup_1h, rollup_1d, seen_events and the DIMENSIONS tables are range-partitioned by time
(oltp/partitions.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    create_engine,
    text,
)
from sqlalchemy import Connection as SAConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)
metadata = MetaData()
_NOW = text("now()")


def _tz() -> DateTime:
    return DateTime(timezone=True)


# --- CORE -----------------------------------------------------------------------------------------
consumer_offsets = Table(
    "consumer_offsets", metadata,
    Column("consumer_group", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("topic_id", Text, nullable=False, server_default=text("''")),  # the topic incarnation's id
    Column("next_offset", BigInteger, CheckConstraint("next_offset >= 0"), nullable=False),
    Column("updated_at", _tz(), nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("consumer_group", "topic", "partition"),
)

# Dedup window: every event hash counted within TALLY_DEDUP_WINDOW_DAYS, partitioned by event day.
seen_events = Table(
    "seen_events", metadata,
    Column("hash", Uuid(as_uuid=False), nullable=False),
    Column("ts", _tz(), nullable=False),
    PrimaryKeyConstraint("ts", "hash"),  # time first: new entries land on the index's last pages (0015)
    postgresql_partition_by="RANGE (ts)",
)


def _rollup_columns() -> list[Column[Any]]:
    return [
        Column("events", BigInteger, nullable=False),
        Column("valued", BigInteger, nullable=False, server_default=text("0")),  # events that carried a value
        Column("value_sum", Numeric(24, 6)),
        Column("value_min", Numeric(24, 6)),
        Column("value_max", Numeric(24, 6)),
    ]


# 15-minute tier: quarter-hour buckets are aligned for every UTC offset (+05:45, +12:45 too).
rollup_15m = Table(
    "rollup_15m", metadata,
    Column("domain", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),
    *_rollup_columns(),
    PrimaryKeyConstraint("domain", "event_type", "bucket_start"),
    postgresql_partition_by="RANGE (bucket_start)",
)

# Records that could not be decoded: kept for inspection, capped (see oltp.rollup_sink).
rejected_records = Table(
    "rejected_records", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("consumer_group", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("error", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("rejected_at", _tz(), nullable=False, server_default=_NOW),
)

# --- TIERS ----------------------------------------------------------------------------------------
rollup_1h = Table(
    "rollup_1h", metadata,
    Column("domain", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),  # the UTC hour
    *_rollup_columns(),
    PrimaryKeyConstraint("domain", "event_type", "bucket_start"),
    postgresql_partition_by="RANGE (bucket_start)",
)

rollup_1d = Table(
    "rollup_1d", metadata,
    Column("domain", Text, nullable=False),
    Column("tz", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),  # the UTC instant of local midnight in `tz`
    *_rollup_columns(),
    PrimaryKeyConstraint("domain", "tz", "event_type", "bucket_start"),
    postgresql_partition_by="RANGE (bucket_start)",
)

# The zone each domain's rollup_1d rows are written in and the first day from which they hold every
# event (ADR 19; kept by oltp/rollup_sink.py and oltp/tiers.py, read by oltp/queries.py).
rollup_1d_coverage = Table(
    "rollup_1d_coverage", metadata,
    Column("domain", Text, primary_key=True),
    Column("tz", Text, nullable=False),
    Column("complete_from", _tz(), nullable=False),
    Column("updated_at", _tz(), nullable=False, server_default=_NOW),
)

# --- TOKENS: who may call the API. The secret is never stored, only the SHA-256 of its 256 bits. -----
api_tokens = Table(
    "api_tokens", metadata,
    Column("id", Text, CheckConstraint("id ~ '^tok_[0-9a-f]{10}$'"), primary_key=True),
    Column("name", Text, CheckConstraint("length(name) <= 200"), nullable=False, server_default=text("''")),
    Column("role", Text, CheckConstraint("role IN ('admin', 'analyst', 'customer')"), nullable=False),
    Column("domains", ARRAY(Text), nullable=False, server_default=text("'{}'")),  # customers only
    Column("secret_sha256", LargeBinary, CheckConstraint("length(secret_sha256) = 32"), nullable=False),
    Column("created_at", _tz(), nullable=False, server_default=_NOW),
    Column("revoked_at", _tz()),
    CheckConstraint("(role = 'customer') = (cardinality(domains) > 0)"),
)

# Dashboard sessions (api/session.py; migration 0007): the cookie carries a random id, only its SHA-256 is here.
dashboard_sessions = Table(
    "dashboard_sessions", metadata,
    Column("id_sha256", LargeBinary, CheckConstraint("length(id_sha256) = 32"), primary_key=True),
    Column("token_id", Text, ForeignKey("api_tokens.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", _tz(), nullable=False, server_default=_NOW),
    Column("expires_at", _tz(), nullable=False),
    Index("dashboard_sessions_expires_at", "expires_at"),  # pruning (oltp/prune.py)
    Index("dashboard_sessions_token_id", "token_id"),
)

# --- SITES: who may send events. site_key is public; secret signs pixel URLs (stored retrievably). ---
sites = Table(
    "sites", metadata,
    Column("domain", Text, primary_key=True),
    Column("tz", Text, nullable=False, server_default=text("'UTC'")),
    Column("origins", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("site_key", Text, CheckConstraint("site_key ~ '^pk_[A-Za-z0-9_-]{22,}$'"), nullable=False, unique=True),
    Column("secret", Text, CheckConstraint("secret ~ '^sk_[A-Za-z0-9_-]{43,}$'"), nullable=False),
    Column("rate_per_s", Double, CheckConstraint("rate_per_s IS NULL OR rate_per_s > 0")),
    Column("burst", Integer, CheckConstraint("burst IS NULL OR burst >= 1")),
    Column("respect_dnt", Boolean, nullable=False, server_default=text("false")),
    # The URL rule (core/urls.py; migration 0008): query parameters kept besides the default, or URLs as sent.
    Column("keep_query", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("raw_urls", Boolean, nullable=False, server_default=text("false")),
    Column("account", Text),  # the customer the site belongs to (migration 0009; NULL: none given)
    Column("created_at", _tz(), nullable=False, server_default=_NOW),
    Column("updated_at", _tz(), nullable=False, server_default=_NOW),
)

# --- AUDIT: one row per analyst query, refused and failed ones included (token_id outlives tokens). --
analyst_queries = Table(
    "analyst_queries", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("token_id", Text),
    Column("started_at", _tz(), nullable=False),
    Column("sql", Text, nullable=False),
    Column("format", Text, nullable=False),
    Column("status", Text, CheckConstraint(
        "status IN ('ok', 'refused', 'failed', 'timeout', 'too_large', 'busy', 'cancelled')"), nullable=False),
    Column("rows", BigInteger, CheckConstraint("rows >= 0"), nullable=False, server_default=text("0")),
    Column("bytes", BigInteger, CheckConstraint("bytes >= 0"), nullable=False, server_default=text("0")),
    Column("duration_ms", Integer, CheckConstraint("duration_ms >= 0"), nullable=False, server_default=text("0")),
    Column("error", Text),
    Column("client", Text),  # who asked: the request's User-Agent (migration 0012)
    Column("query_id", Text),  # the caller's id for the query, on the ClickHouse-compatible endpoint (0012)
    Index("analyst_queries_started_at", "started_at"),
)

# --- INGESTION: per domain and UTC quarter hour of ARRIVAL: refusals, accepted, bots, late. ----------
collector_refusals = Table(
    "collector_refusals", metadata,
    Column("domain", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),
    Column("events", BigInteger, nullable=False),
    Column("value", Text),  # the most recent offending value (domain, origin) of the reason (migration 0009)
    PrimaryKeyConstraint("domain", "reason", "bucket_start"),
    Index("collector_refusals_bucket_start", "bucket_start"),  # retention (oltp/prune.py)
)

ingestion_15m = Table(
    "ingestion_15m", metadata,
    Column("domain", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),
    Column("accepted", BigInteger, nullable=False, server_default=text("0")),
    Column("bots", BigInteger, nullable=False, server_default=text("0")),
    Column("late", BigInteger, nullable=False, server_default=text("0")),  # after their quarter hour + 5 min
    Column("last_received_at", _tz()),
    PrimaryKeyConstraint("domain", "bucket_start"),
    Index("ingestion_15m_bucket_start", "bucket_start"),  # retention (oltp/prune.py)
)


# --- DIMENSIONS (migration 0010, ADR 46): non-bot events by dimension value, per tier; '' = no value,
# '(other)' = a value past the cap (TALLY_DIMENSION_CAP admitted values per domain, dimension and local day).
DIMENSIONS = ("page", "source", "country", "device", "browser", "os")


def _dim_counts() -> list[Column[Any]]:
    return [
        Column("events", BigInteger, nullable=False),
        Column("valued", BigInteger, nullable=False, server_default=text("0")),
        Column("value_sum", Numeric(24, 6)),
    ]


def _bucketed(name: str, daily: bool, columns: list[Column[Any]], key: tuple[str, ...]) -> Table:
    """A per-tier table of (domain, [tz when daily,] event_type, bucket_start, *columns), keyed by domain, [tz,]
    *key, partitioned by bucket_start like its tier."""
    zone = [Column("tz", Text, nullable=False)] if daily else []
    return Table(
        name, metadata,
        Column("domain", Text, nullable=False),
        *zone,
        Column("event_type", Text, nullable=False),
        Column("bucket_start", _tz(), nullable=False),
        *columns,
        PrimaryKeyConstraint("domain", *(["tz"] if daily else []), *key),
        postgresql_partition_by="RANGE (bucket_start)",
    )


def _dim_table(name: str, daily: bool) -> Table:
    # the key also serves a filtered series (one value over a range): no second index to maintain (ADR 46)
    return _bucketed(name, daily, [Column("dimension", Text, nullable=False), Column("key", Text, nullable=False),
                                   *_dim_counts()],
                     ("dimension", "bucket_start", "event_type", "key"))


def _cube_table(name: str, daily: bool) -> Table:
    return _bucketed(name, daily, [*(Column(d, Text, nullable=False) for d in DIMENSIONS), *_dim_counts()],
                     ("bucket_start", "event_type", *DIMENSIONS))


def _bins_table(name: str, daily: bool) -> Table:
    return _bucketed(name, daily, [Column("bin", Integer, nullable=False),  # ceil(ln(value) / ln(GAMMA)); -2^31: 0
                                   Column("count", BigInteger, nullable=False)],
                     ("event_type", "bucket_start", "bin"))


rollup_dim_15m = _dim_table("rollup_dim_15m", daily=False)
rollup_dim_1h = _dim_table("rollup_dim_1h", daily=False)
rollup_dim_1d = _dim_table("rollup_dim_1d", daily=True)
rollup_cube_1h = _cube_table("rollup_cube_1h", daily=False)
rollup_cube_1d = _cube_table("rollup_cube_1d", daily=True)
value_bins_15m = _bins_table("value_bins_15m", daily=False)
value_bins_1h = _bins_table("value_bins_1h", daily=False)
value_bins_1d = _bins_table("value_bins_1d", daily=True)

# The values admitted under the cap per (domain, dimension, local day start of the site's zone); '' never takes a slot.
dim_keys = Table(
    "dim_keys", metadata,
    Column("domain", Text, nullable=False),
    Column("dimension", Text, nullable=False),
    Column("day_start", _tz(), nullable=False),
    Column("key", Text, nullable=False),
    PrimaryKeyConstraint("domain", "dimension", "day_start", "key"),
    postgresql_partition_by="RANGE (day_start)",
)

# --- VISITORS (oltp/visitors.py, migration 0011, ADR 47): HLL sketches (Apache DataSketches, serialized compact)
# of the visitor key of non-bot events, per UTC hour, per local day, and per local day and dimension value. A key
# may have several rows (partial sketches appended by the batches, merged every few): its sketch is their union.
visitors_1h = Table(
    "visitors_1h", metadata,
    Column("domain", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),  # the UTC hour
    Column("sketch", LargeBinary, nullable=False),
    Index("visitors_1h_key", "domain", "bucket_start"),
    postgresql_partition_by="RANGE (bucket_start)",
)

visitors_1d = Table(
    "visitors_1d", metadata,
    Column("domain", Text, nullable=False),
    Column("tz", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),  # local day start in `tz`, as rollup_1d
    Column("sketch", LargeBinary, nullable=False),
    Index("visitors_1d_key", "domain", "tz", "bucket_start"),
    postgresql_partition_by="RANGE (bucket_start)",
)

visitors_dim_1d = Table(
    "visitors_dim_1d", metadata,
    Column("domain", Text, nullable=False),
    Column("tz", Text, nullable=False),
    Column("dimension", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),
    Column("key", Text, nullable=False),  # as rollup_dim_1d: '' = no value, '(other)' = past the cap
    Column("sketch", LargeBinary, nullable=False),
    Column("n", BigInteger),  # an upper bound of the sketch's distinct visitors; NULL: unknown (migration 0014, ADR 62)
    Index("visitors_dim_1d_key", "domain", "tz", "dimension", "bucket_start", "key", postgresql_include=["n"]),
    postgresql_partition_by="RANGE (bucket_start)",
)

# --- CLOSED WEEKS (oltp/weekly.py, migration 0013, ADR 61): the daily tier's dimension rows and per-value sketches
# pre-merged per closed local week by a background compaction; a week serves only while `compacted_weeks`' signature
# of rollup_1d / visitors_1d for it still holds.
rollup_dim_1w = _bucketed("rollup_dim_1w", True, [Column("dimension", Text, nullable=False),
                                                  Column("key", Text, nullable=False), *_dim_counts()],
                          ("dimension", "bucket_start", "event_type", "key"))

visitors_dim_1w = Table(
    "visitors_dim_1w", metadata,
    Column("domain", Text, nullable=False),
    Column("tz", Text, nullable=False),
    Column("dimension", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),  # the week's first local day start
    Column("key", Text, nullable=False),
    Column("sketch", LargeBinary, nullable=False),
    Column("n", BigInteger),  # the sum of its days' n (an upper bound); NULL: unknown (migration 0014, ADR 62)
    PrimaryKeyConstraint("domain", "tz", "dimension", "bucket_start", "key"),
    # the ranking's bounds index-only (migration 0016): n without the wide heap row
    Index("visitors_dim_1w_bound", "domain", "tz", "dimension", "bucket_start", "key", postgresql_include=["n"]),
    postgresql_partition_by="RANGE (bucket_start)",
)

compacted_weeks = Table(
    "compacted_weeks", metadata,
    Column("domain", Text, nullable=False),
    Column("tz", Text, nullable=False),
    Column("bucket_start", _tz(), nullable=False),
    Column("bucket_end", _tz(), nullable=False),
    Column("counts_sig", Text, nullable=False),
    Column("visitors_sig", Text, nullable=False),
    Column("compacted_at", _tz(), nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("domain", "tz", "bucket_start"),
    postgresql_partition_by="RANGE (bucket_start)",
)


# --- RECONCILE (oltp/reconcile.py): results of reconcile runs, read by the metrics endpoint (ADR 20). --
reconcile_runs = Table(
    "reconcile_runs", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("ran_at", _tz(), nullable=False, server_default=_NOW),
    Column("source", Text, CheckConstraint("source IN ('schedule', 'cli')"), nullable=False),
    Column("range_from", _tz(), nullable=False),
    Column("range_to", _tz(), nullable=False),
    Column("domain", Text),
    Column("buckets", Integer, CheckConstraint("buckets >= 0"), nullable=False, server_default=text("0")),
    Column("mismatches", Integer, CheckConstraint("mismatches >= 0"), nullable=False, server_default=text("0")),
    Column("status", Text, CheckConstraint("status IN ('ok', 'differences', 'failed')"), nullable=False),
    Column("error", Text),
    Index("reconcile_runs_ran_at", "source", "ran_at"),
)

# --- REWINDS (oltp/rewinds.py): how `tally replay` asks running consumer groups to re-read (ADR 23). --
consumer_rewinds = Table(
    "consumer_rewinds", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("request_id", Uuid(as_uuid=False), nullable=False),
    Column("consumer_group", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("topic_id", Text, nullable=False, server_default=text("''")),  # '' = any incarnation
    Column("partition", Integer, CheckConstraint("partition >= 0"), nullable=False),
    Column("next_offset", BigInteger, CheckConstraint("next_offset >= 0"), nullable=False),
    Column("requested_at", _tz(), nullable=False, server_default=_NOW),
    Column("reread_until", BigInteger),  # the group's position when applied
    Column("done_at", _tz()),  # set once, with the outcome
    Column("outcome", Text),
    Index("consumer_rewinds_pending", "consumer_group", "topic", postgresql_where=text("done_at IS NULL")),
)


# --- migrations -----------------------------------------------------------------------------------
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_LOCK_KEY = 7201  # pg_advisory_lock key serialising concurrent migrations


def _alembic_config() -> Config:
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its per-run chatter; ensure_schema logs changes
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revisions() -> tuple[str, ...]:
    """The newest revision(s) shipped with this code (one, unless two branches await a merge revision)."""
    config = _alembic_config()
    return tuple(sorted(ScriptDirectory.from_config(config).get_heads()))


def current_revisions(dsn: str) -> tuple[str, ...]:
    """The revision(s) the database is at; () when never migrated (empty, or made by the release
    before migrations, whose tables revision 0001 adopts)."""
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        if conn.execute("SELECT to_regclass('alembic_version')").fetchone()[0] is None:  # type: ignore[index]
            return ()
        return tuple(sorted(r[0] for r in conn.execute("SELECT version_num FROM alembic_version")))


def ensure_schema(dsn: str, revision: str = "heads") -> None:
    """Upgrade the database to `revision` (default: every head, i.e. the newest). Idempotent; safe to run concurrently
    from several processes (an advisory lock serialises them; the later ones find nothing to do).

    Each revision is applied in its own transaction: when this returns, the database is at
    `revision`; if it raises (psycopg / SQLAlchemy errors), the database is at the last revision that
    completed, never half way through one.
    """
    config = _alembic_config()
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn, connect_timeout=10),
                           poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK_KEY})")
            conn.commit()
            try:
                before = _versions(conn)
                conn.commit()  # Alembic then runs each revision in a transaction of its own
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
                conn.commit()
                after = _versions(conn)
                if after != before:
                    log.info("PostgreSQL schema migrated from %s to %s", ", ".join(before) or "(none)",
                             ", ".join(after))
            finally:
                conn.rollback()
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK_KEY})")
                conn.commit()
    except DBAPIError as exc:  # callers handle psycopg's errors (e.g. OperationalError: unreachable)
        if isinstance(exc.orig, psycopg.Error):
            raise exc.orig from exc
        raise
    finally:
        engine.dispose()


def _versions(conn: SAConnection) -> tuple[str, ...]:
    if conn.exec_driver_sql("SELECT to_regclass('alembic_version')").scalar() is None:
        return ()
    return tuple(sorted(r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")))
