"""The consumer loop hands records gathered for a busy writer over as soon as the writer is free
(workers/consumer.py, ADR 27): it polls with a short timeout while it holds such records, and hands
them over before its next poll, instead of blocking in a poll of a quiet topic meanwhile.

A scripted consumer and a sink whose writes are released by the test: no broker, no clock."""

from __future__ import annotations

import threading
import uuid
from types import SimpleNamespace

import orjson
from kafka import TopicPartition

from workers.consumer import GATHER_POLL_MS, ConsumerLoop

TP = TopicPartition("t", 0)


def record(offset: int) -> SimpleNamespace:
    value = orjson.dumps({"v": 1, "hash": uuid.uuid4().hex, "domain": "example.com", "url": "https://example.com/",
                          "ts": "2026-11-23T10:00:00Z", "received_at": "2026-11-23T10:00:01Z", "type": "pageview"})
    return SimpleNamespace(offset=offset, value=value)


class ScriptedConsumer:
    """Returns the scripted polls in turn (then nothing) and notes each poll's timeout and when it came."""

    def __init__(self, polls: list[dict], sink: GatedSink) -> None:
        self.polls, self.sink, self.calls, self.loop = list(polls), sink, [], None
        self._client = SimpleNamespace(cluster=SimpleNamespace(topic_id=lambda topic: "", request_update=lambda: None))

    def assignment(self) -> set:
        return {TP}

    def subscription(self) -> set:
        return set()  # partitions assigned by hand: no group to watch

    def poll(self, timeout_ms: int) -> dict:
        # the timeout, and how many events the loop still held back from the writer at this poll
        held = self.loop.writer.gathering
        self.calls.append((timeout_ms, 0 if held is None else len(held)))
        return self.polls.pop(0) if self.polls else {}

    def highwater(self, tp):
        return None


class GatedSink:
    name, group = "gated", "gated"

    def __init__(self) -> None:
        self.started: list[int] = []  # events per write, as each write starts
        self.gate = threading.Event()

    def committed(self, *args) -> dict:
        return {}

    def write(self, batch) -> None:
        self.started.append(len(batch.events))
        assert self.gate.wait(30), "the test never released the write"

    def is_permanent(self, exc: BaseException) -> bool:
        return False

    def store_rewound_offsets(self, topic: str, topic_id: str, offsets: dict[int, int]) -> None:
        raise AssertionError("no rewinds here")

    def close(self) -> None:
        pass


def test_records_gathered_for_a_busy_writer_go_to_it_before_the_next_poll():
    sink = GatedSink()
    consumer = ScriptedConsumer([{TP: [record(0), record(1)]}, {TP: [record(2), record(3), record(4)]},
                                 {TP: [record(5)]}], sink)
    loop = consumer.loop = ConsumerLoop(consumer, sink, "t")
    try:
        assert loop.step(timeout_ms=500) == 2  # handed to the idle writer at once; its write now blocks
        assert loop.step(timeout_ms=500) == 3  # gathered: the writer is busy
        assert loop.step(timeout_ms=500) == 1  # holding records for the busy writer: a short poll
        assert consumer.calls[:3] == [(500, 0), (500, 0), (min(500, GATHER_POLL_MS), 3)]
        sink.gate.set()
        loop.writer.in_flight[1].result(timeout=30)
        loop.step(timeout_ms=500)
        # the gathered records were handed over before that poll, and the poll was a full one again
        assert consumer.calls[3] == (500, 0)
        assert sink.started == [2, 4]
        loop.finish()
        assert loop.stored_events == 6
    finally:
        sink.gate.set()
        loop.settle()


