"""Closed local weeks of the daily tier, pre-merged for the breakdowns (issue 17 §3 latency, ADR 61).

A 90-day breakdown summed ~90 daily rows per value (`rollup_dim_1d`) and merged ~90 daily sketches per value
(`visitors_dim_1d`); a closed local week (Monday to Monday in the site's zone) is kept pre-merged in
`rollup_dim_1w` / `visitors_dim_1w` (migration 0013), so the same range reads ~13 weekly rows and the days at its
edges. The open week's closed days (from its Monday to the last day that ended CLOSED_AFTER ago) are kept the same
way, as a shorter span from the same Monday (its `compacted_weeks.bucket_end` says where it ends), replaced as the
week goes on: the days a range ending now reads are today's, not the whole week's (ADR 61's second addendum). Below,
"week" means either.

Written only here, by a background pass over closed days (`compact_closed_weeks`, run with the hourly partition
maintenance of the rollup worker), never by the rollup sink's batch statement. The weekly
rows are a copy, not a move: the daily rows stay (a range may cut a week). Each compaction records, in the same
transaction, the week's **signature**: the row versions (`xmin`) of `rollup_1d` and of `visitors_1d` for the domain,
zone and days of the week. The sink writes `rollup_1d` of a (domain, zone, day) in the same statement as every
`rollup_dim_1d` row of it, and `oltp.visitors.add_visitors` writes `visitors_1d` of a (domain, zone, day) in the
same statement as every `visitors_dim_1d` row of it (a rebuild deletes and re-inserts both): so any later change to
a week's daily dimension rows changes its signature, and a reader uses a week only while the recorded signature
equals the current one (`valid_weeks`); otherwise it reads the days, and the next pass compacts the week again.
`valid_weeks` is its own statement, before the reading ones: a breakdown runs them in one snapshot (a read-only
repeatable-read transaction, `oltp.insights.Insights.breakdown`), so what it reads is what its check saw. Under read
committed a pass or a late event committing between the two could count a day twice or subtract what the week does
not hold: the open week's span is replaced under the same key by a longer one, and a week cut by a range has the
rows of its days outside subtracted (tests/test_weekly_tier.py forces both interleavings). Merging a key's partial
sketches (`oltp.visitors.compact`) changes no union and touches no `visitors_1d` row of another key; merging
`visitors_1d`'s own rows changes the signature (the week is then read from its days until compacted again: slower,
never wrong).

A compaction is one transaction per domain that takes the week's signature first, then replaces its weekly rows by
the sums / unions of the daily rows (read committed: each later statement sees at least what the signature saw; if
it saw more, the signature no longer matches and the week is not used). Redelivered events add nothing to the daily
rows (ADR 14/47), hence nothing here. A weekly sketch row's `n` (ADR 62) is the sum of its days' n: an upper bound of
the week's distinct visitors, NULL when a day's is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from datasketches import hll_sketch, hll_union

from oltp.partitions import WEEK_TABLES, ensure_partitions
from oltp.tiers import DayStarts, zone
from oltp.visitors import DIM_LG_K, HLL_TYPE, bound_sum, bytea_array, in_order, text_array, week_gaps

gaps = week_gaps  # [lo, hi) less some weeks (shared with oltp.visitors)

Week = tuple[datetime, datetime]  # [first local day start, the next week's first day start)

CLOSED_AFTER = timedelta(hours=1)  # a day is compacted (into its week) once it ended at least this long ago
MAX_DAYS_BACK = 400  # how far back a pass looks when the daily tier is kept forever (the API's longest range)

# The signature of a table's rows of one (domain, zone, week): their days and row versions.
_SIG = ("md5(coalesce(string_agg(extract(epoch FROM s.bucket_start)::bigint || ':' || s.xmin::text, ','"
        " ORDER BY s.bucket_start, s.xmin::text), ''))")
_SOURCES = {"counts": "rollup_1d", "visitors": "visitors_1d"}


def _sig_of(table: str, week: str) -> str:
    """The signature subquery of `table` for the week whose bounds are the SQL expressions in `week` (lo, hi)."""
    lo, hi = week.split(",")
    return (f"(SELECT {_SIG} FROM {table} s WHERE s.domain = %(domain)s AND s.tz = %(tz)s"
            f" AND s.bucket_start >= {lo} AND s.bucket_start < {hi})")


def weeks_in(tz: str, lo: datetime, hi: datetime, *, prefix: bool = False) -> list[Week]:
    """The whole local weeks (Monday 00:00 to Monday 00:00 in `tz`) inside [lo, hi), oldest first; with `prefix`,
    also the whole local days after the last of them that start a week and end by `hi` (its first days: the open
    week's closed days), as a shorter span from that Monday."""
    if hi <= lo:
        return []
    ends = [t for t in DayStarts().span(tz, lo, hi) if t <= hi]  # the day starts of [lo, hi], and the one before
    z = zone(tz)
    out = []
    for i, start in enumerate(ends):
        if start >= lo and start.astimezone(z).weekday() == 0:
            j = min(i + 7, len(ends) - 1)
            if j == i + 7 or (prefix and j > i):
                out.append((start, ends[j]))
    return out


def valid_weeks(conn: psycopg.Connection[Any], domain: str, tz: str, lo: datetime, hi: datetime,
                kind: str, *, overlapping: bool = False) -> list[Week]:
    """The compacted weeks (and open weeks' first days) inside [lo, hi) of (domain, tz) whose `kind` ('counts' or
    'visitors') signature still holds: their weekly rows equal the sums / unions of the current daily rows. With
    `overlapping`, also those that hold only part of [lo, hi) (a range starting or ending mid-week)."""
    if hi - lo < timedelta(days=7) - timedelta(hours=1):  # no whole week fits (a week is 167 to 169 hours)
        return []
    first = lo - timedelta(days=8) if overlapping else lo  # a week starts at most 7 days (and a clock change) before
    # a short range: ask only when something that can be compacted (ended CLOSED_AFTER ago) fits in it
    if hi - lo < timedelta(days=14) and not weeks_in(tz, first, min(hi, datetime.now(UTC) - CLOSED_AFTER),
                                                     prefix=True):
        return []
    sig = _sig_of(_SOURCES[kind], "c.bucket_start,c.bucket_end")
    within = "c.bucket_end > %(lo)s AND c.bucket_start < %(hi)s" if overlapping else "c.bucket_end <= %(hi)s"
    rows = conn.execute(
        f"SELECT c.bucket_start, c.bucket_end FROM compacted_weeks c WHERE c.domain = %(domain)s AND c.tz = %(tz)s"
        f" AND c.bucket_start >= %(first)s AND {within} AND c.{kind}_sig = {sig} ORDER BY 1",
        {"domain": domain, "tz": tz, "first": first, "lo": lo, "hi": hi}).fetchall()
    return [(a, b) for a, b in rows]


# --------------------------------------------------------------------------------------------- compaction

@dataclass(frozen=True, slots=True)
class CompactionPass:
    domains: int  # domains looked at
    compacted: int  # (domain, week) pairs (re)compacted
    dim_rows: int  # rollup_dim_1w rows written
    sketches: int  # visitors_dim_1w rows written


def _week_params(weeks: list[Week]) -> dict[str, Any]:
    return {"los": [a for a, _ in weeks], "his": [b for _, b in weeks]}


_CURRENT = f"""
SELECT w.lo, {_sig_of("rollup_1d", "w.lo,w.hi")}, {_sig_of("visitors_1d", "w.lo,w.hi")}, c.counts_sig, c.visitors_sig
FROM unnest(%(los)s::timestamptz[], %(his)s::timestamptz[]) AS w(lo, hi)
LEFT JOIN compacted_weeks c ON c.domain = %(domain)s AND c.tz = %(tz)s AND c.bucket_start = w.lo
"""
_EMPTY = "d41d8cd98f00b204e9800998ecf8427e"  # md5(''): no row


def due_weeks(conn: psycopg.Connection[Any], domain: str, tz: str, weeks: list[Week]) -> list[Week]:
    """The weeks whose weekly rows are missing or stale (and that hold any row)."""
    if not weeks:
        return []
    ends = dict(weeks)
    rows = conn.execute(_CURRENT, {"domain": domain, "tz": tz, **_week_params(weeks)}).fetchall()
    return sorted((lo, ends[lo]) for lo, counts, vis, old_counts, old_vis in rows
                  if (counts, vis) != (old_counts, old_vis) and (counts, vis) != (_EMPTY, _EMPTY))


_SUM_DIMS = """
INSERT INTO rollup_dim_1w (domain, tz, event_type, bucket_start, dimension, key, events, valued, value_sum)
SELECT r.domain, r.tz, r.event_type, w.lo, r.dimension, r.key, sum(r.events), sum(r.valued), sum(r.value_sum)
FROM unnest(%(los)s::timestamptz[], %(his)s::timestamptz[]) AS w(lo, hi)
JOIN rollup_dim_1d r ON r.domain = %(domain)s AND r.tz = %(tz)s AND r.bucket_start >= w.lo AND r.bucket_start < w.hi
GROUP BY 1, 2, 3, 4, 5, 6
"""
_DIM_SKETCHES = """
SELECT w.lo, v.dimension, v.key, v.sketch, v.n
FROM unnest(%(los)s::timestamptz[], %(his)s::timestamptz[]) AS w(lo, hi)
JOIN visitors_dim_1d v ON v.domain = %(domain)s AND v.tz = %(tz)s AND v.bucket_start >= w.lo AND v.bucket_start < w.hi
"""
_PUT_SKETCHES = """
INSERT INTO visitors_dim_1w (domain, tz, dimension, bucket_start, key, sketch, n)
SELECT %(domain)s, %(tz)s, d, w, k, s, n FROM unnest(%(dims)s::text[], %(weeks)s::timestamptz[], %(keys)s::text[],
                                                     %(sketches)s::bytea[], %(ns)s::bigint[]) AS u(d, w, k, s, n)
"""
_RECORD = """
INSERT INTO compacted_weeks (domain, tz, bucket_start, bucket_end, counts_sig, visitors_sig)
SELECT %(domain)s, %(tz)s, lo, hi, c, v FROM unnest(%(los)s::timestamptz[], %(his)s::timestamptz[], %(counts)s::text[],
                                                     %(vis)s::text[]) AS u(lo, hi, c, v)
"""


def compact_weeks(conn: psycopg.Connection[Any], domain: str, tz: str, weeks: list[Week]) -> tuple[int, int]:
    """(Re)compact these weeks of (domain, tz) in one transaction: signatures first, then the weekly rows replaced
    by the daily rows' sums and unions (module doc). Returns (rollup_dim_1w rows, visitors_dim_1w rows)."""
    if not weeks:
        return 0, 0
    params = {"domain": domain, "tz": tz, **_week_params(weeks)}
    for table in WEEK_TABLES:
        ensure_partitions(conn, table, weeks[0][0], weeks[-1][0])
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('tally.weekly'), hashtext(%s))", (domain,))
        sigs = {lo: (c, v) for lo, c, v, _, _ in conn.execute(_CURRENT, params).fetchall()}
        for table in ("rollup_dim_1w", "visitors_dim_1w", "compacted_weeks"):
            conn.execute(f"DELETE FROM {table} WHERE domain = %(domain)s AND tz = %(tz)s"
                         " AND bucket_start = ANY(%(los)s::timestamptz[])", params)
        dim_rows = conn.execute(_SUM_DIMS, params).rowcount
        sketches = _merge_sketches(conn, params)
        conn.execute(_RECORD, {**params, "counts": [sigs[a][0] for a, _ in weeks],
                               "vis": [sigs[a][1] for a, _ in weeks]})
    return dim_rows, sketches


