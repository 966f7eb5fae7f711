"""What one batch of new events costs `seen_events`' key as the day's partition grows (docs/adr/0058, addendum of
2026-12-07; migration 0015): `python -m bench.seen_index [--quick]`.

Two tables with seen_events' columns in one embedded, durable PostgreSQL (as `tally up` runs it): one keyed
(hash, ts), the key before 0015, one (ts, hash). Both are filled alike with events whose times advance at 8,000
a second; at each size: CHECKPOINT, then batches of 5,000 new "now" events (the sink's shape: sorted by hash),
each measured by counts, not times, so the machine's load does not matter: the WAL it wrote
(`pg_current_wal_insert_lsn`) and the shared blocks it read and dirtied (`EXPLAIN (ANALYZE, BUFFERS)`).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psycopg

from infra.postgres import EmbeddedPostgres

RATE, BATCH = 8000.0, 5000
KEYS = {"hash first (before 0015)": "hash, ts", "time first (0015)": "ts, hash"}
_INSERT = ("INSERT INTO {} (hash, ts) SELECT h, to_timestamp(t) FROM unnest(%s::uuid[], %s::float8[]) AS x(h, t)")


def _batch(t0: float, n: int) -> tuple[list[str], list[float]]:
    base = t0 + n / RATE
    rows = sorted((uuid.uuid4(), base + random.random() * 3) for _ in range(BATCH))
    return [str(h) for h, _ in rows], [t for _, t in rows]


def _measure(conn: psycopg.Connection[Any], table: str, t0: float, n: int, batches: int) -> dict[str, float]:
    conn.execute("CHECKPOINT")
    wal, read, dirtied = [], [], []
    for i in range(batches):
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]  # type: ignore[index]
        plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + _INSERT.format(table),
                            _batch(t0, n + i * BATCH)).fetchone()[0][0]["Plan"]  # type: ignore[index]
        wal.append(float(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)",
                                      (lsn,)).fetchone()[0]))  # type: ignore[index]
        read.append(plan.get("Shared Read Blocks", 0))
        dirtied.append(plan.get("Shared Dirtied Blocks", 0))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"wal_kib": med(wal) / 1024, "read": med(read), "dirtied": med(dirtied)}


def run(sizes: list[int], batches: int) -> None:
    t0 = 1_700_000_000.0
    with tempfile.TemporaryDirectory(prefix="tally-seen-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "data", durable=True).start()
        try:
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                tables = {label: f"seen_{i}" for i, label in enumerate(KEYS)}
                for label, table in tables.items():
                    conn.execute(f"CREATE TABLE {table} (hash uuid NOT NULL, ts timestamptz NOT NULL, "
                                 f"PRIMARY KEY ({KEYS[label]}))")
                print("| rows | key | WAL per batch | blocks read | blocks dirtied |\n|---|---|---|---|---|")
                have = 0
                for size in sizes:
                    for table in tables.values():
                        conn.execute(f"INSERT INTO {table} (hash, ts) SELECT gen_random_uuid(), "
                                     f"to_timestamp({t0} + (%s + g) / {RATE}) FROM generate_series(1, %s) g",
                                     (have, max(0, size - have)))
                    for label, table in tables.items():
                        m = _measure(conn, table, t0, size, batches)
                        print(f"| {size:,} | {label} | {m['wal_kib']:,.0f} KiB | {m['read']:,.0f} | "
                              f"{m['dirtied']:,.0f} |", flush=True)
                    have = max(size, have) + batches * BATCH
        finally:
            pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 0.5 M and 3 M rows (a few minutes)")
    args = parser.parse_args()
    run([500_000, 3_000_000] if args.quick else [500_000, 3_000_000, 8_000_000], 10 if args.quick else 30)


if __name__ == "__main__":
    main()
