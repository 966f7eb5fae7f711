"""The shipper against a real tansu broker that goes away and comes back."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, TopicPartition

from core.records import is_batch, split_batch
from infra.broker import EmbeddedBroker
from spool.segments import SpoolWriter, read_record, sealed_segments, segment_records
from workers.kafka_io import ensure_topic, make_producer
from workers.retention import Retained, Shipment, decide
from workers.shipper import ShipError, Shipper


def write_segment(spool_dir, lines):
    writer = SpoolWriter(spool_dir, max_bytes=1 << 20, max_age_s=3600)
    writer.append(lines)
    writer.close()


def topic_values(bootstrap: str, topic: str) -> list[bytes]:
    """Every record value on the topic, by reading them all: tansu 0.6's ListOffsets(latest) answers the last
    batch's base offset + 1, not the high watermark, so end_offsets undercounts multi-record batches."""
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], consumer_timeout_ms=2000)
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
        consumer.seek_to_beginning()
        return [record.value for record in consumer]
    finally:
        consumer.close()


def topic_size(bootstrap: str, topic: str) -> int:
    """Events on the topic (a batched record holds many: core/records.py)."""
    return sum(len(split_batch(v)) if is_batch(v) else 1 for v in topic_values(bootstrap, topic))


def test_segment_stays_in_the_spool_while_kafka_is_down_and_ships_when_it_is_back(tmp_path):
    broker = EmbeddedBroker(tmp_path / "tansu.log").start()
    port = broker.port
    try:
        ensure_topic([broker.bootstrap], "ev", 2)
        def producer():
            return make_producer([f"127.0.0.1:{port}"], delivery_timeout_ms=3000, request_timeout_ms=1000,
                                 max_block_ms=3000)

        shipper = Shipper(tmp_path / "spool", producer, "ev", ack_timeout_s=5)
        line = b'{"domain": "example.com", "v": 1}'
        write_segment(tmp_path / "spool", [line] * 5)
        assert shipper.ship_once() == 5
        assert sealed_segments(tmp_path / "spool") == []

        broker.stop()  # Kafka goes down; the collector keeps spooling
        write_segment(tmp_path / "spool", [line] * 3)
        with pytest.raises(ShipError):
            shipper.ship_once()
        assert len(sealed_segments(tmp_path / "spool")) == 1  # nothing unacknowledged was deleted

        broker = EmbeddedBroker(tmp_path / "tansu2.log", port=port).start()  # back (memory storage: empty)
        ensure_topic([broker.bootstrap], "ev", 2)
        shipped = 0
        for _ in range(5):  # a fresh producer is made after the failure
            try:
                shipped = shipper.ship_once()
                break
            except ShipError:
                continue
        assert shipped == 3
        assert sealed_segments(tmp_path / "spool") == []
        # the new (memory-only) broker is a new incarnation: the 5 shipped before were kept and went again
        assert shipper.reshipped == 5
        assert topic_size(broker.bootstrap, "ev") == 8
        shipper.close()
    finally:
        broker.stop()


def test_corrupt_spool_lines_are_quarantined_not_shipped(servers, tmp_path):
    ensure_topic([servers.bootstrap], "quarantine-test", 1)
    shipper = Shipper(tmp_path / "spool", lambda: make_producer([servers.bootstrap]), "quarantine-test")
    write_segment(tmp_path / "spool", [b'{"domain": "example.com"}', b"\x00\x01 torn", b'{"no": "domain"}'])
    assert shipper.ship_once() == 1
    assert shipper.quarantined == 2
    (bad,) = (tmp_path / "spool" / "quarantine").iterdir()
    assert [read_record(x) for x in segment_records(bad.read_bytes())] == [b"\x00\x01 torn", b'{"no": "domain"}']
    assert shipper.quarantined_by_reason == {"not_an_event": 2}
    assert sealed_segments(tmp_path / "spool") == []
    shipper.close()


