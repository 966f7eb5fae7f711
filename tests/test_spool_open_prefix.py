"""Open segments ship as they grow (ADR 56; the protocol table in ADR 28's addendum).

The writer publishes its acknowledged-durable length (spool/watermark.py) after fdatasync and the name
check; the shipper ships up to it and records its progress (workers/ship_progress.py) only after Kafka
acknowledged. Every bad interleaving is forced here, in the style of tests/test_spool_protocol.py:
a seal (by the writer, or by recovery of a dead writer) at every step of a prefix ship; the shipper
killed after Kafka's ack and before its progress is durable (the one unavoidable double: that part
only), and after it; a partly-shipped segment's `shipped/` sidecar and its retention; a topic
incarnation change between parts. Every check reads the real topic on the session's tansu broker.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from spool import segments as spool_module
from spool import watermark
from spool.recovery import recover_orphans
from spool.segments import SpoolWriter
from workers import ship_progress
from workers.kafka_io import ensure_topic, make_consumer, make_producer
from workers.retention import Shipment, decide, sidecar_of
from workers.shipper import ShipError, Shipper
from workers.stored_offsets import StoredOffsets


class Killed(BaseException):
    """The shipper process dies here (nothing of its memory survives: a new Shipper takes over)."""


def line(tag: str, i: int) -> bytes:
    return f'{{"domain": "example.com", "n": "{tag}-{i}"}}'.encode()


def topic_lines(bootstrap: str, topic: str, expected: Counter[bytes]) -> Counter[bytes]:
    """Every event on `topic` (batched records split, single-event records as they are), with counts: read
    until at least as many as `expected` came, then until a poll of 300 ms brings nothing more (doubles)."""
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap])
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
        consumer.seek_to_beginning()
        out: Counter[bytes] = Counter()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=300)
            for records in polled.values():
                for msg in records:
                    value = msg.value
                    out.update(value.split(b"\n")[1:-1] if value.startswith(b"tally-batch/") else [value])
            if not polled and out.total() >= expected.total():
                break
        return out
    finally:
        consumer.close()


def new_topic(servers, name: str, partitions: int = 2) -> str:
    ensure_topic([servers.bootstrap], name, partitions)
    return name


def shipper_for(servers, spool: Path, topic: str, **kwargs) -> Shipper:
    return Shipper(spool, lambda: make_producer([servers.bootstrap]), topic, **kwargs)


def drain(shipper: Shipper) -> None:
    """Ship until nothing is left in the spool but shipped/ and bookkeeping."""
    for _ in range(10):
        shipper.ship_once()
        if not list(shipper.spool_dir.glob("*.seg")) and not list(shipper.spool_dir.glob("*.open")):
            return
    raise AssertionError(f"the spool did not empty: {sorted(shipper.spool_dir.iterdir())}")


def abandon(writer: SpoolWriter, torn: bytes = b'{"domain": "example.com", "n": "torn') -> None:
    """The writer process dies mid-write: its descriptors close (the lock goes), a torn line is left."""
    path = writer._path
    assert path is not None and writer._fd is not None and writer._mark is not None
    os.close(writer._fd)
    os.close(writer._mark)
    writer._fd = writer._mark = None
    with open(path, "ab") as fh:
        fh.write(torn)


# -- the writer's side ----------------------------------------------------------------------------------


def test_the_writer_publishes_its_durable_length_after_each_append_and_drops_it_at_the_seal(tmp_path):
    writer = SpoolWriter(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    for i in range(3):
        writer.append([line("w", i)] * (i + 1))
        (segment,) = tmp_path.glob("*.open")
        assert watermark.read(segment) == segment.stat().st_size
    assert oct(watermark.companion(segment).stat().st_mode & 0o777) == "0o600"
    writer.close()
    assert list(tmp_path.glob("*.seg")) and list((tmp_path / watermark.MARKS).iterdir()) == []


def test_an_append_that_is_not_acknowledged_publishes_nothing(tmp_path, monkeypatch):
    writer = SpoolWriter(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    writer.append([line("a", 0)])
    (segment,) = tmp_path.glob("*.open")
    durable = watermark.read(segment)

    def failing(fd):
        raise OSError(5, "Input/output error")

    fake = SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake.fdatasync = failing
    with monkeypatch.context() as m:
        m.setattr(spool_module, "os", fake)
        with pytest.raises(OSError):
            writer.append([line("a", 1)])  # written, never durable: truncated away, not published
    assert watermark.read(segment) == durable == segment.stat().st_size
    fd = os.open(segment, os.O_RDONLY)  # keep the inode to read its watermark after the name goes
    try:
        segment.unlink()  # the name is lost under the writer: the next append is refused, not published
        with pytest.raises(OSError, match="removed while open"):
            writer.append([line("a", 2)])
        assert os.fstat(fd).st_size > durable and not watermark.companion(segment).exists()
    finally:
        os.close(fd)
    writer.close()


def test_a_torn_watermark_read_is_no_number():
    old, new = watermark.encode(4096), watermark.encode(8192)
    assert watermark.decode(old) == 4096 and watermark.decode(new) == 8192
    for cut in range(1, 16):
        mixed = new[:cut] + old[cut:]
        assert watermark.decode(mixed) in (None, 4096, 8192), cut
    assert watermark.decode(new[:8] + old[8:]) is None and watermark.decode(b"") is None


def test_recovery_removes_the_watermarks_of_dead_and_sealed_segments(tmp_path):
    writer = SpoolWriter(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    writer.append([line("r", 0)])
    (segment,) = tmp_path.glob("*.open")
    abandon(writer)
    stray = tmp_path / watermark.MARKS / "gone-1-2-000001.len"  # a writer died between its seal and the unlink
    stray.write_bytes(watermark.encode(10))
    assert recover_orphans(tmp_path, trust_pids=False) == 1
    assert not segment.exists() and list((tmp_path / watermark.MARKS).iterdir()) == []


# -- the shipper's side: open prefixes, seals, kills -----------------------------------------------------


def test_an_open_segment_ships_as_it_grows_and_its_seal_ships_only_the_rest(servers, tmp_path):
    topic = new_topic(servers, "open-prefix-grow")
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    shipper = shipper_for(servers, spool, topic)
    writer.append([line("g", i) for i in range(3)])
    assert shipper.ship_once() == 3 and list(spool.glob("*.open"))  # still open: its durable prefix went
    assert shipper.ship_once() == 0  # nothing new: nothing again
    writer.append([line("g", 3), line("g", 4)])
    assert shipper.ship_once() == 2
    writer.append([line("g", 5)])
    writer.close()
    assert shipper.ship_once() == 1 and not list(spool.glob("*.seg"))
    (kept,) = (spool / "shipped").glob("*.seg")
    shipment = Shipment.from_json(sidecar_of(kept).read_bytes())
    assert shipment.records == 6 and shipment.topic_id == shipper.topic_id()
    assert list((spool / ship_progress.PROGRESS_DIR).iterdir()) == []
    shipper.close()
    want = Counter(line("g", i) for i in range(6))
    assert topic_lines(servers.bootstrap, topic, want) == want


POINTS = ("watermark", "pread", "send", "progress", "after")


def seal(writer: SpoolWriter, spool: Path, acked: list[bytes], tag: str) -> None:
    writer.append([line(tag, 99)])
    acked.append(line(tag, 99))
    writer.close()


def recover_dead(writer: SpoolWriter, spool: Path, acked: list[bytes], tag: str) -> None:
    writer.append([line(tag, 99)])
    acked.append(line(tag, 99))
    abandon(writer)
    assert recover_orphans(spool, trust_pids=False) == 1


def hook(shipper: Shipper, monkeypatch: pytest.MonkeyPatch, point: str, action) -> list[str]:
    """Run `action` once, at `point` of the shipper's next open-prefix ship."""
    fired: list[str] = []

    def once() -> None:
        if not fired:
            fired.append(point)
            action()

    def before(fn):
        def call(*args, **kwargs):
            once()
            return fn(*args, **kwargs)
        return call

    if point == "watermark":
        monkeypatch.setattr(ship_progress, "watermark", SimpleNamespace(read=before(watermark.read)))
    elif point == "pread":
        fake = SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        fake.pread = before(os.pread)
        monkeypatch.setattr(ship_progress, "os", fake)
    elif point == "send":
        monkeypatch.setattr(shipper, "_send", before(shipper._send))
    elif point == "progress":
        monkeypatch.setattr(shipper.progress, "put", before(shipper.progress.put))
    else:
        put = shipper.progress.put

        def after(*args, **kwargs):
            put(*args, **kwargs)
            once()
        monkeypatch.setattr(shipper.progress, "put", after)
    return fired


