"""Customer queries over the rollups: gap-filled buckets in the customer's time zone.

The bucket rule (docs/adr/0012-bucket-rule.md): an instant belongs to the bucket labelled by its
local wall-clock time in the requested zone, floored to the granularity (quarter hour, hour,
date). A new bucket starts wherever that label changes and wherever the wall clock reads a
grid time (hh:00, hh:15, ..., or midnight) - so a repeated hour at a DST change yields two
buckets, a skipped hour none, and a partly skipped hour (Lord Howe's 30-minute change) a short
bucket that starts at the first local time that exists. Buckets whose length differs from the
nominal one (DST days, Lord Howe hours) say so in `Bucket.length_s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

from psycopg_pool import ConnectionPool

from core.event import EVENT_TYPES

GRANULARITIES = ("15m", "1h", "1d")
NOMINAL_S = {"15m": 900, "1h": 3600, "1d": 86400}
MAX_BUCKETS = 5000
QUARTER_S = 900  # the finest rollup tier: rollup_15m rows are UTC quarter hours

# Supported range. Before 1970 many zones ran on local mean time (offsets like +00:53:28) that no
# UTC quarter-hour tier can split; the API accepts the same years.
SUPPORTED_FROM = datetime(1970, 1, 1, tzinfo=timezone.utc)
SUPPORTED_UNTIL = datetime(9001, 1, 1, tzinfo=timezone.utc)

# Offset changes are found by sampling the zone every _SCAN_S seconds and bisecting to the second.
# Two changes closer than this that return to the same offset would be missed: the closest pair in
# the tz database since 1970 is ~7 days apart (tests/test_buckets.py checks the installed database).
_SCAN_S = 6 * 3600
# Buckets are computed from this far before `from` and after `to`, so the bucket holding `from`
# and the first boundary at or after `to` are always inside the window (a bucket is < 2 days).
_MARGIN_S = 3 * 86400


class QueryError(ValueError):
    """The request cannot be answered as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime  # first instant (aware); render with .astimezone(tz) to get its own UTC offset
    count: int
    end: datetime | None = None  # first instant of the next bucket
    length_s: int | None = None  # set only when the bucket's length differs from the nominal one
    valued: int = 0  # events in the bucket that carried a value
    value_sum: Decimal = Decimal("0.000000")  # the sum of those values (exact, 6 decimal places)


def _offset(tz: ZoneInfo, t: int) -> int:
    return int(datetime.fromtimestamp(t, tz).utcoffset().total_seconds())  # type: ignore[union-attr]