def test_torn_and_flipped_records_are_quarantined_by_reason_and_never_block_the_rest(servers, tmp_path):
    """A record whose bytes changed on disk fails its CRC32C; a torn one has no whole checksum. Both are set
    aside with their reason, and every intact record before and after them is shipped."""
    spool_dir = tmp_path / "spool"
    ensure_topic([servers.bootstrap], "crc-test", 1)
    write_segment(spool_dir, [b'{"domain": "a.example", "n": %d}' % i for i in range(6)])
    (segment,) = sealed_segments(spool_dir)
    lines = segment.read_bytes().split(b"\n")[:-1]
    flipped = bytearray(lines[1])
    flipped[5] ^= 0x01  # one bit flipped inside the JSON payload
    lines[1] = bytes(flipped)
    lines[3] = lines[3][: len(lines[3]) - 4]  # torn: the checksum is cut short
    lines[4] = lines[4].split(b"\t")[0] + b"\tzzzzzzzz"  # a checksum field that is not hex
    segment.write_bytes(b"\n".join(lines) + b"\n")
    shipper = Shipper(spool_dir, lambda: make_producer([servers.bootstrap]), "crc-test")
    assert shipper.ship_once() == 3  # records 0, 2 and 5
    assert shipper.quarantined_by_reason == {"checksum": 1, "torn": 2}
    assert topic_size(servers.bootstrap, "crc-test") == 3
    assert sealed_segments(spool_dir) == []
    shipper.close()


