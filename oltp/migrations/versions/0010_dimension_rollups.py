"""Rollups by dimension (issue 17 §2, docs/adr/0046-dimension-rollups.md): per tier and dimension (page, source,
country, device, browser, os) the events, valued events and value sum per value (`rollup_dim_15m/1h/1d`); every
event under its whole tuple of values (`rollup_cube_1h/1d`, for combined filters); the log bins of `value`
(`value_bins_15m/1h/1d`, percentiles); and the values admitted under the cap per domain, dimension and local day
(`dim_keys`). All written by the rollup sink in its batch transaction, non-bot events only.

Range-partitioned like their tiers (oltp/partitions.py): 15m by UTC day, 1h by UTC month, 1d by UTC year,
`dim_keys` by UTC day of `day_start`; partitions around now are created here, the rest on demand.
Frozen once shipped.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

from oltp.partitions import create_statement, partitions_around

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_COUNTS = "events bigint NOT NULL, valued bigint NOT NULL DEFAULT 0, value_sum numeric(24, 6)"
_TUPLE = ("page text NOT NULL, source text NOT NULL, country text NOT NULL, device text NOT NULL,"
          " browser text NOT NULL, os text NOT NULL")

TABLES = {
    "rollup_dim_15m": f"""domain text NOT NULL, event_type text NOT NULL, bucket_start timestamptz NOT NULL,
        dimension text NOT NULL, key text NOT NULL, {_COUNTS},
        PRIMARY KEY (domain, dimension, bucket_start, event_type, key)""",
    "rollup_dim_1h": f"""domain text NOT NULL, event_type text NOT NULL, bucket_start timestamptz NOT NULL,
        dimension text NOT NULL, key text NOT NULL, {_COUNTS},
        PRIMARY KEY (domain, dimension, bucket_start, event_type, key)""",
    "rollup_dim_1d": f"""domain text NOT NULL, tz text NOT NULL, event_type text NOT NULL,
        bucket_start timestamptz NOT NULL, dimension text NOT NULL, key text NOT NULL, {_COUNTS},
        PRIMARY KEY (domain, tz, dimension, bucket_start, event_type, key)""",
    "rollup_cube_1h": f"""domain text NOT NULL, event_type text NOT NULL, bucket_start timestamptz NOT NULL,
        {_TUPLE}, {_COUNTS},
        PRIMARY KEY (domain, bucket_start, event_type, page, source, country, device, browser, os)""",
    "rollup_cube_1d": f"""domain text NOT NULL, tz text NOT NULL, event_type text NOT NULL,
        bucket_start timestamptz NOT NULL, {_TUPLE}, {_COUNTS},
        PRIMARY KEY (domain, tz, bucket_start, event_type, page, source, country, device, browser, os)""",
    "value_bins_15m": """domain text NOT NULL, event_type text NOT NULL, bucket_start timestamptz NOT NULL,
        bin integer NOT NULL, count bigint NOT NULL, PRIMARY KEY (domain, event_type, bucket_start, bin)""",
    "value_bins_1h": """domain text NOT NULL, event_type text NOT NULL, bucket_start timestamptz NOT NULL,
        bin integer NOT NULL, count bigint NOT NULL, PRIMARY KEY (domain, event_type, bucket_start, bin)""",
    "value_bins_1d": """domain text NOT NULL, tz text NOT NULL, event_type text NOT NULL,
        bucket_start timestamptz NOT NULL, bin integer NOT NULL, count bigint NOT NULL,
        PRIMARY KEY (domain, tz, event_type, bucket_start, bin)""",
    "dim_keys": """domain text NOT NULL, dimension text NOT NULL, day_start timestamptz NOT NULL, key text NOT NULL,
        PRIMARY KEY (domain, dimension, day_start, key)""",
}
KEYS = {name: "day_start" if name == "dim_keys" else "bucket_start" for name in TABLES}

# No secondary index: every upsert maintains each index, and the rollup worker's cost is these upserts (ADR 46).
# A filtered series (one value over a range) reads the primary key's (domain, [tz,] dimension, bucket range)
# and filters `key` inside the index, as a breakdown of that range reads it.


def upgrade() -> None:
    conn = op.get_bind()
    now = datetime.now(UTC)
    for name, columns in TABLES.items():
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {name} ({columns}) PARTITION BY RANGE ({KEYS[name]})")
        for p in partitions_around(name, now):
            conn.exec_driver_sql(create_statement(p))


def downgrade() -> None:
    for name in reversed(list(TABLES)):
        op.execute(f"DROP TABLE IF EXISTS {name}")  # its partitions go with it
