"""Upper bounds of the per-value visitor sketches and the visitors breakdown's search by them (ADR 62,
migration 0014).

Every writer of visitors_dim_1d / visitors_dim_1w keeps `n` >= the distinct visitors its sketch holds (the sink,
the merge of a key's partial rows, the weekly compaction, `tally rebuild`); the breakdown ranks values by the sum
of n and merges sketches until no untried value can rank higher: the same rows as a brute force that merges every
value's sketches, while merging far fewer. Real PostgreSQL (the session's), real chDB for the rebuild.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oltp import breakdown, weekly
from oltp import visitors as vis
from oltp.filters import Filter
from oltp.partitions import WEEK_TABLES, ensure_partitions
from oltp.tiers import ensure_tier_partitions
from tests.test_migrations import downgrade, fresh_dsn, schema_diff  # noqa: F401 (fresh_dsn: a fixture)

pytestmark = pytest.mark.servers("postgres")
DAY = timedelta(days=1)
_TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
BASE = _TODAY - timedelta(days=_TODAY.weekday()) - 5 * 7 * DAY  # a Monday five weeks back: weeks 0-3 closed
SPAN = 24  # days of the crafted ranges: three whole UTC weeks and three days


@pytest.fixture(scope="module")
def db(servers):
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        ensure_tier_partitions(conn, BASE - 3 * DAY, BASE + (SPAN + 3) * DAY)
        for table in WEEK_TABLES:
            ensure_partitions(conn, table, BASE, BASE + SPAN * DAY)
        yield conn


def _domain() -> str:
    return f"b{uuid.uuid4().hex[:12]}.example"


def _add(conn: psycopg.Connection, groups: list) -> None:
    with conn.transaction(), conn.cursor() as cur:
        vis.add_visitors(cur, groups)


def _put(conn: psycopg.Connection, domain: str, data: dict[str, dict[int, list[str]]], repeat: int = 1,
         dimension: str = "page") -> None:
    """data: key -> day index -> that day's visitors, each day in its own batch (and the domain total); each
    visitor's events: `repeat` a day (rollup_dim_1d, as the sink counts them)."""
    days = sorted({d for per_day in data.values() for d in per_day})
    for d in days:
        day = BASE + d * DAY
        everyone = sorted({v for per_day in data.values() for v in per_day.get(d, [])})
        _add(conn, [("1d", domain, "UTC", day, "", "", everyone)]
             + [("1d", domain, "UTC", day, dimension, k, per_day[d]) for k, per_day in data.items() if d in per_day])
    rows = [(k, BASE + d * DAY, repeat * len(v)) for k, per_day in data.items() for d, v in per_day.items()]
    conn.execute("INSERT INTO rollup_dim_1d (domain, tz, event_type, bucket_start, dimension, key, events, valued)"
                 " SELECT %s, 'UTC', 'pageview', t, %s, k, e, 0"
                 " FROM unnest(%s::text[], %s::timestamptz[], %s::bigint[]) AS u(k, t, e)",
                 (domain, dimension, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))


def _query(domain: str, lo: int, hi: int, limit: int = 10, offset: int = 0, filters: tuple[Filter, ...] = (),
           dimension: str = "page") -> breakdown.BreakdownQuery:
    return breakdown.BreakdownQuery(domain, dimension, "visitors", BASE + lo * DAY, BASE + hi * DAY, filters,
                                    limit, offset)


def _brute(conn: psycopg.Connection, q: breakdown.BreakdownQuery) -> list[tuple[str, int]]:
    """Every value's sketches merged over the same days (no weeks, no bound), ranked as the API ranks."""
    lo, hi = breakdown.covering_days("UTC", q.lo, q.hi)
    found = vis.visitors_by_key(conn, q.domain, "UTC", q.dimension, lo, hi)
    ranked = sorted(((k, v) for k, v in found.items() if v > 0), key=lambda kv: (-kv[1], kv[0]))
    return ranked[q.offset:q.offset + q.limit]


def _answer(conn: psycopg.Connection, q: breakdown.BreakdownQuery) -> breakdown.Breakdown:
    return breakdown.visitors(conn, q, vis.daily_zone(conn, q.domain))


