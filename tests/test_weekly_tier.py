"""Closed local weeks pre-merged for the breakdowns (oltp/weekly.py, migration 0013, ADR 61).

The weekly rows are a copy of the daily tier, written by a background pass and used only while the week's
signature (row versions of rollup_1d / visitors_1d) holds. So: every breakdown answers exactly as from the days,
before and after a compaction, after a late event into a compacted week and after a day's rows are replaced (as
`tally rebuild` does). Rows go in as the sink writes them (tests/test_api_breakdown.put_events); the API through
Flask's test client, against the session's PostgreSQL.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from oltp import weekly
from oltp.partitions import TABLES, TIER_TABLES, WEEK_TABLES, ensure_partitions, keep_days_from
from tests import test_api_breakdown as tab
from tests.test_migrations import downgrade, fresh_dsn, schema_diff  # noqa: F401 (fresh_dsn: a fixture)

pytestmark = pytest.mark.servers("postgres")
api, site = tab.api, tab.site  # fixtures
DAY = timedelta(days=1)
PAGES = [f"/w{i}" for i in range(12)]


def _events(now: datetime, days: int, n: int, seed: int, valued: bool = False) -> list[dict]:
    rng = random.Random(seed)
    start = tab.floor(now, 86400) - days * DAY
    out = []
    for i in range(n):
        ts = start + timedelta(seconds=rng.randrange(days * 86400))
        value = {"value": round(rng.uniform(0, 50), 2)} if valued and i % 2 else {}
        out.append(tab.ev(ts, rng.choice(PAGES), visitor=f"v{rng.randrange(60)}", country=rng.choice("ABC"), **value))
    return out


def _put(dsn: str, domain: str, events: list[dict]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("visitors_1h", "visitors_1d", "visitors_dim_1d"):
            ensure_partitions(conn, table, min(e["ts"] for e in events) - DAY, max(e["ts"] for e in events) + DAY)
    tab.put_events(dsn, domain, events)


def _answers(api, domain: str) -> dict[str, object]:
    out = {}
    for metric in ("pageviews", "visitors"):
        for last in ("7d", "30d", "90d"):
            r = tab.get(api, domain, "breakdown", dimension="page", metric=metric, last=last, limit=20)
            assert r.status_code == 200, r.get_json()
            body = r.get_json()
            out[f"{metric} {last}"] = (body["total"], body["tier"], [(x["key"], x["count"]) for x in body["rows"]])
    return out


def _compact(dsn: str, domain: str, now: datetime) -> weekly.CompactionPass:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return weekly.compact_closed_weeks(conn, now, domain=domain)


def _valid(dsn: str, domain: str, now: datetime, kind: str) -> list[weekly.Week]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return weekly.valid_weeks(conn, domain, "UTC", now - 60 * DAY, now, kind)


def test_breakdowns_answer_the_same_from_weeks_as_from_days(api, servers, site):
    now = datetime.now(UTC)
    _put(servers.pg_dsn, site, _events(now, 36, 200, 1))
    before = _answers(api, site)
    assert _valid(servers.pg_dsn, site, now, "counts") == []
    done = _compact(servers.pg_dsn, site, now)
    assert done.compacted >= 4 and done.dim_rows > 0 and done.sketches > 0, done
    weeks = _valid(servers.pg_dsn, site, now, "counts")
    assert len(weeks) >= 4 and weeks == _valid(servers.pg_dsn, site, now, "visitors")
    for i, (a, b) in enumerate(weeks):  # whole weeks, and the open week's closed days (any day but a Monday)
        assert a.astimezone(UTC).weekday() == 0 and b <= now - weekly.CLOSED_AFTER
        last_day = tab.floor(now - weekly.CLOSED_AFTER, 86400)
        assert b - a == 7 * DAY or (i == len(weeks) - 1 and b - a < 7 * DAY and b == last_day)
    assert _answers(api, site) == before
    again = _compact(servers.pg_dsn, site, now)  # nothing changed: nothing to do
    assert again.compacted == 0


def test_a_late_event_into_a_compacted_week_is_counted_and_the_week_recompacted(api, servers, site):
    now = datetime.now(UTC)
    _put(servers.pg_dsn, site, _events(now, 30, 120, 2))
    _compact(servers.pg_dsn, site, now)
    weeks = _valid(servers.pg_dsn, site, now, "counts")
    late_week = weeks[1]
    _put(servers.pg_dsn, site, [tab.ev(late_week[0] + timedelta(hours=30), "/late", visitor="someone-new")])
    stale = _answers(api, site)
    assert late_week not in _valid(servers.pg_dsn, site, now, "counts")
    assert late_week not in _valid(servers.pg_dsn, site, now, "visitors")
    for last in ("30d", "90d"):
        rows = dict(stale[f"pageviews {last}"][2])  # type: ignore[index]
        assert rows.get("/late") == 1, stale
        assert dict(stale[f"visitors {last}"][2]).get("/late") == 1  # type: ignore[index]
    assert _compact(servers.pg_dsn, site, now).compacted == 1  # only that week again
    assert late_week in _valid(servers.pg_dsn, site, now, "counts")
    assert _answers(api, site) == stale


def test_a_day_rebuilt_after_the_compaction_invalidates_its_week(api, servers, site):
    now = datetime.now(UTC)
    _put(servers.pg_dsn, site, _events(now, 30, 100, 3))
    _compact(servers.pg_dsn, site, now)
    week = _valid(servers.pg_dsn, site, now, "visitors")[1]  # a week wholly inside the events' 30 days
    day = week[0] + 2 * DAY
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:  # what oltp.visitors.rebuild_visitors does to a day
        for table in ("visitors_1d", "visitors_dim_1d"):
            deleted = conn.execute(f"DELETE FROM {table} WHERE domain = %s AND bucket_start = %s", (site, day))
            assert deleted.rowcount > 0
    assert week not in _valid(servers.pg_dsn, site, now, "visitors")
    assert week in _valid(servers.pg_dsn, site, now, "counts")  # the counts of that day did not change
    from_days = _answers(api, site)
    _compact(servers.pg_dsn, site, now)
    assert week in _valid(servers.pg_dsn, site, now, "visitors")
    assert _answers(api, site) == from_days


def test_weeks_are_whole_local_weeks_and_follow_the_daily_tier():
    kathmandu = weekly.weeks_in("Asia/Kathmandu", datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
    assert [a.isoformat() for a, _ in kathmandu] == ["2026-10-04T18:15:00+00:00", "2026-10-11T18:15:00+00:00",
                                                     "2026-10-18T18:15:00+00:00"]
    paris = weekly.weeks_in("Europe/Paris", datetime(2026, 10, 18, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC))
    assert [(a.isoformat(), (b - a).total_seconds() / 3600) for a, b in paris] == [
        ("2026-10-18T22:00:00+00:00", 169.0), ("2026-10-25T23:00:00+00:00", 168.0)]  # the clock change's: 169 h
    from core.config import Settings
    keep = keep_days_from(Settings.from_env({"TALLY_RETENTION_1D_DAYS": "800"}))
    assert keep["rollup_dim_1w"] == keep["visitors_dim_1w"] == keep["compacted_weeks"] == keep["rollup_dim_1d"] == 800
    order = list(keep)  # retention drops in this order: a week's record goes before its rows
    assert order.index("compacted_weeks") < min(order.index("rollup_dim_1w"), order.index("visitors_dim_1w"))
    # partitioned by year like the daily tier; not among the tables whose partitions the sink ensures every batch
    assert set(WEEK_TABLES) <= set(TABLES) and not set(WEEK_TABLES) & set(TIER_TABLES["1d"])


def test_adjacent_weeks_are_read_as_one_piece_and_a_week_not_current_splits_them():
    """The page breakdown reads a run of adjacent current weeks as one range of rollup_dim_1w (planned and scanned
    once); a week left out (stale: read from its days) splits the run. The answers: the tests above."""
    from oltp.breakdown import _runs_of_weeks

    monday, week = datetime(2026, 10, 5, tzinfo=UTC), 7 * DAY
    weeks = [(monday + i * week, monday + (i + 1) * week) for i in (5, 4, 2, 1, 0)]
    runs = _runs_of_weeks(weeks)
    assert [(r.tier, r.lo, r.hi) for r in runs] == [("1w", monday, monday + 3 * week),
                                                     ("1w", monday + 4 * week, monday + 6 * week)]
    assert _runs_of_weeks([]) == []


def test_the_open_weeks_closed_days_are_a_span_of_their_own():
    """`weeks_in(prefix=True)`: after the whole weeks, the days of the next week that end by `hi` (from its Monday),
    which a pass compacts as one span: the open week's closed days (ADR 61's addendum)."""
    lo, hi = datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 10, 22, tzinfo=UTC)
    whole = weekly.weeks_in("Asia/Kathmandu", lo, hi)
    found = weekly.weeks_in("Asia/Kathmandu", lo, hi, prefix=True)
    assert found[:-1] == whole and len(whole) == 2
    assert [a.isoformat() for a in found[-1]] == ["2026-10-18T18:15:00+00:00", "2026-10-21T18:15:00+00:00"]
    monday = datetime(2026, 10, 19, tzinfo=UTC)
    assert weekly.weeks_in("UTC", lo, monday, prefix=True) == weekly.weeks_in("UTC", lo, monday)  # no day yet
    assert weekly.weeks_in("UTC", lo, monday + DAY, prefix=True)[-1] == (monday, monday + DAY)


def _answer(api, domain: str, lo: datetime, hi: datetime, metric: str) -> tuple[object, ...]:
    r = tab.get(api, domain, "breakdown", dimension="page", metric=metric, limit=50,
                **{"from": lo.isoformat(), "to": hi.isoformat()})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    return body["total"], body["tier"], body["from"], body["to"], [(x["key"], x["count"]) for x in body["rows"]]


def _pieces(dsn: str, domain: str, lo: datetime, hi: datetime) -> list:
    from oltp.breakdown import _with_weeks
    from oltp.spans import Span

    with psycopg.connect(dsn, autocommit=True) as conn:
        return _with_weeks(conn, domain, "UTC", [Span("1d", lo, hi)])


def test_ranges_cutting_weeks_and_the_open_weeks_days_answer_as_the_days(api, servers, site):
    """The open week's closed days are compacted as one span and grow a day at a time; a range that holds most of a
    compacted span but not all of it reads the span and subtracts the days outside it. Every answer equals the
    one from the days alone (before any compaction), a value seen only on a subtracted day included, and the
    totals equal a count of the events put."""
    now = datetime.now(UTC)
    events = _events(now, 40, 300, 5, valued=True)
    monday = tab.floor(now, 86400) - (now.weekday() + 14) * DAY  # a Monday two to three weeks back (UTC)
    events.append(tab.ev(monday - 14 * DAY + timedelta(hours=3), "/only-that-monday", visitor="v-x"))
    _put(servers.pg_dsn, site, events)
    hour = timedelta(hours=1)
    ranges = [(monday - s * DAY, monday + e * DAY + hour) for s in (10, 12) for e in (1, 2, 3, 4)]
    ranges.append((monday - 14 * DAY, monday + 3 * DAY))  # from the value's own Monday
    metrics = ("pageviews", "value", "visitors")
    from_days = {(r, m): _answer(api, site, *r, m) for r in ranges for m in metrics}
    for lo, hi in ranges:
        assert from_days[(lo, hi), "pageviews"][0] == sum(1 for e in events if lo <= e["ts"] < hi)
    assert "/only-that-monday" in dict(from_days[ranges[-1], "pageviews"][4])  # type: ignore[arg-type]

    thursday = monday + 3 * DAY + weekly.CLOSED_AFTER  # Monday to Wednesday closed, the week open
    _compact(servers.pg_dsn, site, thursday)
    spans = _valid(servers.pg_dsn, site, now, "counts")
    assert spans[-1] == (monday, monday + 3 * DAY) and spans == _valid(servers.pg_dsn, site, now, "visitors")
    assert {(r, m): _answer(api, site, *r, m) for r in ranges for m in metrics} == from_days

    _compact(servers.pg_dsn, site, thursday + DAY)  # a day later: the span grows by Thursday
    assert _valid(servers.pg_dsn, site, now, "counts")[-1] == (monday, monday + 4 * DAY)
    assert {(r, m): _answer(api, site, *r, m) for r in ranges for m in metrics} == from_days
    # from a Wednesday: the week before read whole, its Monday and Tuesday subtracted (and the value seen only on
    # its Monday absent: above); to a Thursday: the open week's span (to Friday) read, Thursday's rows subtracted
    pieces = _pieces(servers.pg_dsn, site, monday - 12 * DAY, monday + 3 * DAY)
    subtracted = [(p.lo, p.hi) for p in pieces if p.sign < 0]
    assert subtracted == [(monday - 14 * DAY, monday - 12 * DAY), (monday + 3 * DAY, monday + 4 * DAY)], pieces
    assert all(p.tier == "1d" for p in pieces if p.sign < 0)
    # a span mostly outside the range is not used: its days are read (from a Friday: 3 of its 7 days)
    mostly_outside = _pieces(servers.pg_dsn, site, monday - 10 * DAY, monday - 2 * DAY)
    assert [(p.tier, p.lo, p.hi, p.sign) for p in mostly_outside] == [
        ("1d", monday - 10 * DAY, monday - 7 * DAY, 1), ("1w", monday - 7 * DAY, monday, 1),
        ("1d", monday - 2 * DAY, monday, -1)]

    from oltp.breakdown import BreakdownQuery, counts
    from oltp.queries import daily_zone
    from oltp.spans import spans

    def daily_piece(lo: datetime, hi: datetime, daily) -> tuple[datetime, datetime]:
        return next((s.lo, s.hi) for s in spans(lo, hi, daily) if s.tier == "1d")

    rng, quarter = random.Random(17), timedelta(minutes=15)  # random ranges of 7 to 30 days against a count
    cut = 0
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:  # (the API would rate-limit this many)
        daily = daily_zone(conn, site)
        for _ in range(40):
            lo = monday - 24 * DAY + rng.randrange(20 * 96) * quarter
            hi = min(lo + rng.randrange(7 * 96, 30 * 96) * quarter, tab.floor(now, 900))
            found = counts(conn, BreakdownQuery(site, "page", "pageviews", lo, hi, limit=50), daily)
            pages = [e["page"] for e in events if lo <= e["ts"] < hi]
            assert {r.key: r.count for r in found.rows} == {p: pages.count(p) for p in set(pages)}, (lo, hi)
            assert found.total == len(pages)
            cut += any(p.sign < 0 for p in _pieces(servers.pg_dsn, site, *daily_piece(lo, hi, daily)))
    assert cut >= 10  # most ranges cut a compacted span somewhere


@pytest.mark.parametrize("between", ["a pass grows the open week's span", "a late event on a subtracted day"])
def test_what_commits_between_a_breakdowns_check_and_its_read_changes_nothing_it_counts(
        api, servers, site, monkeypatch, between):
    """The interleavings forced: a breakdown has found its spans current (the open week's [Monday, Friday), the range
    ending Thursday 02:00 so Thursday is subtracted), then, before it reads the rows, a pass commits the longer
    [Monday, Saturday) under the same key, or an event for Thursday is stored. Read committed, the read would take
    the new span's rows (Friday in them) and Friday's daily rows again, or subtract a Thursday row the span does not
    hold; the breakdown's one snapshot (Insights.breakdown) reads what its check saw."""
    from oltp import breakdown

    now = datetime.now(UTC)
    events = _events(now, 40, 300, 7)
    _put(servers.pg_dsn, site, events)
    monday = tab.floor(now, 86400) - (now.weekday() + 14) * DAY
    friday = monday + 4 * DAY + weekly.CLOSED_AFTER
    _compact(servers.pg_dsn, site, friday)
    lo, hi = monday - 12 * DAY, monday + (3 * DAY if "late" in between else 5 * DAY) + timedelta(hours=2)
    expected = sum(1 for e in events if lo <= e["ts"] < hi)
    checked, done = breakdown.weekly.valid_weeks, []

    def check_then_commit(*args, **kw):
        found = checked(*args, **kw)
        if not done:  # in its own connection, between the check and the read
            if "late" in between:
                _put(servers.pg_dsn, site, [tab.ev(monday + 3 * DAY + timedelta(hours=5), "/w1", visitor="late")])
                done.append("stored")
            else:
                done.append(_compact(servers.pg_dsn, site, friday + DAY).compacted)
        return found

    assert any(p.sign < 0 for p in _pieces(servers.pg_dsn, site, lo, tab.floor(hi, 86400)))
    monkeypatch.setattr(breakdown.weekly, "valid_weeks", check_then_commit)
    total, *_ = _answer(api, site, lo, hi, "pageviews")
    assert done in (["stored"], [1]), done  # it did commit meanwhile
    assert total == expected
    monkeypatch.undo()
    assert _answer(api, site, lo, hi, "pageviews")[0] == expected


