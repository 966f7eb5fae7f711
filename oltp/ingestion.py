"""The ingestion status of a domain: what arrived, what the collectors refused and why, how fresh.

Read from what the rollup worker keeps in PostgreSQL in the same transaction as its rollups:
`ingestion_15m` (accepted events, bots, late events, last arrival, by the UTC quarter hour they
arrived in) and `collector_refusals` (the collectors' refusal counts, carried through the spool and
the topic as count records). A period of "the last hour" is the quarter hours whose start is within
it, the current (filling) one included.

Refusals count for a domain only when the request carried that site's registered key (ADR 29): the
collectors no longer spool a domain's `missing_site_key` / `unknown_site_key` / `registry_unavailable`
counts, and rows of those reasons written before (when anyone could inflate them with a made-up key)
are not shown (`NOT_A_SITES_REFUSAL`). Nor can one sender inflate them: the collectors count a batch
over the event limit once, and what one client address makes count for a site at most up to its share
of the site's limit per window (the rest in their metrics only).

A reason the site owner fixes in the tag also has its most recent offending value in the period
(`refused_values`: the event's domain for `site_mismatch` and an `invalid_event` domain, the page's
origin for `origin_not_allowed`; collector/refusals.py bounds them), and the status names the site's
registered origins (None for an unregistered domain), so the owner can tell what to add or change.

A site that reached TALLY_DIMENSION_CAP (ADR 46) sees it in `capped`: per local day of the last CAPPED_DAYS and
dimension that hit the cap, how many events were counted as '(other)' there (from `rollup_dim_1d`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from psycopg_pool import ConnectionPool

from core.config import ROLLUP_GROUP
from oltp.rows import one

PERIODS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24)}
# Reasons no request carrying a site's registered key can have: never that site's refusals.
NOT_A_SITES_REFUSAL = ("missing_site_key", "unknown_site_key", "registry_unavailable")
_QUARTER = 900
CAPPED_DAYS = 7
OTHER = "(other)"  # oltp.rollup_dims.OTHER


@dataclass(frozen=True, slots=True)
class CappedDimension:
    """A dimension that hit the cap on a local day: `events` (non-bot) were counted as '(other)' there."""

    dimension: str
    day_start: datetime  # the local day's start in the site's zone
    events: int


@dataclass(frozen=True, slots=True)
class PeriodStatus:
    since: datetime
    accepted: int
    bots: int
    late: int
    refused: dict[str, int] = field(default_factory=dict)  # reason -> events
    refused_values: dict[str, str] = field(default_factory=dict)  # reason -> its most recent offending value


@dataclass(frozen=True, slots=True)
class IngestionStatus:
    periods: dict[str, PeriodStatus]
    last_event_at: datetime | None  # when the newest accepted event of the domain arrived
    customer_store_written_at: datetime | None  # the rollup worker's last commit
    origins: tuple[str, ...] | None = None  # the site's registered page origins; None: not registered
    capped: tuple[CappedDimension, ...] = ()  # newest day first, then by dimension


def _floor_quarter(t: datetime) -> datetime:
    return datetime.fromtimestamp(int(t.timestamp()) // _QUARTER * _QUARTER, tz=t.tzinfo)


def ingestion_status(pool: ConnectionPool, domain: str, now: datetime) -> IngestionStatus:
    periods: dict[str, PeriodStatus] = {}
    with pool.connection() as conn:
        for name, length in PERIODS.items():
            since = _floor_quarter(now - length) + timedelta(seconds=_QUARTER)
            accepted, bots, late = one(conn.execute(
                "SELECT COALESCE(sum(accepted), 0), COALESCE(sum(bots), 0), COALESCE(sum(late), 0)"
                " FROM ingestion_15m WHERE domain = %s AND bucket_start >= %s", (domain, since)))
            refused: dict[str, int] = dict(conn.execute(
                "SELECT reason, sum(events)::bigint FROM collector_refusals"
                " WHERE domain = %s AND bucket_start >= %s AND reason <> ALL(%s) GROUP BY reason ORDER BY reason",
                (domain, since, list(NOT_A_SITES_REFUSAL))).fetchall())
            values: dict[str, str] = dict(conn.execute(
                "SELECT DISTINCT ON (reason) reason, value FROM collector_refusals WHERE domain = %s"
                " AND bucket_start >= %s AND value IS NOT NULL AND reason <> ALL(%s)"
                " ORDER BY reason, bucket_start DESC",
                (domain, since, list(NOT_A_SITES_REFUSAL))).fetchall())
            periods[name] = PeriodStatus(since, int(accepted), int(bots), int(late), refused, values)
        site = conn.execute("SELECT origins FROM sites WHERE domain = %s", (domain,)).fetchone()
        (last,) = one(conn.execute("SELECT max(last_received_at) FROM ingestion_15m WHERE domain = %s",
                                   (domain,)))
        (written,) = one(conn.execute("SELECT max(updated_at) FROM consumer_offsets WHERE consumer_group = %s",
                                      (ROLLUP_GROUP,)))
        capped = tuple(CappedDimension(d, day, int(n)) for d, day, n in conn.execute(
            "SELECT dimension, bucket_start, sum(events) FROM rollup_dim_1d WHERE domain = %s AND key = %s"
            " AND bucket_start >= %s GROUP BY 1, 2 ORDER BY 2 DESC, 1",
            (domain, OTHER, now - timedelta(days=CAPPED_DAYS + 1))).fetchall())
    return IngestionStatus(periods, last, written, None if site is None else tuple(site[0] or ()), capped)
