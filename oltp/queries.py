"""Customer queries over the rollups: gap-filled buckets in the customer's time zone.

The bucket rule (docs/adr/0012-bucket-rule.md): an instant belongs to the bucket labelled by its
local wall-clock time in the requested zone, floored to the granularity (quarter hour, hour,
date). A new bucket starts wherever that label changes and wherever the wall clock reads a
grid time (hh:00, hh:15, ..., or midnight) - so a repeated hour at a DST change yields two
buckets, a skipped hour none, and a partly skipped hour (Lord Howe's 30-minute change) a short
bucket that starts at the first local time that exists. Buckets whose length differs from the
nominal one (DST days, Lord Howe hours) say so in `Bucket.length_s`.

Tiers (docs/adr/0019-tiers-and-routing.md): a series is read from the coarsest rollup tier whose
rows align exactly with its buckets - `rollup_1d` for daily buckets in the site's registered zone
(from the first day that tier is complete), `rollup_1h` when every boundary is a UTC whole hour,
else `rollup_15m` - and that still keeps the range (per-tier retention); `choose_tier` decides and
`OutsideRetention` refuses, naming the retention and the granularities that can answer (only for a
domain whose history reaches back past the cutoff: for one without, retention dropped nothing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import psycopg
from psycopg_pool import ConnectionPool

from core.config import Settings
from core.event import EVENT_TYPES
from oltp.filters import Filter, FilterError, filtered_table
from oltp.rows import one

GRANULARITIES = ("15m", "1h", "1d")
NOMINAL_S = {"15m": 900, "1h": 3600, "1d": 86400}
MAX_BUCKETS = 5000
QUARTER_S = 900  # the finest rollup tier: rollup_15m rows are UTC quarter hours

# Supported range. Before 1970 many zones ran on local mean time (offsets like +00:53:28) that no
# UTC quarter-hour tier can split; the API accepts the same years.
SUPPORTED_FROM = datetime(1970, 1, 1, tzinfo=UTC)
SUPPORTED_UNTIL = datetime(9001, 1, 1, tzinfo=UTC)

# Offset changes are found by sampling the zone every _SCAN_S seconds and bisecting to the second.
# Two changes closer than this that return to the same offset would be missed: the closest pair in
# the tz database since 1970 is ~7 days apart (tests/test_buckets.py checks the installed database).
_SCAN_S = 6 * 3600
# Buckets are computed from this far before `from` and after `to`, so the bucket holding `from`
# and the first boundary at or after `to` are always inside the window (a bucket is < 2 days).
_MARGIN_S = 3 * 86400
# A range of at most MAX_BUCKETS buckets lasts at most MAX_BUCKETS nominal steps plus what the clock moved back
# inside it: over every zone of the tz database, 1970-2100, no quarter-hour bucket is longer than 15 minutes,
# no MAX_BUCKETS hours exceed nominal by more than 30 minutes (Lord Howe, Caracas 2007), and no MAX_BUCKETS
# days by more than 7 h (Antarctica/Vostok went back 7 h in 1994; a DST zone: 1 h). Two days of slack cover
# these with room for any future change; a longer range is refused before any bucket is computed (the old
# check, 2 x MAX_BUCKETS steps, let 27-year daily ranges scan every zone year before refusing them).
_RANGE_SLACK_S = 2 * 86400


class QueryError(ValueError):
    """The request cannot be answered as asked; the message says why."""


TIERS = ("15m", "1h", "1d")  # finest first
TIER_NAMES = {"15m": "15-minute", "1h": "hourly", "1d": "daily"}


class OutsideRetention(QueryError):
    """Every tier that could answer the range exactly has already dropped its start.

    `tier` is the coarsest tier that aligns with the buckets, `retention_days` how long it keeps
    rows, `retained_from` the oldest instant it still holds, and `alternatives` the granularities
    (in the same zone) that could answer the range.
    """

    def __init__(self, tier: str, retention_days: int, retained_from: datetime, alternatives: list[str]) -> None:
        self.tier, self.retention_days, self.retained_from = tier, retention_days, retained_from
        self.alternatives = alternatives
        ask = (f"ask granularity={' or '.join(alternatives)}" if alternatives
               else "ask a range that starts later")
        super().__init__(f"{TIER_NAMES[tier]} data is kept {retention_days} days (from "
                         f"{retained_from.replace(microsecond=0).isoformat()}); {ask}")


@dataclass(frozen=True, slots=True)
class Retention:
    """Days each tier keeps its rows (0 = forever): TALLY_RETENTION_15M/1H/1D_DAYS."""

    days_15m: int = 90
    days_1h: int = 730
    days_1d: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Retention:
        """The tiers' retention as configured (core/config.py holds the defaults)."""
        return cls(settings.retention_15m_days, settings.retention_1h_days, settings.retention_1d_days)

    def days(self, tier: str) -> int:
        return {"15m": self.days_15m, "1h": self.days_1h, "1d": self.days_1d}[tier]

    def keeps(self, tier: str, start: datetime, now: datetime) -> bool:
        """Whether `tier` still holds rows from `start` on."""
        days = self.days(tier)
        return days == 0 or start >= now - timedelta(days=days)


