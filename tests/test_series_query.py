"""The customer series query against real PostgreSQL.

1. A property test: random zones (every IANA zone is eligible), random ranges (mostly around the
   zone's clock changes) and every granularity, compared with a brute-force reference written
   here independently of oltp.queries: walk the range minute by minute in UTC, label each minute
   with its local wall-clock bucket and start a new bucket where the label changes or the wall
   clock reads a grid time. Random events go into rollup_15m for a fresh domain registered in the
   zone, `oltp.tiers.rederive` derives rollup_1h and rollup_1d from them, and RollupReader must count
   exactly what the reference counts from EVERY tier that aligns with the buckets (forced one by one),
   and route to the coarsest of them.
2. The series query reads only the domain's rows inside the range, with a custom plan and with a
   generic plan, and the API's pool never prepares statements server-side.

Hypothesis profiles: "ci" (default) is derandomized, so every run draws the same examples;
HYPOTHESIS_PROFILE=dev draws new ones each run, HYPOTHESIS_PROFILE=deep draws 5,000.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import zoneinfo
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from functools import cache
from types import SimpleNamespace

import psycopg
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from oltp import queries, tiers
from oltp.partitions import ensure_partitions_for, forget, list_partitions
from oltp.queries import QueryError, Retention, RollupReader, aligned_tiers

KEEP_ALL = Retention(0, 0, 0)  # the property spans 1970-2045: no tier drops anything here
TIER_TABLES = ("rollup_15m", "rollup_1h", "rollup_1d")

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ZONES = sorted(zoneinfo.available_timezones())
GRID_MIN = {"15m": 15, "1h": 60, "1d": 1440}
NOMINAL_S = {"15m": 900, "1h": 3600, "1d": 86400}
SPAN_MIN = {"15m": 2 * 1440, "1h": 5 * 1440, "1d": 12 * 1440}  # longest range drawn per granularity (minutes)
EPOCH_1970 = 0
LATEST = int(datetime(2045, 1, 1, tzinfo=UTC).timestamp())


@cache
def clock_changes(key: str) -> tuple[int, ...]:
    """Instants (UTC seconds, 1970-2045) where the zone's offset really changes, to sample near them.

    Read from the pure-Python zoneinfo's transition table (only used to pick test inputs).
    """
    from zoneinfo import _zoneinfo

    tz = zoneinfo.ZoneInfo(key)
    out = []
    for t in _zoneinfo.ZoneInfo.no_cache(key)._trans_utc:
        if EPOCH_1970 < t < LATEST:
            before = datetime.fromtimestamp(t - 1, tz).utcoffset()
            if before != datetime.fromtimestamp(t, tz).utcoffset():
                out.append(t)
    return tuple(out)


# ---- the brute-force reference ---------------------------------------------------------------

def reference(tz: zoneinfo.ZoneInfo, start: int, end: int, granularity: str):
    """Bucket bounds (UTC seconds: every bucket start, then the last bucket's end), or None when the
    query must be refused (a bound off the UTC quarter hours, or an offset with seconds).

    Independent of oltp.queries: every minute of [start - margin, end + margin) is mapped to its
    local wall-clock label; a bucket starts where the label changes or the wall clock reads a
    grid time (so a repeated hour is two buckets).
    """
    grid = GRID_MIN[granularity]
    margin = 3 * 86400 if granularity == "1d" else 86400
    starts = []
    prev_label = None
    odd_offset = False
    for m in range(start - margin, end + margin, 60):
        local = datetime.fromtimestamp(m, tz)
        if local.second:
            odd_offset = True  # the offset is not a whole number of minutes (Africa/Monrovia to 1972)
        minute_of_day = local.hour * 60 + local.minute
        label = (local.date(), minute_of_day // grid)
        if label != prev_label or (minute_of_day % grid == 0 and local.second == 0):
            starts.append(m)
        prev_label = label
    first = max(s for s in starts if s <= start)
    last = min(s for s in starts if s >= end)
    bounds = [s for s in starts if first <= s <= last]
    refuse = odd_offset or any(b % 900 for b in bounds)
    return None if refuse else bounds


def reference_index(bounds: list[int], t: int) -> int | None:
    """Index of the reference bucket holding instant t, by a plain scan."""
    for i in range(len(bounds) - 1):
        if bounds[i] <= t < bounds[i + 1]:
            return i
    return None


# ---- the property ------------------------------------------------------------------------------

@st.composite
def cases(draw):
    # One Hypothesis-controlled Random picks zone, granularity and range: reproducible under the "ci"
    # profile, and far more varied than separate draws (which keep reusing a few zones).
    r = draw(st.randoms(use_true_random=False))
    key = r.choice(ZONES)
    granularity = r.choice(sorted(GRID_MIN))
    changes = clock_changes(key)
    length = r.randint(1, SPAN_MIN[granularity])
    if changes and r.random() < 0.8:  # mostly: a range holding (or just missing) one of the zone's clock changes
        anchor = r.choice(changes)
        start_min = anchor // 60 - r.randint(-60, length + 60)
    else:
        anchor = None
        start_min = r.randint(0, LATEST // 60)
    start_min = max(start_min, 0)
    start, end = start_min * 60, (start_min + length) * 60
    if anchor is not None:
        event("range holds a clock change" if start <= anchor < end else "range just misses a clock change")
    # Events at arbitrary seconds from a day before to a day after the range (some fall outside it),
    # plus pairs on both sides of UTC quarter hours near the range (every bucket boundary is one).
    events = [r.randint(start - 86400, end + 86400) for _ in range(r.randint(0, 60))]
    quarters = range((start - 7200) // 900 * 900, end + 7200, 900)
    for q in r.sample(quarters, min(len(quarters), r.randint(0, 40))):
        events += [q - 1, q]
    events = [t for t in events if t >= 0]  # stored events are never before 1970 (core.event.decode_stored)
    other = [r.randint(start, end - 1) for _ in range(r.randint(0, 5))]  # pageviews: must not be counted
    return key, granularity, start, end, events, other


def at(*args) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())


@pytest.fixture(scope="module")
def pool(servers):
    """One connection handed out like a pool (no background threads while Hypothesis draws)."""
    with psycopg.connect(servers.pg_dsn, autocommit=True, prepare_threshold=None) as conn:
        yield SimpleNamespace(connection=lambda: nullcontext(conn))


def insert_events(conn, domain: str, event_type: str, instants: list[int]) -> None:
    rows: dict[int, int] = {}
    for t in instants:  # the rollup worker's date_bin: UTC quarter hours
        rows[t - t % 900] = rows.get(t - t % 900, 0) + 1
    ensure_partitions_for(conn, "rollup_15m", [datetime.fromtimestamp(q, UTC) for q in rows])
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO rollup_15m (domain, event_type, bucket_start, events) VALUES (%s, %s, %s, %s)",
                        [(domain, event_type, datetime.fromtimestamp(q, UTC), n) for q, n in rows.items()])


@given(case=cases())
@example(case=("Australia/Lord_Howe", "1h", at(2026, 10, 3, 14, 7), at(2026, 10, 3, 17), [at(2026, 10, 3, 15, 40)], []))
@example(case=("Australia/Lord_Howe", "15m", at(2026, 4, 4, 14), at(2026, 4, 4, 16), [at(2026, 4, 4, 15, 5)], []))
@example(case=("Europe/Berlin", "1h", at(2026, 10, 24, 23), at(2026, 10, 25, 3), [at(2026, 10, 25, 0, 59, 59)], []))
@example(case=("America/Sao_Paulo", "1d", at(2018, 11, 3), at(2018, 11, 6), [at(2018, 11, 4, 3)], []))
@example(case=("Pacific/Apia", "1d", at(2011, 12, 28), at(2012, 1, 1), [at(2011, 12, 30, 11)], []))
@example(case=("America/St_Johns", "1h", at(2010, 3, 14, 2), at(2010, 3, 14, 6), [], []))
@example(case=("Africa/Monrovia", "15m", at(1971, 6, 1), at(1971, 6, 2), [], []))
@example(case=("Asia/Kathmandu", "1d", at(1985, 12, 30), at(1986, 1, 3), [at(1985, 12, 31, 18, 29)], []))
def test_series_matches_a_brute_force_reference_in_every_zone(pool, case):
    key, granularity, start, end, events, other = case
    tz = zoneinfo.ZoneInfo(key)
    t0, t1 = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
    expected = reference(tz, start, end, granularity)
    reader = RollupReader(pool, KEEP_ALL)
    domain = f"p{uuid.uuid4().hex[:12]}.example.com"
    event(f"granularity {granularity}")
    event("refused: a boundary off the UTC quarter hours" if expected is None else "answered")
    if expected is None:
        with pytest.raises(QueryError, match="quarter"):
            reader.series(domain, "impression", t0, t1, granularity, tz)
        return

    with pool.connection() as conn:
        before = {t: {p.name for p in list_partitions(conn, t)} for t in TIER_TABLES}
        conn.execute("INSERT INTO sites (domain, tz, site_key, secret) VALUES (%s, %s, %s, %s)",
                     (domain, key, "pk_" + uuid.uuid4().hex, "sk_" + uuid.uuid4().hex * 2))
        insert_events(conn, domain, "impression", events)
        insert_events(conn, domain, "pageview", other)
        with conn.transaction():  # the coarser tiers, derived as `tally rebuild` does
            tiers.rederive(conn, datetime.fromtimestamp(max(0, min([start, *events, *other]) - 86400), UTC),
                           datetime.fromtimestamp(max([end, *events, *other]) + 86400, UTC), domain)
    try:
        bounds = queries.bucket_bounds(t0, t1, granularity, tz)
        with pool.connection() as conn:
            daily = queries.daily_zone(conn, domain)
        assert daily.registered_tz == daily.written_tz == key
        candidates = aligned_tiers(bounds, granularity, key, daily)
        assert ("1d" in candidates) == (granularity == "1d")  # rederive made the whole range complete
        event(f"tiers {'+'.join(candidates)}")
        served = {t: reader.serve(domain, "impression", t0, t1, granularity, tz, tier=t) for t in candidates}
        routed = reader.serve(domain, "impression", t0, t1, granularity, tz)
    finally:
        with pool.connection() as conn:
            for table in (*TIER_TABLES, "rollup_1d_coverage", "sites"):
                conn.execute(f"DELETE FROM {table} WHERE domain = %s", (domain,))
            for table in TIER_TABLES:  # drop the partitions this example created (keeps the catalog small)
                for p in list_partitions(conn, table):
                    if p.name not in before[table]:
                        conn.execute(f'DROP TABLE "{p.name}"')
            forget()
    assert routed.tier == candidates[0]  # the coarsest aligned tier
    for t, got in served.items():
        assert got.buckets == served["15m"].buckets, t  # identical whichever tier serves
    buckets = routed.buckets

    starts = [int(b.start.timestamp()) for b in buckets]
    ends = [int(b.end.timestamp()) for b in buckets]
    assert starts + ends[-1:] == expected  # same buckets as the reference
    assert starts[1:] == ends[:-1]  # contiguous, non-overlapping
    assert starts[0] <= start < ends[0]  # the first holds `from`
    assert starts[-1] < end <= ends[-1]  # none starts at or after `to`, and [from, to) is covered
    for b in buckets:
        length = int((b.end - b.start).total_seconds())
        assert b.length_s == (None if length == NOMINAL_S[granularity] else length)
        # labelled with its own offset
        assert b.start.astimezone(tz).utcoffset() == tz.utcoffset(b.start.astimezone(tz))

    want = [0] * len(buckets)
    for t in events:
        i = reference_index(expected, t)
        if i is not None:
            want[i] += 1
    assert [b.count for b in buckets] == want


def clock_change_kinds() -> list[tuple[str, int]]:
    """One (zone, instant) per kind of clock change since 1970: offset before, offset after, local time of day."""
    kinds: dict[tuple[int, int, int], tuple[str, int]] = {}
    for key in ZONES:
        tz = zoneinfo.ZoneInfo(key)
        for t in clock_changes(key):
            before = int(datetime.fromtimestamp(t - 1, tz).utcoffset().total_seconds())
            after = int(datetime.fromtimestamp(t, tz).utcoffset().total_seconds())
            kinds.setdefault((before, after, (t + before) % 86400), (key, t))
    return sorted(kinds.values())


@pytest.mark.parametrize("granularity", sorted(GRID_MIN))
def test_every_kind_of_clock_change_since_1970_matches_the_reference(granularity):
    """Deterministic sweep (pure logic): every distinct kind of clock change in the database, each granularity."""
    kinds = clock_change_kinds()
    assert len(kinds) > 100  # the sweep really covers the database (239 kinds with tzdata 2025/2026)
    half = 2 * 86400 if granularity == "1d" else 12 * 3600
    refused = 0
    for key, t in kinds:
        tz = zoneinfo.ZoneInfo(key)
        start, end = t - half + 7 * 60, t + half - 3 * 60
        expected = reference(tz, start, end, granularity)
        t0, t1 = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
        if expected is None:
            refused += 1
            with pytest.raises(QueryError, match="quarter"):
                queries.bucket_bounds(t0, t1, granularity, tz)
        else:
            got = [int(b.timestamp()) for b in queries.bucket_bounds(t0, t1, granularity, tz)]
            assert got == expected, (key, datetime.fromtimestamp(t, UTC))
    assert 0 < refused < len(kinds) // 4  # the 00:01 changes of Newfoundland, Goose Bay, Gaza... are refused


def test_the_reference_sees_both_halves_of_a_repeated_hour_and_lord_howes_short_hour():
    """Guards the reference itself: known answers worked out by hand."""
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    t = int(datetime(2026, 10, 24, 23, tzinfo=UTC).timestamp())
    bounds = reference(berlin, t, t + 4 * 3600, "1h")
    assert [datetime.fromtimestamp(b, berlin).strftime("%H:%M%z") for b in bounds] == [
        "01:00+0200", "02:00+0200", "02:00+0100", "03:00+0100", "04:00+0100"]
    lord_howe = zoneinfo.ZoneInfo("Australia/Lord_Howe")
    t = int(datetime(2026, 10, 3, 14, 30, tzinfo=UTC).timestamp())  # 01:00+10:30; 02:00 -> 02:30 at 15:30Z
    bounds = reference(lord_howe, t, t + 2 * 3600, "1h")
    assert [datetime.fromtimestamp(b, lord_howe).strftime("%H:%M%z") for b in bounds] == [
        "01:00+1030", "02:30+1100", "03:00+1100", "04:00+1100"]
    st_johns = zoneinfo.ZoneInfo("America/St_Johns")  # 2010-03-14 00:01 -> 01:01 local
    t = int(datetime(2010, 3, 14, 2, tzinfo=UTC).timestamp())
    assert reference(st_johns, t, t + 3 * 3600, "1h") is None


# ---- cost in proportion to the range -----------------------------------------------------------

HISTORY_DAYS = 730


@pytest.fixture(scope="module")
def long_history(servers):
    """A domain with two years of quarter hours (70k rows, one event each) and a neighbour with as many,
    in every tier."""
    domain = f"h{uuid.uuid4().hex[:12]}.example.com"
    first, last = datetime(2026, 6, 1, tzinfo=UTC) - timedelta(days=HISTORY_DAYS), datetime(2026, 6, 1, tzinfo=UTC)
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        from oltp.partitions import ensure_partitions

        ensure_partitions(conn, "rollup_15m", first, last)
        for d, n in ((domain, 1), (f"n{domain}", 2)):
            conn.execute("""
                INSERT INTO rollup_15m (domain, event_type, bucket_start, events)
                SELECT %s, 'impression', g, %s
                FROM generate_series(timestamptz '2026-06-01' - make_interval(days => %s),
                                     timestamptz '2026-06-01', interval '15 minutes') g""", (d, n, HISTORY_DAYS))
        with conn.transaction():
            for d in (domain, f"n{domain}"):
                tiers.rederive(conn, first, last + timedelta(minutes=15), d)
        conn.execute("ANALYZE rollup_15m")
    yield domain
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        for table in (*TIER_TABLES, "rollup_1d_coverage"):
            conn.execute(f"DELETE FROM {table} WHERE domain IN (%s, %s)", (domain, f"n{domain}"))


def series_params(domain: str, start: datetime, end: datetime, granularity: str, key: str) -> dict:
    bounds = queries.bucket_bounds(start, end, granularity, zoneinfo.ZoneInfo(key))
    return {"starts": bounds[:-1], "domain": domain, "type": "impression", "lo": bounds[0], "hi": bounds[-1]}


def rows_read_from_rollups(plan: dict, table: str = "rollup_15m") -> int:
    """Rows that scans of `table` produced or discarded, over every loop, in an EXPLAIN ANALYZE JSON plan."""
    total = 0
    if plan.get("Relation Name", "").startswith(table):  # the table or any partition of it
        loops = plan.get("Actual Loops", 1)
        total += (plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
                  + plan.get("Rows Removed by Index Recheck", 0)) * loops
    for child in plan.get("Plans", []):
        total += rows_read_from_rollups(child, table)
    return total


def explain(conn, sql: str, params: dict | None = None) -> dict:
    (doc,), = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params).fetchall()
    doc = json.loads(doc) if isinstance(doc, str) else doc
    return doc[0]["Plan"]


ONE_HOUR = (datetime(2026, 5, 20, 10, tzinfo=UTC), datetime(2026, 5, 20, 11, tzinfo=UTC))


# rollup_15m is partitioned by UTC day (ADR 18): a scan reads at most the partitions the range touches,
# whose rows (both domains: 2 x 96 a day) PostgreSQL may read whole when that is cheaper than the index.
DAY_PARTITION_ROWS = 2 * 96


def test_the_series_query_reads_only_the_rows_in_range(servers, long_history):
    with psycopg.connect(servers.pg_dsn, autocommit=True, prepare_threshold=None) as conn:
        plan = explain(conn, queries._SERIES, series_params(long_history, *ONE_HOUR, "15m", "UTC"))
        assert 4 <= rows_read_from_rollups(plan) <= DAY_PARTITION_ROWS  # out of 140k rows of history
        day = (ONE_HOUR[0], ONE_HOUR[0] + timedelta(days=1))
        plan = explain(conn, queries._SERIES, series_params(long_history, *day, "1h", "Asia/Kathmandu"))
        assert 25 * 4 <= rows_read_from_rollups(plan) <= 2 * DAY_PARTITION_ROWS  # 25 local hours overlap the day


def test_the_coarser_tiers_read_only_the_rows_in_range(servers, long_history):
    """The hourly and daily series queries too: a week of hours, 90 days, both out of two years."""
    week = (datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 5, 8, tzinfo=UTC))
    ninety = (datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 5, 2, tzinfo=UTC))
    with psycopg.connect(servers.pg_dsn, autocommit=True, prepare_threshold=None) as conn:
        plan = explain(conn, queries._SERIES_BY_TIER["1h"], series_params(long_history, *week, "1h", "UTC"))
        assert 7 * 24 <= rows_read_from_rollups(plan, "rollup_1h") <= 2 * 2 * 31 * 24  # <= its month partition(s)
        params = {**series_params(long_history, *ninety, "1d", "UTC"), "tz": "UTC"}
        plan = explain(conn, queries._SERIES_BY_TIER["1d"], params)
        assert 90 <= rows_read_from_rollups(plan, "rollup_1d") <= 2 * 366  # <= its year partition


def test_even_a_generic_plan_reads_only_the_rows_in_range(servers, long_history):
    """A server-side prepared statement may switch to a generic plan; it must stay range-bounded too."""
    names: list[str] = []

    def positional(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    sql = re.sub(r"%\((\w+)\)s", positional, queries._SERIES)
    params = series_params(long_history, *ONE_HOUR, "15m", "UTC")
    with psycopg.connect(servers.pg_dsn, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("PREPARE series AS " + sql)
        args = psycopg.ClientCursor(conn).mogrify(", ".join(f"%({n})s" for n in names), params)
        plan = explain(conn, f"EXECUTE series({args})")
        assert 4 <= rows_read_from_rollups(plan) <= DAY_PARTITION_ROWS  # run-time partition pruning too


MIXED_SHAPES = [  # (from, to, granularity, zone): 12 executions of different shapes on one connection
    (datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 5, 20, tzinfo=UTC), "1d", "Europe/Berlin"),
    (datetime(2026, 5, 19, tzinfo=UTC), datetime(2026, 5, 20, tzinfo=UTC), "15m", "UTC"),
    (datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC), "1h", "Asia/Kathmandu"),
    (datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC), "1d", "America/New_York"),
] * 3


def run_mixed_shapes(conn, domain: str) -> list[tuple[int, datetime, datetime]]:
    """(total, first bucket start, last bucket end) of each shape, every call on this one connection."""
    reader = RollupReader(SimpleNamespace(connection=lambda: nullcontext(conn)), KEEP_ALL)
    out = []
    for s, e, g, z in MIXED_SHAPES:
        buckets = reader.series(domain, "impression", s, e, g, zoneinfo.ZoneInfo(z))
        out.append((sum(b.count for b in buckets), buckets[0].start, buckets[-1].end))
    return out


def test_the_api_pool_plans_every_query_for_its_own_range(make_settings, long_history):
    from tally.roots import build_api

    app = build_api(make_settings())
    pool = app.extensions["tally_backends"].rollups.pool
    try:
        with pool.connection() as conn:
            assert conn.prepare_threshold is None
            results = run_mixed_shapes(conn, long_history)
            for total, lo, hi in results:  # each series adds up to the rows of the range it covers
                direct = conn.execute("SELECT sum(events) FROM rollup_15m WHERE domain = %s"
                                      " AND bucket_start >= %s AND bucket_start < %s", (long_history, lo, hi))
                assert total == direct.fetchone()[0] == (hi - lo) // timedelta(minutes=15)
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
            s, e = ONE_HOUR
            plan = explain(conn, queries._SERIES, series_params(long_history, s, e, "1h", "UTC"))
            assert 4 <= rows_read_from_rollups(plan) <= DAY_PARTITION_ROWS
    finally:
        pool.close()


def test_a_default_connection_would_prepare_the_series_query(servers, long_history):
    """The check above can fail: with psycopg's default threshold the same calls leave a prepared statement."""
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        run_mixed_shapes(conn, long_history)
        (prepared,), = conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%width_bucket%'")
        assert prepared >= 1  # the 15-minute and hourly series queries, each run six times


def test_the_api_pool_runs_queries_without_parallel_workers(make_settings, servers):
    """A customer query reads one domain's rows: on a small host, starting parallel workers cost the 90-day visitors
    breakdown's bounds ~4 ms more than they saved, and under load they take the cores the pipeline needs (ADR 63).
    The setting holds on every connection of the pool, also after a failed statement rolled its transaction back."""
    from tally.roots import build_api

    with psycopg.connect(servers.pg_dsn, autocommit=True) as plain:  # the check can fail: the server's default
        assert plain.execute("SHOW max_parallel_workers_per_gather").fetchone() != ("0",)
    app = build_api(make_settings())
    pool = app.extensions["tally_backends"].rollups.pool
    try:
        with pool.connection() as a, pool.connection() as b:
            for conn in (a, b):
                assert conn.execute("SHOW max_parallel_workers_per_gather").fetchone() == ("0",)
        with pytest.raises(psycopg.errors.DivisionByZero), pool.connection() as conn:
            conn.execute("SELECT 1 / 0")
        with pool.connection() as conn:
            assert conn.execute("SHOW max_parallel_workers_per_gather").fetchone() == ("0",)
    finally:
        pool.close()
