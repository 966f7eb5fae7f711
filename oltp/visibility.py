"""The visibility map of the tables read by index-only scans, kept current by the hourly maintenance (ADR 62).

`oltp.visitors.visitor_bounds` ranks a visitors breakdown's values with index-only scans of `visitors_dim_1d_key`
and `visitors_dim_1w_bound` (both INCLUDE (n); the weekly one since migration 0016). PostgreSQL reads a row from the
index alone only where the visibility map marks its heap page all-visible, and only VACUUM sets those bits. The
partitions are yearly, so autovacuum's insert trigger (20 % of the partition by default) fires less and less often
as the year goes on, and `compact` (delete and re-insert) clears the bits of the pages it touches: the recent days,
which every range reads, would cost a heap fetch per row. So the rollup worker's hourly partition maintenance
vacuums these tables after compacting the closed weeks. VACUUM skips the pages already all-visible, so a pass reads
what was written since the previous one; SKIP_LOCKED: a partition another session holds (a migration, a DROP) is
left to the next pass instead of waited for.
"""

from __future__ import annotations

from typing import Any

import psycopg

INDEX_ONLY_TABLES = ("visitors_dim_1d", "visitors_dim_1w")


def vacuum_for_index_only_scans(conn: psycopg.Connection[Any]) -> None:
    """VACUUM every table of INDEX_ONLY_TABLES (all its partitions). `conn` must be in autocommit mode: VACUUM
    cannot run inside a transaction block (ValueError otherwise)."""
    if not conn.autocommit:
        raise ValueError("VACUUM needs an autocommit connection")
    for table in INDEX_ONLY_TABLES:
        conn.execute(f"VACUUM (SKIP_LOCKED) {table}")
