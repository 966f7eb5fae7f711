"""`tally replay`: make the running consumer groups re-read the topic from a time or from given offsets.

The groups' offsets live in their stores and their positions in the running workers, so this command
does not move anything itself: it resolves the offsets (Kafka's `offsets_for_times` for `--since`),
writes a rewind request per group and partition to PostgreSQL (oltp/rewinds.py) and waits until the
workers holding those partitions applied it (workers/rewind.py, ADR 23). The stores count each event
once, so a replay changes nothing that is already there and restores what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from core.config import LOADER_GROUP, ROLLUP_GROUP, Settings
from tally.cli_support import add_wait_argument, wait_seconds

if TYPE_CHECKING:
    from oltp.rewinds import RowStatus
    from tally.cli_support import SubParsers

GROUPS = {"rollup": (ROLLUP_GROUP,), "loader": (LOADER_GROUP,), "both": (ROLLUP_GROUP, LOADER_GROUP)}


class ReplayError(ValueError):
    """The replay cannot be requested as asked; the message names the option and the problem."""


def register(sub: SubParsers) -> None:
    from tally.timespec import time_help

    p = sub.add_parser("replay", help="make both consumer groups re-read the topic from a time or offsets",
                       description="Ask the running workers to re-read the topic into their stores. The stores "
                       "count each event once: what is there stays as it is, what is missing comes back.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--since", metavar="TIME", help=time_help("from when (by the time records reached Kafka)"))
    where.add_argument("--offsets", help="partition:offset[,partition:offset...], e.g. 0:1200,1:0")
    p.add_argument("--group", choices=sorted(GROUPS), default="both", help="which consumer group (default both)")
    add_wait_argument(p, "for the workers to apply it, then cancel what is left")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=cmd_replay)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: `<n>s|m|h|d` ago or an ISO-8601 time with offset (tally/timespec.py), not in the future.
    Raises ReplayError naming the problem."""
    from tally.timespec import TimeSyntaxError, parse_time

    now = now or datetime.now(UTC)
    try:
        when = parse_time(text, "--since", now)
    except TimeSyntaxError as exc:
        raise ReplayError(str(exc)) from None
    if when > now:
        raise ReplayError(f"--since {text!r} is in the future")
    return when


def parse_offsets(text: str) -> dict[int, int]:
    """`--offsets 0:120,1:0`: partition -> offset. Raises ReplayError naming the bad part."""
    offsets: dict[int, int] = {}
    for part in text.split(","):
        part = part.strip()
        p, sep, o = part.partition(":")
        if not sep or not p.isascii() or not p.isdigit() or not o.isascii() or not o.isdigit():
            raise ReplayError(f"--offsets: {part!r} is not partition:offset (two non-negative integers)")
        if int(p) in offsets:
            raise ReplayError(f"--offsets: partition {int(p)} appears more than once")
        offsets[int(p)] = int(o)
    return offsets


def resolve_offsets(bootstrap: Sequence[str], topic: str, *, since: datetime | None = None,
                    offsets: dict[int, int] | None = None) -> tuple[str, dict[int, int]]:
    """(topic id, partition -> first offset to re-read), from `since` or checked `offsets`.

    For `since`, each partition's first record at or after it (Kafka's ListOffsets by timestamp); a
    partition without one is left where it is (its end offset: nothing to re-read). Raises ReplayError
    for a topic that does not exist or a partition it does not have.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=list(bootstrap), group_id=None, enable_auto_commit=False,
                             request_timeout_ms=15_000)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ReplayError(f"topic {topic!r} does not exist on {','.join(bootstrap)}")
        topic_id = consumer._client.cluster.topic_id(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if offsets is not None:
            unknown = sorted(set(offsets) - set(partitions))
            if unknown:
                raise ReplayError(f"--offsets: topic {topic!r} has partitions {sorted(partitions)}, not {unknown}")
            return str(topic_id or ""), dict(offsets)
        assert since is not None
        ends = consumer.end_offsets(tps)
        found = consumer.offsets_for_times({tp: max(0, int(since.timestamp() * 1000)) for tp in tps})
        result = {}
        for tp in tps:
            hit = found.get(tp)
            # Kafka answers "none" with no entry; tansu with offset 0 and timestamp -1.
            result[tp.partition] = ends[tp] if hit is None or hit.timestamp < 0 else hit.offset
        return str(topic_id or ""), result
    finally:
        consumer.close()


def wait_applied(dsn: str, request_id: str, wait_s: float, poll_s: float = 0.5) -> list[RowStatus]:
    """Wait until every row of the request is done or `wait_s` passed; then cancel what is left.

    Returns the rows' final status (oltp.rewinds.RowStatus)."""
    from oltp import rewinds

    deadline = time.monotonic() + wait_s
    rows = rewinds.status(dsn, request_id)
    while any(r.outcome is None for r in rows) and time.monotonic() < deadline:
        time.sleep(poll_s)
        rows = rewinds.status(dsn, request_id)
    if any(r.outcome is None for r in rows):
        rewinds.cancel_pending(dsn, request_id, f"no worker applied it within {wait_s:g}s")
        rows = rewinds.status(dsn, request_id)
    return rows


