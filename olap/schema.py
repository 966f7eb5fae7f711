"""ClickHouse schema for raw events, by versioned migrations (ADR 18). Works on chDB and on a server.

`ensure_schema(client, db, ttl_days)` applies, in order, every migration in MIGRATIONS not yet
recorded in `<db>.schema_migrations`, then makes the events TTL match `ttl_days`
(TALLY_RAW_RETENTION_DAYS; 0 = no TTL) with ALTER TABLE ... MODIFY TTL / REMOVE TTL when it differs.
Raw events stay partitioned by toYYYYMM(ts). chDB is owned by one process (ADR 3): run this where
that process starts. Every migration must be idempotent (IF NOT EXISTS ...): two servers-side
processes starting at once may both apply one, and a crash between a migration and its record
re-applies it.

On a cluster (`cluster`: TALLY_CLICKHOUSE_CLUSTER) the same migrations run in their cluster form (olap/cluster.py:
`events` Distributed over the ReplicatedReplacingMergeTree `events_local`, every other table replicated to every
node; docs/clickhouse-cluster.md, ADR 57); `planned_statements` lists what would run, for `tally migrate
--print-sql`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

from olap import catalog
from olap.analyst_tables import migration_3, migration_6
from olap.cluster import EVENTS_LOCAL, on_cluster

EVENT_COLUMNS = ("hash", "domain", "url", "ts", "received_at", "type", "value", "referrer", "user_agent",
                 "browser", "os", "device", "country", "visitor", "page", "source", "utm_medium", "utm_campaign")

DEFAULT_TTL_DAYS = 400


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: Callable[[str], list[str]]  # database name -> DDL statements


def _baseline(db: str) -> list[str]:
    """The release before migrations, verbatim (its default 400-day TTL included): adopts its databases."""
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        # ReplacingMergeTree on the sort key (day, domain, hash): duplicates of one event collapse on
        # merge, and the analyst endpoint reads with `final = 1` so they never show before that.
        f"""CREATE TABLE IF NOT EXISTS {db}.events (
            hash        FixedString(32),
            domain      LowCardinality(String),
            url         String,
            ts          DateTime64(3, 'UTC'),
            received_at DateTime64(3, 'UTC'),
            type        LowCardinality(String),
            value       Nullable(Decimal(18, 6)),
            referrer    Nullable(String),
            user_agent  Nullable(String),
            browser     LowCardinality(Nullable(String)),
            os          LowCardinality(Nullable(String)),
            device      LowCardinality(Nullable(String)),
            country     LowCardinality(Nullable(String)),
            visitor     Nullable(String)
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(ts)
        ORDER BY (toDate(ts), domain, hash)
        TTL toDateTime(ts) + INTERVAL 400 DAY
        SETTINGS non_replicated_deduplication_window = 1000""",
        f"""CREATE TABLE IF NOT EXISTS {db}.consumer_offsets (
            consumer_group String,
            topic          String,
            partition      UInt32,
            topic_id       String,
            next_offset    UInt64,
            written_at     DateTime64(6, 'UTC')
        ) ENGINE = ReplacingMergeTree(written_at)
        ORDER BY (consumer_group, topic, partition)""",
        f"""CREATE TABLE IF NOT EXISTS {db}.rejected_records (
            consumer_group String,
            topic          String,
            partition      UInt32,
            offset         UInt64,
            error          String,
            payload        String,
            rejected_at    DateTime64(3, 'UTC')
        ) ENGINE = MergeTree
        ORDER BY rejected_at
        TTL toDateTime(rejected_at) + INTERVAL 30 DAY""",
    ]


def _enrichment(db: str) -> list[str]:
    """Issue 17 (ADR 45): the event's page, source and campaign tags. Rows written before read as NULL.

    An ADD COLUMN changes metadata only (old parts are not rewritten). The loader needs no change: it
    inserts StoredEvent's fields by name (JSONEachRow), and skipped these until the columns existed."""
    return [f"ALTER TABLE {db}.events ADD COLUMN IF NOT EXISTS {name} {kind} AFTER {after}"
            for name, kind, after in (("page", "Nullable(String)", "visitor"),
                                      ("source", "LowCardinality(Nullable(String))", "page"),
                                      ("utm_medium", "LowCardinality(Nullable(String))", "source"),
                                      ("utm_campaign", "LowCardinality(Nullable(String))", "utm_medium"))]


# A month's partition takes events for 7 days after it ends (core/event.py Limits.max_past_age), then none but
# replays; a day later every part of it is older than this, and ClickHouse merges it into one part (ADR 54).
FORCE_MERGE_AGE_S = 8 * 86_400


def _force_merge_closed_months(db: str) -> list[str]:
    """ADR 54: merge a partition into one part once all its parts are FORCE_MERGE_AGE_S old. Analysts read with
    FINAL, which merges a partition's overlapping parts while reading; one part is read as it is (the 90-day
    questions: 17-44% faster on the bench). Sort key and monthly partitions stay: a setting, no rewrite."""
    return [f"ALTER TABLE {db}.events MODIFY SETTING min_age_to_force_merge_seconds = {FORCE_MERGE_AGE_S}, "
            "min_age_to_force_merge_on_partition_only = 1"]


# Ordered; append only, never edit a shipped one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline", _baseline),
    Migration(2, "page_source_campaign", _enrichment),
    Migration(3, "sites_countries_comments", migration_3),  # docs/adr/0052-analyst-dimensions.md
    Migration(4, "catalog_views", catalog.statements),  # docs/adr/0051-analyst-catalog.md
    Migration(5, "events_force_merge_closed_months", _force_merge_closed_months),  # docs/adr/0054-*.md
    Migration(6, "countries_regions", migration_6),  # docs/adr/0052-analyst-dimensions.md
)