@pytest.fixture()
def fetched(monkeypatch):
    """The keys each sketch fetch of a breakdown asked for (a spy on oltp.visitors.visitors_by_key)."""
    calls: list[list[str] | None] = []
    real = vis.visitors_by_key

    def spy(conn, domain, tz, dimension, lo, hi, keys=None, weeks=()):
        calls.append(None if keys is None else list(keys))
        return real(conn, domain, tz, dimension, lo, hi, keys, weeks)

    monkeypatch.setattr(vis, "visitors_by_key", spy)
    return calls


def _n(conn: psycopg.Connection, table: str, domain: str) -> dict[tuple[datetime, str], list[int | None]]:
    out: dict[tuple[datetime, str], list[int | None]] = {}
    for t, k, n in conn.execute(f"SELECT bucket_start, key, n FROM {table} WHERE domain = %s AND dimension = 'page'",
                                (domain,)):
        out.setdefault((t, k), []).append(n)
    return out


# ------------------------------------------------------------------------------------------------ writers

def test_the_sink_and_the_merge_of_partial_rows_keep_an_upper_bound(db):
    """add_visitors writes n = the visitors it put in the row's sketch; merging a key's COMPACT_AT rows writes
    their sum; the bound never falls below the distinct count, and is exact for one batch."""
    domain, day = _domain(), BASE + DAY
    rng = random.Random(5)
    seen: dict[str, set[str]] = {"/a": set(), "/b": set()}
    for batch in range(vis.COMPACT_AT + 3):
        groups = []
        for key, pool in (("/a", 30), ("/b", 400)):
            people = sorted({f"{key}{rng.randrange(pool)}" for _ in range(rng.randrange(1, 12))})
            seen[key] |= set(people)
            groups.append(("1d", domain, "UTC", day, "page", key, people))
        _add(db, groups)
        if batch == 0:
            assert {k: v for (_, k), v in _n(db, "visitors_dim_1d", domain).items()} == {
                k: [len(s)] for k, s in seen.items()}
    bounds = _n(db, "visitors_dim_1d", domain)
    # the rows were merged on the way: COMPACT_AT + 3 batches, at most COMPACT_AT rows of a key (one merged and
    # COMPACT_AT - 1 since; where a key's count starts depends on the process's str hash, so `<` failed when that
    # start put a merge at batch 3)
    assert all(len(v) <= vis.COMPACT_AT for v in bounds.values())
    for key, people in seen.items():
        assert sum(n for n in bounds[day, key] if n is not None) >= len(people)
        assert None not in bounds[day, key]
    assert vis.visitor_bounds(db, domain, "UTC", "page", day, day + DAY) == {
        k: sum(bounds[day, k]) for k in seen}  # type: ignore[arg-type]
    # a key whose groups repeat one visitor within a batch: the sum of the lists' lengths, still >= 1
    _add(db, [("1d", domain, "UTC", day, "page", "/c", ["x"]), ("1d", domain, "UTC", day, "page", "/c", ["x", "y"])])
    assert _n(db, "visitors_dim_1d", domain)[day, "/c"] == [3]


def test_a_merged_row_of_a_key_with_an_unknown_bound_stays_unknown(db):
    domain, day = _domain(), BASE + DAY
    _add(db, [("1d", domain, "UTC", day, "page", "/a", ["v1", "v2"])])
    db.execute("UPDATE visitors_dim_1d SET n = NULL WHERE domain = %s", (domain,))  # written before 0014
    _add(db, [("1d", domain, "UTC", day, "page", "/a", ["v3"])])
    with db.transaction(), db.cursor() as cur:
        vis.compact(cur, [[], [], [(domain, "UTC", "page", day, "/a")]])
    assert _n(db, "visitors_dim_1d", domain) == {(day, "/a"): [None]}
    assert vis.visitor_bounds(db, domain, "UTC", "page", day, day + DAY) == {"/a": None}
    assert vis.bound_sum([1, 2, 3]) == 6 and vis.bound_sum([1, None]) is None and vis.bound_sum([]) == 0


