"""A consumer group member that kafka-python left "rebalancing" with no join under way, and the nudge out of it.

kafka-python 3.0.12's consumer coordinator starts a join when `need_rejoin()` is true, which for the group's
leader includes "the topic's metadata differs from what I assigned over". The join runs as a task; a short
`poll` returns before it finishes and leaves it in flight, to be awaited by the next poll *while
`need_rejoin()` is still true*. If the metadata settles back in between (a topic deleted and recreated under
the group: `tally topic grow` on tansu), `need_rejoin()` turns false, nobody awaits the join again, and the
member stays in MemberState.REBALANCING for good: no fetches, no heartbeats, no assignment (seen in CI: a
rollup loop stored nothing for 25 s after a recreate; the loader's stall after repeated broker restarts in the
topology chaos run looked the same).

The wedge is recognisable from outside: REBALANCING while `need_rejoin()` is false. While a join is really in
progress `need_rejoin()` stays true (the base flag is cleared only together with the move to STABLE). So when
the wedge lasts `grace_s`, `StallWatch.check` calls `request_rejoin()`: the next poll joins again and, on
success, the member is STABLE with a fresh assignment.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer
from kafka.coordinator.base import MemberState

log = logging.getLogger(__name__)

CHECK_S = 0.25  # how often `check` looks (it runs at every step of the loop)


class StallWatch:
    """Notices a member wedged in REBALANCING with no join wanted, and asks kafka-python to join again."""

    def __init__(self, name: str, *, grace_s: float = 1.0) -> None:
        self.name = name
        self.grace_s = grace_s
        self.nudges = 0  # times the member was asked to join again
        self._since: float | None = None
        self._next_check = 0.0

    def check(self, consumer: KafkaConsumer) -> bool:
        """True when this call asked the coordinator to rejoin (the wedge had lasted `grace_s`)."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + CHECK_S
        if not wedged(consumer):
            self._since = None
            return False
        if self._since is None:
            self._since = now
            return False
        if now - self._since < self.grace_s:
            return False
        self._since = None
        self.nudges += 1
        log.warning("%s: the group member was rebalancing with no join under way for %.1fs (a kafka-python "
                    "wedge); joining again", self.name, self.grace_s)
        consumer._coordinator.request_rejoin()
        return True


def wedged(consumer: KafkaConsumer) -> bool:
    """REBALANCING while no join is wanted: a join task was abandoned (module docstring)."""
    if not consumer.subscription():
        return False  # partitions assigned by hand: no group
    coordinator = consumer._coordinator
    return coordinator.state is MemberState.REBALANCING and not coordinator.need_rejoin()