def _ledger(db: str) -> str:
    return f"""CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
        version    UInt32,
        name       String,
        applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
    ) ENGINE = ReplacingMergeTree(applied_at)
    ORDER BY version"""


def _for(statements: list[str], db: str, cluster: str | None) -> list[str]:
    """`statements` as they run on one node (cluster None) or on `cluster`."""
    return statements if cluster is None else on_cluster(statements, db, cluster)


def _events_storage(cluster: str | None) -> str:
    """The table holding the events' rows and TTL: `events`, or on a cluster each shard's `events_local`."""
    return "events" if cluster is None else EVENTS_LOCAL


def planned_statements(db: str, ttl_days: int = DEFAULT_TTL_DAYS,
                       cluster: str | None = None) -> list[tuple[str, list[str]]]:
    """What `ensure_schema` runs on an empty database, as (heading, statements) in order: the database and the
    ledger, every migration, and the TTL when `ttl_days` is not the one migration 1 sets. Runs nothing."""
    _check_db(db)
    plan = [("database and migrations ledger", _for([f"CREATE DATABASE IF NOT EXISTS {db}", _ledger(db)], db, cluster))]
    plan += [(f"migration {m.version}: {m.name}", _for(m.statements(db), db, cluster)) for m in MIGRATIONS]
    if ttl_days != DEFAULT_TTL_DAYS:
        plan.append(("raw events TTL (TALLY_RAW_RETENTION_DAYS)", _for([_ttl_statement(db, ttl_days)], db, cluster)))
    return plan


def applied_versions(client: Client, db: str) -> set[int]:
    """Versions recorded in `<db>.schema_migrations` (empty when the ledger does not exist yet)."""
    exists = client.command(f"EXISTS TABLE {db}.schema_migrations")
    if str(exists).strip() != "1":
        return set()
    return {int(r[0]) for r in client.query(f"SELECT DISTINCT version FROM {db}.schema_migrations").result_rows}


def _check_db(db: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", db):
        raise ValueError(f"{db!r} is not a database identifier")


def events_ttl_days(client: Client, db: str, cluster: str | None = None) -> int | None:
    """The events table's current TTL in days (0 = none; None = a TTL this code did not set, which
    `apply_ttl` replaces); on a cluster, `events_local`'s on the node asked. Raises ValueError when the table
    does not exist."""
    table = _events_storage(cluster)
    row = client.query("SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = {t:String}",
                       parameters={"db": db, "t": table}).result_rows
    if not row:
        raise ValueError(f"{db}.{table} does not exist")
    engine_full = str(row[0][0])
    if " TTL " not in f" {engine_full} ":
        return 0
    match = re.search(r"TTL toDateTime\(ts\) \+ toIntervalDay\((\d+)\)", engine_full)
    return None if match is None else int(match.group(1))


def _ttl_statement(db: str, ttl_days: int) -> str:
    """The statement making the events TTL `ttl_days` (0: none), written for one node."""
    if ttl_days == 0:
        return f"ALTER TABLE {db}.events REMOVE TTL"
    return f"ALTER TABLE {db}.events MODIFY TTL toDateTime(ts) + INTERVAL {int(ttl_days)} DAY"


def apply_ttl(client: Client, db: str, ttl_days: int, cluster: str | None = None) -> bool:
    """Make the events TTL `ttl_days` (0 = remove it); True when it had to change.

    MODIFY TTL drops expired rows from existing parts in the background (a mutation), whole
    monthly partitions at a time where they are entirely expired.
    """
    if ttl_days < 0:
        raise ValueError("ttl_days must be >= 0")
    current = events_ttl_days(client, db, cluster)
    if current == ttl_days:
        return False
    for statement in _for([_ttl_statement(db, ttl_days)], db, cluster):
        client.command(statement)
    return True


def ensure_schema(client: Client, db: str, ttl_days: int = DEFAULT_TTL_DAYS, cluster: str | None = None) -> list[int]:
    """Apply the missing migrations in order, then the TTL; returns the versions applied now.

    When it returns, every migration is applied and recorded and the TTL is `ttl_days`. If a
    statement raises, the migrations before it stay applied and recorded; the failing one is not
    recorded and is re-applied (idempotently) next time. `cluster`: apply them in their cluster form
    (ON CLUSTER statements wait for every node, ClickHouse's distributed_ddl_task_timeout); a database with
    nothing to migrate runs no ON CLUSTER statement, so a node being down does not stop a process starting.
    """
    _check_db(db)
    if cluster is None or not applied_versions(client, db):
        for statement in _for([f"CREATE DATABASE IF NOT EXISTS {db}", _ledger(db)], db, cluster):
            client.command(statement)
    done = applied_versions(client, db)
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in _for(migration.statements(db), db, cluster):
            client.command(statement)
        client.insert(f"{db}.schema_migrations", [[migration.version, migration.name]],
                      column_names=["version", "name"])
        applied.append(migration.version)
    if 4 in done | set(applied):  # the catalog views follow ANALYST_TABLES, the endpoint's settings, the functions
        catalog.ensure_current(client, db, cluster)
    apply_ttl(client, db, ttl_days, cluster)
    return applied
