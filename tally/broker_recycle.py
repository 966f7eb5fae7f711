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

`tally up` therefore restarts the broker when a partition holds `TALLY_BROKER_RECYCLE_RECORDS` records (records >=
batches; every ~11 minutes at 8,000 events/s in the soak, ~70 at 300). A restart is what a broker crash already
does on the embedded stack, and the same protocol makes it lossless (ADR 16, ADR 28): the topic comes back at once
with a new topic id; the shipper ships again every retained spool segment not yet stored by both consumer groups;
the consumers see the new id within a second and seek to their stored offsets of the new incarnation (none: the
beginning); the stores count each event hash once. What could break that is a retained segment that is gone: the
spool's byte cap (`TALLY_SPOOL_RETAIN_BYTES`) evicts segments when a group is far behind, and a group whose offsets
the shipper cannot read is covered only by time (`TALLY_SPOOL_RETAIN_S`). So the broker is recycled only when both
groups' stored offsets are known, each group is at most `MAX_LAG_SHARE` of the threshold behind the end (summed
over the partitions), and every spool's retained segments take at most half of the byte cap (far from where it
evicts segments a group has not stored). Otherwise it waits, and says why once a minute.

Waiting has a limit: a group stalled for an hour (a store down) would take the partition past the point where
fetches return nothing, and then neither group reads anything again and nothing can catch up. At
`FORCE_FACTOR` times the threshold the broker is recycled whatever the lag, with an error in the log: what
the lagging group had not read is then lost only where the spool evicted it over its byte cap (ADR 16's
bound, which a broker crash has too), while the healthy group goes on.

Checks run on a thread of their own (probes may take seconds); the restart itself runs on the supervising
thread (`take_due`), the only one whose children get PR_SET_PDEATHSIG right.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

CHECK_EVERY_S = 15.0
MAX_LAG_SHARE = 0.25  # a group may be this share of the threshold behind the end, in records, and still recycle
FORCE_FACTOR = 3  # at this many times the threshold, recycle whatever the lag (below tansu's ~60,000-batch cliff,
# which comes earlier on a busy machine: the listing's deadline is wall-clock time)
PROBE_TIMEOUT_S = 5.0
QUIET_LOG_S = 60.0
FORCED = "recycled anyway"


def recycle_verdict(broker: Mapping[str, Any], lags: Mapping[str, Mapping[str, Any]] | None, limit: int,
                    spools: Mapping[str, Mapping[str, Any]] | None = None, retain_bytes: int = 0) -> tuple[bool, str]:
    """Whether to recycle now, and why (or why not). `broker`: `tally status`'s broker probe (state,
    end_offsets); `lags`: its lag per group (state "ok" with a total, or unknown with a detail), None when not
    asked yet (the end offsets alone decide that asking is needed); `spools`: its spool probes (retained_bytes)
    and `retain_bytes` the byte cap (0: none). Pure."""
    if limit <= 0:
        return False, "recycling is off"
    found = _fullest(broker)
    if found is None:
        return False, "the broker's end offsets are unknown"
    partition, fullest = found
    if fullest < limit:
        return False, f"partition {partition} holds {fullest:,} records, under {limit:,}"
    held = f"partition {partition} holds {fullest:,} records (TALLY_BROKER_RECYCLE_RECORDS={limit:,})"
    if lags is None:
        return False, f"{held}: the consumer groups' lag is not known yet"
    wait = _reason_to_wait(lags, int(limit * MAX_LAG_SHARE), spools or {}, retain_bytes)
    if wait is None:
        return True, held
    if fullest >= FORCE_FACTOR * limit:
        return True, (f"{held}, {FORCE_FACTOR} times the threshold, although {wait}: {FORCED} before its "
                      "fetches return nothing; what that group had not read is lost where the spool evicted it")
    return False, f"{held}, but {wait}"


def _fullest(broker: Mapping[str, Any]) -> tuple[str, int] | None:
    """(partition, end offset) of the partition holding the most records, None when the probe has no end offsets."""
    ends = {str(p): int(e) for p, e in (broker.get("end_offsets") or {}).items()}
    if broker.get("state") != "up" or not ends:
        return None
    return max(ends.items(), key=lambda kv: (kv[1], kv[0]))


def over_limit(broker: Mapping[str, Any], limit: int) -> bool:
    """Whether a partition holds `limit` records or more: what makes a check ask the groups' lag and the spools."""
    found = _fullest(broker)
    return limit > 0 and found is not None and found[1] >= limit


