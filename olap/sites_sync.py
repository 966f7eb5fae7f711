"""Keep `<db>.sites` in ClickHouse a copy of the sites registry (docs/adr/0052-analyst-dimensions.md).

`SitesSync.run` reads the registry through a callable (the composition root hands it one reading
PostgreSQL: olap/ does not import oltp/) every `interval_s` and inserts the rows that changed since
the last pass, each with a newer `synced_at`, into a ReplacingMergeTree keyed by domain: one insert is
one part, so readers (with FINAL; the analyst endpoint reads with `final = 1`) see either the old or the
new row of a site, never none. A domain no longer in the registry gets a row with `removed_at` set and
its other columns as they were: its events stay, and analysts can still tell whose they were. A domain
registered again is a new registration (removed_at NULL, its new registered_at).

What was written is remembered, so an unchanged registry costs one PostgreSQL read per pass and no
ClickHouse work; ClickHouse's rows are read again after a failure (and at start). Several processes
syncing at once (one per loader) write the same rows: harmless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

COLUMNS = ("domain", "account", "tz", "keep_query", "raw_urls", "registered_at", "updated_at", "removed_at",
           "synced_at")
MAX_BACKOFF_S = 60.0


def utc_ms(value: datetime) -> datetime:
    """`value` in UTC, cut to the millisecond as DateTime64(3) keeps it (a naive value is taken as UTC)."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.replace(microsecond=aware.microsecond // 1000 * 1000)


@dataclass(frozen=True, slots=True)
class SiteRow:
    """What analysts see of one site (never its key or secret)."""

    domain: str
    account: str | None
    tz: str
    keep_query: tuple[str, ...]
    raw_urls: bool
    registered_at: datetime
    updated_at: datetime
    removed_at: datetime | None = None

    def normalised(self) -> SiteRow:
        """Times as ClickHouse gives them back, so that an unchanged site compares equal."""
        return replace(self, keep_query=tuple(self.keep_query), raw_urls=bool(self.raw_urls),
                       registered_at=utc_ms(self.registered_at), updated_at=utc_ms(self.updated_at),
                       removed_at=None if self.removed_at is None else utc_ms(self.removed_at))


class SitesSync:
    def __init__(self, read: Callable[[], Sequence[SiteRow]], client: Client, database: str,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._read = read
        self._client = client
        self._table = f"{database}.sites"
        self._now = now
        self._written: dict[str, SiteRow] | None = None  # domain -> the row ClickHouse has; None: read it
        self._version = datetime.min.replace(tzinfo=UTC)

    def _load(self) -> dict[str, SiteRow]:
        rows = self._client.query(f"SELECT {', '.join(COLUMNS)} FROM {self._table} FINAL").result_rows
        written = {}
        for domain, account, tz, keep, raw, registered, updated, removed, synced in rows:
            written[domain] = SiteRow(domain, account, tz, tuple(keep), bool(raw), registered, updated,
                                      removed).normalised()
            self._version = max(self._version, utc_ms(synced))
        return written

    def sync_once(self) -> int:
        """One pass: insert what changed in the registry since the last one; returns the rows inserted."""
        if self._written is None:
            self._written = self._load()
        written = self._written
        wanted = {row.domain: replace(row.normalised(), removed_at=None) for row in self._read()}
        now = utc_ms(self._now())
        changed = [row for domain, row in wanted.items() if written.get(domain) != row]
        changed += [replace(row, removed_at=now) for domain, row in written.items()
                    if domain not in wanted and row.removed_at is None]
        if not changed:
            return 0
        self._version = max(now, self._version + timedelta(milliseconds=1))  # newer than any row it replaces
        self._client.insert(self._table, [[r.domain, r.account, r.tz, list(r.keep_query), r.raw_urls, r.registered_at,
                                           r.updated_at, r.removed_at, self._version] for r in changed],
                            column_names=list(COLUMNS))
        written.update((r.domain, r) for r in changed)
        return len(changed)

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Sync now and every `interval_s` until `stop` is set. A failed pass is logged once per failing
        streak and retried with a growing delay (up to MAX_BACKOFF_S)."""
        delay, failing = interval_s, False
        while True:
            try:
                self.sync_once()
                if failing:
                    log.info("sites sync: %s is in sync again", self._table)
                delay, failing = interval_s, False
            except Exception as exc:
                if not failing:
                    reason = (str(exc).strip().splitlines() or [""])[0][:200]
                    log.warning("sites sync: could not copy the registry to %s (retrying): %s: %s", self._table,
                                type(exc).__name__, reason)
                failing, self._written = True, None
                delay = min(MAX_BACKOFF_S, max(delay * 2, interval_s))
            if stop.wait(delay):
                return
