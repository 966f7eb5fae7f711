"""The cyclic garbage collector's policy for a streaming worker process (ADR 27).

A worker allocates a few GC-tracked objects per record (kafka-python's ConsumerRecord tuples, lists
per poll) and almost never makes reference cycles. With CPython's default thresholds (700, 10, 10)
the collector runs a young collection every few hundred records and, every few tens of thousands,
a full one over the whole start-up heap (Kafka client, psycopg, SQLAlchemy, Flask in the analyst
server): about 1 us per record measured on the 2-core box (bench/workers.py). So, once start-up is done:
freeze what exists (it is never collected, and no longer scanned) and collect young objects every
50,000 allocations instead of 700. Cycles are still collected, just less often; memory stays bounded
by the poll and batch sizes (`bench.workers --memory`).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def tune_for_streaming() -> None:
    """Freeze the start-up heap and raise the young-generation threshold (call once the loop is built)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 20, 20)
