"""Alembic revisions, applied in order of their `down_revision` chain. Never edit a shipped revision."""
