"""The site owner's setup path (issue 17 item 5, docs/adr/0043-site-owner-setup.md):

- `sites.account`: the customer a site belongs to (free text, e.g. "Acme Inc."; NULL: none given), set by
  `tally sites add|update --account`;
- `collector_refusals.value`: the offending value of a refusal counted for a site (the event's domain,
  the page's origin), the most recent one per site, reason and quarter hour, at most 200 characters; NULL
  for reasons without one and for the rows written before.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE sites ADD COLUMN IF NOT EXISTS account text")
    op.execute("ALTER TABLE collector_refusals ADD COLUMN IF NOT EXISTS value text")


def downgrade() -> None:
    op.execute("ALTER TABLE collector_refusals DROP COLUMN IF EXISTS value")
    op.execute("ALTER TABLE sites DROP COLUMN IF EXISTS account")
