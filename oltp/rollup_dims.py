"""The SQL of the rollups by dimension, the cube and the value bins (docs/adr/0046-dimension-rollups.md).

The rollup sink (oltp/rollup_sink.py) appends `DIMENSION_CTES` to its one batch statement and ends it with
`FOLDED` (the values the cap folded, for the visitor groups it builds in Python); `tally rebuild`
(oltp/rebuild_dims.py) runs `DAILY_CTES` / `FINE_CTES` over a chunk's staged events. Both start from a CTE
`people`: the fresh non-bot events, one row each, with columns domain, event_type, tz, quarter (the UTC
quarter hour), day_start (the local day start in the site's zone), value and the six dimension values ('' for
a missing one).

The cap: per (domain, dimension, day_start) at most `%(cap)s` values are admitted (`dim_keys`; '' never
takes a slot). A batch's values not yet admitted are ranked by their events in the batch (most first),
then by value, and admitted while room remains; the others are `folded`: counted as '(other)' in every
table. Admitted values stay admitted: a later batch never folds them.
"""

from __future__ import annotations

import math
from decimal import Decimal

DIMENSIONS = ("page", "source", "country", "device", "browser", "os")
OTHER = "(other)"  # the key of values past the cap
NONE = ""  # the key of a missing value (the API shows "(none)")
ALPHA = 0.01  # relative accuracy of the value bins
GAMMA = (1 + ALPHA) / (1 - ALPHA)
ZERO_BIN = -2147483648  # the bin of value 0
_EPOCH = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"


def bin_of(value: Decimal | float) -> int:
    """The bin of a value >= 0, as the SQL computes it (ln in double precision): ceil(ln(value) / ln(GAMMA))."""
    v = float(value)
    return ZERO_BIN if v == 0 else math.ceil(math.log(v) / math.log(GAMMA))


BIN_SQL = (f"CASE WHEN value = 0 THEN {ZERO_BIN}"
           " ELSE ceil(ln(value::float8) / ln(1.01::float8 / 0.99::float8))::integer END")

# (dimension, key) rows of a row `r` holding the six dimension columns.
_UNPIVOT = "(VALUES " + ", ".join(f"('{d}', r.{d})" for d in DIMENSIONS) + ") AS v(dimension, key)"
_COLS = ", ".join(DIMENSIONS)
_SUM_UPDATE = """events = r.events + EXCLUDED.events, valued = r.valued + EXCLUDED.valued,
        value_sum = CASE WHEN EXCLUDED.valued = 0 THEN r.value_sum
                         ELSE COALESCE(r.value_sum, 0) + EXCLUDED.value_sum END"""
_SUMS = "sum(events), sum(valued), sum(value_sum)"


def _upsert(table: str, columns: str, select: str, key: str, update: str = _SUM_UPDATE) -> str:
    return (f"INSERT INTO {table} AS r ({columns}) {select}\n    ON CONFLICT ({key}) DO UPDATE SET {update}")


# `fine`: the events once per quarter, day and full tuple (the finest grain every table is a sum of); `vals`:
# per quarter, day, dimension and value (aggregated once, feeding both the cap and `dim_q`);
# `fresh_vals` / `new_vals` / `room` / `chosen` / `folded`: the cap (module docstring); `capped`: `fine` with
# the folded values replaced by '(other)' (the cubes); `dim_q`: `vals` with them replaced (the dim tables).
_CAP_CTES = f"""
fine AS (
    SELECT domain, event_type, tz, quarter, day_start, {_COLS},
           count(*) AS events, count(value) AS valued, sum(value) AS value_sum
    FROM people GROUP BY domain, event_type, tz, quarter, day_start, {_COLS}
), vals AS (
    SELECT r.domain, r.event_type, r.tz, r.quarter, r.day_start, v.dimension, v.key,
           sum(r.events) AS events, sum(r.valued) AS valued, sum(r.value_sum) AS value_sum
    FROM fine r CROSS JOIN LATERAL {_UNPIVOT}
    GROUP BY 1, 2, 3, 4, 5, 6, 7
), fresh_vals AS (
    SELECT domain, day_start, dimension, key, sum(events) AS events FROM vals WHERE key <> '' GROUP BY 1, 2, 3, 4
), new_vals AS (
    SELECT n.* FROM fresh_vals n
    WHERE NOT EXISTS (SELECT 1 FROM dim_keys k WHERE k.domain = n.domain AND k.dimension = n.dimension
                                                AND k.day_start = n.day_start AND k.key = n.key)
), room AS MATERIALIZED (
    SELECT g.domain, g.dimension, g.day_start, %(cap)s - count(k.key) AS room
    FROM (SELECT DISTINCT domain, dimension, day_start FROM new_vals) g
    LEFT JOIN dim_keys k ON k.domain = g.domain AND k.dimension = g.dimension AND k.day_start = g.day_start
    GROUP BY 1, 2, 3
), ranked AS (
    SELECT n.domain, n.dimension, n.day_start, n.key,
           row_number() OVER (PARTITION BY n.domain, n.dimension, n.day_start ORDER BY n.events DESC, n.key) AS rank
    FROM new_vals n
), judged AS (
    SELECT k.domain, k.dimension, k.day_start, k.key, k.rank <= room.room AS admit
    FROM ranked k JOIN room USING (domain, dimension, day_start)
), chosen AS (
    SELECT domain, dimension, day_start, key FROM judged WHERE admit
), admitted AS (
    INSERT INTO dim_keys (domain, dimension, day_start, key)
    SELECT domain, dimension, day_start, key FROM chosen ORDER BY 1, 2, 3, 4
    ON CONFLICT DO NOTHING
), folded AS (
    SELECT domain, dimension, day_start, key FROM judged WHERE NOT admit
), capped AS (
    SELECT r.domain, r.event_type, r.tz, r.quarter, r.day_start, r.events, r.valued, r.value_sum,
           {", ".join(f"CASE WHEN f_{d}.key IS NULL THEN r.{d} ELSE '{OTHER}' END AS {d}" for d in DIMENSIONS)}
    FROM fine r
    {" ".join(f"LEFT JOIN folded f_{d} ON f_{d}.dimension = '{d}' AND f_{d}.domain = r.domain"
              f" AND f_{d}.day_start = r.day_start AND f_{d}.key = r.{d}" for d in DIMENSIONS)}
), dim_q AS (
    SELECT v.domain, v.event_type, v.tz, v.quarter, v.day_start, v.dimension,
           CASE WHEN f.key IS NULL THEN v.key ELSE '{OTHER}' END AS key,
           sum(v.events) AS events, sum(v.valued) AS valued, sum(v.value_sum) AS value_sum
    FROM vals v LEFT JOIN folded f ON f.domain = v.domain AND f.dimension = v.dimension
                                  AND f.day_start = v.day_start AND f.key = v.key
    GROUP BY 1, 2, 3, 4, 5, 6, 7
), bins_q AS (
    SELECT domain, event_type, tz, quarter, day_start, {BIN_SQL} AS bin, count(*) AS count
    FROM people WHERE value IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6
)"""

