"""Alembic environment: runs on the connection `oltp.schema.ensure_schema` passes in (online only).

`alembic` command-line use is not needed: `tally migrate` and every process's start-up call
`ensure_schema`, which holds the advisory lock and hands its connection over here.
"""

from __future__ import annotations

from alembic import context

from oltp.partitions import TABLES, parse_partition_name
from oltp.schema import metadata


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate comparisons ignore the partitions themselves: only their parents are in metadata."""
    if type_ == "table" and name:
        return not any(parse_partition_name(t, name) for t in TABLES)
    return True


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through oltp.schema.ensure_schema (it passes a locked connection)")
context.configure(connection=connection, target_metadata=metadata, include_name=_include_name,
                  transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
