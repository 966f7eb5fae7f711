"""A record a store refuses for good is set aside with its reason; the rest of its batch is stored once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest

from core.batch import Batch
from core.event import StoredEvent
from workers.isolate import TooManyRefused, write_isolating


class Refused(Exception):
    pass


def event(domain: str, value: str | None = None) -> StoredEvent:
    now = datetime.now(UTC)
    return StoredEvent(v=1, hash=uuid.uuid4().hex, domain=domain, url=f"https://{domain}/", ts=now,
                       received_at=now, type="impression", value=Decimal(value) if value else None)


def batch_of(events, topic="t") -> Batch:
    return Batch(topic=topic, topic_id="T", events=list(events), next_offsets={0: 120, 2: 7},
                 first_offsets={0: 100, 2: 5})


def test_only_the_refused_records_are_set_aside_and_offsets_are_stored_once():
    events = [event("a.example") for _ in range(37)]
    bad = {events[3].hash, events[30].hash}
    writes: list[Batch] = []

    def write(b: Batch) -> None:
        if any(e.hash in bad for e in b.events):
            raise Refused("value out of range")
        writes.append(b)

    stored = write_isolating(write, batch_of(events), permanent=lambda exc: isinstance(exc, Refused))
    written = [e.hash for b in writes for e in b.events]
    assert sorted(written) == sorted(e.hash for e in events if e.hash not in bad)  # each good one once
    assert [b.next_offsets for b in writes if b.next_offsets] == [{0: 120, 2: 7}]  # offsets last, once
    assert writes[-1].next_offsets and not writes[-1].events
    assert {r.error.split("(hash ")[1][:32] for r in writes[-1].rejected} == bad
    assert all("store refused: Refused: value out of range" in r.error for r in writes[-1].rejected)
    assert len(stored.events) == 35 and len(stored.rejected) == 2


def test_a_temporary_failure_is_not_isolated_but_raised():
    def write(b: Batch) -> None:
        raise ConnectionError("store down")

    with pytest.raises(ConnectionError):
        write_isolating(write, batch_of([event("a.example")]), permanent=lambda exc: isinstance(exc, Refused))


def test_a_store_refusing_everything_is_a_store_failure_not_a_flood_of_rejects():
    def write(b: Batch) -> None:
        if b.events:
            raise Refused("nope")

    with pytest.raises(TooManyRefused):
        write_isolating(write, batch_of([event("a.example") for _ in range(50)]),
                        permanent=lambda exc: isinstance(exc, Refused), max_refused=5)


def test_postgres_refusing_a_value_sets_that_record_aside(servers, domain):
    """Real PostgreSQL: numeric(24, 6) refuses 10^20 (a value the decoder would not let through; built by
    hand here). The batch's other events are counted, the refused one is in rejected_records."""
    from oltp.rollup_sink import RollupSink

    group, topic = f"g-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    sink = RollupSink(servers.pg_dsn, group)
    events = [event(domain, "1.5") for _ in range(9)] + [event(domain, "1" + "0" * 20)]
    try:
        write_isolating(sink.write, batch_of(events, topic), permanent=sink.is_permanent)
    finally:
        sink.close()
    with psycopg.connect(servers.pg_dsn) as conn:
        counted = conn.execute("SELECT sum(events) FROM rollup_15m WHERE domain = %s", (domain,)).fetchone()[0]
        rejected = conn.execute("SELECT error FROM rejected_records WHERE consumer_group = %s", (group,)).fetchall()
        offsets = conn.execute("SELECT partition, next_offset FROM consumer_offsets WHERE consumer_group = %s"
                               " ORDER BY 1", (group,)).fetchall()
    assert counted == 9
    assert len(rejected) == 1 and "NumericValueOutOfRange" in rejected[0][0] and events[-1].hash in rejected[0][0]
    assert offsets == [(0, 120), (2, 7)]


def test_the_consumer_writer_isolates_with_the_sinks_own_rule_and_keeps_the_batchs_other_fields():
    """ConsumerLoop's writer goes through write_isolating, with the sink's own `is_permanent`;
    whatever else the batch carries (refusal counts) is written once, with the offsets."""
    from workers.consumer import ConsumerLoop

    events = [event("a.example") for _ in range(8)]

    class Sink:
        name = group = "picky"
        writes: list[Batch] = []

        def is_permanent(self, exc):
            return isinstance(exc, Refused)

        def write(self, b):
            if any(e.hash == events[5].hash for e in b.events):
                raise Refused("no")
            self.writes.append(b)

    sink = Sink()
    loop = ConsumerLoop(consumer=None, sink=sink, topic="t")
    batch = batch_of(events)
    extra = [f for f in Batch.__dataclass_fields__ if f == "counts"]
    for name in extra:
        setattr(batch, name, ["one count"])
    stored = loop.writer.write(batch)
    assert len(stored.events) == 7 and len(stored.rejected) == 1
    with_offsets = [b for b in sink.writes if b.next_offsets]
    assert len(with_offsets) == 1
    for name in extra:
        assert getattr(with_offsets[0], name) == ["one count"]
        assert all(not getattr(b, name) for b in sink.writes if not b.next_offsets)
