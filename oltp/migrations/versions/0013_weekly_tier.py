"""Pre-merged weeks of the daily tier for the breakdowns (issue 17 §3 latency, docs/adr/0061-query-latency.md).

- rollup_dim_1w (domain, tz, event_type, bucket_start, dimension, key, events, valued, value_sum): rollup_dim_1d's
  rows summed over a closed local week (Monday to Monday in `tz`), `bucket_start` the week's first day start;
- visitors_dim_1w (domain, tz, dimension, bucket_start, key, sketch): visitors_dim_1d's sketches of the week merged,
  one row per key;
- compacted_weeks (domain, tz, bucket_start, bucket_end, counts_sig, visitors_sig, compacted_at): which weeks were
  compacted and the signature (row versions) of rollup_1d and visitors_1d for the week when they were: a reader
  uses a week only while the signature still holds, so a late event after the compaction is never missed.

Written only by the background compaction (oltp/weekly.py), never by the rollup sink's batch statement. Partitioned
by the UTC year of `bucket_start` like the daily tier and dropped with it (oltp/partitions.py WEEK_TABLES).
Frozen once shipped.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

from oltp.partitions import create_statement, partitions_around

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

TABLES = {
    "rollup_dim_1w": """
        CREATE TABLE IF NOT EXISTS rollup_dim_1w (
            domain       text          NOT NULL,
            tz           text          NOT NULL,
            event_type   text          NOT NULL,
            bucket_start timestamptz   NOT NULL,
            dimension    text          NOT NULL,
            key          text          NOT NULL,
            events       bigint        NOT NULL,
            valued       bigint        NOT NULL DEFAULT 0,
            value_sum    numeric(24,6),
            PRIMARY KEY (domain, tz, dimension, bucket_start, event_type, key)
        ) PARTITION BY RANGE (bucket_start)""",
    "visitors_dim_1w": """
        CREATE TABLE IF NOT EXISTS visitors_dim_1w (
            domain       text        NOT NULL,
            tz           text        NOT NULL,
            dimension    text        NOT NULL,
            bucket_start timestamptz NOT NULL,
            key          text        NOT NULL,
            sketch       bytea       NOT NULL,
            PRIMARY KEY (domain, tz, dimension, bucket_start, key)
        ) PARTITION BY RANGE (bucket_start)""",
    "compacted_weeks": """
        CREATE TABLE IF NOT EXISTS compacted_weeks (
            domain       text        NOT NULL,
            tz           text        NOT NULL,
            bucket_start timestamptz NOT NULL,
            bucket_end   timestamptz NOT NULL,
            counts_sig   text        NOT NULL,
            visitors_sig text        NOT NULL,
            compacted_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (domain, tz, bucket_start)
        ) PARTITION BY RANGE (bucket_start)""",
}


def upgrade() -> None:
    now = datetime.now(UTC)
    for table, ddl in TABLES.items():
        op.execute(ddl)
        for p in partitions_around(table, now):
            op.execute(create_statement(p))


def downgrade() -> None:
    for table in reversed(TABLES):
        op.execute(f"DROP TABLE IF EXISTS {table}")  # its partitions go with it