def _reason_to_wait(lags: Mapping[str, Mapping[str, Any]], most: int, spools: Mapping[str, Mapping[str, Any]],
                    retain_bytes: int) -> str | None:
    for group, lag in sorted(lags.items()):
        if lag.get("state") != "ok" or lag.get("total") is None:
            return f"{group}'s stored offsets are unknown ({lag.get('detail') or 'no answer'})"
        if int(lag["total"]) > most:
            return f"{group} is {int(lag['total']):,} records behind (at most {most:,})"
    for name, spool in sorted(spools.items()):
        retained = spool.get("retained_bytes")
        if retained is None:
            return f"the {name} spool's retained segments are unknown ({spool.get('detail') or 'no answer'})"
        if retain_bytes > 0 and int(retained) > retain_bytes // 2:
            return f"the {name} spool retains {int(retained):,} bytes, over half of TALLY_SPOOL_RETAIN_BYTES"
    return None


Probe = Callable[[bool], "Probed"]


class Probed(NamedTuple):
    """What a check read: the broker probe; and, when asked, the lags per group and the spools."""
    broker: dict[str, Any]
    lags: dict[str, Any] | None = None
    spools: dict[str, Any] | None = None


class BrokerRecycler:
    """Decides, off the supervising thread, when the embedded broker is due for a restart (module docstring).

    `probe(ask_lags)` reads what `recycle_verdict` needs, as `tally status` reads it (the lags and spools only
    when asked: when the end offsets alone are over the limit). `maybe_check(pid)` starts a check every `every_s`
    (one at a time) of the broker whose process is `pid`; `take_due()` returns (pid, reason) once a check said
    yes, and clears it: the caller recycles only if that pid is still the broker's (a verdict may be seconds
    old, and the broker may have crashed and come back meanwhile)."""

    def __init__(self, limit: int, probe: Probe, *, retain_bytes: int = 0, every_s: float = CHECK_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.probe = probe
        self.retain_bytes = retain_bytes
        self.every_s = every_s
        self.clock = clock
        self._next = clock() + every_s
        self._busy = threading.Lock()
        self._lock = threading.Lock()
        self._due: tuple[int, str] | None = None
        self._last_log = float("-inf")

    def maybe_check(self, pid: int | None) -> None:
        if self.limit <= 0 or pid is None or self.clock() < self._next or not self._busy.acquire(blocking=False):
            return
        self._next = self.clock() + self.every_s
        threading.Thread(target=self._check, args=(pid,), name="broker-recycle-check", daemon=True).start()

    def _check(self, pid: int) -> None:
        try:
            if not over_limit(self.probe(False).broker, self.limit):
                return
            found = self.probe(True)
            due, why = recycle_verdict(found.broker, found.lags, self.limit, found.spools, self.retain_bytes)
            if not due:
                if self.clock() - self._last_log >= QUIET_LOG_S:
                    self._last_log = self.clock()
                    log.warning("embedded broker not recycled yet: %s", why)
                return
            if FORCED in why:
                log.error("embedded broker: %s", why)
            with self._lock:
                self._due = (pid, why)
        except Exception:
            log.exception("checking whether the embedded broker is due for a restart failed")
        finally:
            self._busy.release()

    def take_due(self) -> tuple[int, str] | None:
        with self._lock:
            due, self._due = self._due, None
        return due


def status_probe(settings: Any, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """The probe `BrokerRecycler` calls: `tally status`'s own probes of the broker, of both stores' stored
    offsets (the analyst server's internal route for chDB) and of every collector host's spool, for the stack
    `settings` describes."""
    from core.config import LOADER_GROUP, ROLLUP_GROUP
    from tally import cmd_status as st

    def probe(ask_lags: bool) -> Probed:
        t = st.targets(settings)
        broker = st.probe_broker(t.bootstrap, t.topic, timeout_s)
        if not ask_lags:
            return Probed(broker)
        pg = st.probe_postgres(t.pg_dsn, t.topic, timeout_s)
        ch = st.probe_clickhouse(t.urls["analyst"], t.internal_token, timeout_s, t.topic)
        lags = {ROLLUP_GROUP: st.lag_of("postgresql", pg, broker, t.topic),
                LOADER_GROUP: st.lag_of("clickhouse", ch, broker, t.topic)}
        return Probed(broker, lags, {name: st.probe_spool(path) for name, path in st.spools_of(t).items()})

    return probe
