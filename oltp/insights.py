"""What the customers' API adds to totals and series in issue 17 (ADR 48): breakdowns, visitors,
percentiles and filtered totals, each read in one pooled connection.

`Insights` wraps the RollupReader of the API (same pool, same retention). Every range here is one
number (or one row per key) over UTC quarter hours, read from several tiers at once (oltp/spans.py);
visitors come from the HLL sketches of oltp/visitors.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from itertools import pairwise
from zoneinfo import ZoneInfo

import psycopg

from core.event import EVENT_TYPES
from oltp import visitors as vis
from oltp.breakdown import Breakdown, BreakdownQuery, counts, covering_days, visitors
from oltp.filters import Filter
from oltp.percentiles import quantiles
from oltp.queries import (
    DailyZone,
    QueryError,
    RollupReader,
    Series,
    SummaryWindow,
    Totals,
    aligned_tiers,
    bucket_bounds,
    daily_zone,
)
from oltp.ranges import range_bins, range_totals
from oltp.spans import check_retention, earliest_cutoff, spans, tier_label

FILTERED_VISITORS_NOTE = ("visitors under two or more filters are not kept (sketches are per dimension value, not "
                          "per combination): null")
FILTERED_VISITORS_DAYS_NOTE = ("visitors under a filter are counted over the site's local days covering the "
                               "range (sketches per dimension value are daily)")
FILTERED_PERCENTILES_NOTE = ("percentiles are kept per domain and event type, not per dimension value: null under "
                             "a filter")
COMBINED_HOURS_NOTE = ("two or more filters are answered from the hourly and daily tiers: the counts cover the UTC "
                       "hours around the range")


@dataclass(frozen=True, slots=True)
class RangeFigures:
    """Filtered totals (None: unfiltered, the caller's own), visitors and percentiles over one range."""

    tier: str | None = None
    current: dict[str, Totals] | None = None
    previous: dict[str, Totals] | None = None
    visitors: int | None = None
    previous_visitors: int | None = None
    percentiles: dict[str, float | None] | None = None  # both types
    percentiles_by_type: dict[str, dict[str, float | None]] | None = None
    notes: list[str] = field(default_factory=list)


class Insights:
    def __init__(self, reader: RollupReader) -> None:
        self.reader = reader

    def _check(self, conn: psycopg.Connection, domain: str, lo: datetime, hi: datetime, daily: DailyZone,
               now: datetime) -> None:
        """OutsideRetention when a tier the range needs has dropped part of it (and the domain had rows then)."""
        pieces = spans(lo, hi, daily)
        cutoff = earliest_cutoff(pieces, self.reader.retention, now)
        if cutoff is not None:
            check_retention(pieces, self.reader.retention, now, self.reader._counted_before(conn, domain, cutoff))

    def breakdown(self, q: BreakdownQuery, now: datetime) -> Breakdown:
        """One snapshot for all its statements (a read-only repeatable-read transaction): a breakdown first asks
        which pre-merged weeks still hold (oltp/weekly.py), then reads them and the other days; under read committed
        a pass committing between the two could replace the open week's span by a longer one, whose rows the
        second statement would read beside the days it adds (counted twice), and a late event on a day subtracted
        from a week would be subtracted without being in the week (oltp/weekly.py's module doc)."""
        with self.reader.pool.connection() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            daily = daily_zone(conn, q.domain)
            self._check(conn, q.domain, q.lo, q.hi, daily, now)
            return visitors(conn, q, daily) if q.metric == "visitors" else counts(conn, q, daily)

    def summary(self, domain: str, window: SummaryWindow, filters: tuple[Filter, ...], ps: tuple[float, ...],
                now: datetime) -> RangeFigures:
        """Visitors (current and previous period), percentiles (when asked, unfiltered only) and, under
        filters, the filtered totals of both periods."""
        with self.reader.pool.connection() as conn:
            daily = daily_zone(conn, domain)
            notes: list[str] = []
            tier, current, previous = None, None, None
            if filters:
                current, found = range_totals(conn, domain, window.start, window.end, filters, daily)
                previous, _ = range_totals(conn, domain, window.previous_start, window.start, filters, daily)
                tier = tier_label(found)
                if len(filters) > 1 and (found[0].lo != window.start or found[-1].hi != window.end):
                    notes.append(COMBINED_HOURS_NOTE)
            visitors_now, visitors_before = self._visitors(conn, domain, window, filters, daily, notes)
            pct, by_type = self._percentiles(conn, domain, window, filters, ps, daily, notes)
        return RangeFigures(tier, current, previous, visitors_now, visitors_before, pct, by_type, notes)

    @staticmethod
    def _visitors(conn: psycopg.Connection, domain: str, window: SummaryWindow, filters: tuple[Filter, ...],
                  daily: DailyZone, notes: list[str]) -> tuple[int | None, int | None]:
        tz = daily.registered_tz
        if not filters:
            now, before = vis.visitors_of_ranges(
                conn, domain, [(window.start, window.end), (window.previous_start, window.start)], daily)
            return now, before
        if len(filters) > 1:
            notes.append(FILTERED_VISITORS_NOTE)
            return None, None
        f = filters[0]
        notes.append(FILTERED_VISITORS_DAYS_NOTE)
        out = []
        for lo, hi in ((window.start, window.end), (window.previous_start, window.start)):
            a, b = covering_days(tz, lo, hi)
            out.append(vis.visitors_by_key(conn, domain, tz, f.dimension, a, b, [f.key]).get(f.key, 0))
        return out[0], out[1]

    @staticmethod
    def _percentiles(conn: psycopg.Connection, domain: str, window: SummaryWindow, filters: tuple[Filter, ...],
                     ps: tuple[float, ...], daily: DailyZone, notes: list[str]
                     ) -> tuple[dict[str, float | None] | None, dict[str, dict[str, float | None]] | None]:
        if not ps:
            return None, None
        if filters:
            notes.append(FILTERED_PERCENTILES_NOTE)
            nulls: dict[str, float | None] = quantiles({}, ps)
            return nulls, {t: dict(nulls) for t in EVENT_TYPES}
        bins = range_bins(conn, domain, window.start, window.end, daily)
        both: dict[int, int] = {}
        for by_bin in bins.values():
            for k, c in by_bin.items():
                both[k] = both.get(k, 0) + c
        return quantiles(both, ps), {t: quantiles(bins.get(t, {}), ps) for t in EVENT_TYPES}

    def visitors_series(self, domain: str, start: datetime, end: datetime, granularity: str, tz: ZoneInfo,
                        filters: tuple[Filter, ...] = ()) -> tuple[Series, int]:
        """Visitors per bucket (Bucket.count), from the 1h or 1d sketches: hourly buckets need whole UTC hours,
        daily ones the site's zone (1d sketches) or whole-hour day bounds (each day merged from 1h sketches).
        One filter: daily buckets in the site's zone only (sketches per value are daily); two or more: refused.
        With the visitors of the whole range the buckets cover (sketches merged, not bucket sums)."""
        if granularity not in ("1h", "1d"):
            raise QueryError("visitors are kept per hour and per day: granularity must be 1h or 1d")
        if len(filters) > 1:
            raise QueryError(FILTERED_VISITORS_NOTE.replace(": null", ""))
        bounds = bucket_bounds(start, end, granularity, tz)
        with self.reader.pool.connection() as conn:
            daily = daily_zone(conn, domain)
            tier, values, total = self._visitor_buckets(conn, domain, bounds, granularity, tz, filters, daily)
        rows = {i: (v, 0, Decimal("0.000000")) for i, v in enumerate(values, start=1)}
        return Series(tier, self.reader._buckets(bounds, granularity, rows)), total

    @staticmethod
    def _visitor_buckets(conn: psycopg.Connection, domain: str, bounds: list[datetime], granularity: str,
                         tz: ZoneInfo, filters: tuple[Filter, ...], daily: DailyZone) -> tuple[str, list[int], int]:
        """(tier, visitors per bucket, visitors of [bounds[0], bounds[-1])) for `visitors_series`."""
        tiers = aligned_tiers(bounds, granularity, tz.key, daily if granularity == "1d" else None)
        starts, lo, hi = bounds[:-1], bounds[0], bounds[-1]
        if filters and "1d" not in tiers:
            raise QueryError("visitors under a filter are kept per local day of the site: ask granularity=1d "
                             "in the site's time zone")
        if filters:
            f = filters[0]
            values, total = vis.key_visitors_series(conn, domain, daily.registered_tz, f.dimension, f.key, bounds)
            return "1d", values, total
        if "1d" in tiers or ("1h" in tiers and granularity == "1h"):
            tier = "1d" if "1d" in tiers else "1h"
            values, total = vis.visitors_series_and_total(conn, domain, tz.key, tier, starts, lo, hi, daily)
            return tier, values, total
        if "1h" in tiers:  # days of another zone on whole hours: each merged from its hours
            found = vis.visitors_of_ranges(conn, domain, [*pairwise(bounds), (lo, hi)], daily)
            return "1h", found[:-1], found[-1]
        raise QueryError(f"in {tz.key} these buckets do not start on whole UTC hours; visitors are kept "
                         "per hour: pick another time zone or granularity")
