"""The write side of the rollup tiers 1h and 1d (docs/adr/0019-tiers-and-routing.md).

`rollup_1h` holds rollup_15m's rows summed per UTC hour; `rollup_1d` holds them summed per local day
of the domain's registered zone (`sites.tz`, UTC for an unregistered domain), `bucket_start` being
the instant the day starts by ADR 12's day rule (the same `oltp.queries.boundaries` the customer
queries use, so a daily row always falls into exactly one daily bucket of that zone).
`rollup_1d_coverage` says, per domain, which zone the daily rows are written in and from which day
on they hold every event; the query side reads rollup_1d only from there.

Here: the day starts (`DayStarts`), the sink's cache of site zones (`SiteZones`), the coverage
bookkeeping the sink does around its batch transaction (`plan_zones`, `note_zones`), and `rederive`, which
recomputes both tiers from rollup_15m (for `tally rebuild`).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg

from oltp.partitions import TIER_TABLES
from oltp.partitions import ensure_partitions as _ensure_partitions
from oltp.queries import boundaries
from oltp.rows import one

DAY_S = 86400
HOUR_S = 3600
# After a zone change, the daily rows are complete in the new zone only from the first local day that
# starts at least this long after the change was seen: covers the sinks' zone-cache refresh (60 s),
# events stamped up to TALLY_MAX_FUTURE_SKEW_S ahead, and transactions still in flight.
ZONE_CHANGE_MARGIN_S = 3600
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def zone(key: str | None) -> ZoneInfo:
    """The ZoneInfo for a registry `tz` value; UTC for None or a name this machine does not know."""
    try:
        return ZoneInfo(key or "UTC")
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return ZoneInfo("UTC")


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("tier bounds need timezone-aware datetimes")
    return t.astimezone(UTC)


def _at(s: int) -> datetime:
    return datetime.fromtimestamp(s, UTC)


class DayStarts:
    """Where local days start in a zone (ADR 12), cached per zone over a window of days.

    `start(tz, t)` is the start of the day holding instant t; `next_start(tz, t)` the first day start
    strictly after t. Not thread-safe (one per sink)."""

    WINDOW_S = 40 * DAY_S

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, int, list[int]]] = {}  # tz -> (lo, hi, boundaries in [lo, hi))

    def _bounds_around(self, tz: str, t: int) -> list[int]:
        lo, hi, found = self._cache.get(tz, (0, 0, []))
        # A usable window has a day start at or before t and one after it.
        if not (found and found[0] <= t < found[-1] and lo <= t < hi):
            lo, hi = t - self.WINDOW_S // 2, t + self.WINDOW_S // 2
            found = boundaries(zone(tz), lo, hi, DAY_S)
            self._cache[tz] = (lo, hi, found)
        return found

    def start(self, tz: str, t: datetime) -> datetime:
        s = int(t.timestamp() // 1)
        found = self._bounds_around(tz, s)
        return _at(found[bisect_right(found, s) - 1])

    def next_start(self, tz: str, t: datetime) -> datetime:
        s = int(t.timestamp() // 1)
        found = self._bounds_around(tz, s)
        return _at(found[bisect_right(found, s)])

    def covering(self, tz: str, lo: int, hi: int) -> list[int]:
        """Day starts (UTC epoch seconds, ascending) from the start of the day holding second `lo`
        through the start of the day holding second `hi` (lo <= hi): every instant in [lo, hi + 1)
        finds its own day start as the greatest element at or before it (the sink's `width_bucket`)."""
        found = self._bounds_around(tz, lo)
        i = bisect_right(found, lo) - 1
        out: list[int] = []
        while True:
            j = bisect_right(found, hi)
            if j < len(found):  # found[j] > hi: nothing beyond it is wanted
                out.extend(found[i:j])
                return out
            out.extend(found[i:])
            last = found[-1]
            found = self._bounds_around(tz, last)  # a window around the last start seen
            i = bisect_right(found, last)

    def span(self, tz: str, lo: datetime, hi: datetime) -> list[datetime]:
        """Day starts from the start of the day holding `lo` to the first day start at or after `hi`."""
        a, b = int(lo.timestamp() // 1), -int(-hi.timestamp() // 1)
        found = boundaries(zone(tz), a - 3 * DAY_S, b + 3 * DAY_S, DAY_S)
        first = max(x for x in found if x <= a)
        last = min(x for x in found if x >= b)
        return [_at(x) for x in found if first <= x <= last]


class SiteZones:
    """The registered zone of every site, reloaded from `sites` every `ttl_s` (thread-safe).

    Unknown domains (and zones this machine does not know) are UTC."""

    def __init__(self, ttl_s: float = 60.0) -> None:
        self.ttl_s = ttl_s
        self._zones: dict[str, str] = {}
        self._loaded_at = -1e18
        self._lock = threading.Lock()

    def get(self, conn: psycopg.Connection, domain: str) -> str:
        with self._lock:
            if time.monotonic() - self._loaded_at >= self.ttl_s:
                self._reload(conn)
            return self._zones.get(domain, "UTC")

    def _reload(self, conn: psycopg.Connection) -> None:
        rows = conn.execute("SELECT domain, tz FROM sites").fetchall()
        self._zones = {d: zone(tz).key for d, tz in rows}
        self._loaded_at = time.monotonic()

    def forget(self) -> None:
        with self._lock:
            self._loaded_at = -1e18


def plan_zones(conn: psycopg.Connection, zones: dict[str, str], days: DayStarts,
               now: datetime | None = None) -> dict[str, tuple[str, datetime, bool]]:
    """What `note_zones` will record for these domains (domain -> registered zone): read only, and
    called BEFORE the batch transaction, so that transaction takes no coverage lock before its rollup
    writes (the lock order of `rederive`: rollup_15m first, coverage after; no deadlock with a rebuild).

    A domain seen for the first time is complete from the beginning (1970) if it has no rollup_15m
    rows yet, else (rows from before this tier existed) from its next local day. A domain whose zone
    changed is complete in the new zone from the first local day starting ZONE_CHANGE_MARGIN_S after
    now; days before stay under the old zone, which queries no longer use (ADR 19). Returns
    domain -> (zone, complete from, whether the row is new); domains already right are left out."""
    if not zones:
        return {}
    now = now or datetime.now(UTC)
    names = sorted(zones)
    known = {d: tz for d, tz in conn.execute(
        "SELECT domain, tz FROM rollup_1d_coverage WHERE domain = ANY(%s)", (names,)).fetchall()}
    plan: dict[str, tuple[str, datetime, bool]] = {}
    for domain in names:
        want = zones[domain]
        if domain not in known:
            had_rows = one(conn.execute("SELECT EXISTS (SELECT 1 FROM rollup_15m WHERE domain = %s)",
                                        (domain,)))[0]
            plan[domain] = (want, days.next_start(want, now) if had_rows else EPOCH, True)
        elif known[domain] != want:
            plan[domain] = (want, days.next_start(want, now + timedelta(seconds=ZONE_CHANGE_MARGIN_S)), False)
    return plan


def note_zones(conn: psycopg.Connection, plan: dict[str, tuple[str, datetime, bool]]) -> None:
    """Record a `plan_zones` plan inside the caller's batch transaction, after its rollup writes. A
    new domain's row is inserted unless another sink did first (its plan was the same); a changed
    zone is written unless the row already names it (another sink switched it)."""
    for domain, (tz, start, new) in sorted(plan.items()):
        if new:
            conn.execute("INSERT INTO rollup_1d_coverage (domain, tz, complete_from) VALUES (%s, %s, %s)"
                         " ON CONFLICT (domain) DO NOTHING", (domain, tz, start))
        else:
            conn.execute("UPDATE rollup_1d_coverage SET tz = %s, complete_from = %s, updated_at = now()"
                         " WHERE domain = %s AND tz <> %s", (tz, start, domain, tz))


def ensure_tier_partitions(conn: psycopg.Connection, lo: datetime, hi: datetime,
                           day_lo: datetime | None = None, day_hi: datetime | None = None) -> None:
    """Make sure the partitions of rollup_15m/1h (and rollup_1d for [day_lo, day_hi]) exist, and those of
    each tier's tables by dimension and value bins (`TIER_TABLES`) and of `dim_keys` (day starts), if the
    tables are partitioned (ADR 18; `ensure_partitions` leaves a plain table alone)."""
    for table in ("rollup_15m", "rollup_1h", *TIER_TABLES["15m"], *TIER_TABLES["1h"]):
        _ensure_partitions(conn, table, lo, hi)
    for table in ("rollup_1d", *TIER_TABLES["1d"], "dim_keys"):
        _ensure_partitions(conn, table, day_lo or lo, day_hi or hi)


def _ensure(conn: psycopg.Connection, table: str, lo: datetime, hi: datetime) -> None:
    _ensure_partitions(conn, table, lo, hi)


_REDERIVE_1H = """
INSERT INTO rollup_1h (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
SELECT domain, event_type, date_bin('1 hour', bucket_start, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
       sum(events), sum(valued), sum(value_sum), min(value_min), max(value_max)
FROM rollup_15m
WHERE bucket_start >= %(lo)s AND bucket_start < %(hi)s {only}
GROUP BY 1, 2, 3
"""

_REDERIVE_1D = """
INSERT INTO rollup_1d (domain, tz, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
SELECT domain, %(tz)s, event_type, (%(starts)s::timestamptz[])[width_bucket(bucket_start, %(starts)s::timestamptz[])],
       sum(events), sum(valued), sum(value_sum), min(value_min), max(value_max)
FROM rollup_15m
WHERE domain = ANY(%(domains)s) AND bucket_start >= %(lo)s AND bucket_start < %(hi)s
GROUP BY 1, 3, 4
"""


def rederive(conn: psycopg.Connection, lo: datetime, hi: datetime, domain: str | None = None) -> None:
    """Recompute rollup_1h and rollup_1d from rollup_15m for [lo, hi) (one domain, or all), inside the
    caller's transaction (nothing is committed here).

    The range is widened to whole UTC hours for rollup_1h and to the whole local days (of each domain's
    registered zone) overlapping those hours for rollup_1d; the rows of both tiers in the widened ranges are
    replaced by sums of the rollup_15m rows there, so rollup_15m must be complete for them (it is what is trusted).
    Daily rows under a zone other than the domain's registered one are left alone. When the widened
    days reach the day from which the domain's daily rows are complete in that zone, that day moves
    back to the start of the range (and a domain without daily rows yet becomes complete from it if
    rollup_15m has nothing after the range).

    Takes a SHARE lock on rollup_15m until the transaction ends: sink batches wait rather than add to
    rows being recomputed. Raises ValueError for an empty range or naive datetimes; psycopg errors
    when PostgreSQL fails (the caller's transaction is then to be rolled back).
    """
    lo, hi = _utc(lo), _utc(hi)
    if hi <= lo:
        raise ValueError("rederive: 'hi' must be after 'lo'")
    if lo < EPOCH:
        raise ValueError("rederive: ranges before 1970 are not supported")
    conn.execute("LOCK TABLE rollup_15m IN SHARE MODE")
    only, args = ("AND domain = %(domain)s", {"domain": domain}) if domain is not None else ("", {})

    # Hourly: whole UTC hours around [lo, hi).
    lo_h = _at(int(lo.timestamp()) // HOUR_S * HOUR_S)
    hi_s = -int(-hi.timestamp() // 1)  # ceil
    hi_h = _at(-(-hi_s // HOUR_S) * HOUR_S)
    # Only the tiers written here: rollup_15m is read, and creating one of its partitions inside a
    # rebuild's transaction could wait on a sink batch waiting on that transaction.
    _ensure(conn, "rollup_1h", lo_h, hi_h)
    conn.execute(f"DELETE FROM rollup_1h WHERE bucket_start >= %(lo)s AND bucket_start < %(hi)s {only}",
                 {"lo": lo_h, "hi": hi_h, **args})
    conn.execute(_REDERIVE_1H.format(only=only), {"lo": lo_h, "hi": hi_h, **args})

    # Daily: the domains with rows near the range, grouped by their registered zone.
    margin = timedelta(days=3)  # a local day starts less than 2 days from any instant in it
    rows = conn.execute(f"""
        SELECT d.domain, s.tz FROM (
            SELECT DISTINCT domain FROM rollup_15m WHERE bucket_start >= %(lo)s AND bucket_start < %(hi)s {only}
            UNION SELECT DISTINCT domain FROM rollup_1d WHERE bucket_start >= %(lo)s AND bucket_start < %(hi)s {only}
            {"UNION SELECT %(domain)s" if domain is not None else ""}
        ) d LEFT JOIN sites s ON s.domain = d.domain""", {"lo": lo - margin, "hi": hi + margin, **args}).fetchall()
    by_zone: dict[str, list[str]] = {}
    for d, tz in rows:
        by_zone.setdefault(zone(tz).key, []).append(d)
    days = DayStarts()
    for tz, domains in sorted(by_zone.items()):
        # the local days of the whole UTC hours around [lo, hi), as oltp/rebuild_dims.py and rebuild_visitors take
        # them: a day whose dimension rows a rebuild rewrites gets a new rollup_1d row, hence a new signature for
        # the week holding it (oltp/weekly.py); in a zone whose days start off the hour the two differ by a day
        starts = days.span(tz, lo_h, hi_h)
        lo_d, hi_d = starts[0], starts[-1]
        _ensure(conn, "rollup_1d", lo_d, hi_d)
        params = {"tz": tz, "domains": sorted(domains), "lo": lo_d, "hi": hi_d, "starts": starts[:-1]}
        conn.execute("DELETE FROM rollup_1d WHERE domain = ANY(%(domains)s) AND tz = %(tz)s"
                     " AND bucket_start >= %(lo)s AND bucket_start < %(hi)s", params)
        conn.execute(_REDERIVE_1D, params)
        _extend_coverage(conn, domains, tz, lo_d, hi_d)


def _extend_coverage(conn: psycopg.Connection, domains: list[str], tz: str, lo: datetime, hi: datetime) -> None:
    """After recomputing [lo, hi) in `tz`: move complete_from back to `lo` where the range reaches it."""
    conn.execute("UPDATE rollup_1d_coverage SET complete_from = %(lo)s, updated_at = now()"
                 " WHERE domain = ANY(%(domains)s) AND tz = %(tz)s AND complete_from > %(lo)s"
                 " AND complete_from <= %(hi)s", {"domains": domains, "tz": tz, "lo": lo, "hi": hi})
    conn.execute("""
        INSERT INTO rollup_1d_coverage (domain, tz, complete_from)
        SELECT d, %(tz)s, %(lo)s FROM unnest(%(domains)s::text[]) d
        WHERE NOT EXISTS (SELECT 1 FROM rollup_15m r WHERE r.domain = d AND r.bucket_start >= %(hi)s)
        ON CONFLICT (domain) DO NOTHING""", {"domains": domains, "tz": tz, "lo": lo, "hi": hi})