def _merge_sketches(conn: psycopg.Connection[Any], params: dict[str, Any]) -> int:
    """visitors_dim_1w's rows of the weeks: per key the union of its days' sketches, merged in one order (a union's
    result keeps the HIP state of the order its sketches came in: `oltp.visitors.in_order`), and as its `n` (ADR 62)
    the sum of their n (an upper bound of the week's distinct visitors; NULL when a day's is unknown)."""
    days: dict[tuple[datetime, str, str], list[bytes]] = {}
    bounds: dict[tuple[datetime, str, str], list[int | None]] = {}
    for week, dimension, key, sketch, n in conn.execute(_DIM_SKETCHES, params, binary=True):
        days.setdefault((week, dimension, key), []).append(bytes(sketch))
        bounds.setdefault((week, dimension, key), []).append(n)
    unions: dict[tuple[datetime, str, str], hll_union] = {}
    for group, sketches in days.items():
        union = unions[group] = hll_union(DIM_LG_K)
        for sketch in in_order(sketches):
            union.update(hll_sketch.deserialize(sketch))
    if not unions:
        return 0
    keys = list(unions)
    conn.execute(_PUT_SKETCHES, {"domain": params["domain"], "tz": params["tz"],
                                 "dims": text_array([d for _, d, _ in keys]), "weeks": [w for w, _, _ in keys],
                                 "keys": text_array([k for _, _, k in keys]),
                                 "sketches": bytea_array([unions[k].get_result(HLL_TYPE).serialize_compact()
                                                          for k in keys]),
                                 "ns": [bound_sum(bounds[k]) for k in keys]})
    return len(keys)