def _changes(tz: ZoneInfo, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Every (instant, offset before, offset after) at which the zone's UTC offset changes in (lo, hi]."""
    out = []
    t, o = lo, _offset(tz, lo)
    while t < hi:
        n = min(t + _SCAN_S, hi)
        on = _offset(tz, n)
        if on == o:
            t = n
            continue
        a, b = t, n  # offset(a) == o != offset(b): bisect to the first second with the new offset
        while b - a > 1:
            m = (a + b) // 2
            if _offset(tz, m) == o:
                a = m
            else:
                b = m
        after = _offset(tz, b)
        out.append((b, o, after))
        t, o = b, after
    return out


def _boundaries(tz: ZoneInfo, lo: int, hi: int, step: int) -> list[int]:
    """Bucket boundaries (UTC epoch seconds) in [lo, hi) for buckets of `step` wall-clock seconds.

    The wall clock is t + offset(t); its label is floor(wall / step) (for days: the local date).
    """
    changes = _changes(tz, lo, hi)
    found: set[int] = set()
    seg_start, offset = lo, _offset(tz, lo)
    for seg_end, before, after in [*changes, (hi, None, None)]:
        # Grid instants of this constant-offset stretch: wall clock exactly on a multiple of step.
        wall = -((seg_start + offset) // -step) * step  # ceil
        while wall - offset < seg_end:
            found.add(wall - offset)
            wall += step
        if before is None:
            break
        # The label changes at the clock change itself (e.g. 02:00 -> 02:30: hour 1 -> hour 2).
        if (seg_end - 1 + before) // step != (seg_end + after) // step:
            found.add(seg_end)
        seg_start, offset = seg_end, after
    return sorted(found)


def bucket_bounds(start: datetime, end: datetime, granularity: str, tz: ZoneInfo) -> list[datetime]:
    """Bucket boundaries (UTC) covering [start, end): the first is the start of the bucket holding
    `start`, the last is the first boundary at or after `end`; bucket i is [bounds[i], bounds[i+1]).

    Refuses (QueryError) ranges before 1970, ranges of more than MAX_BUCKETS buckets, and any range
    with a boundary off the UTC quarter hours of the 15-minute tier (an answer would be inexact).
    """
    if granularity not in GRANULARITIES:
        raise QueryError(f"granularity must be one of {', '.join(GRANULARITIES)}")
    if end <= start:
        raise QueryError("'to' must be after 'from'")
    if start < SUPPORTED_FROM or end > SUPPORTED_UNTIL:
        raise QueryError("'from' and 'to' must lie between 1970-01-01T00:00:00Z and 9001-01-01T00:00:00Z")
    step = NOMINAL_S[granularity]
    too_many = f"the range spans more than {MAX_BUCKETS} buckets; pick a coarser granularity"
    if (end - start).total_seconds() > 2 * step * (MAX_BUCKETS + 1):  # every bucket is shorter than 2 steps
        raise QueryError(too_many)
    t0 = int(start.timestamp() // 1)
    t1 = -int(-end.timestamp() // 1)  # ceil: a boundary at or after `end`
    found = _boundaries(tz, t0 - _MARGIN_S, t1 + _MARGIN_S, step)
    first = max((b for b in found if b <= start.timestamp()), default=None)
    last = min((b for b in found if b >= end.timestamp()), default=None)
    if first is None or last is None:  # cannot happen with the tz database; refuse rather than guess
        raise QueryError(f"no bucket boundary near the range in {tz.key}")
    bounds = [b for b in found if first <= b <= last]
    if len(bounds) > MAX_BUCKETS + 1:
        raise QueryError(too_many)
    for b in bounds:
        if b % QUARTER_S:
            local = datetime.fromtimestamp(b, tz)
            raise QueryError(
                f"in {tz.key} a {granularity} bucket starts at {local.isoformat()}, which is not on a UTC quarter "
                "hour (the zone's clock changed at an odd minute or used an odd offset then); the 15-minute "
                "rollups cannot answer this range exactly: pick another granularity, range or time zone")
    return [datetime.fromtimestamp(b, timezone.utc) for b in bounds]


# Only the domain's 15-minute rows inside [first bound, last bound) are read (an index range scan
# on the primary key); width_bucket assigns each row to its bucket by binary search over the bucket
# starts. Empty buckets are filled in Python.
_SERIES = """
SELECT width_bucket(r.bucket_start, %(starts)s::timestamptz[]) AS i, sum(r.events)::bigint,
       sum(r.valued)::bigint, coalesce(sum(r.value_sum), 0)::numeric(24, 6)
FROM rollup_15m r
WHERE r.domain = %(domain)s AND r.event_type = %(type)s
  AND r.bucket_start >= %(lo)s AND r.bucket_start < %(hi)s
GROUP BY 1
"""


class RollupReader:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def series(self, domain: str, event_type: str, start: datetime, end: datetime, granularity: str,
               tz: ZoneInfo) -> list[Bucket]:
        """Every bucket in the range, zero-filled, from the 15-minute tier."""
        bounds = bucket_bounds(start, end, granularity, tz)
        starts = bounds[:-1]
        params = {"starts": starts, "domain": domain, "type": event_type, "lo": bounds[0], "hi": bounds[-1]}
        with self.pool.connection() as conn:
            rows = {row[0]: row[1:] for row in conn.execute(_SERIES, params).fetchall()}
        nominal = NOMINAL_S[granularity]
        buckets = []
        empty = (0, 0, Decimal("0.000000"))
        for i, (s, e) in enumerate(zip(starts, bounds[1:]), start=1):
            length = int((e - s).total_seconds())
            count, valued, value_sum = rows.get(i, empty)
            buckets.append(Bucket(start=s, count=count, end=e, length_s=None if length == nominal else length,
                                  valued=valued, value_sum=value_sum))
        return buckets

    def totals(self, domain: str, start: datetime, end: datetime) -> dict[str, Totals]:
        """Per event type, the events, valued events and value sum of rollup rows in [start, end)
        (both on UTC quarter hours); every type of core.event.EVENT_TYPES is present, zero if none."""
        with self.pool.connection() as conn:
            rows = conn.execute(_TOTALS, {"domain": domain, "lo": start, "hi": end}).fetchall()
        out = {t: Totals() for t in EVENT_TYPES}
        for event_type, events, valued, value_sum in rows:
            out[event_type] = Totals(events, valued, value_sum)
        return out

    def summary(self, domain: str, last_s: int, now: datetime) -> Summary:
        """Totals of the last `last_s` seconds (the current, partial quarter hour included) and of the
        period of the same length just before; see `summary_window`."""
        window = summary_window(now, last_s)
        return Summary(window, self.totals(domain, window.start, window.end),
                       self.totals(domain, window.previous_start, window.start))

    def sites(self, domains: list[str] | None = None) -> list[SiteRow]:
        """Registered sites (all, or those among `domains`), each with whether it has any rollup row."""
        where = "" if domains is None else " WHERE s.domain = ANY(%(domains)s)"
        with self.pool.connection() as conn:
            rows = conn.execute(_SITES.format(where=where), {"domains": domains or []}).fetchall()
        return [SiteRow(*row) for row in rows]

    def has_events(self, domain: str) -> bool:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT EXISTS (SELECT 1 FROM rollup_15m WHERE domain = %s)", (domain,)).fetchone()
        return bool(row and row[0])


_TOTALS = """
SELECT event_type, sum(events)::bigint, sum(valued)::bigint, coalesce(sum(value_sum), 0)::numeric(24, 6)
FROM rollup_15m
WHERE domain = %(domain)s AND bucket_start >= %(lo)s AND bucket_start < %(hi)s
GROUP BY event_type
"""

_SITES = """
SELECT s.domain, s.tz, s.site_key, EXISTS (SELECT 1 FROM rollup_15m r WHERE r.domain = s.domain)
FROM sites s{where}
ORDER BY s.domain
"""


@dataclass(frozen=True, slots=True)
class Totals:
    events: int = 0
    valued: int = 0
    value_sum: Decimal = Decimal("0.000000")

    @property
    def value_avg(self) -> Decimal | None:
        """The mean value of the valued events (6 decimal places), None when none carried a value."""
        if not self.valued:
            return None
        return (self.value_sum / self.valued).quantize(Decimal("0.000001"))


@dataclass(frozen=True, slots=True)
class SummaryWindow:
    start: datetime  # first instant of the period: a UTC quarter hour
    end: datetime  # end of the current (partial) quarter hour: `as_of` lies in [end - 15 min, end)
    as_of: datetime  # the instant the summary was taken
    previous_start: datetime  # the previous period is [previous_start, start), of the same length

    @property
    def partial_start(self) -> datetime:
        return self.end - timedelta(seconds=QUARTER_S)


@dataclass(frozen=True, slots=True)
class Summary:
    window: SummaryWindow
    current: dict[str, Totals]
    previous: dict[str, Totals]


@dataclass(frozen=True, slots=True)
class SiteRow:
    domain: str
    tz: str
    site_key: str
    has_events: bool


def summary_window(now: datetime, last_s: int) -> SummaryWindow:
    """The last `last_s` seconds as whole UTC quarter hours of the 15-minute tier, ending with the
    quarter hour that holds `now` (still partial: it counts what has arrived so far).

    `last_s` must be a positive multiple of 900. The previous period is the `last_s` seconds just
    before, all complete; so `change` compares a period whose last quarter is still filling with a
    complete one (the answer says how far the partial quarter has got).
    """
    if last_s <= 0 or last_s % QUARTER_S:
        raise QueryError("the summary period must be a positive number of quarter hours")
    t = int(now.timestamp())
    end = t - t % QUARTER_S + QUARTER_S
    start = end - last_s
    as_dt = lambda s: datetime.fromtimestamp(s, timezone.utc)  # noqa: E731
    return SummaryWindow(as_dt(start), as_dt(end), now.astimezone(timezone.utc), as_dt(start - last_s))
