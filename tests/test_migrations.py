"""Schema migrations (ADR 18): PostgreSQL by Alembic, ClickHouse by versioned statements; `tally migrate`.

Real embedded PostgreSQL (a fresh database per test on the session's server) and real chDB.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from oltp import partitions
from oltp.schema import current_revisions, ensure_schema, head_revisions, metadata

baseline = importlib.import_module("oltp.migrations.versions.0001_baseline")
ROOT = Path(__file__).resolve().parents[1]
PARTITIONED = ("rollup_15m", "rollup_1h", "rollup_1d", "seen_events")


@pytest.fixture
def fresh_dsn(servers):
    """A new, empty database on the session's PostgreSQL; dropped afterwards."""
    name = f"mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield servers.pg_dsn.rsplit("/", 1)[0] + f"/{name}"
    partitions.forget()
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def tables(dsn: str) -> dict[str, str]:
    """Every table of the public schema -> relkind ('r' plain, 'p' partitioned)."""
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT relname, relkind::text FROM pg_class"
                                 " WHERE relnamespace = 'public'::regnamespace"
                                 " AND relkind IN ('r', 'p')").fetchall())


def primary_key(conn: psycopg.Connection, table: str) -> list[str]:
    row = conn.execute("SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_constraint c"
                       " CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)"
                       " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum"
                       " WHERE c.conrelid = %s::regclass AND c.contype = 'p'", (table,)).fetchone()
    return list(row[0])


