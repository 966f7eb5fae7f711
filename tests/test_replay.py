"""`tally replay`: the running consumer groups re-read the topic; the stores count each event once.

Real pieces: the collector (test client), spool, shipper, tansu, the rollup worker into PostgreSQL and the
loader into chDB, the rewind requests in PostgreSQL, and the `tally` CLI entry point.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from collector.backfill import backfill
from core.config import LOADER_GROUP, ROLLUP_GROUP
from olap.client import connect
from oltp import rewinds
from oltp.schema import ensure_schema
from spool.segments import SpoolWriter
from tally.cli import main
from tally.cmd_backfill import limits_for
from tally.cmd_replay import resolve_offsets, wait_applied
from tally.roots import build_loader_loop, build_rollup_loop
from tests.test_backfill import in_both_stores, write_jsonl
from tests.test_pipeline import Pipeline


@pytest.fixture()
def pipeline(settings):
    p = Pipeline(settings)
    yield p
    p.close()


def delete_from_clickhouse(settings, domain: str, n: int) -> None:
    ch = connect(settings.clickhouse_dsn)
    hashes = [r[0] for r in ch.query("SELECT hash FROM tally.events WHERE domain = {d:String}"
                                     " ORDER BY hash LIMIT {n:UInt32}",
                                     parameters={"d": domain, "n": n}).result_rows]
    ch.command("ALTER TABLE tally.events DELETE WHERE domain = {d:String} AND hash IN {h:Array(String)}",
               parameters={"d": domain, "h": hashes}, settings={"mutations_sync": 2})


def rewind_rows(settings) -> list[tuple]:
    ensure_schema(settings.pg_dsn)
    with psycopg.connect(settings.pg_dsn) as conn:
        return conn.execute("SELECT consumer_group, partition, next_offset, outcome FROM consumer_rewinds"
                            " WHERE topic = %s ORDER BY id", (settings.topic,)).fetchall()


def apply_now(*loops) -> None:
    """Run each loop's rewind check now (what its `step` does every few seconds)."""
    for loop in loops:
        loop.rewinder.check(loop)


def test_replay_changes_nothing_that_is_there_and_restores_deleted_clickhouse_rows(pipeline, domain, settings):
    pipeline.post([{"domain": domain, "url": f"https://{domain}/{i}?utm_medium=email", "type": "impression",
                    "referrer": "https://t.co/x"} for i in range(40)])
    pipeline.ship()
    pipeline.drain()
    assert in_both_stores(settings, domain) == (40, 40)
    delete_from_clickhouse(settings, domain, 10)
    assert in_both_stores(settings, domain) == (40, 30)

    topic_id, start = resolve_offsets(settings.kafka_bootstrap, settings.topic,
                                      since=datetime.now(UTC) - timedelta(hours=1))
    assert topic_id and sorted(start) == [0, 1, 2] and all(o == 0 for o in start.values())
    groups = [pipeline.rollups.sink.group, pipeline.loader.sink.group]
    request_id = rewinds.request(settings.pg_dsn, groups, settings.topic, topic_id, start)
    stored_before = (pipeline.rollups.stored_events, pipeline.loader.stored_events)
    apply_now(pipeline.rollups, pipeline.loader)
    rows = wait_applied(settings.pg_dsn, request_id, 5)
    assert [(r.group, r.partition, r.outcome) for r in rows] == sorted(
        (g, p, "applied") for g in groups for p in range(3))
    pipeline.drain()
    # Both groups read all 40 again; PostgreSQL counted none of them twice, ClickHouse got its 10 back.
    assert pipeline.rollups.stored_events - stored_before[0] == 40
    assert pipeline.loader.stored_events - stored_before[1] == 40
    assert in_both_stores(settings, domain) == (40, 40)
    assert pipeline.sql(f"SELECT count() FROM tally.events WHERE domain = '{domain}'") == [[40]]
    # The replayed records carry issue 17's fields (ADR 45): the restored rows have them as the others do.
    assert pipeline.sql(f"SELECT count() FROM tally.events WHERE domain = '{domain}' AND source = 'Twitter'"
                        " AND utm_medium = 'email' AND page = path(url)") == [[40]]