@pytest.mark.parametrize("action", [seal, recover_dead], ids=["writer-seals", "recovery-seals"])
def test_a_seal_at_any_step_of_a_prefix_ship_loses_and_doubles_nothing(servers, tmp_path, monkeypatch, action):
    topic = new_topic(servers, f"open-prefix-seal-{action.__name__}")
    expected: Counter[bytes] = Counter()
    for point in POINTS:
        spool = tmp_path / point
        writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
        shipper = shipper_for(servers, spool, topic)
        tag = f"{action.__name__}-{point}"
        acked = [line(tag, i) for i in range(3)]
        writer.append(acked)
        shipper.ship_once()  # a first part went: the interleaving is with a later one
        writer.append([line(tag, 3)])
        acked.append(line(tag, 3))
        with monkeypatch.context() as m:
            fired = hook(shipper, m, point, functools.partial(action, writer, spool, acked, tag))
            shipper.ship_once()
        assert fired == [point]
        drain(shipper)
        shipper.close()
        expected.update(acked)
        assert list((spool / ship_progress.PROGRESS_DIR).iterdir()) == [], point
        (kept,) = (spool / "shipped").glob("*.seg")
        assert Shipment.from_json(sidecar_of(kept).read_bytes()).records == len(acked), point
    assert topic_lines(servers.bootstrap, topic, expected) == expected  # each acked line once, the torn one never


