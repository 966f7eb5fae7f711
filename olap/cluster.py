"""The ClickHouse schema on a cluster (TALLY_CLICKHOUSE_CLUSTER; docs/clickhouse-cluster.md, ADR 57).

Every migration in olap/schema.py is written for one node. `on_cluster(statements, db, cluster)` turns one
migration's statements into the same migration on a cluster, statement by statement, by these rules; a
statement no rule covers raises ValueError, so a new migration cannot skip the cluster unnoticed (the tests
render every migration both ways and parse each statement with ClickHouse's parser):

- CREATE DATABASE and the analyst catalog's views: ON CLUSTER, so that every node has them.
- CREATE TABLE `<db>.events` becomes `events_local` ON CLUSTER, a ReplicatedReplacingMergeTree whose Keeper path
  is per shard (EVENTS_PATH), followed by `events` ON CLUSTER, a Distributed table over it sharded by
  SHARDING_KEY, the event hash: every copy of one event (retries, replays) lands on one shard, where
  ReplacingMergeTree collapses them and FINAL hides them until it has (FINAL runs per shard).
- CREATE TABLE of any other table (sites, countries, consumer_offsets, rejected_records, schema_migrations):
  ON CLUSTER with the Replicated engine of its family and one Keeper path for the whole cluster
  (EVERYWHERE_PATH): every node holds all of it, so a join of events with sites or countries runs on each shard
  against its local copy, and the loader reads its offsets on whichever node it reaches.
- ALTER TABLE `<db>.events`: on `events_local` ON CLUSTER (one replica per shard runs it, Keeper carries it to
  the others) and, for column changes and comments (what analysts see of `events`), on the Distributed table ON
  CLUSTER too; storage settings and the TTL only on `events_local`.
- ALTER, INSERT and OPTIMIZE of any other table run as written, on the node migrating: the table is replicated
  to every node, so ClickHouse carries them to the others (ON CLUSTER would run them once per shard on the
  one replicated table, racing itself).
"""

from __future__ import annotations

import re

EVENTS_LOCAL = "events_local"
SHARDING_KEY = "cityHash64(hash)"  # never change it: copies of one event written before and after would split
# Keeper paths: `{shard}` and `{replica}` are each server's <macros>; the replica name must be unique in the
# cluster (EVERYWHERE_PATH tables have every node as a replica), e.g. the host name.
EVENTS_PATH = "/clickhouse/tables/{{shard}}/{db}/{table}"
EVERYWHERE_PATH = "/clickhouse/tables/all/{db}/{table}"
REPLICA = "{replica}"
# Insert deduplication of events_local: the last 1,000 inserts per shard, as non_replicated_deduplication_window
# keeps on one node, for up to a day (ClickHouse's default would forget a token after an hour).
EVENTS_DEDUP = "replicated_deduplication_window = 1000, replicated_deduplication_window_seconds = 86400"
# What the loader adds to its insert into the Distributed `events` (olap/loader_sink.py): the INSERT returns once
# every shard has written its part, so the offsets it stores next never run ahead of the events.
LOADER_INSERT_SETTINGS = {"distributed_foreground_insert": 1}

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_ENGINE = re.compile(r"ENGINE = (ReplacingMergeTree|MergeTree)(?:\(([^()]*)\))?")
# ALTER commands that change what a reader of `events` sees (also applied to the Distributed table) and those
# that only concern storage (events_local only).
_READER_ALTERS = re.compile(r"(ADD COLUMN|COMMENT COLUMN|MODIFY COMMENT)\b")
_STORAGE_ALTERS = re.compile(r"(MODIFY SETTING|MODIFY TTL|REMOVE TTL)\b")