def test_rollup_group_does_not_recount_events_older_than_the_dedup_window_even_after_a_restart(
        pipeline, domain, settings, tmp_path):
    from oltp import sites

    sites.add(settings.pg_dsn, domain)
    now = datetime.now(UTC).replace(microsecond=0)
    old = [{"domain": domain, "url": f"https://{domain}/old{i}",
            "ts": (now - timedelta(days=20, minutes=i)).isoformat()}
           for i in range(10)]
    recent = [{"domain": domain, "url": f"https://{domain}/new{i}",
               "ts": (now - timedelta(days=1, minutes=i)).isoformat()}
              for i in range(5)]
    spool = SpoolWriter(settings.spool_dir, max_bytes=1 << 20, max_age_s=3600)
    backfill(write_jsonl(tmp_path / "history.jsonl", old + recent), spool=spool, progress_dir=tmp_path / "progress",
             registered=lambda d: d == domain, limits=limits_for(settings))
    spool.close()
    pipeline.ship()
    pipeline.drain()
    assert in_both_stores(settings, domain) == (15, 15)
    # What retention does to seen_events past the window (9 days): the old events' hashes are gone.
    old_hashes = [r[0].decode() if isinstance(r[0], bytes) else r[0] for r in connect(settings.clickhouse_dsn).query(
        "SELECT hash FROM tally.events FINAL WHERE domain = {d:String} AND ts < now() - INTERVAL 9 DAY",
        parameters={"d": domain}).result_rows]
    assert len(old_hashes) == 10
    with psycopg.connect(settings.pg_dsn) as conn:  # (the worker's own retention pass may have dropped them already)
        conn.execute("DELETE FROM seen_events WHERE hash = ANY(%s::uuid[])", (old_hashes,))
        conn.commit()
        assert conn.execute("SELECT count(*) FROM seen_events WHERE hash = ANY(%s::uuid[])",
                            (old_hashes,)).fetchone()[0] == 0

    group = pipeline.rollups.sink.group
    topic_id = pipeline.rollups.topic_id
    request_id = rewinds.request(settings.pg_dsn, [group], settings.topic, topic_id, {0: 0, 1: 0, 2: 0})
    apply_now(pipeline.rollups)
    assert {r.outcome for r in wait_applied(settings.pg_dsn, request_id, 5)} == {"applied"}
    # The worker dies before re-reading anything; a new one in the group resumes the replay (the lower
    # offsets were stored) and keeps the guard (the re-read marks are in PostgreSQL).
    pipeline.rollups.consumer.close()
    pipeline.rollups.sink.close()
    pipeline.rollups = build_rollup_loop(settings, group=group)
    pipeline.rollups.drain()
    assert pipeline.rollups.stored_events == 5  # the 5 recent ones re-read (and deduplicated) ...
    assert pipeline.rollups.rewinder.skipped_old == 10  # ... the 10 old ones not handed to PostgreSQL
    assert in_both_stores(settings, domain) == (15, 15)


