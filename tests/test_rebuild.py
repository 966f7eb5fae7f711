"""`tally rebuild` against real stores: rollups (all tiers) recomputed from chDB events, while ingestion runs."""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from olap.client import connect
from oltp.rebuild import chunks
from tally.roots import build_loader_loop, build_rollup_loop
from tests.test_reconcile import TRAFFIC, Stack, cli_runner, mid, rows, window

TIERS = ("rollup_15m", "rollup_1h")


@pytest.fixture()
def cli(settings, monkeypatch, capsys):
    return cli_runner(settings, monkeypatch, capsys)


@pytest.fixture()
def stack(settings):
    s = Stack(settings)
    yield s
    s.close()


# The tables by dimension, the value bins and the cap's admitted values (ADR 46).
DIMENSION_TABLES = ("rollup_dim_15m", "rollup_dim_1h", "rollup_dim_1d", "rollup_cube_1h", "rollup_cube_1d",
                    "value_bins_15m", "value_bins_1h", "value_bins_1d", "dim_keys")


def snapshot(dsn: str, domain: str) -> dict[str, list[tuple]]:
    out = {t: rows(dsn, domain, t) for t in TIERS}
    with psycopg.connect(dsn) as conn:
        out["rollup_1d"] = conn.execute("SELECT tz, event_type, bucket_start, events, valued, value_sum FROM rollup_1d"
                                        " WHERE domain = %s ORDER BY 1, 2, 3", (domain,)).fetchall()
        for table in DIMENSION_TABLES:
            out[table] = sorted(conn.execute(f"SELECT * FROM {table} WHERE domain = %s", (domain,)).fetchall())
    return out


def corrupt(dsn: str, domain: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE rollup_15m SET events = events * 2 + 1, value_sum = value_sum + 7 WHERE domain = %s",
                     (domain,))
        conn.execute("DELETE FROM rollup_15m WHERE domain = %s AND event_type = 'pageview'", (domain,))
        conn.execute("UPDATE rollup_1h SET events = 0 WHERE domain = %s", (domain,))
        conn.execute("DELETE FROM rollup_1d WHERE domain = %s AND event_type = 'impression'", (domain,))
        conn.execute("UPDATE rollup_dim_15m SET events = events + 1 WHERE domain = %s AND dimension = 'page'",
                     (domain,))
        conn.execute("DELETE FROM rollup_dim_1d WHERE domain = %s AND dimension = 'browser'", (domain,))
        conn.execute("UPDATE rollup_cube_1d SET value_sum = 1 WHERE domain = %s", (domain,))
        conn.execute("DELETE FROM value_bins_1h WHERE domain = %s", (domain,))
        conn.execute("UPDATE value_bins_15m SET count = count + 2 WHERE domain = %s", (domain,))
        conn.execute("DELETE FROM dim_keys WHERE domain = %s AND dimension = 'page'", (domain,))
        conn.execute("INSERT INTO rollup_dim_1h SELECT domain, event_type, bucket_start, 'country', 'ZZ', 5, 0, NULL"
                     " FROM rollup_1h WHERE domain = %s", (domain,))


def test_rebuild_restores_every_tier_and_running_it_twice_changes_nothing(stack, cli, settings, domain):
    stack.send(domain, TRAFFIC)
    good = snapshot(settings.pg_dsn, domain)
    assert all(good[t] for t in ("rollup_15m", "rollup_1h", "rollup_1d", *DIMENSION_TABLES))
    corrupt(settings.pg_dsn, domain)
    assert snapshot(settings.pg_dsn, domain) != good
    lo, hi = window()
    code, out, err = cli("reconcile", "--from", lo, "--to", hi, "--domain", domain)
    assert code == 1
    code, out, err = cli("rebuild", "--from", lo, "--to", hi, "--domain", domain)
    assert code == 0, err
    assert f"for {domain}" in out and "29 events" in out
    assert snapshot(settings.pg_dsn, domain) == good
    assert cli("reconcile", "--from", lo, "--to", hi, "--domain", domain)[0] == 0
    code, out, err = cli("rebuild", "--from", lo, "--to", hi, "--domain", domain, "--json")
    assert code == 0 and snapshot(settings.pg_dsn, domain) == good
    days = [json.loads(line) for line in out.splitlines()]
    assert sum(d["events"] for d in days) == 29 and all(d["tiers"] for d in days)
    assert sum(d["deleted"] for d in days) == sum(d["rows"] for d in days) == len(good["rollup_15m"])


