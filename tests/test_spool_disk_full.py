"""A full spool disk never deadlocks (ADR 28): the collector stops at a reserve it leaves for the shipper,
and the shipper ships from a full disk, even one something else filled to the last byte.

The spool lives on a real 3 MiB tmpfs (mounted here: the tests run as root, as CI does); the broker is
the session's tansu. The consumer groups' stored offsets are given by the test (all stored / none), the
one thing not run for real: which offsets the stores hold is the workers' business, tested elsewhere."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spool.segments import SpoolFull, SpoolWriter, free_bytes, sealed_segments
from tests.test_shipper import topic_size
from workers.kafka_io import ensure_topic, make_producer
from workers.retention import SHIPPED_DIR
from workers.shipper import Shipper

MiB = 1 << 20


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"cannot mount a tmpfs (the tests need root): {done.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_spool(writer: SpoolWriter, domain: str) -> int:
    """Append 40-event batches until the writer refuses one; returns the events acknowledged."""
    acked = 0
    for i in range(10_000):
        batch = [b'{"domain": "%s", "url": "https://%s/%s/%d-%d"}'
                 % (domain.encode(), domain.encode(), b"x" * 200, i, j)
                 for j in range(40)]
        try:
            writer.append(batch)
        except SpoolFull:
            return acked
        acked += len(batch)
    raise AssertionError("the spool never filled")


def shipper_for(spool: Path, bootstrap: str, topic: str, *, stored: bool | list[bool]) -> Shipper:
    """A shipper whose two consumer groups have stored everything (True) or nothing (False); a one-item list
    lets the test change its mind."""
    everything = {p: 1 << 62 for p in range(2)}
    flag = stored if isinstance(stored, list) else [stored]

    def read(_topic: str, _topic_id: str) -> dict[int, int]:
        return dict(everything) if flag[0] else {}

    return Shipper(spool, lambda: make_producer([bootstrap]), topic, offset_readers={"rollup": read, "loader": read},
                   unchecked_groups=False, retention_interval_s=0.0)


def fill_the_disk(small_disk: Path) -> Path:
    """Another process takes every byte that is left; returns its file."""
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert free_bytes(small_disk) < 4096
    return filler


def test_the_collector_stops_at_the_reserve_and_shipping_frees_the_disk(servers, small_disk):
    spool, topic = small_disk / "spool", f"full-{uuid.uuid4().hex[:8]}"
    ensure_topic([servers.bootstrap], topic, 2)
    writer = SpoolWriter(spool, max_bytes=256 * 1024, max_age_s=3600, reserve_bytes=64 * MiB)
    assert writer.reserve_bytes == 3 * MiB // 8  # an eighth of a small disk, not 64 MiB
    acked = fill_spool(writer, "full.example")
    assert acked > 1000
    assert free_bytes(spool) >= writer.reserve_bytes  # the collector left the shipper its room
    assert "nearly full" in (writer.readiness() or "") or "refused" in (writer.readiness() or "")
    writer.close()
    shipper = shipper_for(spool, servers.bootstrap, topic, stored=True)
    assert shipper.ship_once() == acked
    assert sealed_segments(spool) == [] and list((spool / SHIPPED_DIR).glob("*.seg")) == []  # both groups have them
    assert topic_size(servers.bootstrap, topic) == acked
    writer = SpoolWriter(spool, max_bytes=256 * 1024, max_age_s=3600, reserve_bytes=64 * MiB)
    writer.append([b'{"domain": "full.example", "url": "https://full.example/again"}'])  # accepting again
    writer.close()
    shipper.close()


def test_a_disk_filled_to_the_last_byte_by_someone_else_still_ships_and_keeps_every_segment(servers, small_disk):
    """Nothing stored by the groups yet, and no byte free: the shipper cannot write its sidecars, so what Kafka
    acknowledged is *held* in the spool (not re-sent, not deleted) until both groups stored it or there is room
    for the sidecar; the broker-forgets protection is never given up (ADR 28)."""
    spool, topic = small_disk / "spool", f"full-{uuid.uuid4().hex[:8]}"
    ensure_topic([servers.bootstrap], topic, 2)
    writer = SpoolWriter(spool, max_bytes=256 * 1024, max_age_s=3600, reserve_bytes=64 * MiB)
    acked = fill_spool(writer, "full.example")
    writer.close()
    segments = len(sealed_segments(spool))
    filler = fill_the_disk(small_disk)
    stored = [False]
    shipper = shipper_for(spool, servers.bootstrap, topic, stored=stored)
    assert shipper.ship_once() == acked
    assert shipper.evicted_segments == 0 and len(shipper._held) == segments  # none could get a sidecar
    assert len(sealed_segments(spool)) == segments  # all still on disk
    assert shipper.ship_once() == 0  # held: not sent again
    assert topic_size(servers.bootstrap, topic) == acked
    stored[0] = True  # both groups have them now
    shipper.apply_retention()
    assert sealed_segments(spool) == [] and not shipper._held and shipper.dropped_segments == segments
    assert free_bytes(spool) > 256 * 1024
    os.unlink(filler)
    shipper.close()


def test_held_segments_move_to_shipped_when_there_is_room_again(servers, small_disk):
    spool, topic = small_disk / "spool", f"full-{uuid.uuid4().hex[:8]}"
    ensure_topic([servers.bootstrap], topic, 2)
    writer = SpoolWriter(spool, max_bytes=256 * 1024, max_age_s=3600, reserve_bytes=64 * MiB)
    acked = fill_spool(writer, "full.example")
    writer.close()
    filler = fill_the_disk(small_disk)
    shipper = shipper_for(spool, servers.bootstrap, topic, stored=False)
    assert shipper.ship_once() == acked and shipper._held
    os.unlink(filler)  # room again
    assert shipper.ship_once() == 0
    assert not shipper._held and sealed_segments(spool) == []
    assert len(shipper.retained.list()) >= 1 and all(r.shipment for r in shipper.retained.list())
    shipper.close()


def test_corrupt_lines_on_a_full_disk_do_not_stop_the_shipper(servers, small_disk):
    """Quarantining a corrupt line needs new space; on a full disk it is dropped (it was never shippable)
    and the records around it and the segments behind it still ship."""
    spool, topic = small_disk / "spool", f"full-{uuid.uuid4().hex[:8]}"
    ensure_topic([servers.bootstrap], topic, 2)
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    writer.append([b'{"domain": "a.example", "n": 1}', b'{"no": "domain"}'])
    writer.close()
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    writer.append([b'{"domain": "a.example", "n": 2}'])
    writer.close()
    filler = fill_the_disk(small_disk)
    shipper = shipper_for(spool, servers.bootstrap, topic, stored=True)
    assert shipper.ship_once() == 2 and shipper.quarantined == 1
    assert sealed_segments(spool) == [] and topic_size(servers.bootstrap, topic) == 2
    os.unlink(filler)
    shipper.close()
