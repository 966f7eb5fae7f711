"""core/records.py, the raw-events topic's batched record format (docs/record-format.md, ADR 55), and the
consumers' `decode` of it: pure logic, no broker."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka.partitioner.default import DefaultPartitioner

from core.config import ConfigError, Settings
from core.event import refusal_count_json
from core.records import (
    RecordFormatError,
    encode_batch,
    is_batch,
    is_single_event,
    pack,
    partition_for,
    split_batch,
)
from tests.test_worker_decode import good
from workers.consumer import decode

# An event is a JSON object as orjson writes it: any bytes without a newline, for the format's sake.
events_st = st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")), min_size=1, max_size=40)


@given(events_st)
def test_a_batch_round_trips(events):
    value = encode_batch(events)
    assert is_batch(value) and not is_single_event(value)
    assert split_batch(value) == events


@given(st.lists(st.tuples(st.sampled_from([b"a.example", b"b.example", b"c.example", b"d.example", b"e.example"]),
                          st.binary(min_size=1, max_size=50).map(lambda b: b.replace(b"\n", b" "))), max_size=200),
       st.integers(1, 8), st.integers(1, 30), st.integers(64, 600))
def test_pack_keeps_every_event_once_in_its_partition_in_order_within_the_caps(keyed, partitions, max_events,
                                                                                max_bytes):
    records = list(pack(keyed, partitions, max_events=max_events, max_bytes=max_bytes))
    got: dict[int, list[bytes]] = {}
    for record in records:
        events = split_batch(record.value)
        assert len(events) == record.events <= max_events
        assert len(events) == 1 or len(record.value) <= max_bytes + 40  # the header is at most 40 bytes
        got.setdefault(record.partition, []).extend(events)
    want: dict[int, list[bytes]] = {}
    for key, event in keyed:
        want.setdefault(partition_for(key, partitions), []).append(event)
    assert got == want


@given(st.binary(min_size=1, max_size=300), st.integers(1, 64))
def test_the_partition_is_the_one_a_keyed_send_reaches(key, partitions):
    cluster = SimpleNamespace(topics=lambda: {"t"}, partitions_for_topic=lambda _t: set(range(partitions)),
                              available_partitions_for_topic=lambda _t: set(range(partitions)))
    assert partition_for(key, partitions) == DefaultPartitioner().partition("t", key, key, None, None, cluster)


def test_the_format_is_the_documented_one():
    assert encode_batch([b'{"a":1}', b'{"b":2}']) == b'tally-batch/1 2\n{"a":1}\n{"b":2}\n'


@pytest.mark.parametrize(("value", "words"), [
    (b'tally-batch/2 1\n{"a":1}\n', "version '2' is not supported"),
    (b'tally-batch/1 3\n{"a":1}\n{"b":2}\n', "says 3 events, the record holds 2"),
    (b'tally-batch/1 1\n{"a":1}\n{"b":2}\n', "says 1 events, the record holds 2"),
    (b'tally-batch/1 2\n{"a":1}\n{"b":2}', "does not end with a newline"),
    (b'tally-batch/1 x\n{"a":1}\n', "no valid event count"),
    (b'tally-batch/1 0\n\n', "no valid event count"),
    (b'tally-batch/1 1', "no `tally-batch/<version> <count>` header line"),
    (b'{"a":1}', "not a batched record"),
])
def test_an_unreadable_batched_record_is_refused_as_a_whole_with_the_reason(value, words):
    with pytest.raises(RecordFormatError, match=re.escape(words)):
        split_batch(value)


def test_encode_refuses_what_the_format_cannot_hold():
    with pytest.raises(ValueError, match="at least one event"):
        encode_batch([])
    with pytest.raises(ValueError, match="newline"):
        encode_batch([b'{"a":\n1}'])


# ---------------------------------------------------------------- the consumers' decode


def polled(*values: bytes | None, partition: int = 0, first: int = 10) -> dict:
    return {TopicPartition("t", partition): [SimpleNamespace(offset=first + i, value=v) for i, v in enumerate(values)]}


def test_decode_expands_batched_records_and_still_reads_single_event_records():
    a, b, c = good(url="https://example.com/a"), good(url="https://example.com/b"), good(url="https://example.com/c")
    batch = decode("t", "id", polled(encode_batch([a, b]), c))
    assert [e.url for e in batch.events] == ["https://example.com/a", "https://example.com/b",
                                            "https://example.com/c"]
    assert batch.rejected == [] and batch.first_offsets == {0: 10} and batch.next_offsets == {0: 12}


def test_a_bad_event_inside_a_batch_is_rejected_alone_with_its_position():
    a, c = good(url="https://example.com/a"), good(url="https://example.com/c")
    bad = good(ts="yesterday")
    count = refusal_count_json("example.com", "rate_limited", 3, datetime(2026, 11, 21, tzinfo=UTC))
    batch = decode("t", "id", polled(encode_batch([a, bad, count, c])))
    assert [e.url for e in batch.events] == ["https://example.com/a", "https://example.com/c"]
    assert [c.count for c in batch.counts] == [3]
    (rejected,) = batch.rejected
    assert (rejected.partition, rejected.offset, rejected.index, rejected.payload) == (0, 10, 1, bad)
    assert rejected.error.startswith("ts: ") and rejected.error.endswith("(event 2 of 4 in the batched record)")


def test_a_corrupt_batched_record_is_rejected_as_a_whole_and_the_others_stored():
    a, b = good(url="https://example.com/a"), good(url="https://example.com/b")
    torn = encode_batch([a, b])[:-30]
    future = b"tally-batch/9 1\n" + a + b"\n"
    batch = decode("t", "id", polled(torn, encode_batch([b]), future, None))
    assert [e.url for e in batch.events] == ["https://example.com/b"]
    errors = {r.offset: r.error for r in batch.rejected}
    assert set(errors) == {10, 12, 13} and all(r.index is None for r in batch.rejected)
    assert "does not end with a newline" in errors[10] or "the record holds" in errors[10]
    assert "version '9' is not supported" in errors[12]
    assert errors[13] == "$: empty record value"
    assert batch.next_offsets == {0: 14}


def test_a_refused_single_event_record_keeps_its_old_error():
    batch = decode("t", "id", polled(b"not json", orjson.dumps({"v": 1})))
    assert [r.error for r in batch.rejected] == [
        "$: not valid JSON (JSON is malformed: invalid character (byte 4))",
        "hash: Object missing required field `hash`"]


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("TALLY_KAFKA_RECORD_EVENTS", "0", "0 is out of range [1, 10000]"),
    ("TALLY_KAFKA_RECORD_EVENTS", "many", "'many' is not an integer"),
    ("TALLY_KAFKA_RECORD_BYTES", str(1 << 20), "1048576 is out of range [1024, 786432]"),  # over the producer's 1 MiB
])
def test_record_size_settings_out_of_range_are_refused_by_name(variable, value, words):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert variable in str(info.value) and words in str(info.value)


def test_record_size_settings_reach_the_shipper(tmp_path):
    from tally.roots import build_shipper

    settings = Settings.from_env({"TALLY_HOME": str(tmp_path), "TALLY_KAFKA_BOOTSTRAP": "127.0.0.1:9",
                                  "TALLY_KAFKA_RECORD_EVENTS": "7", "TALLY_KAFKA_RECORD_BYTES": "4096"})
    shipper = build_shipper(settings)  # nothing connects before the first ship
    assert (shipper.record_events, shipper.record_bytes) == (7, 4096)
