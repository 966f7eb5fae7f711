"""The workers' decoder and write pipeline (ADR 14).

Unit tests of `core.event.decode_stored` on every field with bad values (pure logic), then the real
pipeline: records that are valid JSON but that a store would choke on are set aside by both workers
with the same reasons, and a store failure in the middle of pipelined writes stores each event once.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace

import orjson
import psycopg
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from kafka import KafkaProducer, TopicPartition

from core.event import EventError, HitContext, Limits, decode_stored, decode_stored_many, event_from_hit
from olap.client import connect
from olap.loader_sink import LoaderSink
from tests.eventlib import event_from_json, event_to_dict
from tests.test_pipeline import Pipeline, at
from workers.consumer import ConsumerLoop, decode
from workers.kafka_io import make_consumer

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def good(**changes) -> bytes:
    e = event_from_hit({"domain": "example.com", "url": "https://example.com/a", "type": "impression",
                        "value": "2.5", "referrer": "https://r.example/"},
                       HitContext(received_at=NOW, user_agent="UA/1", client_ip="192.0.2.1", country="DE"),
                       Limits(), b"k" * 32, lambda ua: ("Firefox", "Linux", "desktop"))
    obj = event_to_dict(e)
    for k, v in changes.items():
        if v is ...:
            del obj[k]
        else:
            obj[k] = v
    return orjson.dumps(obj)


def test_a_collector_record_decodes_to_what_the_collector_stamped():
    line = good()
    e, ref = decode_stored(line), event_from_json(line)
    for name in ("hash", "domain", "url", "ts", "received_at", "type", "value", "referrer", "user_agent",
                 "browser", "os", "device", "country", "visitor"):
        assert getattr(e, name) == getattr(ref, name), name
    assert e.value == Decimal("2.5") and e.ts.tzinfo is not None


def test_unknown_fields_are_ignored_and_optional_ones_may_be_missing():
    e = decode_stored(good(extra={"x": 1}, referrer=..., user_agent=..., value=..., country=None))
    assert e.value is None and e.referrer is None and e.user_agent is None


@pytest.mark.parametrize("value, field", [
    (b"", "$"), (b"\xff\xfe garbage", "$"), (b"[]", "$"), (b"null", "$"), (b'"x"', "$"), (b"{", "$"),
    (good(v=2), "v"), (good(v="1"), "v"), (good(v=...), "v"),
    (good(hash="nothex"), "hash"), (good(hash="A" * 32), "hash"), (good(hash=1), "hash"), (good(hash=...), "hash"),
    (good(domain=None), "domain"), (good(domain=""), "domain"), (good(domain="Example.COM"), "domain"),
    (good(domain="exa\u0000mple.com"), "domain"), (good(domain="a" * 300 + ".com"), "domain"),
    (good(domain=["example.com"]), "domain"),
    (good(url=None), "url"), (good(url=""), "url"), (good(url="x" * 3000), "url"), (good(url=5), "url"),
    (good(ts="2026-11-21T11:00:00"), "ts"), (good(ts="yesterday"), "ts"), (good(ts=1763722800000), "ts"),
    (good(ts="2026-02-30T00:00:00Z"), "ts"), (good(ts="2500-01-01T00:00:00Z"), "ts"),
    (good(ts="1969-12-31T23:59:59Z"), "ts"), (good(ts=...), "ts"),
    (good(received_at="2026-11-21 12:00"), "received_at"), (good(received_at="9999-01-01T00:00:00Z"), "received_at"),
    (good(type="click"), "type"), (good(type=None), "type"),
    (good(value="NaN"), "value"), (good(value="Infinity"), "value"), (good(value="-1"), "value"),
    (good(value="1e20"), "value"), (good(value="1E+1000"), "value"), (good(value="0.0000001"), "value"),
    (good(value="abc"), "value"), (good(value=True), "value"), (good(value={"a": 1}), "value"),
    (good(referrer=7), "referrer"), (good(user_agent="u" * 600), "user_agent"), (good(browser=1), "browser"),
    (good(os="o" * 65), "os"), (good(device=[]), "device"), (good(country="USA"), "country"),
    (good(visitor="v" * 33), "visitor"),
])
def test_malformed_records_are_refused_with_the_field_named(value, field):
    with pytest.raises(EventError) as info:
        decode_stored(value)
    assert info.value.field == field, str(info.value)
    assert str(info.value)  # a reason for rejected_records


_MUTATIONS = [{}, {}, {}, {"hash": "g" * 32}, {"hash": "A" * 32}, {"hash": "\u00e9" * 32}, {"hash": "0" * 31},
              {"domain": "Example.com"}, {"ts": "2500-01-01T00:00:00Z"}, {"value": "0.1234567"}, {"value": "7"},
              {"type": "click"}, {"url": ""}, {"user_agent": None}, {"country": "DE"}]


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_MUTATIONS).map(lambda m: good(hash=uuid.uuid4().hex, **{
    k: v for k, v in m.items() if k != "hash"}) if "hash" not in m else good(**m)),
    st.sampled_from([b"", b"{", b"null", b'{"v":1,"kind":"refusals"}'])), min_size=1, max_size=8))
def test_decoding_many_at_once_is_decoding_each(values):
    """decode_stored_many gives what decode_stored gives one by one, or None when any one of them is refused;
    the consumer's decode gives the same batch whichever way it went."""
    one_by_one, refused = [], False
    for v in values:
        try:
            one_by_one.append(decode_stored(v))
        except EventError:
            refused = True
    many = decode_stored_many(values)
    assert (many is None) == refused
    if many is not None:
        assert many == one_by_one
    records = {TopicPartition("t", 0): [SimpleNamespace(offset=i, value=v) for i, v in enumerate(values)]}
    batch = decode("t", "x", records)
    assert len(batch.events) + len(batch.rejected) + len(batch.counts) == len(values)
    assert batch.events == [e for e in one_by_one]  # refusal-count records are neither events nor refused
    assert batch.next_offsets == {0: len(values)}


