"""Range-partition rollup_15m, rollup_1h, rollup_1d and seen_events by time, keeping every row.

Periods (ADR 18): rollup_15m and seen_events by UTC day, rollup_1h by UTC month, rollup_1d by
UTC year; partitions are named by oltp.partitions (a stable contract: retention relies on it).
The partition key must be in the primary key: seen_events goes from PRIMARY KEY (hash) to
PRIMARY KEY (hash, ts), the same uniqueness since the hash covers the event time (ADR 14).
Each table: rename it aside, create the partitioned table LIKE it (defaults, CHECKs), create the
partitions its rows need plus a few around now, copy, drop the old one, re-create other indexes.
One transaction per revision: a failure leaves the database at revision 0002, untouched.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op
from sqlalchemy import text

from oltp.partitions import TABLES, create_statement, partition_for, partitions_around

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

def _is_partitioned(conn, table: str) -> bool:
    return conn.execute(text("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(:t)"),
                        {"t": table}).first() is not None


def _primary_key(conn, table: str) -> tuple[str, list[str]]:
    row = conn.execute(text(
        "SELECT c.conname, array_agg(a.attname ORDER BY k.ord) FROM pg_constraint c"
        " CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)"
        " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum"
        " WHERE c.conrelid = to_regclass(:t) AND c.contype = 'p' GROUP BY c.conname"), {"t": table}).first()
    if row is None:
        raise RuntimeError(f"{table} has no primary key; cannot partition it safely")
    return row[0], list(row[1])


def _other_indexes(conn, table: str) -> list[str]:
    rows = conn.execute(text(
        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indrelid = to_regclass(:t)"
        " AND NOT i.indisprimary"), {"t": table}).all()
    return [r[0] for r in rows]


def _partition(conn, table: str) -> None:
    key, period = TABLES[table]
    if _is_partitioned(conn, table):
        return
    pk_name, pk_cols = _primary_key(conn, table)
    indexes = _other_indexes(conn, table)
    old = f"{table}_unpartitioned"
    conn.exec_driver_sql(f'ALTER TABLE "{table}" RENAME TO "{old}"')
    conn.exec_driver_sql(f'ALTER TABLE "{old}" RENAME CONSTRAINT "{pk_name}" TO "{old}_pkey"')
    conn.exec_driver_sql(
        f'CREATE TABLE "{table}" (LIKE "{old}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS'
        f' INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY RANGE ("{key}")')
    cols = pk_cols + ([key] if key not in pk_cols else [])
    quoted = ", ".join(f'"{c}"' for c in cols)
    conn.exec_driver_sql(f'ALTER TABLE "{table}" ADD CONSTRAINT "{table}_pkey" PRIMARY KEY ({quoted})')
    starts = conn.execute(text(
        f"SELECT DISTINCT date_trunc('{period.name}', \"{key}\", 'UTC') FROM \"{old}\"")).all()
    wanted = {partition_for(table, r[0]).name: partition_for(table, r[0]) for r in starts}
    for p in partitions_around(table, datetime.now(UTC)):
        wanted.setdefault(p.name, p)
    for p in sorted(wanted.values(), key=lambda p: p.start):
        conn.exec_driver_sql(create_statement(p))
    # seen_events' old key is the hash alone: a hash stored at two instants (foreign records) keeps one row
    conn.exec_driver_sql(f'INSERT INTO "{table}" SELECT * FROM "{old}" ON CONFLICT DO NOTHING')
    conn.exec_driver_sql(f'DROP TABLE "{old}"')
    for ddl in indexes:
        conn.exec_driver_sql(ddl)


def _unpartition(conn, table: str, pk_cols: list[str]) -> None:
    if not _is_partitioned(conn, table):
        return
    old = f"{table}_partitioned"
    conn.exec_driver_sql(f'ALTER TABLE "{table}" RENAME TO "{old}"')
    conn.exec_driver_sql(f'ALTER TABLE "{old}" RENAME CONSTRAINT "{table}_pkey" TO "{old}_pkey"')
    conn.exec_driver_sql(f'CREATE TABLE "{table}" (LIKE "{old}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS'
                         f' INCLUDING STORAGE INCLUDING COMMENTS)')
    cols = ", ".join(f'"{c}"' for c in pk_cols)
    conn.exec_driver_sql(f'ALTER TABLE "{table}" ADD CONSTRAINT "{table}_pkey" PRIMARY KEY ({cols})')
    # seen_events' old key is the hash alone: a hash stored at two instants (foreign records) keeps one row
    conn.exec_driver_sql(f'INSERT INTO "{table}" SELECT * FROM "{old}" ON CONFLICT DO NOTHING')
    conn.exec_driver_sql(f'DROP TABLE "{old}"')  # its partitions go with it


def upgrade() -> None:
    conn = op.get_bind()
    for table in ("rollup_15m", "rollup_1h", "rollup_1d", "seen_events"):
        _partition(conn, table)


def downgrade() -> None:
    conn = op.get_bind()
    _unpartition(conn, "seen_events", ["hash"])
    _unpartition(conn, "rollup_1d", ["domain", "tz", "event_type", "bucket_start"])
    _unpartition(conn, "rollup_1h", ["domain", "event_type", "bucket_start"])
    _unpartition(conn, "rollup_15m", ["domain", "event_type", "bucket_start"])
