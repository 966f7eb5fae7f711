"""Reconcile for the rollups by dimension (ADR 46): rollup_dim_15m against ClickHouse's `GROUP BY`, on a sample.

Called by `oltp.reconcile.reconcile` after its comparison of rollup_15m: among the (domain, type, quarter hour)
keys both stores hold and agree on (so no event of theirs is in flight), up to SAMPLE_DOMAINS domains and
SAMPLE_BUCKETS quarter hours of each are drawn; for each, ClickHouse's non-bot events (`source.dimensions`)
are counted per dimension and value, a value mapped as the sink maps it ('' stays ''; a value not in the
day's `dim_keys` is '(other)'), and compared field by field (events, valued, value_sum) with rollup_dim_15m.
A difference is reported as oltp.reconcile's Difference with the field named `<dimension>[<key>].<field>`.
Reads only.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import psycopg

from oltp.rollup_dims import DIMENSIONS, OTHER
from oltp.tiers import DayStarts, zone

SAMPLE_DOMAINS = 5
SAMPLE_BUCKETS = 8
_QUARTER = timedelta(minutes=15)
_FIELDS = ("events", "valued", "value_sum")

DimKey = tuple[str, datetime, str, str]  # (type, quarter hour, dimension, key)
Figures = tuple[int, int, Decimal | None]  # events, valued, value_sum


class DimensionSource(Protocol):
    def dimensions(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[tuple[Any, ...]]: ...


def sample(keys: Iterable[tuple[str, str, datetime]], rng: random.Random) -> dict[str, list[datetime]]:
    """Up to SAMPLE_DOMAINS domains of these keys, each with up to SAMPLE_BUCKETS of its quarter hours (sorted)."""
    by_domain: dict[str, set[datetime]] = {}
    for domain, _, bucket in keys:
        by_domain.setdefault(domain, set()).add(bucket)
    domains = rng.sample(sorted(by_domain), min(SAMPLE_DOMAINS, len(by_domain)))
    return {d: sorted(rng.sample(sorted(by_domain[d]), min(SAMPLE_BUCKETS, len(by_domain[d]))))
            for d in sorted(domains)}


def _add(table: dict[DimKey, Figures], key: DimKey, value: Decimal | None) -> None:
    n, valued, total = table.get(key, (0, 0, None))
    if value is not None:
        valued, total = valued + 1, (total or Decimal(0)) + value
    table[key] = (n + 1, valued, total)


def _ch_figures(conn: psycopg.Connection, source: DimensionSource, domain: str,
                buckets: Sequence[datetime]) -> dict[DimKey, Figures]:
    rows = source.dimensions(buckets[0], buckets[-1] + _QUARTER, domain)
    tz_row = conn.execute("SELECT tz FROM sites WHERE domain = %s", (domain,)).fetchone()
    tz, days, wanted = zone(tz_row[0] if tz_row else None).key, DayStarts(), set(buckets)
    admitted = {(dim, day, key) for dim, day, key in conn.execute(
        "SELECT dimension, day_start, key FROM dim_keys WHERE domain = %s AND day_start >= %s AND day_start < %s",
        (domain, buckets[0] - timedelta(days=2), buckets[-1] + timedelta(days=1))).fetchall()}
    out: dict[DimKey, Figures] = {}
    for _, _, event_type, ts, value, *values in rows:
        quarter = datetime.fromtimestamp(int(ts.timestamp()) // 900 * 900, ts.tzinfo)
        if quarter not in wanted:
            continue
        day = days.start(tz, ts)
        for dim, key in zip(DIMENSIONS, values, strict=True):
            mapped = key if key == "" or (dim, day, key) in admitted else OTHER
            _add(out, (event_type, quarter, dim, mapped), value)
    return out


def _pg_figures(conn: psycopg.Connection, domain: str, buckets: Sequence[datetime]) -> dict[DimKey, Figures]:
    rows = conn.execute("SELECT event_type, bucket_start, dimension, key, events, valued, value_sum FROM rollup_dim_15m"
                        " WHERE domain = %s AND bucket_start = ANY(%s)", (domain, list(buckets))).fetchall()
    return {(t, b, d, k): (int(n), int(v), None if not v else s) for t, b, d, k, n, v, s in rows}


def compare_dimensions(conn: psycopg.Connection, source: DimensionSource,
                       keys: Iterable[tuple[str, str, datetime]], rng: random.Random) -> list[tuple[Any, ...]]:
    """(domain, type, bucket, field, pg, ch) for every field that differs in the sample of `keys` (see the
    module docstring). Leaves no transaction open."""
    out: list[tuple[Any, ...]] = []
    for domain, buckets in sample(keys, rng).items():
        found = _differences(conn, source, domain, buckets)
        if found:  # read again: the two stores are read one after the other, not at one instant
            found = _differences(conn, source, domain, buckets)
        out += found
    return out


def _differences(conn: psycopg.Connection, source: DimensionSource, domain: str,
                 buckets: Sequence[datetime]) -> list[tuple[Any, ...]]:
    ch = _ch_figures(conn, source, domain, buckets)
    pg = _pg_figures(conn, domain, buckets)
    conn.commit()
    out: list[tuple[Any, ...]] = []
    for key in sorted(set(pg) | set(ch)):
        a, b = pg.get(key, (0, 0, None)), ch.get(key, (0, 0, None))
        for name, x, y in zip(_FIELDS, a, b, strict=True):
            if x != y:
                event_type, bucket, dim, k = key
                out.append((domain, event_type, bucket, f"{dim}[{k}].{name}", x, y))
    return out