def schema_diff(dsn: str) -> list:
    """What Alembic's autogenerate sees between the database and `metadata` (partitions excluded)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            def include_name(name, type_, parent_names):
                if type_ == "table" and name:
                    return name != "alembic_version" and not any(
                        partitions.parse_partition_name(t, name) for t in partitions.TABLES)
                return True
            ctx = MigrationContext.configure(conn, opts={"include_name": include_name})
            return compare_metadata(ctx, metadata)
    finally:
        engine.dispose()


def test_empty_database_migrates_to_head_matching_metadata(fresh_dsn):
    assert current_revisions(fresh_dsn) == ()
    ensure_schema(fresh_dsn)
    assert current_revisions(fresh_dsn) == head_revisions()
    found = tables(fresh_dsn)
    for table in metadata.tables:
        assert table in found, table
    for table in PARTITIONED:
        assert found[table] == "p", f"{table} is not partitioned"
    assert schema_diff(fresh_dsn) == []
    with psycopg.connect(fresh_dsn) as conn:
        assert primary_key(conn, "seen_events") == ["ts", "hash"]
        # partitions for today and the next periods exist, so a fresh stack can write at once
        now = datetime.now(UTC)
        names = {p.name for p in partitions.list_partitions(conn, "rollup_15m")}
        assert partitions.partition_for("rollup_15m", now).name in names
        assert partitions.partition_for("rollup_15m", now + timedelta(days=2)).name in names


def _fill_previous_release(dsn: str, now: datetime) -> dict[str, list]:
    """Create the release-before-migrations schema with its own DDL and put rows in it."""
    old_days = [now - timedelta(days=400), now - timedelta(days=40), now - timedelta(days=3), now]
    hashes = [uuid.uuid4() for _ in old_days]
    with psycopg.connect(dsn) as conn:
        for ddl in (baseline.CORE, baseline.TOKENS, baseline.SITES, baseline.AUDIT, baseline.INGESTION):
            conn.execute(ddl)
        for h, t in zip(hashes, old_days, strict=True):
            conn.execute("INSERT INTO seen_events (hash, ts) VALUES (%s, %s)", (h, t))
            conn.execute("INSERT INTO rollup_15m (domain, event_type, bucket_start, events, valued, value_sum,"
                         " value_min, value_max) VALUES ('old.example', 'pageview', date_bin('15 minutes', %s,"
                         " TIMESTAMPTZ '2000-01-01'), 3, 1, 2.5, 2.5, 2.5)", (t,))
        conn.execute("INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset)"
                     " VALUES ('g', 't', 0, 42)")
        conn.execute("INSERT INTO sites (domain, site_key, secret) VALUES ('old.example', %s, %s)",
                     ("pk_" + "a" * 22, "sk_" + "b" * 43))
        conn.execute("INSERT INTO ingestion_15m (domain, bucket_start, accepted) VALUES ('old.example', %s, 7)",
                     (now,))
        return {
            "seen_events": conn.execute("SELECT hash, ts FROM seen_events ORDER BY hash").fetchall(),
            "rollup_15m": conn.execute("SELECT * FROM rollup_15m ORDER BY bucket_start").fetchall(),
            "consumer_offsets": conn.execute("SELECT consumer_group, topic, partition, next_offset"
                                             " FROM consumer_offsets").fetchall(),
            "sites": conn.execute("SELECT domain, site_key FROM sites").fetchall(),
            "ingestion_15m": conn.execute("SELECT domain, accepted FROM ingestion_15m").fetchall(),
        }


def test_previous_release_database_is_adopted_without_loss(fresh_dsn):
    now = datetime.now(UTC)
    before = _fill_previous_release(fresh_dsn, now)
    assert tables(fresh_dsn)["seen_events"] == "r"
    ensure_schema(fresh_dsn)
    assert current_revisions(fresh_dsn) == head_revisions()
    found = tables(fresh_dsn)
    assert all(found[t] == "p" for t in PARTITIONED)
    assert not [t for t in found if t.endswith("_unpartitioned")]
    with psycopg.connect(fresh_dsn) as conn:
        after = {
            "seen_events": conn.execute("SELECT hash, ts FROM seen_events ORDER BY hash").fetchall(),
            "rollup_15m": conn.execute("SELECT * FROM rollup_15m ORDER BY bucket_start").fetchall(),
            "consumer_offsets": conn.execute("SELECT consumer_group, topic, partition, next_offset"
                                             " FROM consumer_offsets").fetchall(),
            "sites": conn.execute("SELECT domain, site_key FROM sites").fetchall(),
            "ingestion_15m": conn.execute("SELECT domain, accepted FROM ingestion_15m").fetchall(),
        }
        assert after == before
        assert after["rollup_15m"][0][5] == Decimal("2.500000")
        # each old row sits in the partition of its own day (no default partition catching it)
        for h, ts in before["seen_events"]:
            where = conn.execute("SELECT tableoid::regclass::text FROM seen_events WHERE hash = %s", (h,)).fetchone()
            assert where[0] == partitions.partition_for("seen_events", ts).name
        assert primary_key(conn, "seen_events") == ["ts", "hash"]
        # the same (hash, ts) is still one event: the sink's ON CONFLICT (hash, ts) finds it
        h, ts = before["seen_events"][0]
        inserted = conn.execute("INSERT INTO seen_events (hash, ts) VALUES (%s, %s) ON CONFLICT (hash, ts)"
                                " DO NOTHING RETURNING hash", (h, ts)).fetchall()
        assert inserted == []
    assert schema_diff(fresh_dsn) == []


def test_database_at_previous_revision_keeps_its_tier_rows(fresh_dsn):
    ensure_schema(fresh_dsn, "0002")
    assert current_revisions(fresh_dsn) == ("0002",)
    assert tables(fresh_dsn)["rollup_1h"] == "r"
    t = datetime(2025, 12, 31, 23, tzinfo=UTC)
    with psycopg.connect(fresh_dsn) as conn:
        conn.execute("INSERT INTO rollup_1h (domain, event_type, bucket_start, events)"
                     " VALUES ('a.example', 'x', %s, 5)",
                     (t,))
        conn.execute("INSERT INTO rollup_1d (domain, tz, event_type, bucket_start, events)"
                     " VALUES ('a.example', 'Europe/Berlin', 'x', %s, 9)", (t,))
    ensure_schema(fresh_dsn)
    assert current_revisions(fresh_dsn) == head_revisions()
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT events, tableoid::regclass::text FROM rollup_1h").fetchall() == [
            (5, "rollup_1h_p202512")]
        assert conn.execute("SELECT events, tableoid::regclass::text FROM rollup_1d").fetchall() == [
            (9, "rollup_1d_p2025")]


def test_tables_made_on_first_use_are_adopted(fresh_dsn):
    """reconcile_runs and consumer_rewinds were created by their modules before revision 0005 (with the DDL
    the revision froze): 0005 adopts them, rows included."""
    rev = importlib.import_module("oltp.migrations.versions.0005_reconcile_and_rewinds")
    ensure_schema(fresh_dsn, "0004")
    with psycopg.connect(fresh_dsn) as conn:
        conn.execute(rev.RECONCILE)
        conn.execute(rev.REWINDS)
        conn.execute("INSERT INTO consumer_rewinds (request_id, consumer_group, topic, partition, next_offset)"
                     " VALUES (%s, 'g', 't', 0, 5)", (uuid.uuid4(),))
    ensure_schema(fresh_dsn)
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT consumer_group, next_offset FROM consumer_rewinds").fetchall() == [("g", 5)]
    assert schema_diff(fresh_dsn) == []


def test_only_migrations_create_tables():
    """The PostgreSQL schema is the migrations' (and `metadata`'s, which they are checked against): no product
    module creates one of its tables on first use (oltp/reconcile.py and oltp/rewinds.py used to)."""
    root = Path(__file__).resolve().parents[1]
    sources = {str(p.relative_to(root)): " ".join(p.read_text().split())
               for top in ("core", "collector", "spool", "workers", "oltp", "olap", "api", "infra", "tally")
               for p in (root / top).rglob("*.py") if "migrations" not in p.parts}
    creating = sorted((path, table) for path, text in sources.items() for table in metadata.tables
                      if f"CREATE TABLE IF NOT EXISTS {table} (" in text or f"CREATE TABLE {table} (" in text)
    assert creating == [], creating


def test_a_rewind_request_migrates_a_database_behind_instead_of_creating_its_table(fresh_dsn):
    """`tally replay` against a database not yet at 0005: the migrations bring it to the newest revision."""
    from oltp import rewinds

    ensure_schema(fresh_dsn, "0004")
    rewinds.request(fresh_dsn, ["g"], "t", "", {0: 5})
    assert current_revisions(fresh_dsn) == head_revisions()
    assert schema_diff(fresh_dsn) == []


def test_running_twice_changes_nothing(fresh_dsn):
    ensure_schema(fresh_dsn)
    first = tables(fresh_dsn)
    with psycopg.connect(fresh_dsn) as conn:
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    ensure_schema(fresh_dsn)
    assert tables(fresh_dsn) == first
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == version


def test_concurrent_first_starts_from_two_processes(fresh_dsn):
    code = "import sys; from oltp.schema import ensure_schema; ensure_schema(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, fresh_dsn], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert current_revisions(fresh_dsn) == head_revisions()
    assert all(tables(fresh_dsn)[t] == "p" for t in PARTITIONED)


def test_a_failing_revision_leaves_the_previous_one_intact(fresh_dsn):
    with psycopg.connect(fresh_dsn) as conn:
        conn.execute("CREATE TABLE seen_events_unpartitioned (x int)")  # in the way of revision 0003
    with pytest.raises(psycopg.Error, match="seen_events_unpartitioned"):
        ensure_schema(fresh_dsn)
    assert current_revisions(fresh_dsn) == ("0002",)  # 0001 and 0002 committed, each on its own
    found = tables(fresh_dsn)
    assert found["rollup_15m"] == "r" and found["seen_events"] == "r"  # nothing half-converted
    assert not [t for t in found if partitions.parse_partition_name("rollup_15m", t)]
    with psycopg.connect(fresh_dsn) as conn:
        conn.execute("INSERT INTO seen_events (hash, ts) VALUES (%s, now())", (uuid.uuid4(),))
        conn.execute("DROP TABLE seen_events_unpartitioned")
    ensure_schema(fresh_dsn)
    assert current_revisions(fresh_dsn) == head_revisions()
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM seen_events").fetchone()[0] == 1


# --- ClickHouse -----------------------------------------------------------------------------------

def _ch(servers):
    from olap.client import connect

    return connect(servers.chdb_dsn)


def _all_ch() -> list[int]:
    from olap.schema import MIGRATIONS

    return [m.version for m in MIGRATIONS]


ALL_CH = _all_ch()  # every ClickHouse migration, in order: what a database gets from scratch


def _previous_statements(db: str) -> list[str]:
    """What the release before migrations ran (olap.schema.statements(db) at its default 400 days)."""
    from olap.schema import _baseline

    return _baseline(db)


def test_clickhouse_empty_database_migrates_and_gets_its_ttl(servers):
    from olap import schema

    client, db = _ch(servers), f"mig_{uuid.uuid4().hex[:8]}"
    try:
        assert schema.ensure_schema(client, db, 120) == ALL_CH
        assert schema.applied_versions(client, db) == set(ALL_CH)
        assert schema.events_ttl_days(client, db) == 120
        key = client.query("SELECT partition_key FROM system.tables WHERE database = {d:String} AND name = 'events'",
                           parameters={"d": db}).result_rows[0][0]
        assert key == "toYYYYMM(ts)"
        assert schema.ensure_schema(client, db, 120) == []  # idempotent
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")


def test_clickhouse_previous_release_database_is_adopted_and_ttl_changes(servers):
    from olap import schema

    client, db = _ch(servers), f"mig_{uuid.uuid4().hex[:8]}"
    try:
        for statement in _previous_statements(db):
            client.command(statement)
        client.command(f"INSERT INTO {db}.events (hash, domain, url, ts, received_at, type) VALUES "
                       f"('{'a' * 32}', 'old.example', 'https://old.example/', now64(3), now64(3), 'pageview')")
        assert schema.applied_versions(client, db) == set()
        assert schema.ensure_schema(client, db) == ALL_CH  # default 400 days: the TTL it already had
        assert schema.events_ttl_days(client, db) == 400
        assert client.query(f"SELECT count() FROM {db}.events").result_rows[0][0] == 1
        schema.ensure_schema(client, db, 30)
        assert schema.events_ttl_days(client, db) == 30
        schema.ensure_schema(client, db, 0)
        assert schema.events_ttl_days(client, db) == 0
        assert schema.apply_ttl(client, db, 0) is False  # nothing to change
        schema.ensure_schema(client, db, 400)
        assert schema.events_ttl_days(client, db) == 400
        assert client.query(f"SELECT count() FROM {db}.events").result_rows[0][0] == 1
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")


def test_clickhouse_migration_2_adds_the_enrichment_columns_and_old_rows_read_null(servers):
    """Issue 17 (ADR 45): a database at version 1 with a row gets page/source/utm_medium/utm_campaign; the
    old row reads NULL in each, a new row keeps what it is given, and applying it again changes nothing."""
    from olap import schema

    client, db = _ch(servers), f"mig_{uuid.uuid4().hex[:8]}"
    try:
        for statement in _previous_statements(db):
            client.command(statement)
        client.command(f"INSERT INTO {db}.events (hash, domain, url, ts, received_at, type) VALUES "
                       f"('{'a' * 32}', 'old.example', 'https://old.example/a', now64(3), now64(3), 'pageview')")
        assert schema.ensure_schema(client, db) == ALL_CH
        client.command(f"INSERT INTO {db}.events (hash, domain, url, ts, received_at, type, page, source, utm_medium,"
                       f" utm_campaign) VALUES ('{'b' * 32}', 'old.example', 'https://old.example/b', now64(3),"
                       " now64(3), 'pageview', '/b', 'Hacker News', 'social', 'launch')")
        for statement in schema.MIGRATIONS[1].statements(db):  # idempotent: a crash before its record re-applies it
            client.command(statement)
        rows = client.query(f"SELECT url, page, source, utm_medium, utm_campaign FROM {db}.events ORDER BY url")
        assert rows.result_rows == [("https://old.example/a", None, None, None, None),
                                    ("https://old.example/b", "/b", "Hacker News", "social", "launch")]
        names = [r[0] for r in client.query(f"SELECT name FROM system.columns WHERE database = '{db}'"
                                            " AND table = 'events' ORDER BY position").result_rows]
        assert tuple(names) == schema.EVENT_COLUMNS
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")


def test_clickhouse_ttl_set_by_hand_is_replaced_by_the_setting(servers):
    from olap import schema

    client, db = _ch(servers), f"mig_{uuid.uuid4().hex[:8]}"
    try:
        schema.ensure_schema(client, db)
        client.command(f"ALTER TABLE {db}.events MODIFY TTL toDateTime(received_at) + INTERVAL 5 DAY")
        assert schema.events_ttl_days(client, db) is None
        schema.ensure_schema(client, db, 30)
        assert schema.events_ttl_days(client, db) == 30
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")


def test_clickhouse_refuses_a_database_name_that_is_not_an_identifier(servers):
    from olap import schema

    with pytest.raises(ValueError, match="not a database identifier"):
        schema.ensure_schema(_ch(servers), "x; DROP DATABASE tally")


# --- tally migrate --------------------------------------------------------------------------------

def _tally(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tally.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})


def test_tally_migrate_cli(fresh_dsn, tmp_path):
    env = {"TALLY_HOME": str(tmp_path), "TALLY_PG_DSN": fresh_dsn,
           "TALLY_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}", "TALLY_RAW_RETENTION_DAYS": "90"}
    status = _tally(["migrate", "--status", "--json", "--skip-clickhouse"], env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["postgresql"]["now"] == []
    assert tables(fresh_dsn) == {}  # --status changed nothing
    first = _tally(["migrate", "--json"], env)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["postgresql"]["before"] == [] and out["postgresql"]["now"] == list(head_revisions())
    assert out["clickhouse"]["applied"] == ALL_CH and out["clickhouse"]["ttl_days"] == 90
    again = _tally(["migrate"], env)
    assert again.returncode == 0, again.stderr
    assert "applied now: nothing" in again.stdout and "90 days" in again.stdout
    assert f"revision {', '.join(head_revisions())}" in again.stdout


def test_tally_migrate_names_an_unreachable_postgres(tmp_path):
    from infra.processes import free_port

    env = {"TALLY_HOME": str(tmp_path), "TALLY_PG_DSN": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
    proc = _tally(["migrate", "--skip-clickhouse"], env)
    assert proc.returncode == 1
    assert "cannot reach PostgreSQL" in proc.stderr


def test_tally_migrate_refuses_a_too_short_dedup_window(tmp_path):
    env = {"TALLY_HOME": str(tmp_path), "TALLY_MAX_PAST_AGE_S": str(10 * 86_400), "TALLY_DEDUP_WINDOW_DAYS": "10"}
    proc = _tally(["migrate"], env)
    assert proc.returncode == 2
    assert "TALLY_DEDUP_WINDOW_DAYS" in proc.stderr and "TALLY_MAX_PAST_AGE_S" in proc.stderr


def downgrade(dsn: str, revision: str) -> None:
    """Alembic's downgrade, on a connection as ensure_schema makes it (no `tally` command does this)."""
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from oltp.schema import _alembic_config

    config = _alembic_config()
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, revision)
            conn.commit()
    finally:
        engine.dispose()


