"""Each site's URL rule (core/urls.py, docs/adr/0030-url-privacy.md): which query parameters its event
URLs keep besides the default campaign tags (`keep_query`), or whether they are stored as sent
(`raw_urls`, the opt-out). Existing sites get the default rule: query strings and fragments are cut.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE sites ADD COLUMN IF NOT EXISTS keep_query text[] NOT NULL DEFAULT '{}'")
    op.execute("ALTER TABLE sites ADD COLUMN IF NOT EXISTS raw_urls boolean NOT NULL DEFAULT false")


def downgrade() -> None:
    op.execute("ALTER TABLE sites DROP COLUMN IF EXISTS raw_urls")
    op.execute("ALTER TABLE sites DROP COLUMN IF EXISTS keep_query")