def test_the_weekly_compaction_writes_the_sum_of_its_days_bounds(db):
    domain = _domain()
    people = {d: [f"v{(d * 3 + i) % 20}" for i in range(5 + d)] for d in range(7)}  # a week, visitors overlapping
    _put(db, domain, {"/a": people, "/b": {0: ["z"], 3: ["z"]}, "/old": {1: ["q"]}})
    db.execute("UPDATE visitors_dim_1d SET n = NULL WHERE domain = %s AND key = '/old'", (domain,))
    assert weekly.compact_weeks(db, domain, "UTC", [(BASE, BASE + 7 * DAY)]) == (3, 3)
    week = {k: v for (_, k), v in _n(db, "visitors_dim_1w", domain).items()}
    assert week == {"/a": [sum(len(v) for v in people.values())], "/b": [2], "/old": [None]}
    assert week["/a"][0] >= len({v for vs in people.values() for v in vs})  # type: ignore[operator]
    # the breakdown's bound over the week read from the weekly row, over a range cutting the week from the days
    weeks = weekly.valid_weeks(db, domain, "UTC", BASE, BASE + 8 * DAY, "visitors")
    assert weeks == [(BASE, BASE + 7 * DAY)]
    assert vis.visitor_bounds(db, domain, "UTC", "page", BASE, BASE + 8 * DAY, weeks) == {
        "/a": week["/a"][0], "/b": 2, "/old": None}
    assert vis.visitor_bounds(db, domain, "UTC", "page", BASE + 2 * DAY, BASE + 5 * DAY) == {
        "/a": sum(len(people[d]) for d in (2, 3, 4)), "/b": 1}


def test_bounds_past_two_to_the_31_are_kept_whole(db):
    """n sums per-batch counts, so a busy value's week (desktop at 8,000 events/s: ~2.9 billion) passes a 32-bit
    integer: the weekly compaction and the ranking must carry it, not fail with "integer out of range"."""
    domain = _domain()
    _put(db, domain, {"/busy": {0: ["a"], 1: ["b"]}, "/quiet": {2: ["c"]}})
    db.execute("UPDATE visitors_dim_1d SET n = 2000000000 WHERE domain = %s AND key = '/busy'", (domain,))
    assert weekly.compact_weeks(db, domain, "UTC", [(BASE, BASE + 7 * DAY)]) == (2, 2)
    week = {k: v for (_, k), v in _n(db, "visitors_dim_1w", domain).items()}
    assert week == {"/busy": [4_000_000_000], "/quiet": [1]}
    weeks = weekly.valid_weeks(db, domain, "UTC", BASE, BASE + 7 * DAY, "visitors")
    assert vis.visitor_bounds(db, domain, "UTC", "page", BASE, BASE + 7 * DAY, weeks) == {
        "/busy": 4_000_000_000, "/quiet": 1}


@pytest.mark.servers("postgres", "chdb")
def test_rebuild_writes_the_exact_distinct_count(db, servers):
    from olap.aggregates import ClickHouseAggregates
    from olap.client import connect
    from olap.schema import ensure_schema as ch_schema

    client, name = connect(servers.chdb_dsn), f"vb_{uuid.uuid4().hex[:8]}"
    ch_schema(client, name, 0)
    try:
        domain, day = _domain(), BASE + 2 * DAY
        rows = [(domain, day + timedelta(minutes=7 * i), f"v{i % 13}", ("/a", "/b")[i % 2]) for i in range(60)]
        client.insert(f"{name}.events", [(uuid.uuid4().hex, d, f"https://{d}{p}", ts, ts, "pageview", v, p, "desktop")
                                         for d, ts, v, p in rows],
                      column_names=["hash", "domain", "url", "ts", "received_at", "type", "visitor", "page", "device"])
        _add(db, [("1d", domain, "UTC", day, "page", "/a", [f"junk{i}" for i in range(40)])])
        with db.transaction():
            vis.rebuild_visitors(db, ClickHouseAggregates(client, name), day, day + DAY, domain)
        bounds = {k: v for (_, k), v in _n(db, "visitors_dim_1d", domain).items()}
        assert bounds == {p: [len({v for _, _, v, q in rows if q == p})] for p in ("/a", "/b")}
    finally:
        client.command(f"DROP DATABASE IF EXISTS {name}")


# ------------------------------------------------------------------------------------------------ the search

