"""Which incarnation of the topic the consumer loop's positions belong to (ADR 16).

The topic may be recreated under a running consumer (a restarted memory-only broker): no rebalance need
happen, so positions (and the stored offsets they came from) of the old incarnation would skip the new
one's first records. The watch asks for fresh metadata every `check_s` and names Kafka's topic id
(KIP-516); a changed id means seeking again to what the sink stored for the new incarnation.
"""

from __future__ import annotations

import time

from kafka import KafkaConsumer


class IncarnationWatch:
    """The topic id the loop seeked with, and whether the broker now names another."""

    def __init__(self, topic: str, *, check_s: float = 1.0) -> None:
        self.topic = topic
        self.check_s = check_s  # how often fresh metadata is requested
        self.topic_id = ""  # the incarnation of the last seek ("" while the broker named none)
        self.ids_seen = False  # the broker sends topic ids: never store offsets under an unknown one
        self.changes = 0  # topic id changes noticed while running
        self._next_check = 0.0

    def current(self, consumer: KafkaConsumer) -> str:
        """The topic id in the consumer's metadata now; "" when the broker does not send ids."""
        # kafka-python keeps topic ids (KIP-516) from metadata on its cluster object; there is no
        # public accessor in 3.0.12.
        topic_id = consumer._client.cluster.topic_id(self.topic)
        return str(topic_id) if topic_id else ""

    def seeking(self, consumer: KafkaConsumer) -> str:
        """Note the incarnation the loop seeks in now, and return its id."""
        self.topic_id = self.current(consumer)
        self.ids_seen = self.ids_seen or bool(self.topic_id)
        return self.topic_id

    @property
    def unnamed(self) -> bool:
        """Seeked while the topic was missing from the metadata (a broker restart), though the broker
        sends ids: offsets must not be stored under no id."""
        return self.ids_seen and not self.topic_id

    def changed(self, consumer: KafkaConsumer) -> bool:
        """True when the metadata names another topic id than the one the loop seeked with (and the
        consumer holds partitions). Requests fresh metadata at most every `check_s`."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_s
            consumer._client.cluster.request_update()
        current = self.current(consumer)
        if not current or current == self.topic_id or not consumer.assignment():
            return False
        return True
