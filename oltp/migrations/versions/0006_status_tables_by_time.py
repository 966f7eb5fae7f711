"""Indexes on the arrival bucket of the ingestion status tables, for their retention (oltp/prune.py).

ingestion_15m and collector_refusals grow with domains x quarter hours like rollup_15m, and follow its
retention (TALLY_RETENTION_15M_DAYS); they are small next to it, so rows are deleted by time rather
than kept in time partitions, and these indexes let that delete find them.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX IF NOT EXISTS ingestion_15m_bucket_start ON ingestion_15m (bucket_start)")
    op.execute("CREATE INDEX IF NOT EXISTS collector_refusals_bucket_start ON collector_refusals (bucket_start)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS collector_refusals_bucket_start")
    op.execute("DROP INDEX IF EXISTS ingestion_15m_bucket_start")
