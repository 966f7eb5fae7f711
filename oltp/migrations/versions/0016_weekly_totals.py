"""Closed weeks' domain visitors pre-merged, and the weekly bounds read index-only (issue 17 §3 latency,
docs/adr/0061-query-latency.md, second addendum).

- visitors_1w (domain, tz, bucket_start, sketch): per (domain, zone, compacted week) the union of the week's
  visitors_1d sketches, written by the weekly compaction (oltp/weekly.py) in the transaction that records the
  week's signature, and read (like visitors_dim_1w) only while that signature holds: a 90-day breakdown's total
  merges ~13 weekly sketches and the days around them instead of ~90 daily ones. Partitioned by the UTC year of
  `bucket_start` like the other weekly tables and dropped with them (oltp/partitions.py WEEK_TABLES).
- visitors_dim_1w_bound ON visitors_dim_1w (domain, tz, dimension, bucket_start, key) INCLUDE (n): ranking a
  breakdown's values by their bounds reads the weeks' n from the index (where the visibility map allows: the
  hourly maintenance vacuums the table, oltp/visibility.py) instead of one wide heap row (the sketch) per value and
  week. A new index on a table only the background compaction writes: no lock on the daily tier.
- Every compacted_weeks row is deleted: a week compacted before this revision has no visitors_1w row, and a reader
  must never take "no row" for "no visitor". Until the rollup worker's next hourly pass compacts them again, the
  breakdowns read the days (slower, same answers).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

from oltp.partitions import create_statement, partitions_around

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_TABLE = """
CREATE TABLE IF NOT EXISTS visitors_1w (
    domain       text        NOT NULL,
    tz           text        NOT NULL,
    bucket_start timestamptz NOT NULL,
    sketch       bytea       NOT NULL,
    PRIMARY KEY (domain, tz, bucket_start)
) PARTITION BY RANGE (bucket_start)"""
_INDEX = ("CREATE INDEX IF NOT EXISTS visitors_dim_1w_bound ON visitors_dim_1w"
          " (domain, tz, dimension, bucket_start, key) INCLUDE (n)")


def upgrade() -> None:
    op.execute(_TABLE)
    for p in partitions_around("visitors_1w", datetime.now(UTC)):
        op.execute(create_statement(p))
    op.execute(_INDEX)
    op.execute("DELETE FROM compacted_weeks")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS visitors_dim_1w_bound")
    op.execute("DROP TABLE IF EXISTS visitors_1w")  # its partitions go with it
