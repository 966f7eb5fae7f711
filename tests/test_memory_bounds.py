"""What a long-running process holds stays bounded however long it runs or however far behind it is (issue 19 §2,
ADR 58's addendum on the soak's memory slopes). State-based: a structure's size after N records, not RSS or time."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import TopicPartition

from core.records import encode_batch
from tally.roots import worker_consumer_factory
from workers.kafka_io import make_producer, records_per_poll
from workers.limits import MAX_BATCH

RECORD_EVENTS = 10_000  # the most events a record may carry (TALLY_KAFKA_RECORD_EVENTS): 2 records fill MAX_BATCH
RECORDS = 12


def test_the_kafka_helpers_do_not_import_the_metrics():
    """`tally up` imports workers.kafka_io (the topic) before it sets PROMETHEUS_MULTIPROC_DIR: had that import
    pulled in core.metrics, its own process's metrics would be made without the shared directory, and
    `tally_component_up` would vanish from /metrics (it did, when the batch bound first lived in the writer)."""
    code = ("import sys, workers.kafka_io; "
            "print(sorted(m for m in sys.modules if m in ('core.metrics', 'prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout


def test_a_poll_is_bounded_in_events_not_records():
    assert records_per_poll(250) * 250 <= MAX_BATCH  # the default: 100 records, was 5,000 (1.25 M events)
    assert records_per_poll(250) == MAX_BATCH // 250
    assert records_per_poll(1) == MAX_BATCH  # single-event records: a batch's worth
    assert records_per_poll(MAX_BATCH * 3) == 1  # never 0: a record larger than a batch is still read


def backlog(settings, records: int, events_each: int) -> None:
    """`records` batched records of `events_each` events on partition 0 of the test's topic, all there at once (the
    values need not be valid events: the poll is what is measured)."""
    producer = make_producer(settings.kafka_bootstrap)
    try:
        for r in range(records):
            events = [b'{"domain":"m.example.com","n":%d}' % (r * events_each + i) for i in range(events_each)]
            producer.send(settings.topic, encode_batch(events), partition=0)
        producer.flush(30)
    finally:
        producer.close()


def polls(consumer, topic: str, want: int, timeout_s: float = 30) -> list[int]:
    """Records returned by each non-empty poll until `want` records were read from the topic's start."""
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    sizes: list[int] = []
    deadline = time.monotonic() + timeout_s
    while sum(sizes) < want and time.monotonic() < deadline:
        got = consumer.poll(timeout_ms=500)
        if got:
            sizes.append(sum(len(messages) for messages in got.values()))
    return sizes


@pytest.mark.servers("broker")
def test_a_lagging_workers_poll_holds_at_most_one_batch_of_events(make_settings):
    """A worker far behind (a backlog of records of up to TALLY_KAFKA_RECORD_EVENTS events each) is handed at most
    MAX_BATCH events by one poll of the consumer both worker roots make (tally.roots, the rollup worker's and the
    loader's): with 5,000 records a poll, a lagging worker held its whole lag decoded at once, and its memory grew
    with the lag (the soak's rising RSS as freshness drifted)."""
    settings = make_settings(TALLY_KAFKA_RECORD_EVENTS=str(RECORD_EVENTS), TALLY_KAFKA_PARTITIONS="1")
    backlog(settings, RECORDS, 3)
    consumer = worker_consumer_factory(settings, settings.kafka_bootstrap, f"mem-{uuid.uuid4().hex[:8]}")()
    try:
        sizes = polls(consumer, settings.topic, RECORDS)
    finally:
        consumer.close()
    assert sum(sizes) == RECORDS, sizes  # everything is read, over several polls
    assert max(sizes) * RECORD_EVENTS <= MAX_BATCH, sizes  # each poll within one batch of events


# Large buffers of varying sizes (segments read whole, fetch responses, insert bodies) with small long-lived objects
# allocated between them, as a streaming process does; then what glibc's heap holds free (mallinfo2's fordblks).
HEAP_AFTER_BUFFERS = """
import ctypes, random, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    from workers.gc_policy import tune_for_streaming
    tune_for_streaming()
rng, recent, kept = random.Random(1), [], []
for _ in range(300):
    recent.append(bytearray(rng.randrange(200_000, 3_000_000)))
    kept.append(bytearray(rng.randrange(600, 4000)))
    del recent[:-3]
recent.clear()
print(libc.mallinfo2().fordblks)
"""


def heap_free_after_buffers(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", HEAP_AFTER_BUFFERS, mode], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[1], check=True)
    return int(out.stdout.split()[-1])


def test_a_streaming_process_keeps_no_heap_of_freed_large_buffers():
    """glibc raises its mmap threshold to the size of each mapped block freed, so later large buffers land in the
    heap, where the small objects allocated between them pin their holes: the heap keeps megabytes free, more as
    the buffers grow. The streaming processes' policy (tune_for_streaming) pins the threshold."""
    untuned, tuned = heap_free_after_buffers("default"), heap_free_after_buffers("tuned")
    assert untuned > 4 * 2**20  # the premise: glibc's default keeps the freed buffers' space (10.5 MiB here)
    assert tuned < 512 * 1024, (tuned, untuned)


def test_the_rollup_workers_merge_counts_hold_an_int_per_key_and_forget_past_their_cap():
    """The visitor sketches' merge counts (oltp.visitors._Appended, ADR 47) live as long as the rollup worker: one
    entry per (domain, zone, dimension, day, value) written, up to MAX_KEYS. Each is an int keyed by an int (the
    key tuple of fresh strings cost 4x as much: 187 MB at the cap), past the cap they are forgotten, and a key's
    COMPACT_AT-th row is still due once."""
    from datetime import UTC, datetime

    from oltp.visitors import COMPACT_AT, _Appended

    day = datetime(2026, 12, 7, tzinfo=UTC)
    appended = _Appended()
    appended.MAX_KEYS = 1_000

    def row(i: int) -> tuple:  # a visitors_dim_1d row as add_visitors gathers it: key columns, sketch, n
        return (f"d{i % 7}.example.com", "UTC", "page", day, f"/p/{i}", b"sketch", 1)

    due = [appended.due([[], [], [row(0)]])[2] for _ in range(3 * COMPACT_AT)]
    assert sum(len(d) for d in due) == 3  # every COMPACT_AT-th row of the key: due, and counted afresh
    assert all(d == [row(0)[:5]] for d in due if d)
    for i in range(1, 2_500):
        appended.due([[], [], [row(i)]])
    assert 0 < len(appended._counts) <= appended.MAX_KEYS + 1
    assert all(type(k) is int and type(n) is int for k, n in appended._counts.items())
