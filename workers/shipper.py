"""The shipper: forwards sealed spool segments to Kafka, and keeps them until it is safe to drop them.

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
from spool.recovery import recover_orphans
from spool.segments import CorruptRecord, disk_full, fsync_dir, read_record, sealed_segments, segment_records
from workers.retention import OffsetReader, Retained, RetainedSegments, Shipment, decide

log = logging.getLogger(__name__)

QUARANTINE_MAX_BYTES = 64 * 1024 * 1024


class ShipError(RuntimeError):
    """Kafka did not acknowledge a segment; it stays in the spool and is retried."""


class Shipper:
    def __init__(self, spool_dir: Path, make_producer: Callable[[], KafkaProducer], topic: str, *,
                 ack_timeout_s: float = 30.0, retain_s: float = 3600.0, retain_bytes: int = 1 << 30,
                 offset_readers: dict[str, OffsetReader] | None = None, unchecked_groups: bool = True,
                 topic_id_probe: Callable[[], str | None] | None = None, retention_interval_s: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool_dir = spool_dir
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

    def ship_once(self) -> int:
        """Re-ship retained segments if the topic incarnation changed, ship every sealed segment present
        now, then drop the retained segments that are safe to drop. Returns the number of new records
        acknowledged (re-shipped ones are counted in `reshipped`)."""
        recover_orphans(self.spool_dir)
        self._retain_held()
        topic_id = self.topic_id()
        if topic_id:
            self._reship_stale(topic_id)
        total = 0
        for segment in sealed_segments(self.spool_dir):
            if segment not in self._held:
                total += self.ship_segment(segment)
        if time.monotonic() >= self._next_retention:
            self.apply_retention()
            self._next_retention = time.monotonic() + self.retention_interval_s
        return total

    # -- topic incarnation ------------------------------------------------------------------------

    def topic_id(self) -> str | None:
        """Kafka's id of the topic's current incarnation, fresh from the broker; None if unreachable.

        Raises ShipError when the broker answers that the topic does not exist: the producer factory
        creates it with the configured partitions (a send would auto-create it with the broker's)."""
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
            try:
                stored = {group: read(self.topic, topic_id) for group, read in self.offset_readers.items()}
            except Exception as exc:
                log.info("shipper: cannot read stored offsets (%s); keeping shipped segments", exc)
                stored = None
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
        t0 = time.monotonic()
        count, offsets, shipped_to = self._send(segment, quarantine=True)
        self._keep(segment, Shipment(self.topic, shipped_to, offsets, self.clock(), count))
        self.shipped += count
        metrics.SHIPPED.inc(count)
        log.info("shipper: shipped segment %s", segment.name, extra={
            "segment": segment.name, "records": count, "topic": self.topic, "topic_id": shipped_to,
            "end_offsets": offsets, "duration_ms": round((time.monotonic() - t0) * 1000, 2)})
        return count

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

    def _send(self, segment: Path, *, quarantine: bool = False) -> tuple[int, dict[int, int], str]:
        """Send every intact record of `segment` and wait for all acks. Returns (records, end offset per
        partition, topic id the records went to; "" when it changed during the send, i.e. unknown)."""
        before = self.topic_id()
        if before is None:  # not sending blind: the incarnation it would reach must be named (ADR 16)
            raise ShipError(f"{segment.name}: Kafka is unreachable (no topic metadata); will retry")
        if self._producer_incarnation != before:
            # A producer that never sent to this incarnation may hold a producer id from a broker that has
            # restarted since; a fresh one is made for it (once per incarnation, and after any failure).
            self._discard_producer()
            self._producer_incarnation = before
        futures = []
        bad: list[tuple[str, bytes]] = []
        for line in segment_records(segment.read_bytes()):
            try:
                payload = read_record(line)
                key = orjson.loads(payload)["domain"].encode()
            except CorruptRecord as exc:
                bad.append((exc.reason, line))
                continue
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                bad.append(("not_an_event", line))
                continue
            futures.append(self.producer.send(self.topic, key=key, value=payload))
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
        return len(futures), offsets, shipped_to

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
        self._close_admin()
        if self._producer is not None:
            self._producer.flush(timeout=self.ack_timeout_s)
            self._producer.close(timeout=self.ack_timeout_s)
            self._producer = None

    def run(self, stop: threading.Event, idle_wait_s: float = 0.2) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                shipped = self.ship_once()
                backoff = 0.5
            except (ShipError, OSError) as exc:  # OSError: the spool or quarantine disk
                log.error("shipper: %s; retrying in %.1fs", exc, backoff)
                metrics.SHIP_RETRIES.inc()
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not shipped:
                stop.wait(idle_wait_s)
        try:  # what the (already stopped) collector spooled last, including its open segments
            self.ship_once()
        except (ShipError, OSError) as exc:  # OSError: the spool or quarantine disk
            log.warning("shipper: final ship failed (%s); the spool keeps it for next time", exc)
        finally:
            self.close()  # flush and close the producer whatever the last ship met