def test_a_shipper_killed_between_kafkas_ack_and_its_progress_ships_that_part_again_and_nothing_else(
        servers, tmp_path, monkeypatch):
    """At-least-once between Kafka's ack and the durable progress is unavoidable (the stores count each event
    hash once): the part in flight goes twice, the parts before and after it once."""
    topic = new_topic(servers, "open-prefix-kill")
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    first = shipper_for(servers, spool, topic)
    writer.append([line("k", i) for i in range(3)])
    assert first.ship_once() == 3
    writer.append([line("k", 3), line("k", 4)])

    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(first.progress, "put", die)  # acknowledged, then the process dies
    with pytest.raises(Killed):
        first.ship_once()
    first._discard_producer()
    second = shipper_for(servers, spool, topic)
    assert second.ship_once() == 2  # the part whose progress never became durable
    writer.append([line("k", 5)])
    assert second.ship_once() == 1

    def die_after(*args, **kwargs):  # killed once the progress is durable: nothing goes twice
        put(*args, **kwargs)
        raise Killed

    put = second.progress.put
    monkeypatch.setattr(second.progress, "put", die_after)
    writer.append([line("k", 6)])
    with pytest.raises(Killed):
        second.ship_once()
    second._discard_producer()
    writer.append([line("k", 7)])
    writer.close()
    third = shipper_for(servers, spool, topic)
    monkeypatch.setattr(third, "_keep", die)  # the last part acknowledged, killed before shipped/
    with pytest.raises(Killed):
        third.ship_once()
    third._discard_producer()
    fourth = shipper_for(servers, spool, topic)
    drain(fourth)
    fourth.close()
    twice = {3, 4, 7}
    want = Counter({line("k", i): 2 if i in twice else 1 for i in range(8)})
    assert topic_lines(servers.bootstrap, topic, want) == want
    (kept,) = (spool / "shipped").glob("*.seg")
    assert Shipment.from_json(sidecar_of(kept).read_bytes()).records >= 8


WRITER = """
import sys, time
from pathlib import Path
from spool.segments import SpoolWriter
w = SpoolWriter(Path(sys.argv[1]), max_bytes=1 << 20, max_age_s=3600)
for text in sys.stdin:
    w.append([text.strip().encode()])
    print("acked", flush=True)
time.sleep(60)
"""


