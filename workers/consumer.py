"""The consumer loop shared by the rollup and loader workers.

Each step does one thing: poll -> decode (bad records become `Rejected`, never
retried) -> sink.write (data, rejects and offsets stored together). Offsets
are never committed to Kafka as the source of truth: on assignment we seek to
what the sink stored. A temporary store failure pauses the loop with backoff
and rewinds to the stored offsets, so nothing is skipped or counted twice.

Writes are pipelined one deep (ADR 14): while one writer thread stores batch N
(in order, one at a time, each with its own offsets), the loop polls and
decodes what follows, merging polls into the next batch while the writer is
busy (up to `max_batch` records), so a slower store gets bigger, cheaper
batches. A failed write is reported by the next step, which drops what it
holds and rewinds to the stored offsets; a rebalance or a rewind first waits
for the write in flight and drops what was not handed over; an empty poll
(and so the end of a drain) stores everything first.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from core import metrics
from core.batch import Batch, Rejected
from core.event import REFUSALS_MARK, EventError, decode_refusal_count, decode_stored, decode_stored_many
from workers.isolate import is_permanent, write_isolating
from workers.rewind import Rewinder

log = logging.getLogger(__name__)


GATHER_POLL_MS = 10  # poll timeout while records wait for the writer (`ConsumerLoop.step`)


class Sink(Protocol):
    name: str

    def committed(self, topic: str, topic_id: str, partitions: list[int]) -> dict[int, int]: ...
    def write(self, batch: Batch) -> None: ...
    def close(self) -> None: ...


class _SeekToStored(ConsumerRebalanceListener):
    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let the write in flight finish before another consumer reads the stored offsets. If it
        # failed, the next step reports it and rewinds.
        self.loop.settle()

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            self.loop.seek_to_stored(sorted(assigned))
        except Exception as exc:
            log.error("%s: could not read stored offsets (%s); will retry", self.loop.sink.name, exc)
            self.loop._needs_seek = True


def decode(topic: str, topic_id: str, records: dict[TopicPartition, list]) -> Batch:
    """Pure transform from polled records to a Batch (core.event.decode_stored on every value).

    A partition's records that are all well-formed events (the usual case) are decoded in one
    `decode_stored_many` call; otherwise one by one, which sets the malformed ones apart."""
    batch = Batch(topic=topic, topic_id=topic_id)
    append, rejected, count = batch.events.append, batch.rejected, batch.counts.append
    for tp, messages in records.items():
        if not messages:
            continue
        partition = tp.partition
        batch.first_offsets.setdefault(partition, messages[0].offset)
        batch.next_offsets[partition] = messages[-1].offset + 1
        values = [msg.value for msg in messages]
        if None not in values and not any(REFUSALS_MARK in v for v in values):
            events = decode_stored_many(values)
            if events is not None:
                batch.events.extend(events)
                continue
        for msg in messages:
            try:
                if REFUSALS_MARK in msg.value:  # a collector's refusal count, not an event
                    count(decode_refusal_count(msg.value))
                else:
                    append(decode_stored(msg.value))
            except EventError as exc:
                rejected.append(Rejected(partition, msg.offset, str(exc), msg.value))
            except Exception as exc:
                error = "$: empty record value" if msg.value is None else \
                    f"undecodable: {type(exc).__name__}: {exc}"
                rejected.append(Rejected(partition, msg.offset, error, msg.value or b""))
    return batch


class ConsumerLoop:
    def __init__(self, consumer: KafkaConsumer, sink: Sink, topic: str, *,
                 max_backoff_s: float = 10.0, pipelined: bool = True, max_batch: int = 25_000) -> None:
        self.consumer = consumer
        self.sink = sink
        self.topic = topic
        self.max_backoff_s = max_backoff_s
        self.pipelined = pipelined
        self.max_batch = max_batch  # records per write at most (bounds memory with max_poll_records)
        self.stored_events = 0
        self.stored_rejects = 0
        self.failures = 0
        self.topic_id = ""
        self._needs_seek = False
        # The topic may be recreated under a running consumer (a restarted memory-only broker; ADR 16):
        # fresh metadata every `incarnation_check_s`, and a changed topic id means seeking again.
        self.incarnation_check_s = 1.0
        self._next_incarnation_check = 0.0
        self._ids_seen = False  # the broker sends topic ids: never store offsets under an unknown one
        self.incarnations = 0  # topic id changes noticed while running
        self._next_lag_report = 0.0  # monotonic time of the next tally_consumer_lag_records update
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: tuple[Batch, Future] | None = None
        self._gathering: Batch | None = None  # polled and decoded, not yet handed to the writer
        # Applies `tally replay`'s rewind requests and marks re-read batches (workers/rewind.py); None: off.
        self.rewinder: Rewinder | None = None

    def subscribe(self) -> None:
        self.consumer.subscribe([self.topic], listener=_SeekToStored(self))

    def current_topic_id(self) -> str:
        # kafka-python keeps topic ids (KIP-516) from metadata on its cluster object; there is no
        # public accessor in 3.0.12. "" when the broker does not send ids.
        topic_id = self.consumer._client.cluster.topic_id(self.topic)
        return str(topic_id) if topic_id else ""

    def seek_to_stored(self, partitions: list[TopicPartition]) -> None:
        self.settle()  # the stored offsets must include the write in flight, if it succeeds
        self._gathering = None  # re-read from the stored offsets instead
        self.topic_id = self.current_topic_id()
        self._ids_seen = self._ids_seen or bool(self.topic_id)
        stored = self.sink.committed(self.topic, self.topic_id, [tp.partition for tp in partitions])
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
        if self._needs_seek:
            self.seek_to_stored(sorted(self.consumer.assignment()))
            self._needs_seek = False
        if self._incarnation_changed():
            self.incarnations += 1
            log.warning("%s: topic %s was recreated (topic id %s -> %s); resuming from the new incarnation's "
                        "stored offsets", self.sink.name, self.topic, self.topic_id or "unknown",
                        self.current_topic_id())
            self.seek_to_stored(sorted(self.consumer.assignment()))
        if self._ids_seen and not self.topic_id:
            # Seeked while the topic was missing from the metadata (a broker restart): its offsets must
            # not be stored under no id. Keep the client going (poll) but drop what comes back; the
            # next step seeks again once the new incarnation's id is known.
            self.consumer.poll(timeout_ms=min(timeout_ms, 200))
            return 0
        if self.rewinder is not None and self.rewinder.due():
            self.rewinder.check(self)
        if self._gathering is not None and (self._in_flight is None or self._in_flight[1].done()):
            # Gathered while the writer was busy, and the writer is free now: store it before this
            # poll blocks (up to timeout_ms when the topic is quiet), not after.
            self._hand_over()
        # Holding records for a busy writer: come back soon to hand them over, rather than block in a
        # poll of a quiet topic for the whole timeout while the writer finishes and idles.
        records = self.consumer.poll(timeout_ms=timeout_ms if self._gathering is None else min(timeout_ms, GATHER_POLL_MS))
        self._report_lag()
        if self._needs_seek:  # assigned during this poll while the store was down: re-seek first
            self._gathering = None
            self.finish()
            return 0
        if not records:
            self.flush()
            return 0
        batch = decode(self.topic, self.topic_id, records) if self.rewinder is None else \
            self.rewinder.decode(decode, self.topic, self.topic_id, records)
        if self._gathering is None:
            self._gathering = batch
        else:
            self._gathering.merge(batch)
        busy = self._in_flight is not None and not self._in_flight[1].done()
        if not busy or len(self._gathering) >= self.max_batch or not self.pipelined:
            self._hand_over()
        return len(batch)

    def _incarnation_changed(self) -> bool:
        """True when the metadata names another topic id than the one we seeked with. No rebalance need
        happen when a broker loses and recreates the topic, so positions (and the stored offsets they
        came from) of the old incarnation would skip the new one's first records."""
        now = time.monotonic()
        if now >= self._next_incarnation_check:
            self._next_incarnation_check = now + self.incarnation_check_s
            self.consumer._client.cluster.request_update()
        current = self.current_topic_id()
        if not current or current == self.topic_id or not self.consumer.assignment():
            return False
        return True

    LAG_REPORT_S = 1.0  # how often the lag gauges are refreshed (after a poll)

    def _report_lag(self) -> None:
        """Set tally_consumer_lag_records per assigned partition: highwater (from the last fetch, no
        round trip) minus position; partitions not fetched yet are left out."""
        now = time.monotonic()
        if now < self._next_lag_report:
            return
        self._next_lag_report = now + self.LAG_REPORT_S
        group = getattr(self.sink, "group", self.sink.name)
        try:
            for tp in self.consumer.assignment():
                high = self.consumer.highwater(tp)
                if high is None:
                    continue
                position = self.consumer.position(tp, timeout_ms=0)
                if position is not None:
                    metrics.set_lag(group, tp.partition, high - position)
        except Exception:
            log.debug("%s: could not read the lag", self.sink.name, exc_info=True)

    def _write(self, batch: Batch) -> Batch:
        """Store `batch`; records the store refuses for good are set aside (workers/isolate.py).
        Logs one line per committed batch (group, offsets per partition, events, rejected, duration)."""
        t0 = time.monotonic()
        stored = write_isolating(self.sink.write, batch,
                                 permanent=getattr(self.sink, "is_permanent", is_permanent)) or batch
        metrics.observe_write(getattr(self.sink, "group", self.sink.name), len(batch), time.monotonic() - t0)
        log.info("%s: committed batch", self.sink.name, extra={
            "group": getattr(self.sink, "group", self.sink.name), "store": self.sink.name, "topic": batch.topic,
            "topic_id": batch.topic_id,
            "offsets": {p: [stored.first_offsets.get(p), o] for p, o in sorted(stored.next_offsets.items())},
            "events": len(stored.events), "rejected": len(stored.rejected), "counts": len(stored.counts),
            "duration_ms": round((time.monotonic() - t0) * 1000, 2)})
        return stored

    def _hand_over(self) -> None:
        self.finish()  # one write in flight at most, in log order
        batch, self._gathering = self._gathering, None
        if batch is None:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.sink.name}-writer")
        self._in_flight = (batch, self._writer.submit(self._write, batch))
        if not self.pipelined:
            self.finish()

    def flush(self) -> None:
        """Store everything polled so far; raise the failure of any write."""
        self._hand_over()
        self.finish()

    def finish(self) -> None:
        """Wait for the write in flight; count it, or raise its failure (dropping what was gathered since)."""
        if self._in_flight is None:
            return
        batch, future = self._in_flight
        try:
            batch = future.result() or batch  # what was stored, refused records set aside included
        except BaseException:
            self._gathering = None  # polled after the failed batch: re-read after the rewind
            raise
        finally:
            self._in_flight = None
        self.stored_events += len(batch.events)
        self.stored_rejects += len(batch.rejected)
        if batch.rejected:
            log.warning("%s: rejected %d malformed records (first: %s)", self.sink.name,
                        len(batch.rejected), batch.rejected[0].error)

    def settle(self) -> None:
        """Wait for the write in flight; a failure only marks a rewind to the stored offsets."""
        try:
            self.finish()
        except Exception as exc:
            self.failures += 1
            self._needs_seek = True
            log.error("%s: store write failed (%s: %s); resuming from stored offsets",
                      self.sink.name, type(exc).__name__, exc)

    def close(self) -> None:
        """Wait for the write in flight, stop the writer thread, close the consumer and the sink."""
        self.settle()
        self._gathering = None
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
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
                self._needs_seek = True
                stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        try:
            self.drain(timeout_s=drain_on_stop_s, idle_polls=1)
        except Exception as exc:
            log.warning("%s: could not drain before stopping (%s)", self.sink.name, exc)
        self.close()

    def drain(self, timeout_s: float = 60.0, idle_polls: int = 3) -> int:
        """Consume until `idle_polls` consecutive empty polls after reaching the log end (tests, backfills)."""
        if not self.consumer.subscription():
            self.subscribe()
        deadline = time.monotonic() + timeout_s
        handled = idle = 0
        while time.monotonic() < deadline:
            n = self.step(timeout_ms=300)  # an empty poll also waits for the write in flight
            handled += n
            idle = idle + 1 if n == 0 and self.consumer.assignment() else 0
            if idle >= idle_polls and self._at_end():
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
