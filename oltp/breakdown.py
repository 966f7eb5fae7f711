"""Breakdowns: a metric per value of one dimension over a range, from the dimension rollups (ADR 48).

Counts come from `rollup_dim_*` (no filter, or one filter on the broken-down dimension) or, for a
filter on another dimension or two or more filters, from `rollup_cube_*`; the range is read from
several tiers at once (oltp/spans.py). Visitors come from the per-key HLL sketches of `visitors_dim_1d`
(oltp/visitors.py), which are kept per local day: a visitors breakdown covers the site's local days
covering the range, and says so in its `lo`/`hi`; it merges the sketches of the values with the highest upper
bound of their visitors first and stops as soon as no other value can rank higher (ADR 62).

`counts` and `visitors` check which pre-merged weeks hold, then read them, in separate statements: call them inside
one snapshot (a read-only repeatable-read transaction, as `oltp.insights.Insights.breakdown` does), or an answer can
count a day twice or miss one (oltp/weekly.py's module doc).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from oltp import visitors as vis
from oltp import weekly
from oltp.filters import DIMENSIONS, Filter, cube_where
from oltp.queries import DailyZone, QueryError, boundaries
from oltp.spans import DAY_S, Span, spans, tier_label

METRICS = ("visitors", "pageviews", "impressions", "value")
# A visitors breakdown merges the sketches of at most this many values (or twice the rows asked), those with the
# highest upper bound of their visitors (ADR 62): past it the ranking could only change for values whose bound
# exceeds their visitors (noted).
MAX_VISITOR_KEYS = 128
_UNBOUNDED = 2 ** 62  # the bound of a key with neither n nor events (tried first)
TYPES = {"pageviews": ["pageview"], "impressions": ["impression"], "value": ["impression", "pageview"],
         "visitors": ["impression", "pageview"]}


@dataclass(frozen=True, slots=True)
class BreakdownRow:
    key: str  # as stored ('' = none)
    count: int | Decimal  # events, or the value sum for metric=value, or visitors
    value_sum: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Breakdown:
    tier: str
    lo: datetime  # the range actually counted (widened for combined filters and visitors)
    hi: datetime
    total: int | Decimal
    rows: list[BreakdownRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BreakdownQuery:
    domain: str
    dimension: str
    metric: str
    lo: datetime
    hi: datetime
    filters: tuple[Filter, ...] = ()
    limit: int = 10
    offset: int = 0

    def uses_cube(self) -> bool:
        """Whether the combined-filter tables answer: a filter on another dimension, or two or more."""
        return len(self.filters) > 1 or any(f.dimension != self.dimension for f in self.filters)


def _piece_sql(s: Span, i: int, q: BreakdownQuery, cube: bool) -> tuple[str, dict[str, object]]:
    """One span's rows as (key, events, value_sum) for a UNION ALL, negated for a subtracted span (`sign` -1);
    column names from DIMENSIONS only."""
    assert q.dimension in DIMENSIONS
    params: dict[str, object] = {f"lo{i}": s.lo, f"hi{i}": s.hi}
    where = f"r.domain = %(domain)s AND r.bucket_start >= %(lo{i})s AND r.bucket_start < %(hi{i})s" \
            " AND r.event_type = ANY(%(types)s)"
    if s.tier in ("1d", "1w"):
        where += " AND r.tz = %(tz)s"
    sums = "r.events, r.value_sum" if s.sign > 0 else "-r.events AS events, -r.value_sum AS value_sum"
    if cube:
        extra, fparams = cube_where(q.filters)
        params.update(fparams)
        return (f"SELECT r.{q.dimension} AS key, {sums} FROM rollup_cube_{s.tier} r "
                f"WHERE {where}{extra}"), params
    extra = " AND r.key = %(fkey)s" if q.filters else ""
    return (f"SELECT r.key, {sums} FROM rollup_dim_{s.tier} r "
            f"WHERE {where} AND r.dimension = %(dim)s{extra}"), params


def _counts_sql(pieces: list[Span], q: BreakdownQuery, cube: bool, order: str) -> tuple[str, dict[str, object]]:
    parts, params = [], {}
    for i, s in enumerate(pieces):
        sql, p = _piece_sql(s, i, q, cube)
        parts.append(sql)
        params.update(p)
    inner = " UNION ALL ".join(parts)
    sql = f"""
    SELECT key, events, value_sum, sum(events) OVER ()::bigint, sum(value_sum) OVER ()::numeric(24, 6)
    FROM (SELECT key, sum(events)::bigint AS events, coalesce(sum(value_sum), 0)::numeric(24, 6) AS value_sum
          FROM ({inner}) x GROUP BY key HAVING sum(events) > 0) g
    ORDER BY {order} DESC, key LIMIT %(limit)s OFFSET %(offset)s"""
    return sql, params


def counts(conn: psycopg.Connection, q: BreakdownQuery, daily: DailyZone) -> Breakdown:
    """pageviews / impressions / value per key over [q.lo, q.hi) (see the module doc)."""
    cube = q.uses_cube()
    spanned = spans(q.lo, q.hi, daily, hourly_only=cube)
    pieces = spanned if cube else _with_weeks(conn, q.domain, daily.registered_tz, spanned)
    order = "value_sum" if q.metric == "value" else "events"
    sql, params = _counts_sql(pieces, q, cube, order)
    params.update({"domain": q.domain, "tz": daily.registered_tz, "types": TYPES[q.metric], "dim": q.dimension,
                   "fkey": q.filters[0].key if q.filters else "", "limit": q.limit, "offset": q.offset})
    found = conn.execute(sql, params).fetchall()
    value = q.metric == "value"
    rows = [BreakdownRow(k, vs if value else ev, vs) for k, ev, vs, _, _ in found]
    first = found[0] if found else _first_row(conn, pieces, q, cube, params)
    total: int | Decimal = (Decimal("0.000000") if value else 0) if first is None else first[4 if value else 3]
    notes = []
    lo, hi = spanned[0].lo, spanned[-1].hi
    if cube and (lo != q.lo or hi != q.hi):
        notes.append("combined filters are answered from the hourly and daily tiers: the range counted is the "
                     "UTC hours covering the one asked")
    return Breakdown(_label(pieces), lo, hi, total, rows, notes)


def _with_weeks(conn: psycopg.Connection, domain: str, tz: str, pieces: list[Span]) -> list[Span]:
    """The daily piece's local weeks whose pre-merged rows are current (oltp/weekly.py) as '1w' pieces
    (rollup_dim_1w: one row per key and week instead of seven), its other days still '1d'. A week holding an edge
    of the piece is used when fewer of its days lie outside the piece than inside: the week is read whole and the
    days outside subtracted (`sign` -1); the daily rows are the ones read one heap page each, the weekly ones are
    written together (ADR 61's addendum)."""
    out: list[Span] = []
    for s in pieces:
        found = weekly.valid_weeks(conn, domain, tz, s.lo, s.hi, "counts", overlapping=True) if s.tier == "1d" else []
        weeks = [(a, b) for a, b in found if min(b, s.hi) - max(a, s.lo) > (b - a) / 2]
        if not weeks:
            out.append(s)
            continue
        covered = [(max(a, s.lo), min(b, s.hi)) for a, b in weeks]
        days = [Span("1d", a, b) for a, b in weekly.gaps(s.lo, s.hi, covered)]
        outside = [Span("1d", a, b, -1) for w in weeks for a, b in weekly.gaps(w[0], w[1], [(s.lo, s.hi)])]
        out.extend(sorted(_runs_of_weeks(weeks) + days + outside, key=lambda p: (p.lo, p.sign)))
    return out


def _runs_of_weeks(weeks: list[tuple[datetime, datetime]]) -> list[Span]:
    """Adjacent weeks as one '1w' piece: a piece selects bucket_start in [lo, hi), and the union of adjacent
    half-open ranges is one, so the rows are the same; one piece plans and scans once instead of once a week (13 for
    90 days). A week left out (not current: read from its days) splits the run."""
    runs: list[Span] = []
    for a, b in sorted(weeks):
        if runs and runs[-1].hi == a:
            runs[-1] = Span("1w", runs[-1].lo, b)
        else:
            runs.append(Span("1w", a, b))
    return runs


def _label(pieces: list[Span]) -> str:
    """The answer's `tier`: weeks are the daily tier pre-merged, so they are named '1d' (ADR 48's labels)."""
    return tier_label([Span("1d", s.lo, s.hi) if s.tier == "1w" else s for s in pieces])


def _first_row(conn: psycopg.Connection, pieces: list[Span], q: BreakdownQuery, cube: bool,
               params: dict[str, object]) -> tuple[Any, ...] | None:
    """When the page asked (offset) is past the last key: the first row, for the totals (None: no key at all)."""
    if q.offset == 0:
        return None
    sql, _ = _counts_sql(pieces, q, cube, "events")
    row: tuple[Any, ...] | None = conn.execute(sql, {**params, "limit": 1, "offset": 0}).fetchone()
    return row


def covering_days(tz: str, lo: datetime, hi: datetime) -> tuple[datetime, datetime]:
    """The local days of `tz` covering [lo, hi): (start of the day holding lo, first day start >= hi)."""
    a, b = int(lo.timestamp()), -int(-hi.timestamp() // 1)
    found = boundaries(ZoneInfo(tz), a - 3 * DAY_S, b + 3 * DAY_S, DAY_S)
    first = max((t for t in found if t <= a), default=None)
    last = min((t for t in found if t >= b), default=None)
    if first is None or last is None:
        raise QueryError(f"no day boundary near the range in {tz}")
    return datetime.fromtimestamp(first, UTC), datetime.fromtimestamp(last, UTC)


def visitors(conn: psycopg.Connection, q: BreakdownQuery, daily: DailyZone) -> Breakdown:
    """Visitors per key over the local days covering the range (the sketches are daily per key, and weekly).

    The rows are top-k by the sketches' estimates, searched in the order of an upper bound of each key's visitors
    (`_bounded_keys`): the sketches of the first 2 x (offset + limit) keys are merged, and the search stops once
    the k-th best count exceeds the next key's bound (or equals it and the tie is broken by key in its favour):
    no key untried can rank above it. Else the keys up to MAX_VISITOR_KEYS are merged (then `notes` says the
    ranking could miss a value with a lower bound).
    """
    if q.uses_cube():
        raise QueryError("visitors are kept per dimension value, not per combination: a visitors breakdown "
                         "takes only a filter on the dimension it breaks down")
    lo, hi = covering_days(daily.registered_tz, q.lo, q.hi)
    tz = daily.registered_tz
    total = vis.visitors_total(conn, q.domain, tz, lo, hi, daily)
    weeks = weekly.valid_weeks(conn, q.domain, tz, lo, hi, "visitors")
    if q.filters:
        found = vis.visitors_by_key(conn, q.domain, tz, q.dimension, lo, hi, [q.filters[0].key], weeks)
        rows = [BreakdownRow(k, v) for k, v in found.items() if v > 0][q.offset:q.offset + q.limit]
        return Breakdown("1d", lo, hi, total, rows)
    order = _bounded_keys(conn, q, daily, lo, hi, weeks)
    need = q.offset + q.limit

    def merged(keys: list[str]) -> dict[str, int]:
        return vis.visitors_by_key(conn, q.domain, tz, q.dimension, lo, hi, keys, weeks)

    best, i, settled = _search(merged, order, need)
    ordered = sorted(((k, v) for k, v in best.items() if v > 0), key=lambda kv: (-kv[1], kv[0]))
    rows = [BreakdownRow(k, v) for k, v in ordered[q.offset:need]]
    notes = []
    if not settled:
        notes.append(f"visitors were counted for the {i} values that could have the most (by an upper bound of "
                     "their visitors, or their events where none is kept); a value not counted could have more "
                     "visitors than the last row")
    return Breakdown("1d", lo, hi, total, rows, notes)


def _search(merged: Callable[[list[str]], dict[str, int]], order: list[tuple[str, int]],
            need: int) -> tuple[dict[str, int], int, bool]:
    """The visitors search (see `visitors`): (counts of the keys merged, how many keys were tried, settled).

    Two rounds, 2 x `need` keys then the rest up to the cap, each one fetch that scans the range's index entries of
    every key. Where the first round is unlikely to settle (`_first_round_may_settle`), both are made in one fetch,
    and the first round's verdict is then taken on its own keys, so the answer is the two rounds' either way."""
    cap, small = _cap(need), 2 * need
    best: dict[str, int] = {}
    i, settled = 0, not order
    first = small if _first_round_may_settle(order, need) else cap
    while i < min(len(order), cap):
        keys = [k for k, _ in order[i:(first if i == 0 else cap)]]
        best.update(merged(keys))
        if i == 0 and len(keys) > small:  # both rounds in one fetch: would the first have settled?
            early = {k: best[k] for k, _ in order[:small] if k in best}
            if _settled(early, order, small, need):
                return early, small, True
        i += len(keys)
        settled = _settled(best, order, i, need)
        if settled:
            break
    return best, i, settled


def _cap(need: int) -> int:
    """How many keys the search merges at most, for `need` rows (offset + limit)."""
    return max(MAX_VISITOR_KEYS, 2 * need)


def _first_round_may_settle(order: list[tuple[str, int]], need: int) -> bool:
    """Whether merging the first 2 x `need` keys is likely to settle the search: not when the need-th bound is no
    higher than the next key's (flat bounds, as where the same people come every day). The need-th best count is at
    most its bound, so it then settles only on an exact tie at the bound or an estimate above its bound."""
    return need < 1 or len(order) <= 2 * need or order[need - 1][1] > order[2 * need][1]


def _settled(best: dict[str, int], order: list[tuple[str, int]], i: int, need: int) -> bool:
    """Whether no key from order[i] on can enter the first `need` rows of `best` (sorted by count desc, key)."""
    if i >= len(order):
        return True
    ranked = sorted(((-v, k) for k, v in best.items() if v > 0))
    if len(ranked) < need:
        return False
    count, key = -ranked[need - 1][0], ranked[need - 1][1]
    bound, next_key = order[i][1], order[i][0]
    return count > bound or (count == bound and next_key > key)  # untried keys come in (bound desc, key) order


def _bounded_keys(conn: psycopg.Connection, q: BreakdownQuery, daily: DailyZone, lo: datetime, hi: datetime,
                  weeks: list[weekly.Week]) -> list[tuple[str, int]]:
    """The keys with a sketch over [lo, hi) and an upper bound of their visitors there, highest first (then by key):
    the sum of its sketch rows' `n` (ADR 62); where one is unknown (rows written before migration 0014) its events
    of both types, which a key's visitors never exceed (then both bounds are known for every key: the lower one).
    Only the first cap + 1 (`_cap`): the search merges at most the cap and looks at the next key's bound; where
    every bound is known (the statement lists unknown ones first) the database ranks and sends only those."""
    tz, first = daily.registered_tz, _cap(q.offset + q.limit) + 1
    bounds = vis.visitor_bounds(conn, q.domain, tz, q.dimension, lo, hi, weeks, limit=first)
    if None not in bounds.values():
        return [(key, bound) for key, bound in bounds.items() if bound is not None]  # (all of them)
    bounds = vis.visitor_bounds(conn, q.domain, tz, q.dimension, lo, hi, weeks)
    events = dict(_events_by_key(conn, q, daily, lo, hi))
    out = []
    for key, bound in bounds.items():
        known = [b for b in (bound, events.get(key)) if b is not None]
        out.append((key, min(known) if known else _UNBOUNDED))
    return sorted(out, key=lambda kb: (-kb[1], kb[0]))[:first]


def _events_by_key(conn: psycopg.Connection, q: BreakdownQuery, daily: DailyZone, lo: datetime,
                   hi: datetime) -> list[tuple[str, int]]:
    """Every key's events (both types) over [lo, hi), most first."""
    pieces = _with_weeks(conn, q.domain, daily.registered_tz, spans(lo, hi, daily))
    sql, params = _counts_sql(pieces, BreakdownQuery(q.domain, q.dimension, "visitors", lo, hi), False, "events")
    params.update({"domain": q.domain, "tz": daily.registered_tz, "types": TYPES["visitors"], "dim": q.dimension,
                   "fkey": "", "limit": None, "offset": 0})
    return [(k, int(ev)) for k, ev, *_ in conn.execute(sql, params).fetchall()]
