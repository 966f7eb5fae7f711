"""Writes consumer batches into the PostgreSQL rollup tiers (15m, 1h, 1d; ADR 19).

Contract of `write`: when it returns, the rollup increments of every tier for every *new*
event hash in the batch, the rejected records and the partition offsets are
committed in ONE transaction. If it raises, nothing from the batch is visible.
Events whose hash is already in `seen_events` (redelivery, shipper retries,
client retries with the same id) add nothing. The same transaction keeps the ingestion status
(`ingestion_15m`: accepted, bots, late, last arrival) and adds the collectors' refusal counts
(`collector_refusals`), each once.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from core.batch import Batch, same_incarnation
from oltp.tiers import DayStarts, SiteZones, ensure_tier_partitions, note_zones, plan_zones

try:  # helper "schema" (ADR 18): time partitions; until then the tables are plain
    from oltp.partitions import ensure_partitions
    from oltp.partitions import forget as _forget_partitions
except ImportError:  # pragma: no cover
    ensure_partitions = _forget_partitions = None

REJECTED_CAP = 10_000  # rows kept in rejected_records; older ones are pruned

_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS stage_events (
    hash uuid, domain text, event_type text, ts timestamptz, value numeric(24, 6),
    received_at timestamptz, bot boolean, tz text, day_start timestamptz
) ON COMMIT DELETE ROWS
"""

_APPLY = """
WITH batch AS (
    SELECT DISTINCT ON (hash) hash, domain, event_type, ts, value, received_at, bot, tz, day_start
    FROM stage_events ORDER BY hash
), fresh AS (
    INSERT INTO seen_events (hash, ts) SELECT hash, ts FROM batch
    ON CONFLICT (hash, ts) DO NOTHING
    RETURNING hash
), fresh_events AS (
    SELECT b.* FROM batch b JOIN fresh f ON f.hash = b.hash
), hourly AS (
    INSERT INTO rollup_1h AS r (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
    SELECT domain, event_type, date_bin('1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
           count(*), count(value), sum(value), min(value), max(value)
    FROM fresh_events
    GROUP BY 1, 2, 3
    ON CONFLICT (domain, event_type, bucket_start) DO UPDATE SET
        events    = r.events + EXCLUDED.events,
        valued    = r.valued + EXCLUDED.valued,
        value_sum = CASE WHEN EXCLUDED.valued = 0 THEN r.value_sum ELSE COALESCE(r.value_sum, 0) + EXCLUDED.value_sum END,
        value_min = LEAST(r.value_min, EXCLUDED.value_min),
        value_max = GREATEST(r.value_max, EXCLUDED.value_max)
), daily AS (
    INSERT INTO rollup_1d AS r (domain, tz, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
    SELECT domain, tz, event_type, day_start, count(*), count(value), sum(value), min(value), max(value)
    FROM fresh_events
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (domain, tz, event_type, bucket_start) DO UPDATE SET
        events    = r.events + EXCLUDED.events,
        valued    = r.valued + EXCLUDED.valued,
        value_sum = CASE WHEN EXCLUDED.valued = 0 THEN r.value_sum ELSE COALESCE(r.value_sum, 0) + EXCLUDED.value_sum END,
        value_min = LEAST(r.value_min, EXCLUDED.value_min),
        value_max = GREATEST(r.value_max, EXCLUDED.value_max)
), ingestion AS (
    INSERT INTO ingestion_15m AS i (domain, bucket_start, accepted, bots, late, last_received_at)
    SELECT b.domain, date_bin('15 minutes', b.received_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'), count(*),
           count(*) FILTER (WHERE b.bot),
           count(*) FILTER (WHERE b.received_at > date_bin('15 minutes', b.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00')
                                                  + INTERVAL '20 minutes'),
           max(b.received_at)
    FROM batch b JOIN fresh f ON f.hash = b.hash
    GROUP BY 1, 2
    ON CONFLICT (domain, bucket_start) DO UPDATE SET
        accepted = i.accepted + EXCLUDED.accepted, bots = i.bots + EXCLUDED.bots, late = i.late + EXCLUDED.late,
        last_received_at = GREATEST(i.last_received_at, EXCLUDED.last_received_at)
)
INSERT INTO rollup_15m AS r (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
SELECT b.domain, b.event_type, date_bin('15 minutes', b.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
       count(*), count(b.value), sum(b.value), min(b.value), max(b.value)
FROM batch b JOIN fresh f ON f.hash = b.hash
GROUP BY 1, 2, 3
ON CONFLICT (domain, event_type, bucket_start) DO UPDATE SET
    events    = r.events + EXCLUDED.events,
    valued    = r.valued + EXCLUDED.valued,
    value_sum = CASE WHEN EXCLUDED.valued = 0 THEN r.value_sum ELSE COALESCE(r.value_sum, 0) + EXCLUDED.value_sum END,
    value_min = LEAST(r.value_min, EXCLUDED.value_min),
    value_max = GREATEST(r.value_max, EXCLUDED.value_max)
"""

