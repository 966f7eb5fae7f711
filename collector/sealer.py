"""The collector's timer: seal idle spool segments so they ship, and spool the refusal counts.

Each collector process counts its refusals in memory (collector/refusals.py) and spools them every
REFUSALS_FLUSH_S as count records (core.event.refusal_count_json) for registered domains only. The
`Sealer` thread does that and seals a segment once it is TALLY_SPOOL_SEGMENT_AGE_S old, each round under
a lock and only while not stopped. `Sealer.stop` takes that lock (so it waits for a round under way,
however long), marks the sealer stopped and spools the counts once more: so once a worker has stopped
it and sealed its spool, nothing of it writes again or opens another segment, even if the thread is
still alive.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from flask import Flask

from collector.site_limits import RefusalCounter
from core.event import refusal_count_json
from spool.segments import SpoolWriter

log = logging.getLogger(__name__)

REFUSALS_FLUSH_S = 5.0  # how often each collector process spools its refusal counts
STOP_TIMEOUT_S = 10.0  # at most this for the thread to end once stopped (it cannot write after stop())


def flush_refusals(app: Flask) -> int:
    """Spool this process's refusal counts as count records (core.event.refusal_count_json), for the
    registered domains only (a made-up domain is nobody's to see); returns how many were written.
    If the spool refuses them, they are kept for the next flush."""
    refusals: RefusalCounter = app.extensions["tally_refusals"]
    counts, values = refusals.take_noted()
    sites = app.extensions["tally_registry"].snapshot()
    known = sites.by_domain if sites is not None else {}
    now = datetime.now(UTC)
    mine = {(d, r): n for (d, r), n in counts.items() if d is not None and d in known}
    if not mine:
        return 0
    try:
        app.extensions["tally_spool"].append(
            refusal_count_json(domain, reason, n, now, values.get((domain, reason)))
            for (domain, reason), n in sorted(mine.items()))
    except OSError:
        back: dict[tuple[str | None, str], int] = {k: n for k, n in mine.items()}  # widens the key type
        refusals.restore(back, {k: v for k, v in values.items() if k in back})
        raise
    return len(mine)


class Sealer:
    """A daemon thread: every min(period_s / 2, REFUSALS_FLUSH_S), seal a stale segment of `spool`, and
    every REFUSALS_FLUSH_S spool `app`'s refusal counts."""

    def __init__(self, app: Flask, spool: SpoolWriter, period_s: float) -> None:
        self.app = app
        self.spool = spool
        self.period_s = period_s
        self._stopping = threading.Event()  # wakes the thread's wait
        self._lock = threading.Lock()  # held for each round of work and by stop(); guards _stopped
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="spool-sealer", daemon=True)

    def start(self) -> Sealer:
        self._thread.start()
        return self

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._stopping.wait(min(self.period_s / 2, REFUSALS_FLUSH_S)):
            with self._lock:
                if self._stopped:
                    return
                try:
                    if time.monotonic() - last_flush >= REFUSALS_FLUSH_S:
                        last_flush = time.monotonic()
                        flush_refusals(self.app)
                    self.spool.seal_if_stale()
                except OSError:
                    log.exception("spool: sealing or spooling refusal counts failed")

    def stop(self) -> None:
        """Stop the thread's work (waiting for a round under way, if any), then spool the counts so far
        once more. Call it before the spool is closed: once it returns, nothing of this sealer writes to
        the spool, whether or not the thread has ended yet."""
        self._stopping.set()
        with self._lock:
            self._stopped = True
            try:
                flush_refusals(self.app)
            except OSError:
                log.exception("spool: spooling the refusal counts at shutdown failed")
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