def test_unframed_lines_from_before_checksums_still_ship(servers, tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    ensure_topic([servers.bootstrap], "legacy-test", 1)
    (spool_dir / "old-0001.seg").write_bytes(b'{"domain": "a.example"}\n{"domain": "b.example"}\nnot json\n')
    shipper = Shipper(spool_dir, lambda: make_producer([servers.bootstrap]), "legacy-test")
    assert shipper.ship_once() == 2
    assert shipper.quarantined_by_reason == {"unframed": 1}
    shipper.close()


def retained_names(spool_dir) -> list[str]:
    return sorted(p.name for p in (spool_dir / "shipped").glob("*.seg"))


def ship_until_done(shipper, attempts: int = 10) -> int:
    for _ in range(attempts):  # the first attempts after a broker restart may fail (fresh producer)
        try:
            return shipper.ship_once()
        except ShipError:
            continue
    raise AssertionError("the shipper never got through")


def test_shipped_segments_are_kept_and_reshipped_to_a_new_broker_incarnation_until_stored(tmp_path):
    """Ship 2 segments, lose the broker (memory storage), start a new one on the same port: both segments
    go again to the new topic, exactly once more; then they are dropped only once the (fake, stored in
    a dict) consumer group has offsets past them in the new incarnation, and the time window passed."""
    spool_dir = tmp_path / "spool"
    broker = EmbeddedBroker(tmp_path / "tansu.log").start()
    port = broker.port
    stored: dict[tuple[str, str], dict[int, int]] = {}
    clock = [1000.0]
    shipper = Shipper(spool_dir, lambda: make_producer([f"127.0.0.1:{port}"], max_block_ms=3000,
                                                       delivery_timeout_ms=3000, request_timeout_ms=1000),
                      "ev", ack_timeout_s=5, retain_s=60, retention_interval_s=0,
                      offset_readers={"rollups": lambda topic, topic_id: stored.get((topic, topic_id), {})},
                      unchecked_groups=True, clock=lambda: clock[0])
    try:
        ensure_topic([broker.bootstrap], "ev", 2)
        first_id = shipper.topic_id()
        write_segment(spool_dir, [b'{"domain": "a.example", "n": %d}' % i for i in range(4)])
        write_segment(spool_dir, [b'{"domain": "b.example", "n": %d}' % i for i in range(3)])
        assert shipper.ship_once() == 7
        assert sealed_segments(spool_dir) == [] and len(retained_names(spool_dir)) == 2
        kept = shipper.retained.list()
        assert {seg.shipment.topic_id for seg in kept} == {first_id}
        assert sum(sum(1 for _ in segment_records(seg.path.read_bytes())) for seg in kept) == 7
        assert topic_size(broker.bootstrap, "ev") == 7

        broker.stop()
        broker = EmbeddedBroker(tmp_path / "tansu2.log", port=port).start()
        ensure_topic([broker.bootstrap], "ev", 2)
        second_id = shipper.topic_id()
        assert second_id and second_id != first_id
        assert ship_until_done(shipper) == 0  # nothing new, but both retained segments went again
        assert shipper.reshipped == 7
        assert topic_size(broker.bootstrap, "ev") == 7
        kept = shipper.retained.list()
        assert {seg.shipment.topic_id for seg in kept} == {second_id}
        assert {seg.shipment.ships for seg in kept} == {2}
        ends: dict[int, int] = {}
        for seg in kept:
            for p, o in seg.shipment.end_offsets.items():
                ends[p] = max(ends.get(p, 0), o)
        # offsets recorded per partition in the new topic (one batched record per segment here)
        assert sum(ends.values()) == len(topic_values(broker.bootstrap, "ev")) == 2

        assert shipper.ship_once() == 0 and shipper.reshipped == 7  # same incarnation: not again
        # The group stored everything, but in the OLD incarnation only: kept.
        stored[("ev", first_id)] = {0: 10**6, 1: 10**6}
        clock[0] += 3600
        shipper.apply_retention()
        assert len(retained_names(spool_dir)) == 2
        # Stored in the new incarnation, but the unchecked groups' window has not passed since the re-ship.
        stored[("ev", second_id)] = dict(ends)
        clock[0] = kept[0].shipment.shipped_at + 30
        shipper.apply_retention()
        assert len(retained_names(spool_dir)) == 2
        clock[0] += 31
        shipper.apply_retention()
        assert retained_names(spool_dir) == [] and shipper.dropped_segments == 2
        assert list((spool_dir / "shipped").iterdir()) == []  # sidecars gone too
    finally:
        shipper.close()
        broker.stop()


def test_a_shipper_restarted_after_a_crash_reships_what_the_lost_broker_had(tmp_path):
    """The whole stack dies (kill -9): a NEW shipper process on the same spool finds the retained
    segments, sees a new topic id and ships them again; a stale .open segment is recovered too."""
    spool_dir = tmp_path / "spool"
    broker = EmbeddedBroker(tmp_path / "tansu.log").start()
    port = broker.port

    def producer():
        return make_producer([f"127.0.0.1:{port}"], max_block_ms=3000, delivery_timeout_ms=3000,
                             request_timeout_ms=1000)

    try:
        ensure_topic([broker.bootstrap], "ev", 2)
        first = Shipper(spool_dir, producer, "ev", ack_timeout_s=5)
        write_segment(spool_dir, [b'{"domain": "a.example", "n": %d}' % i for i in range(5)])
        assert first.ship_once() == 5
        first.close()  # (a crash: nothing below depends on a clean close)
        (spool_dir / "host-1-0001-000001.open").write_bytes(b"".join(
            __import__("spool.segments", fromlist=["frame"]).frame(b'{"domain": "c.example", "n": %d}' % i)
            for i in range(2)) + b'{"domain": "c.exa')  # a torn tail was never acknowledged
        broker.stop()
        broker = EmbeddedBroker(tmp_path / "tansu2.log", port=port).start()
        ensure_topic([broker.bootstrap], "ev", 2)
        second = Shipper(spool_dir, producer, "ev", ack_timeout_s=5)
        assert ship_until_done(second) == 2
        assert second.reshipped == 5
        assert topic_size(broker.bootstrap, "ev") == 7
        second.close()
    finally:
        broker.stop()


def seg(name: str, topic_id: str, ends: dict[int, int], at: float, size: int = 100) -> Retained:
    from pathlib import Path

    return Retained(Path(name), Shipment("ev", topic_id, ends, at, 1), size)


def test_retention_decisions():
    a, b, c = seg("a", "T1", {0: 10}, 0), seg("b", "T1", {0: 20, 1: 5}, 50), seg("c", "T0", {1: 3}, 60)
    common = dict(topic="ev", topic_id="T1", now=100.0, unchecked_groups=True, retain_s=60, retain_bytes=0)
    d = decide([a, b, c], stored={"g": {0: 20, 1: 4}}, **common)
    assert d.reship == [c] and d.drop == [a] and d.evict == []  # b: partition 1 not stored; a: old enough
    d = decide([a, b], stored={"g": {0: 20, 1: 5}}, **common)
    assert d.drop == [a]  # b was shipped 50 s ago < 60 s: the loader may still need it
    d = decide([a, b], stored={"g": {0: 20, 1: 5}}, **{**common, "unchecked_groups": False})
    assert d.drop == [a, b]  # every group checked: no window needed
    d = decide([a, b], stored={"g": {0: 20}, "h": {0: 9}}, **common)
    assert d.drop == []  # every checkable group must have it
    assert decide([a], stored=None, **common).drop == []  # store unreachable: keep
    unknown = decide([a, c], stored={"g": {0: 99, 1: 99}}, **{**common, "topic_id": ""})
    assert unknown.drop == [] and unknown.reship == []  # incarnation unknown: keep, do not re-ship yet
    capped = decide([a, b, c], stored={"g": {}}, **{**common, "retain_bytes": 150})
    assert capped.evict == [a, b] and capped.reship == [c]  # the oldest go first, loudly
    assert capped.evict_unconfirmed == 2
    young = decide([a, b], stored={"g": {0: 20, 1: 5}}, **{**common, "now": 10.0, "retain_bytes": 150})
    assert young.drop == [] and young.evict == [a] and young.evict_unconfirmed == 0  # stored, window only
    missing = Retained(a.path, None, 10)
    assert decide([missing], stored={"g": {}}, **common).reship == [missing]


def test_a_shipped_segment_is_dropped_once_both_real_groups_stored_it(make_settings):
    """The shipper as `tally shipper` builds it reads both groups' offsets: the rollup group's in PostgreSQL
    and the loader's in ClickHouse (asked of the analyst server, chDB being one process per directory), and
    drops a retained segment as soon as both stored past it, without waiting TALLY_SPOOL_RETAIN_S (ADR 28)."""
    from core.config import LOADER_GROUP, ROLLUP_GROUP
    from tally.roots import build_loader_loop, build_rollup_loop, build_shipper

    settings = make_settings(TALLY_SPOOL_RETAIN_S="86400")
    shipper = build_shipper(settings)
    assert shipper.unchecked_groups is False and set(shipper.offset_readers) == {ROLLUP_GROUP, LOADER_GROUP}
    shipper.retention_interval_s = 3600  # retention only when this test asks for it
    write_segment(settings.spool_dir, [b'{"v": 1, "hash": "%032x", "domain": "a.example", "url": "https://a.example/",'
                                       b' "ts": "2026-12-01T00:00:00Z", "received_at": "2026-12-01T00:00:00Z",'
                                       b' "type": "pageview"}' % i for i in range(5)])
    rollups = build_rollup_loop(settings, group=ROLLUP_GROUP, maintenance=False)
    loader = build_loader_loop(settings, group=LOADER_GROUP)
    try:
        assert shipper.ship_once() == 5
        assert len(retained_names(settings.spool_dir)) == 1
        rollups.drain()
        shipper.apply_retention()
        assert len(retained_names(settings.spool_dir)) == 1  # the loader has not stored it yet
        loader.drain()
        shipper.apply_retention()
        assert retained_names(settings.spool_dir) == [] and shipper.dropped_segments == 1
    finally:
        rollups.close()
        loader.close()
        shipper.close()


def test_a_spool_disk_error_in_the_final_ship_still_closes_the_producer(servers, tmp_path):
    """The last `ship_once` of `run` (after stop) meets an unreadable spool (an OSError, not a ShipError):
    it is logged, and the producer is still flushed and closed instead of the thread dying with it."""
    import threading

    spool_dir = tmp_path / "spool"
    ensure_topic([servers.bootstrap], "final-ship-test", 1)
    made = []

    def producer():
        made.append(make_producer([servers.bootstrap]))
        return made[-1]

    shipper = Shipper(spool_dir, producer, "final-ship-test")
    write_segment(spool_dir, [b'{"domain": "a.example"}'] * 3)
    assert shipper.ship_once() == 3 and made
    write_segment(spool_dir, [b'{"domain": "a.example"}'])
    (segment,) = sealed_segments(spool_dir)
    segment.unlink()
    segment.mkdir()  # a sealed segment that cannot be read (IsADirectoryError: an OSError, as EIO would be)
    stop = threading.Event()
    stop.set()  # straight to the final ship
    shipper.run(stop)
    assert shipper._producer is None and all(p._closed for p in made)  # flushed and closed
