"""Tables that were created on first use until now: reconcile_runs (ADR 20) and consumer_rewinds (ADR 23).

IF NOT EXISTS: adopts a database where oltp/reconcile.py's or oltp/rewinds.py's `ensure_table`
already made them, with their rows. Frozen once shipped (copies of those modules' DDL).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

RECONCILE = """
CREATE TABLE IF NOT EXISTS reconcile_runs (
    id          bigserial   PRIMARY KEY,
    ran_at      timestamptz NOT NULL DEFAULT now(),
    source      text        NOT NULL CHECK (source IN ('schedule', 'cli')),
    range_from  timestamptz NOT NULL,
    range_to    timestamptz NOT NULL,
    domain      text,
    buckets     integer     NOT NULL DEFAULT 0 CHECK (buckets >= 0),
    mismatches  integer     NOT NULL DEFAULT 0 CHECK (mismatches >= 0),
    status      text        NOT NULL CHECK (status IN ('ok', 'differences', 'failed')),
    error       text
);
CREATE INDEX IF NOT EXISTS reconcile_runs_ran_at ON reconcile_runs (source, ran_at);
"""

REWINDS = """
CREATE TABLE IF NOT EXISTS consumer_rewinds (
    id             bigserial   PRIMARY KEY,
    request_id     uuid        NOT NULL,
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    topic_id       text        NOT NULL DEFAULT '',  -- incarnation the offsets belong to ('' = any)
    partition      integer     NOT NULL CHECK (partition >= 0),
    next_offset    bigint      NOT NULL CHECK (next_offset >= 0),
    requested_at   timestamptz NOT NULL DEFAULT now(),
    reread_until   bigint,       -- the group's position when applied: below it, records were processed
    done_at        timestamptz,  -- set once, with the outcome: applied | refused: ... | stale: ... | cancelled
    outcome        text
);
CREATE INDEX IF NOT EXISTS consumer_rewinds_pending ON consumer_rewinds (consumer_group, topic)
    WHERE done_at IS NULL;
"""


def upgrade() -> None:
    conn = op.get_bind()
    conn.exec_driver_sql(RECONCILE)
    conn.exec_driver_sql(REWINDS)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS consumer_rewinds")
    op.execute("DROP TABLE IF EXISTS reconcile_runs")
