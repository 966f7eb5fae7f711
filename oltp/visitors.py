"""Unique visitors: HyperLogLog sketches of the daily visitor key (issue 17 item 2, docs/adr/0047-visitor-sketches.md).

Tables (migration 0011): `visitors_1h` per (domain, UTC hour), `visitors_1d` per (domain, zone, local day) and
`visitors_dim_1d` per (domain, zone, local day, dimension, capped value); each `sketch` is an Apache DataSketches
HLL sketch (HLL_4) serialized compact: a few bytes per visitor while small (list/set mode), at most
~8.2 KiB (lg_k 14, the domain totals: RSE 0.8 %) or ~2.1 KiB (lg_k 12, per dimension value: RSE 1.6 %).

`visitors_dim_1d` rows also carry `n` (migration 0014, ADR 62): an upper bound of the distinct visitor keys the
sketch holds, which ranks a visitors breakdown's candidates (`visitor_bounds`); NULL on rows written before.

A key (the columns before `sketch`) may have several rows: its sketch is their union. Write side: the rollup sink
calls `add_visitors(cur, groups)` in its batch transaction, which appends one partial sketch per group (one
statement) and every COMPACT_AT batches merges a key's rows into one. A union is idempotent, so a redelivered
event adds nothing and the sink may pass every event of a batch, counted or not; no `seen_events` bookkeeping
is needed here. `tally rebuild` recomputes the sketches from ClickHouse (`rebuild_visitors`).

Read side (`visitors_total`, `visitors_series`, `visitors_by_key`, `visitor_bounds`): a range is answered by merging
sketches, never by adding counts (a visitor seen on two days counts once). Ranges are widened to whole UTC hours.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any, Protocol

import msgspec
import psycopg
from datasketches import hll_sketch, hll_union, tgt_hll_type

from oltp.queries import DailyZone, boundaries, daily_zone
from oltp.spans import DAY_S
from oltp.tiers import DayStarts, zone

# grain ('1h' | '1d'), domain, tz ('' for 1h), bucket start, dimension ('' = domain total), key, distinct visitors
VisitorGroup = tuple[str, str, str, datetime, str, str, list[str]]

DIMENSIONS = ("page", "source", "country", "device", "browser", "os")
TOTAL_LG_K = 14  # domain totals (1h, 1d): relative standard error 1.04 / sqrt(2**14) = 0.8 %
DIM_LG_K = 12    # per dimension value (1d): 1.6 %, at most ~2.1 KiB a sketch (ADR 47)
HLL_TYPE = tgt_hll_type.HLL_4
HOUR = timedelta(hours=1)
_LONGEST_DAY = timedelta(days=2)  # no local day since 1970 is longer (the reads' `lo - 2 days` rests on it too)
_TICK = timedelta(microseconds=1)  # timestamptz's resolution: [t, t + 1 µs) holds t alone
_EPOCH, _ZERO = datetime(1970, 1, 1, tzinfo=UTC), timedelta(0)

COMPACT_AT = 16  # rows of one key (partial sketches) after which the writer merges them into one

# Per table: name, key columns (the index's order), their SQL types, lg_k.
_TABLES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], int], ...] = (
    ("visitors_1h", ("domain", "bucket_start"), ("text", "timestamptz"), TOTAL_LG_K),
    ("visitors_1d", ("domain", "tz", "bucket_start"), ("text", "text", "timestamptz"), TOTAL_LG_K),
    ("visitors_dim_1d", ("domain", "tz", "dimension", "bucket_start", "key"),
     ("text", "text", "text", "timestamptz", "text"), DIM_LG_K),
)
# The table whose rows carry `n` (migration 0014, ADR 62): an upper bound of the distinct visitor keys its sketch
# holds, the sum of the lengths of the visitor lists it was built from (each list distinct, so exact for one list);
# a merged row has the sum of its rows' n (NULL if one is NULL: a row written before 0014, bound unknown).
BOUNDED = 2


def _param(t: int, col: str) -> str:
    return f"t{t}_{col}"


def _unnest(t: int, cols: tuple[str, ...], types: tuple[str, ...], sketch: bool) -> str:
    arrays = [f"%({_param(t, c)})s::{ty}[]" for c, ty in zip(cols, types, strict=True)]
    if sketch:
        arrays.append(f"%({_param(t, 'sketch')})s::bytea[]")
        if t == BOUNDED:
            arrays.append(f"%({_param(t, 'n')})s::bigint[]")
    return "unnest(" + ", ".join(arrays) + ")"


def _insert_sql() -> str:
    """One statement inserting the partial sketches of all three tables (and `n` where kept)."""
    parts = [f"i{t} AS (INSERT INTO {table} ({', '.join(cols)}, sketch{', n' if t == BOUNDED else ''})"
             f" SELECT * FROM {_unnest(t, cols, types, True)})" for t, (table, cols, types, _) in enumerate(_TABLES)]
    return f"WITH {', '.join(parts)} SELECT 1"


def _take_sql() -> str:
    """One statement deleting every row of some keys of the three tables and returning their sketches."""
    parts = []
    for t, (table, cols, types, _) in enumerate(_TABLES):
        on = " AND ".join(f"v.{c} = u.{c}" for c in cols)
        parts.append(f"d{t} AS (DELETE FROM {table} v USING {_unnest(t, cols, types, False)} WITH ORDINALITY"
                     f" AS u({', '.join(cols)}, i) WHERE {on} RETURNING {t} AS t, u.i, v.sketch,"
                     f" {'v.n' if t == BOUNDED else 'NULL::bigint'} AS n)")
    return f"WITH {', '.join(parts)} " + " UNION ALL ".join(f"SELECT t, i, sketch, n FROM d{t}" for t in range(3))


_INSERT = _insert_sql()
_TAKE = _take_sql()
_JSON = msgspec.json.Encoder().encode


def _array(values: Sequence[Any]) -> str | list[Any]:
    """Text or timestamps as one PostgreSQL array literal written by msgspec in C (psycopg's own list dumper runs
    Python per element); the list itself when a value needs a backslash escape (as oltp/rollup_sink.py's)."""
    data = _JSON(values)
    if b"\\" in data:
        return list(values)
    return "{" + data[1:-1].decode() + "}"


def _bytea_array(values: Sequence[bytes]) -> str:
    """Sketches as one bytea[] literal of hex strings."""
    return "{" + ",".join([f'"\\\\x{b.hex()}"' for b in values]) + "}"


text_array, bytea_array = _array, _bytea_array  # for oltp/weekly.py's inserts

Rows = list[list[tuple[Any, ...]]]  # per table: (key columns..., sketch, n) or, for `compact`, (key columns...)


def _params(rows: Rows, sketches: bool = True) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for t, (_, cols, _, _) in enumerate(_TABLES):
        columns = list(zip(*rows[t], strict=True)) or [()] * (len(cols) + 2 * sketches)
        params.update({_param(t, c): _array(v) for c, v in zip(cols, columns[:len(cols)], strict=True)})
        if sketches:
            params[_param(t, "sketch")] = _bytea_array(columns[len(cols)])
            if t == BOUNDED:
                params[_param(t, "n")] = list(columns[len(cols) + 1])
    return params


def _gather(groups: Iterable[VisitorGroup]) -> Rows:
    """Per table, (key columns..., sketch of the group's visitors, n) (groups with the same key are joined; n, the
    sum of their lists' lengths, bounds the distinct visitors the sketch holds: a group's visitors are distinct)."""
    maps: tuple[dict[tuple[Any, ...], Any], ...] = ({}, {}, {})
    sizes: dict[tuple[Any, ...], int] = {}
    k: tuple[Any, ...]
    for grain, domain, tz, start, dimension, key, visitors in groups:
        if grain == "1h":
            t, k = 0, (domain, start)
        elif grain != "1d":
            raise ValueError(f"visitor group grain must be '1h' or '1d', not {grain!r}")
        elif not dimension:
            t, k = 1, (domain, tz, start)
        else:
            t, k = 2, (domain, tz, dimension, start, key)
        if visitors:
            sketch = maps[t].get(k)
            if sketch is None:
                sketch = maps[t][k] = hll_sketch(_TABLES[t][3], HLL_TYPE)
            update = sketch.update
            for v in visitors:
                update(v)
            if t == BOUNDED:
                sizes[k] = sizes.get(k, 0) + len(visitors)
    return [[(*k, s.serialize_compact(), sizes.get(k) if t == BOUNDED else None) for k, s in m.items()]
            for t, m in enumerate(maps)]


class _Appended:
    """Partial rows this process appended per key since it last merged that key (thread-safe). Only decides when
    to merge: a key holds at most COMPACT_AT rows per process that writes it (a domain's events go to one Kafka
    partition, so usually one), plus those left by a process that stopped. Forgotten when it grows past
    MAX_KEYS (those keys are merged later than they could be, never wrongly). A key is counted under its hash (an
    int, 88 bytes an entry with the dict's share, against 373 for the tuple of fresh strings a batch decodes:
    44 MB at MAX_KEYS instead of 187): two keys sharing a 64-bit hash would only share a count, and one of them
    be merged sooner or later than it could be."""

    MAX_KEYS = 500_000

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()

    def due(self, rows: Rows) -> list[list[tuple[Any, ...]]]:
        """Count one more row for each key of `rows`; the keys (per table) that reached COMPACT_AT, reset."""
        due: list[list[tuple[Any, ...]]] = [[], [], []]
        with self._lock:
            if len(self._counts) > self.MAX_KEYS:
                self._counts.clear()
            counts = self._counts
            for t, table_rows in enumerate(rows):
                width = len(_TABLES[t][1])
                for row in table_rows:
                    k = hash((t, row[:width]))
                    n = counts.get(k)
                    # a key seen first starts at a point of its own: keys written together merge in different batches
                    n = (k % COMPACT_AT if n is None else n) + 1
                    if n >= COMPACT_AT:
                        due[t].append(row[:width])
                        n = 0
                    counts[k] = n
        return due


_APPENDED = _Appended()


def add_visitors(cur: psycopg.Cursor[Any], groups: Sequence[VisitorGroup]) -> None:
    """Add each group's visitor keys to its sketch, inside the caller's transaction (nothing is committed here).

    Append only (ADR 47): one statement inserts a partial sketch of each group's visitors (a few bytes per
    visitor, built here); a key to which this process has appended COMPACT_AT rows is merged into one row in
    the same transaction (one statement deletes its rows returning the sketches, one inserts their union). No
    row is read-modified-written or locked otherwise; a key's sketch is the union of its rows, so re-adding a
    visitor (a redelivered batch) changes no answer. The partitions must exist (the sink's
    `ensure_tier_partitions` creates them with the tiers'). Groups without visitors are ignored; a grain other
    than '1h' / '1d' is a ValueError."""
    rows = _gather(groups)
    if not any(rows):
        return
    cur.execute(_INSERT, _params(rows), prepare=False)
    due = _APPENDED.due(rows)
    if any(due):
        compact(cur, due)


def bound_sum(bounds: Iterable[int | None]) -> int | None:
    """The bound of a union of rows: the sum of theirs, None (unknown) if one is unknown."""
    total = 0
    for n in bounds:
        if n is None:
            return None
        total += n
    return total


def compact(cur: psycopg.Cursor[Any], keys: list[list[tuple[Any, ...]]]) -> None:
    """Merge every row of these keys (per table: key column tuples) into one, in the caller's transaction. The
    DELETE takes the rows it merges: a concurrent compaction of the same key merges the others (never one row
    twice), and a partial sketch inserted meanwhile stays beside the merged row. The merged row's `n` is the sum
    of the merged rows' (an upper bound still; NULL when one was NULL)."""
    taken: dict[tuple[int, int], list[tuple[bytes, int | None]]] = {}
    for t, i, sketch, n in cur.execute(_TAKE, _params(keys, sketches=False), prepare=False):
        taken.setdefault((t, i - 1), []).append((sketch, n))
    merged: Rows = [[], [], []]
    for (t, i), rows in sorted(taken.items()):
        union = hll_union(_TABLES[t][3])
        for s in in_order([s for s, _ in rows]):  # the readers' order, not the DELETE's
            union.update(hll_sketch.deserialize(s))
        merged[t].append((*keys[t][i], union.get_result(HLL_TYPE).serialize_compact(), bound_sum(n for _, n in rows)))
    if any(merged):
        cur.execute(_INSERT, _params(merged), prepare=False)


# --------------------------------------------------------------------------------------------- read side


class _Spans(Protocol):
    def span(self, tz: str, lo: datetime, hi: datetime) -> list[datetime]: ...


def _floor_hour(t: datetime) -> datetime:
    t = t.astimezone(UTC)
    return t.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(t: datetime) -> datetime:
    f = _floor_hour(t)
    return f if f == t else f + HOUR


def _hours(lo: datetime, hi: datetime) -> list[datetime]:
    out, t = [], lo
    while t < hi:
        out.append(t)
        t += HOUR
    return out


def _check(lo: datetime, hi: datetime) -> None:
    if lo.tzinfo is None or hi.tzinfo is None:
        raise ValueError("visitors: times must be timezone-aware")
    if hi <= lo:
        raise ValueError("visitors: 'hi' must be after 'lo'")


Run = tuple[datetime, datetime]  # [a, b): whole UTC hours (hourly sketches) or local days (daily sketches)


def _plan(lo: datetime, hi: datetime, daily: DailyZone, days: _Spans) -> tuple[list[datetime], list[Run]]:
    """`plan_range` with its hours as runs [a, b) of whole UTC hours (at most two, none empty), not one by one: a
    13-year series of days of another zone is ~120,000 hours, which cost far more to list and to send than the
    sketches that exist (none before the hourly tier's retention)."""
    lo_h, hi_h = _floor_hour(lo), _ceil_hour(hi)
    written = daily.written_tz
    if written is not None and written == daily.registered_tz:
        start = max(lo_h, daily.complete_from) if daily.complete_from is not None else lo_h
        span = days.span(written, lo_h, hi_h)
        whole = [(a, b) for a, b in pairwise(span) if a >= start and b <= hi_h]
        if whole:
            first, end = whole[0][0], whole[-1][1]
            head = [(lo_h, _ceil_hour(first))] if lo < first else []
            tail = [(_floor_hour(end), hi_h)] if end < hi else []
            return [a for a, _ in whole], head + tail
    return [], [(lo_h, hi_h)]


def plan_range(lo: datetime, hi: datetime, daily: DailyZone, days: _Spans) -> tuple[list[datetime], list[datetime]]:
    """Which sketches answer [lo, hi), widened to whole UTC hours: (visitors_1d day starts, visitors_1h hours).

    The daily sketches of the zone they are written in serve the whole days inside the (widened) range from the day the
    daily tier is complete (`DailyZone.complete_from`), and only while that zone is the site's registered one
    (after a zone change, hours answer: ADR 19's rule); hourly sketches cover the rest of [lo, hi). Where a day
    does not start on a UTC hour (+05:30), an edge hour overlaps the day: harmless, a union counts a visitor
    once. A range that is exactly whole days (a daily bucket) needs no hour at all. (The reads use `_plan`, the
    same with the hours as runs.)"""
    day_starts, runs = _plan(lo, hi, daily, days)
    return day_starts, [h for a, b in runs for h in _hours(a, b)]


def _merged(runs: Iterable[Run]) -> tuple[list[datetime], list[datetime]]:
    """The union of these runs as disjoint sorted runs, (starts, ends): what `_fetch` sends (a series' runs touch
    one another: one run; never one element per hour or day)."""
    los: list[datetime] = []
    his: list[datetime] = []
    for a, b in sorted(runs):
        if his and a <= his[-1]:
            his[-1] = max(his[-1], b)
        else:
            los.append(a)
            his.append(b)
    return los, his


# Rows inside some runs [lo, hi): one index range scan of (domain, bucket_start) per run, whatever the statistics
# (the lateral subquery, kept apart by OFFSET 0, takes its run's bounds as parameters: run-time partition pruning).
_DAYS_IN = """
SELECT r.bucket_start, r.sketch FROM unnest(%(lo)s::timestamptz[], %(hi)s::timestamptz[]) AS g(lo, hi)
CROSS JOIN LATERAL (SELECT v.bucket_start, v.sketch FROM visitors_1d v WHERE v.domain = %(domain)s AND v.tz = %(tz)s
                    AND v.bucket_start >= g.lo AND v.bucket_start < g.hi OFFSET 0) r
"""
_HOURS_IN = """
SELECT r.bucket_start, r.sketch FROM unnest(%(lo)s::timestamptz[], %(hi)s::timestamptz[]) AS g(lo, hi)
CROSS JOIN LATERAL (SELECT v.bucket_start, v.sketch FROM visitors_1h v WHERE v.domain = %(domain)s
                    AND v.bucket_start >= g.lo AND v.bucket_start < g.hi OFFSET 0) r
"""


class _Hourly:
    """The hourly rows `_fetch` found, sorted by (hour, sketch bytes): the sketches of a run of hours are a slice,
    in the order the hours one by one gave (each hour's rows `in_order`, the hours ascending)."""

    def __init__(self, rows: list[tuple[datetime, bytes]]) -> None:
        rows.sort()
        self._starts = [t for t, _ in rows]
        self._sketches = [s for _, s in rows]

    def of(self, runs: Iterable[Run]) -> list[bytes]:
        out: list[bytes] = []
        for a, b in runs:
            out += self._sketches[bisect_left(self._starts, a):bisect_left(self._starts, b)]
        return out


def _fetch(conn: psycopg.Connection[Any], domain: str, tz: str | None, day_starts: Iterable[datetime],
           hour_runs: Iterable[Run]) -> tuple[dict[datetime, list[bytes]], _Hourly]:
    """The sketch rows (a key may have several, see `add_visitors`) of these days (in `tz`) and runs of hours, each
    bucket's in one order (`in_order`) whatever the rows' places on disk. The days and hours themselves are merged in
    the order of the plan. Both are read by runs [a, b) (the days': from one day to the last of those that follow
    it less than a longest day apart), never one parameter per day or hour; a row at a time that is not one of
    these days, or not a whole UTC hour, is left out (as an exact match of each left it out)."""
    wanted = set(day_starts)
    daily: dict[datetime, list[bytes]] = {}
    hourly: list[tuple[datetime, bytes]] = []
    if wanted:
        lo, hi = _merged(_day_runs(sorted(wanted)))
        for start, sketch in conn.execute(_DAYS_IN, {"domain": domain, "tz": tz, "lo": lo, "hi": hi}, binary=True):
            if start in wanted:
                daily.setdefault(start, []).append(sketch)
    lo, hi = _merged(hour_runs)
    if lo:
        for start, sketch in conn.execute(_HOURS_IN, {"domain": domain, "lo": lo, "hi": hi}, binary=True):
            if (start - _EPOCH) % HOUR == _ZERO:
                hourly.append((start, sketch))
    for found in daily.values():
        in_order(found)
    return daily, _Hourly(hourly)


def _day_runs(starts: list[datetime]) -> list[Run]:
    """Sorted day starts as runs: consecutive starts (at most a longest day apart) in one [first, last + 1 µs)."""
    runs: list[Run] = []
    for t in starts:
        if runs and t - runs[-1][1] < _LONGEST_DAY:
            runs[-1] = (runs[-1][0], t + _TICK)
        else:
            runs.append((t, t + _TICK))
    return runs


def in_order(sketches: list[Any]) -> list[Any]:
    """Sketches to merge (or tuples starting with one), sorted in place by their bytes: one order whatever their
    places on disk, for any subset the same relative order. A union of sketches still holding lists of visitors
    estimates with HIP, which depends on the order they come in, and its result keeps that state (seven partial
    rows of one hour, 300 visitors each: 2,110 one way, 2,104 the other; ADR 47's addendum). Sorted here, by
    memcmp: PostgreSQL, asked to, decompressed each stored sketch per comparison (25x slower on 84,000 rows)."""
    sketches.sort()
    return sketches


def estimate(sketches: Sequence[bytes], lg_k: int = TOTAL_LG_K) -> int:
    """Distinct visitors in the union of these serialized sketches (0 for none). One sketch answers with its
    own estimator (HIP, more accurate than a union's)."""
    if not sketches:
        return 0
    if len(sketches) == 1:
        return int(round(hll_sketch.deserialize(sketches[0]).get_estimate()))
    union = hll_union(lg_k)
    for s in sketches:
        union.update(hll_sketch.deserialize(s))
    return int(round(union.get_estimate()))


class _SpanWindow:
    """`DayStarts.span` for many ranges inside one window: the zone's day starts are computed once for the window
    (a series asks a span per bucket; each computed afresh scanned the zone's offsets ~100 times a bucket)."""

    def __init__(self, lo: datetime, hi: datetime) -> None:
        self._lo, self._hi = int(lo.timestamp() // 1) - 4 * DAY_S, -int(-hi.timestamp() // 1) + 4 * DAY_S
        self._found: dict[str, list[int]] = {}
        self._days = DayStarts()

    def span(self, tz: str, lo: datetime, hi: datetime) -> list[datetime]:
        a, b = int(lo.timestamp() // 1), -int(-hi.timestamp() // 1)
        if a - 3 * DAY_S < self._lo or b + 3 * DAY_S > self._hi:
            return self._days.span(tz, lo, hi)
        found = self._found.get(tz)
        if found is None:
            found = self._found[tz] = boundaries(zone(tz), self._lo, self._hi, DAY_S)
        i, j = bisect_right(found, a) - 1, bisect_left(found, b)
        return [datetime.fromtimestamp(x, UTC) for x in found[i:j + 1]]


def _estimate_ranges(conn: psycopg.Connection[Any], domain: str, ranges: list[tuple[datetime, datetime]],
                     daily: DailyZone | None = None) -> list[int]:
    daily = daily or daily_zone(conn, domain)
    days = _SpanWindow(min(lo for lo, _ in ranges), max(hi for _, hi in ranges))
    plans = [_plan(lo, hi, daily, days) for lo, hi in ranges]
    by_day, by_hour = _fetch(conn, domain, daily.written_tz, (d for p in plans for d in p[0]),
                             (r for p in plans for r in p[1]))
    return [estimate([s for d in p[0] for s in by_day.get(d, ())] + by_hour.of(p[1])) for p in plans]


def visitors_total(conn: psycopg.Connection[Any], domain: str, tz: str, lo: datetime, hi: datetime,
                   daily: DailyZone | None = None) -> int:
    """Distinct visitors in [lo, hi) widened to whole UTC hours (`plan_range`); 0 when no sketch.

    `tz` (the caller's zone) does not change the answer: the daily sketches serve wherever a whole day of the
    zone they were written in lies in the range, whatever the zone of the caller's buckets. `daily`: the domain's,
    if the caller has read it (else read here)."""
    return visitors_of_ranges(conn, domain, [(lo, hi)], daily)[0]


def visitors_of_ranges(conn: psycopg.Connection[Any], domain: str, ranges: Sequence[tuple[datetime, datetime]],
                       daily: DailyZone | None = None) -> list[int]:
    """`visitors_total` of each range, from one read of the domain's daily zone and one fetch of the sketches
    they need (a day or hour shared by several ranges is read once). `daily`: the domain's, if the caller has
    read it (else read here)."""
    for lo, hi in ranges:
        _check(lo, hi)
    return _estimate_ranges(conn, domain, list(ranges), daily) if ranges else []


def _series_ranges(tz: str, tier: str, starts: list[datetime]) -> list[tuple[datetime, datetime]]:
    """Bucket i is [starts[i], starts[i+1]); the last one is an hour long (tier '1h') or ends at the next day start
    in `tz` (tier '1d')."""
    if tier not in ("1h", "1d"):
        raise ValueError("visitors_series: tier must be '1h' or '1d'")
    if not starts:
        return []
    for a, b in pairwise(starts):
        _check(a, b)
    last_end = starts[-1] + HOUR if tier == "1h" else DayStarts().next_start(tz, starts[-1])
    return list(zip(starts, [*starts[1:], last_end], strict=True))


def visitors_series(conn: psycopg.Connection[Any], domain: str, tz: str, tier: str,
                    starts: list[datetime]) -> list[int]:
    """Visitors per bucket (`_series_ranges`). Each is answered as `visitors_total` answers its range."""
    ranges = _series_ranges(tz, tier, starts)
    return _estimate_ranges(conn, domain, ranges) if ranges else []


def visitors_series_and_total(conn: psycopg.Connection[Any], domain: str, tz: str, tier: str, starts: list[datetime],
                              lo: datetime, hi: datetime, daily: DailyZone | None = None) -> tuple[list[int], int]:
    """`visitors_series` and `visitors_total` of [lo, hi) (the series' whole range), from one fetch of sketches:
    the range's days are the buckets' days, read once instead of twice. `daily`: the domain's, if the caller has
    read it (else read here)."""
    found = visitors_of_ranges(conn, domain, [*_series_ranges(tz, tier, starts), (lo, hi)], daily)
    return found[:-1], found[-1]


_BY_KEY = """
SELECT v.tz, v.bucket_start, v.key, v.sketch FROM visitors_dim_1d v
WHERE v.domain = %(domain)s AND v.dimension = %(dimension)s
  AND v.tz IN (SELECT DISTINCT tz FROM visitors_1d WHERE domain = %(domain)s
               AND bucket_start >= %(lo)s AND bucket_start < %(hi)s)
  AND v.bucket_start >= %(lo)s AND v.bucket_start < %(hi)s
  AND (%(keys)s::text[] IS NULL OR v.key = ANY(%(keys)s::text[]))
"""

# The same with some whole weeks of `tz` (the site's zone) read pre-merged from visitors_dim_1w (oltp/weekly.py):
# the days of `tz` outside them (the gaps), the days of any other zone written in the range, and the weeks.
# `{day}` / `{week}`: the columns selected from a daily / weekly row (visitors_by_key's, visitor_bounds's).
_ROWS_WITH_WEEKS = """
SELECT {day} FROM unnest(%(glo)s::timestamptz[], %(ghi)s::timestamptz[]) AS g(lo, hi)
JOIN visitors_dim_1d v ON v.domain = %(domain)s AND v.tz = %(tz)s AND v.dimension = %(dimension)s
 AND v.bucket_start >= g.lo AND v.bucket_start < g.hi
WHERE (%(keys)s::text[] IS NULL OR v.key = ANY(%(keys)s::text[]))
UNION ALL
SELECT {day} FROM visitors_dim_1d v
WHERE v.domain = %(domain)s AND v.dimension = %(dimension)s
  AND v.tz IN (SELECT DISTINCT tz FROM visitors_1d WHERE domain = %(domain)s AND tz <> %(tz)s
               AND bucket_start >= %(lo)s AND bucket_start < %(hi)s)
  AND v.bucket_start >= %(lo)s AND v.bucket_start < %(hi)s
  AND (%(keys)s::text[] IS NULL OR v.key = ANY(%(keys)s::text[]))
UNION ALL
SELECT {week} FROM visitors_dim_1w w
WHERE w.domain = %(domain)s AND w.tz = %(tz)s AND w.dimension = %(dimension)s
  AND w.bucket_start = ANY(%(weeks)s::timestamptz[]) AND (%(keys)s::text[] IS NULL OR w.key = ANY(%(keys)s::text[]))
"""
_BY_KEY_WEEKS = _ROWS_WITH_WEEKS.format(day="v.tz, v.bucket_start, v.key, v.sketch", week="w.tz, NULL, w.key, w.sketch")


def _rows_params(domain: str, tz: str, dimension: str, lo: datetime, hi: datetime, keys: list[str] | None,
                 weeks: Sequence[tuple[datetime, datetime]], weeks_form: bool) -> tuple[dict[str, Any], bool]:
    """The parameters of _BY_KEY / _ROWS_WITH_WEEKS for [lo, hi), and whether some of `weeks` lie inside it. Those
    of the weeks' form (the days of `tz` outside the weeks, the weeks) are made when some do, or if `weeks_form`."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"dimension must be one of {', '.join(DIMENSIONS)}")
    params: dict[str, Any] = {"domain": domain, "tz": tz, "dimension": dimension, "lo": lo - _LONGEST_DAY,
                              "hi": hi, "keys": keys}
    used = sorted(w for w in weeks if lo <= w[0] and w[1] <= hi)
    if used or weeks_form:
        spaces = week_gaps(DayStarts().start(tz, lo), hi, used)  # days of `tz` before the one holding lo end <= lo
        params.update(weeks=[a for a, _ in used], glo=[a for a, _ in spaces], ghi=[b for _, b in spaces])
    return params, bool(used)


def visitors_by_key(conn: psycopg.Connection[Any], domain: str, tz: str, dimension: str, lo: datetime,
                    hi: datetime, keys: list[str] | None = None,
                    weeks: Sequence[tuple[datetime, datetime]] = ()) -> dict[str, int]:
    """Distinct visitors per value of `dimension` ('' = none, '(other)' = past the cap) over the local days that
    overlap [lo, hi): the daily sketches of each value merged. Days are those the sketches were written in (the
    site's zone then; after a zone change both zones' days, a union counting each visitor once). `keys`
    limits the answer to those values (a page of a breakdown: much less to merge). Values without visitors
    are absent. `weeks`: whole local weeks of `tz` inside [lo, hi) whose pre-merged sketches are current
    (`oltp.weekly.valid_weeks`): read from visitors_dim_1w instead of their days (the same union, fewer rows;
    its estimate may differ within the sketch's error, ADR 47's addendum)."""
    _check(lo, hi)
    params, used = _rows_params(domain, tz, dimension, lo, hi, keys, weeks, weeks_form=False)
    rows = conn.execute(_BY_KEY_WEEKS if used else _BY_KEY, params, binary=True).fetchall()
    days, ends = DayStarts(), dict[tuple[str, datetime], datetime]()
    per_key: dict[str, list[bytes]] = {}
    for written, start, key, sketch in rows:
        if start is None:  # a pre-merged week: inside [lo, hi)
            per_key.setdefault(key, []).append(sketch)
            continue
        end = ends.get((written, start))
        if end is None:  # once per day (rows are per day and key): next_start costs a few microseconds
            end = ends[written, start] = days.next_start(written, start)
        if end > lo:
            per_key.setdefault(key, []).append(sketch)
    return {key: estimate(in_order(sketches), DIM_LG_K) for key, sketches in per_key.items()}


def key_visitors_series(conn: psycopg.Connection[Any], domain: str, tz: str, dimension: str, key: str,
                        bounds: list[datetime]) -> tuple[list[int], int]:
    """`visitors_by_key` of one value for each bucket [bounds[i], bounds[i+1]) and for [bounds[0], bounds[-1]), from
    one fetch of the value's daily rows over the whole range (a bucket per query made a 90-day series 90 queries):
    each bucket merges the rows whose local day (in the zone it was written in) overlaps it, as the query of that
    bucket alone would. `tz`: the site's zone."""
    lo, hi = bounds[0], bounds[-1]
    for a, b in pairwise(bounds):
        _check(a, b)
    params, _ = _rows_params(domain, tz, dimension, lo, hi, [key], (), weeks_form=False)
    days, ends = DayStarts(), dict[tuple[str, datetime], datetime]()
    kept: list[tuple[bytes, datetime, datetime]] = []
    for written, start, _, sketch in conn.execute(_BY_KEY, params, binary=True).fetchall():
        end = ends.get((written, start))
        if end is None:
            end = ends[written, start] = days.next_start(written, start)
        if end > lo:
            kept.append((sketch, start, end))
    found = [(start, end, sketch) for sketch, start, end in in_order(kept)]  # visitors_by_key's order: by bytes
    by_start = sorted(range(len(found)), key=lambda i: found[i][0])
    starts = [found[i][0] for i in by_start]
    buckets = []
    for a, b in pairwise(bounds):
        # a day overlapping [a, b) starts in [a - 2 days, b); its rows are merged in `found`'s order, the bucket's own
        # query's (a union's estimate can depend on the order of its sketches)
        rows = sorted(by_start[bisect_left(starts, a - _LONGEST_DAY):bisect_left(starts, b)])
        buckets.append(estimate([found[i][2] for i in rows if found[i][1] > a], DIM_LG_K))
    return buckets, estimate([s for _, _, s in found], DIM_LG_K)


# Per value, the sum of `n` (ADR 62) over the rows visitors_by_key would merge for [lo, hi) with these weeks (a
# superset for the days of another zone: a bound may only be loose), and whether one row's n is unknown.
_BOUNDS = ("SELECT x.key, sum(x.n)::bigint, bool_or(x.n IS NULL) FROM ("
           + _ROWS_WITH_WEEKS.format(day="v.key, v.n", week="w.key, w.n") + ") x GROUP BY x.key")


# The same, highest first: the values with an unknown n, then by bound descending, then by key in code point order
# (Python's str order, whatever the database's collation), the first %(limit)s only.
_TOP_BOUNDS = (_BOUNDS + " ORDER BY bool_or(x.n IS NULL) DESC, sum(x.n) DESC, x.key COLLATE \"C\""
               " LIMIT %(limit)s")


def visitor_bounds(conn: psycopg.Connection[Any], domain: str, tz: str, dimension: str, lo: datetime, hi: datetime,
                   weeks: Sequence[tuple[datetime, datetime]] = (), limit: int | None = None) -> dict[str, int | None]:
    """Per value of `dimension` with a sketch row in the days `visitors_by_key` merges for the same arguments, an
    upper bound of its distinct visitors there: the sum of its rows' `n` (one statement, an index-only scan of
    visitors_dim_1d_key where the visibility map allows); None where a row's n is unknown (written before
    migration 0014). With `limit`: only the first `limit` values, in the order of `_TOP_BOUNDS` (those with an
    unknown bound first: when the first has a known one, every value has), and the dict in that order."""
    _check(lo, hi)
    params, _ = _rows_params(domain, tz, dimension, lo, hi, None, weeks, weeks_form=True)
    rows = conn.execute(_BOUNDS if limit is None else _TOP_BOUNDS, {**params, "limit": limit}).fetchall()
    return {key: None if unknown else int(total) for key, total, unknown in rows}


def week_gaps(lo: datetime, hi: datetime, weeks: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """[lo, hi) less the (sorted, disjoint) weeks."""
    out, t = [], lo
    for a, b in weeks:
        if t < a:
            out.append((t, a))
        t = max(t, b)
    if t < hi:
        out.append((t, hi))
    return out


# --------------------------------------------------------------------------------------------- rebuild

OTHER = "(other)"  # the key of values past the cap (as oltp/rollup_dims.py)


class VisitorSource(Protocol):
    """What `rebuild_visitors` asks ClickHouse (olap/aggregates.py `visitors`): the distinct (domain, UTC quarter
    hour, visitor, page, source, country, device, browser, os) of the non-bot events with a visitor key in
    [lo, hi), '' for a missing value."""

    def visitors(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[tuple[Any, ...]]: ...


@dataclass
class _Rebuilt:
    """The sketches' contents of a rebuilt range: key -> visitors, as `_gather` makes them."""

    hourly: dict[tuple[str, datetime], set[str]] = field(default_factory=dict)
    daily: dict[tuple[str, str, datetime], set[str]] = field(default_factory=dict)
    dims: dict[tuple[str, str, datetime, str, str], set[str]] = field(default_factory=dict)  # day, dimension, key


def rebuild_visitors(conn: psycopg.Connection[Any], source: VisitorSource, lo: datetime, hi: datetime,
                     domain: str | None = None, *, cap: int = 1000) -> int:
    """Recompute the visitor sketches of [lo, hi) (one domain, or all) from ClickHouse, inside the caller's
    transaction: `tally rebuild`'s chunk transaction (oltp/rebuild.py), which holds the sinks off and has made
    sure ClickHouse holds every event PostgreSQL counted, so replacing loses nothing (a sink adding an event
    again later changes nothing: the union is idempotent). Returns the sketches written.

    Like `oltp.tiers.rederive`: the hours are widened to whole UTC hours, the days to the whole local days of
    each domain's registered zone that overlap those hours (ClickHouse is asked for that wider range); days kept
    under another zone are left alone. A dimension value keeps its key where the daily rollup by dimension
    (`rollup_dim_1d`, rebuilt first) has it; the others of that day are '(other)'; a day without any such row
    (before the rollups by dimension existed) admits its `cap` values with the most visitors."""
    _check(lo, hi)
    lo_h, hi_h = _floor_hour(lo), _ceil_hour(hi)
    zones = {d: zone(tz).key for d, tz in conn.execute("SELECT domain, tz FROM sites").fetchall()}
    days = DayStarts()
    spans = {tz: days.span(tz, lo_h, hi_h) for tz in {*zones.values(), "UTC"}}  # rederive's and rebuild_dims' days
    wide_lo = min(lo_h, *(s[0] for s in spans.values()))
    wide_hi = max(hi_h, *(s[-1] for s in spans.values()))
    got = _Rebuilt()
    for d, quarter, visitor, *values in source.visitors(wide_lo, wide_hi, domain):
        tz = zones.get(d, "UTC")
        span = spans[tz]
        if lo_h <= quarter < hi_h:
            got.hourly.setdefault((d, _floor_hour(quarter)), set()).add(visitor)
        if span[0] <= quarter < span[-1]:
            day = days.start(tz, quarter)
            got.daily.setdefault((d, tz, day), set()).add(visitor)
            for dimension, key in zip(DIMENSIONS, values, strict=True):
                got.dims.setdefault((d, tz, day, dimension, key), set()).add(visitor)
    _delete_range(conn, lo_h, hi_h, spans, zones, domain, {d for d, *_ in got.daily})
    dims = _capped(conn, got.dims, cap)
    groups: list[VisitorGroup] = [("1h", d, "", t, "", "", sorted(v)) for (d, t), v in got.hourly.items()]
    groups += [("1d", d, tz, t, "", "", sorted(v)) for (d, tz, t), v in got.daily.items()]
    groups += [("1d", d, tz, t, dim, k, sorted(v)) for (d, tz, dim, t, k), v in dims.items()]
    with conn.cursor() as cur:
        add_visitors(cur, groups)
    return len(groups)


def _delete_range(conn: psycopg.Connection[Any], lo_h: datetime, hi_h: datetime, spans: dict[str, list[datetime]],
                  zones: dict[str, str], domain: str | None, seen: set[str]) -> None:
    """Delete the sketches `rebuild_visitors` replaces: the hours of [lo_h, hi_h), and per registered zone the
    days of its span, of the domains that have events there or sketches near it."""
    only = {"domain": domain}
    conn.execute("DELETE FROM visitors_1h WHERE bucket_start >= %(lo)s AND bucket_start < %(hi)s"
                 " AND (%(domain)s::text IS NULL OR domain = %(domain)s)", {"lo": lo_h, "hi": hi_h, **only})
    lo_d, hi_d = min(s[0] for s in spans.values()), max(s[-1] for s in spans.values())
    near = conn.execute("SELECT DISTINCT domain FROM visitors_1d WHERE bucket_start >= %(lo)s AND bucket_start < %(hi)s"
                        " AND (%(domain)s::text IS NULL OR domain = %(domain)s)", {"lo": lo_d, "hi": hi_d, **only})
    by_zone: dict[str, list[str]] = {}
    for d in sorted(seen | {r[0] for r in near.fetchall()}):
        by_zone.setdefault(zones.get(d, "UTC"), []).append(d)
    for tz, domains in by_zone.items():
        params = {"domains": domains, "tz": tz, "lo": spans[tz][0], "hi": spans[tz][-1]}
        for table in ("visitors_1d", "visitors_dim_1d"):
            conn.execute(f"DELETE FROM {table} WHERE domain = ANY(%(domains)s) AND tz = %(tz)s"
                         " AND bucket_start >= %(lo)s AND bucket_start < %(hi)s", params)


def _capped(conn: psycopg.Connection[Any], dims: dict[tuple[str, str, datetime, str, str], set[str]],
            cap: int) -> dict[tuple[str, str, str, datetime, str], set[str]]:
    """Per (domain, tz, dimension, day, key) the visitors, the keys capped as the daily rollup by dimension has
    them (see `rebuild_visitors`); '' is never folded."""
    days = sorted({(d, tz, t) for d, tz, t, _, _ in dims})
    known: dict[tuple[str, str, datetime, str], set[str]] = {}
    if days:
        rows = conn.execute(
            "SELECT r.domain, r.tz, r.bucket_start, r.dimension, r.key FROM rollup_dim_1d r"
            " JOIN unnest(%s::text[], %s::text[], %s::timestamptz[]) AS u(domain, tz, bucket_start)"
            " USING (domain, tz, bucket_start) GROUP BY 1, 2, 3, 4, 5", [list(c) for c in zip(*days, strict=True)])
        for d, tz, t, dimension, key in rows.fetchall():
            known.setdefault((d, tz, t, dimension), set()).add(key)
    ranked = sorted(dims.items(), key=lambda kv: (-len(kv[1]), kv[0][4]))
    out: dict[tuple[str, str, str, datetime, str], set[str]] = {}
    admitted: dict[tuple[str, str, datetime, str], int] = {}
    for (d, tz, t, dimension, key), visitors in ranked:
        day = (d, tz, t, dimension)
        keys = known.get(day)
        if key != "" and (key not in keys if keys is not None else admitted.get(day, 0) >= cap):
            key = OTHER
        elif key != "" and keys is None:
            admitted[day] = admitted.get(day, 0) + 1
        out.setdefault((d, tz, dimension, t, key), set()).update(visitors)
    return out