@dataclass(frozen=True, slots=True)
class DailyZone:
    """Which zone rollup_1d holds a domain's days in, and from when it is complete."""

    registered_tz: str  # the sites registry's tz (UTC for an unregistered domain)
    written_tz: str | None = None  # rollup_1d_coverage.tz: the zone the sink writes (None: no daily rows)
    complete_from: datetime | None = None


def aligned_tiers(bounds: list[datetime], granularity: str, tz_key: str, daily: DailyZone | None) -> list[str]:
    """The tiers whose rows fall exactly into these buckets, coarsest first (15m always: the bounds
    are UTC quarter hours, which `bucket_bounds` checks)."""
    out = []
    if (granularity == "1d" and daily is not None and daily.written_tz == tz_key == daily.registered_tz
            and daily.complete_from is not None and bounds[0] >= daily.complete_from):
        out.append("1d")
    if all(int(b.timestamp()) % 3600 == 0 for b in bounds):
        out.append("1h")
    out.append("15m")
    return out


def choose_tier(bounds: list[datetime], granularity: str, tz_key: str, daily: DailyZone | None,
                retention: Retention, now: datetime) -> str:
    """The coarsest aligned tier that still keeps the first bucket. A finer tier never outlives a
    coarser one (core.config checks), so when the coarsest aligned tier has dropped the range every
    finer one has too: raises OutsideRetention (its alternatives are filled in by the caller)."""
    tiers = aligned_tiers(bounds, granularity, tz_key, daily)
    for tier in tiers:
        if retention.keeps(tier, bounds[0], now):
            return tier
    coarsest = tiers[0]
    days = retention.days(coarsest)
    raise OutsideRetention(coarsest, days, now - timedelta(days=days), [])


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


def _scan_changes(tz: ZoneInfo, lo: int, hi: int) -> list[tuple[int, int, int]]:
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


def _year_start(year: int) -> int:
    return int(datetime(year, 1, 1, tzinfo=UTC).timestamp())


@functools.lru_cache(maxsize=4096)
def _year_changes(tz: ZoneInfo, year: int) -> tuple[tuple[int, int, int], ...]:
    """The zone's changes in (1 January of `year`, 1 January of the next] (UTC), scanned once per process: a
    request's window is a slice of a few of these (the scan costs ~1 ms a quarter, every request paid it).
    Years up to 9998 (datetime's last year is 9999; windows end before 9001-01-04)."""
    return tuple(_scan_changes(tz, _year_start(year), _year_start(year + 1)))


def _year_of(t: int) -> int:
    return datetime.fromtimestamp(t, UTC).year