def _fail(message: str, code: int = 2) -> int:
    print(f"tally replay: {message}", file=sys.stderr)
    return code


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    import psycopg

    from oltp import rewinds
    from tally.roots import admin_bootstrap, require_pg
    from tally.timespec import TimeSyntaxError

    try:
        since = parse_since(args.since) if args.since else None
        offsets = parse_offsets(args.offsets) if args.offsets else None
        wait_s = wait_seconds(args.wait)
    except (ReplayError, TimeSyntaxError) as exc:
        return _fail(str(exc))
    dsn, bootstrap = require_pg(settings), admin_bootstrap(settings)
    groups = list(GROUPS[args.group])
    try:
        topic_id, start = resolve_offsets(bootstrap, settings.topic, since=since, offsets=offsets)
    except ReplayError as exc:
        return _fail(str(exc))
    except Exception as exc:
        return _fail(f"cannot read topic {settings.topic!r} from {','.join(bootstrap)} ({type(exc).__name__}: "
                     f"{exc}); is the broker up?", 1)
    floor = datetime.now(UTC) - timedelta(days=max(1, settings.dedup_window_days - 1))
    notes = []
    if ROLLUP_GROUP in groups:
        notes.append(f"PostgreSQL: re-read events with an event time before {floor:%Y-%m-%dT%H:%MZ} (the dedup "
                     f"window, TALLY_DEDUP_WINDOW_DAYS={settings.dedup_window_days}) are not counted again; rebuild "
                     "older rollups from ClickHouse with `tally rebuild --from ... --to ...`")
    try:
        request_id = rewinds.request(dsn, groups, settings.topic, topic_id, start)
        if not args.json:
            print(f"requested: {', '.join(groups)} re-read {settings.topic} from "
                  + ", ".join(f"{p}:{o}" for p, o in sorted(start.items())), flush=True)
        rows = wait_applied(dsn, request_id, wait_s)
    except psycopg.OperationalError as exc:
        return _fail(f"cannot reach PostgreSQL ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})", 1)
    failed = [r for r in rows if r.outcome != "applied"]
    if args.json:
        print(json.dumps({"request_id": request_id, "topic": settings.topic, "topic_id": topic_id,
                          "offsets": {str(p): o for p, o in sorted(start.items())}, "notes": notes,
                          "rows": [{"group": r.group, "partition": r.partition, "offset": r.next_offset,
                                    "outcome": r.outcome} for r in rows]}))
    else:
        for r in rows:
            print(f"  {r.group}\tpartition {r.partition}\tfrom {r.next_offset}\t{r.outcome}")
        for note in notes:
            print(f"note: {note}")
        if failed:
            print(f"tally replay: {len(failed)} of {len(rows)} rewinds were not applied (is every worker of "
                  f"{', '.join(sorted({r.group for r in failed}))} running?)", file=sys.stderr)
        else:
            print("applied: the workers are re-reading; `tally status` shows their lag")
    return 1 if failed else 0