def compact_closed_weeks(conn: psycopg.Connection[Any], now: datetime, *, keep_days: int = 0,
                         domain: str | None = None) -> CompactionPass:
    """One background pass: for every registered domain whose daily tier is written in its zone (or `domain`), the
    closed weeks and the open week's closed days (ended at least CLOSED_AFTER before `now`) within the daily tier's
    retention (`keep_days`, 0 = kept forever: the last MAX_DAYS_BACK days) whose weekly rows are missing or stale
    are compacted, one transaction per domain. `conn` must be in autocommit mode."""
    back = keep_days if 0 < keep_days < MAX_DAYS_BACK else MAX_DAYS_BACK
    lo, hi = now - timedelta(days=back), now - CLOSED_AFTER
    found = conn.execute(
        "SELECT s.domain, s.tz FROM sites s LEFT JOIN rollup_1d_coverage c ON c.domain = s.domain"
        " WHERE coalesce(c.tz, s.tz) = s.tz AND (%(domain)s::text IS NULL OR s.domain = %(domain)s) ORDER BY 1",
        {"domain": domain}).fetchall()
    compacted = dim_rows = sketches = 0
    weeks_by_zone: dict[str, list[Week]] = {}
    for d, tz in found:
        weeks = weeks_by_zone.get(tz)
        if weeks is None:
            weeks = weeks_by_zone[tz] = weeks_in(tz, lo.astimezone(UTC), hi.astimezone(UTC), prefix=True)
        due = due_weeks(conn, d, tz, weeks)
        if due:
            rows, sk = compact_weeks(conn, d, tz, due)
            compacted, dim_rows, sketches = compacted + len(due), dim_rows + rows, sketches + sk
    return CompactionPass(len(found), compacted, dim_rows, sketches)
