"""Temporary vs permanent store failures, and setting aside the records a store refuses for good.

A temporary failure (the store or the broker unreachable, a timeout, a lost connection) is
retried: the consumer pauses, rewinds to the stored offsets and reads the same records again.
A permanent one (the store refuses a value: a type, range or constraint error) would fail the
same way forever and stall its partition. `write_isolating` then halves the batch until it has
found the records the store refuses, stores every other record (each part without offsets: a
replay after a crash counts nothing twice, the stores dedup by event hash), and finally stores
the refused records in `rejected_records` with the store's reason, together with the batch's
offsets. At most `max_refused` records per batch are set aside this way; a batch with more is
treated as a temporary failure (something is wrong with the store, not with the records).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import fields

import msgspec

from core.batch import Batch, Rejected
from core.event import StoredEvent

log = logging.getLogger(__name__)

MAX_REFUSED = 100


class _Part(Batch):
    """Some events of a batch, stored without offsets. Its idempotency token names its events, since
    it spans no offsets (ClickHouse would otherwise drop a second part as a repeat of the first)."""

    def token(self, group: str) -> str:
        digest = hashlib.blake2b(",".join(e.hash for e in self.events).encode(), digest_size=16).hexdigest()
        return f"{group}/{self.topic}/{self.topic_id}/part-{digest}"


class TooManyRefused(RuntimeError):
    """More than `max_refused` records of one batch refused: treated as a store failure (retried)."""


def write_isolating(write: Callable[[Batch], None], batch: Batch, *,
                    permanent: Callable[[BaseException], bool], max_refused: int = MAX_REFUSED) -> Batch:
    """Store `batch`; on a permanent failure (`permanent(exc)`: the sink's `is_permanent`, workers/sink.py),
    set aside exactly the records the store refuses.

    Returns what was stored: `batch` itself, or a batch whose `rejected` holds the refused records
    too (for counting). A temporary failure propagates (the caller rewinds and retries).
    """
    try:
        write(batch)
        return batch
    except Exception as exc:
        if not permanent(exc):
            raise
        first = exc
    refused: list[tuple[StoredEvent, BaseException]] = []
    _bisect(write, batch, batch.events, permanent, refused, max_refused)
    log.error("store refused %d records of a batch of %d for good (first: %s); setting them aside",
              len(refused), len(batch.events), first)
    # Events do not carry their offsets: a refused one is filed under the batch's first partition and
    # offset, and its error names the spans it came from (its payload is the whole event).
    partition = min(batch.first_offsets, default=0)
    offset = batch.first_offsets.get(partition, 0)
    spans = ",".join(f"{p}:{batch.first_offsets[p]}-{batch.next_offsets.get(p, 0)}"
                     for p in sorted(batch.first_offsets))
    rejected = list(batch.rejected) + [
        Rejected(partition, offset,
                 f"store refused: {type(err).__name__}: {err}"[:900] + f" (hash {event.hash}, "
                 f"in offsets {spans})", msgspec.json.encode(event))
        for event, err in refused]
    final = Batch(topic=batch.topic, topic_id=batch.topic_id, rejected=rejected,
                  next_offsets=dict(batch.next_offsets), first_offsets=dict(batch.first_offsets))
    _copy_extras(batch, final)
    write(final)  # the refused records, anything else the batch carries besides events, and the offsets
    stored = Batch(topic=batch.topic, topic_id=batch.topic_id, rejected=rejected,
                   next_offsets=final.next_offsets, first_offsets=final.first_offsets)
    _copy_extras(batch, stored)
    refused_ids = {id(event) for event, _ in refused}
    stored.events = [e for e in batch.events if id(e) not in refused_ids]
    return stored


def _copy_extras(source: Batch, target: Batch) -> None:
    """Fields of a Batch other than events, rejects and offsets (e.g. the collectors' refusal counts) go
    with the final write, once."""
    for name in (f.name for f in fields(Batch)):
        if name not in ("topic", "topic_id", "events", "rejected", "next_offsets", "first_offsets"):
            setattr(target, name, getattr(source, name))


def _bisect(write: Callable[[Batch], None], batch: Batch, events: list[StoredEvent],
            permanent: Callable[[BaseException], bool], refused: list[tuple[StoredEvent, BaseException]],
            max_refused: int) -> None:
    if not events:
        return
    try:
        write(_Part(topic=batch.topic, topic_id=batch.topic_id, events=list(events)))
        return
    except Exception as exc:
        if not permanent(exc):
            raise
        if len(events) == 1:
            refused.append((events[0], exc))
            if len(refused) > max_refused:
                raise TooManyRefused(f"the store refused more than {max_refused} records of one batch "
                                     f"(last: {exc}); treating it as a store failure") from exc
            return
    half = len(events) // 2
    _bisect(write, batch, events[:half], permanent, refused, max_refused)
    _bisect(write, batch, events[half:], permanent, refused, max_refused)
