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
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from psycopg_pool import ConnectionPool

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
SELECT width_bucket(r.bucket_start, %(starts)s::timestamptz[]) AS i, sum(r.events)::bigint
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
            counts = dict(conn.execute(_SERIES, params).fetchall())
        nominal = NOMINAL_S[granularity]
        buckets = []
        for i, (s, e) in enumerate(zip(starts, bounds[1:]), start=1):
            length = int((e - s).total_seconds())
            buckets.append(Bucket(start=s, count=counts.get(i, 0), end=e,
                                  length_s=None if length == nominal else length))
        return buckets