def test_recovery_of_a_killed_writers_partly_shipped_segment_ships_the_rest_once(servers, tmp_path):
    topic = new_topic(servers, "open-prefix-recovery")
    spool = tmp_path / "spool"
    spool.mkdir()
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(spool)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    shipper = shipper_for(servers, spool, topic)
    try:
        def append(i: int) -> None:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(line("d", i).decode() + "\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "acked"

        for i in range(3):
            append(i)
        assert shipper.ship_once() == 3
        append(3)
        append(4)
        (segment,) = spool.glob("*.open")
        child.kill()
        child.wait()
        with open(segment, "ab") as fh:  # what a write cut short by the kill would leave
            fh.write(b'{"domain": "example.com", "n": "d-to')
        drain(shipper)  # recovery (its writer is dead) seals it; the shipper ships what went not yet
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()
    shipper.close()
    want = Counter(line("d", i) for i in range(5))
    assert topic_lines(servers.bootstrap, topic, want) == want
    assert list((spool / watermark.MARKS).iterdir()) == []


def test_a_partly_shipped_segment_is_retained_with_all_its_parts_until_every_group_stored_them(servers, tmp_path):
    topic = new_topic(servers, "open-prefix-retain", partitions=1)
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    shipper = shipper_for(servers, spool, topic)
    writer.append([line("t", i) for i in range(3)])
    assert shipper.ship_once() == 3  # a first part went while the segment was open
    writer.append([line("t", 3)])
    writer.close()
    assert shipper.ship_once() == 1
    shipper.close()
    (kept,) = shipper.retained.list()
    consumer = KafkaConsumer(bootstrap_servers=[servers.bootstrap], consumer_timeout_ms=1500)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    end = max(msg.offset for msg in consumer) + 1
    consumer.close()
    assert kept.shipment is not None and kept.shipment.end_offsets == {0: end} and kept.shipment.records == 4

    def verdict(stored_end: int):
        return decide([kept], topic=topic, topic_id=kept.shipment.topic_id, now=time.time(),
                      stored={"rollup": {0: stored_end}, "loader": {0: stored_end}}, unchecked_groups=False,
                      retain_s=0, retain_bytes=0)

    assert verdict(end - 1).drop == []  # the first part's records stored, the last part's not yet: kept
    assert verdict(end).drop == [kept]


def test_a_prefix_shipped_to_an_incarnation_that_is_gone_ships_again_from_the_start(servers, tmp_path):
    topic = new_topic(servers, "open-prefix-incarnation")
    spool = tmp_path / "spool"
    incarnation = ["A"]
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    shipper = shipper_for(servers, spool, topic, topic_id_probe=lambda: incarnation[0])
    writer.append([line("i", i) for i in range(3)])
    assert shipper.ship_once() == 3
    incarnation[0] = "B"  # the broker forgot its topic: what went to A must go to B as well
    writer.append([line("i", 3)])
    assert shipper.ship_once() == 4
    writer.close()
    assert shipper.ship_once() == 0
    shipper.close()
    (kept,) = shipper.retained.list()
    assert kept.shipment is not None and kept.shipment.topic_id == "B" and kept.shipment.records == 4
    want = Counter({line("i", i): 2 if i < 3 else 1 for i in range(4)})
    assert topic_lines(servers.bootstrap, topic, want) == want


def test_progress_records_of_segments_that_left_the_spool_are_removed(tmp_path):
    """A shipper killed after moving a segment into shipped/ and before removing its progress leaves a stray."""
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    writer.append([line("s", 0)])
    writer.close()
    (sealed,) = spool.glob("*.seg")
    book = ship_progress.ProgressBook(spool)
    record = ship_progress.Progress(10, Shipment("t", "A", {0: 1}, 0.0, 1))
    book.put(sealed, record)
    book.put(spool / "gone-1-2-000009.seg", record)
    Shipper(spool, lambda: None, "t", topic_id_probe=lambda: "A")  # removes strays when it starts
    assert [p.name for p in (spool / ship_progress.PROGRESS_DIR).iterdir()] == [sealed.stem + ".json"]
    assert ship_progress.ProgressBook(spool).get(sealed) == record


def test_a_disk_too_full_for_a_progress_record_does_not_stop_the_shipper(servers, tmp_path, monkeypatch):
    """ADR 28: the shipper ships from a full disk. No room for an open segment's progress: that part went, is
    not recorded, and open segments wait for their seal; the sealed segment then ships (that part again)."""
    topic = new_topic(servers, "open-prefix-full")
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    shipper = shipper_for(servers, spool, topic)
    writer.append([line("f", 0)])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shipper.progress, "put", full)
    assert shipper.ship_once() == 1  # sent and acknowledged; no error out of the pass
    writer.append([line("f", 1)])
    assert shipper.ship_once() == 0 and not shipper.has_new()  # open segments wait for their seal now
    writer.close()
    assert shipper.has_new() and shipper.ship_once() == 2
    shipper.close()
    want = Counter({line("f", 0): 2, line("f", 1): 1})
    assert topic_lines(servers.bootstrap, topic, want) == want


