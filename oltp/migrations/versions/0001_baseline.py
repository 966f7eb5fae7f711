"""Baseline: the schema of the release before migrations, as its idempotent DDL created it.

Every statement is CREATE ... IF NOT EXISTS, so this revision both creates an empty database and
adopts one made by that release (no alembic_version table yet) without touching its rows.
Frozen: a copy of oltp/schema.py's DDL strings at that release, never to be edited.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

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

TOKENS = """
-- Who may call the API. The secret is never stored: only the SHA-256 of its 256 random bits.
CREATE TABLE IF NOT EXISTS api_tokens (
    id            text        PRIMARY KEY CHECK (id ~ '^tok_[0-9a-f]{10}$'),
    name          text        NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    role          text        NOT NULL CHECK (role IN ('admin', 'analyst', 'customer')),
    domains       text[]      NOT NULL DEFAULT '{}',  -- normalised; customers only (at least one)
    secret_sha256 bytea       NOT NULL CHECK (length(secret_sha256) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    CHECK ((role = 'customer') = (cardinality(domains) > 0))
);
"""

SITES = """
-- Who may send events: one row per site (domain). site_key is public (it goes into the page tag);
-- secret stays on the customer's server and signs pixel URLs (HMAC), so it is stored retrievably.
CREATE TABLE IF NOT EXISTS sites (
    domain      text        PRIMARY KEY,
    tz          text        NOT NULL DEFAULT 'UTC',
    origins     text[]      NOT NULL DEFAULT '{}',
    site_key    text        NOT NULL UNIQUE CHECK (site_key ~ '^pk_[A-Za-z0-9_-]{22,}$'),
    secret      text        NOT NULL CHECK (secret ~ '^sk_[A-Za-z0-9_-]{43,}$'),
    rate_per_s  double precision CHECK (rate_per_s IS NULL OR rate_per_s > 0),
    burst       integer     CHECK (burst IS NULL OR burst >= 1),
    respect_dnt boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
"""

AUDIT = """
-- One row per analyst query, refused and failed ones included. token_id is not a foreign key:
-- the record outlives the token.
CREATE TABLE IF NOT EXISTS analyst_queries (
    id          bigserial   PRIMARY KEY,
    token_id    text,
    started_at  timestamptz NOT NULL,
    sql         text        NOT NULL,
    format      text        NOT NULL,
    status      text        NOT NULL
                CHECK (status IN ('ok', 'refused', 'failed', 'timeout', 'too_large', 'busy', 'cancelled')),
    rows        bigint      NOT NULL DEFAULT 0 CHECK (rows >= 0),
    bytes       bigint      NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    duration_ms integer     NOT NULL DEFAULT 0 CHECK (duration_ms >= 0),
    error       text
);
CREATE INDEX IF NOT EXISTS analyst_queries_started_at ON analyst_queries (started_at);
"""

INGESTION = """
CREATE TABLE IF NOT EXISTS collector_refusals (
    domain       text        NOT NULL,
    reason       text        NOT NULL,
    bucket_start timestamptz NOT NULL,
    events       bigint      NOT NULL,
    PRIMARY KEY (domain, reason, bucket_start)
);
CREATE TABLE IF NOT EXISTS ingestion_15m (
    domain           text        NOT NULL,
    bucket_start     timestamptz NOT NULL,
    accepted         bigint      NOT NULL DEFAULT 0,
    bots             bigint      NOT NULL DEFAULT 0,
    late             bigint      NOT NULL DEFAULT 0,  -- arrived after their event-time quarter hour + 5 min
    last_received_at timestamptz,
    PRIMARY KEY (domain, bucket_start)
);
"""



def upgrade() -> None:
    for ddl in (CORE, TOKENS, SITES, AUDIT, INGESTION):
        op.execute(ddl)


def downgrade() -> None:
    raise NotImplementedError("downgrading below the baseline would drop every table; do it by hand")
