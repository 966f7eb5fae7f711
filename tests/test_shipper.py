"""The shipper against a real tansu broker that goes away and comes back."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, TopicPartition

from collector.spool import SpoolWriter, read_record, sealed_segments, segment_records
from infra.broker import EmbeddedBroker
from workers.kafka_io import ensure_topic, make_producer
from workers.shipper import Shipper, ShipError


def write_segment(spool_dir, lines):
    writer = SpoolWriter(spool_dir, max_bytes=1 << 20, max_age_s=3600)
    writer.append(lines)
    writer.close()


def topic_size(bootstrap: str, topic: str) -> int:
    """Records on the topic, by reading them all: tansu 0.6's ListOffsets(latest) answers the last
    batch's base offset + 1, not the high watermark, so end_offsets undercounts multi-record batches."""
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], consumer_timeout_ms=2000)
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
        consumer.seek_to_beginning()
        return sum(1 for _ in consumer)
    finally:
        consumer.close()


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
        assert topic_size(broker.bootstrap, "ev") == 3
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
