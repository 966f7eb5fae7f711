"""Kafka clients configured the way the contracts require (acks=all, idempotent, manual offsets)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from workers.kafka_records import use_lean_records
from workers.limits import MAX_BATCH

log = logging.getLogger(__name__)

# How old the clients' topic metadata may get (kafka-python's default: 5 minutes). A topic grown by `tally topic
# grow` is seen by a running shipper (its partitions_for) and by the consumer group's leader, which then rejoins
# so the group rebalances over the new partitions, within this; a metadata request costs next to nothing (ADR 60).
METADATA_MAX_AGE_MS = 5_000
FETCH_MAX_WAIT_MS = 50  # the consumers' fetch wait on a quiet topic (sub-second freshness, ADR 56)


def records_per_poll(record_events: int, max_batch: int = MAX_BATCH) -> int:
    """The workers' `max_poll_records`: records that hold at most `max_batch` events when each carries up to
    `record_events` (TALLY_KAFKA_RECORD_EVENTS). Bounds a poll in events, not in records, so that each batch a
    worker holds decoded (in flight, gathered) stays under 2 x `max_batch` events however far behind it is
    (ADR 58's addendum: 5,000 records of up to 250 events let one poll of a lagging worker hold 1.25 M events)."""
    return max(1, max_batch // max(1, record_events))


def make_producer(bootstrap: Sequence[str], **overrides: object) -> KafkaProducer:
    config: dict[str, object] = dict(
        bootstrap_servers=list(bootstrap),
        acks="all",
        enable_idempotence=True,
        max_in_flight_requests_per_connection=5,
        linger_ms=5,
        batch_size=256 * 1024,
        compression_type="lz4",
        retries=2_147_483_647,
        delivery_timeout_ms=30_000,
        request_timeout_ms=10_000,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )
    config.update(overrides)
    return KafkaProducer(**config)


def make_consumer(bootstrap: Sequence[str], group: str, *, session_timeout_ms: int,
                  **overrides: object) -> KafkaConsumer:
    """A group consumer of raw record bytes with the workers' settings; fetched v2 batches are parsed by
    workers.kafka_records (the same records as kafka-python's parser, at half its cost; ADR 27)."""
    config: dict[str, object] = dict(
        bootstrap_servers=list(bootstrap),
        group_id=group,
        enable_auto_commit=False,  # offsets live in the store we write, in the same commit
        auto_offset_reset="earliest",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=max(100, session_timeout_ms // 6),
        max_poll_records=5000,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        # A quiet topic's fetch is answered after at most this wait; a busy one's at once (fetch_min_bytes = 1).
        # kafka-python's 500 ms default held a record arriving during the wait ~125 ms on tansu (the whole wait
        # on a broker that does not answer early); 50 ms: ~10 ms, for an idle consumer's 20 small requests a
        # second (ADR 56).
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    use_lean_records(consumer)
    return consumer


def ensure_topic(bootstrap: Sequence[str], topic: str, partitions: int, replication_factor: int = 1) -> None:
    """Create the raw-events topic if it does not exist (idempotent, safe to race).

    With several replicas, min.insync.replicas = 2 makes acks=all mean "on two brokers".
    """
    admin = KafkaAdminClient(bootstrap_servers=list(bootstrap), request_timeout_ms=10_000)
    try:
        if topic in admin.list_topics():
            return
        try:
            configs = {"min.insync.replicas": str(min(2, replication_factor))}
            admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor,
                                          topic_configs=configs if replication_factor > 1 else {})])
            log.info("created topic %s with %d partitions x %d replicas", topic, partitions, replication_factor)
        except TopicAlreadyExistsError:
            pass
    finally:
        admin.close()
