"""Recycle the embedded broker before its memory storage slows every fetch to a stop (ADR 64).

tansu 0.6's memory storage answers every fetch of a partition by listing every batch stored in it
(`dynostore.rs` `fetch`: an object-store list of the partition's prefix, then the wanted offsets), and stops
listing when the fetch's `max_wait` has passed. So a fetch costs ~0.8 us per stored batch here, growing for as
long as the broker runs (it cannot delete records: `delete_records` is `todo!()`), and once listing one
partition takes longer than the consumers' 50 ms fetch wait (~60,000 batches on this machine) a fetch
returns nothing at all and the consumers stop for good. Measured: a tail fetch of one partition took 1.5 ms
at 1,000 stored batches, 13 ms at 20,000, 41 ms at 50,000, and at 100,000 it returned nothing for 2 s; the
30-minute soak at 8,000 events/s stored ~12 batches a second in its busiest partition, and the broker's CPU
per event rose from 14 to 60 us over the run.

`tally up` therefore restarts the broker when a partition holds `TALLY_BROKER_RECYCLE_RECORDS` records
(records >= batches). A restart is what a broker crash already does on the embedded stack, and the same
protocol makes it lossless (ADR 16, ADR 28): the topic comes back at once with a new topic id; the shipper
ships again every retained spool segment not yet stored by both consumer groups; the consumers see the new id
within a second and seek to their stored offsets of the new incarnation (none: the beginning); the stores
count each event hash once. What could break that is a retained segment that is gone: the spool's byte cap
(`TALLY_SPOOL_RETAIN_BYTES`) evicts segments when a group is far behind, and a group whose offsets the
shipper cannot read is covered only by time (`TALLY_SPOOL_RETAIN_S`). So the broker is recycled only when
both groups' stored offsets are known and each is within `MAX_LAG_SHARE` of the threshold of the topic's
end: a lag far below the byte cap. Otherwise it waits (and logs why, once a minute).

Checks run on a thread of their own (probes may take seconds); the restart itself runs on the supervising
thread (`take_due`), the only one whose children get PR_SET_PDEATHSIG right.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

CHECK_EVERY_S = 15.0
MAX_LAG_SHARE = 0.25  # a group may be this share of the threshold behind the end, in records, and still recycle
PROBE_TIMEOUT_S = 5.0
QUIET_LOG_S = 60.0


def recycle_verdict(broker: Mapping[str, Any], lags: Mapping[str, Mapping[str, Any]] | None,
                    limit: int) -> tuple[bool, str]:
    """Whether to recycle now, and why (or why not). `broker`: `tally status`'s broker probe (state,
    end_offsets); `lags`: its lag per group (state "ok" with a total, or unknown with a detail); None when not
    asked yet (the end offsets alone decide that asking is needed). Pure."""
    ends = {str(p): int(e) for p, e in (broker.get("end_offsets") or {}).items()}
    if limit <= 0 or broker.get("state") != "up" or not ends:
        return False, "the broker's end offsets are unknown" if limit > 0 else "recycling is off"
    partition, fullest = max(ends.items(), key=lambda kv: (kv[1], kv[0]))
    if fullest < limit:
        return False, f"partition {partition} holds {fullest:,} records, under {limit:,}"
    held = f"partition {partition} holds {fullest:,} records (TALLY_BROKER_RECYCLE_RECORDS={limit:,})"
    if lags is None:
        return False, f"{held}: the consumer groups' lag is not known yet"
    most = int(limit * MAX_LAG_SHARE)
    for group, lag in sorted(lags.items()):
        if lag.get("state") != "ok" or lag.get("total") is None:
            return False, f"{held}, but {group}'s stored offsets are unknown ({lag.get('detail') or 'no answer'})"
        if int(lag["total"]) > most:
            return False, f"{held}, but {group} is {int(lag['total']):,} records behind (at most {most:,})"
    return True, held


class BrokerRecycler:
    """Decides, off the supervising thread, when the embedded broker is due for a restart (module docstring).

    `probe()` returns (broker probe, lags or None) as `tally status` makes them; `ask_lags` is passed to it
    only when the end offsets alone are over the limit. `maybe_check()` starts a check every `every_s` (one
    at a time); `take_due()` returns the reason once a check said yes, and clears it."""

    def __init__(self, limit: int, probe: Callable[[bool], tuple[dict[str, Any], dict[str, Any] | None]], *,
                 every_s: float = CHECK_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.probe = probe
        self.every_s = every_s
        self.clock = clock
        self._next = clock() + every_s
        self._busy = threading.Lock()
        self._due: str | None = None
        self._last_log = float("-inf")

    def maybe_check(self) -> None:
        if self.limit <= 0 or self.clock() < self._next or not self._busy.acquire(blocking=False):
            return
        self._next = self.clock() + self.every_s
        threading.Thread(target=self._check, name="broker-recycle-check", daemon=True).start()

    def _check(self) -> None:
        try:
            broker, _ = self.probe(False)
            due, why = recycle_verdict(broker, None, self.limit)
            if not due and why.endswith("not known yet"):
                broker, lags = self.probe(True)
                due, why = recycle_verdict(broker, lags, self.limit)
                if not due and self.clock() - self._last_log >= QUIET_LOG_S:
                    self._last_log = self.clock()
                    log.warning("embedded broker not recycled yet: %s", why)
            if due:
                self._due = why
        except Exception:
            log.exception("checking whether the embedded broker is due for a restart failed")
        finally:
            self._busy.release()

    def take_due(self) -> str | None:
        why, self._due = self._due, None
        return why


def status_probe(settings: Any, timeout_s: float = PROBE_TIMEOUT_S) -> Callable[[bool],
                                                                                tuple[dict[str, Any],
                                                                                      dict[str, Any] | None]]:
    """The probe `BrokerRecycler` calls: `tally status`'s own probes of the broker and of both stores' stored
    offsets (the analyst server's internal route for chDB), for the stack `settings` describes."""
    from core.config import LOADER_GROUP, ROLLUP_GROUP
    from tally import cmd_status as st

    def probe(ask_lags: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
        t = st.targets(settings)
        broker = st.probe_broker(t.bootstrap, t.topic, timeout_s)
        if not ask_lags:
            return broker, None
        pg = st.probe_postgres(t.pg_dsn, t.topic, timeout_s)
        ch = st.probe_clickhouse(t.urls["analyst"], t.internal_token, timeout_s, t.topic)
        return broker, {ROLLUP_GROUP: st.lag_of("postgresql", pg, broker, t.topic),
                        LOADER_GROUP: st.lag_of("clickhouse", ch, broker, t.topic)}

    return probe