def check_cluster(cluster: str) -> str:
    """`cluster` if it is an identifier (TALLY_CLICKHOUSE_CLUSTER's own check, again at this boundary)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", cluster):
        raise ValueError(f"{cluster!r} is not a cluster name")
    return cluster


def _replicated(statement: str, path: str) -> str:
    """The statement with its MergeTree-family engine made the Replicated one at `path` (exactly one engine)."""
    engines = _ENGINE.findall(statement)
    if len(engines) != 1:
        raise ValueError(f"expected one MergeTree-family ENGINE in: {statement[:120]}")
    family, args = engines[0]
    params = ", ".join(part for part in (f"'{path}'", f"'{REPLICA}'", args.strip()) if part)
    return _ENGINE.sub(lambda _: f"ENGINE = Replicated{family}({params})", statement, count=1)


def _create_events(statement: str, db: str, cluster: str) -> list[str]:
    head = f"CREATE TABLE IF NOT EXISTS {db}.events "
    setting = "SETTINGS non_replicated_deduplication_window = 1000"
    if not statement.startswith(head) or statement.count(setting) != 1:
        raise ValueError(f"unexpected events table definition: {statement[:120]}")
    local = statement.replace(head, f"CREATE TABLE IF NOT EXISTS {db}.{EVENTS_LOCAL} ON CLUSTER {cluster} ", 1)
    local = _replicated(local.replace(setting, f"SETTINGS {EVENTS_DEDUP}"),
                        EVENTS_PATH.format(db=db, table=EVENTS_LOCAL))
    return [local, distributed_events(db, cluster)]


def distributed_events(db: str, cluster: str) -> str:
    """The Distributed `events` every node gets: reads fan out to one replica of each shard; inserts are split by
    SHARDING_KEY."""
    return (f"CREATE TABLE IF NOT EXISTS {db}.events ON CLUSTER {cluster} AS {db}.{EVENTS_LOCAL} "
            f"ENGINE = Distributed({cluster}, {db}, {EVENTS_LOCAL}, {SHARDING_KEY})")


def _alter_events(statement: str, db: str, cluster: str) -> list[str]:
    head = f"ALTER TABLE {db}.events "
    commands = statement[len(head):]
    local = f"ALTER TABLE {db}.{EVENTS_LOCAL} ON CLUSTER {cluster} {commands}"
    if _STORAGE_ALTERS.match(commands):
        return [local]
    if _READER_ALTERS.match(commands) and not _STORAGE_ALTERS.search(commands):
        return [local, f"ALTER TABLE {db}.events ON CLUSTER {cluster} {commands}"]
    raise ValueError(f"no cluster rule for: {statement[:120]}")


def _one(statement: str, db: str, cluster: str) -> list[str]:
    text = statement.strip()
    create = re.match(rf"CREATE TABLE IF NOT EXISTS {db}\.({_IDENT}) ", text)
    if create and create.group(1) == "events":
        return _create_events(text, db, cluster)
    if create:
        table = create.group(1)
        on = text.replace(create.group(0), f"CREATE TABLE IF NOT EXISTS {db}.{table} ON CLUSTER {cluster} ", 1)
        return [_replicated(on, EVERYWHERE_PATH.format(db=db, table=table))]
    if text.startswith(f"ALTER TABLE {db}.events "):
        return _alter_events(text, db, cluster)
    database = re.fullmatch(rf"CREATE DATABASE IF NOT EXISTS ({_IDENT})", text)
    if database:
        return [f"{text} ON CLUSTER {cluster}"]
    view = re.match(rf"CREATE OR REPLACE VIEW ({_IDENT}\.{_IDENT}) ", text)
    if view:
        return [text.replace(view.group(0), f"CREATE OR REPLACE VIEW {view.group(1)} ON CLUSTER {cluster} ", 1)]
    if re.match(rf"(ALTER TABLE|INSERT INTO|OPTIMIZE TABLE) {db}\.({_IDENT})\b", text):
        return [text]  # a table replicated to every node: ClickHouse carries it to the other replicas
    raise ValueError(f"no cluster rule for: {text[:120]}")


def on_cluster(statements: list[str], db: str, cluster: str) -> list[str]:
    """One migration's statements (written for one node) as they run on `cluster`. Raises ValueError for a
    statement no rule covers."""
    check_cluster(cluster)
    return [out for statement in statements for out in _one(statement, db, cluster)]
