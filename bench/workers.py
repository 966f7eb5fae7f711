"""Worker benchmarks: the rollup and loader consumer loops against the raw floors beneath them.

Run: `python -m bench.workers [--quick] [--memory] [--profile rollup|loader]`. One run starts its
own tansu and durable embedded PostgreSQL (chDB on disk in a temporary directory), measures,
stops them and prints one table (also written to bench/results/workers.json).
`python -m bench.run` runs the same measurements as part of the whole-platform table.

FLOORS use no project code in the hot path, on the same events (~450-byte JSON values):
- kafka raw consume: kafka-python, manual assign, seek_to_beginning, 5000 records per poll (the
  workers' consumer settings), on the very topic the workers drain, which holds batched records as the
  shipper writes them (core/records.py, ADR 55): each record split into its events' bytes, not parsed,
  and the rate given in events/s; a new consumer each round, best of ROUNDS (single passes swing by
  +-15%, and the box drifts over minutes). The ratios are against this floor;
- kafka raw consume, single-event records: the same, on the same events written one record each (the
  topic's format before ADR 55; the floor the ratios had then), measured in the same rounds, shown with
  the stages against it too: how much batching bought, on the floor that had been the bound;
- pg raw COPY: one psycopg COPY of the (hash, domain, type, ts, value) rows, built beforehand,
  into a plain table of a durable server;
- chdb raw insert: one clickhouse-connect insert of the pre-built columns (column_oriented,
  DateTime64 as epoch milliseconds: the fastest form measured on chDB, see ADR 14) into a
  MergeTree table shaped like tally.events.

STAGES run the product code, built as `tally rollup-worker` / `tally loader-worker` build them
(tally.roots), draining a topic that holds the same events (produced beforehand). They are timed
from partition assignment to the end of the last sink write (the group join, ~half the session
timeout, is excluded and shown in the note). The consume floor and both stages run in ROUNDS
interleaved rounds (the stages on emptied tables) and each reports its best (all are in the notes);
before each, PostgreSQL checkpoints and chDB's background merges end (`settle`).
The whole process runs under the workers' GC policy (workers/gc_policy.py), floors included.

RATIOS: rollup / consume floor (target >= 0.8); loader / min(consume floor, chdb floor) (target
>= 0.8). Also rollup / COPY and loader / chdb insert, for where the time goes.

--memory has each worker drain a backlog of the main run's size and one 10x larger, each drain in
a fresh process built as the worker is (bench/worker_memory.py), and reports their peak RSS
(VmHWM) with the ratio 10x / 1x: about 1 means memory is bounded by the poll and batch sizes, not
by the backlog. (Below ~100k events, as with `--n 30000`, the 1x drain never fills a whole batch and
the ratio overstates: 2.18 there, 1.07-1.21 at 200k and 500k.)
--profile runs one worker's drain under cProfile and prints the top functions (cumulative).
--batch-cost runs only the rollup sink, on its own durable embedded PostgreSQL: CPU time per 5000-event batch of
the server backend and of the client (robust on a shared box, where wall times swing), the part in
oltp.visitors.add_visitors, and EXPLAIN (ANALYZE, BUFFERS, WAL) of one batch's statement (`batch_cost`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import (
    RESULTS_DIR,
    Bench,
    drain_loops,
    make_events,
    print_table,
    proc_status_kib,
    rate,
    say,
    start_servers,
)
from core.records import is_batch, split_batch
from workers.gc_policy import tune_for_streaming

F_CONSUME, F_COPY, F_CH_INSERT = "kafka raw consume, workers' topic", "pg raw COPY", "chdb raw insert"
# The same events as single-event records (the format before ADR 55): the floor the ratios had before.
F_CONSUME_SINGLE = "kafka raw consume, single-event records"
SINGLE_TOPIC = "tally.events.single"
F_LOADER_FLOOR = "loader floor: min(consume, chdb insert)"
TOPIC, PARTITIONS = "tally.events", 4
_EPOCH, _MS = datetime(1970, 1, 1, tzinfo=UTC), timedelta(milliseconds=1)

CH_FLOOR_DDL = """CREATE TABLE IF NOT EXISTS bench_floor.events (
    hash FixedString(32), domain LowCardinality(String), url String, ts DateTime64(3, 'UTC'),
    received_at DateTime64(3, 'UTC'), type LowCardinality(String), value Nullable(Decimal(18, 6)),
    referrer Nullable(String), user_agent Nullable(String), browser LowCardinality(Nullable(String)),
    os LowCardinality(Nullable(String)), device LowCardinality(Nullable(String)),
    country LowCardinality(Nullable(String)), visitor Nullable(String), page Nullable(String),
    source LowCardinality(Nullable(String)), utm_medium LowCardinality(Nullable(String)),
    utm_campaign LowCardinality(Nullable(String))
) ENGINE = MergeTree ORDER BY (toDate(ts), domain, hash)"""


# ---------------------------------------------------------------- floors


def bench_pg_copy(b: Bench, dsn: str, events: list) -> None:
    import psycopg

    rows = [(uuid.UUID(e.hash), e.domain, e.type, e.ts, e.value) for e in events]
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_copy"
                     " (hash uuid, domain text, event_type text, ts timestamptz, value numeric(24, 6))")
        conn.commit()
        t0 = time.perf_counter()
        with conn.cursor().copy("COPY bench_copy (hash, domain, event_type, ts, value) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
        b.add(F_COPY, rate(len(rows), time.perf_counter() - t0), "rows/s", note="one COPY, durable server")
        conn.execute("DROP TABLE bench_copy")


def _ms(dt: datetime) -> int:
    return (dt - _EPOCH) // _MS


def bench_ch_insert(b: Bench, ch_dsn: str, events: list) -> None:
    from olap.client import connect
    from olap.schema import EVENT_COLUMNS

    client = connect(ch_dsn)  # the same cached engine the loader uses (one chDB engine per directory)
    client.command("CREATE DATABASE IF NOT EXISTS bench_floor")
    client.command(CH_FLOOR_DDL)
    columns = [[e.hash for e in events], [e.domain for e in events], [e.url for e in events],
               [_ms(e.ts) for e in events], [_ms(e.received_at) for e in events], [e.type for e in events],
               [e.value for e in events], [e.referrer for e in events], [e.user_agent for e in events],
               [e.browser for e in events], [e.os for e in events], [e.device for e in events],
               [e.country for e in events], [e.visitor for e in events], [e.page for e in events],
               [e.source for e in events], [e.utm_medium for e in events], [e.utm_campaign for e in events]]
    warm = [c[:1000] for c in columns]
    client.insert("bench_floor.events", warm, column_names=EVENT_COLUMNS, column_oriented=True)  # cold first insert
    t0 = time.perf_counter()
    client.insert("bench_floor.events", columns, column_names=EVENT_COLUMNS, column_oriented=True)
    b.add(F_CH_INSERT, rate(len(events), time.perf_counter() - t0), "rows/s",
          note=f"one {len(events)}-row columnar insert, after a warm-up insert")
    client.command("DROP DATABASE bench_floor")


def consume_once(bootstrap: str, topic: str, n: int) -> float:
    """One raw kafka-python consume of the workers' own topic (same records, same batches), events/s: a
    batched record (core/records.py) is split into its events' bytes (not parsed), a single-event record
    counts one.

    A new consumer, timed from its seek to the beginning (metadata already loaded) to the last
    record, as a worker stage is timed from its assignment: a reused consumer would first wait for
    the fetch it left in flight at the end of the log (up to fetch_max_wait_ms, 500 ms)."""
    from kafka import KafkaConsumer

    from bench.common import topic_partitions

    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=None, enable_auto_commit=False,
                             max_poll_records=5000, max_partition_fetch_bytes=4 * 1024 * 1024)
    try:
        tps = topic_partitions(consumer, topic)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got, t0, deadline = 0, time.perf_counter(), time.monotonic() + 300
        while got < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumed {got} of {n}")
            for msgs in consumer.poll(timeout_ms=500).values():
                got += sum(len(split_batch(m.value)) if is_batch(m.value) else 1 for m in msgs)
        return rate(got, time.perf_counter() - t0)
    finally:
        consumer.close()


def produce_batched(bootstrap: str, topic: str, events: list, settings) -> int:
    """Put `events` on a fresh topic as the shipper does: batched records per partition (core/records.py,
    TALLY_KAFKA_RECORD_EVENTS / _BYTES), in the same order. Returns the number of records."""
    return produce_packed(bootstrap, topic, ((e.domain.encode(), e.to_json()) for e in events), settings)


def produce_packed(bootstrap: str, topic: str, keyed: Iterable[tuple[bytes, bytes]], settings) -> int:
    """`produce_batched` of (domain bytes, event JSON) pairs."""
    from core.records import pack
    from workers.kafka_io import ensure_topic, make_producer

    ensure_topic([bootstrap], topic, PARTITIONS)
    producer = make_producer([bootstrap])
    errors: list[BaseException] = []
    sent = 0
    try:
        parts = sorted(producer.partitions_for(topic))
        for record in pack(keyed, len(parts), max_events=settings.record_events, max_bytes=settings.record_bytes):
            producer.send(topic, value=record.value, partition=parts[record.partition]).add_errback(errors.append)
            sent += 1
        producer.flush(timeout=300)
    finally:
        producer.close(timeout=10)
    if errors:
        raise RuntimeError(f"{len(errors)} of {sent} records not acknowledged: {errors[0]!r}")
    return sent


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]]) -> int:
    """Put (key, value) records on a fresh topic, as the shipper did before batched records (make_producer:
    acks=all, lz4)."""
    from workers.kafka_io import ensure_topic, make_producer

    ensure_topic([bootstrap], topic, PARTITIONS)
    producer = make_producer([bootstrap])
    errors: list[BaseException] = []
    sent = 0
    try:
        for k, v in records:
            producer.send(topic, key=k, value=v).add_errback(errors.append)
            sent += 1
            if sent % 50_000 == 0:
                producer.flush(timeout=300)
        producer.flush(timeout=300)
    finally:
        producer.close(timeout=10)
    if errors:
        raise RuntimeError(f"{len(errors)} of {sent} records not acknowledged: {errors[0]!r}")
    return sent


# ---------------------------------------------------------------- the workers


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def drain_timed(loops, n: int, profile: bool = False) -> tuple[float, str]:
    """Drain the loop(s) (several: each in its own thread, as `tally rollup-worker` runs them), then
    close them; return (events/s from the first partition assignment to the last sink write, note)."""
    loops = loops if isinstance(loops, list) else [loops]
    marks: dict[str, float] = {}
    lock = threading.Lock()
    for loop in loops:
        seek, write = loop.seek_to_stored, loop.sink.write

        def timed_seek(partitions, _seek=seek):
            _seek(partitions)
            with lock:
                marks.setdefault("assigned", time.perf_counter())

        def timed_write(batch, _write=write):
            _write(batch)
            with lock:
                marks["last_write"] = max(marks.get("last_write", 0.0), time.perf_counter())

        loop.seek_to_stored, loop.sink.write = timed_seek, timed_write
    profiler = cProfile.Profile() if profile and len(loops) == 1 else None
    _reset_peak_rss()
    start_mib = proc_status_kib("VmRSS") / 1024
    t0 = time.perf_counter()
    try:
        if profiler:
            profiler.enable()
        drain_loops(loops)
        total = time.perf_counter() - t0
    finally:
        if profiler:
            profiler.disable()
        for loop in loops:
            loop.close()
    peak_mib = proc_status_kib("VmHWM") / 1024
    stored, rejects = sum(lp.stored_events for lp in loops), sum(lp.stored_rejects for lp in loops)
    if stored != n or rejects:
        raise RuntimeError(f"stored {stored} events and {rejects} rejects, expected {n}")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        out.write("\n--- by own time ---\n")
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue(), file=sys.stderr)
    steady = marks["last_write"] - marks["assigned"]
    note = (f"{len(loops)} consumer loop(s); " if len(loops) > 1 else "") + (
        f"excl. {marks['assigned'] - t0:.1f}s group join; drain() total {total:.1f}s; "
        f"RSS {start_mib:,.0f} MiB before, peak {peak_mib:,.0f} MiB (+{peak_mib - start_mib:,.0f})")
    return rate(n, steady), note


# Rounds: the consume floor and both stages are measured ROUNDS times, interleaved (consume, rollup,
# loader, consume, ...), and each reports its best: this box's speed drifts by up to 2x over minutes
# (other tenants), so a floor measured in one minute and a stage in another would compare the drift.
# Before every drain but the first, the stage's tables are emptied, so every drain does the same work
# (except creating time partitions, which exist after the first).
ROUNDS = 3
_ROLLUP_STATE = ("seen_events", "rollup_15m", "rollup_1h", "rollup_1d", "rollup_1d_coverage", "ingestion_15m",
                 "collector_refusals")


def _best(figures: list[float], notes: list[str]) -> tuple[float, str]:
    best = max(figures)
    if len(figures) == 1:
        return best, notes[0]
    return best, f"best of {', '.join(f'{f:,.0f}' for f in figures)}; " + notes[figures.index(best)]


def settle(settings) -> None:
    """Let what the previous measurement left running finish before the next one starts: PostgreSQL
    writes its dirty pages now (CHECKPOINT), and chDB's background merges (in this process) end, so
    that no measurement pays for the one before it (a stage's own checkpoints and merges it pays)."""
    import psycopg

    from olap.client import connect

    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    client, deadline = connect(settings.clickhouse_dsn), time.monotonic() + 60
    while int(client.command("SELECT count() FROM system.merges")) and time.monotonic() < deadline:
        time.sleep(0.2)


def rollup_once(settings, n: int, *, profile: bool = False, empty_first: bool = False) -> tuple[float, str]:
    """One drain of the topic by the rollup worker's loop (a new group); checks every event was counted."""
    import psycopg

    from tally.roots import build_rollup_loops

    if empty_first:
        with psycopg.connect(settings.pg_dsn) as conn:
            conn.execute(f"TRUNCATE {', '.join(_ROLLUP_STATE)}")
    settle(settings)
    loops = build_rollup_loops(settings, group=f"rollups-{uuid.uuid4().hex[:8]}")  # as `tally rollup-worker`
    with psycopg.connect(settings.pg_dsn) as conn:
        before = conn.execute("SELECT coalesce(sum(events), 0) FROM rollup_15m").fetchone()[0]
    eps, note = drain_timed(loops, n, profile)
    with psycopg.connect(settings.pg_dsn) as conn:
        counted = conn.execute("SELECT coalesce(sum(events), 0) FROM rollup_15m").fetchone()[0] - before
    if counted != n:
        raise RuntimeError(f"rollups count {counted} new events, expected {n}")
    return eps, note


def loader_once(settings, n: int, *, profile: bool = False, empty_first: bool = False) -> tuple[float, str]:
    """One drain of the topic by the loader's loop (a new group); checks every event was stored."""
    from olap.client import connect
    from tally.roots import build_loader_loop

    client = connect(settings.clickhouse_dsn)
    db = settings.clickhouse_database
    if empty_first:
        client.command(f"TRUNCATE TABLE {db}.events")
    settle(settings)
    loop = build_loader_loop(settings, group=f"loader-{uuid.uuid4().hex[:8]}")
    before = int(client.command(f"SELECT count() FROM {db}.events FINAL"))
    eps, note = drain_timed(loop, n, profile)
    counted = int(client.command(f"SELECT count() FROM {db}.events FINAL")) - before
    if counted != n:
        raise RuntimeError(f"ClickHouse counts {counted} new events, expected {n}")
    return eps, note


def add_rollup(b: Bench, label: str, eps: float, note: str) -> None:
    b.add(label, eps, "events/s", F_CONSUME, note=note)
    b.add(label, eps, "events/s", F_COPY, note="same run, vs COPY floor")


def add_loader(b: Bench, label: str, eps: float, note: str) -> None:
    b.add(label, eps, "events/s", F_LOADER_FLOOR, note=note)
    b.add(label, eps, "events/s", F_CONSUME, note="same run, vs consume floor")
    b.add(label, eps, "events/s", F_CH_INSERT, note="same run, vs chdb insert floor")


def bench_rounds(b: Bench, settings, bootstrap: str, n: int, profile: str | None = None,
                 rounds: int = ROUNDS, single_topic: str | None = None) -> None:
    """The consume floor, the rollup worker and the loader, interleaved `rounds` times; best of each. With
    `single_topic` (the same events as single-event records), its raw consume too, in each round."""
    consumed: list[float] = []
    singles: list[float] = []
    rollup: tuple[list[float], list[str]] = ([], [])
    loader: tuple[list[float], list[str]] = ([], [])
    for i in range(rounds):
        say(f"[bench] round {i + 1} of {rounds}: consume, rollup drain, loader drain ...")
        settle(settings)
        consumed.append(consume_once(bootstrap, settings.topic, n))
        if single_topic:
            singles.append(consume_once(bootstrap, single_topic, n))
        for (figures, notes), once, name in ((rollup, rollup_once, "rollup"), (loader, loader_once, "loader")):
            eps, note = once(settings, n, profile=profile == name and i == 0, empty_first=i > 0)
            figures.append(eps)
            notes.append(note)
    b.add(F_CONSUME, max(consumed), "events/s",
          note=f"manual assign, 5000/poll, the workers' topic (batched records split into events, not parsed); "
               f"a new consumer each round; best of {', '.join(f'{f:,.0f}' for f in consumed)}")
    if singles:
        b.add(F_CONSUME_SINGLE, max(singles), "events/s",
              note=f"the same events, one record each (before ADR 55); best of "
                   f"{', '.join(f'{f:,.0f}' for f in singles)}")
    add_loader_floor(b)
    # The ratio is best stage / best floor. Each round's own ratio (the stage against the floor measured
    # a minute before it) is shown too: when the box's speed drifts within the run, the bests can come
    # from different minutes.
    ch_floor = next((r.value for r in b.results if r.name == F_CH_INSERT and r.value), None)
    loader_floors = [min(c, ch_floor) if ch_floor else c for c in consumed]
    for (figures, notes), floors in ((rollup, consumed), (loader, loader_floors)):
        paired = sorted(f / floor for f, floor in zip(figures, floors, strict=True))
        notes[:] = [f"round ratios {', '.join(f'{f / fl:.2f}' for f, fl in zip(figures, floors, strict=True))} "
                    f"(median {paired[len(paired) // 2]:.2f}); {note}" for note in notes]
    add_rollup(b, "rollup drain -> PG", *_best(*rollup))
    add_loader(b, "loader drain -> chDB", *_best(*loader))
    if singles:  # the stages against the floor they had when every event was a record of its own
        b.add("rollup drain -> PG", max(rollup[0]), "events/s", F_CONSUME_SINGLE,
              note="same run, vs single-record floor")
        b.add("loader drain -> chDB", max(loader[0]), "events/s", F_CONSUME_SINGLE,
              note="same run, vs single-record floor")


def add_loader_floor(b: Bench) -> None:
    floors = {r.name: r.value for r in b.results if r.floor is None and r.value}
    if F_CONSUME in floors and F_CH_INSERT in floors:
        b.add(F_LOADER_FLOOR, min(floors[F_CONSUME], floors[F_CH_INSERT]), "events/s")


def bench_memory(b: Bench, env: dict[str, str], events: list, factor: int, work: Path) -> None:
    """Each worker drains a backlog of the main run's size, then one `factor` x larger, each drain in a
    fresh child process built as the worker is (bench/worker_memory.py); peak RSS of each, and the
    ratio of the larger backlog's peak to the smaller's (flat: about 1)."""
    from bench.worker_memory import measure_in_child
    from core.config import Settings

    base = [e.to_json() for e in events]
    chdb = f"chdb://{work / 'chdb-memory'}"  # the children's own: chDB opens a path in one process only
    for f in (1, factor):
        n, topic = len(events) * f, f"{TOPIC}.memory{f}"
        say(f"[bench] producing a {n:,}-event backlog ...")

        def records(n: int = n):
            for i in range(n):
                e, line = events[i % len(events)], base[i % len(events)]
                # a fresh hash per copy, so that both stores count every one of them
                yield e.domain.encode(), line.replace(e.hash.encode(), uuid.uuid4().hex.encode(), 1)

        produce_packed(env["TALLY_KAFKA_BOOTSTRAP"], topic, records(), Settings.from_env(env))
        for which in ("rollup", "loader"):
            say(f"[bench] {which} drains {n:,} events in a fresh process ...")
            r = measure_in_child(which, n, {**env, "TALLY_KAFKA_TOPIC": topic, "TALLY_CLICKHOUSE_DSN": chdb})
            label = f"{which} peak RSS, {f}x backlog"
            b.add(label, float(r["peak_mib"]), "MiB", None if f == 1 else f"{which} peak RSS, 1x backlog",
                  note=f"{n:,} events in {r['drain_s']}s ({r['loops']} loop(s)); RSS {r['started_mib']} MiB after "
                       f"start-up, {r['end_mib']} at the end; at each tenth of the drain: "
                       + " ".join(str(x) for x in r["rss_at_tenths_mib"]))


def run(b: Bench, profile: str | None, memory: bool) -> dict[str, object]:
    from core.config import Settings

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix="tally-bench-workers-"))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        say(f"[bench] building {b.n} events ...")
        events = make_events(b.n)
        # The bench's own heap (the events above) is not the workers': keep the cyclic GC from
        # re-scanning it during every measurement. And measure floors and stages alike under the GC
        # policy the worker processes run with (workers/gc_policy.py, ADR 27), so that no ratio
        # comes from a GC setting only one side has.
        tune_for_streaming()
        servers: dict[str, object] = {}
        if not b.measure("start tansu + PostgreSQL", start_servers, work, cleanup, servers):
            return {}
        bootstrap, dsn = servers["bootstrap"], servers["dsn"]
        env = {
            "TALLY_HOME": str(work / "home"), "TALLY_SECRET": "bench-secret-0123456789abcdef",
            "TALLY_SPOOL_DIR": str(work / "spool"), "TALLY_KAFKA_BOOTSTRAP": bootstrap, "TALLY_PG_DSN": dsn,
            "TALLY_CLICKHOUSE_DSN": f"chdb://{work / 'chdb'}", "TALLY_KAFKA_TOPIC": TOPIC,
            "TALLY_KAFKA_PARTITIONS": str(PARTITIONS), "TALLY_CONSUMER_SESSION_TIMEOUT_MS": "6000"}
        settings = Settings.from_env(env)
        if not b.measure("fill the topic", lambda _b: produce_batched(bootstrap, TOPIC, events, settings)):
            return {}
        if not b.measure("fill the single-record topic", lambda _b: produce(
                bootstrap, SINGLE_TOPIC, ((e.domain.encode(), e.to_json()) for e in events))):
            return {}
        run_worker_benches(b, settings, dsn, bootstrap, events, profile=profile, single_topic=SINGLE_TOPIC)
        if memory:
            b.measure("memory, 1x and 10x backlog", bench_memory, env, events, 10, work)
        say("[bench] stopping servers ...")
    return {"events": b.n, "partitions": PARTITIONS}