def test_the_search_stops_after_the_first_keys_where_events_could_not_stop_it(db, fetched):
    """200 pages, page i with 200 - i visitors a day, each visitor 20 page views: by events the search could stop
    only after 20 x 200 > the 10th page's visitors, i.e. never before the cap; by the bound it stops after the
    first batch, 2 x (offset + limit) keys, with the exact ranking."""
    domain = _domain()
    data = {f"/p{i:03d}": {d: [f"{i}-{d}-{j}" for j in range(200 - i)] for d in (0, 1)} for i in range(200)}
    _put(db, domain, data, repeat=20)
    for limit, offset in ((10, 0), (5, 7)):
        q = _query(domain, 0, 2, limit, offset)
        want = _brute(db, q)
        fetched.clear()
        got = _answer(db, q)
        assert [(r.key, r.count) for r in got.rows] == want and got.notes == []
        assert [len(c or ()) for c in fetched] == [2 * (limit + offset)]
    # the same rows without bounds (before migration 0014): the events decide, up to the cap, and say so
    db.execute("UPDATE visitors_dim_1d SET n = NULL WHERE domain = %s", (domain,))
    want = _brute(db, _query(domain, 0, 2))
    fetched.clear()
    got = _answer(db, _query(domain, 0, 2))
    assert [(r.key, r.count) for r in got.rows] == want
    assert sum(len(c or ()) for c in fetched) == breakdown.MAX_VISITOR_KEYS and got.notes


def test_where_the_first_round_cannot_settle_the_keys_up_to_the_cap_are_merged_in_one(db, fetched):
    """200 pages with the same 30 people both days (the breakdown bench's shape): every bound is 60, so the 10th
    best count (30) can never exceed the 21st key's bound and the first round of 20 keys could not settle. The
    keys up to the cap are merged in one fetch instead of 20 then 108: the same keys, the same rows."""
    domain = _domain()
    people = [f"v{j}" for j in range(30)]
    _put(db, domain, {f"/p{i:03d}": {0: people, 1: people} for i in range(200)})
    q = _query(domain, 0, 2)
    fetched.clear()
    got = _answer(db, q)
    assert [len(c or ()) for c in fetched] == [breakdown.MAX_VISITOR_KEYS]
    assert [(r.key, r.count) for r in got.rows] == [(f"/p{i:03d}", 30) for i in range(10)] == _brute(db, q)
    assert got.notes  # 200 values, 128 merged: said so
    assert breakdown._first_round_may_settle([("a", 9), ("b", 5), ("c", 5)], 1)  # 9 > 5: it may
    assert not breakdown._first_round_may_settle([("a", 5), ("b", 5), ("c", 5)], 1)
    assert breakdown._first_round_may_settle([("a", 5), ("b", 5)], 1)  # every key in the first round


def test_one_fetch_for_both_rounds_answers_as_the_two_rounds_when_an_estimate_passes_its_bound(db, fetched):
    """40 pages, each 1,000 different people on one day: every bound is 1,000 (flat), so both rounds are made in one
    fetch. Some estimates are above 1,000 (HLL's error): the first round, the first 6 keys, would have settled on
    them, and the answer is that round's, not the top 3 of all 40."""
    domain = _domain()
    # visitor names whose estimates show it
    _put(db, domain, {f"/p{i:02d}": {0: [f"d{i}-{j}" for j in range(1000)]} for i in range(40)})
    q = _query(domain, 0, 1, limit=3)
    lo, hi = breakdown.covering_days("UTC", q.lo, q.hi)
    first = vis.visitors_by_key(db, domain, "UTC", "page", lo, hi, [f"/p{i:02d}" for i in range(6)])
    ranked = sorted(first.items(), key=lambda kv: (-kv[1], kv[0]))
    assert ranked[2][1] > 1000  # the first round settles: its third count is above every untried bound
    everyone = sorted(vis.visitors_by_key(db, domain, "UTC", "page", lo, hi).items(), key=lambda kv: (-kv[1], kv[0]))
    assert everyone[:3] != ranked[:3]  # and merging all 40 would rank others first
    fetched.clear()
    got = _answer(db, q)
    assert [len(c or ()) for c in fetched] == [40]
    assert [(r.key, r.count) for r in got.rows] == ranked[:3] and got.notes == []