def test_downgrades_step_back_and_up_again_keeping_rows(fresh_dsn):
    """Every downgrade runs against a populated database: head -> 0004 -> 0003 -> 0002 -> 0001 keeps the
    rows of the tables that exist at each revision, and upgrading again reaches the same schema."""
    ensure_schema(fresh_dsn)
    t = datetime(2026, 3, 1, 12, tzinfo=UTC)
    h = uuid.uuid4()
    with psycopg.connect(fresh_dsn) as conn:
        partitions.ensure_partitions(conn, "rollup_15m", t, t)
        partitions.ensure_partitions(conn, "rollup_1h", t, t)
        partitions.ensure_partitions(conn, "seen_events", t, t + timedelta(days=1))
        conn.commit()
        conn.execute("INSERT INTO rollup_15m (domain, event_type, bucket_start, events)"
                     " VALUES ('a.example', 'x', %s, 3)",
                     (t,))
        conn.execute("INSERT INTO rollup_1h (domain, event_type, bucket_start, events)"
                     " VALUES ('a.example', 'x', %s, 3)",
                     (t,))
        # one hash at two instants: allowed by (hash, ts), not by the hash-only key before 0003
        conn.execute("INSERT INTO seen_events (hash, ts) VALUES (%s, %s), (%s, %s)", (h, t, h, t + timedelta(hours=1)))
        conn.execute("INSERT INTO reconcile_runs (source, range_from, range_to, status) VALUES ('cli', %s, %s, 'ok')",
                     (t, t))
    steps = [("0006", {"dashboard_sessions"}), ("0004", {"reconcile_runs", "consumer_rewinds"}),
             ("0003", {"rollup_1d_coverage"}), ("0002", set()),
             ("0001", {"rollup_1h", "rollup_1d"})]
    for revision, gone in steps:
        downgrade(fresh_dsn, revision)
        assert current_revisions(fresh_dsn) == (revision,)
        present = tables(fresh_dsn)
        assert not gone & present.keys(), revision
        with psycopg.connect(fresh_dsn) as conn:
            assert conn.execute("SELECT domain, events FROM rollup_15m").fetchall() == [("a.example", 3)], revision
            assert conn.execute("SELECT count(DISTINCT hash) FROM seen_events").fetchone()[0] == 1, revision
            if "rollup_1h" in present:
                assert conn.execute("SELECT events FROM rollup_1h").fetchall() == [(3,)], revision
    assert tables(fresh_dsn)["rollup_15m"] == "r" and tables(fresh_dsn)["seen_events"] == "r"
    with pytest.raises(NotImplementedError, match="by hand"):
        downgrade(fresh_dsn, "base")
    assert current_revisions(fresh_dsn) == ("0001",)
    ensure_schema(fresh_dsn)
    assert current_revisions(fresh_dsn) == head_revisions()
    assert tables(fresh_dsn)["rollup_15m"] == "p" and tables(fresh_dsn)["seen_events"] == "p"
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT events FROM rollup_15m").fetchall() == [(3,)]
    assert schema_diff(fresh_dsn) == []


