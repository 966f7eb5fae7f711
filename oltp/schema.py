"""PostgreSQL schema for customer rollups, consumer offsets and the dedup window (idempotent)."""

from __future__ import annotations

import psycopg

CORE = """
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer_group text    NOT NULL,
    topic          text    NOT NULL,
    partition      integer NOT NULL,
    topic_id       text    NOT NULL DEFAULT '',  -- Kafka topic id of the incarnation these offsets belong to
    next_offset    bigint  NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Dedup window: every event hash counted so far, with its event time for pruning.
CREATE TABLE IF NOT EXISTS seen_events (
    hash uuid        PRIMARY KEY,
    ts   timestamptz NOT NULL
);

-- 15-minute tier: quarter-hour buckets are aligned for every UTC offset (+05:45, +12:45 too).
CREATE TABLE IF NOT EXISTS rollup_15m (
    domain       text        NOT NULL,
    event_type   text        NOT NULL,
    bucket_start timestamptz NOT NULL,
    events       bigint      NOT NULL,
    valued       bigint      NOT NULL DEFAULT 0,   -- events that carried a value (avg = value_sum / valued)
    value_sum    numeric(24, 6),
    value_min    numeric(24, 6),
    value_max    numeric(24, 6),
    PRIMARY KEY (domain, event_type, bucket_start)
);

-- Records that could not be decoded: kept for inspection, capped (see oltp.rollup_sink).
CREATE TABLE IF NOT EXISTS rejected_records (
    id             bigserial PRIMARY KEY,
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    "offset"       bigint      NOT NULL,
    error          text        NOT NULL,
    payload        text        NOT NULL,
    rejected_at    timestamptz NOT NULL DEFAULT now()
);
"""

# API tokens (owned by oltp/tokens.py).
TOKENS = ""

# The sites registry (owned by oltp/sites.py).
SITES = ""

# The analyst-SQL audit log (owned by oltp/audit.py).
AUDIT = ""

SCHEMA = "\n".join(part for part in (CORE, TOKENS, SITES, AUDIT) if part)


def ensure_schema(dsn: str) -> None:
    """Create every table if missing. Safe to run concurrently from several processes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(7201)")  # serialise concurrent first starts
        try:
            conn.execute(SCHEMA)
        finally:
            conn.execute("SELECT pg_advisory_unlock(7201)")
