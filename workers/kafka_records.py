"""A leaner record parser for the workers' consumers (kafka-python 3.0.12; ADR 27).

kafka-python turns every fetched record into Python objects field by field: a `DefaultRecord` per
record built by a generic varint decoder, then a `ConsumerRecord` built from its properties, with
header sizes summed and deserializers called even when there are none. That costs about 5 us per
record, half of what raw kafka-python consume costs per record on this machine, and the workers pay
it under the same GIL as their own decoding.

`LeanPartitionRecords` replaces only the per-record loop of message format v2 (every record batch
a current broker writes). Everything around it is kafka-python's own, kept in the same order:
the batch CRC check, transaction markers and aborted transactions, control batches, skipping
records before the fetch offset, the bookkeeping of `next_fetch_offset`, and message formats 0/1.
Each record is checked as strictly as kafka-python checks it (declared length, header count, no
bytes left over after the last record); a malformed record raises `CorruptRecordError`, as there.
The records yielded are the same `ConsumerRecord` tuples (tests/test_kafka_records.py compares
both parsers field by field on generated batches).

Install per consumer with `use_lean_records(consumer)`; other consumers in the process (the bench's
raw floor) keep kafka-python's parser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError
from kafka.protocol.consumer import IsolationLevel
from kafka.record.util import decode_varint

__all__ = ["LeanPartitionRecords", "use_lean_records"]

Headers = list[tuple[str, bytes | None]]
_NO_HEADERS: Headers = []  # shared by every record without headers (one allocation fewer per record; never mutated)


def use_lean_records(consumer: KafkaConsumer) -> None:
    """Make `consumer` (a KafkaConsumer) parse fetched v2 batches with `LeanPartitionRecords`."""
    fetcher = consumer._fetcher
    if not hasattr(fetcher, "PartitionRecords"):  # pragma: no cover - another kafka-python layout
        raise RuntimeError("this kafka-python has no Fetcher.PartitionRecords to replace")
    fetcher.PartitionRecords = LeanPartitionRecords


def _records_v2(batch: Any, tp: TopicPartition, leader_epoch: int,  # long-function: ADR 27
                parts: LeanPartitionRecords) -> Iterator[ConsumerRecord]:
    """Yield the ConsumerRecords of one v2 batch (a kafka-python DefaultRecordBatch); `parts` is the
    PartitionRecords (bookkeeping). One loop on purpose: a helper call per record costs 2-5 %, one per
    varint 19 % (ADR 27, addendum)."""
    batch._maybe_uncompress()
    data = bytes(batch._buffer)
    pos = batch._pos
    count = batch.records_count
    base_offset = batch.base_offset
    ts_type = batch.timestamp_type
    log_append = ts_type == batch.LOG_APPEND_TIME
    first_ts, max_ts = batch.first_timestamp, batch.max_timestamp
    topic, partition = tp.topic, tp.partition
    end = len(data)
    new_record = tuple.__new__
    try:
        for _ in range(count):
            # Record => Length Attributes TimestampDelta OffsetDelta Key Value Headers (zigzag varints).
            # Each varint is read inline, 1- and 2-byte forms first (every field of a typical record):
            # a helper call per field would cost about as much as the rest of the loop (ADR 27).
            b = data[pos]
            if b < 0x80:
                length, pos = (b >> 1) ^ -(b & 1), pos + 1
            elif data[pos + 1] < 0x80:
                b = (b & 0x7f) | (data[pos + 1] << 7)
                length, pos = (b >> 1) ^ -(b & 1), pos + 2
            else:
                length, pos = decode_varint(data, pos)
            start = pos
            b = data[pos]  # attributes: unused in v2
            if b < 0x80:
                pos += 1
            else:
                _, pos = decode_varint(data, pos)
            b = data[pos]
            if b < 0x80:
                ts_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
            elif data[pos + 1] < 0x80:
                b = (b & 0x7f) | (data[pos + 1] << 7)
                ts_delta, pos = (b >> 1) ^ -(b & 1), pos + 2
            else:
                ts_delta, pos = decode_varint(data, pos)
            b = data[pos]
            if b < 0x80:
                offset_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
            elif data[pos + 1] < 0x80:
                b = (b & 0x7f) | (data[pos + 1] << 7)
                offset_delta, pos = (b >> 1) ^ -(b & 1), pos + 2
            else:
                offset_delta, pos = decode_varint(data, pos)
            b = data[pos]
            if b < 0x80:
                key_len, pos = (b >> 1) ^ -(b & 1), pos + 1
            elif data[pos + 1] < 0x80:
                b = (b & 0x7f) | (data[pos + 1] << 7)
                key_len, pos = (b >> 1) ^ -(b & 1), pos + 2
            else:
                key_len, pos = decode_varint(data, pos)
            if key_len >= 0:
                key = data[pos:pos + key_len]
                pos += key_len
            else:
                key = None
            b = data[pos]
            if b < 0x80:
                value_len, pos = (b >> 1) ^ -(b & 1), pos + 1
            elif data[pos + 1] < 0x80:
                b = (b & 0x7f) | (data[pos + 1] << 7)
                value_len, pos = (b >> 1) ^ -(b & 1), pos + 2
            else:
                value_len, pos = decode_varint(data, pos)
            if value_len >= 0:
                value = data[pos:pos + value_len]
                pos += value_len
            else:
                value = None
            b = data[pos]
            if b == 0:
                pos += 1
                headers = _NO_HEADERS
                header_size = -1
            else:
                headers, pos = _headers(data, pos)  # may still be empty: a 0 count written in 2+ bytes
                header_size = sum(len(k.encode("utf-8")) + (len(v) if v is not None else 0)
                                  for k, v in headers) if headers else -1
            if pos - start != length:
                raise CorruptRecordError(
                    f"Invalid record size: expected to read {length} bytes in record payload, "
                    f"but instead read {pos - start}")
            if pos > end:
                raise IndexError("record runs past the end of its batch")
            offset = base_offset + offset_delta
            parts.records_read += 1
            parts.bytes_read += length  # as kafka-python counts it (the length prefix not included)
            parts.next_fetch_offset = offset + 1
            # tuple.__new__ directly: the namedtuple's own __new__ is one more Python call per record
            yield new_record(ConsumerRecord, (topic, partition, leader_epoch, offset,
                                              max_ts if log_append else first_ts + ts_delta, ts_type, key, value,
                                              headers, None, key_len if key_len >= 0 else -1,
                                              value_len if value_len >= 0 else -1, header_size))
    except (ValueError, IndexError) as err:
        raise CorruptRecordError(f"Found invalid record structure: {err!r}") from None
    if pos != end:
        raise CorruptRecordError(f"{end - pos} unconsumed bytes after all records consumed")


def _headers(data: bytes, pos: int) -> tuple[Headers, int]:
    count, pos = decode_varint(data, pos)
    if count < 0:
        raise CorruptRecordError(f"Found invalid number of record headers {count}")
    headers: Headers = []
    for _ in range(count):
        key_len, pos = decode_varint(data, pos)
        if key_len < 0:
            raise CorruptRecordError(f"Invalid negative header key size {key_len}")
        key = data[pos:pos + key_len].decode("utf-8")
        pos += key_len
        value_len, pos = decode_varint(data, pos)
        if value_len >= 0:
            value = data[pos:pos + value_len]
            pos += value_len
        else:
            value = None
        headers.append((key, value))
    return headers, pos


# kafka-python is untyped (Fetcher.PartitionRecords is Any to mypy); this class exists to subclass it.
class LeanPartitionRecords(Fetcher.PartitionRecords):  # type: ignore[misc]
    """kafka-python's PartitionRecords with a lean per-record loop for v2 batches (module docstring)."""

    def _unpack_records(self, tp: TopicPartition, records: Any, key_deserializer: Callable[..., Any] | None,
                        value_deserializer: Callable[..., Any] | None) -> Iterator[ConsumerRecord]:
        if key_deserializer is not None or value_deserializer is not None:
            # The workers take raw bytes; anyone else gets kafka-python's own loop.
            yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            return
        try:
            batch = records.next_batch()
            last_batch = None
            while batch is not None:
                last_batch = batch
                if self.check_crcs and not batch.validate_crc():
                    raise CorruptRecordError(
                        f"Record batch for partition {self.topic_partition} at offset {batch.base_offset} "
                        "failed crc check")
                if batch.magic != 2:
                    # Formats 0/1 (pre-0.11 brokers): kafka-python's own per-record code, through a
                    # one-batch view so that the bookkeeping stays its own.
                    yield from self._legacy_batch(tp, batch)
                    batch = records.next_batch()
                    continue
                self.leader_epoch = batch.leader_epoch
                if self.isolation_level == IsolationLevel.READ_COMMITTED and batch.has_producer_id():
                    self._consume_aborted_transactions_up_to(batch.last_offset)
                    producer_id = batch.producer_id
                    if self._contains_abort_marker(batch):
                        self.aborted_producer_ids.discard(producer_id)
                    elif self._is_batch_aborted(batch):
                        self.next_fetch_offset = batch.next_offset
                        batch = records.next_batch()
                        continue
                if batch.is_control_batch:
                    self.next_fetch_offset = batch.next_offset
                    batch = records.next_batch()
                    continue
                yield from _records_v2(batch, tp, self.leader_epoch, self)
                batch = records.next_batch()
            else:
                if last_batch and last_batch.magic == 2:
                    self.next_fetch_offset = last_batch.next_offset
                self.drain()
        except StopIteration:  # as kafka-python: never let it end the generator silently
            raise RuntimeError("StopIteration raised unpacking messageset") from None

    def _legacy_batch(self, tp: TopicPartition, batch: Any) -> Iterator[ConsumerRecord]:
        for record in batch:
            if self.check_crcs and not record.validate_crc():
                raise CorruptRecordError(
                    f"Record for partition {self.topic_partition} at offset {record.offset} failed crc check")
            key, value = record.key, record.value
            self.records_read += 1
            self.bytes_read += record.size_in_bytes
            self.next_fetch_offset = record.offset + 1
            yield ConsumerRecord(tp.topic, tp.partition, self.leader_epoch, record.offset, record.timestamp,
                                 record.timestamp_type, key, value, record.headers, record.checksum,
                                 len(key) if key is not None else -1, len(value) if value is not None else -1, -1)