def test_refusals_name_the_problem_and_request_nothing(pipeline, domain, settings, monkeypatch, capsys):
    for name, value in settings.raw.items():
        monkeypatch.setenv(name, value)
    pipeline.post([{"domain": domain, "url": f"https://{domain}/"}] * 3)
    pipeline.ship()
    pipeline.drain()
    cases = [
        (["--since", "2999-01-01T00:00:00Z"], "is in the future"),
        (["--since", "yesterday"], "is not an ISO-8601 time (e.g. 2026-11-23T10:00:00Z) nor a duration ago"),
        (["--since", "2026-01-01T00:00:00"], "has no UTC offset"),
        (["--offsets", "0:x"], "'0:x' is not partition:offset"),
        (["--offsets", "0:1,0:2"], "partition 0 appears more than once"),
        (["--offsets", "99:0"], "has partitions [0, 1, 2], not [99]"),
        (["--since", "1h", "--wait", "0"], "--wait must be between"),
    ]
    for argv, message in cases:
        assert main(["replay", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert rewind_rows(settings) == []

    # A rewind ahead of where the group is would skip records: the worker refuses it.
    group = pipeline.rollups.sink.group
    request_id = rewinds.request(settings.pg_dsn, [group], settings.topic, pipeline.rollups.topic_id, {0: 10**9})
    apply_now(pipeline.rollups)
    (row,) = wait_applied(settings.pg_dsn, request_id, 5)
    assert row.outcome.startswith("refused: offset 1000000000 is ahead of this group's position")
    # One of another incarnation of the topic is stale.
    request_id = rewinds.request(settings.pg_dsn, [group], settings.topic, "another-incarnation", {0: 0})
    apply_now(pipeline.rollups)
    (row,) = wait_applied(settings.pg_dsn, request_id, 5)
    assert row.outcome.startswith("stale: topic")

    # No worker of the default groups runs on this topic: the request is cancelled after --wait.
    assert main(["replay", "--offsets", "0:0", "--wait", "1"]) == 1
    captured = capsys.readouterr()
    assert "2 of 2 rewinds were not applied" in captured.err and "cancelled: no worker applied it" in captured.out
    assert [r[3].startswith("cancelled") for r in rewind_rows(settings)[-2:]] == [True, True]
    assert in_both_stores(settings, domain) == (3, 3)


def test_tally_replay_against_running_workers(pipeline, domain, settings, monkeypatch, capsys):
    """The CLI end to end: workers of both default groups run their loops; replay from 10 minutes ago."""
    for name, value in settings.raw.items():
        monkeypatch.setenv(name, value)
    loops = [build_rollup_loop(settings), build_loader_loop(settings)]
    assert [loop.sink.group for loop in loops] == [ROLLUP_GROUP, LOADER_GROUP]
    stop = threading.Event()
    threads = [threading.Thread(target=loop.run, args=(stop,), kwargs={"drain_on_stop_s": 5}) for loop in loops]
    for t in threads:
        t.start()
    try:
        pipeline.post([{"domain": domain, "url": f"https://{domain}/{i}"} for i in range(20)])
        pipeline.ship()
        wait_for(lambda: all(loop.stored_events >= 20 for loop in loops))
        delete_from_clickhouse(settings, domain, 5)
        assert in_both_stores(settings, domain) == (20, 15)
        assert main(["replay", "--since", "10m", "--wait", "60"]) == 0
        out = capsys.readouterr().out
        assert out.count("\tapplied") == 6 and "note: PostgreSQL: re-read events with an event time before" in out
        wait_for(lambda: all(loop.stored_events >= 40 for loop in loops))
        wait_for(lambda: in_both_stores(settings, domain) == (20, 20))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert in_both_stores(settings, domain) == (20, 20)


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_the_loader_goes_on_while_the_rewind_store_is_unreachable(pipeline, domain, settings):
    """PostgreSQL down must not stop the loader (ClickHouse): its rewind checks fail, back off, and it stores."""
    from oltp.rewinds import PostgresRewinds
    from workers.rewind import Rewinder

    dead = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens there
    pipeline.loader.rewinder = Rewinder(PostgresRewinds(dead), pipeline.loader.sink.group, check_s=0.05)
    pipeline.post([{"domain": domain, "url": f"https://{domain}/{i}"} for i in range(12)])
    pipeline.ship()
    pipeline.loader.drain()
    assert pipeline.loader.stored_events == 12
    assert pipeline.loader.rewinder._failures >= 1
    assert connect(settings.clickhouse_dsn).query("SELECT count() FROM tally.events FINAL WHERE domain = {d:String}",
                                                  parameters={"d": domain}).result_rows == [(12,)]


def test_since_and_offsets_parsing():
    from tally.cmd_replay import ReplayError, parse_offsets, parse_since

    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("999999d", now) == datetime(1970, 1, 1, tzinfo=UTC)  # "from the start"
    assert parse_since("2026-11-23T13:30:00+05:45", now) == datetime(2026, 11, 23, 7, 45, tzinfo=UTC)
    assert parse_offsets("0:5, 2:0") == {0: 5, 2: 0}
    for bad in ("-1:0", "0:-1", "0", "0:1:2", "a:b", "٣:0"):
        with pytest.raises(ReplayError, match="is not partition:offset"):
            parse_offsets(bad)
