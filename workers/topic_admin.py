"""The raw-events topic's partitions: what it has, and growing it (`tally topic show|grow`; ADR 60).

`grow` asks the broker for more partitions with Kafka's CreatePartitions (kafka-python's
`KafkaAdminClient.create_partitions`). Kafka can only add partitions, never remove them, and a keyed
producer then sends some domains to other partitions (murmur2(domain) % N changes with N): what that means
for the stores is in docs/adr/0060-site-limits-across-hosts-and-topic-grow.md. Running shippers and consumers
pick the new partitions up from their next metadata refresh (workers/kafka_io.METADATA_MAX_AGE_MS), no restart.

The embedded broker, tansu 0.6.0, does not implement CreatePartitions (its ApiVersions answer leaves it
out): `grow` refuses with `TopicAdminError("unsupported")` naming the README's procedure (drain, then
recreate the topic with more partitions: the workers follow a recreated topic by its id, ADR 16).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewPartitions
from kafka.errors import IncompatibleBrokerVersion, KafkaError

MAX_PARTITIONS = 10_000  # what `grow` accepts at most (a typo guard: Kafka itself allows more)
BOOTSTRAP_TIMEOUT_MS = 5_000  # an unreachable broker is said so after this (kafka-python's default: 30 s)


class TopicAdminError(Exception):
    """A refused or failed topic operation. `code`: unknown_topic | not_more | too_many | unsupported | failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True, slots=True)
class TopicState:
    """A topic's partitions, its incarnation (topic id, "" if the broker names none) and each partition's end
    offset (the next offset a record gets)."""

    topic: str
    topic_id: str
    end_offsets: dict[int, int]

    @property
    def partitions(self) -> int:
        return len(self.end_offsets)


def describe(bootstrap: Sequence[str], topic: str) -> TopicState:
    """The topic's partitions and end offsets; TopicAdminError("unknown_topic") if it does not exist."""
    consumer = KafkaConsumer(bootstrap_servers=list(bootstrap), group_id=None, enable_auto_commit=False,
                             request_timeout_ms=15_000, bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise TopicAdminError("unknown_topic", f"topic {topic!r} does not exist on {','.join(bootstrap)} "
                                                   "(`tally init` creates it)")
        topic_id = consumer._client.cluster.topic_id(topic)
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in sorted(partitions)])
        return TopicState(topic, str(topic_id or ""), {tp.partition: offset for tp, offset in sorted(ends.items())})
    finally:
        consumer.close()


def grow(bootstrap: Sequence[str], topic: str, partitions: int, *, wait_s: float = 15.0) -> tuple[int, int]:
    """Raise `topic`'s partition count to `partitions`; (before, after) once the broker's metadata shows it.

    Refused (TopicAdminError, nothing changed): `not_more` when `partitions` is not more than it has (Kafka
    cannot remove partitions), `too_many` beyond MAX_PARTITIONS, `unknown_topic`, `unsupported` when the
    broker does not implement CreatePartitions (tansu 0.6.0). `failed`: the broker refused it, or its
    metadata did not show the new count within `wait_s`.
    """
    if partitions > MAX_PARTITIONS:
        raise TopicAdminError("too_many", f"{partitions} partitions is more than {MAX_PARTITIONS}; grow in steps")
    before = describe(bootstrap, topic).partitions
    if partitions <= before:
        raise TopicAdminError("not_more", f"topic {topic!r} has {before} partitions; it can only grow (Kafka cannot "
                                          f"remove partitions): give more than {before}")
    admin = KafkaAdminClient(bootstrap_servers=list(bootstrap), request_timeout_ms=15_000,
                             bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    try:
        admin.create_partitions({topic: NewPartitions(partitions)})
    except IncompatibleBrokerVersion:
        raise TopicAdminError(
            "unsupported", f"the broker at {','.join(bootstrap)} does not implement CreatePartitions (tansu 0.6.0, "
            "the embedded broker, does not): drain the pipeline and recreate the topic with more partitions "
            "instead (README: Growing the topic)") from None
    except KafkaError as exc:
        raise TopicAdminError("failed", f"the broker refused to grow {topic!r}: {exc}") from None
    finally:
        admin.close()
    deadline = time.monotonic() + wait_s
    while (after := describe(bootstrap, topic).partitions) < partitions:
        if time.monotonic() > deadline:
            raise TopicAdminError("failed", f"asked for {partitions} partitions, the broker still shows {after} "
                                            f"after {wait_s:g}s")
        time.sleep(0.2)
    return before, after