def test_0009_adds_the_site_account_and_refusal_values_keeping_rows(fresh_dsn):
    """Issue 17 item 5: a database at 0008 with a site and a refusal count gets `sites.account` and
    `collector_refusals.value` (NULL for what was there), and 0009's downgrade drops them keeping the rows."""
    ensure_schema(fresh_dsn, "0008")
    t = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO sites (domain, site_key, secret) VALUES ('a.example', %s, %s)",
                     ("pk_" + "a" * 22, "sk_" + "b" * 43))
        conn.execute("INSERT INTO collector_refusals (domain, reason, bucket_start, events)"
                     " VALUES ('a.example', 'site_mismatch', %s, 4)", (t,))
    ensure_schema(fresh_dsn)
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT domain, account FROM sites").fetchall() == [("a.example", None)]
        assert conn.execute("SELECT events, value FROM collector_refusals").fetchall() == [(4, None)]
    assert schema_diff(fresh_dsn) == []
    downgrade(fresh_dsn, "0008")
    with psycopg.connect(fresh_dsn) as conn:
        columns = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns"
                                              " WHERE table_name IN ('sites', 'collector_refusals')").fetchall()}
        assert not {"account", "value"} & columns
        assert conn.execute("SELECT events FROM collector_refusals").fetchall() == [(4,)]
    ensure_schema(fresh_dsn)
    assert schema_diff(fresh_dsn) == []


