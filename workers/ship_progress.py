"""How much of a spool segment the shipper has shipped: `progress/<stem>.json` in the spool (ADR 56).

The shipper ships the acknowledged-durable prefix of an open segment as it grows (the writer's watermark,
spool/watermark.py), and the rest once it is sealed, so a segment reaches Kafka in parts. After Kafka
acknowledged a part, and only then, the shipper records the byte offset shipped so far and where it
went (a `Shipment`: topic incarnation, end offset per partition, records), written to a temporary file,
fsync'd and renamed over the old one. The record is keyed by the segment's stem, so it survives the
seal's rename (`.open` -> `.seg`) and recovery's.

What the next part starts from (`start`): the recorded offset, when the record names the topic
incarnation the shipper last saw and the offset is a line boundary of the segment; otherwise 0 (the
prefix went to a topic that is gone, or to an unknown incarnation, or the record is unreadable): the
whole segment is shipped again, which only doubles (the stores count each event hash once). A record
never claims more than Kafka acknowledged, so no line is ever skipped. Crashing between Kafka's ack
and the rename ships that part again on restart (at-least-once: the one unavoidable double).

When the sealed segment's last part is acknowledged, the shipments of all its parts merge into the one
its `shipped/` sidecar keeps (`merge`: end offsets per partition at their highest, records summed, the
incarnation kept only when every part went to the same one, else "" and retention ships the whole
segment again), and the progress record is removed. A record whose segment is neither `.open` nor
`.seg` in the spool any more is stray (a crash after the move into `shipped/`) and is removed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import orjson

from spool import watermark
from spool.segments import OPEN, SEALED
from workers.retention import Shipment, replace_durably

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"
SUFFIX = ".json"


@dataclass(slots=True)
class Progress:
    """`offset` bytes of a segment (whole lines) were acknowledged by Kafka, as `shipment` says."""

    offset: int
    shipment: Shipment

    def to_json(self) -> bytes:
        return orjson.dumps({"offset": self.offset, "shipment": orjson.loads(self.shipment.to_json())})

    @classmethod
    def from_json(cls, data: bytes) -> Progress:
        d = orjson.loads(data)
        return cls(int(d["offset"]), Shipment.from_json(orjson.dumps(d["shipment"])))


def stem(segment: Path) -> str:
    return segment.with_suffix("").name


class ProgressBook:
    """The progress records of one spool, cached in memory (one shipper per spool writes them)."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.directory = spool_dir / PROGRESS_DIR
        self._cache: dict[str, Progress | None] = {}

    def get(self, segment: Path) -> Progress | None:
        key = stem(segment)
        if key not in self._cache:
            try:
                self._cache[key] = Progress.from_json((self.directory / (key + SUFFIX)).read_bytes())
            except FileNotFoundError:
                self._cache[key] = None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("shipper: unreadable progress of %s (%s); shipping it from the start", key, exc)
                self._cache[key] = None
        return self._cache[key]

    def put(self, segment: Path, progress: Progress) -> None:
        """Record `progress` durably (tmp, fsync, rename); call it only after Kafka acknowledged."""
        key = stem(segment)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        replace_durably(self.directory / (key + SUFFIX), progress.to_json())
        self._cache[key] = progress

    def forget(self, segment: Path) -> None:
        """Remove the record of a segment that left the spool (moved into shipped/, or dropped)."""
        key = stem(segment)
        self._cache.pop(key, None)
        (self.directory / (key + SUFFIX)).unlink(missing_ok=True)

    def remove_strays(self) -> int:
        """Remove records whose segment is neither `.open` nor `.seg` in the spool; returns how many. The
        `.open` name is looked up first: a seal renames it to `.seg` between the two lookups, never back."""
        removed = 0
        for path in self.directory.glob(f"*{SUFFIX}*"):
            key = path.name.split(SUFFIX)[0]
            if not self._gone(key):
                continue
            path.unlink(missing_ok=True)
            self._cache.pop(key, None)
            removed += 1
        for key in [key for key in self._cache if self._gone(key)]:  # e.g. empty segments, never kept
            del self._cache[key]
        return removed

    def _gone(self, key: str) -> bool:
        return not (self.spool_dir / (key + OPEN)).exists() and not (self.spool_dir / (key + SEALED)).exists()


@dataclass(slots=True)
class Part:
    """The bytes [begin, end) of a segment to ship next, and the shipment of [0, begin) (None: begin is 0)."""

    begin: int
    end: int
    data: bytes
    earlier: Shipment | None


def open_part(segment: Path, progress: Progress | None, topic_id: str | None) -> Part | None:
    """The acknowledged-durable, not yet shipped part of open `segment`; None when there is none (no new
    durable line, no watermark, or the segment was sealed meanwhile: it then ships as a sealed one)."""
    durable = watermark.read(segment)
    if not durable:
        return None
    try:
        fd = os.open(segment, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:  # through the descriptor: a seal's rename from here on changes nothing of what is read
        offset = progress.offset if progress is not None else 0
        begin = start(progress, topic_id, os.pread(fd, 1, offset - 1) if offset else b"")
        if durable <= begin:
            return None
        data = os.pread(fd, durable - begin, begin)
    finally:
        os.close(fd)
    if len(data) != durable - begin or not data.endswith(b"\n"):  # never: the writer's contract (ADR 56)
        log.error("shipper: %s is shorter than its published durable length %d; not shipping it open",
                  segment.name, durable)
        return None
    return Part(begin, durable, data, progress.shipment if begin and progress is not None else None)


def sealed_part(segment: Path, progress: Progress | None, topic_id: str | None) -> Part:
    """What is left to ship of sealed `segment` (immutable: all of it is acknowledged-durable)."""
    data = segment.read_bytes()
    offset = progress.offset if progress is not None else 0
    begin = start(progress, topic_id, data[offset - 1:offset] if offset else b"")
    return Part(begin, len(data), data[begin:], progress.shipment if begin and progress is not None else None)


def open_pending(segment: Path, progress: Progress | None, topic_id: str | None) -> bool:
    """Whether open `segment` has acknowledged-durable lines not yet shipped (cheap: one small read)."""
    durable = watermark.read(segment)
    if not durable:
        return False
    usable = progress is not None and bool(topic_id) and progress.shipment.topic_id == topic_id
    return durable > (progress.offset if usable and progress is not None else 0)


def start(progress: Progress | None, topic_id: str | None, data_before: bytes) -> int:
    """Where the next part of a segment begins: the recorded offset if it is usable for `topic_id` (the
    incarnation last seen) and `data_before` (the segment's byte just before it) ends a line; else 0."""
    if progress is None or not progress.offset or not topic_id or progress.shipment.topic_id != topic_id:
        return 0
    return progress.offset if data_before == b"\n" else 0


def merge(earlier: Shipment | None, later: Shipment) -> Shipment:
    """One shipment for the parts of a segment shipped so far: `earlier` (None: none) then `later`."""
    if earlier is None:
        return later
    same = earlier.topic == later.topic and earlier.topic_id == later.topic_id
    offsets = dict(earlier.end_offsets) if same else {}
    for partition, end in later.end_offsets.items():
        offsets[partition] = max(offsets.get(partition, 0), end)
    return Shipment(later.topic, later.topic_id if same else "", offsets, later.shipped_at,
                    earlier.records + later.records, later.ships)
