"""Rollup tiers 15m / 1h / 1d, routing between them, and retention (ADR 19), on real PostgreSQL.

Events go through the real sink (`RollupSink.write`); the tiers must add up to the same totals,
every tier must answer a series identically where it aligns, the router must pick the coarsest
aligned tier that still keeps the range, and a range no tier keeps must be refused with a 400 that
names the retention and what to ask instead.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import psycopg
import pytest

from core.batch import Batch
from core.event import StoredEvent
from oltp import sites, tiers
from oltp.partitions import ensure_partitions
from oltp.queries import DailyZone, OutsideRetention, QueryError, Retention, RollupReader, bucket_bounds, choose_tier
from oltp.rollup_sink import RollupSink
from tests.conftest import registered

UTC = UTC


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def event(domain: str, ts: datetime, value: str | None = None, type: str = "impression",
          hash: str | None = None) -> StoredEvent:
    return StoredEvent(v=1, hash=hash or uuid.uuid4().hex, domain=domain, url=f"https://{domain}/", ts=ts,
                       received_at=ts, type=type, value=Decimal(value) if value else None)


class Sink:
    """The real sink with its own group and topic; `write(events)` stores one batch."""

    def __init__(self, dsn: str) -> None:
        self.sink = RollupSink(dsn, f"g-{uuid.uuid4().hex[:8]}")
        self.topic = f"t-{uuid.uuid4().hex[:8]}"
        self.offset = 0

    def write(self, events: list[StoredEvent]) -> None:
        self.offset += len(events)
        self.sink.write(Batch(topic=self.topic, topic_id="T", events=list(events), next_offsets={0: self.offset},
                              first_offsets={0: self.offset - len(events)}))


@pytest.fixture()
def sink(servers):
    s = Sink(servers.pg_dsn)
    yield s
    s.sink.close()


@pytest.fixture()
def reader(servers):
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(servers.pg_dsn, min_size=1, max_size=2, open=True, kwargs={"prepare_threshold": None})
    yield RollupReader(pool, Retention(0, 0, 0))
    pool.close()


def tier_totals(dsn: str, domain: str) -> dict[str, tuple]:
    with psycopg.connect(dsn) as conn:
        out = {}
        for tier, table in (("15m", "rollup_15m"), ("1h", "rollup_1h"), ("1d", "rollup_1d")):
            out[tier] = conn.execute(
                f"SELECT event_type, sum(events), sum(valued), sum(value_sum), min(value_min), max(value_max)"
                f" FROM {table} WHERE domain = %s GROUP BY 1 ORDER BY 1", (domain,)).fetchall()
        return out


def daily_rows(dsn: str, domain: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(dsn) as conn:
        return [(tz, start.astimezone(ZoneInfo(tz)).isoformat(), n) for tz, start, n in conn.execute(
            "SELECT tz, bucket_start, sum(events) FROM rollup_1d WHERE domain = %s GROUP BY 1, 2 ORDER BY 2",
            (domain,)).fetchall()]


def coverage(dsn: str, domain: str):
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT tz, complete_from FROM rollup_1d_coverage WHERE domain = %s", (domain,)).fetchone()


# ---- the sink writes every tier ------------------------------------------------------------------

DST_EVENTS = {  # zone -> instants around its odd days (ADR 12): each lands in the day the rule says
    "Australia/Lord_Howe": [utc(2026, 4, 4, 12, 59), utc(2026, 4, 4, 13), utc(2026, 4, 4, 15, 1),  # 24.5-hour day
                            utc(2026, 4, 5, 13, 29), utc(2026, 4, 5, 13, 30),
                            utc(2026, 10, 3, 13, 29), utc(2026, 10, 3, 13, 31)],  # before a 23.5-hour day
    "America/Santiago": [utc(2026, 9, 6, 3, 59), utc(2026, 9, 6, 4, 0), utc(2026, 9, 6, 4, 1)],  # 00:00 skipped
    "Asia/Beirut": [utc(2026, 3, 28, 21, 59), utc(2026, 3, 28, 22, 0)],  # midnight 2026-03-29 skipped
    "Asia/Kathmandu": [utc(2026, 6, 1, 18, 14), utc(2026, 6, 1, 18, 15)],
}
DST_DAYS = {  # the day each of those instants belongs to, by ADR 12's rule, counted
    "Australia/Lord_Howe": [("2026-04-04T00:00:00+11:00", 1), ("2026-04-05T00:00:00+11:00", 3),
                            ("2026-04-06T00:00:00+10:30", 1),
                            ("2026-10-03T00:00:00+10:30", 1), ("2026-10-04T00:00:00+10:30", 1)],
    "America/Santiago": [("2026-09-05T00:00:00-04:00", 1), ("2026-09-06T01:00:00-03:00", 2)],
    "Asia/Beirut": [("2026-03-28T00:00:00+02:00", 1), ("2026-03-29T01:00:00+03:00", 1)],
    "Asia/Kathmandu": [("2026-06-01T00:00:00+05:45", 1), ("2026-06-02T00:00:00+05:45", 1)],
}


@pytest.mark.parametrize("key", sorted(DST_EVENTS))
def test_the_sink_writes_every_tier_with_days_in_the_sites_zone(servers, sink, domain, key):
    sites.add(servers.pg_dsn, domain, tz=key)
    events = [event(domain, t, value="1.25" if i % 2 else None) for i, t in enumerate(DST_EVENTS[key])]
    events.append(event(domain, DST_EVENTS[key][0], type="pageview", value="7"))
    sink.write(events)
    totals = tier_totals(servers.pg_dsn, domain)
    assert totals["15m"] == totals["1h"] == totals["1d"]  # same events, valued, sums, min and max
    assert sum(r[1] for r in totals["15m"]) == len(events)
    days = {}
    for tz, start, n in daily_rows(servers.pg_dsn, domain):
        assert tz == key
        days[start] = days.get(start, 0) + n
    want = dict(DST_DAYS[key])
    want[DST_DAYS[key][0][0]] += 1  # the pageview at the first instant
    assert days == want
    assert coverage(servers.pg_dsn, domain) == (key, tiers.EPOCH)  # a new domain: complete from the start


def test_late_events_and_redeliveries_land_in_every_tier_once(servers, sink, domain):
    sites.add(servers.pg_dsn, domain, tz="America/New_York")
    now = datetime.now(UTC).replace(microsecond=0)
    first = [event(domain, now - timedelta(minutes=m), value="2") for m in range(0, 300, 7)]
    sink.write(first)
    late = [event(domain, now - timedelta(days=6, minutes=m)) for m in range(5)]
    sink.write(late + first[:10])  # late events, and a redelivery of ten already counted
    totals = tier_totals(servers.pg_dsn, domain)
    assert totals["15m"] == totals["1h"] == totals["1d"]
    assert totals["1d"][0][1] == len(first) + len(late)
    with psycopg.connect(servers.pg_dsn) as conn:
        old_day = tiers.DayStarts().start("America/New_York", late[0].ts)
        (n,), = conn.execute("SELECT sum(events) FROM rollup_1d WHERE domain = %s AND bucket_start = %s",
                             (domain, old_day)).fetchall()
    assert n == 5


def test_a_batch_that_fails_leaves_no_tier_half_written(servers, sink, domain):
    good = [event(domain, utc(2026, 11, 1, 10)) for _ in range(3)]
    bad = event(domain, utc(2026, 11, 1, 11), value="1" + "0" * 20)  # numeric(24, 6) refuses it
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        sink.write(good + [bad])
    assert tier_totals(servers.pg_dsn, domain) == {"15m": [], "1h": [], "1d": []}
    assert coverage(servers.pg_dsn, domain) is None
    sink.write(good)
    totals = tier_totals(servers.pg_dsn, domain)
    assert totals["15m"] == totals["1h"] == totals["1d"] and totals["1d"][0][1] == 3


def test_a_partition_dropped_behind_the_sinks_back_is_created_again_not_a_refused_batch(servers, sink, domain):
    """Retention in another process drops a partition the sink's cache still believes in: the batch
    must still be stored (a CheckViolation would otherwise look like records the store refuses)."""
    day = utc(2001, 2, 3, 4, 5)  # a day no other test writes
    sink.write([event(domain, day)])
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute('DROP TABLE "rollup_15m_p20010203"')
        conn.execute('DROP TABLE "seen_events_p20010203"')
    sink.write([event(domain, day + timedelta(minutes=1))])
    totals = tier_totals(servers.pg_dsn, domain)
    assert totals["15m"][0][1] == 1 and totals["1h"][0][1] == totals["1d"][0][1] == 2  # 15m lost the dropped row


# ---- rederive ---------------------------------------------------------------------------------------

def put_15m(dsn: str, domain: str, rows: list[tuple[datetime, int, str | None]], type: str = "impression") -> None:
    with psycopg.connect(dsn) as conn:
        for t, _, _ in rows:  # its own partitions: the sink creates only those of days holding events
            ensure_partitions(conn, "rollup_15m", t, t)
        conn.cursor().executemany(
            "INSERT INTO rollup_15m (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [(domain, type, t, n, n if v else 0, Decimal(v) * n if v else None, v, v) for t, n, v in rows])


def test_rederive_recomputes_hours_and_local_days_from_the_15_minute_rows(servers, domain):
    sites.add(servers.pg_dsn, domain, tz="Australia/Lord_Howe")
    quarters = [utc(2026, 4, 4, 12) + timedelta(minutes=15 * i) for i in range(4 * 30)]  # 30 h over the change
    put_15m(servers.pg_dsn, domain, [(q, 1 + i % 3, "0.5" if i % 4 == 0 else None) for i, q in enumerate(quarters)])
    with psycopg.connect(servers.pg_dsn) as conn:
        tiers.rederive(conn, utc(2026, 4, 4, 13, 7), utc(2026, 4, 5, 3), domain)  # widened to hours and days
        conn.execute("UPDATE rollup_1h SET events = 99 WHERE domain = %s AND bucket_start = %s",
                     (domain, utc(2026, 4, 4, 20)))  # a wrong row, which the next call must replace
        conn.commit()
        tiers.rederive(conn, utc(2026, 4, 4, 20), utc(2026, 4, 4, 21), domain)
        conn.commit()
    # Everything inside the widened days is in both tiers, exactly once.
    with psycopg.connect(servers.pg_dsn) as conn:
        day_lo, day_hi = utc(2026, 4, 4, 13), utc(2026, 4, 5, 13, 30)  # 04-05 00:00+11 .. 04-06 00:00+10:30
        (want,), = conn.execute("SELECT sum(events) FROM rollup_15m WHERE domain = %s AND bucket_start >= %s"
                                " AND bucket_start < %s", (domain, day_lo, day_hi)).fetchall()
        (hours,), = conn.execute("SELECT sum(events) FROM rollup_1h WHERE domain = %s", (domain,)).fetchall()
        (h20,), = conn.execute("SELECT events FROM rollup_1h WHERE domain = %s AND bucket_start = %s",
                               (domain, utc(2026, 4, 4, 20))).fetchall()
    assert h20 == sum(1 + i % 3 for i, q in enumerate(quarters) if utc(2026, 4, 4, 20) <= q < utc(2026, 4, 4, 21))
    assert hours == sum(1 + i % 3 for i, q in enumerate(quarters) if utc(2026, 4, 4, 13) <= q < utc(2026, 4, 5, 3))
    # 13:07Z is 00:07 on 04-05 in Lord Howe: the range lies in that one day, its 24.5-hour day.
    assert [start for _, start, _ in daily_rows(servers.pg_dsn, domain)] == ["2026-04-05T00:00:00+11:00"]
    assert sum(n for _, _, n in daily_rows(servers.pg_dsn, domain)) == want
    assert coverage(servers.pg_dsn, domain) is None  # 15-minute rows after the range: not complete from here


def test_rederive_makes_a_domain_with_old_rows_complete_and_every_tier_answers_alike(servers, domain, reader):
    """Rows from before the tiers existed (only rollup_15m): rederive over the whole history fills
    both tiers and the daily coverage, and then every aligned tier gives the same series."""
    sites.add(servers.pg_dsn, domain, tz="Asia/Kathmandu")
    quarters = [utc(2026, 5, 1) + timedelta(minutes=15 * i) for i in range(0, 4 * 24 * 12, 5)]
    put_15m(servers.pg_dsn, domain, [(q, 1 + i % 4, "1.5" if i % 3 else None) for i, q in enumerate(quarters)])
    with psycopg.connect(servers.pg_dsn) as conn:
        tiers.rederive(conn, quarters[0], quarters[-1] + timedelta(minutes=15), domain)
        conn.commit()
    assert coverage(servers.pg_dsn, domain) == ("Asia/Kathmandu", utc(2026, 4, 30, 18, 15))
    totals = tier_totals(servers.pg_dsn, domain)
    assert totals["15m"] == totals["1h"] == totals["1d"]
    ktm = ZoneInfo("Asia/Kathmandu")
    start, end = utc(2026, 5, 2, 3), utc(2026, 5, 11, 17)
    got = {t: reader.serve(domain, "impression", start, end, "1d", ktm, tier=t) for t in ("1d", "15m")}
    assert got["1d"].buckets == got["15m"].buckets and sum(b.count for b in got["1d"].buckets) > 0
    assert reader.serve(domain, "impression", start, end, "1d", ktm).tier == "1d"
    utc_zone = ZoneInfo("UTC")
    got = {t: reader.serve(domain, "impression", start, end, "1h", utc_zone, tier=t) for t in ("1h", "15m")}
    assert got["1h"].buckets == got["15m"].buckets
    with pytest.raises(QueryError, match="does not align"):
        reader.serve(domain, "impression", start, end, "1h", ktm, tier="1h")  # Kathmandu hours start at :15 UTC


def test_a_rebuild_and_a_sink_batch_for_a_new_domain_do_not_deadlock(servers, sink, domain):
    """A rebuild holds rollup_15m, then rederive writes the coverage row; a sink batch for a domain it
    has not seen writes its rollups, then the coverage row: the same order, so the batch waits for the
    rebuild instead of deadlocking with it (PostgreSQL would abort one of them)."""
    import threading

    from oltp.partitions import ensure_partitions

    t = utc(2026, 11, 2, 10)
    errors: list[BaseException] = []
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:  # as the rebuild does before its chunk
        for table in ("rollup_15m", "rollup_1h", "rollup_1d", "seen_events"):
            ensure_partitions(conn, table, t - timedelta(days=1), t + timedelta(days=1))
    with psycopg.connect(servers.pg_dsn) as rebuild:
        rebuild.execute("LOCK TABLE rollup_15m IN SHARE ROW EXCLUSIVE MODE")  # as `tally rebuild` does first

        def batch() -> None:
            try:
                sink.write([event(domain, t)])
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=batch)
        writer.start()
        with psycopg.connect(servers.pg_dsn, autocommit=True) as probe:
            for _ in range(200):  # until the batch waits for the rebuild's lock
                if probe.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the sink batch never waited for the rebuild's lock")
        tiers.rederive(rebuild, t - timedelta(hours=1), t + timedelta(hours=1), domain)
        rebuild.commit()
    writer.join(timeout=30)
    assert not writer.is_alive() and errors == []
    totals = tier_totals(servers.pg_dsn, domain)
    assert totals["15m"] == totals["1h"] == totals["1d"] and totals["1d"][0][1] == 1
    assert coverage(servers.pg_dsn, domain)[0] == "UTC"


def test_rederive_refuses_an_empty_or_naive_range(servers):
    with psycopg.connect(servers.pg_dsn) as conn:
        with pytest.raises(ValueError, match="'hi' must be after 'lo'"):
            tiers.rederive(conn, utc(2026, 1, 2), utc(2026, 1, 1))
        with pytest.raises(ValueError, match="timezone-aware"):
            tiers.rederive(conn, datetime(2026, 1, 1), datetime(2026, 1, 2))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # refused before touching anything


# ---- routing ----------------------------------------------------------------------------------------

WINTER = (utc(2026, 7, 6), utc(2026, 7, 9))  # Lord Howe on +10:30, New York on -04:00
SUMMER = (utc(2026, 1, 5), utc(2026, 1, 8))  # Lord Howe on +11:00
ROUTES = [  # zone, granularity, when, registered zone -> the tier that serves
    ("UTC", "15m", WINTER, "UTC", "15m"), ("UTC", "1h", WINTER, "UTC", "1h"), ("UTC", "1d", WINTER, "UTC", "1d"),
    ("America/New_York", "15m", WINTER, "UTC", "15m"), ("America/New_York", "1h", WINTER, "UTC", "1h"),
    ("America/New_York", "1d", WINTER, "UTC", "1h"), ("America/New_York", "1d", WINTER, "America/New_York", "1d"),
    ("Asia/Kathmandu", "15m", WINTER, "UTC", "15m"), ("Asia/Kathmandu", "1h", WINTER, "Asia/Kathmandu", "15m"),
    ("Asia/Kathmandu", "1d", WINTER, "UTC", "15m"), ("Asia/Kathmandu", "1d", WINTER, "Asia/Kathmandu", "1d"),
    ("Australia/Lord_Howe", "15m", WINTER, "UTC", "15m"), ("Australia/Lord_Howe", "1h", WINTER, "UTC", "15m"),
    ("Australia/Lord_Howe", "1h", SUMMER, "UTC", "1h"), ("Australia/Lord_Howe", "1d", WINTER, "UTC", "15m"),
    ("Australia/Lord_Howe", "1d", SUMMER, "UTC", "1h"),
    ("Australia/Lord_Howe", "1d", WINTER, "Australia/Lord_Howe", "1d"),
    ("Australia/Lord_Howe", "1h", (utc(2026, 4, 4, 12), utc(2026, 4, 5, 12)), "UTC", "15m"),  # across the change
]


@pytest.mark.parametrize("key, granularity, when, registered, want", ROUTES)
def test_the_router_picks_the_coarsest_tier_that_aligns(key, granularity, when, registered, want):
    bounds = bucket_bounds(*when, granularity, ZoneInfo(key))
    daily = DailyZone(registered, registered, tiers.EPOCH)
    keep_all = Retention(0, 0, 0)
    assert choose_tier(bounds, granularity, key, daily, keep_all, utc(2026, 11, 1)) == want


def test_the_daily_tier_serves_only_from_the_day_it_is_complete_in_the_registered_zone():
    bounds = bucket_bounds(utc(2026, 7, 6), utc(2026, 7, 9), "1d", ZoneInfo("UTC"))
    keep_all, now = Retention(0, 0, 0), utc(2026, 11, 1)
    assert choose_tier(bounds, "1d", "UTC", DailyZone("UTC", "UTC", utc(2026, 7, 6)), keep_all, now) == "1d"
    assert choose_tier(bounds, "1d", "UTC", DailyZone("UTC", "UTC", utc(2026, 7, 7)), keep_all, now) == "1h"
    assert choose_tier(bounds, "1d", "UTC", DailyZone("UTC", None, None), keep_all, now) == "1h"  # no zone known
    # The registry says UTC but the sinks still write another zone (not switched yet): not served from 1d.
    assert choose_tier(bounds, "1d", "UTC", DailyZone("UTC", "Europe/Berlin", tiers.EPOCH), keep_all, now) == "1h"


def test_retention_moves_to_a_coarser_aligned_tier_or_refuses_naming_it():
    now = utc(2026, 11, 1)
    retention = Retention(90, 730, 0)
    old = bucket_bounds(utc(2026, 6, 1), utc(2026, 6, 2), "1h", ZoneInfo("UTC"))
    assert choose_tier(old, "1h", "UTC", None, retention, now) == "1h"
    quarter = bucket_bounds(utc(2026, 6, 1), utc(2026, 6, 2), "15m", ZoneInfo("UTC"))
    with pytest.raises(OutsideRetention) as err:
        choose_tier(quarter, "15m", "UTC", None, retention, now)
    assert (err.value.tier, err.value.retention_days) == ("15m", 90)
    assert "15-minute data is kept 90 days" in str(err.value)
    ancient = bucket_bounds(utc(2023, 6, 1), utc(2023, 6, 2), "1h", ZoneInfo("UTC"))
    with pytest.raises(OutsideRetention, match="hourly data is kept 730 days"):
        choose_tier(ancient, "1h", "UTC", None, retention, now)
    nothing = OutsideRetention("1d", 3650, utc(2016, 11, 1), [])  # when no other granularity can answer
    assert str(nothing) == ("daily data is kept 3650 days (from 2016-11-01T00:00:00+00:00);"
                            " ask a range that starts later")


# ---- through the API --------------------------------------------------------------------------------

@pytest.fixture()
def make_api(make_settings, servers):
    from oltp import tokens
    from tally.roots import build_api

    apps = []

    def build(**env: str):
        app = build_api(make_settings(**env))
        apps.append(app)
        with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
            _, token = tokens.create(conn, "admin", name="test_tiers")
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        return client, app.extensions["tally_backends"].rollups

    yield build
    for app in apps:
        app.extensions["tally_backends"].rollups.pool.close()


def recent_events(domain: str, now: datetime, days: int = 9) -> list[StoredEvent]:
    """Events over the last `days` days, every 37 minutes, some with values, some pageviews."""
    out = []
    for i in range(0, days * 24 * 60, 37):
        t = now - timedelta(minutes=i, seconds=i % 60)
        out.append(event(domain, t, value=f"{i % 7}.5" if i % 3 == 0 else None,
                         type="pageview" if i % 5 == 0 else "impression"))
    return out


def series(client, domain: str, **query):
    resp = client.get(f"/api/v1/domains/{domain}/impressions", query_string=query)
    return resp


API_ROUTES = [  # zone, granularity, tier (the site is registered in Asia/Kathmandu)
    ("UTC", "15m", "15m"), ("UTC", "1h", "1h"), ("UTC", "1d", "1h"),
    ("America/New_York", "1h", "1h"), ("America/New_York", "1d", "1h"),
    ("Asia/Kathmandu", "15m", "15m"), ("Asia/Kathmandu", "1h", "15m"), ("Asia/Kathmandu", "1d", "1d"),
    ("Australia/Lord_Howe", "1h", None), ("Australia/Lord_Howe", "1d", None),  # 15m or 1h by season
]


def test_the_api_names_the_tier_and_every_tier_answers_alike(servers, sink, domain, make_api):
    client, reader = make_api()
    sites.add(servers.pg_dsn, domain, tz="Asia/Kathmandu")
    now = datetime.now(UTC).replace(microsecond=0)
    events = recent_events(domain, now)
    sink.write(events[: len(events) // 2])
    sink.write(events[len(events) // 2:])
    start, end = (now - timedelta(days=8)).isoformat(), now.isoformat()
    seen = {}
    for key, granularity, want in API_ROUTES:
        resp = series(client, domain, **{"from": start, "to": end, "tz": key, "granularity": granularity})
        assert resp.status_code == 200, resp.json
        body = resp.json
        if want is not None:
            assert body["tier"] == want, (key, granularity)
        seen.setdefault(body["tier"], 0)
        seen[body["tier"]] += 1
        # The same request forced to the 15-minute tier gives the same buckets and totals.
        forced = reader.serve(domain, "impression", datetime.fromisoformat(start), datetime.fromisoformat(end),
                              granularity, ZoneInfo(key), tier="15m")
        assert [b["count"] for b in body["buckets"]] == [b.count for b in forced.buckets]
        assert [b["value_sum"] for b in body["buckets"]] == [f"{b.value_sum:.6f}" for b in forced.buckets]
        assert body["total"] == sum(1 for e in events if e.type == "impression"
                                    and forced.buckets[0].start <= e.ts < forced.buckets[-1].end)
    assert set(seen) == {"15m", "1h", "1d"}
    csv = client.get(f"/api/v1/domains/{domain}/impressions", query_string={
        "from": start, "to": end, "tz": "Asia/Kathmandu", "granularity": "1d", "format": "csv"})
    assert csv.status_code == 200 and csv.headers["X-Tally-Tier"] == "1d"
    summary = client.get(f"/api/v1/domains/{domain}/summary", query_string={"last": "24h"})
    assert summary.status_code == 200 and summary.json["tier"] == "15m"


def test_a_range_outside_retention_is_refused_naming_the_retention_and_what_to_ask(servers, sink, domain, make_api):
    client, _ = make_api(TALLY_RETENTION_15M_DAYS="90", TALLY_RETENTION_1H_DAYS="400")
    sites.add(servers.pg_dsn, domain, tz="Asia/Kathmandu")
    now = datetime.now(UTC)
    sink.write([event(domain, now - timedelta(days=600))])  # history older than every finite retention
    old = {"from": (now - timedelta(days=100)).isoformat(), "to": (now - timedelta(days=99)).isoformat()}
    resp = series(client, domain, **old, granularity="15m")
    assert resp.status_code == 400
    err = resp.json["error"]
    assert err["code"] == "outside_retention"
    assert err["message"].startswith("15-minute data is kept 90 days")
    assert err["message"].endswith("ask granularity=1h or 1d")
    assert (err["tier"], err["retention_days"], err["alternatives"]) == ("15m", 90, ["1h", "1d"])
    assert series(client, domain, **old, granularity="1h").json["tier"] == "1h"  # the hourly tier answers
    # Kathmandu's hours need the 15-minute tier; its days, in the site's zone, the daily tier.
    ktm = series(client, domain, **old, granularity="1h", tz="Asia/Kathmandu")
    assert ktm.status_code == 400 and ktm.json["error"]["alternatives"] == ["1d"]
    assert series(client, domain, **old, granularity="1d", tz="Asia/Kathmandu").json["tier"] == "1d"
    kolkata = series(client, domain, **old, granularity="1h", tz="Asia/Kolkata")  # +05:30: only 15m aligns
    assert kolkata.status_code == 400 and kolkata.json["error"]["alternatives"] == ["1d&tz=Asia/Kathmandu"]
    assert kolkata.json["error"]["message"].endswith("ask granularity=1d&tz=Asia/Kathmandu")
    ancient = {"from": (now - timedelta(days=500)).isoformat(), "to": (now - timedelta(days=499)).isoformat()}
    resp = series(client, domain, **ancient, granularity="1h")
    assert resp.status_code == 400 and resp.json["error"]["message"].startswith("hourly data is kept 400 days")
    assert resp.json["error"]["alternatives"] == ["1d&tz=Asia/Kathmandu"]
    other = f"x{domain}"  # registered in UTC: daily buckets in UTC answer from the daily tier
    sites.add(servers.pg_dsn, other)
    sink.write([event(other, now - timedelta(days=600))])
    resp = series(client, other, **ancient, granularity="1h")
    assert resp.status_code == 400 and resp.json["error"]["alternatives"] == ["1d"]
    resp = series(client, other, **ancient, granularity="1h", tz="Asia/Kolkata")
    assert resp.status_code == 400 and resp.json["error"]["alternatives"] == ["1d&tz=UTC"]
    assert series(client, domain, **ancient, granularity="1d", tz="Asia/Kathmandu").json["tier"] == "1d"  # forever


def test_a_domain_without_history_that_old_lost_nothing_and_is_answered(servers, sink, domain, make_api):
    """Retention drops what is older than its cutoff; a domain whose first event is newer lost nothing:
    its (zero) buckets are the truth, served by the aligned tier as usual."""
    client, _ = make_api(TALLY_RETENTION_15M_DAYS="90")
    registered(servers.pg_dsn, domain)  # the API answers only registered sites (ADR 48)
    now = datetime.now(UTC)
    sink.write([event(domain, now - timedelta(days=30))])
    old = {"from": (now - timedelta(days=100)).isoformat(), "to": (now - timedelta(days=99)).isoformat()}
    resp = series(client, domain, **old, granularity="1h", tz="Asia/Kathmandu")
    assert resp.status_code == 200 and resp.json["tier"] == "15m" and resp.json["total"] == 0
    sink.write([event(domain, now - timedelta(days=95))])  # now it has: the same request is refused
    resp = series(client, domain, **old, granularity="1h", tz="Asia/Kathmandu")
    assert resp.status_code == 400 and resp.json["error"]["code"] == "outside_retention"


def test_the_summary_is_refused_when_the_15_minute_tier_no_longer_keeps_its_previous_period(sink, domain, make_api,
                                                                                          servers):
    client, _ = make_api(TALLY_RETENTION_15M_DAYS="10")
    registered(servers.pg_dsn, domain)  # the API answers only registered sites (ADR 48)
    sink.write([event(domain, datetime.now(UTC) - timedelta(days=20))])
    week = client.get(f"/api/v1/domains/{domain}/summary", query_string={"last": "7d"})
    assert week.status_code == 400 and week.json["error"]["code"] == "outside_retention"
    assert "15-minute data is kept 10 days" in week.json["error"]["message"]
    day = client.get(f"/api/v1/domains/{domain}/summary", query_string={"last": "24h"})
    assert day.status_code == 200 and day.json["tier"] == "15m"


def test_a_zone_change_keeps_answers_exact_and_the_daily_tier_serves_again_once_rederived(
        servers, sink, domain, make_api):
    client, reader = make_api()
    sites.add(servers.pg_dsn, domain, tz="Europe/Berlin")
    now = datetime.now(UTC).replace(microsecond=0)
    events = recent_events(domain, now - timedelta(hours=2), days=6)
    sink.write(events[::2])
    assert coverage(servers.pg_dsn, domain) == ("Europe/Berlin", tiers.EPOCH)
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE sites SET tz = 'Asia/Tokyo' WHERE domain = %s", (domain,))
    sink.sink._zones.forget()  # as if the sink's minute had passed
    sink.write(events[1::2])
    tz, complete_from = coverage(servers.pg_dsn, domain)
    tokyo = ZoneInfo("Asia/Tokyo")
    assert tz == "Asia/Tokyo" and complete_from > now + timedelta(hours=1)
    assert complete_from.astimezone(tokyo).time().isoformat() == "00:00:00"  # a local day start
    zones_written = {z for z, _, _ in daily_rows(servers.pg_dsn, domain)}
    assert zones_written == {"Europe/Berlin", "Asia/Tokyo"}  # old days stay under the old zone
    totals = tier_totals(servers.pg_dsn, domain)
    assert totals["15m"] == totals["1h"] == totals["1d"]  # every event is in some daily row, once

    week = {"from": (now - timedelta(days=6)).isoformat(), "to": now.isoformat(), "granularity": "1d"}
    forced = {key: reader.serve(domain, "impression", now - timedelta(days=6), now, "1d", ZoneInfo(key), tier="15m")
              for key in ("Asia/Tokyo", "Europe/Berlin")}
    for key, exact in forced.items():  # neither zone is served from the daily tier now; answers are exact
        body = series(client, domain, **week, tz=key).json
        assert body["tier"] == "1h"
        assert [b["count"] for b in body["buckets"]] == [b.count for b in exact.buckets]

    with psycopg.connect(servers.pg_dsn) as conn:
        # Up to two days ahead: the range must reach the day the new zone is complete from.
        tiers.rederive(conn, now - timedelta(days=8), now + timedelta(days=2), domain)
        conn.commit()
    tz, complete_from = coverage(servers.pg_dsn, domain)
    assert tz == "Asia/Tokyo" and complete_from <= now - timedelta(days=8)
    body = series(client, domain, **week, tz="Asia/Tokyo").json
    assert body["tier"] == "1d"
    assert [b["count"] for b in body["buckets"]] == [b.count for b in forced["Asia/Tokyo"].buckets]
    assert series(client, domain, **week, tz="Europe/Berlin").json["tier"] == "1h"


def test_retention_comes_from_the_settings_fields_with_no_defaults_of_its_own():
    """`Retention.from_settings` reads the Settings fields (core/config.py holds the defaults): an object
    without them is a mistake that fails, not one quietly given 90/730/0 days."""
    from types import SimpleNamespace

    from core.config import Settings

    settings = Settings.from_env({"TALLY_RETENTION_15M_DAYS": "5", "TALLY_RETENTION_1H_DAYS": "6",
                                  "TALLY_RETENTION_1D_DAYS": "7"})
    assert Retention.from_settings(settings) == Retention(5, 6, 7)
    with pytest.raises(AttributeError, match="retention_15m_days"):
        Retention.from_settings(SimpleNamespace(retention_1h_days=6, retention_1d_days=7))
