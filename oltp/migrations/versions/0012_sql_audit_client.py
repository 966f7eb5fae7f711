"""The analyst-SQL audit log says who asked (issue 18, docs/adr/0050-clickhouse-http-endpoint.md): `client`, the
User-Agent of the request (clickhouse-connect, Grafana, curl, `tally sql`; at most 200 characters), and
`query_id`, the caller's id for the query on the ClickHouse-compatible endpoint. Both null for older rows
and for callers that send none. Frozen once shipped.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE analyst_queries ADD COLUMN IF NOT EXISTS client text")
    op.execute("ALTER TABLE analyst_queries ADD COLUMN IF NOT EXISTS query_id text")


def downgrade() -> None:
    op.execute("ALTER TABLE analyst_queries DROP COLUMN IF EXISTS query_id")
    op.execute("ALTER TABLE analyst_queries DROP COLUMN IF EXISTS client")
