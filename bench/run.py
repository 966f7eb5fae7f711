"""Throughput benchmarks for tally: each pipeline stage against the raw floor beneath it.

Run: `python -m bench.run [--quick]`; `make bench` runs it and then the other stage
modules: `bench.collector` (the collector over HTTP against a bare endpoint, wrk) and
`bench.isolation` (analyst queries against the customer API). One run starts its own
servers in temporary directories (tansu, durable embedded PostgreSQL, chDB on disk),
measures, stops them, prints one table and writes the same rows to
bench/results/latest.json.

FLOORS use no project code in the hot path: raw kafka-python produce (acks=all,
idempotent, lz4, linger 5 ms) and consume (manual assign, seek_to_beginning); raw
psycopg COPY into a plain table; one raw clickhouse-connect insert into a chDB
MergeTree table; write + fdatasync per line and per 100 lines, on the repo's
filesystem. All floors carry the same event JSON lines (~450 bytes) the stages carry.

STAGES run the product code: SpoolWriter.append (1 and 100 lines per call),
Shipper.ship_once over sealed segments, and the rollup (-> PostgreSQL) and
loader (-> chDB) consumer loops draining the topic the shipper filled (those,
with their store floors, are bench/workers.py, also runnable alone:
`python -m bench.workers --quick`).
The worker figures exclude the consumer-group join (~half the session
timeout): they are timed from partition assignment to the end of the last
sink write; the join time and the whole drain() wall time are in the note.

RATIO = stage figure / floor figure. 1.0 means the stage costs nothing beyond
the floor; 0.5 means it reaches half the floor's rate. A "x50" floor is the
bare endpoint's req/s times 50 events, the ceiling if the app were free. A
ratio above 1 means the stage batches better than the raw floor does (e.g. the
stage overlaps work the floor does serially). Numbers are noisy on a 2-core box:
read orders of magnitude, not percent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    PARTITIONS,
    RAW_TOPIC,
    RESULTS_DIR,
    SECRET,
    TOPIC,
    Bench,
    chunks,
    make_events,
    print_table,
    rate,
    say,
    start_servers,
    topic_partitions,
)

ROOT = Path(__file__).resolve().parent.parent

F_FSYNC1, F_FSYNC100 = "disk write+fdatasync x1", "disk write+fdatasync x100"
F_PRODUCE, F_CONSUME = "kafka raw produce", "kafka raw consume"
# The same events packed as the shipper packs them (core/records.py, ADR 55): the shipper's floor.
F_PRODUCE_BATCHED = "kafka raw produce, batched records"


# ---------------------------------------------------------------- test data


# ---------------------------------------------------------------- disk: fsync floors and the spool


def bench_disk(b: Bench, work: Path, lines: list[bytes], settings, per_call: int) -> None:
    """The fsync floor, then SpoolWriter.append with the same lines per call (back to back: disks drift)."""
    from spool.segments import SpoolWriter

    count, floor = (b.n_single, F_FSYNC1) if per_call == 1 else (b.n, F_FSYNC100)
    path = work / f"fsync-{per_call}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        t0 = time.perf_counter()
        for chunk in chunks(lines[:count], per_call):
            os.write(fd, b"".join(line + b"\n" for line in chunk))
            os.fdatasync(fd)
        b.add(floor, rate(count, time.perf_counter() - t0), "lines/s")
    finally:
        os.close(fd)
        path.unlink()

    spool_dir = work / f"spool-append-{per_call}"
    writer = SpoolWriter(spool_dir, max_bytes=settings.spool_segment_bytes, max_age_s=settings.spool_segment_age_s)
    try:
        t0 = time.perf_counter()
        for chunk in chunks(lines[:count], per_call):
            writer.append(chunk)
        b.add(f"spool append x{per_call}", rate(count, time.perf_counter() - t0), "lines/s", floor,
              note=f"{settings.spool_segment_bytes >> 20} MiB / {settings.spool_segment_age_s:g}s segments")
    finally:
        writer.close()
        shutil.rmtree(spool_dir)


# ---------------------------------------------------------------- HTTP: wrk against gunicorn / granian


# ---------------------------------------------------------------- Kafka floors and the shipper


def bench_kafka_raw(b: Bench, bootstrap: str, events: list) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    from workers.kafka_io import ensure_topic

    ensure_topic([bootstrap], RAW_TOPIC, PARTITIONS)
    records = [(e.domain.encode(), e.to_json()) for e in events]
    # Same tuning as workers/kafka_io.make_producer, so the ratio is the shipper's own overhead.
    producer = KafkaProducer(bootstrap_servers=[bootstrap], acks="all", enable_idempotence=True,
                             compression_type="lz4", linger_ms=5, batch_size=256 * 1024)
    try:
        producer.partitions_for(RAW_TOPIC)  # metadata outside the timing
        t0 = time.perf_counter()
        futures = [producer.send(RAW_TOPIC, key=k, value=v) for k, v in records]
        producer.flush(timeout=120)
        for f in futures:
            f.get(timeout=30)
        b.add(F_PRODUCE, rate(len(records), time.perf_counter() - t0), "msgs/s",
              note="batch_size 256 KiB, lz4, linger 5 ms")
        bench_produce_batched(b, producer, records)
    finally:
        producer.close(timeout=10)

    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=None, enable_auto_commit=False,
                             max_poll_records=5000, max_partition_fetch_bytes=4 * 1024 * 1024)
    try:
        tps = topic_partitions(consumer, RAW_TOPIC)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got, t0, deadline = 0, time.perf_counter(), time.monotonic() + 120
        while got < len(records):
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumed {got} of {len(records)}")
            got += sum(len(msgs) for msgs in consumer.poll(timeout_ms=500).values())
        b.add(F_CONSUME, rate(got, time.perf_counter() - t0), "msgs/s", note="manual assign, 5000/poll")
    finally:
        consumer.close()


def bench_produce_batched(b: Bench, producer, records: list[tuple[bytes, bytes]]) -> None:
    """The same events packed into batched records per partition (TALLY_KAFKA_RECORD_EVENTS' default), events/s."""
    from core.config import Settings
    from core.records import pack
    from workers.kafka_io import ensure_topic

    defaults, topic = Settings.from_env({}), f"{RAW_TOPIC}.batched"  # apart: the consume floor reads RAW_TOPIC
    ensure_topic(list(producer.config["bootstrap_servers"]), topic, PARTITIONS)
    parts = sorted(producer.partitions_for(topic))  # metadata outside the timing
    t0 = time.perf_counter()
    futures = [producer.send(topic, value=r.value, partition=parts[r.partition])
               for r in pack(records, len(parts), max_events=defaults.record_events, max_bytes=defaults.record_bytes)]
    producer.flush(timeout=120)
    for f in futures:
        f.get(timeout=30)
    b.add(F_PRODUCE_BATCHED, rate(len(records), time.perf_counter() - t0), "events/s",
          note=f"{len(futures)} records of up to {defaults.record_events} events, same producer settings")


def bench_shipper(b: Bench, work: Path, lines: list[bytes], settings) -> None:
    from spool.segments import SpoolWriter, sealed_segments
    from tally.roots import build_shipper

    settings = settings.with_overrides(spool_dir=work / "ship-spool")
    writer = SpoolWriter(settings.spool_dir, max_bytes=settings.spool_segment_bytes, max_age_s=3600)
    for chunk in chunks(lines, 100):
        writer.append(chunk)
    writer.close()
    segments = len(sealed_segments(settings.spool_dir))
    shipper = build_shipper(settings)  # as `tally shipper` builds it (topic, make_producer)
    try:
        shipper.producer.partitions_for(settings.topic)  # connect + metadata outside the timing
        t0 = time.perf_counter()
        shipped = shipper.ship_once()
        seconds = time.perf_counter() - t0
    finally:
        if hasattr(shipper, "close"):
            shipper.close()
        else:  # a Shipper that was handed a producer instead of a factory
            shipper.producer.close(timeout=10)
        shutil.rmtree(settings.spool_dir, ignore_errors=True)
    if shipped != len(lines):
        raise RuntimeError(f"shipped {shipped} of {len(lines)} events")
    b.add("shipper ship_once", rate(shipped, seconds), "events/s", F_PRODUCE_BATCHED, note=f"{segments} segments")
    b.add("shipper ship_once", rate(shipped, seconds), "events/s", F_PRODUCE, note="vs single-record produce")


def produce_directly(_b: Bench, bootstrap: str, topic: str, events: list) -> None:
    """Put the events on a fresh topic so the workers can be measured even when the shipper failed."""
    from workers.kafka_io import ensure_topic, make_producer

    ensure_topic([bootstrap], topic, PARTITIONS)
    producer = make_producer([bootstrap])
    try:
        futures = [producer.send(topic, key=e.domain.encode(), value=e.to_json()) for e in events]
        producer.flush(timeout=120)
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close(timeout=10)


# ---------------------------------------------------------------- stores: floors and the workers


# The worker benchmarks (rollup, loader) and their store floors live in bench/workers.py.


# ---------------------------------------------------------------- orchestration and report


def run_all(b: Bench) -> dict[str, object]:
    from core.config import Settings

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        # Spool and fsync files live on the repo's filesystem (bench/results/ is gitignored);
        # the servers' data goes to /tmp.
        disk = Path(tempfile.mkdtemp(prefix="tmp-", dir=RESULTS_DIR))
        cleanup.callback(shutil.rmtree, disk, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="tally-bench-"))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)

        say(f"[bench] building {b.n} events ...")
        events = make_events(b.n)
        lines = [e.to_json() for e in events]
        base = {"TALLY_HOME": str(work / "home"), "TALLY_SECRET": SECRET, "TALLY_SPOOL_DIR": str(disk / "spool")}
        settings = Settings.from_env(base)

        for per_call in (1, 100):
            b.measure(f"disk + spool append x{per_call}", bench_disk, disk, lines, settings, per_call)

        # The collector over HTTP is bench/collector.py; analyst isolation is bench/isolation.py.

        servers: dict[str, object] = {}
        if b.measure("start tansu + PostgreSQL", start_servers, work, cleanup, servers):
            bootstrap, dsn = servers["bootstrap"], servers["dsn"]
            env = {**base, "TALLY_KAFKA_BOOTSTRAP": bootstrap, "TALLY_PG_DSN": dsn,
                   "TALLY_CLICKHOUSE_DSN": f"chdb://{work / 'chdb'}", "TALLY_KAFKA_TOPIC": TOPIC,
                   "TALLY_KAFKA_PARTITIONS": str(PARTITIONS), "TALLY_CONSUMER_SESSION_TIMEOUT_MS": "6000"}
            settings = Settings.from_env(env)
            b.measure("kafka raw produce/consume", bench_kafka_raw, bootstrap, events)
            # The workers drain what the shipper put on the topic; if it failed, a fresh topic filled directly.
            # (tansu's end_offsets under-reports compressed batches, so the topic size cannot be checked.)
            shipped = b.measure("shipper ship_once", bench_shipper, disk, lines, settings)
            if not shipped:
                settings = Settings.from_env({**env, "TALLY_KAFKA_TOPIC": TOPIC + ".direct"})
            if shipped or b.measure("produce events directly", produce_directly, bootstrap, settings.topic, events):
                from bench.workers import run_worker_benches  # one bench module per stage

                run_worker_benches(b, settings, dsn, bootstrap, events)
        say("[bench] stopping servers ...")
    return {"events": b.n, "single_fsync_lines": b.n_single, "http_seconds": b.http_s,
            "mean_event_bytes": round(sum(map(len, lines)) / len(lines))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller N and 5 s HTTP runs (~2-3 minutes)")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("bench: `wrk` is not on PATH; install it (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    b = Bench(args.quick)
    started, t0 = datetime.now(UTC), time.monotonic()
    params = run_all(b)
    b.resolve_ratios()
    print_table(b.results)
    report = {
        "mode": "quick" if args.quick else "full", "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - t0, 1), "params": params,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "results": [asdict(r) for r in b.results],
    }
    out = RESULTS_DIR / "latest.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    errors = sum(1 for r in b.results if r.error)
    say(f"[bench] done in {report['wall_s']}s; {errors} error(s); results in {out.relative_to(ROOT)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