def test_a_running_shipper_ships_new_durable_lines_without_waiting_for_a_seal(servers, tmp_path):
    """Retention asks the stores every full pass; a store that answers slowly must not hold new lines back."""
    topic = new_topic(servers, "open-prefix-run", partitions=1)
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)  # never sealed by age here
    answer = threading.Event()

    def slow_store(topic: str, topic_id: str) -> dict[int, int]:
        answer.wait(60)
        return {}

    shipper = shipper_for(servers, spool, topic, offset_readers={"rollup": slow_store}, retention_interval_s=0)
    sealed = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    sealed.append([line("run", -1)])
    sealed.close()
    answer.set()
    assert shipper.ship_once() == 1 and shipper.retained.list()  # retained: retention asks the stores now
    answer.clear()
    stop = threading.Event()
    runner = threading.Thread(target=shipper.run, args=(stop,), kwargs={"idle_wait_s": 0.05})
    runner.start()
    consumer = KafkaConsumer(bootstrap_servers=[servers.bootstrap])
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        for i in range(3):
            writer.append([line("run", i)])
            deadline = time.monotonic() + 20  # the seal would never come: only the open prefix can ship it
            got: list[bytes] = []
            while not got:
                assert time.monotonic() < deadline, f"line {i} was not shipped while its segment was open"
                for records in consumer.poll(timeout_ms=200).values():
                    for msg in records:
                        got += msg.value.split(b"\n")[1:-1] if msg.value.startswith(b"tally-batch/") else [msg.value]
                got = [x for x in got if x != line("run", -1)]  # the sealed segment shipped above
            assert got == [line("run", i)] and list(spool.glob("*.open"))
    finally:
        answer.set()
        stop.set()
        runner.join(30)
        consumer.close()
        writer.close()


def test_stored_offsets_are_read_in_the_background_and_answered_from_the_last_read():
    release, calls = threading.Event(), []

    def read(topic_id: str) -> dict[str, dict[int, int]]:
        calls.append(topic_id)
        release.wait(30)
        return {"rollup": {0: 5}}

    stored = StoredOffsets(read)
    release.set()  # the first read answers at once (unset, it waited its whole 30 s)
    assert stored.get("A") == {"rollup": {0: 5}} and calls == ["A"]  # called directly: read at once
    release.clear()
    stored.background = True
    assert stored.get("A") is None and stored.get("A") is None  # a read under way: no answer yet, no wait
    assert calls == ["A", "A"]
    release.set()
    assert stored._future is not None
    stored._future.result(30)
    assert stored.get("A") == {"rollup": {0: 5}} and stored.get("B") is None  # another incarnation: unknown
    stored.close()


def test_consumers_answer_a_quiet_topic_within_a_short_fetch_wait(servers):
    """A fetch of a quiet topic waits at most fetch_max_wait_ms before a record that arrived is handed over:
    kafka-python's 500 ms default held records ~125 ms on tansu; the workers ask for 50 ms (ADR 56)."""
    consumer = make_consumer([servers.bootstrap], None, session_timeout_ms=6000)
    try:
        assert consumer.config["fetch_max_wait_ms"] <= 100 and consumer.config["fetch_min_bytes"] == 1
    finally:
        consumer.close()


def test_without_a_named_incarnation_open_segments_wait_for_their_seal(servers, tmp_path, monkeypatch):
    """A broker that names no topic incarnation (Kafka before topic ids): a progress record could not say where
    its part went, so the next part would start again from byte 0 at every tick. Open segments then ship
    once, when sealed (the pre-ADR-56 behaviour)."""
    topic = new_topic(servers, "open-prefix-no-id")
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    shipper = shipper_for(servers, spool, topic)
    monkeypatch.setattr(shipper, "_read_topic_id", lambda: "")
    writer.append([line("n", i) for i in range(3)])
    for _ in range(3):
        assert shipper.ship_once() == 0 and not shipper.has_new()
    writer.close()
    assert shipper.ship_once() == 3
    shipper.close()
    want = Counter(line("n", i) for i in range(3))
    assert topic_lines(servers.bootstrap, topic, want) == want


def test_a_partition_gone_from_the_producers_metadata_mid_send_is_a_retry_not_a_dead_shipper(
        servers, tmp_path, monkeypatch):
    """kafka-python raises ValueError('Unrecognized partition') when the topic shrank between partitions_for and
    the send (a topic recreated with fewer partitions): the shipper's loop catches only ShipError and OSError,
    so that must arrive as a ShipError (retried), and the segment ships on the next pass."""
    topic = new_topic(servers, "open-prefix-shrunk")
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    writer.append([line("s", i) for i in range(2)])
    writer.close()
    shipper = shipper_for(servers, spool, topic)

    def gone(*args, **kwargs):
        raise ValueError("Unrecognized partition")

    monkeypatch.setattr(KafkaProducer, "send", gone)  # the shipper makes a fresh producer for a new incarnation
    with pytest.raises(ShipError, match="partitions changed"):
        shipper.ship_once()
    monkeypatch.undo()
    drain(shipper)
    shipper.close()
    want = Counter(line("s", i) for i in range(2))
    assert topic_lines(servers.bootstrap, topic, want) == want