def test_a_value_with_few_events_but_many_visitors_is_found(db, fetched):
    """/loyal has the most events (one visitor, 500 views a day), /crowd few events but the most visitors: ranked
    by bound, /crowd is tried first, and the loyal one's bound (1) settles it at once."""
    domain = _domain()
    crowd = [f"c{i}" for i in range(60)]
    data = {"/loyal": {0: ["l"], 1: ["l"]}, "/crowd": {0: crowd, 1: crowd}}
    data |= {f"/x{i}": {0: [f"x{i}-{j}" for j in range(i + 1)]} for i in range(30)}
    _put(db, domain, data)
    db.execute("UPDATE rollup_dim_1d SET events = 500 WHERE domain = %s AND key = '/loyal'", (domain,))
    q = _query(domain, 0, 2, limit=3)
    assert _brute(db, q) == [("/crowd", 60), ("/x29", 30), ("/x28", 29)]
    fetched.clear()
    got = _answer(db, q)
    assert [(r.key, r.count) for r in got.rows] == [("/crowd", 60), ("/x29", 30), ("/x28", 29)]
    assert len(fetched) == 1 and fetched[0][0] == "/crowd"


def test_ties_at_the_last_row_are_broken_by_key_as_the_brute_force_does(db, fetched):
    """/y and /z: one visitor on two days (bound 2), tried first; /a: one visitor, bound 1. With one row asked,
    /y's count equals /a's bound, and /a sorts before /y: the search must try /a (it ranks first)."""
    domain = _domain()
    _put(db, domain, {"/y": {0: ["y"], 1: ["y"]}, "/z": {0: ["z"], 1: ["z"]}, "/a": {0: ["a"]}})
    q = _query(domain, 0, 2, limit=1)
    assert _brute(db, q) == [("/a", 1)]
    fetched.clear()
    assert [(r.key, r.count) for r in _answer(db, q).rows] == [("/a", 1)]
    assert fetched == [["/y", "/z"], ["/a"]]


def test_the_database_sends_only_the_first_keys_in_the_searchs_order(db, fetched):
    """The ranking statement returns only the first cap + 1 keys, ordered as the search reads them: bound
    descending, then key by code point as Python compares str (COLLATE "C": this build has no other collation to
    show a database's own order differing), values with an unknown bound first. 140 '/a' values and 10 '/B' values
    of one visitor each, two '/z' values of two: the first rows are the '/z' then the '/B' ones, as the brute
    force ranks them, from the first cap + 1 keys."""
    domain = _domain()
    keys = [f"/a{i:03d}" for i in range(140)] + [f"/B{i:03d}" for i in range(10)]
    _put(db, domain, {**{k: {0: [f"{k}-v"]} for k in keys}, "/z1": {0: ["z", "y"]}, "/z0": {0: ["z", "x"]}})
    q = _query(domain, 0, 1, limit=4)
    want = [("/z0", 2), ("/z1", 2), ("/B000", 1), ("/B001", 1)]
    assert _brute(db, q) == want
    fetched.clear()
    assert [(r.key, r.count) for r in _answer(db, q).rows] == want
    full = vis.visitor_bounds(db, domain, "UTC", "page", BASE, BASE + DAY)
    ranked = sorted(full.items(), key=lambda kb: (-(kb[1] or 0), kb[0]))
    top = vis.visitor_bounds(db, domain, "UTC", "page", BASE, BASE + DAY, limit=breakdown.MAX_VISITOR_KEYS + 1)
    assert list(top.items()) == ranked[:breakdown.MAX_VISITOR_KEYS + 1] and len(full) == 152
    assert [len(c or ()) for c in fetched] == [breakdown.MAX_VISITOR_KEYS]  # flat bounds: the cap at once
    lo, hi = breakdown.covering_days("UTC", q.lo, q.hi)
    daily = vis.daily_zone(db, domain)
    assert breakdown._bounded_keys(db, q, daily, lo, hi, []) == ranked[:breakdown._cap(4) + 1]  # 129 of 152
    db.execute("UPDATE visitors_dim_1d SET n = NULL WHERE domain = %s AND key = '/a139'", (domain,))
    assert list(vis.visitor_bounds(db, domain, "UTC", "page", BASE, BASE + DAY, limit=2).items()) == [
        ("/a139", None), ("/z0", 2)]
    assert [(r.key, r.count) for r in _answer(db, q).rows] == want  # its events bound it (1), as before
    assert breakdown._bounded_keys(db, q, daily, lo, hi, []) == ranked[:breakdown._cap(4) + 1]  # (the same)