def test_rebuild_touches_only_the_domain_and_range_asked(stack, cli, settings, domain):
    other = "other-" + domain
    stack.send(domain, TRAFFIC)
    stack.send(other, TRAFFIC)
    corrupt(settings.pg_dsn, other)
    corrupt(settings.pg_dsn, domain)
    broken_other = snapshot(settings.pg_dsn, other)
    # Only the quarter hour 10 minutes ago: the older rows of `domain` stay as they are (corrupt).
    lo, hi = mid(10) - timedelta(minutes=1), mid(10) + timedelta(minutes=1)
    assert cli("rebuild", "--from", lo.isoformat(), "--to", hi.isoformat(), "--domain", domain)[0] == 0
    assert snapshot(settings.pg_dsn, other) == broken_other
    code, out, _ = cli("reconcile", "--from", window()[0], "--to", window()[1], "--domain", domain, "--json")
    buckets = {d["bucket"] for d in json.loads(out)["differences"]}
    assert code == 1 and buckets and all(b < (mid(10) - timedelta(minutes=8)).isoformat() for b in buckets)


def test_rebuild_under_live_ingestion_then_reconcile_finds_nothing(stack, cli, settings, domain):
    sent = [stack.send(domain, TRAFFIC)]
    corrupt(settings.pg_dsn, domain)
    stop_feed, stop_workers = threading.Event(), threading.Event()
    workers = [threading.Thread(target=loop.run, args=(stop_workers,), daemon=True)
               for loop in (stack.rollups, stack.loader)]
    for w in workers:
        w.start()
    failures: list[BaseException] = []
    posted = [0]  # batches posted and shipped

    def feed() -> None:
        rng = random.Random(5)
        try:
            while not stop_feed.is_set():
                batch = [{"domain": domain, "url": f"https://{domain}/live/{rng.randint(1, 9)}",
                          "type": rng.choice(("impression", "pageview")),
                          "ts": (datetime.now(UTC) - timedelta(minutes=rng.randint(0, 150))).isoformat(),
                          **({"value": f"{rng.randint(1, 999) / 100:.2f}"} if rng.random() < 0.3 else {})}
                         for _ in range(rng.randint(5, 40))]
                stack.post(batch)
                sent[0] += len(batch)
                stack.ship()
                posted[0] += 1
                time.sleep(0.05)
        except BaseException as exc:
            failures.append(exc)

    def batches_later(count: int) -> None:
        """Wait (for the feeder, not the clock) until `count` more batches were posted and shipped."""
        target, deadline = posted[0] + count, time.monotonic() + 60
        while posted[0] < target and not failures:
            assert time.monotonic() < deadline, "the live feed stalled"
            time.sleep(0.02)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        batches_later(10)  # ingestion under way
        before = sent[0]
        lo, hi = window()
        code, out, err = cli("rebuild", "--from", lo, "--to", hi, "--domain", domain)
        assert code == 0, err
        batches_later(5)
        code, out, err = cli("rebuild", "--from", lo, "--to", hi, "--domain", domain)  # and once more, live
        assert code == 0, err
        batches_later(5)
        # Events kept arriving across both rebuilds (one rebuild alone may finish within one post on a
        # loaded machine, so the sender's progress is judged over the whole stretch).
        assert sent[0] > before
    finally:
        stop_feed.set()
        feeder.join(timeout=30)
        stack.ship()
        stop_workers.set()
        for w in workers:
            w.join(timeout=60)
    assert not failures, failures
    assert not any(w.is_alive() for w in workers)
    # Their drain on stop is bounded (20 s); on a loaded machine finish it with new instances of both groups.
    stack.rollups, stack.loader = build_rollup_loop(settings), build_loader_loop(settings)
    stack.drain()
    code, out, err = cli("reconcile", "--from", window()[0], "--to", window()[1], "--domain", domain)
    assert code == 0, out + err
    with psycopg.connect(settings.pg_dsn) as conn:
        pg_total = conn.execute("SELECT sum(events) FROM rollup_15m WHERE domain = %s", (domain,)).fetchone()[0]
        hourly = conn.execute("SELECT sum(events) FROM rollup_1h WHERE domain = %s", (domain,)).fetchone()[0]
    ch_total = connect(settings.clickhouse_dsn).query(
        "SELECT count() FROM tally.events FINAL WHERE domain = {d:String}", parameters={"d": domain}).result_rows[0][0]
    assert pg_total == ch_total == hourly == sent[0]  # every accepted event once: none lost, none twice


