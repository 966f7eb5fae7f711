"""What the consumer loop needs of a store: the `Sink` contract (ADR 5, ADR 38).

Implemented by oltp/rollup_sink.py `RollupSink` (PostgreSQL) and olap/loader_sink.py `LoaderSink`
(ClickHouse). The loop reads every member directly: a sink without one is a type error, not a
silent default.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from core.batch import Batch


@runtime_checkable
class Sink(Protocol):
    """A consumer group's store: its data, its rejected records and its offsets, written together."""

    name: str  # the store, in logs ("postgres", "clickhouse")
    group: str  # the consumer group whose offsets the store keeps (metrics, logs)

    def committed(self, topic: str, topic_id: str, partitions: list[int]) -> dict[int, int]:
        """Next offset to read per partition, as stored in this topic incarnation (absent: none stored)."""
        ...

    def write(self, batch: Batch) -> None:
        """Store the batch's events, rejected records and offsets; when it returns, all are stored."""
        ...

    def is_permanent(self, exc: BaseException) -> bool:
        """True for an error that the same records would raise again (set aside, not retried)."""
        ...

    def store_rewound_offsets(self, topic: str, topic_id: str, offsets: dict[int, int]) -> None:
        """Store LOWER offsets for a rewind (`tally replay`); stored when it returns."""
        ...

    def close(self) -> None: ...
