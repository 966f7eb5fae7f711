"""Dashboard sessions kept server-side (api/session.py), so logout ends a session everywhere.

A row per logged-in browser: the SHA-256 of the random session id the cookie carries (never the id
itself), the token it speaks for and when it expires. Deleting the row (logout), revoking or deleting
the token, or passing `expires_at` ends the session; oltp/prune.py deletes expired rows.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SESSIONS = """
CREATE TABLE IF NOT EXISTS dashboard_sessions (
    id_sha256   bytea       PRIMARY KEY CHECK (length(id_sha256) = 32),
    token_id    text        NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS dashboard_sessions_expires_at ON dashboard_sessions (expires_at);
CREATE INDEX IF NOT EXISTS dashboard_sessions_token_id ON dashboard_sessions (token_id);
"""


def upgrade() -> None:
    op.get_bind().exec_driver_sql(SESSIONS)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS dashboard_sessions")
