"""The consumer lag gauges: `tally_consumer_lag_records` per assigned partition (ADR 21)."""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer

from core import metrics

log = logging.getLogger(__name__)


class LagReporter:
    """Refreshes a group's lag gauges after a poll, at most every `every_s`."""

    def __init__(self, group: str, *, every_s: float = 1.0) -> None:
        self.group = group
        self.every_s = every_s
        self._next_report = 0.0  # monotonic time of the next update

    def report(self, consumer: KafkaConsumer) -> None:
        """Highwater (from the last fetch, no round trip) minus position, per assigned partition;
        partitions not fetched yet are left out. A failure is logged at debug level, never raised."""
        now = time.monotonic()
        if now < self._next_report:
            return
        self._next_report = now + self.every_s
        try:
            for tp in consumer.assignment():
                high = consumer.highwater(tp)
                if high is None:
                    continue
                position = consumer.position(tp, timeout_ms=0)
                if position is not None:
                    metrics.set_lag(self.group, tp.partition, high - position)
        except Exception:
            log.debug("%s: could not read the lag", self.group, exc_info=True)