def test_values_are_normalised_as_the_collector_stores_them():
    assert decode_stored(good(value="1E+1")).value == Decimal(10)  # what Decimal.normalize() writes
    assert decode_stored(good(value="0.000001")).value == Decimal("0.000001")
    assert decode_stored(good(value=3)).value == Decimal(3)
    assert decode_stored(good(ts="2026-11-21T17:45:00+05:45")).ts == datetime(2026, 11, 21, 12, tzinfo=UTC)


def test_records_a_store_would_choke_on_are_set_aside_by_both_workers_alike(pipeline, domain, settings):
    """Valid JSON, wrong for a store: both workers reject the same records with the same reasons, store
    the rest, and move on (the partition is not stalled)."""
    pipeline.post([{"domain": domain, "url": f"https://{domain}/", "value": "1"}] * 5)
    pipeline.spool.close()
    from spool.segments import read_record, sealed_segments, segment_records

    (segment,) = sealed_segments(settings.spool_dir)
    obj = orjson.loads(read_record(next(segment_records(segment.read_bytes()))))  # a real collector record
    bad = [{**obj, "hash": uuid.uuid4().hex, **change} for change in (
        {"domain": domain.upper()}, {"domain": f"x\u0000{domain}"}, {"ts": "2700-01-01T00:00:00Z"},
        {"value": "0.1234567"}, {"value": "1e12"}, {"ts": "2026-11-21T11:00:00"}, {"country": "DEU"})]
    producer = KafkaProducer(bootstrap_servers=list(settings.kafka_bootstrap))
    for b in bad:
        producer.send(settings.topic, key=domain.encode(), value=orjson.dumps(b))
    producer.flush()
    producer.close()
    pipeline.ship()
    pipeline.drain()
    assert pipeline.rollups.stored_rejects == pipeline.loader.stored_rejects == len(bad)
    assert pipeline.impressions(domain, at(60), datetime.now(UTC), metric="pageviews")["total"] == 5
    assert pipeline.sql(f"SELECT count(), sum(value) FROM tally.events WHERE domain = '{domain}'") == [[5, "5.000000"]]
    with psycopg.connect(settings.pg_dsn) as conn:
        pg_errors = [r[0] for r in conn.execute(
            "SELECT error FROM rejected_records WHERE topic = %s ORDER BY \"offset\"", (settings.topic,))]
    ch_errors = [r[0] for r in connect(settings.clickhouse_dsn).query(
        "SELECT error FROM tally.rejected_records WHERE topic = {t:String} ORDER BY offset",
        parameters={"t": settings.topic}).result_rows]
    assert pg_errors == ch_errors and len(pg_errors) == len(bad)
    assert [e.split(":", 1)[0] for e in pg_errors] == ["domain", "domain", "ts", "value", "value", "ts", "country"]


class FlakySink:
    """A real LoaderSink whose writes fail while `down` is set (as if ClickHouse went away)."""

    def __init__(self, sink: LoaderSink) -> None:
        self.sink, self.name, self.group, self.down, self.writes = sink, sink.name, sink.group, False, 0
        self.is_permanent, self.store_rewound_offsets = sink.is_permanent, sink.store_rewound_offsets

    def committed(self, *args):
        return self.sink.committed(*args)

    def write(self, batch) -> None:
        self.writes += 1
        time.sleep(0.01)  # a slow store: polls pile up behind the write in flight and get merged
        if self.down:
            raise ConnectionError("ClickHouse is down")
        self.sink.write(batch)

    def close(self) -> None:
        self.sink.close()


