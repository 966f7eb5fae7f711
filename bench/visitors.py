"""What the visitor sketches cost (ADR 47): `add_visitors` per batch of 5000 events, and a sketch's size.

Run: `python -m bench.visitors`. Starts its own durable embedded PostgreSQL in a temporary directory, migrates
it, and for each shape of batch (SHAPES: "bench.workers" is `python -m bench.workers`'s events) adds ROUNDS
batches of 5000 non-bot events (the groups the rollup sink passes: per (domain, hour), (domain, day) and (domain,
day, dimension, value)), each batch in its own committed transaction; prints the median and slowest time per
batch (building the sketches, the statements, the merges, the commit) and, per lg_k, the compact size of a
sketch holding 100 / 10k / 1M visitors.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from datasketches import hll_sketch

from oltp.schema import ensure_schema
from oltp.tiers import ensure_tier_partitions
from oltp.visitors import DIM_LG_K, DIMENSIONS, HLL_TYPE, TOTAL_LG_K, VisitorGroup, add_visitors

EVENTS, ROUNDS = 5000, 40  # 40 rounds: every key of the busy shapes is merged (COMPACT_AT) twice or more
CARDINALITY = {"page": 200, "source": 20, "country": 40, "device": 3, "browser": 6, "os": 6}
# name -> (domains, visitors per domain, hours the events' times spread over, values per dimension)
SHAPES = {
    "1 domain, live": (1, 20_000, 2, CARDINALITY),
    "bench.workers": (40, 1 << 30, 48, {"page": 5, "source": 1, "country": 1, "device": 1, "browser": 1, "os": 1}),
    "40 domains, live": (40, 2_000, 2, CARDINALITY),
    "1000 domains, live": (1000, 50, 2, CARDINALITY),
}


def batch_groups(shape: tuple[int, int, int, dict[str, int]], rng: random.Random,
                 end: datetime) -> list[VisitorGroup]:
    """The groups of one batch of EVENTS events spread evenly over the shape's domains and hours before `end`."""
    domains, visitors_per_domain, hours, values = shape
    per: dict[tuple[str, str, str, datetime, str, str], set[str]] = {}
    for i in range(EVENTS):
        domain = f"site{i % domains}.bench.example"
        visitor = f"{domain}-{rng.randrange(visitors_per_domain)}"
        ts = end - timedelta(seconds=rng.randrange(hours * 3600))
        h = ts.replace(minute=0, second=0, microsecond=0)
        keys = [("1h", domain, "", h, "", ""), ("1d", domain, "UTC", h.replace(hour=0), "", "")]
        keys += [("1d", domain, "UTC", h.replace(hour=0), d, f"{d}{rng.randrange(values[d])}") for d in DIMENSIONS]
        for k in keys:
            per.setdefault(k, set()).add(visitor)
    return [(*k, sorted(v)) for k, v in per.items()]


def run_shape(dsn: str, shape: tuple[int, int, int, dict[str, int]]) -> tuple[float, float, int, float]:
    """(median ms per batch, slowest batch ms, groups per batch, MB of sketches at the end) for one shape."""
    rng = random.Random(shape[0])
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    times, groups = [], 0
    with psycopg.connect(dsn) as conn:
        ensure_tier_partitions(conn, end - timedelta(days=3), end + timedelta(days=1))
        conn.execute("TRUNCATE visitors_1h, visitors_1d, visitors_dim_1d")
        conn.commit()
        for _ in range(ROUNDS):
            batch = batch_groups(shape, rng, end)
            groups = len(batch)
            t = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur:
                add_visitors(cur, batch)
            times.append((time.perf_counter() - t) * 1000)
        size = conn.execute("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_inherits i"
                            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent::regclass::text"
                            " IN ('visitors_1h', 'visitors_1d', 'visitors_dim_1d')").fetchone()
    return statistics.median(times), max(times), groups, float(size[0] if size else 0) / 1e6


def sizes() -> list[tuple[int, int, int]]:
    """(lg_k, distinct, bytes of the compact serialization)."""
    out = []
    for lg_k in (TOTAL_LG_K, DIM_LG_K):
        sketch, n = hll_sketch(lg_k, HLL_TYPE), 0
        for target in (100, 10_000, 1_000_000):
            while n < target:
                sketch.update(uuid.UUID(int=n).hex)
                n += 1
            out.append((lg_k, target, len(sketch.serialize_compact())))
    return out


def main() -> None:
    from infra.postgres import EmbeddedPostgres

    with tempfile.TemporaryDirectory() as work:
        postgres = EmbeddedPostgres(Path(work) / "pg", durable=True)
        postgres.start()
        try:
            ensure_schema(postgres.dsn)
            print(f"add_visitors, batches of {EVENTS} non-bot events with a visitor key, {ROUNDS} batches a shape:")
            for name, shape in SHAPES.items():
                median, worst, groups, mb = run_shape(postgres.dsn, shape)
                print(f"  {name:<20} {groups:>6} groups a batch: median {median:6.1f} ms ({median * 1000 / EVENTS:5.1f}"
                      f" us an event), slowest {worst:6.1f} ms; {mb:.1f} MB of sketches after")
        finally:
            postgres.stop()
    print("compact sketch size (HLL_4):")
    for lg_k, n, size in sizes():
        print(f"  lg_k {lg_k}: {n:>9,} distinct: {size:>6,} bytes")


if __name__ == "__main__":
    main()