def test_a_weeks_sketch_is_the_same_whatever_order_its_days_lie_on_disk(servers, site):
    """A union's result keeps the HIP state of the order its sketches came in: the compaction reads a value's days
    in one order, so the same days written in two orders make the same weekly sketch."""
    from datasketches import hll_sketch

    from oltp.visitors import DIM_LG_K, HLL_TYPE, TOTAL_LG_K

    now = datetime.now(UTC)
    monday = tab.floor(now, 86400) - (now.weekday() + 14) * DAY
    days = [monday + i * DAY for i in range(7)]
    sketches = []
    for i in range(7):
        s = hll_sketch(DIM_LG_K, HLL_TYPE)
        for v in range(100):
            s.update(f"day{i}-{v}")
        sketches.append(s.serialize_compact())
    total = hll_sketch(TOTAL_LG_K, HLL_TYPE)
    total.update("someone")
    made = []
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        for setting in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):  # rows in heap order, as a
            conn.execute(f"SET {setting} = off")  # plan on a bigger table may read them
        for order in (range(7), reversed(range(7))):
            for table in ("visitors_dim_1d", "visitors_1d", "visitors_dim_1w", "compacted_weeks"):
                conn.execute(f"DELETE FROM {table} WHERE domain = %s", (site,))
            for i in order:
                conn.execute("INSERT INTO visitors_1d (domain, tz, bucket_start, sketch) VALUES (%s, 'UTC', %s, %s)",
                             (site, days[i], total.serialize_compact()))
                conn.execute("INSERT INTO visitors_dim_1d (domain, tz, dimension, bucket_start, key, sketch, n)"
                             " VALUES (%s, 'UTC', 'page', %s, '/a', %s, 100)", (site, days[i], sketches[i]))
            assert weekly.compact_weeks(conn, site, "UTC", [(monday, monday + 7 * DAY)]) == (0, 1)
            made.append(conn.execute("SELECT sketch FROM visitors_dim_1w WHERE domain = %s", (site,)).fetchone())
    assert made[0] == made[1]
    from datasketches import hll_union

    unions = []
    for order in (sketches, sketches[::-1]):  # merged in the order they were written, they would differ
        union = hll_union(DIM_LG_K)
        for sketch in order:
            union.update(hll_sketch.deserialize(sketch))
        unions.append(union.get_result(HLL_TYPE).serialize_compact())
    assert unions[0] != unions[1]