def _day_sets(draw, keys: int) -> dict[str, dict[int, list[str]]]:
    out = {}
    for k in range(keys):
        pool = draw(st.integers(1, 40))
        days = draw(st.lists(st.integers(0, SPAN - 1), min_size=1, max_size=6, unique=True))
        out[f"/k{k:02d}"] = {d: sorted({f"{k}-{draw(st.integers(0, pool - 1))}"
                                        for _ in range(draw(st.integers(1, 12)))}) for d in days}
    return out


@st.composite
def cases(draw):
    data = _day_sets(draw, draw(st.integers(1, 24)))
    unknown = draw(st.sets(st.sampled_from(sorted(data)), max_size=3))
    lo = draw(st.integers(0, SPAN - 2))
    hi = draw(st.integers(lo + 1, SPAN))
    return data, unknown, draw(st.booleans()), lo, hi, draw(st.integers(1, 6)), draw(st.integers(0, 4)), \
        draw(st.integers(1, 4))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_the_ranking_equals_a_brute_force_over_every_sketch(db, case):
    """Random values, days and visitors; some values' rows without a bound (written before 0014: their events
    bound them), the closed weeks compacted or not, any range and page of rows, each visitor a few events a day;
    and a filter on one value. The breakdown's rows are the brute force's."""
    data, unknown, compacted, lo, hi, limit, offset, repeat = case
    domain = _domain()
    _put(db, domain, data, repeat=repeat)
    if unknown:
        db.execute("UPDATE visitors_dim_1d SET n = NULL WHERE domain = %s AND key = ANY(%s)", (domain, list(unknown)))
    if compacted:
        weekly.compact_weeks(db, domain, "UTC", weekly.weeks_in("UTC", BASE, BASE + SPAN * DAY))
    q = _query(domain, lo, hi, limit, offset)
    got = _answer(db, q)
    assert [(r.key, r.count) for r in got.rows] == _brute(db, q)
    key = sorted(data)[0]
    filtered = _answer(db, _query(domain, lo, hi, filters=(Filter("page", key),)))
    assert [(r.key, r.count) for r in filtered.rows] == [kv for kv in _brute(db, _query(domain, lo, hi, limit=99))
                                                         if kv[0] == key]


# ------------------------------------------------------------------------------------------------ migration

def test_0014_adds_the_bounds_and_the_index_column_keeping_rows(fresh_dsn):  # noqa: F811
    """A database at 0013 with a sketch row gets `n` (NULL for it: unknown) and the index with INCLUDE (n); the
    downgrade drops both keeping the row; upgrading again matches `metadata`."""
    from oltp.schema import ensure_schema

    ensure_schema(fresh_dsn, "0013")
    day = _TODAY - DAY
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        ensure_partitions(conn, "visitors_dim_1d", day, day)
        conn.execute("INSERT INTO visitors_dim_1d (domain, tz, dimension, bucket_start, key, sketch)"
                     " VALUES ('a.example', 'UTC', 'page', %s, '/a', '\\x00')", (day,))
    ensure_schema(fresh_dsn)
    assert schema_diff(fresh_dsn) == []
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT key, n FROM visitors_dim_1d").fetchall() == [("/a", None)]
        assert "INCLUDE (n)" in _index(conn)
        assert conn.execute("SELECT count(*) FROM information_schema.columns WHERE column_name = 'n'"
                            " AND table_name IN ('visitors_dim_1d', 'visitors_dim_1w')").fetchone()[0] == 2
    downgrade(fresh_dsn, "0013")
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT key FROM visitors_dim_1d").fetchall() == [("/a",)]
        assert "INCLUDE" not in _index(conn)
        assert conn.execute("SELECT count(*) FROM information_schema.columns WHERE column_name = 'n'"
                            " AND table_name IN ('visitors_dim_1d', 'visitors_dim_1w')").fetchone()[0] == 0
    ensure_schema(fresh_dsn)
    assert schema_diff(fresh_dsn) == []


def _index(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'visitors_dim_1d_key'").fetchone()[0]
