"""The consumer groups' stored offsets, as the shipper's retention reads them (ADR 16, 28, 56).

Reading them is a round trip to PostgreSQL and one to the analyst server (the loader's offsets in chDB),
which under load can take a second or more; done in the shipping thread, every retention pass held every
new line back that long (freshness, ADR 56). So a running shipper reads them in a background thread and
retention decides with the last answer for the current topic incarnation: at most one retention interval
old, which is safe, since a group's stored offsets only grow within an incarnation (a stale answer drops
less, never more; `tally replay` rewinds re-read from Kafka, which still holds the records), and no
answer yet means "nothing known stored" (everything kept). Called directly (tests, the last pass), it reads
synchronously, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)

Stored = dict[str, dict[int, int]]  # group -> {partition: next offset stored}


class StoredOffsets:
    def __init__(self, read: Callable[[str], Stored]) -> None:
        self._read = read  # topic id -> stored offsets of every group that can be asked; raises if it cannot
        self.background = False  # set by Shipper.run: read in a thread, answer with the last read
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[tuple[str, Stored | None]] | None = None
        self._last: tuple[str, Stored] | None = None

    def get(self, topic_id: str) -> Stored | None:
        """The stored offsets for incarnation `topic_id`; None when unknown (unreadable, or not read yet)."""
        if not self.background:
            return self._safe_read(topic_id)
        with self._lock:
            if self._future is None or self._future.done():
                if self._future is not None:
                    read_for, result = self._future.result()
                    if result is not None:
                        self._last = (read_for, result)
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stored-offsets")
                self._future = self._executor.submit(lambda: (topic_id, self._safe_read(topic_id)))
            last = self._last
        return last[1] if last is not None and last[0] == topic_id else None

    def _safe_read(self, topic_id: str) -> Stored | None:
        try:
            return self._read(topic_id)
        except Exception as exc:
            log.info("shipper: cannot read stored offsets (%s); keeping shipped segments", exc)
            return None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.background = False