def test_rebuild_waits_for_a_lagging_loader_and_changes_nothing_if_it_never_comes(stack, cli, settings, domain):
    stack.send(domain, TRAFFIC)
    stack.post([{"domain": domain, "url": f"https://{domain}/more", "ts": mid(40).isoformat()}] * 3)
    stack.ship()
    stack.rollups.drain()  # PostgreSQL is ahead of ClickHouse
    corrupt(settings.pg_dsn, domain)
    broken = snapshot(settings.pg_dsn, domain)
    lo, hi = window()
    code, _, err = cli("rebuild", "--from", lo, "--to", hi, "--domain", domain, "--wait", "1")
    assert code == 3 and "loader" in err and "Nothing was changed" in err
    assert snapshot(settings.pg_dsn, domain) == broken
    stack.loader.drain()
    assert cli("rebuild", "--from", lo, "--to", hi, "--domain", domain, "--wait", "1")[0] == 0
    assert cli("reconcile", "--from", lo, "--to", hi, "--domain", domain)[0] == 0


def test_chunks_are_utc_days():
    t = datetime(2026, 3, 1, 22, 15, tzinfo=UTC)
    assert list(chunks(t, t + timedelta(days=1, hours=3))) == [
        (t, datetime(2026, 3, 2, tzinfo=UTC)),
        (datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC)),
        (datetime(2026, 3, 3, tzinfo=UTC), t + timedelta(days=1, hours=3))]
    assert list(chunks(t, t + timedelta(minutes=15))) == [(t, t + timedelta(minutes=15))]


def test_rebuild_caps_each_day_by_count_then_value_and_agrees_with_every_table(stack, cli, settings, domain,
                                                                               monkeypatch):
    """ADR 46: the live sink admits pages first come (cap 1000: all four here); a rebuild with TALLY_DIMENSION_CAP=2
    keeps the first 2 of the day by events, ties by value (/a 3, then /c before /d at 2 each) and counts the
    rest as '(other)' in the tables by dimension and the cube; every event is still counted once."""
    at = mid(10).isoformat()
    pages = ["/b", "/d", "/d", "/c", "/a", "/c", "/a", "/a"]
    stack.post([{"domain": domain, "url": f"https://{domain}{p}", "type": "pageview", "ts": at} for p in pages])
    stack.ship()
    stack.drain()

    def page_rows() -> tuple[dict[str, int], list[str], dict[str, int]]:
        with psycopg.connect(settings.pg_dsn) as conn:
            day = dict(conn.execute("SELECT key, sum(events)::int FROM rollup_dim_1d WHERE domain = %s"
                                    " AND dimension = 'page' GROUP BY key", (domain,)).fetchall())
            keys = [r[0] for r in conn.execute("SELECT key FROM dim_keys WHERE domain = %s AND dimension = 'page'"
                                               " ORDER BY key", (domain,)).fetchall()]
            cube = dict(conn.execute("SELECT page, sum(events)::int FROM rollup_cube_1h WHERE domain = %s"
                                     " GROUP BY page", (domain,)).fetchall())
        return day, keys, cube

    assert page_rows() == ({"/a": 3, "/b": 1, "/c": 2, "/d": 2}, ["/a", "/b", "/c", "/d"],
                           {"/a": 3, "/b": 1, "/c": 2, "/d": 2})
    monkeypatch.setenv("TALLY_DIMENSION_CAP", "2")
    lo, hi = window()
    code, out, err = cli("rebuild", "--from", lo, "--to", hi, "--domain", domain)
    assert code == 0, err
    capped = {"/a": 3, "/c": 2, "(other)": 3}
    assert page_rows() == (capped, ["/a", "/c"], capped)
    with psycopg.connect(settings.pg_dsn) as conn:
        devices = conn.execute("SELECT sum(events)::int FROM rollup_dim_15m WHERE domain = %s AND dimension = 'device'",
                               (domain,)).fetchone()[0]
    assert devices == len(pages)
