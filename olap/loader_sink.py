"""Writes consumer batches into ClickHouse raw events.

Contract of `write`: when it returns, the batch's events are inserted and the
partition offsets stored. ClickHouse has no multi-table transaction, so the
order is events first (with an insert-deduplication token naming exactly this
span of the log), offsets second. A crash between the two replays the span;
the token drops an identical re-insert and ReplacingMergeTree on the event
hash collapses any other duplicate, which analysts never see (reads use final).

On a cluster (TALLY_CLICKHOUSE_CLUSTER, ADR 57) `events` is a Distributed table: the insert goes to it, sharded
by the event hash, with `distributed_foreground_insert` so that it returns only once every shard has its part.
Each shard's part carries the same token; the shard's ReplicatedReplacingMergeTree keeps it in Keeper, shared
by the shard's replicas, so a replayed span is dropped whichever replica it reaches.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DataError

from core.batch import Batch, same_incarnation
from core.event import StoredEvent
from olap.cluster import LOADER_INSERT_SETTINGS

# The decoded events go to ClickHouse as JSON lines written by msgspec in C (ADR 27): StoredEvent's
# field names are the columns' names, times are RFC 3339 in UTC (ClickHouse keeps their milliseconds,
# as DateTime64(3) truncates), values are the normalised Decimal as a string, and "v" is skipped.
# ClickHouse parses them outside the GIL; building columns in Python held it for ~2.5 us per event.
_LINES = msgspec.json.Encoder(decimal_format="string")
_JSON_INSERT = {"input_format_skip_unknown_fields": 1, "date_time_input_format": "best_effort"}


def events_json_lines(events: list[StoredEvent]) -> bytes:
    """The events as ClickHouse JSONEachRow input (one line per StoredEvent)."""
    return _LINES.encode_lines(events)


def events_insert_settings(token: str, distributed: bool = False) -> dict[str, object]:
    """The settings of the events insert: the span's deduplication token, and on a cluster (`events`
    Distributed) a foreground insert (olap/cluster.py LOADER_INSERT_SETTINGS)."""
    return {**_JSON_INSERT, "insert_deduplication_token": token, **(LOADER_INSERT_SETTINGS if distributed else {})}


def offsets_json_lines(group: str, topic: str, topic_id: str, offsets: dict[int, int], now: datetime) -> bytes:
    """Rows of `consumer_offsets` as JSONEachRow input, in partition order; `written_at` to the microsecond in UTC
    (the column's DateTime64(6, 'UTC'); the newest row of a partition is its stored offset)."""
    written_at = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return _LINES.encode_lines([
        {"consumer_group": group, "topic": topic, "partition": p, "topic_id": topic_id, "next_offset": o,
         "written_at": written_at} for p, o in sorted(offsets.items())])


class LoaderSink:
    """The loader group's sink (workers/sink.py `Sink`)."""

    name = "clickhouse"

    def __init__(self, client: Client, db: str, group: str, distributed: bool = False) -> None:
        self.client = client
        self.db = db
        self.group = group
        self.distributed = distributed  # `events` is a Distributed table (TALLY_CLICKHOUSE_CLUSTER)

    def committed(self, topic: str, topic_id: str, partitions: list[int]) -> dict[int, int]:
        result = self.client.query(
            f"SELECT partition, argMax(next_offset, written_at), argMax(topic_id, written_at)"
            f" FROM {self.db}.consumer_offsets"
            " WHERE consumer_group = {g:String} AND topic = {t:String} GROUP BY partition",
            parameters={"g": self.group, "t": topic})
        return {int(p): int(o) for p, o, stored_id in result.result_rows
                if int(p) in partitions and same_incarnation(stored_id, topic_id)}

    def write(self, batch: Batch) -> None:
        if batch.events:
            self.client.raw_insert(f"{self.db}.events", insert_block=events_json_lines(batch.events),
                                   fmt="JSONEachRow",
                                   settings=events_insert_settings(batch.token(self.group), self.distributed))
        now = datetime.now(UTC)
        if batch.rejected:
            self.client.insert(
                f"{self.db}.rejected_records",
                [[self.group, batch.topic, r.partition, r.offset, r.error[:1000],
                  r.payload[:4096].decode("utf-8", "replace"), now] for r in batch.rejected],
                column_names=("consumer_group", "topic", "partition", "offset", "error", "payload", "rejected_at"))
        self._insert_offsets(batch.topic, batch.topic_id, batch.next_offsets, now)

    def _insert_offsets(self, topic: str, topic_id: str, offsets: dict[int, int], now: datetime) -> None:
        """Store `offsets` (partition -> next offset) as of `now`: JSON lines, like the events (no DESCRIBE of the
        table and no Python-built columns first, which made it cost ~1.5x an events insert; ADR 56)."""
        self.client.raw_insert(f"{self.db}.consumer_offsets", fmt="JSONEachRow",
                               insert_block=offsets_json_lines(self.group, topic, topic_id, offsets, now))

    @staticmethod
    def is_permanent(exc: BaseException) -> bool:
        """ClickHouse refusing a value (a type or range error) refuses it again."""
        return isinstance(exc, DataError)

    def store_rewound_offsets(self, topic: str, topic_id: str, offsets: dict[int, int]) -> None:
        """Store LOWER offsets for a rewind (`tally replay`, workers/rewind.py): a newer `written_at` wins."""
        self._insert_offsets(topic, topic_id, offsets, datetime.now(UTC))

    def close(self) -> None:
        pass