def _partition_key_columns(conn: psycopg.Connection, table: str) -> set[tuple[str, ...]]:
    """The primary-key index columns of each partition of `table`, in index order."""
    rows = conn.execute(
        "SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_inherits h JOIN pg_index i ON i.indrelid = h.inhrelid"
        " AND i.indisprimary CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE h.inhparent = %s::regclass GROUP BY i.indexrelid", (table,)).fetchall()
    return {tuple(r[0]) for r in rows}


def test_0015_puts_seen_events_time_first_keeping_rows_and_dedup(fresh_dsn):
    """0015: seen_events' key (hash, ts) becomes (ts, hash), on the table and on every partition; its rows stay,
    the sink's ON CONFLICT (hash, ts) still finds an event already seen; the downgrade puts hash first again."""
    ensure_schema(fresh_dsn, "0014")
    t = datetime.now(UTC).replace(microsecond=0)
    seen = [(uuid.uuid4(), t - timedelta(hours=i)) for i in range(3)]
    with psycopg.connect(fresh_dsn) as conn:
        partitions.ensure_partitions(conn, "seen_events", t - timedelta(days=1), t)
        conn.commit()
        conn.cursor().executemany("INSERT INTO seen_events (hash, ts) VALUES (%s, %s)", seen)
        conn.commit()
        assert primary_key(conn, "seen_events") == ["hash", "ts"]
    ensure_schema(fresh_dsn)
    with psycopg.connect(fresh_dsn) as conn:
        assert primary_key(conn, "seen_events") == ["ts", "hash"]
        assert _partition_key_columns(conn, "seen_events") == {("ts", "hash")}
        assert sorted(conn.execute("SELECT hash, ts FROM seen_events").fetchall()) == sorted(seen)
        again = conn.execute("INSERT INTO seen_events (hash, ts) VALUES (%s, %s) ON CONFLICT (hash, ts)"
                             " DO NOTHING RETURNING hash", seen[0]).fetchall()
        assert again == []
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO seen_events (hash, ts) VALUES (%s, %s)", seen[1])
    assert schema_diff(fresh_dsn) == []
    downgrade(fresh_dsn, "0014")
    with psycopg.connect(fresh_dsn) as conn:
        assert primary_key(conn, "seen_events") == ["hash", "ts"]
        assert _partition_key_columns(conn, "seen_events") == {("hash", "ts")}
        assert conn.execute("SELECT count(*) FROM seen_events").fetchone()[0] == 3