_APPLY_COUNTS = """
WITH batch AS (
    SELECT DISTINCT ON (hash) hash, domain, reason, window_end, events FROM stage_counts ORDER BY hash
), fresh AS (
    INSERT INTO seen_events (hash, ts) SELECT hash, window_end FROM batch
    ON CONFLICT (hash, ts) DO NOTHING
    RETURNING hash
)
INSERT INTO collector_refusals AS r (domain, reason, bucket_start, events)
SELECT b.domain, b.reason, date_bin('15 minutes', b.window_end, TIMESTAMPTZ '2000-01-01 00:00:00+00'), sum(b.events)
FROM batch b JOIN fresh f ON f.hash = b.hash
GROUP BY 1, 2, 3
ON CONFLICT (domain, reason, bucket_start) DO UPDATE SET events = r.events + EXCLUDED.events
"""

# Offsets only move forward within one incarnation of the topic; a recreated topic starts over.
_STORE_OFFSET = """
INSERT INTO consumer_offsets AS o (consumer_group, topic, partition, topic_id, next_offset)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (consumer_group, topic, partition) DO UPDATE
    SET next_offset = EXCLUDED.next_offset, topic_id = EXCLUDED.topic_id, updated_at = now()
    WHERE o.next_offset < EXCLUDED.next_offset OR o.topic_id <> EXCLUDED.topic_id
"""


class RollupSink:
    """Sink for the rollup worker; owns one connection (temp tables are per connection)."""

    name = "postgres"

    def __init__(self, dsn: str, group: str) -> None:
        self.dsn = dsn
        self.group = group
        self._conn: psycopg.Connection | None = None
        self._zones = SiteZones()
        self._days = DayStarts()
        self._noted: dict[str, str] = {}  # domain -> zone recorded in rollup_1d_coverage (committed)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.dsn, connect_timeout=5)
            self._conn.execute(_CREATE_STAGE)
            self._conn.commit()
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
            if "no partition of relation" not in str(exc) or _forget_partitions is None:
                raise
            _forget_partitions()
            self._write(batch)

    def _write(self, batch: Batch) -> None:
        conn = self._connection()
        try:
            zones = {d: self._zones.get(conn, d) for d in {e.domain for e in batch.events}}
            conn.commit()  # the registry read above must not hold a transaction open
            day_of = self._days.start
            rows = [(e.hash, e.domain, e.type, e.ts, e.value, e.received_at, e.device == "bot", zones[e.domain],
                     day_of(zones[e.domain], e.ts)) for e in batch.events]
            self._ensure_partitions(conn, batch, rows)
            noting = {d: z for d, z in zones.items() if self._noted.get(d) != z}
            plan = plan_zones(conn, noting, self._days)
            conn.commit()  # the plan's reads hold nothing into the batch transaction
            with conn.transaction():
                if batch.events:
                    with conn.cursor().copy(
                            "COPY stage_events (hash, domain, event_type, ts, value, received_at, bot, tz, day_start)"
                            " FROM STDIN") as copy:
                        # hash: 32 hex digits, which uuid's text input takes as they are
                        write_row = copy.write_row
                        for row in rows:
                            write_row(row)
                    conn.execute(_APPLY)
                    note_zones(conn, plan)  # after the rollup writes: rederive's lock order (ADR 19)
                if batch.counts:
                    self._apply_counts(conn, batch)
                if batch.rejected:
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO rejected_records (consumer_group, topic, partition, \"offset\", error, payload)"
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

    @staticmethod
    def _ensure_partitions(conn: psycopg.Connection, batch: Batch, rows: list[tuple]) -> None:
        """Create the partitions this batch writes into (ADR 18), each in its own short transaction
        before the batch's (a no-op while the tables are not partitioned)."""
        if ensure_partitions is None:
            return
        instants: list[datetime] = [r[3] for r in rows] + [c.window_end for c in batch.counts]
        if instants:
            ensure_partitions(conn, "seen_events", min(instants), max(instants))
        if rows:
            ts = [r[3] for r in rows]
            days = [r[8] for r in rows]
            ensure_tier_partitions(conn, min(ts), max(ts), min(days), max(days))

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
                        " window_end timestamptz, events bigint) ON COMMIT DELETE ROWS")
            cur.executemany("INSERT INTO stage_counts VALUES (%s, %s, %s, %s, %s)",
                            [(c.hash, c.domain, c.reason, c.window_end, c.count) for c in batch.counts])
            cur.execute(_APPLY_COUNTS)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
