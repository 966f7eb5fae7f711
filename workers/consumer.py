"""The consumer loop shared by the rollup and loader workers (ADR 38: composed in Arroyo's shape).

Each step does one thing: poll -> decode (bad records become `Rejected`, never
retried) -> sink.write (data, rejects and offsets stored together). Offsets
are never committed to Kafka as the source of truth: on assignment we seek to
what the sink stored. A temporary store failure pauses the loop with backoff
and rewinds to the stored offsets, so nothing is skipped or counted twice.

Writes are pipelined one deep (ADR 14): while one writer thread stores batch N
(in order, one at a time, each with its own offsets), the loop polls and
decodes what follows, merging polls into the next batch while the writer is
busy (up to `max_batch` records), so a slower store gets bigger, cheaper
batches; with a write interval (ADR 65) what arrives within it waits for the
next write. A failed write is reported by the next step, which drops what it
holds and rewinds to the stored offsets; a rebalance (at the revocation) or a
rewind first waits for the write in flight and drops what was not handed over;
an empty poll stores everything first unless an interval holds it, and the end
of a drain always does.

The loop composes small parts: `PipelinedWriter` (workers/pipelined_writer.py: the writer thread,
gathering, isolation of refused records), `IncarnationWatch` (workers/incarnation.py: the topic id the
positions belong to), `LagReporter` (workers/lag.py: the lag gauges) and, when `tally replay` is on,
a `Rewinder` (workers/rewind.py). What it needs of a store is the `Sink` Protocol (workers/sink.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from core.batch import Batch, Rejected
from core.event import REFUSALS_MARK, EventError, decode_refusal_count, decode_stored, decode_stored_many
from core.records import RecordFormatError, is_batch, split_batch
from workers.coordinator_stall import StallWatch
from workers.incarnation import IncarnationWatch
from workers.lag import LagReporter
from workers.limits import MAX_BATCH
from workers.pipelined_writer import PipelinedWriter
from workers.regroup import PartitionWatch
from workers.rewind import Polled, Rewinder
from workers.sink import Sink

__all__ = ["GATHER_POLL_MS", "ConsumerLoop", "Sink", "decode"]

log = logging.getLogger(__name__)


GATHER_POLL_MS = 10  # poll timeout while records wait for the writer (`ConsumerLoop.step`)


# kafka-python is untyped (its classes are Any to mypy), and `subscribe` insists on a subclass.
class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let the write in flight finish before another consumer reads the stored offsets. If it
        # failed, the next step reports it and rewinds. What was gathered is dropped now, not at the next
        # assignment (which kafka-python may deliver several polls later): written in between, it would be
        # stored for partitions another member may already read (held records are routine with a write
        # interval, ADR 65). Also on a lost member: kafka-python's on_partitions_lost comes here.
        self.loop.settle()
        self.loop.writer.drop_gathered()

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.loop.partition_watch.on_assigned(self.loop.consumer, sorted(tp.partition for tp in assigned))
        try:
            self.loop.seek_to_stored(sorted(assigned))
        except Exception as exc:
            log.error("%s: could not read stored offsets (%s); will retry", self.loop.sink.name, exc)
            self.loop.needs_seek = True


def decode(topic: str, topic_id: str, records: Polled) -> Batch:
    """Pure transform from polled records to a Batch (core.event.decode_stored on every event).

    A record is a batched record of many events (core/records.py, docs/record-format.md) or a single
    event (older data on the topic, other producers) or a collector's refusal count. A partition's
    records that hold only well-formed events (the usual case) are decoded in one `decode_stored_many`
    call; otherwise record by record and event by event, which sets the malformed ones apart: a bad
    event inside a batched record alone (its error names its position), a batched record that cannot be
    read as a whole (another format version, a count that does not match) as one rejected record."""
    batch = Batch(topic=topic, topic_id=topic_id)
    for tp, messages in records.items():
        if not messages:
            continue
        partition = tp.partition
        batch.first_offsets.setdefault(partition, messages[0].offset)
        batch.next_offsets[partition] = messages[-1].offset + 1
        values = _event_values(messages)
        if values is not None:
            events = decode_stored_many(values)
            if events is not None:
                batch.events.extend(events)
                continue
        for msg in messages:
            _decode_record(batch, partition, msg.offset, msg.value)
    return batch


def _event_values(messages: list[Any]) -> list[bytes] | None:
    """Every event of `messages` (batched records split), or None if some record needs a closer look
    (no value, a refusal count, an unreadable batched record)."""
    values: list[bytes] = []
    for msg in messages:
        value = msg.value
        if value is None or REFUSALS_MARK in value:
            return None
        if value[:1] == b"{":
            values.append(value)
            continue
        try:
            values.extend(split_batch(value))
        except RecordFormatError:
            return None
    return values


def _decode_record(batch: Batch, partition: int, offset: int, value: bytes | None) -> None:
    """One record into `batch`: its events, its refusal count, or what is rejected of it."""
    if value is None:
        batch.rejected.append(Rejected(partition, offset, "$: empty record value", b""))
        return
    if not is_batch(value):
        _decode_one(batch, partition, offset, value, "")
        return
    try:
        lines = split_batch(value)
    except RecordFormatError as exc:
        batch.rejected.append(Rejected(partition, offset, f"$: {exc}", value))
        return
    for i, line in enumerate(lines):
        _decode_one(batch, partition, offset, line, f" (event {i + 1} of {len(lines)} in the batched record)", i)


def _decode_one(batch: Batch, partition: int, offset: int, value: bytes, where: str, index: int | None = None) -> None:
    try:
        if REFUSALS_MARK in value:  # a collector's refusal count, not an event
            batch.counts.append(decode_refusal_count(value))
        else:
            batch.events.append(decode_stored(value))
    except EventError as exc:
        batch.rejected.append(Rejected(partition, offset, f"{exc}{where}", value, index))
    except Exception as exc:
        batch.rejected.append(Rejected(partition, offset, f"undecodable: {type(exc).__name__}: {exc}{where}",
                                       value, index))


class ConsumerLoop:
    """Poll -> decode -> hand to the writer, for one consumer and one sink; seeks to the stored offsets."""

    def __init__(self, consumer: KafkaConsumer, sink: Sink, topic: str, *,
                 max_backoff_s: float = 10.0, pipelined: bool = True, max_batch: int = MAX_BATCH,
                 consumer_factory: Callable[[], KafkaConsumer] | None = None,
                 min_write_interval_s: float = 0.0) -> None:
        self.consumer = consumer
        # Makes a consumer like `consumer`, for a member kafka-python cannot bring back (coordinator_stall.py).
        self.consumer_factory = consumer_factory
        self.rebuilds = 0
        self.sink = sink
        self.topic = topic
        self.max_backoff_s = max_backoff_s
        self.failures = 0
        self.needs_seek = False  # a write failed or an assignment could not be seeked: seek to stored
        self.writer = PipelinedWriter(sink, pipelined=pipelined, max_batch=max_batch,
                                      min_interval_s=min_write_interval_s)
        self.watch = IncarnationWatch(topic)
        self.partition_watch = PartitionWatch(topic)  # the partitions the group was joined for (ADR 60)
        self.stall_watch = StallWatch(sink.name)  # a member kafka-python left rebalancing (coordinator_stall.py)
        self.lag = LagReporter(sink.group)
        # Applies `tally replay`'s rewind requests and marks re-read batches (workers/rewind.py); None: off.
        self.rewinder: Rewinder | None = None

    @property
    def topic_id(self) -> str:
        """The topic incarnation the positions belong to (the last seek's)."""
        return self.watch.topic_id

    @property
    def stored_events(self) -> int:
        return self.writer.stored_events

    @property
    def stored_rejects(self) -> int:
        return self.writer.stored_rejects

    def subscribe(self) -> None:
        self.consumer.subscribe([self.topic], listener=_SeekToStored(self))

    def regroup(self) -> None:
        """Leave the group and join it again as a new member, so the broker assigns the topic's partitions
        anew (workers/regroup.py: tansu answers a rejoin with the old assignment). What was gathered is dropped
        (re-read from the stored offsets once assigned); the write in flight finishes first."""
        watch = self.partition_watch
        partitions = watch.current(self.consumer)
        log.warning("%s: topic %s now has partitions %s, the group was joined for %s; leaving and joining the "
                    "group again", self.sink.name, self.topic, sorted(partitions), sorted(watch.joined_for))
        self.settle()
        self.writer.drop_gathered()
        self.consumer.unsubscribe()
        watch.rejoining(partitions)
        self.subscribe()

    def rebuild_consumer(self) -> None:
        """Close the consumer and subscribe a new one from `consumer_factory`: a new connection, coordinator
        lookup and join. The write in flight finishes first; what was gathered is dropped (re-read from the
        stored offsets once the new consumer is assigned)."""
        assert self.consumer_factory is not None
        try:
            new = self.consumer_factory()
        except Exception as exc:  # no broker to bootstrap from, say: keep the old one, try again after the bound
            log.warning("%s: could not make a new consumer (%s: %s); keeping the old one", self.sink.name,
                        type(exc).__name__, exc)
            return
        self.settle()
        self.writer.drop_gathered()
        old, self.consumer = self.consumer, new
        self.partition_watch = PartitionWatch(self.topic)
        self.rebuilds += 1
        try:
            old.close(autocommit=False, timeout_ms=2000)
        except Exception as exc:  # a consumer that lost its broker may fail to close; it is dropped either way
            log.warning("%s: closing the old consumer failed (%s: %s)", self.sink.name, type(exc).__name__, exc)
        self.subscribe()

    def seek_to_stored(self, partitions: list[TopicPartition]) -> None:
        self.settle()  # the stored offsets must include the write in flight, if it succeeds
        self.writer.drop_gathered()  # re-read from the stored offsets instead
        topic_id = self.watch.seeking(self.consumer)
        stored = self.sink.committed(self.topic, topic_id, [tp.partition for tp in partitions])
        for tp in partitions:
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)
        log.info("%s: assigned %s, resuming at %s", self.sink.name,
                 [tp.partition for tp in partitions], stored)

    def step(self, timeout_ms: int = 500) -> int:
        """Poll once and hand what came back to the writer. Returns the number of records handled.

        Raises the failure of the previous write, if any (the records of this poll are then
        dropped; the caller marks a rewind). Not pipelined, the batch is stored before returning.
        """
        if not self._positioned(timeout_ms):
            return 0
        if self.rewinder is not None and self.rewinder.due():
            self.rewinder.check(self)
        writer = self.writer
        # Gathered while the writer was busy, and the writer is free now: store it before this poll
        # blocks (up to timeout_ms when the topic is quiet), not after.
        writer.hand_over_if_free()
        records = self.consumer.poll(timeout_ms=self._poll_ms(timeout_ms))
        self.lag.report(self.consumer)
        if self.needs_seek:  # assigned during this poll while the store was down: re-seek first
            writer.drop_gathered()
            writer.finish()
            return 0
        if not records:
            if writer.gathering is None or writer.wait_s() <= 0:  # else held until the interval is over
                writer.flush()
            return 0
        batch = decode(self.topic, self.topic_id, records) if self.rewinder is None else \
            self.rewinder.decode(decode, self.topic, self.topic_id, records)
        writer.add(batch)
        return len(batch)

    def _poll_ms(self, timeout_ms: int) -> int:
        """The poll's timeout. Holding records for a busy writer: come back soon to hand them over, rather than
        block in a poll of a quiet topic for the whole timeout while the writer finishes and idles; for an idle
        writer within its interval, come back when the interval ends (a poll returns early if records come)."""
        writer = self.writer
        if writer.gathering is None:
            return timeout_ms
        if writer.busy:
            return min(timeout_ms, GATHER_POLL_MS)
        return max(1, min(timeout_ms, math.ceil(round(writer.wait_s() * 1000, 6))))

    def _positioned(self, timeout_ms: int) -> bool:
        """Seek where a failure, an unseeked assignment or a new topic incarnation asks for it. False
        while the topic's incarnation is unnamed: the client is kept going (a poll whose records are
        dropped), and the next step seeks again once the new incarnation's id is known."""
        if self.needs_seek:
            self.seek_to_stored(sorted(self.consumer.assignment()))
            self.needs_seek = False
        if self.watch.changed(self.consumer):
            self.watch.changes += 1
            log.warning("%s: topic %s was recreated (topic id %s -> %s); resuming from the new incarnation's "
                        "stored offsets", self.sink.name, self.topic, self.topic_id or "unknown",
                        self.watch.current(self.consumer))
            self.seek_to_stored(sorted(self.consumer.assignment()))
        if self.stall_watch.check(self.consumer) == "rebuild" and self.consumer_factory is not None:
            self.rebuild_consumer()
        if self.partition_watch.due(self.consumer):
            self.regroup()
        if self.watch.unnamed:
            self.consumer.poll(timeout_ms=min(timeout_ms, 200))
            return False
        return True

    def flush(self) -> None:
        """Store everything polled so far; raise the failure of any write."""
        self.writer.flush()

    def finish(self) -> None:
        """Wait for the write in flight; count it, or raise its failure (dropping what was gathered since)."""
        self.writer.finish()

    def settle(self) -> None:
        """Wait for the write in flight; a failure only marks a rewind to the stored offsets."""
        try:
            self.writer.finish()
        except Exception as exc:
            self.failures += 1
            self.needs_seek = True
            log.error("%s: store write failed (%s: %s); resuming from stored offsets",
                      self.sink.name, type(exc).__name__, exc)

    def close(self) -> None:
        """Wait for the write in flight, stop the writer thread, close the consumer and the sink."""
        self.settle()
        self.writer.close()
        self.consumer.close()
        self.sink.close()
        if self.rewinder is not None:
            self.rewinder.close()

    def run(self, stop: threading.Event, drain_on_stop_s: float = 20.0) -> None:
        """Consume until `stop` is set, then drain what is on the topic (at most `drain_on_stop_s`,
        including a group join still in progress): on the embedded broker, records left unconsumed
        at shutdown are gone. `tally up` stops the collector and the shipper first."""
        self.subscribe()
        backoff = 0.2
        while not stop.is_set():
            try:
                self.step()
                backoff = 0.2
            except Exception as exc:
                self.failures += 1
                log.error("%s: store write failed (%s: %s); pausing %.1fs then resuming from stored offsets",
                          self.sink.name, type(exc).__name__, exc, backoff)
                self.needs_seek = True
                stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        try:
            self.drain(timeout_s=drain_on_stop_s, idle_polls=1, poll_ms=300)
        except Exception as exc:
            log.warning("%s: could not drain before stopping (%s)", self.sink.name, exc)
        self.close()

    def drain(self, timeout_s: float = 60.0, idle_polls: int = 3, poll_ms: int = 100) -> int:
        """Consume until `idle_polls` consecutive empty polls of `poll_ms` after reaching the log end (tests,
        backfills). The log end is what decides (`_at_end`); the empty polls only cover tansu's ListOffsets
        quirk, so they need not be long (300 ms polls made every test's drain cost 0.9 s of waiting)."""
        if not self.consumer.subscription():
            self.subscribe()
        deadline = time.monotonic() + timeout_s
        handled = idle = 0
        while time.monotonic() < deadline:
            n = self.step(timeout_ms=poll_ms)  # an empty poll waits for the write in flight (if none is held)
            handled += n
            idle = idle + 1 if n == 0 and self.consumer.assignment() else 0
            if idle >= idle_polls and self._at_end():
                self.flush()  # what an interval still held (ADR 65)
                return handled
        self.flush()
        raise TimeoutError(f"{self.sink.name}: not drained after {timeout_s}s ({handled} records handled)")

    def _at_end(self) -> bool:
        # Necessary, not sufficient, on tansu 0.6: its ListOffsets(latest) is the last batch's base
        # offset + 1, so `drain` also requires consecutive empty polls.
        assignment = self.consumer.assignment()
        if not assignment:
            return False
        ends = self.consumer.end_offsets(list(assignment))
        return all(self.consumer.position(tp) >= ends[tp] for tp in assignment)
