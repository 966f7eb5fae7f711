"""Unique visitors (issue 17 item 2, docs/adr/0047-visitor-sketches.md): HyperLogLog sketches of the daily
visitor key, written by the rollup sink in its batch transaction (oltp/visitors.py).

- visitors_1h (domain, bucket_start = UTC hour, sketch), partitioned by UTC month like rollup_1h;
- visitors_1d (domain, tz, bucket_start = local day start in tz, sketch), by UTC year like rollup_1d;
- visitors_dim_1d (domain, tz, dimension, bucket_start, key, sketch), by UTC year like rollup_1d.

`sketch` is an Apache DataSketches HLL sketch serialized compact; a key (the columns before it) may have
several rows, its sketch being their union (written append-only, merged every few batches: ADR 47).
Retention drops the partitions with their tier (oltp/partitions.py keep_days_from). Partitions for now and
the next periods are created here; writers create the others (oltp.partitions.ensure_partitions). Frozen
once shipped.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

from oltp.partitions import create_statement, partitions_around

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLES = {
    "visitors_1h": """
        CREATE TABLE IF NOT EXISTS visitors_1h (
            domain       text        NOT NULL,
            bucket_start timestamptz NOT NULL,
            sketch       bytea       NOT NULL
        ) PARTITION BY RANGE (bucket_start)""",
    "visitors_1d": """
        CREATE TABLE IF NOT EXISTS visitors_1d (
            domain       text        NOT NULL,
            tz           text        NOT NULL,
            bucket_start timestamptz NOT NULL,
            sketch       bytea       NOT NULL
        ) PARTITION BY RANGE (bucket_start)""",
    "visitors_dim_1d": """
        CREATE TABLE IF NOT EXISTS visitors_dim_1d (
            domain       text        NOT NULL,
            tz           text        NOT NULL,
            dimension    text        NOT NULL,
            bucket_start timestamptz NOT NULL,
            key          text        NOT NULL,
            sketch       bytea       NOT NULL
        ) PARTITION BY RANGE (bucket_start)""",
}


# A key's sketch is the union of its rows (partial sketches appended by each batch, merged every few batches):
# no primary key, an index on the key.
INDEXES = {
    "visitors_1h": "domain, bucket_start",
    "visitors_1d": "domain, tz, bucket_start",
    "visitors_dim_1d": "domain, tz, dimension, bucket_start, key",
}


def upgrade() -> None:
    now = datetime.now(UTC)
    for table, ddl in TABLES.items():
        op.execute(ddl)
        op.execute(f"CREATE INDEX IF NOT EXISTS {table}_key ON {table} ({INDEXES[table]})")
        for p in partitions_around(table, now):
            op.execute(create_statement(p))


def downgrade() -> None:
    for table in reversed(TABLES):
        op.execute(f"DROP TABLE IF EXISTS {table}")  # its partitions go with it
