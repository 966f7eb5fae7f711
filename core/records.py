"""The raw-events topic's record format (docs/record-format.md; ADR 55): many events in one Kafka record.

Per-record costs (the producer's bookkeeping, the broker's, each consumer's parse) were what held the
pipeline's end-to-end rate far below its stages' (issue 19), so the shipper packs the events of one
partition into one record:

    tally-batch/1 <count>\\n<event>\\n<event>\\n ... <event>\\n

- the header is ASCII: the magic `tally-batch/`, the format version (1), one space, the number of
  events in decimal, a newline;
- then exactly `<count>` events, each followed by one newline; each event is the JSON object a
  single-event record carries (orjson's compact output: it never holds a raw newline);
- the record's key is empty (None); it was sent to the partition its events' domains map to, by the
  same hash as a keyed send (kafka-python's DefaultPartitioner: murmur2 of the domain's bytes, & 0x7fffffff,
  mod the partition count), so a domain's events stay in one partition, in order.

A value whose first byte is `{` is a single event (format 0: what the shipper wrote before this format,
and what other producers may write). A consumer must refuse, as a whole, a batched record of another
version, a bad header, or a count that does not match its lines (`RecordFormatError`); a malformed event
inside a well-formed batch is that event's problem alone.

Pure: no I/O, no Kafka client. `partition_for` reuses kafka-python's own murmur2 so the two can never
disagree, with a per-process cache (the pure-Python hash costs ~8 us a key).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kafka.partitioner.default import murmur2

__all__ = ["BATCH_MAGIC", "FORMAT_VERSION", "PackedRecord", "RecordFormatError", "encode_batch", "is_batch",
           "is_single_event", "pack", "partition_for", "split_batch"]

BATCH_MAGIC = b"tally-batch/"
FORMAT_VERSION = 1
_HEADER_V1 = BATCH_MAGIC + b"1 "
_MAX_HEADER = 40  # magic + version + count: far shorter; a longer first line is not a header
_partition_cache: dict[tuple[bytes, int], int] = {}


class RecordFormatError(ValueError):
    """A batched record that cannot be read as a whole (its events are not trusted individually either)."""


@dataclass(frozen=True, slots=True)
class PackedRecord:
    """One record to send: `value` holds `events` events of partition index `partition`."""

    partition: int
    value: bytes
    events: int


def partition_for(key: bytes, partitions: int) -> int:
    """The partition (0 .. partitions-1) a keyed send of `key` goes to with kafka-python's DefaultPartitioner."""
    cached = _partition_cache.get((key, partitions))
    if cached is None:
        if len(_partition_cache) >= 100_000:
            _partition_cache.clear()
        cached = _partition_cache[(key, partitions)] = (murmur2(key) & 0x7FFFFFFF) % partitions
    return cached


def encode_batch(events: list[bytes]) -> bytes:
    """One batched record (format 1) holding `events` (each one event's JSON, no newline in it), in order."""
    if not events:
        raise ValueError("a batched record holds at least one event")
    if any(b"\n" in e for e in events):
        raise ValueError("an event of a batched record holds a newline")
    return b"".join((_HEADER_V1, str(len(events)).encode(), b"\n", b"\n".join(events), b"\n"))


def is_single_event(value: bytes) -> bool:
    """A format-0 record: one event's JSON object."""
    return value[:1] == b"{"


def is_batch(value: bytes) -> bool:
    """A batched record of some version (`split_batch` says whether this consumer reads that version)."""
    return value[:len(BATCH_MAGIC)] == BATCH_MAGIC


def split_batch(value: bytes) -> list[bytes]:
    """The events of a batched record, in order; raises RecordFormatError on an unreadable record."""
    head_end = value.find(b"\n", 0, _MAX_HEADER)
    if head_end < 0 or not is_batch(value):
        raise RecordFormatError("not a batched record (no `tally-batch/<version> <count>` header line)")
    version, _, count_text = value[len(BATCH_MAGIC):head_end].partition(b" ")
    if version != b"1":
        shown = version[:10].decode("ascii", "replace")
        raise RecordFormatError(f"batched record format version {shown!r} is not supported (this consumer "
                                f"reads version {FORMAT_VERSION}; see docs/record-format.md)")
    if not count_text.isdigit() or count_text[:1] == b"0":
        raise RecordFormatError(f"batched record header has no valid event count: {value[:head_end][:40]!r}")
    if value[-1:] != b"\n":
        raise RecordFormatError("batched record does not end with a newline (truncated?)")
    events = value[head_end + 1:-1].split(b"\n")
    if len(events) != int(count_text):
        raise RecordFormatError(f"batched record header says {int(count_text)} events, the record holds "
                                f"{len(events)} (truncated or corrupt)")
    return events


def pack(keyed: Iterable[tuple[bytes, bytes]], partitions: int, *, max_events: int,
         max_bytes: int) -> Iterator[PackedRecord]:
    """Group (key, event) pairs into batched records per partition, each of at most `max_events` events
    and about `max_bytes` bytes (an event bigger than that alone travels alone), keeping each partition's
    events in their given order. Records are yielded in the order they fill up, the rest at the end in
    partition order."""
    if partitions < 1 or max_events < 1:
        raise ValueError("partitions and max_events must be at least 1")
    pending: dict[int, list[bytes]] = {}
    sizes: dict[int, int] = {}
    for key, event in keyed:
        p = partition_for(key, partitions)
        held = pending.get(p)
        size = len(event) + 1
        if held and sizes[p] + size > max_bytes:
            yield PackedRecord(p, encode_batch(held), len(held))
            held = None
        if not held:
            held = pending[p] = []
            sizes[p] = _MAX_HEADER
        held.append(event)
        sizes[p] += size
        if len(held) >= max_events:
            yield PackedRecord(p, encode_batch(held), len(held))
            del pending[p]
    for p in sorted(pending):
        yield PackedRecord(p, encode_batch(pending[p]), len(pending[p]))
