"""A rebuild in a zone whose days start off the hour invalidates every week whose daily rows it rewrites (found by a
review: oltp/rebuild_dims.py took the local days of the chunk widened to whole UTC hours, oltp/tiers.py `rederive`
those of the chunk itself; rebuilding an Asia/Kolkata Monday [00:00, 24:00 IST) rewrote the Sunday before's rows by
dimension but not its rollup_1d row, so the week before kept its signature and breakdowns read its stale weekly rows).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest

from oltp import sites, weekly
from oltp.breakdown import BreakdownQuery, counts
from oltp.partitions import ensure_partitions
from oltp.queries import daily_zone
from oltp.rebuild import chunks
from oltp.rebuild_dims import rebuild_dimensions
from oltp.tiers import DayStarts, rederive
from oltp.visitors import rebuild_visitors

pytestmark = pytest.mark.servers("postgres")
TZ = "Asia/Kolkata"  # local midnight is 18:30 UTC
DIMS = ("page", "source", "country", "device", "browser", "os")
_UPSERT = ("ON CONFLICT ({pk}) DO UPDATE SET events = r.events + 1")


class Source:
    """ClickHouse's events, as `rebuild_dimensions` asks for them."""

    def __init__(self, events: list[tuple[str, datetime, str]]) -> None:
        self.events = events

    def dimensions(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[tuple[object, ...]]:
        return [(uuid.uuid4(), d, "pageview", ts, None, page, "", "", "", "", "")
                for d, ts, page in self.events if lo <= ts < hi and domain in (None, d)]


def _floor(t: datetime, s: int) -> datetime:
    x = int(t.timestamp())
    return datetime.fromtimestamp(x - x % s, UTC)


def _put(conn: psycopg.Connection, domain: str, ts: datetime, key: str) -> None:
    """One page view in every tier and its rows by dimension (page `key`), in one transaction, as the sink writes."""
    with conn.transaction():
        for tier, start in (("15m", _floor(ts, 900)), ("1h", _floor(ts, 3600)), ("1d", DayStarts().start(TZ, ts))):
            tzc, zt = (", tz", (TZ,)) if tier == "1d" else ("", ())
            ph = ", %s" if zt else ""
            conn.execute(f"INSERT INTO rollup_{tier} AS r (domain{tzc}, event_type, bucket_start, events) VALUES"
                         f" (%s{ph}, 'pageview', %s, 1) " + _UPSERT.format(pk=f"domain{tzc}, event_type, bucket_start"),
                         (domain, *zt, start))
            for d in DIMS:
                conn.execute(f"INSERT INTO rollup_dim_{tier} AS r (domain{tzc}, event_type, bucket_start, dimension,"
                             f" key, events) VALUES (%s{ph}, 'pageview', %s, %s, %s, 1) "
                             + _UPSERT.format(pk=f"domain{tzc}, dimension, bucket_start, event_type, key"),
                             (domain, *zt, start, d, key if d == "page" else ""))


def _pages(dsn: str, domain: str, lo: datetime, hi: datetime) -> tuple[dict[str, int], int]:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        b = counts(conn, BreakdownQuery(domain, "page", "pageviews", lo, hi, limit=100), daily_zone(conn, domain))
        conn.rollback()
    return {r.key: r.count for r in b.rows}, b.total


def test_rebuilding_a_monday_invalidates_the_week_before_in_a_half_hour_zone(servers, domain):
    """Week W (a local Monday three weeks back); on its Sunday the live sink had folded /z into (other) (cap 2); the
    weeks are compacted; then `tally rebuild` of the next Monday, chunk by chunk as oltp.rebuild does it."""
    dsn = servers.pg_dsn
    sites.add(dsn, domain, tz=TZ)
    now = datetime.now(UTC)
    today = DayStarts().start(TZ, now).astimezone(ZoneInfo(TZ))
    monday = today - timedelta(days=today.weekday() + 21)
    day = [datetime(*(monday + timedelta(days=d)).timetuple()[:3], tzinfo=ZoneInfo(TZ)).astimezone(UTC)
           for d in range(9)]
    sunday = day[6]
    events = [(domain, sunday + timedelta(hours=1), "/x"), (domain, sunday + timedelta(hours=1, minutes=5), "/y")]
    events += [(domain, sunday + timedelta(hours=3 + i), "/z") for i in range(3)]
    events += [(domain, day[d] + timedelta(hours=h), p) for d in (0, 1, 2, 3, 4, 5, 7)
               for h, p in ((2, "/x"), (4, "/y"))]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("rollup_15m", "rollup_1h", "rollup_1d", "rollup_dim_15m", "rollup_dim_1h", "rollup_dim_1d",
                      "rollup_cube_1h", "rollup_cube_1d", "value_bins_15m", "value_bins_1h", "value_bins_1d",
                      "dim_keys", "visitors_1h", "visitors_1d", "visitors_dim_1d"):
            ensure_partitions(conn, table, day[0] - timedelta(days=3), day[8] + timedelta(days=3))
        conn.execute("INSERT INTO rollup_1d_coverage (domain, tz, complete_from) VALUES (%s, %s, %s)",
                     (domain, TZ, day[0] - timedelta(days=30)))
        for _, ts, page in events:
            _put(conn, domain, ts, "(other)" if page == "/z" else page)
        conn.execute("INSERT INTO dim_keys (domain, dimension, day_start, key) VALUES (%s, 'page', %s, '/x'),"
                     " (%s, 'page', %s, '/y')", (domain, sunday, domain, sunday))
        weekly.compact_closed_weeks(conn, now, domain=domain)
        assert (day[0], day[7]) in weekly.valid_weeks(conn, domain, TZ, day[0], day[7], "counts")
        for lo, hi in chunks(day[7], day[8]):
            with conn.transaction():
                rederive(conn, lo, hi, domain=domain)
                rebuild_dimensions(conn, Source(events), lo, hi, domain=domain,
                                   dedup_from=datetime(9000, 1, 1, tzinfo=UTC), cap=2)
        rows = dict(conn.execute(
            "SELECT key, sum(events)::bigint FROM rollup_dim_1d WHERE domain = %s AND dimension = 'page'"
            " AND event_type = 'pageview' AND bucket_start >= %s AND bucket_start < %s GROUP BY key",
            (domain, day[0], day[7])).fetchall())
    assert rows["/z"] == 3  # the rebuild re-decided the Sunday's cap: /z kept, as its events put it first
    assert _pages(dsn, domain, day[0], day[7]) == (rows, sum(rows.values()))  # the week is read from its days
    # a range that cuts the week, read whole with its Sunday subtracted, counts only events inside it
    lo, hi = day[0] - timedelta(days=1), day[6]
    inside: dict[str, int] = {}
    for _, ts, page in events:
        if lo <= ts < hi:
            inside[page] = inside.get(page, 0) + 1
    assert _pages(dsn, domain, lo, hi) == (inside, sum(inside.values()))
    # the visitor sketches are rebuilt over the same days (their cap decided with the rows by dimension)
    asked: list[tuple[datetime, datetime]] = []

    class Visitors:
        def visitors(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[tuple[object, ...]]:
            asked.append((lo, hi))
            return []

    with psycopg.connect(dsn) as conn, conn.transaction():
        rebuild_visitors(conn, Visitors(), day[7], day[8], domain)
    # from the Sunday before (the chunk's first UTC hour lies in it), or earlier for other sites' zones in the database
    assert asked[0][0] <= sunday
