"""The consumer loop's writer: one write in flight, the next batch gathered meanwhile (ADR 14, ADR 27).

Like Arroyo's run-task-in-threads step with one slot: `add` merges decoded batches into the one being
gathered and hands it to a single writer thread when that thread is free and the last write started at
least `min_interval_s` ago (or the batch reached `max_batch` records, or pipelining is off), so a slower
store gets bigger, cheaper batches, and a busy one at most a write per interval (ADR 65). Batches
are stored in log order, each with its own offsets (`Sink.write`), through `write_isolating`: the
records the store refuses for good are set aside with the sink's own rule (`Sink.is_permanent`).

A failed write is raised by the next `finish` (so by `flush`, and by `add` when it hands over), which
also drops what was gathered after it: the caller rewinds to the stored offsets and reads it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from core import metrics
from core.batch import Batch
from workers.isolate import write_isolating
from workers.limits import MAX_BATCH
from workers.sink import Sink

log = logging.getLogger(__name__)


class PipelinedWriter:
    """Stores a sink's batches from one writer thread, one at a time, while the caller gathers the next."""

    def __init__(self, sink: Sink, *, pipelined: bool = True, max_batch: int = MAX_BATCH, min_interval_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.pipelined = pipelined  # False: every batch is stored before `add` returns
        self.max_batch = max_batch  # records per write at most (bounds memory with max_poll_records)
        # A write starts at most this often (from the start of the one before) unless the batch is full: each
        # store write costs a fixed part (a transaction and its commit; a ClickHouse part and its merges).
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._last_start = float("-inf")
        self.stored_events = 0
        self.stored_rejects = 0
        self.gathering: Batch | None = None  # polled and decoded, not yet handed to the writer thread
        self.in_flight: tuple[Batch, Future[Batch]] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def busy(self) -> bool:
        """A write is in flight and not finished yet."""
        return self.in_flight is not None and not self.in_flight[1].done()

    def wait_s(self) -> float:
        """Seconds until the next write may start by the interval (0: now; the writer may still be busy)."""
        return max(0.0, self._last_start + self.min_interval_s - self.clock())

    @property
    def free(self) -> bool:
        """No write in flight, and the interval since the last one started is over."""
        return not self.busy and self.wait_s() <= 0

    def add(self, batch: Batch) -> None:
        """Gather `batch` after what is held; hand it all over if the writer is `free`, or the held batch
        reached `max_batch`, or pipelining is off."""
        if self.gathering is None:
            self.gathering = batch
        else:
            self.gathering.merge(batch)
        if self.free or len(self.gathering) >= self.max_batch or not self.pipelined:
            self.hand_over()

    def hand_over_if_free(self) -> None:
        """Records gathered while the writer was busy (or within the interval) go to it once it is `free`."""
        if self.gathering is not None and self.free:
            self.hand_over()

    def drop_gathered(self) -> None:
        """Forget what was gathered (it is read again from the stored offsets)."""
        self.gathering = None

    def hand_over(self) -> None:
        self.finish()  # one write in flight at most, in log order
        batch, self.gathering = self.gathering, None
        if batch is None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.sink.name}-writer")
        self._last_start = self.clock()
        self.in_flight = (batch, self._executor.submit(self.write, batch))
        if not self.pipelined:
            self.finish()

    def flush(self) -> None:
        """Store everything gathered so far; raise the failure of any write."""
        self.hand_over()
        self.finish()

    def finish(self) -> None:
        """Wait for the write in flight; count it, or raise its failure (dropping what was gathered since)."""
        if self.in_flight is None:
            return
        batch, future = self.in_flight
        try:
            batch = future.result() or batch  # what was stored, refused records set aside included
        except BaseException:
            self.gathering = None  # polled after the failed batch: re-read after the rewind
            raise
        finally:
            self.in_flight = None
        self.stored_events += len(batch.events)
        self.stored_rejects += len(batch.rejected)
        if batch.rejected:
            log.warning("%s: rejected %d malformed records (first: %s)", self.sink.name,
                        len(batch.rejected), batch.rejected[0].error)

    def write(self, batch: Batch) -> Batch:
        """Store `batch` (in the writer thread); records the store refuses for good are set aside
        (workers/isolate.py). Logs one line per committed batch (group, offsets per partition, events,
        rejected, duration)."""
        sink = self.sink
        t0 = time.monotonic()
        stored = write_isolating(sink.write, batch, permanent=sink.is_permanent) or batch
        metrics.observe_write(sink.group, len(batch), time.monotonic() - t0)
        log.info("%s: committed batch", sink.name, extra={
            "group": sink.group, "store": sink.name, "topic": batch.topic, "topic_id": batch.topic_id,
            "offsets": {p: [stored.first_offsets.get(p), o] for p, o in sorted(stored.next_offsets.items())},
            "events": len(stored.events), "rejected": len(stored.rejected), "counts": len(stored.counts),
            "duration_ms": round((time.monotonic() - t0) * 1000, 2)})
        return stored

    def close(self) -> None:
        """Drop what was gathered and stop the writer thread (the caller has settled the write in flight)."""
        self.gathering = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