def test_a_new_consumer_that_cannot_be_made_leaves_the_old_one_in_place():
    """A member stuck without its group for the bound gets a new consumer (workers/coordinator_stall.py); when
    none can be made (no broker to bootstrap from) the loop keeps the old one and goes on, no failure counted."""
    sink = GatedSink()
    consumer = ScriptedConsumer([], sink)

    def no_broker():
        raise OSError("no broker answers")

    loop = consumer.loop = ConsumerLoop(consumer, sink, "t", consumer_factory=no_broker)
    loop.rebuild_consumer()
    assert loop.consumer is consumer and loop.rebuilds == 0 and loop.failures == 0
    sink.gate.set()
    loop.writer.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_write_starts_at_most_once_per_interval_and_what_comes_meanwhile_joins_the_next():
    """TALLY_CONSUMER_WRITE_INTERVAL_MS (ADR 65): an idle writer still waits until the interval since the last
    write's start is over; a full batch goes at once; the poll comes back when the interval ends; an empty poll
    within it keeps the records; `drain` stores everything before it returns."""
    sink, clock = GatedSink(), Clock()
    sink.gate.set()  # writes finish at once: only the interval holds records back
    consumer = ScriptedConsumer([{TP: [record(0), record(1)]}, {TP: [record(2), record(3), record(4)]}, {},
                                 {TP: [record(5)]}, {}], sink)
    loop = consumer.loop = ConsumerLoop(consumer, sink, "t", max_batch=6, min_write_interval_s=0.25)
    loop.writer.clock = clock
    try:
        assert loop.step(timeout_ms=500) == 2  # the first write starts at once
        loop.writer.in_flight[1].result(timeout=30)
        clock.now += 0.125  # (binary fractions: the sums are exact)
        assert loop.step(timeout_ms=500) == 3  # the writer is idle, but 0.125 s after the last start: held
        assert sink.started == [2] and len(loop.writer.gathering) == 3
        clock.now += 0.0625
        assert loop.step(timeout_ms=500) == 0  # an empty poll within the interval keeps them
        assert consumer.calls[2] == (63, 3)  # that poll waited for the rest of the interval (62.5 ms), not 500 ms
        assert sink.started == [2] and len(loop.writer.gathering) == 3
        clock.now += 0.0625
        assert loop.step(timeout_ms=500) == 1  # interval over: the held 3 start before the poll; 1 more held
        loop.writer.in_flight[1].result(timeout=30)
        assert sink.started == [2, 3] and len(loop.writer.gathering) == 1
        loop.writer.add(_batch_of(5))  # with the 1 held: a full batch (max_batch 6) goes within the interval
        loop.finish()
        assert sink.started == [2, 3, 6]
        assert loop.stored_events == 11
    finally:
        sink.gate.set()
        loop.settle()


def _batch_of(n: int):
    from workers.consumer import decode

    return decode("t", "", {TP: [record(100 + i) for i in range(n)]})


def test_drain_stores_what_the_interval_still_held():
    sink, clock = GatedSink(), Clock()
    sink.gate.set()
    consumer = ScriptedConsumer([{TP: [record(0)]}, {TP: [record(1), record(2)]}], sink)
    consumer.end_offsets = lambda tps: {tp: 3 for tp in tps}
    consumer.position = lambda tp: 3
    loop = consumer.loop = ConsumerLoop(consumer, sink, "t", min_write_interval_s=3600)
    loop.writer.clock = clock
    consumer.subscribe = lambda topics, listener=None: None
    try:
        assert loop.drain(timeout_s=30, idle_polls=2, poll_ms=1) == 3
        assert sink.started == [1, 2] and loop.stored_events == 3
    finally:
        loop.settle()
        loop.writer.close()


def test_records_held_for_the_interval_are_dropped_when_the_partitions_are_revoked():
    """A revocation (or a lost member) drops what the interval held: kafka-python may deliver the new assignment
    polls later, and a write in between would store records of partitions another member may already read. They
    are read again from the stored offsets once assigned."""
    from workers.consumer import _SeekToStored

    sink, clock = GatedSink(), Clock()
    sink.gate.set()
    consumer = ScriptedConsumer([{TP: [record(0)]}, {TP: [record(1), record(2)]}, {}, {}], sink)
    loop = consumer.loop = ConsumerLoop(consumer, sink, "t", min_write_interval_s=0.25)
    loop.writer.clock = clock
    try:
        assert loop.step(timeout_ms=500) == 1
        loop.writer.in_flight[1].result(timeout=30)
        assert loop.step(timeout_ms=500) == 2 and len(loop.writer.gathering) == 2  # held for the interval
        _SeekToStored(loop).on_partitions_revoked({TP})  # inside a poll; the assignment comes later
        assert loop.writer.gathering is None
        clock.now += 1
        assert loop.step(timeout_ms=500) == 0 and loop.step(timeout_ms=500) == 0
        loop.finish()
        assert sink.started == [1] and loop.stored_events == 1
    finally:
        loop.settle()
        loop.writer.close()
