"""Coarser rollup tiers: rollup_1h (UTC hours) and rollup_1d (local days per site time zone).

IF NOT EXISTS: adopts a database where the tiers' DDL already ran. Created plain here and made
range-partitioned by revision 0003 together with the older tables. Frozen once shipped.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TIERS = """
-- 1-hour tier: the same columns as rollup_15m, keyed by the UTC hour.
CREATE TABLE IF NOT EXISTS rollup_1h (
    domain       text        NOT NULL,
    event_type   text        NOT NULL,
    bucket_start timestamptz NOT NULL,
    events       bigint      NOT NULL,
    valued       bigint      NOT NULL DEFAULT 0,
    value_sum    numeric(24, 6),
    value_min    numeric(24, 6),
    value_max    numeric(24, 6),
    PRIMARY KEY (domain, event_type, bucket_start)
);

-- 1-day tier: bucket_start is the UTC instant of local midnight in the site's zone `tz`.
CREATE TABLE IF NOT EXISTS rollup_1d (
    domain       text        NOT NULL,
    tz           text        NOT NULL,
    event_type   text        NOT NULL,
    bucket_start timestamptz NOT NULL,
    events       bigint      NOT NULL,
    valued       bigint      NOT NULL DEFAULT 0,
    value_sum    numeric(24, 6),
    value_min    numeric(24, 6),
    value_max    numeric(24, 6),
    PRIMARY KEY (domain, tz, event_type, bucket_start)
);
"""


def upgrade() -> None:
    op.execute(TIERS)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS rollup_1d; DROP TABLE IF EXISTS rollup_1h")
