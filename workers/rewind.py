"""Rewinds: a running consumer group re-reads the topic from lower offsets on request (`tally replay`).

The groups' offsets live in their own stores (ADR 5) and their positions in the workers' memory, so
a replay is a request the running workers pick up: `Rewinder.check` runs inside the consumer loop
every `check_s` seconds (workers/consumer.py). For the rows of the partitions this worker holds it

1. stores everything polled so far (`loop.flush()`): the position is then exactly what was processed;
2. records that position as the row's `reread_until` (durable): records below it were processed before;
3. stores the lower offset in the group's own store (`sink.store_rewound_offsets`), so a restart or a
   rebalance in the middle of the replay resumes it instead of skipping it;
4. seeks, and acknowledges the row (`applied`). A row whose offset is ahead of the position is
   refused (it would skip records), one of an older topic incarnation is `stale`.

Records below `reread_until` are a *re-read*: `Rewinder.decode` marks their batch (`Batch.replay`), so
the loader's insert-deduplication token differs from the first read's and rows deleted from
ClickHouse are inserted again (ReplacingMergeTree + `final` hide the duplicates of rows still there).
With `reread_floor_days` (the rollup group: PostgreSQL's dedup window, ADR 18), re-read events and
refusal counts older than the window are dropped before the sink sees them: they were counted on
the first read, and their hashes may have left `seen_events`, so counting them again would count
them twice. PostgreSQL rollups that old are rebuilt from ClickHouse (`tally rebuild`), not replayed.

The request store is unreachable? The check logs it and tries again later; the worker goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from kafka import KafkaConsumer, TopicPartition

from core.batch import Batch
from workers.incarnation import IncarnationWatch
from workers.sink import Sink

log = logging.getLogger(__name__)


class RewindRow(Protocol):
    id: int
    request_id: str
    partition: int
    next_offset: int
    topic_id: str


class RewindRequests(Protocol):
    """Where rewind requests are kept (oltp/rewinds.py `PostgresRewinds`)."""

    def pending(self, group: str, topic: str) -> list[Any]: ...
    def reread_marks(self, group: str, topic: str, topic_id: str) -> dict[int, tuple[int, int]]: ...
    def mark_rereading(self, rows: list[Any], reread_until: dict[int, int]) -> None: ...
    def acknowledge(self, ids: list[int], outcome: str) -> None: ...
    def close(self) -> None: ...


Polled = dict[TopicPartition, list[Any]]  # what KafkaConsumer.poll returns: ConsumerRecords per partition
Decoder = Callable[[str, str, Polled], Batch]


class RewindTarget(Protocol):
    """What `Rewinder.check` needs of the consumer loop (workers/consumer.py `ConsumerLoop`)."""

    consumer: KafkaConsumer
    topic: str
    sink: Sink
    watch: IncarnationWatch

    @property
    def topic_id(self) -> str: ...

    def flush(self) -> None: ...


class MarksUnavailable(RuntimeError):
    """The re-read marks could not be read, so the rollup group cannot tell re-reads apart (temporary)."""


class Rewinder:
    """Applies rewind requests for one consumer group inside its loop, and marks re-read batches."""

    def __init__(self, requests: RewindRequests, group: str, *, check_s: float = 2.0,
                 reread_floor_days: float | None = None) -> None:
        self.requests = requests
        self.group = group
        self.check_s = check_s
        self.reread_floor_days = reread_floor_days
        self._next_check = 0.0
        self._marks: dict[int, tuple[int, int]] = {}  # partition -> (reread_until, newest row id)
        self._marks_topic_id: str | None = None
        self._failures = 0  # consecutive failed checks (backoff)
        self.applied = 0  # rows applied by this worker
        self.skipped_old = 0  # re-read events/counts not handed to the sink (older than the floor)

    def due(self) -> bool:
        return time.monotonic() >= self._next_check

    def check(self, loop: RewindTarget) -> int:
        """Apply the pending rows of the partitions `loop` holds; refresh the re-read marks.

        Returns the rows applied. A store failure while storing (flush, lower offsets) is raised, like
        any write failure of the loop (it pauses and resumes from the stored offsets; the row stays
        pending and is applied again). An unreachable request store is logged and tried again later.
        """
        self._next_check = time.monotonic() + self.check_s
        assignment = {tp.partition: tp for tp in loop.consumer.assignment()}
        if not assignment or loop.watch.unnamed:
            return 0
        try:
            rows = [r for r in self.requests.pending(self.group, loop.topic) if r.partition in assignment]
            self._failures = 0
            if not rows:
                self._refresh_marks(loop.topic, loop.topic_id)
                return 0
        except Exception as exc:
            # Back off (up to a minute): a connection attempt to an unreachable store may block the loop.
            self._failures += 1
            wait = min(60.0, self.check_s * 2 ** min(self._failures, 6))
            self._next_check = time.monotonic() + wait
            log.warning("%s: cannot read rewind requests (%s: %s); trying again in %.0fs", self.group,
                        type(exc).__name__, exc, wait)
            return 0
        loop.flush()  # positions are now exactly what was processed and stored
        newest: dict[int, Any] = {}
        for row in rows:  # several requests for one partition: the newest wins
            older = newest.get(row.partition)
            if older is not None:
                self.requests.acknowledge([older.id], f"superseded by rewind row {row.id}")
            newest[row.partition] = row
        apply: list[Any] = []
        positions: dict[int, int] = {}
        for p, row in sorted(newest.items()):
            position = loop.consumer.position(assignment[p])
            if row.topic_id and loop.topic_id and row.topic_id != loop.topic_id:
                self.requests.acknowledge([row.id], f"stale: topic {loop.topic} was recreated since the request "
                                          f"(incarnation {row.topic_id} -> {loop.topic_id})")
            elif row.next_offset > position:
                self.requests.acknowledge([row.id], f"refused: offset {row.next_offset} is ahead of this group's "
                                          f"position {position} on partition {p} (it would skip records)")
            else:
                apply.append(row)
                positions[p] = position
        if not apply:
            self._refresh_marks(loop.topic, loop.topic_id)
            return 0
        offsets = {row.partition: row.next_offset for row in apply}
        self.requests.mark_rereading(apply, positions)
        loop.sink.store_rewound_offsets(loop.topic, loop.topic_id, offsets)
        for p, offset in offsets.items():
            loop.consumer.seek(assignment[p], offset)
        self.requests.acknowledge([row.id for row in apply], "applied")
        self.applied += len(apply)
        log.info("%s: rewound %s (re-reading up to %s)", self.group, offsets, positions)
        self._marks_topic_id = None
        self._refresh_marks(loop.topic, loop.topic_id)
        return len(apply)

    def _refresh_marks(self, topic: str, topic_id: str) -> bool:
        try:
            self._marks = self.requests.reread_marks(self.group, topic, topic_id)
            self._marks_topic_id = topic_id
            return True
        except Exception as exc:
            log.warning("%s: cannot read rewind marks (%s: %s)", self.group, type(exc).__name__, exc)
            return False

    def floor(self) -> datetime | None:
        """Re-read events with an event time before this are not handed to the sink (None: all are)."""
        if self.reread_floor_days is None:
            return None
        return datetime.now(UTC) - timedelta(days=self.reread_floor_days)

    def decode(self, decode: Decoder, topic: str, topic_id: str, records: Polled) -> Batch:
        """`decode(topic, topic_id, records)`, with the records below the re-read marks marked and filtered.

        The marks of an incarnation are read before its first records are decoded (so a worker restarted
        in the middle of a replay keeps the guard). With a floor (the rollup group), marks that cannot be
        read raise `MarksUnavailable`: the loop pauses and re-reads from its stored offsets.
        """
        if self._marks_topic_id != topic_id and not self._refresh_marks(topic, topic_id):
            if self.reread_floor_days is not None:
                raise MarksUnavailable(f"{self.group}: the rewind marks cannot be read; not storing records "
                                       "that may be re-reads")
            self._marks, self._marks_topic_id = {}, topic_id  # the loader: marks only salt its tokens
        marks = self._marks if self._marks_topic_id == topic_id else {}
        if not marks or not any(msgs and msgs[0].offset < marks.get(tp.partition, (-1, 0))[0]
                                for tp, msgs in records.items()):
            return decode(topic, topic_id, records)
        reread: Polled = {}
        fresh: Polled = {}
        salt = 0
        for tp, msgs in records.items():
            until, row_id = marks.get(tp.partition, (-1, 0))
            old = [m for m in msgs if m.offset < until]
            if old:
                reread[tp] = old
                salt = max(salt, row_id)
            fresh[tp] = [m for m in msgs if m.offset >= until]
        batch = decode(topic, topic_id, reread)
        floor = self.floor()
        if floor is not None:
            kept = [e for e in batch.events if e.ts >= floor]
            counts = [c for c in batch.counts if c.window_end >= floor]
            self.skipped_old += len(batch.events) - len(kept) + len(batch.counts) - len(counts)
            batch.events, batch.counts = kept, counts
        batch.replay = f"rewind-{salt}"
        batch.merge(decode(topic, topic_id, fresh))
        return batch

    def close(self) -> None:
        self.requests.close()
