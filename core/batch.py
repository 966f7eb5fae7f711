"""What a consumer hands to a sink: decoded events, rejected records and the offsets they end at."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.event import RefusalCount, StoredEvent


def same_incarnation(stored_topic_id: str, current_topic_id: str) -> bool:
    """Stored offsets apply unless both ids are known and differ (the topic was recreated)."""
    return not stored_topic_id or not current_topic_id or stored_topic_id == current_topic_id


@dataclass(frozen=True, slots=True)
class Rejected:
    partition: int
    offset: int
    error: str
    payload: bytes
    # The event's 0-based position in a batched record (core/records.py; the error names it too), or None.
    index: int | None = None


@dataclass(slots=True)
class Batch:
    topic: str
    # Kafka's id of this incarnation of the topic ("" if the broker has none): offsets stored with
    # one incarnation's id are never used to seek in another (a recreated topic restarts at 0).
    topic_id: str = ""
    events: list[StoredEvent] = field(default_factory=list)  # decoded by core.event.decode_stored
    rejected: list[Rejected] = field(default_factory=list)
    counts: list[RefusalCount] = field(default_factory=list)  # the collectors' refusal counts (rollup only)
    # partition -> offset of the next record to read once this batch is stored
    next_offsets: dict[int, int] = field(default_factory=dict)
    # partition -> first offset in this batch (for idempotency tokens)
    first_offsets: dict[int, int] = field(default_factory=dict)
    # Set when the batch holds records read again after a rewind (`tally replay`, workers/rewind.py): it
    # makes the insert-deduplication token differ from the first read's, so deleted rows come back.
    replay: str = ""

    def __len__(self) -> int:
        return len(self.events) + len(self.rejected) + len(self.counts)

    def merge(self, later: Batch) -> None:
        """Append the batch polled right after this one (same topic incarnation, no seek in between)."""
        self.events.extend(later.events)
        self.rejected.extend(later.rejected)
        self.counts.extend(later.counts)
        for partition, offset in later.first_offsets.items():
            self.first_offsets.setdefault(partition, offset)
        self.next_offsets.update(later.next_offsets)
        self.replay = self.replay or later.replay

    def token(self, group: str) -> str:
        """A deterministic id for exactly this span of the log (same span -> same token)."""
        spans = ",".join(f"{p}:{self.first_offsets[p]}-{self.next_offsets[p]}" for p in sorted(self.next_offsets))
        token = f"{group}/{self.topic}/{self.topic_id}/{spans}"
        return f"{token}/{self.replay}" if self.replay else token
