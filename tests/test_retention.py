"""Retention by dropping whole partitions, the bounded dedup window, and their settings (ADR 18).

Real embedded PostgreSQL; `tally retention` as a real subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from core.config import ConfigError, Settings
from oltp import partitions, prune
from oltp.partitions import ensure_partitions, keep_days_from, maintain, partition_for
from oltp.schema import ensure_schema

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def db(servers):
    name = f"ret_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = servers.pg_dsn.rsplit("/", 1)[0] + f"/{name}"
    ensure_schema(dsn)
    partitions.forget()
    yield dsn
    partitions.forget()
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def names(conn: psycopg.Connection, table: str) -> set[str]:
    return {p.name for p in partitions.list_partitions(conn, table)}


def add_rollup(conn: psycopg.Connection, table: str, t: datetime) -> None:
    ensure_partitions(conn, table, t, t)
    if table == "rollup_1d":
        conn.execute("INSERT INTO rollup_1d (domain, tz, event_type, bucket_start, events) VALUES ('r.example', 'UTC',"
                     " 'pageview', %s, 1)", (t,))
    else:
        conn.execute(f"INSERT INTO {table} (domain, event_type, bucket_start, events) VALUES ('r.example', 'pageview',"
                     " %s, 1)", (t,))
    conn.commit()


def settings(**env: str) -> Settings:
    return Settings.from_env({"TALLY_HOME": "/tmp/unused-tally-home", **env})


def test_drops_exactly_the_expired_partitions_per_tier(db):
    keep = {"rollup_15m": 10, "rollup_1h": 60, "rollup_1d": 0, "seen_events": 9}
    cutoff_15m = NOW - timedelta(days=10)  # 2026-06-05 12:00
    with psycopg.connect(db) as conn:
        for t in (NOW - timedelta(days=30), cutoff_15m - timedelta(days=1),  # whole day before: dropped
                  cutoff_15m - timedelta(hours=1),  # its day ends after the cutoff: kept (one row still inside)
                  NOW):
            add_rollup(conn, "rollup_15m", t)
        for t in (datetime(2026, 3, 31, 23, tzinfo=UTC), datetime(2026, 4, 16, tzinfo=UTC), NOW):
            add_rollup(conn, "rollup_1h", t)  # cutoff 2026-04-16 12:00: March dropped, April kept
        for t in (datetime(2001, 1, 1, tzinfo=UTC), NOW):
            add_rollup(conn, "rollup_1d", t)  # forever
        before = {t: names(conn, t) for t in keep}
        conn.commit()

        plans = maintain(conn, keep, NOW, dry_run=True)
        assert {t: names(conn, t) for t in keep} == before  # a dry run drops nothing
        conn.commit()
        expired = {p.table: [x.name for x in p.expired] for p in plans}
        assert expired["rollup_15m"] == ["rollup_15m_p20260516", "rollup_15m_p20260604"]
        assert expired["rollup_1h"] == ["rollup_1h_p202603"]
        assert expired["rollup_1d"] == []

        maintain(conn, keep, NOW)
        after = {t: names(conn, t) for t in keep}
        assert after["rollup_15m"] == (before["rollup_15m"] - {"rollup_15m_p20260516", "rollup_15m_p20260604"}) | {
            "rollup_15m_p20260616", "rollup_15m_p20260617"}  # and two days ahead created
        assert "rollup_1h_p202603" not in after["rollup_1h"] and "rollup_1h_p202604" in after["rollup_1h"]
        assert "rollup_1d_p2001" in after["rollup_1d"]
        rows = conn.execute("SELECT bucket_start FROM rollup_15m ORDER BY 1").fetchall()
        assert [r[0] for r in rows] == [cutoff_15m - timedelta(hours=1), NOW]
        conn.commit()
        assert maintain(conn, keep, NOW)[0].expired == ()  # a second pass finds nothing


def test_retention_refuses_a_connection_inside_a_transaction(db):
    old = NOW - timedelta(days=5)
    with psycopg.connect(db) as conn:
        add_rollup(conn, "rollup_15m", old)
        before = names(conn, "rollup_15m")
        conn.commit()
        conn.execute("SELECT 1")  # a transaction is open now
        with pytest.raises(ValueError, match="outside any transaction"):
            maintain(conn, {"rollup_15m": 1}, NOW)
        with pytest.raises(ValueError, match="outside any transaction"):
            partitions.drop_partitions(conn, [partition_for("rollup_15m", old)])
        conn.rollback()
        assert names(conn, "rollup_15m") == before  # nothing dropped


def test_dedup_window_never_forgets_an_event_the_collector_still_accepts(db):
    s = settings()  # max past age 7 days -> window 9 days
    keep = keep_days_from(s)
    assert keep["seen_events"] == 9
    oldest_accepted = NOW - timedelta(seconds=s.max_past_age_s)
    h = uuid.uuid4()
    with psycopg.connect(db) as conn:
        for t in (NOW - timedelta(days=10), oldest_accepted):
            ensure_partitions(conn, "seen_events", t, t)
        conn.execute("INSERT INTO seen_events VALUES (%s, %s)", (uuid.uuid4(), NOW - timedelta(days=10)))
        conn.execute("INSERT INTO seen_events VALUES (%s, %s)", (h, oldest_accepted))
        conn.commit()
        # Retention a day later (the duplicate took a day through spool and broker): still remembered.
        maintain(conn, keep, NOW + timedelta(days=1))
        assert partition_for("seen_events", NOW - timedelta(days=10)).name not in names(conn, "seen_events")
        again = conn.execute("INSERT INTO seen_events VALUES (%s, %s) ON CONFLICT (hash, ts) DO NOTHING RETURNING hash",
                             (h, oldest_accepted)).fetchall()
        assert again == []  # the late duplicate is recognised, not counted twice


@pytest.mark.parametrize("env, variable, words", [
    ({"TALLY_DEDUP_WINDOW_DAYS": "7"}, "TALLY_DEDUP_WINDOW_DAYS", "does not cover TALLY_MAX_PAST_AGE_S"),
    ({"TALLY_MAX_PAST_AGE_S": str(30 * 86_400), "TALLY_DEDUP_WINDOW_DAYS": "30"}, "TALLY_DEDUP_WINDOW_DAYS",
     "plus one day"),
    ({"TALLY_DEDUP_WINDOW_DAYS": "0"}, "TALLY_DEDUP_WINDOW_DAYS", "out of range"),
    ({"TALLY_SPOOL_RETAIN_S": str(5 * 86_400), "TALLY_DEDUP_WINDOW_DAYS": "9"}, "TALLY_DEDUP_WINDOW_DAYS",
     "TALLY_SPOOL_RETAIN_S"),
    ({"TALLY_RETENTION_15M_DAYS": "800"}, "TALLY_RETENTION_15M_DAYS", "exceeds TALLY_RETENTION_1H_DAYS"),
    ({"TALLY_RETENTION_15M_DAYS": "0"}, "TALLY_RETENTION_15M_DAYS", "forever exceeds"),
    ({"TALLY_RETENTION_1D_DAYS": "365"}, "TALLY_RETENTION_1H_DAYS", "exceeds TALLY_RETENTION_1D_DAYS"),
    ({"TALLY_RETENTION_1H_DAYS": "-1"}, "TALLY_RETENTION_1H_DAYS", "out of range"),
    ({"TALLY_RAW_RETENTION_DAYS": "soon"}, "TALLY_RAW_RETENTION_DAYS", "not an integer"),
])
def test_settings_refusals_name_the_variable(env, variable, words):
    with pytest.raises(ConfigError) as info:
        settings(**env)
    assert info.value.variable == variable
    assert words in str(info.value)


def test_settings_defaults_and_derived_window():
    s = settings()
    assert (s.retention_15m_days, s.retention_1h_days, s.retention_1d_days, s.raw_retention_days) == (90, 730, 0, 400)
    assert s.dedup_window_days == 9
    assert settings(TALLY_MAX_PAST_AGE_S=str(10 * 86_400 + 1)).dedup_window_days == 13  # rounded up, + 2
    assert settings(TALLY_MAX_PAST_AGE_S="3600").dedup_window_days == 3
    assert settings(TALLY_SPOOL_RETAIN_S=str(5 * 86_400)).dedup_window_days == 13  # 7 + 5 + 1 days
    # a coarser tier kept forever allows any finer retention
    assert settings(TALLY_RETENTION_1H_DAYS="0", TALLY_RETENTION_15M_DAYS="5000").retention_15m_days == 5000


def _tally(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tally.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})


def test_tally_retention_cli(db, tmp_path):
    old = datetime.now(UTC) - timedelta(days=200)
    with psycopg.connect(db) as conn:
        add_rollup(conn, "rollup_15m", old)
        add_rollup(conn, "rollup_1h", old - timedelta(days=800))
    env = {"TALLY_HOME": str(tmp_path), "TALLY_PG_DSN": db}
    dry = _tally(["retention", "--dry-run", "--json"], env)
    assert dry.returncode == 0, dry.stderr
    out = json.loads(dry.stdout)
    assert out["dry_run"] is True
    by_table = {t["table"]: t for t in out["tables"]}
    assert set(by_table) == set(partitions.TABLES)  # the tiers, seen_events and the tables by dimension (ADR 46)
    assert [x["name"] for x in by_table["rollup_15m"]["expired"]] == [partition_for("rollup_15m", old).name]
    assert by_table["rollup_1d"]["keep_days"] == 0 and by_table["rollup_1d"]["cutoff"] is None
    with psycopg.connect(db) as conn:
        assert partition_for("rollup_15m", old).name in names(conn, "rollup_15m")  # still there
    text = _tally(["retention", "--dry-run"], env)
    assert text.returncode == 0 and "would drop" in text.stdout and partition_for("rollup_15m", old).name in text.stdout
    done = _tally(["retention"], env)
    assert done.returncode == 0, done.stderr
    assert "dropped" in done.stdout
    with psycopg.connect(db) as conn:
        assert partition_for("rollup_15m", old).name not in names(conn, "rollup_15m")
        assert conn.execute("SELECT count(*) FROM rollup_15m").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM rollup_1h").fetchone()[0] == 0


def test_tally_retention_names_an_unreachable_postgres(tmp_path):
    from infra.processes import free_port

    proc = _tally(["retention", "--dry-run"], {"TALLY_HOME": str(tmp_path),
                                               "TALLY_PG_DSN": f"postgresql://postgres@127.0.0.1:{free_port()}/x"})
    assert proc.returncode == 1 and "cannot reach PostgreSQL" in proc.stderr


def test_worker_maintenance_thread_creates_partitions_ahead(db):
    from tally.roots import start_partition_maintenance

    now = datetime.now(UTC)
    ahead = partition_for("rollup_1h", partition_for("rollup_1h", partition_for("rollup_1h", now).end).end)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{ahead.name}"')
    partitions.forget()
    stop = start_partition_maintenance(settings(TALLY_PG_DSN=db), db, interval_s=3600)
    try:
        deadline = time.monotonic() + 60
        with psycopg.connect(db, autocommit=True) as conn:
            while ahead.name not in names(conn, "rollup_1h"):
                assert time.monotonic() < deadline, "the maintenance pass did not create the partitions ahead"
                time.sleep(0.2)
    finally:
        stop.set()


# ---------------------------------------------------------------- ingestion status tables (oltp/prune.py)


def add_status(conn: psycopg.Connection, t: datetime, domain: str = "r.example") -> None:
    conn.execute("INSERT INTO ingestion_15m (domain, bucket_start, accepted) VALUES (%s, %s, 1)", (domain, t))
    conn.execute("INSERT INTO collector_refusals (domain, reason, bucket_start, events)"
                 " VALUES (%s, 'rate_limited', %s, 2)",
                 (domain, t))
    conn.commit()


def status_rows(conn: psycopg.Connection) -> dict[str, list[datetime]]:
    rows = {t: [r[0] for r in conn.execute(f"SELECT bucket_start FROM {t} ORDER BY 1")] for t in prune.STATUS_TABLES}
    conn.commit()  # leaves no transaction open (prune_status refuses one)
    return rows


def test_status_rows_expire_with_the_15_minute_tier(db, monkeypatch):
    keep = 90
    cutoff = NOW - timedelta(days=keep)
    kept = [cutoff, cutoff + timedelta(minutes=15), NOW]
    expired = [cutoff - timedelta(minutes=15), NOW - timedelta(days=400)]
    monkeypatch.setattr(prune, "BATCH_ROWS", 1)  # several delete transactions, as a large backlog would take
    with psycopg.connect(db) as conn:
        for t in kept + expired:
            add_status(conn, t)
        dry = prune.prune_status(conn, keep, NOW, dry_run=True)
        assert [(r.table, r.cutoff, r.expired_rows) for r in dry] == [
            ("ingestion_15m", cutoff, 2), ("collector_refusals", cutoff, 2)]
        # a dry run changes nothing
        assert status_rows(conn) == {t: sorted(kept + expired) for t in prune.STATUS_TABLES}
        done = prune.prune_status(conn, keep, NOW)
        assert [r.expired_rows for r in done] == [2, 2]
        assert status_rows(conn) == {t: sorted(kept) for t in prune.STATUS_TABLES}
        assert [r.expired_rows for r in prune.prune_status(conn, keep, NOW)] == [0, 0]  # idempotent
        forever = prune.prune_status(conn, 0, NOW + timedelta(days=5000))
        assert [(r.cutoff, r.expired_rows) for r in forever] == [(None, 0), (None, 0)]
        assert status_rows(conn) == {t: sorted(kept) for t in prune.STATUS_TABLES}


def test_status_pruning_refuses_bad_calls(db):
    with psycopg.connect(db) as conn:
        with pytest.raises(ValueError, match="keep_days"):
            prune.prune_status(conn, -1, NOW)
        with pytest.raises(ValueError, match="timezone-aware"):
            prune.prune_status(conn, 5, NOW.replace(tzinfo=None))
        conn.execute("SELECT 1")  # a transaction is open now
        with pytest.raises(ValueError, match="outside any transaction"):
            prune.prune_status(conn, 5, NOW)


def test_tally_retention_cli_prunes_the_status_tables(db, tmp_path):
    old, recent = datetime.now(UTC) - timedelta(days=100), datetime.now(UTC) - timedelta(days=1)
    with psycopg.connect(db) as conn:
        add_status(conn, old)
        add_status(conn, recent)
    env = {"TALLY_HOME": str(tmp_path), "TALLY_PG_DSN": db}
    dry = _tally(["retention", "--dry-run", "--json"], env)
    assert dry.returncode == 0, dry.stderr
    assert {r["table"]: (r["keep_days"], r["expired_rows"]) for r in json.loads(dry.stdout)["status_tables"]} == {
        "ingestion_15m": (90, 1), "collector_refusals": (90, 1)}
    done = _tally(["retention"], env)
    assert done.returncode == 0, done.stderr
    assert any(line.split()[:1] == ["ingestion_15m"] and line.split()[-3:] == ["(rows)", "1", "-"]
               for line in done.stdout.splitlines()), done.stdout
    with psycopg.connect(db) as conn:
        assert [len(v) for v in status_rows(conn).values()] == [1, 1]


def test_the_tables_by_dimension_follow_their_tiers_retention_and_dim_keys_the_dedup_window(db):
    """ADR 46: rollup_dim_*, rollup_cube_* and value_bins_* are kept as long as their tier (dropped by whole
    partitions with it), dim_keys as long as the dedup window."""
    s = settings(TALLY_RETENTION_15M_DAYS="10", TALLY_RETENTION_1H_DAYS="60", TALLY_RETENTION_1D_DAYS="600")
    keep = keep_days_from(s)
    for tier, days in (("15m", 10), ("1h", 60), ("1d", 600)):
        for table in partitions.TIER_TABLES[tier]:
            assert keep[table] == days, table
    assert {"rollup_dim_15m", "value_bins_15m", "rollup_cube_1h", "rollup_cube_1d"} <= set(keep)
    assert keep["dim_keys"] == keep["seen_events"] == 9
    old_15m, old_1h, old_1d, old_key = (NOW - timedelta(days=12), datetime(2026, 3, 31, 23, tzinfo=UTC),
                                        datetime(2023, 6, 1, tzinfo=UTC), NOW - timedelta(days=11))
    with psycopg.connect(db) as conn:
        for table, t in (("rollup_dim_15m", old_15m), ("value_bins_15m", old_15m), ("rollup_dim_1h", old_1h),
                         ("rollup_cube_1h", old_1h), ("value_bins_1d", old_1d), ("rollup_dim_1d", old_1d),
                         ("dim_keys", old_key), ("rollup_dim_15m", NOW), ("dim_keys", NOW)):
            ensure_partitions(conn, table, t, t)
        conn.execute("INSERT INTO rollup_dim_15m VALUES ('r.example', 'pageview', %s, 'page', '/', 1, 0, NULL),"
                     " ('r.example', 'pageview', %s, 'page', '/', 1, 0, NULL)", (old_15m, NOW))
        conn.execute("INSERT INTO dim_keys VALUES ('r.example', 'page', %s, '/'), ('r.example', 'page', %s, '/')",
                     (old_key, NOW))
        conn.commit()
        plans = {p.table: [x.name for x in p.expired] for p in maintain(conn, keep, NOW)}
        assert plans["rollup_dim_15m"] == [partition_for("rollup_dim_15m", old_15m).name]
        assert plans["value_bins_15m"] == [partition_for("value_bins_15m", old_15m).name]
        assert plans["rollup_dim_1h"] == ["rollup_dim_1h_p202603"]
        assert plans["rollup_cube_1h"] == ["rollup_cube_1h_p202603"]
        assert plans["value_bins_1d"] == ["value_bins_1d_p2023"] and plans["rollup_dim_1d"] == ["rollup_dim_1d_p2023"]
        assert plans["dim_keys"] == [partition_for("dim_keys", old_key).name]
        assert conn.execute("SELECT bucket_start FROM rollup_dim_15m").fetchall() == [(NOW,)]
        assert conn.execute("SELECT day_start FROM dim_keys").fetchall() == [(NOW,)]
