"""Shipped spool segments, kept until it is safe to drop them (ADR 16).

The embedded broker (tansu, memory storage) forgets its topic when it restarts, and
so does any broker whose topic is deleted and recreated. So the shipper does not
delete a segment once Kafka acknowledged it: it moves it to `spool/shipped/` with a
sidecar (`<segment>.ship`, JSON) naming the topic incarnation it went to (Kafka's
topic id) and the offset each partition reached. Then:

- when the topic id changes (a new incarnation), every retained segment is shipped
  again to the new one (the stores dedup by event hash, so a repeat counts once);
- a segment is dropped once every consumer group that can be checked from here has
  stored offsets past it in the same incarnation (PostgreSQL's `consumer_offsets` for
  the rollup group, ClickHouse's for the loader, asked of the analyst server with chDB)
  AND, if some group cannot be checked, it was last shipped at least `retain_s` ago;
- `retain_bytes` caps the disk the retained segments take (0 = no cap): over it the
  oldest are dropped even if still needed, loudly, since the alternative is a full
  spool disk and a collector answering 503 to everyone.

A sidecar is written (fsync'd) before its segment is moved into `shipped/`; a crash in
between leaves the segment in the spool, which ships it again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psycopg

from spool.segments import fsync_dir

log = logging.getLogger(__name__)

SHIPPED_DIR = "shipped"
SIDECAR = ".ship"

# group name -> {partition: next offset stored} for (topic, topic_id); raises if the store is unreachable
OffsetReader = Callable[[str, str], dict[int, int]]


@dataclass(slots=True)
class Shipment:
    """Where a retained segment went last: topic, incarnation, end offset per partition, when."""

    topic: str
    topic_id: str  # "" = unknown incarnation: always shipped again
    end_offsets: dict[int, int]
    shipped_at: float  # wall clock (time.time()) of the last ship
    records: int
    ships: int = 1

    def to_json(self) -> bytes:
        return orjson.dumps({"topic": self.topic, "topic_id": self.topic_id,
                             "end_offsets": {str(p): o for p, o in self.end_offsets.items()},
                             "shipped_at": self.shipped_at, "records": self.records, "ships": self.ships})

    @classmethod
    def from_json(cls, data: bytes) -> Shipment:
        d = orjson.loads(data)
        return cls(str(d["topic"]), str(d["topic_id"]), {int(p): int(o) for p, o in d["end_offsets"].items()},
                   float(d["shipped_at"]), int(d["records"]), int(d.get("ships", 1)))


@dataclass(slots=True)
class Retained:
    path: Path  # the segment, under shipped/
    shipment: Shipment | None  # None: the sidecar is missing or unreadable (ship again)
    size: int = 0

    @property
    def sidecar(self) -> Path:
        return sidecar_of(self.path)


def sidecar_of(segment: Path) -> Path:
    return segment.with_name(segment.name + SIDECAR)


def replace_durably(target: Path, data: bytes) -> None:
    """Make `target` hold `data`, atomically: write a `.tmp` beside it, fsync, rename over it."""
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(target)


def write_sidecar(segment_in_shipped: Path, shipment: Shipment) -> None:
    """Atomically (write, fsync, rename) record where `segment_in_shipped` went."""
    replace_durably(sidecar_of(segment_in_shipped), shipment.to_json())


@dataclass
class Decision:
    reship: list[Retained] = field(default_factory=list)
    drop: list[Retained] = field(default_factory=list)  # safe: every group has it
    evict: list[Retained] = field(default_factory=list)  # over the byte cap: dropped although maybe needed
    evict_unconfirmed: int = 0  # of those, not yet stored by a group that can be checked


def decide(retained: Sequence[Retained], *, topic: str, topic_id: str, now: float,
           stored: dict[str, dict[int, int]] | None, unchecked_groups: bool,
           retain_s: float, retain_bytes: int) -> Decision:
    """What to do with the retained segments (oldest first). Pure.

    `topic_id` is the current incarnation ("" when unknown: then nothing is re-shipped or
    dropped, except by the byte cap). `stored` maps each checkable group to its stored
    offsets in the current incarnation (None: the store could not be read, nothing is
    known to be stored). `unchecked_groups`: some consumer group cannot be checked from
    here, so `retain_s` applies too.
    """
    out = Decision()
    kept: list[Retained] = []
    confirmed: set[int] = set()  # id() of kept segments every checkable group has stored
    for seg in retained:
        s = seg.shipment
        if topic_id and (s is None or s.topic != topic or s.topic_id != topic_id):
            out.reship.append(seg)
            kept.append(seg)
            continue
        if not topic_id or s is None or stored is None:
            kept.append(seg)
            continue
        done = all(offsets.get(p, -1) >= end for offsets in stored.values() for p, end in s.end_offsets.items())
        if done and (not unchecked_groups or now - s.shipped_at >= retain_s):
            out.drop.append(seg)
        else:
            kept.append(seg)
            if done:
                confirmed.add(id(seg))
    if retain_bytes > 0:
        used = sum(seg.size for seg in kept)
        for seg in kept:  # oldest first
            if used <= retain_bytes:
                break
            out.evict.append(seg)
            out.evict_unconfirmed += id(seg) not in confirmed
            used -= seg.size
        if out.evict:
            gone = {id(seg) for seg in out.evict}
            out.reship = [seg for seg in out.reship if id(seg) not in gone]
    return out


class RetainedSegments:
    """The `shipped/` directory of one spool."""

    def __init__(self, spool_dir: Path) -> None:
        self.directory = spool_dir / SHIPPED_DIR  # made on the first keep

    def keep(self, segment: Path, shipment: Shipment) -> Path:
        """Move an acknowledged segment from the spool into shipped/ with its sidecar."""
        self.directory.mkdir(exist_ok=True)
        target = self.directory / segment.name
        write_sidecar(target, shipment)
        segment.rename(target)
        fsync_dir(self.directory)
        fsync_dir(segment.parent)
        return target

    def update(self, seg: Retained, shipment: Shipment) -> None:
        write_sidecar(seg.path, shipment)
        seg.shipment = shipment

    def list(self) -> list[Retained]:
        """Retained segments, oldest first (segment names sort by creation within a writer)."""
        out = []
        for path in sorted(self.directory.glob("*.seg")):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            try:
                shipment = Shipment.from_json(sidecar_of(path).read_bytes())
            except (OSError, ValueError, KeyError, TypeError):
                shipment = None
            out.append(Retained(path, shipment, size))
        # Oldest ship first: re-ships keep roughly the original order across writers.
        out.sort(key=lambda r: (r.shipment.shipped_at if r.shipment else 0.0, r.path.name))
        return out

    def remove(self, segs: Iterable[Retained]) -> int:
        n = 0
        for seg in segs:
            seg.path.unlink(missing_ok=True)
            seg.sidecar.unlink(missing_ok=True)
            n += 1
        if n:
            fsync_dir(self.directory)
        return n

    def remove_orphan_sidecars(self) -> None:
        """Sidecars whose segment never arrived (a crash between the two steps of `keep`)."""
        for sidecar in self.directory.glob(f"*{SIDECAR}"):
            if not sidecar.with_name(sidecar.name[: -len(SIDECAR)]).exists():
                sidecar.unlink(missing_ok=True)
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def bytes_used(self) -> int:
        return sum(r.size for r in self.list())


def postgres_offsets(dsn: str, group: str, *, connect_timeout: int = 3) -> OffsetReader:
    """Stored offsets of a PostgreSQL-backed consumer group (the rollup worker's), exactly in one incarnation."""
    state: dict[str, psycopg.Connection] = {}

    def read(topic: str, topic_id: str) -> dict[int, int]:
        conn = state.get("conn")
        if conn is None or conn.closed or conn.broken:
            conn = state["conn"] = psycopg.connect(dsn, connect_timeout=connect_timeout, autocommit=True)
        try:
            rows = conn.execute("SELECT partition, next_offset FROM consumer_offsets"
                                " WHERE consumer_group = %s AND topic = %s AND topic_id = %s",
                                (group, topic, topic_id)).fetchall()
        except psycopg.Error:
            conn.close()
            state.pop("conn", None)
            raise
        return {int(p): int(o) for p, o in rows}

    return read

