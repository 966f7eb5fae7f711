"""The daily tier's coverage (ADR 19), and rollup_1h filled from the rollup_15m rows written before it.

rollup_1d_coverage: per domain, the zone its rollup_1d rows are written in and the first day from
which they hold every event; queries read rollup_1d only from there (oltp/queries.py), the sink and
oltp/tiers.py keep it. rollup_1h gets the sums of every existing rollup_15m row per UTC hour, with
rollup_15m locked against writers meanwhile (a writer of the release before the tiers). Every domain
that already has rows gets a coverage row in its registered zone, complete only from an hour after
this revision (its older days are not in rollup_1d; `oltp.tiers.rederive`, i.e. `tally rebuild`,
moves that back); a domain without a coverage row has had no event counted since. Frozen once shipped.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

from oltp.partitions import create_statement, partitions_covering

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COVERAGE = """
CREATE TABLE IF NOT EXISTS rollup_1d_coverage (
    domain        text        PRIMARY KEY,
    tz            text        NOT NULL,
    complete_from timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
)
"""

BACKFILL_1H = """
INSERT INTO rollup_1h (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
SELECT domain, event_type, date_bin('1 hour', bucket_start, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
       sum(events), sum(valued), sum(value_sum), min(value_min), max(value_max)
FROM rollup_15m GROUP BY 1, 2, 3
"""


SEED_COVERAGE = """
INSERT INTO rollup_1d_coverage (domain, tz, complete_from)
SELECT d.domain, coalesce(s.tz, 'UTC'), now() + interval '1 hour'
FROM (SELECT DISTINCT domain FROM rollup_15m) d LEFT JOIN sites s ON s.domain = d.domain
ON CONFLICT (domain) DO NOTHING
"""


def upgrade() -> None:
    conn = op.get_bind()
    conn.exec_driver_sql(COVERAGE)
    conn.exec_driver_sql("LOCK TABLE rollup_15m IN SHARE MODE")
    conn.exec_driver_sql(SEED_COVERAGE)
    if conn.execute(text("SELECT EXISTS (SELECT 1 FROM rollup_1h)")).scalar():
        return  # written by this release's sink already: rollup_15m and rollup_1h agree
    lo, hi = conn.execute(text("SELECT min(bucket_start), max(bucket_start) FROM rollup_15m")).one()
    if lo is None:
        return
    partitioned = conn.execute(
        text("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass('rollup_1h')")).first()
    if partitioned:
        for p in partitions_covering("rollup_1h", lo, hi):
            conn.exec_driver_sql(create_statement(p))
    conn.exec_driver_sql(BACKFILL_1H)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS rollup_1d_coverage")
