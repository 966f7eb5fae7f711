"""ClickHouse schema for raw events (idempotent). Works on chDB and on a ClickHouse server."""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

EVENT_COLUMNS = ("hash", "domain", "url", "ts", "received_at", "type", "value", "referrer", "user_agent",
                 "browser", "os", "device", "country", "visitor")


def statements(db: str, ttl_days: int = 400) -> list[str]:
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        # ReplacingMergeTree on the sort key (day, domain, hash): duplicates of one event collapse on
        # merge, and the analyst endpoint reads with `final = 1` so they never show before that.
        f"""CREATE TABLE IF NOT EXISTS {db}.events (
            hash        FixedString(32),
            domain      LowCardinality(String),
            url         String,
            ts          DateTime64(3, 'UTC'),
            received_at DateTime64(3, 'UTC'),
            type        LowCardinality(String),
            value       Nullable(Decimal(18, 6)),
            referrer    Nullable(String),
            user_agent  Nullable(String),
            browser     LowCardinality(Nullable(String)),
            os          LowCardinality(Nullable(String)),
            device      LowCardinality(Nullable(String)),
            country     LowCardinality(Nullable(String)),
            visitor     Nullable(String)
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(ts)
        ORDER BY (toDate(ts), domain, hash)
        TTL toDateTime(ts) + INTERVAL {ttl_days} DAY
        SETTINGS non_replicated_deduplication_window = 1000""",
        f"""CREATE TABLE IF NOT EXISTS {db}.consumer_offsets (
            consumer_group String,
            topic          String,
            partition      UInt32,
            topic_id       String,
            next_offset    UInt64,
            written_at     DateTime64(6, 'UTC')
        ) ENGINE = ReplacingMergeTree(written_at)
        ORDER BY (consumer_group, topic, partition)""",
        f"""CREATE TABLE IF NOT EXISTS {db}.rejected_records (
            consumer_group String,
            topic          String,
            partition      UInt32,
            offset         UInt64,
            error          String,
            payload        String,
            rejected_at    DateTime64(3, 'UTC')
        ) ENGINE = MergeTree
        ORDER BY rejected_at
        TTL toDateTime(rejected_at) + INTERVAL 30 DAY""",
    ]


def ensure_schema(client: Client, db: str) -> None:
    for statement in statements(db):
        client.command(statement)
