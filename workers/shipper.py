"""The shipper: forwards spool segments to Kafka, and keeps them until it is safe to drop them.

An open segment ships as it grows, up to the length its writer published as acknowledged-durable, and
the rest once it is sealed; how far each went is recorded after Kafka's ack (workers/ship_progress.py,
ADR 56), so no line goes twice across a seal, and a crash re-sends at most the part in flight.

Contract: a segment leaves the spool only after Kafka acknowledged (acks=all) every
record in it, and even then it is not deleted: it moves to `spool/shipped/` with the
topic incarnation (Kafka's topic id) and per-partition offsets it reached
(workers/retention.py, ADR 16). If the topic id changes (the memory-only embedded broker
restarted, or the topic was recreated), every retained segment is shipped again to the
new incarnation. A retained segment is deleted once the consumer groups stored offsets
past it (`offset_readers`: the rollup group's in PostgreSQL, the loader's in ClickHouse)
and, if some group cannot be checked (`unchecked_groups`), `retain_s` has passed since its
last ship; `retain_bytes` caps the disk they take. On a disk too full for a sidecar, an
acknowledged segment is held in the spool instead (ADR 28): the shipper never stops.

After any failure the producer is thrown away and a new one is made for the next
attempt: an idempotent producer can end in a fatal state (e.g. the broker lost its
producer id) from which it never recovers. A crash at any point re-sends the whole
segment on restart; the stores dedup on the event hash, so a re-send is never counted
twice. Lines that are not an event (corruption) are moved to a bounded quarantine file
instead of blocking the segment; each spool record carries a CRC32C, so a torn or flipped
record is caught here, counted by reason, and never blocks the records behind it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from core import metrics
from core.records import pack
from spool.recovery import recover_orphans
from spool.segments import (
    OPEN,
    SEALED,
    CorruptRecord,
    disk_full,
    fsync_dir,
    read_record,
    sealed_segments,
    segment_records,
)
from workers.retention import OffsetReader, Retained, RetainedSegments, Shipment, decide
from workers.ship_progress import Part, Progress, ProgressBook, merge, open_part, open_pending, sealed_part
from workers.stored_offsets import StoredOffsets

log = logging.getLogger(__name__)

QUARANTINE_MAX_BYTES = 64 * 1024 * 1024
# How often an idle shipper looks for new acknowledged-durable lines (ADR 56): a directory listing and a
# 16-byte read per open segment. A full pass (orphan recovery, topic id, retention) runs every `idle_wait_s`.
TICK_S = 0.02
OPEN_PAUSE_S = 10.0  # open segments wait for their seal this long after the disk had no room for a progress record


def keyed_events(data: bytes) -> tuple[list[tuple[bytes, bytes]], list[tuple[str, bytes]]]:
    """The (domain bytes, payload) of every intact spool record in `data`, and the (reason, line) of the others
    (torn | checksum | unframed | not_an_event)."""
    keyed: list[tuple[bytes, bytes]] = []
    bad: list[tuple[str, bytes]] = []
    for line in segment_records(data):
        try:
            payload = read_record(line)
            keyed.append((orjson.loads(payload)["domain"].encode(), payload))
        except CorruptRecord as exc:
            bad.append((exc.reason, line))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            bad.append(("not_an_event", line))
    return keyed, bad


class ShipError(RuntimeError):
    """Kafka did not acknowledge a segment; it stays in the spool and is retried."""


class Shipper:
    def __init__(self, spool_dir: Path, make_producer: Callable[[], KafkaProducer], topic: str, *,
                 ack_timeout_s: float = 30.0, retain_s: float = 3600.0, retain_bytes: int = 1 << 30,
                 offset_readers: dict[str, OffsetReader] | None = None, unchecked_groups: bool = True,
                 topic_id_probe: Callable[[], str | None] | None = None, retention_interval_s: float = 2.0,
                 clock: Callable[[], float] = time.time, record_events: int = 250,
                 record_bytes: int = 256 * 1024) -> None:
        self.spool_dir = spool_dir
        self.record_events = record_events  # events per Kafka record at most (TALLY_KAFKA_RECORD_EVENTS)
        self.record_bytes = record_bytes  # and bytes (TALLY_KAFKA_RECORD_BYTES)
        self.make_producer = make_producer
        self._producer: KafkaProducer | None = None
        self.topic = topic
        self.ack_timeout_s = ack_timeout_s
        self.shipped = 0
        self.reshipped = 0  # records shipped again to a new topic incarnation
        self.dropped_segments = 0  # retained segments deleted because every group has them
        self.evicted_segments = 0  # retained segments deleted by the byte cap although maybe needed
        self.quarantined = 0
        self.quarantined_by_reason: Counter[str] = Counter()  # torn | checksum | unframed | not_an_event
        self.retain_s = retain_s
        self.retain_bytes = retain_bytes
        # consumer groups whose stored offsets we can read (name -> reader); the others are covered by retain_s
        self.offset_readers = dict(offset_readers or {})
        self.unchecked_groups = unchecked_groups
        self._probe = topic_id_probe
        self._admin: KafkaAdminClient | None = None
        # The topic incarnation the current producer has sent to: a producer id from a broker that has since
        # restarted is unknown to the new one, and kafka-python retries into it until the delivery timeout.
        self._producer_incarnation: str | None = None
        self._bootstrap: list[str] | None = None  # from the first producer's config, for the admin client
        self.retention_interval_s = retention_interval_s
        self._next_retention = 0.0
        self.clock = clock
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.retained = RetainedSegments(spool_dir)
        # Acknowledged segments left in the spool because the disk had no room for their sidecars (ADR 28).
        self._held: dict[Path, Retained] = {}
        self.retained.remove_orphan_sidecars()
        # How much of each segment went already (open segments ship their durable prefix as it grows; ADR 56).
        self.progress = ProgressBook(spool_dir)
        self.progress.remove_strays()
        self._seen_topic_id: str | None = None  # the incarnation the last topic id read named
        self._open_paused_until = 0.0  # monotonic; open segments are not shipped before it (a full disk)
        self._stored = StoredOffsets(lambda topic_id: {group: read(self.topic, topic_id)
                                                       for group, read in self.offset_readers.items()})

    def ship_once(self) -> int:
        """Re-ship retained segments if the topic incarnation changed, ship every sealed segment present
        now and the new acknowledged-durable lines of every open one, then drop the retained segments that
        are safe to drop. Returns the number of new records acknowledged (re-shipped ones are counted in
        `reshipped`)."""
        recover_orphans(self.spool_dir)
        self._retain_held()
        topic_id = self.topic_id()
        if topic_id:
            self._reship_stale(topic_id)
        total = self.ship_new()
        if time.monotonic() >= self._next_retention:
            self.apply_retention()
            self.progress.remove_strays()
            self._next_retention = time.monotonic() + self.retention_interval_s
        return total

    def ship_new(self) -> int:
        """Ship what is not shipped yet: the rest of every sealed segment, then the acknowledged-durable lines
        of every open one (ADR 56). Returns the number of new records acknowledged."""
        total = 0
        for segment in sealed_segments(self.spool_dir):
            if segment not in self._held:
                total += self.ship_segment(segment)
        if self._ships_open():
            for segment in sorted(self.spool_dir.glob(f"*{OPEN}")):
                total += self.ship_segment(segment)
        return total

    def _ships_open(self) -> bool:
        """Open segments ship as they grow only towards a named topic incarnation (a progress record must name
        where its part went, or the next part would start again from byte 0: a broker without topic ids would
        get every open segment again at every tick), and not while a full disk pauses progress records."""
        return bool(self._seen_topic_id) and time.monotonic() >= self._open_paused_until

    def _note_progress(self, segment: Path, progress: Progress) -> None:
        """Record an open segment's progress. A disk too full for the record must not stop the shipper (ADR 28):
        open segments then wait for their seal for a while (the part just sent goes again then: doubles only)."""
        try:
            self.progress.put(segment, progress)
        except OSError as exc:
            if not disk_full(exc):
                raise
            self._open_paused_until = time.monotonic() + OPEN_PAUSE_S
            log.warning("shipper: no room for the progress of %s; open segments ship when sealed for %.0f s",
                        segment.name, OPEN_PAUSE_S)

    def has_new(self) -> bool:
        """Whether `ship_new` would find something: a sealed segment, or an open one whose published durable
        length is past what went. Cheap enough to ask every TICK_S."""
        with os.scandir(self.spool_dir) as entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.name.endswith(SEALED) and path not in self._held:
                    return True
                if entry.name.endswith(OPEN) and self._ships_open() and \
                        open_pending(path, self.progress.get(path), self._seen_topic_id):
                    return True
        return False

    # -- topic incarnation ------------------------------------------------------------------------

    def topic_id(self) -> str | None:
        """Kafka's id of the topic's current incarnation, fresh from the broker; None if unreachable.

        Raises ShipError when the broker answers that the topic does not exist: the producer factory
        creates it with the configured partitions (a send would auto-create it with the broker's)."""
        found = self._read_topic_id()
        if found:
            self._seen_topic_id = found  # what a part's progress must name to be continued (ADR 56)
        return found

    def _read_topic_id(self) -> str | None:
        if self._probe is not None:
            return self._probe()
        for attempt in (1, 2):  # a broker restart breaks the admin client's connection: make a new one
            fresh = self._admin is None
            try:
                if self._admin is None:
                    if self._bootstrap is None:
                        self._bootstrap = list(self.producer.config["bootstrap_servers"])
                    bootstrap = self._bootstrap
                    self._admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000,
                                                   bootstrap_timeout_ms=2000)
                (described,) = self._admin.describe_topics([self.topic])
            except (KafkaError, OSError, ValueError) as exc:
                self._close_admin()
                if attempt == 2 or fresh:
                    log.debug("shipper: cannot read the topic id (%s)", exc)
                    return None
                continue
            if described.get("error_code") == 3:  # UNKNOWN_TOPIC_OR_PARTITION
                self._discard_producer()
                raise ShipError(f"topic {self.topic} does not exist (broker restarted?); will create it and retry")
            return str(described.get("topic_id") or "")
        return None

    def _close_admin(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:
                pass
            self._admin = None

    def _retained(self) -> list[Retained]:
        """Every acknowledged segment kept against a broker that forgets: in shipped/, and held in the spool."""
        return self.retained.list() + list(self._held.values())

    def _retain_held(self) -> None:
        """Move held segments into shipped/ once the disk has room for their sidecars again."""
        for path, seg in list(self._held.items()):
            assert seg.shipment is not None  # held only after Kafka acknowledged it
            try:
                if not self._try_keep(path, seg.shipment):
                    return
            except FileNotFoundError:
                pass
            del self._held[path]

    def _try_keep(self, segment: Path, shipment: Shipment) -> bool:
        """`retained.keep`; False (and nothing kept) when the disk has no room for the sidecar."""
        try:
            self.retained.keep(segment, shipment)
        except OSError as exc:
            if not disk_full(exc):
                raise
            return False
        return True

    def _reship_stale(self, topic_id: str) -> None:
        stale = [seg for seg in self._retained()
                 if seg.shipment is None or seg.shipment.topic != self.topic or seg.shipment.topic_id != topic_id]
        if stale:
            log.warning("shipper: topic %s is a new incarnation (%s); shipping %d retained segments again",
                        self.topic, topic_id, len(stale))
        for seg in stale:
            try:
                count, offsets, shipped_to = self._send(seg.path)
            except ShipError:
                self._discard_producer()
                raise
            except KafkaError as exc:
                self._discard_producer()
                raise ShipError(f"{seg.path.name}: Kafka is unavailable ({exc}); will retry") from exc
            ships = seg.shipment.ships + 1 if seg.shipment else 1
            shipment = Shipment(self.topic, shipped_to, offsets, self.clock(), count, ships)
            if seg.path in self._held:
                seg.shipment = shipment
            else:
                self.retained.update(seg, shipment)
            self.reshipped += count
            metrics.RESHIPPED.inc(count)

    # -- retention --------------------------------------------------------------------------------

    def apply_retention(self) -> None:
        """Delete the retained segments every consumer group has stored (see workers/retention.py)."""
        retained = self._retained()
        if not retained:
            return
        try:
            topic_id = self.topic_id() or ""
        except ShipError:
            topic_id = ""
        stored: dict[str, dict[int, int]] | None = {}
        if topic_id:
            stored = self._stored.get(topic_id)  # read in the background while running (workers/stored_offsets.py)
        decision = decide(retained, topic=self.topic, topic_id=topic_id, now=self.clock(), stored=stored,
                          unchecked_groups=self.unchecked_groups, retain_s=self.retain_s,
                          retain_bytes=self.retain_bytes)
        self.dropped_segments += self._remove(decision.drop)
        if decision.evict:
            records = sum(seg.shipment.records if seg.shipment else 0 for seg in decision.evict)
            level = logging.ERROR if decision.evict_unconfirmed else logging.WARNING
            log.log(level, "shipper: shipped segments exceed TALLY_SPOOL_RETAIN_BYTES=%d; dropping the %d oldest "
                    "(%d records; %d of them not yet stored by every group checked here, the others within "
                    "TALLY_SPOOL_RETAIN_S for a group that cannot be checked): if the broker lost its topic now, "
                    "they would be lost",
                    self.retain_bytes, len(decision.evict), records, decision.evict_unconfirmed)
            self.evicted_segments += self._remove(decision.evict)

    def _remove(self, segs: list[Retained]) -> int:
        """Delete retained segments: held ones from the spool, the others (and their sidecars) from shipped/."""
        held = [seg for seg in segs if self._held.pop(seg.path, None) is not None]
        for seg in held:
            seg.path.unlink(missing_ok=True)
        if held:
            fsync_dir(self.spool_dir)
        return len(held) + self.retained.remove(seg for seg in segs if seg not in held)

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = self.make_producer()
        return self._producer

    def ship_segment(self, segment: Path) -> int:
        try:
            return self._ship_segment(segment)
        except ShipError:
            self._discard_producer()
            raise
        except KafkaError as exc:  # e.g. NoBrokersAvailable while making the producer
            self._discard_producer()
            raise ShipError(f"{segment.name}: Kafka is unavailable ({exc}); will retry") from exc

    def _ship_segment(self, segment: Path) -> int:
        """Ship the part of `segment` not shipped yet: of an open one, up to its published durable length (the
        progress is then recorded); of a sealed one, the rest, and then it moves into shipped/ with the
        shipment of all its parts (ADR 56)."""
        t0 = time.monotonic()
        sealed = segment.suffix == SEALED
        progress = self.progress.get(segment)
        part = sealed_part(segment, progress, self._seen_topic_id) if sealed else \
            open_part(segment, progress, self._seen_topic_id)
        if part is None:
            return 0
        count, shipment = self._send_part(segment, part)
        if not sealed:
            self._note_progress(segment, Progress(part.end, shipment))
        else:
            self._keep(segment, shipment)
            self.progress.forget(segment)
        self.shipped += count
        metrics.SHIPPED.inc(count)
        log.log(logging.INFO if sealed else logging.DEBUG, "shipper: shipped %s", segment.name, extra={
            "segment": segment.name, "records": count, "segment_records": shipment.records, "from_byte": part.begin,
            "to_byte": part.end, "topic": self.topic, "topic_id": shipment.topic_id,
            "end_offsets": shipment.end_offsets, "duration_ms": round((time.monotonic() - t0) * 1000, 2)})
        return count

    def _send_part(self, segment: Path, part: Part) -> tuple[int, Shipment]:
        """Send `part` (nothing when it is empty and earlier parts went); returns its records and the
        shipment of the segment's parts so far."""
        if not part.data and part.earlier is not None:  # every line went while it was open
            return 0, part.earlier
        count, offsets, shipped_to = self._send(segment, quarantine=True, data=part.data)
        return count, merge(part.earlier, Shipment(self.topic, shipped_to, offsets, self.clock(), count))

    def _keep(self, segment: Path, shipment: Shipment) -> None:
        """Move an acknowledged segment into shipped/. Its sidecar needs a little disk: on a full disk the
        segments both groups stored are dropped first, and if that frees nothing the segment is *held*: it
        stays where it is, its shipment is kept in memory (re-shipped to a new incarnation, dropped once both
        groups stored it, like any retained segment), and it moves to shipped/ when there is room. A shipper
        that dies meanwhile ships it again on its next start (the stores count it once). So a full disk
        never stops the shipper and never costs the protection against a broker that forgets (ADR 28)."""
        if self._try_keep(segment, shipment):
            return
        self.apply_retention()
        if self._try_keep(segment, shipment):
            return
        self.retained.remove_orphan_sidecars()
        self._held[segment] = Retained(segment, shipment, segment.stat().st_size)
        log.warning("shipper: the spool disk is too full for a sidecar; %s (%d records, acknowledged by Kafka) is "
                    "held in the spool until the stores have it or there is room", segment.name, shipment.records)

    def _send(self, segment: Path, *, quarantine: bool = False,
              data: bytes | None = None) -> tuple[int, dict[int, int], str]:
        """Send every intact spool record of `segment` (or of `data`, e.g. a durable prefix of it) as batched
        Kafka records and wait for all acks. Returns (events, end offset per partition, topic id the records
        went to; "" when it changed during the send, i.e. unknown)."""
        before = self.topic_id()
        if before is None:  # not sending blind: the incarnation it would reach must be named (ADR 16)
            raise ShipError(f"{segment.name}: Kafka is unreachable (no topic metadata); will retry")
        if self._producer_incarnation != before:
            # A producer that never sent to this incarnation may hold a producer id from a broker that has
            # restarted since; a fresh one is made for it (once per incarnation, and after any failure).
            self._discard_producer()
            self._producer_incarnation = before
        keyed, bad = keyed_events(segment.read_bytes() if data is None else data)
        # A domain's events go to the partition a keyed send of the domain would reach, packed into
        # batched records (core/records.py, ADR 55): per-record costs are paid once per batch.
        partitions = sorted(self.producer.partitions_for(self.topic))
        try:
            futures = [self.producer.send(self.topic, value=record.value, partition=partitions[record.partition])
                       for record in pack(keyed, len(partitions), max_events=self.record_events,
                                          max_bytes=self.record_bytes)]
        except ValueError as exc:  # "Unrecognized partition": the topic shrank under the producer's metadata
            self._discard_producer()
            raise ShipError(f"{segment.name}: the topic's partitions changed while sending ({exc}); will retry") \
                from exc
        self._flush(before)
        offsets: dict[int, int] = {}
        try:
            for future in futures:
                meta = future.get(timeout=self.ack_timeout_s)
                offsets[meta.partition] = max(offsets.get(meta.partition, 0), meta.offset + 1)
        except KafkaError as exc:
            raise ShipError(f"{segment.name}: Kafka did not acknowledge ({exc}); will retry") from exc
        if bad and quarantine:
            self._quarantine(segment.name, bad)
        try:
            after = self.topic_id()
        except ShipError:
            after = None
        # Acknowledged by an incarnation we cannot name for sure: ship it again to the next one we see.
        shipped_to = before if before and before == after else ""
        return len(keyed), offsets, shipped_to

    def _flush(self, topic_id: str | None) -> None:
        """Wait for every ack, up to `ack_timeout_s`; give up at once if the topic is recreated meanwhile
        (a restarted broker: the producer would retry into it until its delivery timeout)."""
        deadline = time.monotonic() + self.ack_timeout_s
        while True:
            try:
                self.producer.flush(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                return
            except KafkaTimeoutError:
                if time.monotonic() >= deadline:
                    raise
            now_id = self.topic_id()
            topic_id = topic_id or now_id
            if topic_id and now_id and now_id != topic_id:
                raise ShipError(f"topic {self.topic} was recreated while records were in flight; "
                                "shipping again to the new incarnation")

    def _quarantine(self, name: str, bad: list[tuple[str, bytes]]) -> None:
        self.quarantined += len(bad)
        self.quarantined_by_reason.update(reason for reason, _ in bad)
        metrics.count_quarantined(reason for reason, _ in bad)
        lines = [line for _, line in bad]
        try:
            kept = self._write_quarantine(name, lines)
        except OSError as exc:  # a full disk must not stop the records behind (these were never shippable)
            if not disk_full(exc):
                raise
            log.error("shipper: no room to quarantine %d corrupt lines from %s; dropped", len(lines), name)
            return
        if kept:
            log.warning("shipper: quarantined %d corrupt lines from %s (%s)", len(lines), name,
                        ", ".join(sorted({reason for reason, _ in bad})))

    def _write_quarantine(self, name: str, lines: list[bytes]) -> bool:
        """Append `lines` to quarantine/<name>.bad (fsync'd); False if the quarantine is over its cap."""
        qdir = self.spool_dir / "quarantine"
        qdir.mkdir(exist_ok=True)
        used = sum(p.stat().st_size for p in qdir.iterdir())
        if used > QUARANTINE_MAX_BYTES:
            log.error("shipper: quarantine is full (%d bytes); dropping %d corrupt lines from %s",
                      used, len(lines), name)
            return False
        with open(qdir / f"{name}.bad", "ab") as fh:
            fh.write(b"".join(line + b"\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _discard_producer(self) -> None:
        self._producer_incarnation = None
        if self._producer is not None:
            try:
                self._producer.close(timeout=0)
            except Exception:
                log.debug("shipper: error closing a failed producer", exc_info=True)
            self._producer = None

    def close(self) -> None:
        self._stored.close()
        self._close_admin()
        if self._producer is not None:
            self._producer.flush(timeout=self.ack_timeout_s)
            self._producer.close(timeout=self.ack_timeout_s)
            self._producer = None

    def run(self, stop: threading.Event, idle_wait_s: float = 0.2, tick_s: float = TICK_S) -> None:
        """Ship until `stop`: a full pass (`ship_once`) every `idle_wait_s`, and in between, every `tick_s`,
        whatever `has_new` finds (new durable lines of open segments, newly sealed ones)."""
        backoff = 0.5
        next_full = 0.0
        self._stored.background = True  # retention must not hold new lines back while it asks the stores
        while not stop.is_set():
            try:
                if time.monotonic() >= next_full:
                    shipped = self.ship_once()
                    next_full = time.monotonic() + idle_wait_s
                else:
                    shipped = self.ship_new() if self.has_new() else 0
                backoff = 0.5
            except (ShipError, OSError) as exc:  # OSError: the spool or quarantine disk
                log.error("shipper: %s; retrying in %.1fs", exc, backoff)
                metrics.SHIP_RETRIES.inc()
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not shipped:
                stop.wait(tick_s)
        try:  # what the (already stopped) collector spooled last, including its open segments
            self.ship_once()
        except (ShipError, OSError) as exc:  # OSError: the spool or quarantine disk
            log.warning("shipper: final ship failed (%s); the spool keeps it for next time", exc)
        finally:
            self.close()  # flush and close the producer whatever the last ship met
