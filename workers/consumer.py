"""The consumer loop shared by the rollup and loader workers.

Each step does one thing: poll -> decode (bad records become `Rejected`, never
retried) -> sink.write (data, rejects and offsets stored together). Offsets
are never committed to Kafka as the source of truth: on assignment we seek to
what the sink stored. A temporary store failure pauses the loop with backoff
and rewinds to the stored offsets, so nothing is skipped or counted twice.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from core.event import Event, EventError
from workers.batch import Batch, Rejected

log = logging.getLogger(__name__)


class Sink(Protocol):
    name: str

    def committed(self, topic: str, topic_id: str, partitions: list[int]) -> dict[int, int]: ...
    def write(self, batch: Batch) -> None: ...
    def close(self) -> None: ...


class _SeekToStored(ConsumerRebalanceListener):
    def __init__(self, loop: "ConsumerLoop") -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass  # every batch is stored before the next poll; nothing pending to flush

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            self.loop.seek_to_stored(sorted(assigned))
        except Exception as exc:  # noqa: BLE001 - store down: seek again before the next write
            log.error("%s: could not read stored offsets (%s); will retry", self.loop.sink.name, exc)
            self.loop._needs_seek = True


def decode(topic: str, topic_id: str, records: dict[TopicPartition, list]) -> Batch:
    """Pure transform from polled records to a Batch."""
    batch = Batch(topic=topic, topic_id=topic_id)
    for tp, messages in records.items():
        for msg in messages:
            batch.first_offsets.setdefault(tp.partition, msg.offset)
            batch.next_offsets[tp.partition] = msg.offset + 1
            try:
                if msg.value is None:
                    raise EventError("$", "empty record value")
                batch.events.append(Event.from_json(msg.value))
            except EventError as exc:
                batch.rejected.append(Rejected(tp.partition, msg.offset, str(exc), msg.value or b""))
            except Exception as exc:  # noqa: BLE001 - a record must never stall its partition
                batch.rejected.append(Rejected(tp.partition, msg.offset, f"undecodable: {type(exc).__name__}: {exc}",
                                               msg.value or b""))
    return batch


class ConsumerLoop:
    def __init__(self, consumer: KafkaConsumer, sink: Sink, topic: str, *,
                 max_backoff_s: float = 10.0) -> None:
        self.consumer = consumer
        self.sink = sink
        self.topic = topic
        self.max_backoff_s = max_backoff_s
        self.stored_events = 0
        self.stored_rejects = 0
        self.failures = 0
        self.topic_id = ""
        self._needs_seek = False

    def subscribe(self) -> None:
        self.consumer.subscribe([self.topic], listener=_SeekToStored(self))

    def current_topic_id(self) -> str:
        # kafka-python keeps topic ids (KIP-516) from metadata on its cluster object; there is no
        # public accessor in 3.0.12. "" when the broker does not send ids.
        topic_id = self.consumer._client.cluster.topic_id(self.topic)  # noqa: SLF001
        return str(topic_id) if topic_id else ""

    def seek_to_stored(self, partitions: list[TopicPartition]) -> None:
        self.topic_id = self.current_topic_id()
        stored = self.sink.committed(self.topic, self.topic_id, [tp.partition for tp in partitions])
        for tp in partitions:
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)
        log.info("%s: assigned %s, resuming at %s", self.sink.name,
                 [tp.partition for tp in partitions], stored)

    def step(self, timeout_ms: int = 500) -> int:
        """Poll once and store what came back. Returns the number of records handled."""
        if self._needs_seek:
            self.seek_to_stored(sorted(self.consumer.assignment()))
            self._needs_seek = False
        records = self.consumer.poll(timeout_ms=timeout_ms)
        if not records:
            return 0
        if self._needs_seek:  # assigned during this poll while the store was down: discard, re-seek
            return 0
        batch = decode(self.topic, self.topic_id, records)
        self.sink.write(batch)
        self.stored_events += len(batch.events)
        self.stored_rejects += len(batch.rejected)
        if batch.rejected:
            log.warning("%s: rejected %d malformed records (first: %s)", self.sink.name,
                        len(batch.rejected), batch.rejected[0].error)
        return len(batch)

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
            except Exception as exc:  # noqa: BLE001 - a store outage must pause, not kill, the worker
                self.failures += 1
                log.error("%s: store write failed (%s: %s); pausing %.1fs then resuming from stored offsets",
                          self.sink.name, type(exc).__name__, exc, backoff)
                self._needs_seek = True
                stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        try:
            self.drain(timeout_s=drain_on_stop_s, idle_polls=1)
        except Exception as exc:  # noqa: BLE001 - stopping anyway; the stored offsets say where to resume
            log.warning("%s: could not drain before stopping (%s)", self.sink.name, exc)
        self.consumer.close()
        self.sink.close()

    def drain(self, timeout_s: float = 60.0, idle_polls: int = 3) -> int:
        """Consume until `idle_polls` consecutive empty polls after reaching the log end (tests, backfills)."""
        if not self.consumer.subscription():
            self.subscribe()
        deadline = time.monotonic() + timeout_s
        handled = idle = 0
        while time.monotonic() < deadline:
            n = self.step(timeout_ms=300)
            handled += n
            idle = idle + 1 if n == 0 and self.consumer.assignment() else 0
            if idle >= idle_polls and self._at_end():
                return handled
        raise TimeoutError(f"{self.sink.name}: not drained after {timeout_s}s ({handled} records handled)")

    def _at_end(self) -> bool:
        # Necessary, not sufficient, on tansu 0.6: its ListOffsets(latest) is the last batch's base
        # offset + 1, so `drain` also requires consecutive empty polls.
        assignment = self.consumer.assignment()
        if not assignment:
            return False
        ends = self.consumer.end_offsets(list(assignment))
        return all(self.consumer.position(tp) >= ends[tp] for tp in assignment)