def test_0016_adds_the_weekly_bounds_index_and_keeps_every_compacted_week(fresh_dsn):  # noqa: F811
    """0016 adds visitors_dim_1w_bound (INCLUDE (n)) and changes no row: a week compacted before it stays current.
    The downgrade drops the index; upgrading again matches `metadata`."""
    from oltp.schema import ensure_schema

    ensure_schema(fresh_dsn, "0015")
    monday = tab.floor(datetime.now(UTC), 86400) - (datetime.now(UTC).weekday() + 14) * DAY
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        ensure_partitions(conn, "compacted_weeks", monday, monday)
        conn.execute("INSERT INTO compacted_weeks (domain, tz, bucket_start, bucket_end, counts_sig, visitors_sig)"
                     " VALUES ('a.example', 'UTC', %s, %s, 'c', 'v')", (monday, monday + 7 * DAY))
    ensure_schema(fresh_dsn)
    assert schema_diff(fresh_dsn) == []

    def found(conn: psycopg.Connection) -> tuple[object, ...]:
        return conn.execute("SELECT (SELECT count(*) FROM compacted_weeks),"
                            " (SELECT indexdef FROM pg_indexes WHERE indexname = 'visitors_dim_1w_bound')").fetchone()

    with psycopg.connect(fresh_dsn) as conn:
        count, index = found(conn)
        assert count == 1 and "(domain, tz, dimension, bucket_start, key) INCLUDE (n)" in index
    downgrade(fresh_dsn, "0015")
    with psycopg.connect(fresh_dsn) as conn:
        assert found(conn) == (1, None)
    ensure_schema(fresh_dsn)
    assert schema_diff(fresh_dsn) == []
