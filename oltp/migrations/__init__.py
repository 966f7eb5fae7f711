"""Alembic migrations of the PostgreSQL schema (ADR 18); run by `oltp.schema.ensure_schema`."""
