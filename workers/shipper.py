"""The shipper: forwards sealed spool segments to Kafka.

Contract: a segment is deleted only after Kafka acknowledged (acks=all) every
record in it. After any failure the producer is thrown away and a new one is
made for the next attempt: an idempotent producer can end in a fatal state
(e.g. the broker lost its producer id) from which it never recovers. A crash at any point re-sends the whole segment on restart; the
stores dedup on the event hash, so a re-send is never counted twice. Lines
that are not an event (corruption) are moved to a bounded quarantine file
instead of blocking the segment; each spool record carries a CRC32C, so a torn or flipped
record is caught here, counted by reason, and never blocks the records behind it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from collector.spool import CorruptRecord, read_record, recover_orphans, sealed_segments, segment_records

log = logging.getLogger(__name__)

QUARANTINE_MAX_BYTES = 64 * 1024 * 1024


class ShipError(RuntimeError):
    """Kafka did not acknowledge a segment; it stays in the spool and is retried."""


class Shipper:
    def __init__(self, spool_dir: Path, make_producer: Callable[[], KafkaProducer], topic: str, *,
                 ack_timeout_s: float = 30.0) -> None:
        self.spool_dir = spool_dir
        self.make_producer = make_producer
        self._producer: KafkaProducer | None = None
        self.topic = topic
        self.ack_timeout_s = ack_timeout_s
        self.shipped = 0
        self.quarantined = 0
        self.quarantined_by_reason: Counter[str] = Counter()  # torn | checksum | unframed | not_an_event
        spool_dir.mkdir(parents=True, exist_ok=True)

    def ship_once(self) -> int:
        """Ship every sealed segment present now. Returns the number of records acknowledged."""
        recover_orphans(self.spool_dir)
        total = 0
        for segment in sealed_segments(self.spool_dir):
            total += self.ship_segment(segment)
        return total

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
        self.producer.flush(timeout=self.ack_timeout_s)
        try:
            for future in futures:
                future.get(timeout=self.ack_timeout_s)
        except KafkaError as exc:
            raise ShipError(f"{segment.name}: Kafka did not acknowledge ({exc}); will retry") from exc
        if bad:
            self._quarantine(segment.name, bad)
        segment.unlink()
        self.shipped += len(futures)
        return len(futures)

    def _quarantine(self, name: str, bad: list[tuple[str, bytes]]) -> None:
        qdir = self.spool_dir / "quarantine"
        qdir.mkdir(exist_ok=True)
        used = sum(p.stat().st_size for p in qdir.iterdir())
        self.quarantined += len(bad)
        self.quarantined_by_reason.update(reason for reason, _ in bad)
        lines = [line for _, line in bad]
        if used > QUARANTINE_MAX_BYTES:
            log.error("shipper: quarantine is full (%d bytes); dropping %d corrupt lines from %s",
                      used, len(lines), name)
            return
        with open(qdir / f"{name}.bad", "ab") as fh:
            fh.write(b"".join(line + b"\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        log.warning("shipper: quarantined %d corrupt lines from %s (%s)", len(lines), name,
                    ", ".join(sorted({reason for reason, _ in bad})))

    def _discard_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=0)
            except Exception:  # noqa: BLE001 - it is being thrown away because it is broken
                log.debug("shipper: error closing a failed producer", exc_info=True)
            self._producer = None

    def close(self) -> None:
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
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not shipped:
                stop.wait(idle_wait_s)
        try:  # what the (already stopped) collector spooled last, including its open segments
            self.ship_once()
        except ShipError as exc:
            log.warning("shipper: final ship failed (%s); the spool keeps it for next time", exc)
        self.close()