def _changes(tz: ZoneInfo, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Every (instant, offset before, offset after) at which the zone's UTC offset changes in (lo, hi]: the
    cached changes of the UTC years whose (start, end] blocks cover (lo, hi]."""
    if hi <= lo:
        return []
    return [c for year in range(_year_of(lo), _year_of(hi - 1) + 1) for c in _year_changes(tz, year)
            if lo < c[0] <= hi]


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
        if before is None or after is None:  # the tail (hi, None, None)
            break
        # The label changes at the clock change itself (e.g. 02:00 -> 02:30: hour 1 -> hour 2).
        if (seg_end - 1 + before) // step != (seg_end + after) // step:
            found.add(seg_end)
        seg_start, offset = seg_end, after
    return sorted(found)


def boundaries(tz: ZoneInfo, lo: int, hi: int, step: int) -> list[int]:
    """Bucket boundaries (UTC epoch seconds) in [lo, hi) for `step` wall-clock seconds (900, 3600 or
    86400): the ADR 12 rule, shared with the sink's daily tier (oltp/tiers.py)."""
    return _boundaries(tz, lo, hi, step)


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
    if (end - start).total_seconds() > step * MAX_BUCKETS + _RANGE_SLACK_S:  # before any zone is scanned
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
    return [datetime.fromtimestamp(b, UTC) for b in bounds]


# Only the domain's rows of one tier inside [first bound, last bound) are read (an index range scan
# on the primary key); width_bucket assigns each row to its bucket by binary search over the bucket
# starts. Empty buckets are filled in Python. Every tier's rows lie wholly inside one bucket (that is
# what choosing an aligned tier means), so each tier gives the same sums.
_SERIES = """
SELECT width_bucket(r.bucket_start, %(starts)s::timestamptz[]) AS i, sum(r.events)::bigint,
       sum(r.valued)::bigint, coalesce(sum(r.value_sum), 0)::numeric(24, 6)
FROM rollup_15m r
WHERE r.domain = %(domain)s AND r.event_type = %(type)s
  AND r.bucket_start >= %(lo)s AND r.bucket_start < %(hi)s
GROUP BY 1
"""
_SERIES_BY_TIER = {
    "15m": _SERIES,
    "1h": _SERIES.replace("FROM rollup_15m r", "FROM rollup_1h r"),
    "1d": _SERIES.replace("FROM rollup_15m r", "FROM rollup_1d r").replace(
        "WHERE r.domain = %(domain)s AND", "WHERE r.domain = %(domain)s AND r.tz = %(tz)s AND"),
}



def _series_sql(tier: str, filters: tuple[Filter, ...]) -> tuple[str, dict[str, str]]:
    """The series query of a tier under `filters` (oltp/filters.py; ADR 48); `_SERIES_BY_TIER` without."""
    if not filters:
        return _SERIES_BY_TIER[tier], {}
    try:
        table, extra, params = filtered_table(tier, filters)
    except FilterError as exc:
        raise QueryError(str(exc)) from None
    sql = _SERIES_BY_TIER[tier].replace(f"FROM rollup_{tier} r", f"FROM {table} r").replace(
        "GROUP BY 1", f"{extra.strip()}\nGROUP BY 1")
    return sql, params


# Value bins per series bucket (oltp/percentiles.py): never under a filter (bins are per domain and type).
_BUCKET_BINS = """
SELECT width_bucket(r.bucket_start, %(starts)s::timestamptz[]) AS i, r.bin, sum(r.count)::bigint
FROM value_bins_{tier} r
WHERE r.domain = %(domain)s{tz} AND r.event_type = %(type)s AND r.bucket_start >= %(lo)s AND r.bucket_start < %(hi)s
GROUP BY 1, 2
"""


def _bucket_bins(conn: psycopg.Connection, tier: str, params: dict[str, object]) -> dict[int, dict[int, int]]:
    """Per series bucket index (1-based, as width_bucket numbers them), the value bins of its rows."""
    if tier not in TIERS:
        raise ValueError(tier)
    sql = _BUCKET_BINS.format(tier=tier, tz=" AND r.tz = %(tz)s" if tier == "1d" else "")
    out: dict[int, dict[int, int]] = {}
    for i, k, c in conn.execute(sql, params).fetchall():
        out.setdefault(i, {})[k] = c
    return out


# A domain without a coverage row has never had an event counted since the tiers exist (revision 0004
# gave every domain with rows one): its daily tier is complete, all zeros, in its registered zone.
_DAILY_ZONE = """
SELECT r.tz, coalesce(c.tz, r.tz), coalesce(c.complete_from, TIMESTAMPTZ '1970-01-01 00:00:00+00')
FROM (SELECT coalesce((SELECT tz FROM sites WHERE domain = %(domain)s), 'UTC') AS tz) r
LEFT JOIN rollup_1d_coverage c ON c.domain = %(domain)s
"""


def daily_zone(conn: psycopg.Connection, domain: str) -> DailyZone:
    """The site's registered zone, the zone the daily tiers (rollup_1d, visitors_1d) are written in, and from when
    they are complete (rollup_1d's coverage, ADR 19)."""
    registered, written, complete_from = one(conn.execute(_DAILY_ZONE, {"domain": domain}))
    return DailyZone(registered, written, complete_from)


_COUNTED_BEFORE = """
SELECT EXISTS (SELECT 1 FROM rollup_1d WHERE domain = %(domain)s AND bucket_start < %(cutoff)s)
    OR EXISTS (SELECT 1 FROM rollup_1h WHERE domain = %(domain)s AND bucket_start < %(cutoff)s)
    OR EXISTS (SELECT 1 FROM rollup_15m WHERE domain = %(domain)s AND bucket_start < %(cutoff)s)
"""


@dataclass(frozen=True, slots=True)
class Series:
    tier: str  # the rollup tier that served it: 15m, 1h or 1d
    buckets: list[Bucket] = field(default_factory=list)
    bins: list[dict[int, int]] | None = None  # with `with_bins`: each bucket's value bins (oltp/percentiles.py)


class RollupReader:
    def __init__(self, pool: ConnectionPool, retention: Retention | None = None) -> None:
        self.pool = pool
        self.retention = retention or Retention()

    def series(self, domain: str, event_type: str, start: datetime, end: datetime, granularity: str,
               tz: ZoneInfo) -> list[Bucket]:
        """Every bucket in the range, zero-filled (see `serve`)."""
        return self.serve(domain, event_type, start, end, granularity, tz).buckets

    def serve(self, domain: str, event_type: str, start: datetime, end: datetime, granularity: str,
              tz: ZoneInfo, *, tier: str | None = None, now: datetime | None = None,
              filters: tuple[Filter, ...] = (), with_bins: bool = False) -> Series:
        """Every bucket in the range, zero-filled, read from the coarsest tier that aligns with the
        buckets and keeps the range (`choose_tier`). `tier` forces one (tests and the bench): it
        must align, retention aside. Raises QueryError for a bad range, OutsideRetention when no
        aligned tier keeps the range and the domain has rows from before that tier's cutoff (without
        any, nothing was dropped and the range is answered), psycopg errors when PostgreSQL fails.
        `filters` read the dimension tables (oltp/ranges.py; two or more: 1h and 1d tiers only);
        `with_bins` adds each bucket's value bins (`Series.bins`)."""
        bounds = bucket_bounds(start, end, granularity, tz)
        now = now or datetime.now(UTC)
        with self.pool.connection() as conn:
            daily = daily_zone(conn, domain) if granularity == "1d" else None
            if tier is None:
                tier = self._route(conn, domain, bounds, granularity, tz, daily, now, start, end)
            elif tier not in aligned_tiers(bounds, granularity, tz.key, daily):
                raise QueryError(f"the {tier} tier does not align with {granularity} buckets in {tz.key} here")
            starts = bounds[:-1]
            sql, fparams = _series_sql(tier, filters)
            params = {"starts": starts, "domain": domain, "type": event_type, "lo": bounds[0], "hi": bounds[-1],
                      "tz": tz.key, **fparams}
            rows = {row[0]: row[1:] for row in conn.execute(sql, params).fetchall()}
            found_bins = _bucket_bins(conn, tier, params) if with_bins else None
        bins = None if found_bins is None else [found_bins.get(i, {}) for i in range(1, len(starts) + 1)]
        return Series(tier, self._buckets(bounds, granularity, rows), bins)

    def _route(self, conn: psycopg.Connection, domain: str, bounds: list[datetime], granularity: str, tz: ZoneInfo,
               daily: DailyZone | None, now: datetime, start: datetime, end: datetime) -> str:
        """`choose_tier`, with the retention refusal only for a domain counted before the cutoff (ADR 19)."""
        try:
            return choose_tier(bounds, granularity, tz.key, daily, self.retention, now)
        except OutsideRetention as exc:
            if not self._counted_before(conn, domain, exc.retained_from):
                # Nothing of this domain was counted before the cutoff: retention dropped nothing
                # of it, and the aligned tier's answer is complete (ADR 19).
                return exc.tier
            alternatives = self._alternatives(conn, domain, start, end, granularity, tz, now)
            raise OutsideRetention(exc.tier, exc.retention_days, exc.retained_from, alternatives) from None

    @staticmethod
    def _buckets(bounds: list[datetime], granularity: str, rows: dict[int, tuple[int, int, Decimal]]) -> list[Bucket]:
        starts = bounds[:-1]
        nominal = NOMINAL_S[granularity]
        buckets = []
        empty = (0, 0, Decimal("0.000000"))
        for i, (s, e) in enumerate(zip(starts, bounds[1:], strict=True), start=1):
            length = int((e - s).total_seconds())
            count, valued, value_sum = rows.get(i, empty)
            buckets.append(Bucket(start=s, count=count, end=e, length_s=None if length == nominal else length,
                                  valued=valued, value_sum=value_sum))
        return buckets

    def counted_before(self, domain: str, cutoff: datetime) -> bool:
        """Whether any tier holds a row of the domain from before `cutoff`."""
        with self.pool.connection() as conn:
            return self._counted_before(conn, domain, cutoff)

    def daily_zone(self, domain: str) -> DailyZone:
        """Which zone the daily tier holds the domain's days in, and from when (see DailyZone)."""
        with self.pool.connection() as conn:
            return daily_zone(conn, domain)

    def is_registered(self, domain: str) -> bool:
        """Whether the domain is in the sites registry."""
        with self.pool.connection() as conn:
            row = conn.execute("SELECT EXISTS (SELECT 1 FROM sites WHERE domain = %s)", (domain,)).fetchone()
        return bool(row and row[0])

    @staticmethod
    def _counted_before(conn: psycopg.Connection, domain: str, cutoff: datetime) -> bool:
        """Whether any tier holds a row of the domain from before `cutoff` (its history reaches back
        past a retention horizon, so a tier that keeps less has dropped some of it)."""
        row = conn.execute(_COUNTED_BEFORE, {"domain": domain, "cutoff": cutoff}).fetchone()
        return bool(row and row[0])

    def _alternatives(self, conn: psycopg.Connection, domain: str, start: datetime, end: datetime,
                      granularity: str, tz: ZoneInfo, now: datetime) -> list[str]:
        """The coarser granularities that could answer [start, end) in the same zone; failing those,
        daily buckets in the site's registered zone (as "1d&tz=<zone>")."""
        out = []
        daily = daily_zone(conn, domain)
        for g in GRANULARITIES[GRANULARITIES.index(granularity) + 1:]:
            try:
                choose_tier(bucket_bounds(start, end, g, tz), g, tz.key, daily, self.retention, now)
            except QueryError:
                continue
            out.append(g)
        if not out and daily.registered_tz != tz.key:
            try:
                site_zone = ZoneInfo(daily.registered_tz)
                choose_tier(bucket_bounds(start, end, "1d", site_zone), "1d", site_zone.key, daily, self.retention, now)
                out.append(f"1d&tz={site_zone.key}")
            except (QueryError, ValueError, OSError):
                pass
        return out

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
        period of the same length just before, from the 15-minute tier; see `summary_window`. Raises
        OutsideRetention when that tier no longer keeps the start of the previous period."""
        window = summary_window(now, last_s)
        if not self.retention.keeps("15m", window.previous_start, now):  # the 15-minute tier dropped part of it
            days = self.retention.days_15m
            cutoff = now - timedelta(days=days)
            with self.pool.connection() as conn:
                if self._counted_before(conn, domain, cutoff):
                    raise OutsideRetention("15m", days, cutoff, [])
        return Summary(window, self.totals(domain, window.start, window.end),
                       self.totals(domain, window.previous_start, window.start))

    def sites(self, domains: list[str] | None = None) -> list[SiteRow]:
        """Registered sites (all, or those among `domains`), each with whether it has any rollup row."""
        where = "" if domains is None else " WHERE s.domain = ANY(%(domains)s)"
        with self.pool.connection() as conn:
            rows = conn.execute(_SITES.format(where=where), {"domains": domains or []}).fetchall()
        return [SiteRow(domain, tz, key, has, tuple(keep or ()), bool(raw)) for domain, tz, key, has, keep, raw in rows]

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
SELECT s.domain, s.tz, s.site_key, EXISTS (SELECT 1 FROM rollup_15m r WHERE r.domain = s.domain),
       s.keep_query, s.raw_urls
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
    keep_query: tuple[str, ...] = ()  # the site's URL rule (core/urls.py), for the tag it is shown
    raw_urls: bool = False


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

    def as_dt(s: int) -> datetime:
        return datetime.fromtimestamp(s, UTC)

    return SummaryWindow(as_dt(start), as_dt(end), now.astimezone(UTC), as_dt(start - last_s))
