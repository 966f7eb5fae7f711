"""An upper bound of each per-value sketch's distinct visitors, to rank a visitors breakdown (issue 17 §3 latency,
docs/adr/0062-visitor-bounds.md).

- visitors_dim_1d.n, visitors_dim_1w.n (bigint, NULL allowed; a sum of per-batch counts can pass 2^31 for a busy
  value over a week): an exact upper bound of the distinct visitor keys the row's sketch holds (oltp/visitors.py:
  the writers know it without reading anything). NULL for the rows written before this revision: a reader
  treats that value's bound as unknown (falls back to its events).
- visitors_dim_1d_key, the index every reader of visitors_dim_1d uses, is rebuilt with INCLUDE (n), so ranking a
  domain's values by their bounds can be an index-only scan (no heap page per row). The rollup sink maintains the
  same index as before (8 more bytes an entry). Dropping the old index takes an ACCESS EXCLUSIVE lock on the table
  and its partitions, held (one transaction) while the new one is built: reads and writes of visitors_dim_1d wait
  for the build (seconds to minutes with the table's size; run `tally migrate` in a quiet hour).

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_INDEX = "CREATE INDEX IF NOT EXISTS visitors_dim_1d_key ON visitors_dim_1d (domain, tz, dimension, bucket_start, key)"


def upgrade() -> None:
    for table in ("visitors_dim_1d", "visitors_dim_1w"):
        op.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS n bigint")
    op.execute("DROP INDEX IF EXISTS visitors_dim_1d_key")  # its partitions' indexes go with it
    op.execute(_INDEX + " INCLUDE (n)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS visitors_dim_1d_key")
    op.execute(_INDEX)
    for table in ("visitors_dim_1w", "visitors_dim_1d"):
        op.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS n")