_HOUR = f"date_bin('1 hour', quarter, {_EPOCH})"
_DIM_COLS = "domain, event_type, bucket_start, dimension, key, events, valued, value_sum"
_DIM_COLS_1D = "domain, tz, event_type, bucket_start, dimension, key, events, valued, value_sum"
_CUBE_COLS = f"domain, event_type, bucket_start, {_COLS}, events, valued, value_sum"
_CUBE_COLS_1D = f"domain, tz, event_type, bucket_start, {_COLS}, events, valued, value_sum"
_COUNT_UPDATE = "count = r.count + EXCLUDED.count"

_UPSERT_FINE = f"""
dim_15m AS (
    {_upsert("rollup_dim_15m", _DIM_COLS,
             f"SELECT domain, event_type, quarter, dimension, key, {_SUMS} FROM dim_q GROUP BY 1, 2, 3, 4, 5",
             "domain, dimension, bucket_start, event_type, key")}
), dim_1h AS (
    {_upsert("rollup_dim_1h", _DIM_COLS,
             f"SELECT domain, event_type, {_HOUR}, dimension, key, {_SUMS} FROM dim_q GROUP BY 1, 2, 3, 4, 5",
             "domain, dimension, bucket_start, event_type, key")}
), cube_1h AS (
    {_upsert("rollup_cube_1h", _CUBE_COLS,
             f"SELECT domain, event_type, {_HOUR}, {_COLS}, {_SUMS} FROM capped GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9",
             f"domain, bucket_start, event_type, {_COLS}")}
), bins_15m AS (
    {_upsert("value_bins_15m", "domain, event_type, bucket_start, bin, count",
             "SELECT domain, event_type, quarter, bin, sum(count) FROM bins_q GROUP BY 1, 2, 3, 4",
             "domain, event_type, bucket_start, bin", _COUNT_UPDATE)}
), bins_1h AS (
    {_upsert("value_bins_1h", "domain, event_type, bucket_start, bin, count",
             f"SELECT domain, event_type, {_HOUR}, bin, sum(count) FROM bins_q GROUP BY 1, 2, 3, 4",
             "domain, event_type, bucket_start, bin", _COUNT_UPDATE)}
)"""
_UPSERT_DAILY = f"""
dim_1d AS (
    {_upsert("rollup_dim_1d", _DIM_COLS_1D,
             f"SELECT domain, tz, event_type, day_start, dimension, key, {_SUMS} FROM dim_q GROUP BY 1, 2, 3, 4, 5, 6",
             "domain, tz, dimension, bucket_start, event_type, key")}
), cube_1d AS (
    {_upsert("rollup_cube_1d", _CUBE_COLS_1D,
             f"SELECT domain, tz, event_type, day_start, {_COLS}, {_SUMS} FROM capped"
             " GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
             f"domain, tz, bucket_start, event_type, {_COLS}")}
), bins_1d AS (
    {_upsert("value_bins_1d", "domain, tz, event_type, bucket_start, bin, count",
             "SELECT domain, tz, event_type, day_start, bin, sum(count) FROM bins_q GROUP BY 1, 2, 3, 4, 5",
             "domain, tz, event_type, bucket_start, bin", _COUNT_UPDATE)}
)"""

# Everything after `people`: the cap, then the upserts of the eight tables (each a CTE, executed whether or
# not the final query reads it). To be appended as ", " + DIMENSION_CTES after the statement's other CTEs.
DIMENSION_CTES = _CAP_CTES.strip() + ",\n" + _UPSERT_FINE.strip() + ",\n" + _UPSERT_DAILY.strip()
# The rebuild's two passes (oltp/rebuild.py): whole local days (dim_keys and the daily tables), then whole
# UTC hours (the 15-minute and hourly tables, capped by the day's keys written by the first pass).
DAILY_CTES = _CAP_CTES.strip() + ",\n" + _UPSERT_DAILY.strip()
FINE_CTES = _CAP_CTES.strip() + ",\n" + _UPSERT_FINE.strip()

# The statement's final query: the values folded by the cap in this batch (dimension, domain, day start, key),
# for the sink to map them to '(other)' in the visitor groups it builds from the batch's events (ADR 46, 47).
FOLDED = "SELECT dimension, domain, day_start, key FROM folded"
