"""`tally rebuild` for the rollups by dimension, the cube, the value bins and `dim_keys` (ADR 46).

Called by oltp/rebuild.py inside a chunk's transaction (rollup_15m locked, the loader at or past the rollup
worker's offsets, the chunk's hashes already in `seen_events`). For the chunk [lo, hi) widened to whole UTC
hours, and to whole local days of each domain's registered zone, the rows of the new tables are replaced by
what ClickHouse's non-bot events there give (`source.dimensions`), in two passes:

1. per zone, the local days: `dim_keys` and the daily tables. The cap is re-decided for the whole day at
   once: the first `cap` values by events, ties by value (the live sink admits values first come; a rebuilt
   day may so keep other values than the live one did, deterministically);
2. the UTC hours: the 15-minute and hourly tables, capped by the day's keys just written.

An event counts only if PostgreSQL has counted it (its hash is in `seen_events`: the sink's, and the chunk's
that oltp/rebuild.py counted) or it is older than the dedup window: one still in flight to the rollup worker
is counted by the worker when it arrives, not twice. That holds inside the chunk too: the loader is not
stopped by the chunk's lock, so ClickHouse may hold events here that it did not hold when oltp/rebuild.py read
the chunk (and put its hashes in `seen_events`); counting those here and again when the worker gets them was
a double count under live ingestion (found by tests/test_rebuild.py's live run). Daily rows under a zone other
than the registered one are left alone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import psycopg

from oltp.rollup_dims import DAILY_CTES, FINE_CTES
from oltp.tiers import HOUR_S, DayStarts, zone

_STAGE = ("CREATE TEMP TABLE rebuild_dims (hash uuid, domain text, event_type text, ts timestamptz,"
          " value numeric(24, 6), page text, source text, country text, device text, browser text, os text)"
          " ON COMMIT DROP")
_COLUMNS = "hash, domain, event_type, ts, value, page, source, country, device, browser, os"

_PEOPLE = """
WITH zone_days AS (
    SELECT tz, array_agg(s ORDER BY s) AS starts
    FROM unnest(%(zone_tz)s::text[], %(zone_start)s::timestamptz[]) AS z(tz, s)
    GROUP BY tz
), site AS (
    SELECT m.domain, m.tz, z.starts
    FROM unnest(%(domains)s::text[], %(tzs)s::text[]) AS m(domain, tz) JOIN zone_days z ON z.tz = m.tz
), people AS (
    SELECT e.domain, e.event_type, s.tz, date_bin('15 minutes', e.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS quarter,
           s.starts[width_bucket(e.ts, s.starts)] AS day_start, e.value, NULL::text AS visitor,
           e.page, e.source, e.country, e.device, e.browser, e.os
    FROM rebuild_dims e JOIN site s ON s.domain = e.domain
    WHERE e.ts >= %(lo)s AND e.ts < %(hi)s
      AND (e.ts < %(dedup_from)s OR EXISTS (SELECT 1 FROM seen_events x WHERE x.hash = e.hash AND x.ts = e.ts))
), """
_DAILY = _PEOPLE + DAILY_CTES + "\nSELECT count(*) FROM people"
_FINE = _PEOPLE + FINE_CTES + "\nSELECT count(*) FROM people"

_DAILY_TABLES = ("rollup_dim_1d", "rollup_cube_1d", "value_bins_1d")
_FINE_TABLES = ("rollup_dim_15m", "value_bins_15m", "rollup_dim_1h", "rollup_cube_1h", "value_bins_1h")


class DimensionSource(Protocol):
    def dimensions(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[tuple[Any, ...]]: ...


def _hours(lo: datetime, hi: datetime) -> tuple[datetime, datetime]:
    a, b = int(lo.timestamp()) // HOUR_S * HOUR_S, -int(-hi.timestamp() // HOUR_S) * HOUR_S
    return datetime.fromtimestamp(a, UTC), datetime.fromtimestamp(b, UTC)


def _domains(conn: psycopg.Connection, lo: datetime, hi: datetime, domain: str | None) -> dict[str, str]:
    """The domains with rows near the range (or the one asked for) -> their registered zone."""
    if domain is not None:
        names = [domain]
    else:
        margin = timedelta(days=3)
        names = [r[0] for r in conn.execute(
            "SELECT domain FROM rollup_15m WHERE bucket_start >= %(lo)s AND bucket_start < %(hi)s"
            " UNION SELECT domain FROM rollup_dim_1h WHERE bucket_start >= %(lo)s AND bucket_start < %(hi)s",
            {"lo": lo - margin, "hi": hi + margin}).fetchall()]
    tzs: dict[str, str] = dict(conn.execute("SELECT domain, tz FROM sites WHERE domain = ANY(%s)", (names,)).fetchall())
    return {d: zone(tzs.get(d)).key for d in sorted(names)}


def rebuild_dimensions(conn: psycopg.Connection, source: DimensionSource, lo: datetime, hi: datetime, *,
                       domain: str | None, dedup_from: datetime, cap: int) -> int:
    """Recompute the new tables for the chunk [lo, hi) (see the module docstring) inside the caller's
    transaction; returns the events counted for the widened range."""
    zones = _domains(conn, lo, hi, domain)
    if not zones:
        return 0
    lo_h, hi_h = _hours(lo, hi)
    days = DayStarts()
    spans = {tz: days.span(tz, lo_h, hi_h) for tz in sorted(set(zones.values()))}
    stage_lo, stage_hi = min(s[0] for s in spans.values()), max(s[-1] for s in spans.values())
    conn.execute(_STAGE)
    with conn.cursor().copy(f"COPY rebuild_dims ({_COLUMNS}) FROM STDIN") as copy:
        for row in source.dimensions(stage_lo, stage_hi, domain):
            if row[1] in zones:
                copy.write_row(row)
    base = {"domains": list(zones), "tzs": list(zones.values()), "zone_tz": [tz for tz, s in spans.items() for _ in s],
            "zone_start": [x for s in spans.values() for x in s], "dedup_from": dedup_from, "cap": cap}
    for tz, starts in spans.items():
        names = [d for d, z in zones.items() if z == tz]
        args = {"names": names, "tz": tz, "lo": starts[0], "hi": starts[-1]}
        conn.execute("DELETE FROM dim_keys WHERE domain = ANY(%(names)s) AND day_start >= %(lo)s"
                     " AND day_start < %(hi)s", args)
        for table in _DAILY_TABLES:
            conn.execute(f"DELETE FROM {table} WHERE domain = ANY(%(names)s) AND tz = %(tz)s"
                         " AND bucket_start >= %(lo)s AND bucket_start < %(hi)s", args)
        conn.execute(_DAILY, {**base, "domains": names, "tzs": [tz] * len(names), "lo": starts[0], "hi": starts[-1]})
    for table in _FINE_TABLES:
        conn.execute(f"DELETE FROM {table} WHERE domain = ANY(%(names)s) AND bucket_start >= %(lo)s"
                     " AND bucket_start < %(hi)s", {"names": list(zones), "lo": lo_h, "hi": hi_h})
    counted = conn.execute(_FINE, {**base, "lo": lo_h, "hi": hi_h}).fetchone()
    return int(counted[0]) if counted else 0
