"""The workers' lean record parser against kafka-python's own, record by record (ADR 27).

Both parse the same generated fetch responses (several batches, every compression codec this
machine has, message formats 0, 1 and 2, keys/values null or empty or long enough for multi-byte
varints, headers, any fetch offset inside a batch); the records, their order, and the bookkeeping
the fetcher reads afterwards (next fetch offset, records and bytes read) must be identical. Broken
buffers must raise in both, after yielding the same records.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from workers.kafka_records import LeanPartitionRecords, use_lean_records

TP = TopicPartition("tally.events", 3)
CODECS = [0, 1, 3]  # none, gzip, lz4 (snappy/zstd are not installed here)

_bytes = st.one_of(st.none(), st.binary(max_size=40), st.binary(min_size=120, max_size=300),
                   st.builds(lambda n, c: bytes([c]) * n, st.integers(16_380, 20_000), st.integers(0, 255)))
_headers = st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=20))), max_size=3)
_record = st.tuples(st.integers(0, 2**41), _bytes, _bytes, _headers)


def _buffer(batches: list[tuple[int, int, list]], magic: int) -> bytes:
    out, offset = bytearray(), 0
    for codec, gap, records in batches:
        codec = codec if magic == 2 or codec != 3 else 1  # lz4 in formats 0/1 needs xxhash, not installed
        offset += gap  # compaction leaves gaps between batches
        builder = MemoryRecordsBuilder(magic=magic, compression_type=codec, batch_size=64 * 1024 * 1024,
                                       offset=offset)
        for ts, key, value, headers in records:
            builder.append(timestamp=ts, key=key, value=value, headers=headers if magic == 2 else None)
        builder.close()
        out += builder.buffer()
        offset += len(records)
    return bytes(out)


def _parse(cls, data: bytes, fetch_offset: int):
    parts = cls(fetch_offset, TP, MemoryRecords(data))
    got, error = [], None
    try:
        while parts:  # as the fetcher takes them: a few at a time, until drained
            got.extend(parts.take(7))
    except CorruptRecordError as exc:
        error = type(exc)
    return got, error, parts.next_fetch_offset, parts.records_read, parts.bytes_read


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(magic=st.sampled_from([0, 1, 2, 2, 2]),
       batches=st.lists(st.tuples(st.sampled_from(CODECS), st.integers(0, 3),
                                  st.lists(_record, min_size=1, max_size=12)),
                        min_size=1, max_size=4),
       skip=st.integers(0, 30))
def test_the_same_records_as_kafka_python(magic: int, batches: list, skip: int) -> None:
    data = _buffer(batches, magic)
    assert _parse(LeanPartitionRecords, data, skip) == _parse(Fetcher.PartitionRecords, data, skip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(_record, min_size=1, max_size=6), codec=st.sampled_from(CODECS),
       cut=st.integers(1, 400), flip=st.tuples(st.integers(0, 10**6), st.integers(1, 255)))
def test_broken_buffers_fail_alike(records: list, codec: int, cut: int, flip: tuple[int, int]) -> None:
    """A truncated or bit-flipped batch (CRC checking off, so the record parser itself must notice)."""
    data = bytearray(_buffer([(codec, 0, records)], 2))
    at, mask = flip
    data[61 + at % max(1, len(data) - 61)] ^= mask  # inside the records (after the 61-byte batch header)
    broken = bytes(data[:max(61, len(data) - cut)]) if cut % 2 else bytes(data)

    def parse(cls):
        parts = cls(0, TP, MemoryRecords(broken), check_crcs=False)
        got = []
        try:
            while parts:
                got.extend(parts.take(3))
        except Exception as exc:
            return got, type(exc).__name__
        return got, None

    lean, reference = parse(LeanPartitionRecords), parse(Fetcher.PartitionRecords)
    # Both reject the buffer with the same exception, or both accept it; what was yielded before is the same.
    assert lean[1] == reference[1]
    assert lean[0] == reference[0]


def test_crc_failures_are_refused() -> None:
    data = bytearray(_buffer([(0, 0, [(1, b"k", b'{"v":1}', [])])], 2))
    data[-2] ^= 0xFF
    with pytest.raises(CorruptRecordError, match="crc"):
        LeanPartitionRecords(0, TP, MemoryRecords(bytes(data))).take()


def test_installed_per_consumer_only() -> None:
    class FakeConsumer:
        def __init__(self) -> None:
            self._fetcher = Fetcher.__new__(Fetcher)

    mine, other = FakeConsumer(), FakeConsumer()
    use_lean_records(mine)
    assert mine._fetcher.PartitionRecords is LeanPartitionRecords
    assert other._fetcher.PartitionRecords is Fetcher.PartitionRecords
