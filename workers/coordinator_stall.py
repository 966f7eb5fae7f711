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

A member can also lose its group for good in ways a rejoin cannot mend: after repeated restarts of the embedded
broker a loader's client marked its coordinator dead and never found it again (its polls spinning in
`ensure_coordinator_ready`; the topology chaos run, ADR 60): it kept fetching its old partitions, but could never
join again, so never got the topic's new ones. So a member not STABLE, or without a known coordinator, for
`rebuild_after_s` (a minute: longer than any broker restart or rebalance seen here) is reported by `check` as
"rebuild": the loop closes its KafkaConsumer and makes a new one (ConsumerLoop .rebuild_consumer), which starts
from nothing: a new connection, coordinator lookup and join. The positions come from the store as after any
assignment, so nothing is lost or counted twice.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer
from kafka.coordinator.base import MemberState

log = logging.getLogger(__name__)

CHECK_S = 0.25  # how often `check` looks (it runs at every step of the loop)
REBUILD_AFTER_S = 60.0  # a member not STABLE this long gets a new KafkaConsumer


class StallWatch:
    """Notices a member wedged in REBALANCING with no join wanted, and asks kafka-python to join again."""

    def __init__(self, name: str, *, grace_s: float = 1.0, rebuild_after_s: float = REBUILD_AFTER_S) -> None:
        self.name = name
        self.grace_s = grace_s
        self.rebuild_after_s = rebuild_after_s
        self.nudges = 0  # times the member was asked to join again
        self._since: float | None = None  # wedged since
        self._unstable_since: float | None = None  # not STABLE since
        self._next_check = 0.0

    def check(self, consumer: KafkaConsumer) -> str | None:
        """"rejoin" when this call asked the coordinator to rejoin (the wedge had lasted `grace_s`), "rebuild" when
        the member has not been STABLE with a known coordinator for `rebuild_after_s` (the caller makes a new
        consumer), else None."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + CHECK_S
        if not consumer.subscription():
            return None  # partitions assigned by hand: no group
        coordinator = consumer._coordinator
        if coordinator.stable() and not coordinator.coordinator_unknown():
            self._since = self._unstable_since = None
            return None
        if self._unstable_since is None:
            self._unstable_since = now
        if now - self._unstable_since >= self.rebuild_after_s:
            self._since = self._unstable_since = None
            log.warning("%s: the group member has not been stable with a known coordinator for %.0fs (state %s, "
                        "coordinator %s); making a new consumer", self.name, self.rebuild_after_s, coordinator.state,
                        coordinator.coordinator_id)
            return "rebuild"
        return "rejoin" if self._nudged(consumer, now) else None

    def _nudged(self, consumer: KafkaConsumer, now: float) -> bool:
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
