"""Batched Kafka records end to end (ADR 55, docs/record-format.md), against the session's tansu, PostgreSQL
and chDB: the shipper packs a segment's events per partition into batched records, both workers store
every event exactly once, single-event records already on the topic are still read, and a bad event
inside a batch is set aside alone."""

from __future__ import annotations

import uuid

import orjson
import psycopg
import pytest
from kafka import KafkaConsumer, TopicPartition

from core.records import encode_batch, is_batch, partition_for, split_batch
from olap.client import connect
from spool.segments import sealed_segments
from tests.test_pipeline import Pipeline
from workers.kafka_io import make_producer
from workers.shipper import keyed_events

RECORD_EVENTS = 40


@pytest.fixture()
def settings(make_settings):
    return make_settings(TALLY_KAFKA_RECORD_EVENTS=str(RECORD_EVENTS))


@pytest.fixture()
def pipeline(settings):
    p = Pipeline(settings)
    yield p
    p.close()


def new_domains(k: int) -> list[str]:
    return [f"b{uuid.uuid4().hex[:10]}.example.com" for _ in range(k)]


def post_each(pipeline: Pipeline, domains: list[str], n: int, tag: str = "") -> None:
    for d in domains:
        pipeline.post([{"domain": d, "url": f"https://{d}/{tag}{i}"} for i in range(n)])


def topic_records(settings) -> list[tuple[int, int, bytes]]:
    """(partition, offset, value) of every record on the test's topic."""
    consumer = KafkaConsumer(bootstrap_servers=list(settings.kafka_bootstrap), consumer_timeout_ms=2000)
    try:
        consumer.assign([TopicPartition(settings.topic, p) for p in range(settings.partitions)])
        consumer.seek_to_beginning()
        return [(r.partition, r.offset, r.value) for r in consumer]
    finally:
        consumer.close()


def stored_counts(settings, domains: list[str]) -> tuple[int, int, int]:
    """(events counted by the rollups in PostgreSQL, rows in ClickHouse, rows in ClickHouse after FINAL)."""
    with psycopg.connect(settings.pg_dsn) as conn:
        pg = conn.execute("SELECT coalesce(sum(events), 0) FROM rollup_15m WHERE domain = ANY(%s)",
                          (domains,)).fetchone()[0]
    client = connect(settings.clickhouse_dsn)
    where = "domain IN (" + ",".join(f"'{d}'" for d in domains) + ")"
    raw = client.command(f"SELECT count() FROM tally.events WHERE {where}")
    final = client.command(f"SELECT count() FROM tally.events FINAL WHERE {where}")
    return int(pg), int(raw), int(final)


def rejected(settings) -> tuple[list[tuple], list[list]]:
    with psycopg.connect(settings.pg_dsn) as conn:
        pg = conn.execute("SELECT partition, \"offset\", error, payload FROM rejected_records WHERE topic = %s",
                          (settings.topic,)).fetchall()
    ch = connect(settings.clickhouse_dsn).query(
        "SELECT partition, offset, error, payload FROM tally.rejected_records WHERE topic = {t:String}",
        parameters={"t": settings.topic}).result_rows
    return pg, [list(r) for r in ch]


def spooled(pipeline: Pipeline) -> list[tuple[bytes, bytes]]:
    """The (domain, payload) of what the collector spooled, taken out of the spool (not shipped)."""
    pipeline.spool.close()
    out = []
    for segment in sealed_segments(pipeline.settings.spool_dir):
        keyed, bad = keyed_events(segment.read_bytes())
        assert not bad
        out += keyed
        segment.unlink()
    return out


def test_a_shipped_segment_travels_as_batched_records_and_both_stores_hold_every_event_once(pipeline, settings):
    domains = new_domains(4)
    post_each(pipeline, domains, 70)
    assert pipeline.ship() == 280
    records = topic_records(settings)
    assert records and all(is_batch(value) for _, _, value in records)
    events = 0
    for partition, _, value in records:
        lines = split_batch(value)
        assert 1 <= len(lines) <= RECORD_EVENTS
        events += len(lines)
        for line in lines:  # each domain stays in the partition a keyed send of it reaches
            assert partition_for(orjson.loads(line)["domain"].encode(), settings.partitions) == partition
    assert events == 280 and len(records) < 280 // 4
    pipeline.drain()
    assert stored_counts(settings, domains) == (280, 280, 280)
    assert rejected(settings) == ([], [])
    # shipped again (a crash before the segment left the spool, a new topic incarnation): still once
    for seg in pipeline.shipper.retained.list():
        pipeline.shipper._send(seg.path)
    pipeline.drain()
    assert stored_counts(settings, domains)[0::2] == (280, 280)


def test_single_event_records_already_on_the_topic_are_still_read_with_batched_ones(pipeline, settings):
    old_domains, new = new_domains(2), new_domains(2)
    post_each(pipeline, old_domains, 30, "old")
    old = spooled(pipeline)
    producer = make_producer(settings.kafka_bootstrap)
    try:  # what the shipper wrote before batched records: one keyed record per event
        for key, payload in old:
            producer.send(settings.topic, key=key, value=payload)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)
    post_each(pipeline, new, 30, "new")
    assert pipeline.ship() == 60
    values = [value for _, _, value in topic_records(settings)]
    assert sum(1 for v in values if not is_batch(v)) == 60 and any(is_batch(v) for v in values)
    pipeline.drain()
    assert stored_counts(settings, old_domains + new) == (120, 120, 120)
    assert rejected(settings) == ([], [])


def test_a_bad_event_inside_a_batched_record_is_rejected_alone_the_others_stored(pipeline, settings):
    (d,) = new_domains(1)
    post_each(pipeline, [d], 5)
    payloads = [payload for _, payload in spooled(pipeline)]
    bad = orjson.dumps({**orjson.loads(payloads[2]), "ts": "yesterday"})
    value = encode_batch(payloads[:2] + [bad] + payloads[3:])
    corrupt = encode_batch(payloads[3:])[:-5]  # torn: rejected whole, although its events are also above
    producer = make_producer(settings.kafka_bootstrap)
    try:
        for v in (value, corrupt):
            producer.send(settings.topic, value=v, partition=partition_for(d.encode(), settings.partitions))
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)
    pipeline.drain()
    assert stored_counts(settings, [d]) == (4, 4, 4)
    pg, ch = rejected(settings)
    for rows in (pg, ch):
        by_offset = {row[1]: row for row in rows}
        assert sorted(by_offset) == [0, 1], rows
        assert by_offset[0][2].startswith("ts: ") and by_offset[0][2].endswith("(event 3 of 5 in the batched record)")
        assert by_offset[0][3] == bad.decode()
        assert "truncated" in by_offset[1][2] or "does not end with a newline" in by_offset[1][2]