def run_until_stored(loop: ConsumerLoop, n: int, timeout_s: float = 60) -> None:
    """Run `loop` in a thread as a worker does until it stored `n` events (or the timeout), then stop it."""
    stop = threading.Event()
    worker = threading.Thread(target=loop.run, args=(stop,))
    worker.start()
    try:
        deadline = time.monotonic() + timeout_s
        while loop.stored_events < n and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not worker.is_alive()


def test_a_store_failure_amid_pipelined_writes_stores_every_event_once(pipeline, domain, settings):
    n = 400
    pipeline.post([{"domain": domain, "url": f"https://{domain}/{i}"} for i in range(n)])
    pipeline.shipper.record_events = 1  # one event a record, so that 7-record polls make many small writes
    pipeline.ship()
    client = connect(settings.clickhouse_dsn)
    sink = FlakySink(LoaderSink(client, settings.clickhouse_database, f"loader-{uuid.uuid4().hex[:8]}"))
    consumer = make_consumer(settings.kafka_bootstrap, sink.sink.group, session_timeout_ms=2000, max_poll_records=7)
    loop = ConsumerLoop(consumer, sink, settings.topic, max_batch=30, max_backoff_s=0.2)
    original = sink.write

    def write_then_fail(batch):  # the store goes away after a few batches, and comes back later
        original(batch)
        if sink.writes == 4:
            sink.down = True
            threading.Timer(1.0, lambda: setattr(sink, "down", False)).start()

    sink.write = write_then_fail
    run_until_stored(loop, n)
    assert loop.failures >= 1
    assert loop.stored_events >= n  # some batches were written twice (a replay after the failure) ...
    assert client.command(f"SELECT count() FROM tally.events FINAL WHERE domain = '{domain}'") == n  # ... seen once
    assert client.command(f"SELECT uniqExact(url) FROM tally.events WHERE domain = '{domain}'") == n
    offsets = sink.sink.committed(settings.topic, loop.topic_id, list(range(settings.partitions)))
    assert sum(offsets.values()) == n


def test_a_write_interval_holds_what_arrives_for_the_next_write_and_stores_every_event_once(pipeline, domain,
                                                                                            settings):
    """TALLY_CONSUMER_WRITE_INTERVAL_MS (ADR 65), against the broker and ClickHouse: records that arrive while the
    interval runs join the next write, write starts are at least the interval apart, a store failure amid them
    rewinds as without it, and every event is stored once."""
    n, interval = 300, 0.4
    pipeline.post([{"domain": domain, "url": f"https://{domain}/{i}"} for i in range(n)])
    pipeline.shipper.record_events = 1  # one event a record, 7-record polls: without the interval, many writes
    pipeline.ship()
    client = connect(settings.clickhouse_dsn)
    sink = FlakySink(LoaderSink(client, settings.clickhouse_database, f"loader-{uuid.uuid4().hex[:8]}"))
    consumer = make_consumer(settings.kafka_bootstrap, sink.sink.group, session_timeout_ms=2000, max_poll_records=7)
    loop = ConsumerLoop(consumer, sink, settings.topic, max_backoff_s=0.2, min_write_interval_s=interval)
    original, hand_over, starts = sink.write, loop.writer.hand_over, []

    def write_then_fail_once(batch):  # the second write fails (the store went away), the ones after succeed
        try:
            original(batch)
        except ConnectionError:
            sink.down = False
            raise
        sink.down = sink.writes == 1

    def noted_hand_over():  # each write's start as the writer's gate saw it (in the loop's thread)
        before = loop.writer._last_start
        hand_over()
        if loop.writer._last_start != before:
            starts.append(loop.writer._last_start)

    sink.write, loop.writer.hand_over = write_then_fail_once, noted_hand_over
    run_until_stored(loop, n)
    assert loop.failures >= 1
    assert client.command(f"SELECT count() FROM tally.events FINAL WHERE domain = '{domain}'") == n
    assert sum(sink.sink.committed(settings.topic, loop.topic_id, list(range(settings.partitions))).values()) == n
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps and min(gaps) >= interval, gaps  # (a rewind's re-read waits for the interval too)
    assert len(starts) <= 12, len(starts)  # 300 one-event records, 7 a poll: ~43 polls, a few writes


@pytest.fixture()
def pipeline(settings):
    p = Pipeline(settings)
    yield p
    p.close()
