"""Writes consumer batches into the PostgreSQL rollup tiers (15m, 1h, 1d; ADR 19).

Contract of `write`: when it returns, the rollup increments of every tier for every *new*
event hash in the batch, the rejected records and the partition offsets are
committed in ONE transaction. If it raises, nothing from the batch is visible.
Events whose hash is already in `seen_events` (redelivery, shipper retries,
client retries with the same id) add nothing. The same transaction keeps the ingestion status
(`ingestion_15m`: accepted, bots, late, last arrival) and adds the collectors' refusal counts
(`collector_refusals`), each once. The same statement, from the same fresh events less the bots, writes the
rollups by dimension of every tier, the cubes, the value bins and the admitted values of the cap (`dim_keys`,
TALLY_DIMENSION_CAP; oltp/rollup_dims.py, ADR 46), and returns the values the cap folded; the visitor groups
are built from the batch's counted events in Python (`_visitor_groups`) and handed in the same transaction
to `oltp.visitors.add_visitors` (ADR 47).

How (ADR 26): Python touches the batch's domains and zones, and its events only for the visitor groups (one
pass). Each column the statement reads is handed over as one array literal written by msgspec in C
(`_columns`); per zone present, the day starts covering the batch (`DayStarts.covering`) travel as a small
array, and PostgreSQL puts every event in its day with `width_bucket` (ADR 12's days, exact to the second,
Monrovia's 00:44:30 too). One statement parses, deduplicates against `seen_events`, aggregates the fresh
events once and upserts the three tiers and `ingestion_15m` from that aggregate; it is first tried as "every
event is new" (a plain insert into seen_events, in a savepoint) and, if a hash was already seen, run in its
deduplicating form. Before the batch transaction, each in its own short transaction: the zone registry read,
the partitions of the UTC days holding events (`_prepare`), the coverage plan (`plan_zones`; `note_zones`
writes it after the rollup upserts, rederive's lock order, ADR 19).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import psycopg

from core.batch import Batch, same_incarnation
from core.event import StoredEvent
from oltp.partitions import ensure_partitions, ensure_partitions_for, is_missing_partition
from oltp.partitions import forget as _forget_partitions
from oltp.rollup_dims import DIMENSION_CTES, DIMENSIONS, FOLDED, OTHER
from oltp.tiers import (
    DAY_S,
    DayStarts,
    SiteZones,
    ensure_tier_partitions,
    note_zones,
    plan_zones,
)
from oltp.visitors import add_visitors

# oltp.visitors' VisitorGroup (issue 17 spec): grain '1h' | '1d', domain, tz ('' for 1h), bucket start,
# dimension and capped key ('' for the domain total), the distinct visitor keys.
VisitorGroup = tuple[str, str, str, datetime, str, str, list[str]]

REJECTED_CAP = 10_000  # rows kept in rejected_records; older ones are pruned

# The batch's events arrive as one array literal per column (`_columns`, ADR 26), unnested here;
# `zone_days` holds, per zone in the batch, the day starts covering its events (`DayStarts.covering`),
# `site` each domain's zone. `counted` aggregates the fresh events once, finely enough that every tier
# and the ingestion status are sums of its rows. `batch` is sorted by hash: with seen_events keyed (hash, ts)
# that wrote its index in key order (measured cheaper than arrival order); keyed (ts, hash) since migration 0015,
# a batch's entries land on the index's last pages whatever their order (bench.seen_index).
_APPLY_TEMPLATE = """
WITH zone_days AS (
    SELECT tz, array_agg(to_timestamp(s) ORDER BY s) AS starts
    FROM unnest(%(zone_tz)s::text[], %(zone_start)s::bigint[]) AS z(tz, s)
    GROUP BY tz
), site AS (
    SELECT m.domain, m.tz, z.starts
    FROM unnest(%(domains)s::text[], %(tzs)s::text[]) AS m(domain, tz) JOIN zone_days z ON z.tz = m.tz
), parsed AS (
    SELECT x.*, coalesce(x.device = 'bot', false) AS bot
    FROM unnest(%(hash)s::uuid[], %(domain)s::text[], %(type)s::text[], %(ts)s::timestamptz[],
                %(value)s::numeric(24, 6)[], %(received_at)s::timestamptz[], %(page)s::text[], %(source)s::text[],
                %(country)s::text[], %(device)s::text[], %(browser)s::text[], %(os)s::text[], %(visitor)s::text[])
        AS x(hash, domain, type, ts, value, received_at, page, source, country, device, browser, os, visitor)
), batch AS (
    {batch}
), fresh AS (
    {fresh}
), counted AS (
    SELECT b.domain, b.type AS event_type,
           date_bin('15 minutes', b.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS quarter,
           s.tz, s.starts[width_bucket(b.ts, s.starts)] AS day_start,
           date_bin('15 minutes', b.received_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS arrived,
           count(*) AS events, count(b.value) AS valued, sum(b.value) AS value_sum, min(b.value) AS value_min,
           max(b.value) AS value_max, count(*) FILTER (WHERE b.bot) AS bots,
           count(*) FILTER (WHERE b.received_at > date_bin('15 minutes', b.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00')
                                                  + INTERVAL '20 minutes') AS late,
           max(b.received_at) AS last_received_at
    FROM {counted_from} JOIN site s ON s.domain = b.domain
    GROUP BY 1, 2, 3, 4, 5, 6
), hourly AS (
    INSERT INTO rollup_1h AS r (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
    SELECT domain, event_type, date_bin('1 hour', quarter, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
           sum(events), sum(valued), sum(value_sum), min(value_min), max(value_max)
    FROM counted
    GROUP BY 1, 2, 3
    ON CONFLICT (domain, event_type, bucket_start) DO UPDATE SET
        events    = r.events + EXCLUDED.events,
        valued    = r.valued + EXCLUDED.valued,
        value_sum = CASE WHEN EXCLUDED.valued = 0 THEN r.value_sum
                         ELSE COALESCE(r.value_sum, 0) + EXCLUDED.value_sum END,
        value_min = LEAST(r.value_min, EXCLUDED.value_min),
        value_max = GREATEST(r.value_max, EXCLUDED.value_max)
), daily AS (
    INSERT INTO rollup_1d AS r (domain, tz, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
    SELECT domain, tz, event_type, day_start, sum(events), sum(valued), sum(value_sum), min(value_min), max(value_max)
    FROM counted
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (domain, tz, event_type, bucket_start) DO UPDATE SET
        events    = r.events + EXCLUDED.events,
        valued    = r.valued + EXCLUDED.valued,
        value_sum = CASE WHEN EXCLUDED.valued = 0 THEN r.value_sum
                         ELSE COALESCE(r.value_sum, 0) + EXCLUDED.value_sum END,
        value_min = LEAST(r.value_min, EXCLUDED.value_min),
        value_max = GREATEST(r.value_max, EXCLUDED.value_max)
), ingestion AS (
    INSERT INTO ingestion_15m AS i (domain, bucket_start, accepted, bots, late, last_received_at)
    SELECT domain, arrived, sum(events), sum(bots), sum(late), max(last_received_at)
    FROM counted
    GROUP BY 1, 2
    ON CONFLICT (domain, bucket_start) DO UPDATE SET
        accepted = i.accepted + EXCLUDED.accepted, bots = i.bots + EXCLUDED.bots, late = i.late + EXCLUDED.late,
        last_received_at = GREATEST(i.last_received_at, EXCLUDED.last_received_at)
), quarterly AS (
    INSERT INTO rollup_15m AS r (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
    SELECT domain, event_type, quarter, sum(events), sum(valued), sum(value_sum), min(value_min), max(value_max)
    FROM counted
    GROUP BY 1, 2, 3
    ON CONFLICT (domain, event_type, bucket_start) DO UPDATE SET
        events    = r.events + EXCLUDED.events,
        valued    = r.valued + EXCLUDED.valued,
        value_sum = CASE WHEN EXCLUDED.valued = 0 THEN r.value_sum
                         ELSE COALESCE(r.value_sum, 0) + EXCLUDED.value_sum END,
        value_min = LEAST(r.value_min, EXCLUDED.value_min),
        value_max = GREATEST(r.value_max, EXCLUDED.value_max)
), people AS (
    SELECT b.domain, b.type AS event_type, s.tz,
           date_bin('15 minutes', b.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS quarter,
           s.starts[width_bucket(b.ts, s.starts)] AS day_start, b.value, b.visitor,
           coalesce(b.page, '') AS page, coalesce(b.source, '') AS source, coalesce(b.country, '') AS country,
           coalesce(b.device, '') AS device, coalesce(b.browser, '') AS browser, coalesce(b.os, '') AS os
    FROM {counted_from} JOIN site s ON s.domain = b.domain
    WHERE NOT b.bot
), {dimensions}
{visitor_groups}"""

def _apply_statement(batch: str, fresh: str, counted_from: str, final: str = FOLDED) -> str:
    return (_APPLY_TEMPLATE.replace("{dimensions}", DIMENSION_CTES).replace("{visitor_groups}", final)
            .replace("{batch}", batch).replace("{fresh}", fresh).replace("{counted_from}", counted_from))


# The general statement: every hash once (a batch with a hash twice counts it once; which copy is kept
# is arbitrary, the copies of one hash being the same event), and only the hashes not yet in
# seen_events count (the dedup window, ADR 14).
_APPLY_DEDUP = _apply_statement(
    "SELECT DISTINCT ON (hash) * FROM parsed ORDER BY hash",
    "INSERT INTO seen_events (hash, ts) SELECT hash, ts FROM batch ON CONFLICT (hash, ts) DO NOTHING RETURNING hash",
    "batch b JOIN fresh f ON f.hash = b.hash",
    # and the hashes counted (dimension NULL): the visitor groups are built from those events only
    FOLDED + " UNION ALL SELECT NULL, replace(hash::text, '-', ''), NULL, NULL FROM fresh")
# The common case, tried first: every event of the batch is new. A plain insert into seen_events (no
# speculative insertion, no join back to what it returned) raises unique_violation if that is not so,
# and the batch is applied again with _APPLY_DEDUP (`RollupSink._apply_events`).
_APPLY_ALL_NEW = _apply_statement(
    "SELECT * FROM parsed ORDER BY hash",
    "INSERT INTO seen_events (hash, ts) SELECT hash, ts FROM batch",
    "batch b")

_APPLY_COUNTS = """
WITH batch AS (
    SELECT DISTINCT ON (hash) hash, domain, reason, window_end, events, value FROM stage_counts ORDER BY hash
), fresh AS (
    INSERT INTO seen_events (hash, ts) SELECT hash, window_end FROM batch
    ON CONFLICT (hash, ts) DO NOTHING
    RETURNING hash
)
INSERT INTO collector_refusals AS r (domain, reason, bucket_start, events, value)
SELECT b.domain, b.reason, date_bin('15 minutes', b.window_end, TIMESTAMPTZ '2000-01-01 00:00:00+00'), sum(b.events),
       (array_agg(b.value ORDER BY b.window_end DESC) FILTER (WHERE b.value IS NOT NULL))[1]
FROM batch b JOIN fresh f ON f.hash = b.hash
GROUP BY 1, 2, 3
ON CONFLICT (domain, reason, bucket_start) DO UPDATE
    SET events = r.events + EXCLUDED.events, value = COALESCE(EXCLUDED.value, r.value)
"""

# Offsets only move forward within one incarnation of the topic; a recreated topic starts over.
_STORE_OFFSET = """
INSERT INTO consumer_offsets AS o (consumer_group, topic, partition, topic_id, next_offset)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (consumer_group, topic, partition) DO UPDATE
    SET next_offset = EXCLUDED.next_offset, topic_id = EXCLUDED.topic_id, updated_at = now()
    WHERE o.next_offset < EXCLUDED.next_offset OR o.topic_id <> EXCLUDED.topic_id
"""


# A batch whose events span more than this is handled per UTC day holding events (partitions, day
# starts), not as one range: a replayed batch with one event from last year creates no empty partitions.
WIDE_SPAN_S = 2 * DAY_S
# After a batch holding an already seen hash, this many batches skip the all-new attempt.
DEDUP_AFTER_REDELIVERY = 8


@dataclass(frozen=True, slots=True)
class _Shape:
    """What the sink needs to know of a batch's events in Python (a few passes of builtins; arithmetic
    per event only for a batch spanning more than WIDE_SPAN_S): its domains, whether every hash is distinct,
    and the spans of UTC epoch seconds [lo, hi] (inclusive, ascending, disjoint) that hold every event's `ts`
    (floored to the second)."""

    domains: set[str]
    unique: bool
    spans: list[tuple[int, int]]


def _shape(events: Sequence[StoredEvent]) -> _Shape:
    ts = [e.ts for e in events]
    lo, hi = int(min(ts).timestamp() // 1), int(max(ts).timestamp() // 1)
    if hi - lo <= WIDE_SPAN_S:
        spans = [(lo, hi)]
    else:
        spans = []
        for day in sorted({int(t.timestamp()) // DAY_S for t in ts}):
            if spans and spans[-1][1] + 1 == day * DAY_S:
                spans[-1] = (spans[-1][0], (day + 1) * DAY_S - 1)
            else:
                spans.append((day * DAY_S, (day + 1) * DAY_S - 1))
    return _Shape({e.domain for e in events}, len({e.hash for e in events}) == len(events), spans)


_ENCODE = msgspec.json.Encoder(decimal_format="string").encode


def _array(values: list[Any]) -> str | list[Any]:
    """`values` as a PostgreSQL array literal, written by msgspec in C (~15 ns per element).

    A JSON array of strings, numbers, booleans and nulls reads as the same PostgreSQL array once its
    brackets become braces, as long as no string holds a backslash escape (JSON's `\\n`, `\\u0001` mean
    something else in an array literal): then the list itself is returned, for psycopg to adapt."""
    data = _ENCODE(values)
    if b"\\" in data:
        return values
    return "{" + data[1:-1].decode() + "}"


def _columns(events: Sequence[StoredEvent]) -> dict[str, str | list[Any]]:
    """The parameters `hash` .. `visitor` of the apply statements: one array literal per column the statement reads."""
    return {
        "hash": _array([e.hash for e in events]),
        "domain": _array([e.domain for e in events]),
        "type": _array([e.type for e in events]),
        "ts": _array([e.ts for e in events]),
        "value": _array([e.value for e in events]),
        "received_at": _array([e.received_at for e in events]),
        "page": _array([e.page for e in events]),
        "source": _array([e.source for e in events]),
        "country": _array([e.country for e in events]),
        "device": _array([e.device for e in events]),
        "browser": _array([e.browser for e in events]),
        "os": _array([e.os for e in events]),
        "visitor": _array([e.visitor for e in events]),
    }


def _at(s: int) -> datetime:
    return datetime.fromtimestamp(s, UTC)


def _visitor_groups(events: Sequence[StoredEvent], zones: dict[str, str], starts: dict[str, list[int]],
                    rows: list[tuple[Any, ...]], dedup: bool) -> list[VisitorGroup]:
    """oltp.visitors' VisitorGroups of the batch's counted non-bot events with a visitor: one per (domain, UTC
    hour), (domain, zone, local day) and (domain, zone, local day, dimension, capped value), built here from the
    events in memory (cheaper than grouping them in the statement, ADR 46). `rows` are the statement's final
    query (`FOLDED`): the values its cap folded, counted as '(other)' here too, and after the deduplicating
    statement the counted hashes (dimension NULL): only those events count. `starts` holds per zone the day
    starts the statement put events in (`width_bucket`: the greatest start at or before the event's second)."""
    folded = {(domain, dimension, int(day.timestamp()), key) for dimension, domain, day, key in rows
              if dimension is not None}
    counted = {h for dimension, h, _, _ in rows if dimension is None} if dedup else None
    per: defaultdict[tuple[str, str, str, int, str, str], set[str]] = defaultdict(set)
    for e in events:
        visitor = e.visitor
        if visitor is None or e.device == "bot" or (counted is not None and e.hash not in counted):
            continue
        domain = e.domain
        tz = zones[domain]
        s = int(e.ts.timestamp() // 1)
        day_starts = starts[tz]
        day = day_starts[bisect_right(day_starts, s) - 1]
        per["1h", domain, "", s - s % 3600, "", ""].add(visitor)
        per["1d", domain, tz, day, "", ""].add(visitor)
        for dimension, value in zip(DIMENSIONS, (e.page, e.source, e.country, e.device, e.browser, e.os),
                                    strict=True):
            value = value or ""
            if folded and value and (domain, dimension, day, value) in folded:
                value = OTHER
            per["1d", domain, tz, day, dimension, value].add(visitor)
    at: dict[int, datetime] = {}
    return [(grain, domain, tz, at.get(t) or at.setdefault(t, _at(t)), dimension, key, list(visitors))
            for (grain, domain, tz, t, dimension, key), visitors in per.items()]


class RollupSink:
    """Sink for the rollup worker; owns one connection (the refusal counts' temp table is per connection).
    Not thread-safe: calls must not overlap (the consumer loop writes from one thread, workers/consumer.py)."""

    name = "postgres"

    def __init__(self, dsn: str, group: str, *, dimension_cap: int = 1000) -> None:
        self.dsn = dsn
        self.group = group
        self.cap = dimension_cap  # TALLY_DIMENSION_CAP: values admitted per domain, dimension and local day
        self._conn: psycopg.Connection | None = None
        self._zones = SiteZones()
        self._days = DayStarts()
        self._noted: dict[str, str] = {}  # domain -> zone recorded in rollup_1d_coverage (committed)
        self._dedup_next = 0  # batches left to apply with _APPLY_DEDUP directly (after a redelivery)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.dsn, connect_timeout=5)
        return self._conn

    def committed(self, topic: str, topic_id: str, partitions: list[int]) -> dict[int, int]:
        """Next offset to read per partition, as stored by earlier batches of this topic incarnation."""
        conn = self._connection()
        with conn.transaction():
            rows = conn.execute(
                "SELECT partition, next_offset, topic_id FROM consumer_offsets"
                " WHERE consumer_group = %s AND topic = %s AND partition = ANY(%s)",
                (self.group, topic, partitions)).fetchall()
        return {p: o for p, o, stored_id in rows if same_incarnation(stored_id, topic_id)}

    def write(self, batch: Batch) -> None:
        try:
            self._write(batch)
        except psycopg.errors.CheckViolation as exc:
            # A partition this process believed in was dropped meanwhile (retention in another process):
            # forget what the cache knows and try once more, rather than let the batch look refused.
            # Known by SQLSTATE and diagnostics, not by the message (it follows lc_messages).
            if not is_missing_partition(exc):
                raise
            _forget_partitions()
            self._write(batch)

    @staticmethod
    def is_permanent(exc: BaseException) -> bool:
        """A data or integrity error (a value out of range, a constraint) fails the same way again."""
        return isinstance(exc, (psycopg.errors.DataError, psycopg.errors.IntegrityError))

    def _write(self, batch: Batch) -> None:
        conn = self._connection()
        try:
            events = batch.events
            shape = _shape(events) if events else None
            zones = {d: self._zones.get(conn, d) for d in sorted(shape.domains)} if shape else {}
            conn.commit()  # the registry read above must not hold a transaction open
            apply = self._prepare(conn, batch, shape, zones)
            noting = {d: z for d, z in zones.items() if self._noted.get(d) != z}
            plan = plan_zones(conn, noting, self._days)
            conn.commit()  # the plan's reads hold nothing into the batch transaction
            with conn.transaction():
                if apply is not None:
                    self._apply_events(conn, *apply, batch.events, zones)
                    note_zones(conn, plan)  # after the rollup writes: rederive's lock order (ADR 19)
                if batch.counts:
                    self._apply_counts(conn, batch)
                if batch.rejected:
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO rejected_records"
                            " (consumer_group, topic, partition, \"offset\", error, payload)"
                            " VALUES (%s, %s, %s, %s, %s, %s)",
                            [(self.group, batch.topic, r.partition, r.offset, r.error[:1000],
                              r.payload[:4096].decode("utf-8", "replace").replace("\x00", "\ufffd"))
                             for r in batch.rejected])
                    conn.execute("DELETE FROM rejected_records WHERE id <= (SELECT max(id) FROM rejected_records) - %s",
                                 (REJECTED_CAP,))
                with conn.cursor() as cur:
                    cur.executemany(_STORE_OFFSET, [(self.group, batch.topic, p, batch.topic_id, o)
                                                    for p, o in sorted(batch.next_offsets.items())])
            self._noted.update(noting)  # only once committed: a rolled-back note is noted again
        except psycopg.OperationalError:
            self.close()
            raise

    def _apply_events(self, conn: psycopg.Connection, distinct: bool, params: dict[str, object],
                      events: Sequence[StoredEvent], zones: dict[str, str]) -> None:
        """Apply the batch's events inside the caller's transaction: first as all new (`_APPLY_ALL_NEW`,
        in a savepoint), and if some hash was already seen, deduplicated (`_APPLY_DEDUP`). After a batch
        that held a seen hash (a redelivery usually spans several batches) the next few go straight to
        the deduplicating statement. Statements are never prepared: each is planned for its batch."""
        params = {**params, "cap": self.cap}
        starts: dict[str, list[int]] = {}
        for tz, start in zip(cast(list[str], params["zone_tz"]), cast(list[int], params["zone_start"]), strict=True):
            starts.setdefault(tz, []).append(start)
        with conn.cursor() as cur:
            if distinct and self._dedup_next == 0:
                try:
                    with conn.transaction():
                        cur.execute(_APPLY_ALL_NEW, params, prepare=False)
                        add_visitors(cur, _visitor_groups(events, zones, starts, cur.fetchall(), False))
                    return
                except psycopg.errors.UniqueViolation as exc:
                    if not (exc.diag.table_name or "").startswith("seen_events"):
                        raise
                    self._dedup_next = DEDUP_AFTER_REDELIVERY
            elif self._dedup_next:
                self._dedup_next -= 1
            cur.execute(_APPLY_DEDUP, params, prepare=False)
            add_visitors(cur, _visitor_groups(events, zones, starts, cur.fetchall(), True))

    def _prepare(self, conn: psycopg.Connection, batch: Batch, shape: _Shape | None,
                 zones: dict[str, str]) -> tuple[bool, dict[str, object]] | None:
        """Create the partitions this batch writes into (ADR 18), each in its own short transaction
        before the batch's, and return for `_apply_events` whether every hash in the batch is distinct
        and the statement's parameters (None without events).

        Per zone in the batch, the day starts covering each span of `shape.spans`; per span the
        partitions of seen_events and the tiers holding it (rollup_1d from the earliest day start)."""
        if batch.counts:
            ensure_partitions_for(conn, "seen_events", [c.window_end for c in batch.counts])
        if shape is None:
            return None
        tzs = sorted(set(zones.values()))
        starts: dict[str, list[int]] = {tz: [] for tz in tzs}
        covering = self._days.covering
        for lo, hi in shape.spans:
            first = lo
            for tz in tzs:
                days = covering(tz, lo, hi)
                starts[tz].extend(days)
                first = min(first, days[0])
            ensure_partitions(conn, "seen_events", _at(lo), _at(hi))
            ensure_tier_partitions(conn, _at(lo), _at(hi), _at(first), _at(hi))
        zone_tz: list[str] = []
        zone_start: list[int] = []
        for tz in tzs:
            days = sorted(set(starts[tz])) if len(shape.spans) > 1 else starts[tz]
            zone_tz += [tz] * len(days)
            zone_start += days
        return shape.unique, {
            "zone_tz": zone_tz, "zone_start": zone_start, "domains": list(zones), "tzs": list(zones.values()),
            **_columns(batch.events)}

    def store_rewound_offsets(self, topic: str, topic_id: str, offsets: dict[int, int]) -> None:
        """Store LOWER offsets for a rewind (`tally replay`, workers/rewind.py); committed when it returns.
        The loop calls it with nothing in flight, so no batch stores higher offsets over it afterwards."""
        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO consumer_offsets (consumer_group, topic, partition, topic_id, next_offset)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (consumer_group, topic, partition) DO UPDATE"
                    " SET next_offset = EXCLUDED.next_offset, topic_id = EXCLUDED.topic_id, updated_at = now()",
                    [(self.group, topic, p, topic_id, o) for p, o in sorted(offsets.items())])
        except psycopg.OperationalError:
            self.close()
            raise

    @staticmethod
    def _apply_counts(conn: psycopg.Connection, batch: Batch) -> None:
        """Add the collectors' refusal counts, each once (its hash joins the dedup window like an event's)."""
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS stage_counts (hash uuid, domain text, reason text,"
                        " window_end timestamptz, events bigint, value text) ON COMMIT DELETE ROWS")
            cur.executemany("INSERT INTO stage_counts VALUES (%s, %s, %s, %s, %s, %s)",
                            [(c.hash, c.domain, c.reason, c.window_end, c.count, c.value) for c in batch.counts])
            cur.execute(_APPLY_COUNTS)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
