"""When the consumer loop leaves its group and joins it again: the topic's partitions changed (ADR 60, addendum).

A topic grown in place, or recreated with another partition count (the procedure for `tally topic grow` on
tansu 0.6.0, which has no CreatePartitions), changes the partitions a group must spread over. On Kafka the
leader notices it in its metadata, rejoins, and the group rebalances. tansu 0.6.0 keeps the group at
generation 0 and answers the leader's rejoin with the assignment it already had: the group stays on the old
partitions for good (the topology chaos run: a loader held 4 of 6 partitions for over 300 s, its store missing
every event of the two new ones). Only a member change makes tansu hand out a new assignment.

So each loop remembers the partition set it (re)joined for; when the metadata (refreshed every second by the
IncarnationWatch) names another set for `grace_s` in a row, the loop leaves the group and joins again as a new
member (`ConsumerLoop.regroup`), once per change. Every member does, so the group spreads whatever a member
knows of the others. On Kafka this costs one extra rebalance per partition change.
"""

from __future__ import annotations

import time

from kafka import KafkaConsumer

CHECK_S = 0.25  # how often `due` looks (it runs at every step of the loop)


class PartitionWatch:
    """The topic's partition set the loop joined for, and whether the metadata has named another for long enough."""

    def __init__(self, topic: str, *, grace_s: float = 2.0) -> None:
        self.topic = topic
        self.grace_s = grace_s  # how long a member waits for a rebalance before it regroups (the leader: 3x)
        self.joined_for: frozenset[int] = frozenset()  # the set the loop last joined for (empty: not known yet)
        self.generation: tuple[int, str] | None = None  # the group generation and member id of the last assignment
        self.assigned: list[int] = []  # this member's partitions, as last assigned
        self.regroups = 0  # times the loop left the group and joined again
        self._differs_since: float | None = None
        self._next_check = 0.0

    def current(self, consumer: KafkaConsumer) -> frozenset[int]:
        """The topic's partitions in the consumer's metadata now (empty while the topic is missing)."""
        # kafka-python's cluster metadata, kept fresh by the IncarnationWatch's requests (no blocking fetch).
        return frozenset(consumer._client.cluster.partitions_for_topic(self.topic) or ())

    def rejoining(self, partitions: frozenset[int]) -> None:
        """The loop left the group and joins it again for `partitions`."""
        self.joined_for, self.generation, self.assigned = partitions, None, []
        self._differs_since = None
        self.regroups += 1

    def on_assigned(self, consumer: KafkaConsumer, assigned: list[int]) -> None:
        """An assignment came. One of a new group generation (or to a new member id: a restarted broker's group
        starts again at 0) was made for the partitions the metadata names now; tansu's answer to a rejoin without
        a member change keeps both (and the old assignment)."""
        self.assigned = assigned
        generation = _generation(consumer)
        if not self.joined_for or (generation is not None and generation != self.generation):
            self.joined_for = _assigned_over(consumer, self.topic) or self.current(consumer)
            self.generation = generation
            self._differs_since = None

    def due(self, consumer: KafkaConsumer) -> bool:
        """True once the metadata has named another (non-empty) partition set than the joined one for the grace:
        `grace_s` for a follower, three times that for the group's leader, counted while no rebalance is in
        progress. A leader leaving mid-rebalance leaves tansu's group without one (every SyncGroup failing for
        good, seen with two members regrouping together); a follower's regroup is the member change that makes
        the leader assign anew, and a group of one is its own leader."""
        now = time.monotonic()
        if not self.joined_for or now < self._next_check or not consumer.subscription():
            return False  # not known yet, looked at lately, or partitions assigned by hand (no group)
        self._next_check = now + CHECK_S
        now_set = self.current(consumer)
        if not now_set or now_set == self.joined_for or _rebalancing(consumer):
            self._differs_since = None  # a rebalance in progress may fix it: wait for its assignment
            return False
        if self._differs_since is None:
            self._differs_since = now
        return now - self._differs_since >= self.grace_s * (3 if _is_leader(consumer) else 1)


def _generation(consumer: KafkaConsumer) -> tuple[int, str] | None:
    # kafka-python 3.0.12 has no public accessor for the generation or leadership of a member.
    generation = getattr(consumer._coordinator, "_generation", None)
    if generation is None or generation.generation_id < 0:  # none yet, or reset (the member must join again)
        return None
    return int(generation.generation_id), str(generation.member_id)


def _assigned_over(consumer: KafkaConsumer, topic: str) -> frozenset[int]:
    """The leader: the partitions it computed the assignment over (the metadata may have changed since)."""
    coordinator = consumer._coordinator
    snapshot = getattr(coordinator, "_assignment_snapshot", None) if _is_leader(consumer) else None
    return frozenset(snapshot.get(topic) or ()) if snapshot else frozenset()


def _rebalancing(consumer: KafkaConsumer) -> bool:
    """Joining, or asked to rejoin (a heartbeat answered that the group rebalances)."""
    coordinator = consumer._coordinator
    return not coordinator.stable() or bool(coordinator.need_rejoin())


def _is_leader(consumer: KafkaConsumer) -> bool:
    return bool(getattr(consumer._coordinator, "_is_leader", False))
