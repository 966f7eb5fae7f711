"""oltp.partitions: naming, creating (idempotent, cached, concurrent) — real embedded PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from oltp import partitions
from oltp.partitions import ensure_partitions, partition_for, partitions_covering
from oltp.schema import ensure_schema

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(servers):
    """A fresh database migrated to head: (dsn)."""
    name = f"part_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = servers.pg_dsn.rsplit("/", 1)[0] + f"/{name}"
    ensure_schema(dsn)
    partitions.forget()
    yield dsn
    partitions.forget()
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def names(conn: psycopg.Connection, table: str) -> list[str]:
    return [p.name for p in partitions.list_partitions(conn, table)]


def test_periods_and_names_cross_month_and_year_ends():
    t = datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    assert partition_for("rollup_15m", t).name == "rollup_15m_p20251231"
    assert partition_for("seen_events", t).end == datetime(2026, 1, 1, tzinfo=UTC)
    assert partition_for("rollup_1h", t).name == "rollup_1h_p202512"
    assert partition_for("rollup_1h", t).end == datetime(2026, 1, 1, tzinfo=UTC)
    assert partition_for("rollup_1d", t).name == "rollup_1d_p2025"
    # an instant given in another zone lands by its UTC time
    berlin_new_year = datetime(2026, 1, 1, 0, 30, tzinfo=UTC) + timedelta(hours=0)
    assert partition_for("rollup_15m", berlin_new_year.astimezone()).name == "rollup_15m_p20260101"
    covering = partitions_covering("rollup_1h", datetime(2024, 11, 5, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC))
    assert [p.name for p in covering] == ["rollup_1h_p202411", "rollup_1h_p202412", "rollup_1h_p202501",
                                          "rollup_1h_p202502"]
    assert partitions.parse_partition_name("rollup_1h", "rollup_1h_p202502") == covering[-1]
    assert partitions.parse_partition_name("rollup_1h", "rollup_1h_p2025") is None
    assert partitions.parse_partition_name("rollup_1h", "rollup_1h_p202513") is None


@pytest.mark.parametrize("call, words", [
    (lambda: partition_for("sites", datetime.now(UTC)), "not a time-partitioned table"),
    (lambda: partition_for("rollup_15m", datetime(2025, 1, 1)), "timezone-aware"),
    (lambda: partitions_covering("rollup_15m", datetime(2025, 1, 2, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)),
     "hi is before lo"),
])
def test_bad_arguments_are_refused(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_ensure_creates_missing_partitions_and_rows_land_in_them(db):
    lo, hi = datetime(2024, 2, 28, 12, tzinfo=UTC), datetime(2024, 3, 1, 1, tzinfo=UTC)
    with psycopg.connect(db) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="no partition"):  # no DEFAULT partition
            conn.execute("INSERT INTO seen_events VALUES (%s, %s)", (uuid.uuid4(), lo))
        conn.rollback()
        ensure_partitions(conn, "seen_events", lo, hi)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # committed, not left open
        assert {"seen_events_p20240228", "seen_events_p20240229", "seen_events_p20240301"} <= set(
            names(conn, "seen_events"))
        conn.execute("INSERT INTO seen_events VALUES (%s, %s)", (uuid.uuid4(), lo))
        conn.execute("INSERT INTO seen_events VALUES (%s, %s)", (uuid.uuid4(), hi))
        conn.commit()
        before = names(conn, "seen_events")
        ensure_partitions(conn, "seen_events", lo, hi)  # idempotent
        partitions.forget()
        ensure_partitions(conn, "seen_events", lo, hi)  # also when the cache is cold
        assert names(conn, "seen_events") == before


def test_ensure_inside_a_transaction_joins_it(db):
    t = datetime(2023, 6, 1, tzinfo=UTC)
    with psycopg.connect(db) as conn:
        with conn.transaction():
            ensure_partitions(conn, "rollup_1h", t, t)
            conn.execute("INSERT INTO rollup_1h (domain, event_type, bucket_start, events) VALUES ('a', 'b', %s, 1)",
                         (t,))
        assert "rollup_1h_p202306" in names(conn, "rollup_1h")
        partitions.forget()
        with pytest.raises(RuntimeError):
            with conn.transaction():
                ensure_partitions(conn, "rollup_1d", t, t)
                raise RuntimeError("batch failed")
        assert "rollup_1d_p2023" not in names(conn, "rollup_1d")  # rolled back with the batch


def test_cache_answers_without_asking_the_database(db):
    t = datetime.now(UTC) + timedelta(days=30)
    name = partition_for("rollup_15m", t).name
    with psycopg.connect(db) as conn, psycopg.connect(db, autocommit=True) as other:
        ensure_partitions(conn, "rollup_15m", t, t)
        other.execute(f'DROP TABLE "{name}"')  # behind the cache's back
        ensure_partitions(conn, "rollup_15m", t, t)  # cached: no round trip, so not re-created
        assert name not in names(conn, "rollup_15m")
        partitions.forget("rollup_15m")  # what retention in this process does after dropping
        ensure_partitions(conn, "rollup_15m", t, t)
        assert name in names(conn, "rollup_15m")


def test_old_partitions_are_always_checked_so_another_process_may_drop_them(db):
    """Retention in another process may drop a partition of old events: the next call re-creates it."""
    t = datetime(2022, 1, 10, tzinfo=UTC)
    with psycopg.connect(db) as conn, psycopg.connect(db, autocommit=True) as other:
        ensure_partitions(conn, "seen_events", t, t)
        other.execute('DROP TABLE "seen_events_p20220110"')
        ensure_partitions(conn, "seen_events", t, t)
        assert "seen_events_p20220110" in names(conn, "seen_events")
        conn.execute("INSERT INTO seen_events VALUES (%s, %s)", (uuid.uuid4(), t))
        conn.commit()


def test_cache_is_per_database(db, servers):
    t = datetime(2021, 3, 3, tzinfo=UTC)
    other_name = f"part_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers.pg_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {other_name}")
    other_dsn = servers.pg_dsn.rsplit("/", 1)[0] + f"/{other_name}"
    try:
        ensure_schema(other_dsn)
        with psycopg.connect(db) as conn:
            ensure_partitions(conn, "rollup_15m", t, t)
        with psycopg.connect(other_dsn) as conn:
            ensure_partitions(conn, "rollup_15m", t, t)
            assert "rollup_15m_p20210303" in names(conn, "rollup_15m")
    finally:
        with psycopg.connect(servers.pg_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {other_name} WITH (FORCE)")


def test_unpartitioned_table_is_left_alone(servers):
    """A database not migrated yet (plain tables): ensure_partitions does nothing and raises nothing."""
    name = f"part_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers.pg_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    dsn = servers.pg_dsn.rsplit("/", 1)[0] + f"/{name}"
    try:
        ensure_schema(dsn, "0002")
        with psycopg.connect(dsn) as conn:
            ensure_partitions(conn, "seen_events", datetime(2020, 1, 1, tzinfo=UTC), datetime(2020, 1, 5, tzinfo=UTC))
            assert partitions.is_partitioned(conn, "seen_events") is False
            assert conn.execute(
                "SELECT count(*) FROM pg_class WHERE relname ~ '^seen_events_p[0-9]'").fetchone()[0] == 0
    finally:
        partitions.forget()
        with psycopg.connect(servers.pg_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_concurrent_creation_from_several_processes(db):
    code = ("import sys; from datetime import datetime, UTC; import psycopg; from oltp.partitions import "
            "ensure_partitions\nwith psycopg.connect(sys.argv[1]) as c:\n"
            "    ensure_partitions(c, 'seen_events', datetime(2019, 1, 1, tzinfo=UTC),"
            " datetime(2019, 3, 1, tzinfo=UTC))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, db], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    with psycopg.connect(db) as conn:
        made = [n for n in names(conn, "seen_events") if n.startswith("seen_events_p2019")]
    assert len(made) == 31 + 28 + 1


def test_ensure_for_instants_fills_no_gaps(db):
    with psycopg.connect(db) as conn:
        partitions.ensure_partitions_for(conn, "rollup_15m", [datetime(2018, 1, 1, 5, tzinfo=UTC),
                                                               datetime(2018, 6, 1, 5, tzinfo=UTC)])
        assert [n for n in names(conn, "rollup_15m") if "p2018" in n] == ["rollup_15m_p20180101",
                                                                           "rollup_15m_p20180601"]


# --- a missing partition, told by SQLSTATE and diagnostics, not by the message --------------------------------

# PostgreSQL's German translation of "no partition of relation %s found for row": what a server whose
# lc_messages is de_DE says. The embedded server ships no translations, so PL/pgSQL raises it with the
# same SQLSTATE and diagnostics the partition router sets (check_violation, the table, no constraint).
GERMAN_NO_PARTITION = "keine Partition von Relation »seen_events« für Zeile gefunden"


def server_error(conn: psycopg.Connection, sql: str, params: tuple = ()) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(sql, params)
    conn.rollback()
    return caught.value


def test_a_missing_partition_is_known_by_sqlstate_and_table_not_by_the_message(db):
    old = datetime(1999, 1, 1, tzinfo=UTC)
    with psycopg.connect(db) as conn:
        english = server_error(conn, "INSERT INTO seen_events VALUES (%s, %s)", (uuid.uuid4(), old))
        german = server_error(conn, f"DO $$ BEGIN RAISE EXCEPTION USING MESSAGE = '{GERMAN_NO_PARTITION}',"
                              " ERRCODE = 'check_violation', SCHEMA = 'public', TABLE = 'seen_events'; END $$")
        ensure_partitions(conn, "seen_events", old, old)
        outside = server_error(conn, "INSERT INTO seen_events_p19990101 VALUES (%s, %s)",
                               (uuid.uuid4(), old + timedelta(days=2)))  # a partition's bounds: not missing
        constraint = server_error(conn, "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset)"
                                  " VALUES ('g', 't', 0, -1)")  # a CHECK constraint: not a partition
    assert "no partition of relation" in str(english) and "no partition" not in str(german)
    assert all(e.sqlstate == "23514" for e in (english, german, outside, constraint))
    assert partitions.is_missing_partition(english) and partitions.is_missing_partition(german)
    assert not partitions.is_missing_partition(outside) and not partitions.is_missing_partition(constraint)
    assert not partitions.is_missing_partition(ValueError("no partition of relation"))


def test_the_rollup_sink_retries_a_missing_partition_under_a_non_english_server(db):
    """The server answers the sink's first write with the German message (a trigger raising it once, as a
    de_DE server routing a row into a just dropped partition would): the sink forgets its partition cache
    and writes again, instead of letting the batch look refused (filed as rejected, or retried forever)."""
    from core.batch import Batch
    from core.event import StoredEvent
    from oltp.rollup_sink import RollupSink

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE fail_once")
        conn.execute("CREATE FUNCTION german_missing_partition() RETURNS trigger LANGUAGE plpgsql AS $$"
                     " BEGIN IF nextval('fail_once') = 1 THEN RAISE EXCEPTION USING MESSAGE = "
                     f"'{GERMAN_NO_PARTITION}', ERRCODE = 'check_violation', SCHEMA = 'public',"
                     " TABLE = 'seen_events'; END IF; RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER german BEFORE INSERT ON seen_events FOR EACH ROW"
                     " EXECUTE FUNCTION german_missing_partition()")
    now = datetime.now(UTC)
    events = [StoredEvent(v=1, hash=uuid.uuid4().hex, domain="a.example", url="https://a.example/", ts=now,
                          received_at=now, type="pageview") for _ in range(3)]
    sink = RollupSink(db, "g")
    try:
        sink.write(Batch(topic="t", topic_id="T", events=events, next_offsets={0: 3}, first_offsets={0: 0}))
    finally:
        sink.close()
    with psycopg.connect(db) as conn:
        # refused at its first row, then every row written
        assert conn.execute("SELECT last_value FROM fail_once").fetchone()[0] == 1 + len(events)
        assert conn.execute("SELECT sum(events) FROM rollup_15m WHERE domain = 'a.example'").fetchone()[0] == 3
        assert conn.execute("SELECT next_offset FROM consumer_offsets WHERE consumer_group = 'g'").fetchone()[0] == 3
