"""`tally topic show|grow N`: the raw-events topic's partitions, and growing them (workers/topic_admin.py, ADR 60).

The broker: TALLY_KAFKA_BOOTSTRAP, else the running `tally up`'s. The topic: TALLY_KAFKA_TOPIC.
Exit codes (ADR 40): 0 done; 1 the topic does not exist, the broker cannot grow it (tansu 0.6.0: see the
README's "Growing the topic") or is unreachable; 2 a bad N (not more than the topic has, or too many).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from core.config import Settings

if TYPE_CHECKING:
    from tally.cli_support import SubParsers


def register(sub: SubParsers) -> None:
    """Add the `topic` group; each subcommand sets `func=handler(settings, args) -> exit code`."""
    topic = sub.add_parser("topic", help="the raw-events topic's partitions: show them, grow them")
    cmds = topic.add_subparsers(dest="topic_command", required=True, metavar="SUBCOMMAND")
    show = cmds.add_parser("show", help="the topic's partitions, its id and each partition's end offset")
    show.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                      help="also print the partition this domain's events go to (repeat for several)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=cmd_show)
    grow = cmds.add_parser("grow", help="raise the topic's partition count to N (Kafka's CreatePartitions); running "
                                        "shippers and workers pick the new partitions up without a restart")
    grow.add_argument("partitions", type=int, metavar="N", help="the new partition count (more than it has)")
    grow.add_argument("--json", action="store_true", help="print one JSON object")
    grow.set_defaults(func=cmd_grow)


def _fail(message: str, code: int = 1) -> int:
    print(f"tally topic: {message}", file=sys.stderr)
    return code


def _admin(settings: Settings, action: Callable[[tuple[str, ...]], int]) -> int:
    """Run `action(bootstrap)`; a refusal or an unreachable broker is a message and its exit code."""
    from kafka.errors import KafkaError

    from tally.roots import admin_bootstrap
    from workers.topic_admin import TopicAdminError

    bootstrap = admin_bootstrap(settings)
    try:
        return action(bootstrap)
    except TopicAdminError as exc:
        return _fail(exc.message, 2 if exc.code in ("not_more", "too_many") else 1)
    except KafkaError as exc:
        return _fail(f"cannot reach the broker at {','.join(bootstrap)} ({type(exc).__name__}); is `tally up` "
                     "running, or TALLY_KAFKA_BOOTSTRAP right?")


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    from core.records import partition_for
    from workers.topic_admin import describe

    def action(bootstrap: tuple[str, ...]) -> int:
        state = describe(bootstrap, settings.topic)
        domains = {d: partition_for(d.encode(), state.partitions) for d in args.domain}
        if args.json:
            print(json.dumps({"topic": state.topic, "topic_id": state.topic_id, "partitions": state.partitions,
                              "end_offsets": {str(p): o for p, o in state.end_offsets.items()},
                              "domains": domains}))
            return 0
        print(f"topic {state.topic} (id {state.topic_id or 'unknown'}): {state.partitions} partition(s)")
        for partition, offset in state.end_offsets.items():
            print(f"  partition {partition}\tend offset {offset}")
        for domain, partition in domains.items():
            print(f"  {domain} -> partition {partition}")
        return 0

    return _admin(settings, action)


def cmd_grow(settings: Settings, args: argparse.Namespace) -> int:
    from workers.kafka_io import METADATA_MAX_AGE_MS
    from workers.topic_admin import grow

    if args.partitions < 1:
        return _fail(f"N must be a positive number of partitions, not {args.partitions}", 2)

    def action(bootstrap: tuple[str, ...]) -> int:
        before, after = grow(bootstrap, settings.topic, args.partitions)
        if args.json:
            print(json.dumps({"topic": settings.topic, "before": before, "after": after}))
            return 0
        print(f"topic {settings.topic}: {before} -> {after} partitions. Running shippers and workers pick them up "
              f"within ~{METADATA_MAX_AGE_MS / 1000:g} s (their metadata refresh); the workers' consumer groups "
              "rebalance once. Some domains now go to another partition (`tally topic show --domain D`); both "
              "stores count each event once whatever partition it comes from (README: Growing the topic).")
        return 0

    return _admin(settings, action)