def run_worker_benches(b: Bench, settings, dsn: str, bootstrap: str, events: list, *,
                       profile: str | None = None, single_topic: str | None = None) -> None:
    """The floors and both workers, on a topic that already holds `events` (also called by bench.run)."""
    b.measure(F_COPY, bench_pg_copy, dsn, events)
    b.measure(F_CH_INSERT, bench_ch_insert, settings.clickhouse_dsn, events)
    b.measure("consume floor and both workers, interleaved", bench_rounds, settings, bootstrap, len(events), profile,
              ROUNDS, single_topic)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` so far (/proc; a PostgreSQL backend's too)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_cost(batches: int = 12, size: int = 5000, explain: bool = True) -> None:
    """The rollup sink's cost per batch, by CPU time rather than wall time (a shared box swings the latter):
    `batches` batches of `make_events`' events through a RollupSink on its own durable embedded PostgreSQL,
    each its own transaction; prints the median wall time and the mean CPU of the server backend and of this
    process per batch (the first two batches excluded: partitions, caches), the part of both in
    oltp.visitors.add_visitors, and with `explain` the EXPLAIN (ANALYZE, BUFFERS, WAL) of one more batch's
    statement (rolled back) to bench/results/rollup_batch_plan.txt."""
    import statistics

    import psycopg

    import oltp.rollup_sink as sink_module
    from core.batch import Batch
    from core.event import decode_stored
    from infra.postgres import EmbeddedPostgres
    from oltp.schema import ensure_schema

    spent: list[tuple[float, float]] = []
    add_visitors = sink_module.add_visitors

    def timed_add_visitors(cur: psycopg.Cursor, groups: list) -> None:
        pid = cur.connection.info.backend_pid
        server, client = _cpu_s(pid), time.process_time()
        add_visitors(cur, groups)
        spent.append((_cpu_s(pid) - server, time.process_time() - client))

    sink_module.add_visitors = timed_add_visitors
    events = [decode_stored(e.to_json()) for e in make_events(size * (batches + 1))]
    chunks = [events[i:i + size] for i in range(0, len(events), size)]
    with tempfile.TemporaryDirectory() as work:
        postgres = EmbeddedPostgres(Path(work) / "pg", durable=True)
        postgres.start()
        try:
            ensure_schema(postgres.dsn)
            sink = sink_module.RollupSink(postgres.dsn, "bench")
            walls, server, client = [], 0.0, 0.0
            for i, chunk in enumerate(chunks[:-1]):
                pid = sink._connection().info.backend_pid
                s0, c0, t0 = _cpu_s(pid), time.process_time(), time.perf_counter()
                sink.write(Batch(topic="bench", events=chunk, next_offsets={0: (i + 1) * size}))
                walls.append(time.perf_counter() - t0)
                if i >= 2:
                    server, client = server + _cpu_s(pid) - s0, client + time.process_time() - c0
            n = batches - 2
            vs, vc = (sum(x[k] for x in spent[2:]) / n * 1000 for k in (0, 1))
            wall = statistics.median(walls[2:]) * 1000
            print(f"rollup sink, {batches} batches of {size} events: median wall {wall:.0f} ms;"
                  f" CPU per batch: server {server / n * 1000:.0f} ms, client {client / n * 1000:.0f} ms;"
                  f" of which add_visitors server {vs:.0f} ms, client {vc:.0f} ms")
            if explain:
                _explain_batch(sink, chunks[-1])
            sink.close()
        finally:
            postgres.stop()
            sink_module.add_visitors = add_visitors


def _explain_batch(sink, events: list) -> None:
    import oltp.rollup_sink as sink_module
    from core.batch import Batch

    conn = sink._connection()
    shape = sink_module._shape(events)
    zones = {d: sink._zones.get(conn, d) for d in sorted(shape.domains)}
    conn.commit()
    _, params = sink._prepare(conn, Batch(topic="bench", events=events), shape, zones)
    conn.commit()
    plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, WAL) " + sink_module._APPLY_ALL_NEW,
                        {**params, "cap": sink.cap}, prepare=False).fetchall()
    conn.rollback()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "rollup_batch_plan.txt"
    out.write_text("\n".join(r[0] for r in plan) + "\n")
    print(f"EXPLAIN ANALYZE of one more batch's statement (rolled back): {out} ({plan[-1][0]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200k events instead of 500k (a few minutes)")
    parser.add_argument("--n", type=int, help="number of events (overrides --quick)")
    parser.add_argument("--memory", action="store_true",
                        help="also report each worker's peak RSS draining a 1x and a 10x backlog")
    parser.add_argument("--profile", choices=("rollup", "loader"), help="cProfile one worker's drain")
    parser.add_argument("--batch-cost", action="store_true",
                        help="only the rollup sink's CPU per 5000-event batch (server and client) and the plan of one")
    args = parser.parse_args(argv)
    if args.batch_cost:
        batch_cost()
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    b = Bench(args.quick)
    b.n = args.n or (200_000 if args.quick else 500_000)
    started, t0 = datetime.now(UTC), time.monotonic()
    params = run(b, args.profile, args.memory)
    b.resolve_ratios()
    print_table(b.results)
    report = {"mode": "quick" if args.quick else "full", "started_at": started.isoformat(timespec="seconds"),
              "wall_s": round(time.monotonic() - t0, 1), "params": params,
              "results": [asdict(r) for r in b.results]}
    (RESULTS_DIR / "workers.json").write_text(json.dumps(report, indent=2) + "\n")
    errors = sum(1 for r in b.results if r.error)
    say(f"[bench] done in {report['wall_s']}s; {errors} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
