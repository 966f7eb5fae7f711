"""The cyclic garbage collector's policy for a streaming worker process (ADR 27).

With CPython's default policy, every few tens of thousands of records a full collection walks the
whole start-up heap (Kafka client, psycopg, SQLAlchemy, Flask in the analyst server), although
nothing in it ever becomes garbage: about 1 us per record on the 2-core box. So, once start-up is
done, the worker freezes what exists: it is never collected and no longer scanned.

The thresholds stay CPython's defaults. They count net allocations of tracked objects, and
kafka-python leaves a reference cycle behind every poll (a timeout exception whose traceback holds
the frames, and through them what the fetch and the coordinator held). A young threshold of 50,000
was tried: a stream's allocations and frees balance, so young collections became rare and those
cycles piled up; a worker's peak RSS grew with the backlog it drained (+190 MiB over 2M events,
all of it freed by one `gc.collect()`), with no speed gained that the bench could tell from noise.
"""

from __future__ import annotations

import gc

from workers.malloc_policy import pin_mmap_threshold


def tune_for_streaming() -> None:
    """Collect, then freeze the start-up heap (call once the loop is built); and pin glibc's mmap threshold, so
    that the large buffers of a stream do not fragment the heap (workers/malloc_policy.py)."""
    gc.collect()
    gc.freeze()
    pin_mmap_threshold()
