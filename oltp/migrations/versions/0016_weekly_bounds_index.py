"""The weekly bounds of a visitors breakdown read index-only (issue 17 §3 latency, docs/adr/0061-query-latency.md,
third addendum).

visitors_dim_1w_bound ON visitors_dim_1w (domain, tz, dimension, bucket_start, key) INCLUDE (n): ranking a
breakdown's values by their bounds (oltp/visitors.py `visitor_bounds`) reads the weeks' n from the index, where the
visibility map allows (the hourly maintenance vacuums the table, oltp/visibility.py), instead of one wide heap row
(the sketch) per value and week. A second index beside the primary key, on a table only the background compaction
writes: the rollup sink's statement is unchanged, and building it locks only visitors_dim_1w (the compaction waits).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX IF NOT EXISTS visitors_dim_1w_bound ON visitors_dim_1w"
               " (domain, tz, dimension, bucket_start, key) INCLUDE (n)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS visitors_dim_1w_bound")  # its partitions' indexes go with it
