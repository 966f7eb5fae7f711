"""Customer queries over the rollups: gap-filled buckets in the customer's time zone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from psycopg_pool import ConnectionPool

GRANULARITIES = ("15m", "1h", "1d")
MAX_BUCKETS = 5000


class QueryError(ValueError):
    """The request cannot be answered as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    count: int


def bucket_bounds(start: datetime, end: datetime, granularity: str, tz: ZoneInfo) -> list[datetime]:
    """Bucket boundaries covering [start, end): the first is `start` floored in `tz`, the last >= end.

    Days follow the zone's wall clock (23- and 25-hour days on DST changes).
    Quarter hours are floored on UTC: every zone offset in use is a multiple of 15 minutes.
    """
    if granularity not in GRANULARITIES:
        raise QueryError(f"granularity must be one of {', '.join(GRANULARITIES)}")
    if end <= start:
        raise QueryError("'to' must be after 'from'")
    if granularity == "1d":
        day = start.astimezone(tz).date()

        def midnight(d: date) -> datetime:
            return datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(timezone.utc)

        def step(bound: datetime) -> datetime:
            return midnight(bound.astimezone(tz).date() + timedelta(days=1))

        bounds = [midnight(day)]
    else:
        # Floor on the UTC timeline shifted by the zone's offset, so an hour in +05:45 starts at :45.
        seconds = 900 if granularity == "15m" else 3600
        offset_s = int(start.astimezone(tz).utcoffset().total_seconds())  # type: ignore[union-attr]
        epoch = int(start.timestamp()) + offset_s
        bounds = [datetime.fromtimestamp(epoch - epoch % seconds - offset_s, tz=timezone.utc)]

        def step(bound: datetime) -> datetime:
            return bound + timedelta(seconds=seconds)
    while bounds[-1] < end:
        bounds.append(step(bounds[-1]))
        if len(bounds) > MAX_BUCKETS + 1:
            raise QueryError(f"the range spans more than {MAX_BUCKETS} buckets; pick a coarser granularity")
    return bounds


_SERIES = """
SELECT b.bucket_start, COALESCE(sum(r.events), 0)::bigint
FROM unnest(%(starts)s::timestamptz[], %(ends)s::timestamptz[]) AS b(bucket_start, bucket_end)
LEFT JOIN rollup_15m r
       ON r.domain = %(domain)s AND r.event_type = %(type)s
      AND r.bucket_start >= b.bucket_start AND r.bucket_start < b.bucket_end
GROUP BY b.bucket_start
ORDER BY b.bucket_start
"""


class RollupReader:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def series(self, domain: str, event_type: str, start: datetime, end: datetime, granularity: str,
               tz: ZoneInfo) -> list[Bucket]:
        """Every bucket in the range, zero-filled, from the 15-minute tier."""
        bounds = bucket_bounds(start, end, granularity, tz)
        params = {"starts": bounds[:-1], "ends": bounds[1:], "domain": domain, "type": event_type}
        with self.pool.connection() as conn:
            rows = conn.execute(_SERIES, params).fetchall()
        return [Bucket(start=s, count=c) for s, c in rows]
