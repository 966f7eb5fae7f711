"""Filtered totals and value percentiles over a range or per series bucket (ADR 48).

Filtered counts: one filter reads `rollup_dim_*` (that dimension's key), two or more `rollup_cube_*`
(hourly and daily tiers only). Percentiles read `value_bins_*` (per domain and type: never under a
filter). Table and column names come from constants and oltp/filters.DIMENSIONS, never from a request.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

import psycopg

from core.event import EVENT_TYPES
from oltp.filters import Filter, filtered_table
from oltp.queries import DailyZone, Totals
from oltp.spans import Span, spans


def range_totals(conn: psycopg.Connection, domain: str, lo: datetime, hi: datetime, filters: tuple[Filter, ...],
                 daily: DailyZone) -> tuple[dict[str, Totals], list[Span]]:
    """Per event type, the filtered totals over [lo, hi) and the pieces read (widened to whole hours
    for combined filters: the first piece's lo and the last one's hi say what was counted)."""
    pieces = spans(lo, hi, daily, hourly_only=len(filters) > 1)
    parts: list[str] = []
    params: dict[str, object] = {"domain": domain, "tz": daily.registered_tz}
    for i, s in enumerate(pieces):
        table, extra, fparams = filtered_table(s.tier, filters)
        tz = " AND r.tz = %(tz)s" if s.tier == "1d" else ""
        parts.append(f"SELECT r.event_type, r.events, r.valued, r.value_sum FROM {table} r WHERE r.domain = "
                     f"%(domain)s{tz} AND r.bucket_start >= %(lo{i})s AND r.bucket_start < %(hi{i})s{extra}")
        params.update({f"lo{i}": s.lo, f"hi{i}": s.hi, **fparams})
    sql = (f"SELECT event_type, sum(events)::bigint, sum(valued)::bigint, coalesce(sum(value_sum), 0)::numeric(24, 6)"
           f" FROM ({' UNION ALL '.join(parts)}) x GROUP BY event_type")
    out = {t: Totals() for t in EVENT_TYPES}
    for event_type, events, valued, value_sum in conn.execute(sql, params).fetchall():
        out[event_type] = Totals(events, valued, value_sum)
    return out, pieces


def range_bins(conn: psycopg.Connection, domain: str, lo: datetime, hi: datetime,
               daily: DailyZone) -> dict[str, dict[int, int]]:
    """Per event type, the value bins over [lo, hi) (bin -> count), read from the coarsest tiers."""
    pieces = spans(lo, hi, daily)
    parts: list[str] = []
    params: dict[str, object] = {"domain": domain, "tz": daily.registered_tz}
    for i, s in enumerate(pieces):
        tz = " AND r.tz = %(tz)s" if s.tier == "1d" else ""
        parts.append(f"SELECT r.event_type, r.bin, r.count FROM value_bins_{s.tier} r WHERE r.domain = %(domain)s"
                     f"{tz} AND r.bucket_start >= %(lo{i})s AND r.bucket_start < %(hi{i})s")
        params.update({f"lo{i}": s.lo, f"hi{i}": s.hi})
    sql = f"SELECT event_type, bin, sum(count)::bigint FROM ({' UNION ALL '.join(parts)}) x GROUP BY 1, 2"
    out: dict[str, dict[int, int]] = defaultdict(dict)
    for event_type, k, c in conn.execute(sql, params).fetchall():
        out[event_type][k] = c
    return out
