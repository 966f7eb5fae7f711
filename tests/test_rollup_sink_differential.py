"""The rollup sink (ADR 26) against a straightforward reference computed here, on real PostgreSQL.

Seeded random batches (duplicates inside a batch and across batches, zones with a 30-minute DST change
and with a day start off the quarter hours, values present and absent, bots, late arrivals, narrow and
very wide batches) go through `RollupSink.write`; rollup_15m, rollup_1h, rollup_1d and ingestion_15m
must then hold exactly what counting each distinct hash once, in Python, gives.
"""

from __future__ import annotations

import random
import uuid
from bisect import bisect_right
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from core.batch import Batch
from core.event import StoredEvent
from oltp import rollup_sink, sites
from oltp.queries import boundaries
from oltp.rollup_sink import RollupSink, _array
from oltp.tiers import zone

QUARTER = timedelta(minutes=15)
ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# zone -> instants around which its events fall (each gets events within a few hours of these)
ZONES = {
    "Australia/Lord_Howe": [utc(2026, 4, 4, 14, 30), utc(2026, 10, 3, 15, 30)],  # 30-minute DST changes
    "Africa/Monrovia": [utc(1971, 3, 2, 0, 44, 30), utc(1972, 1, 7, 0, 44)],  # -00:44:30 day starts, then 0:00
    "America/Santiago": [utc(2026, 9, 6, 4)],  # midnight skipped
    "Asia/Kathmandu": [utc(2026, 6, 1, 18, 15)],  # +05:45
    "UTC": [utc(2026, 11, 20, 23, 50)],  # an unregistered domain is counted in UTC
}


def floor(t: datetime, step: timedelta) -> datetime:
    return ORIGIN + (t - ORIGIN) // step * step


def day_start(tz: str, t: datetime) -> datetime:
    """ADR 12's day holding t, from the rule's own function (not the sink's caches)."""
    s = int(t.timestamp() // 1)
    found = boundaries(zone(tz), s - 3 * 86400, s + 3 * 86400, 86400)
    return datetime.fromtimestamp(found[bisect_right(found, s) - 1], UTC)


def add(table: dict, key: tuple, value: Decimal | None) -> None:
    n, valued, total, low, high = table.get(key, (0, 0, None, None, None))
    if value is not None:
        valued, total = valued + 1, (total or 0) + value
        low, high = min(low, value) if low is not None else value, max(high, value) if high is not None else value
    table[key] = (n + 1, valued, total, low, high)


def reference(events: Iterable[StoredEvent], zones: dict[str, str]) -> dict[str, dict]:
    """The four tables as counting each hash once gives them."""
    seen: set[str] = set()
    out: dict[str, dict] = {"15m": {}, "1h": {}, "1d": {}, "ingestion": {}}
    for e in events:
        if e.hash in seen:
            continue
        seen.add(e.hash)
        tz = zones.get(e.domain, "UTC")
        add(out["15m"], (e.domain, e.type, floor(e.ts, QUARTER)), e.value)
        add(out["1h"], (e.domain, e.type, floor(e.ts, timedelta(hours=1))), e.value)
        add(out["1d"], (e.domain, tz, e.type, day_start(tz, e.ts)), e.value)
        key = (e.domain, floor(e.received_at, QUARTER))
        accepted, bots, late, last = out["ingestion"].get(key, (0, 0, 0, None))
        out["ingestion"][key] = (accepted + 1, bots + (e.device == "bot"),
                                 late + (e.received_at > floor(e.ts, QUARTER) + timedelta(minutes=20)),
                                 max(last, e.received_at) if last else e.received_at)
    return out


def stored(dsn: str, domains: list[str]) -> dict[str, dict]:
    with psycopg.connect(dsn) as conn:
        def rows(sql: str) -> dict:
            return {tuple(r[:-5]): tuple(r[-5:]) for r in conn.execute(sql, (domains,)).fetchall()}
        ingestion = {(d, b): (a, bots, late, last) for d, b, a, bots, late, last in conn.execute(
            "SELECT domain, bucket_start, accepted, bots, late, last_received_at FROM ingestion_15m"
            " WHERE domain = ANY(%s)", (domains,)).fetchall()}
        return {
            "15m": rows("SELECT domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max"
                        " FROM rollup_15m WHERE domain = ANY(%s)"),
            "1h": rows("SELECT domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max"
                       " FROM rollup_1h WHERE domain = ANY(%s)"),
            "1d": rows("SELECT domain, tz, event_type, bucket_start, events, valued, value_sum, value_min, value_max"
                       " FROM rollup_1d WHERE domain = ANY(%s)"),
            "ingestion": ingestion,
        }


def random_event(rng: random.Random, domain: str, around: datetime) -> StoredEvent:
    ts = around + timedelta(microseconds=rng.randint(-6 * 3600 * 10**6, 6 * 3600 * 10**6))
    value = rng.choice([None, None, Decimal(0), Decimal("1.5"), Decimal("0.000001"), Decimal("1E+3"),
                        Decimal(rng.randint(0, 10**9)) / 1000])
    return StoredEvent(v=1, hash=uuid.UUID(int=rng.getrandbits(128)).hex, domain=domain, url=f"https://{domain}/",
                       ts=ts, received_at=ts + timedelta(seconds=rng.choice([0, 1, 60, 19 * 60, 21 * 60, 7200])),
                       type=rng.choice(["impression", "pageview"]), value=value,
                       device=rng.choice([None, "bot", "desktop", "mobile"]))


class Writer:
    def __init__(self, dsn: str) -> None:
        self.sink = RollupSink(dsn, f"g-{uuid.uuid4().hex[:8]}")
        self.topic, self.offset = f"t-{uuid.uuid4().hex[:8]}", 0

    def write(self, events: list[StoredEvent], next_offset: int | None = None) -> None:
        self.offset += len(events)
        self.sink.write(Batch(topic=self.topic, topic_id="T", events=list(events),
                              next_offsets={0: self.offset if next_offset is None else next_offset}))


@pytest.fixture()
def writer(servers):
    w = Writer(servers.pg_dsn)
    yield w
    w.sink.close()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_sink_stores_exactly_what_counting_each_hash_once_gives(servers, writer, seed, monkeypatch):
    if seed % 2:  # every batch tries the all-new statement first (else: the deduplicating one after a redelivery)
        monkeypatch.setattr(rollup_sink, "DEDUP_AFTER_REDELIVERY", 0)
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    zones = {f"{name.lower().replace('/', '-').replace('_', '')}-{run}-{seed}.example.com": name for name in ZONES}
    for domain, tz in zones.items():
        if tz != "UTC":
            sites.add(servers.pg_dsn, domain, tz=tz)
    domains = sorted(zones)
    written: list[StoredEvent] = []
    for batch_no in range(8):
        if batch_no % 3 == 0:  # narrow: one zone's instant, a few hours
            domain = rng.choice(domains)
            batch = [random_event(rng, domain, rng.choice(ZONES[zones[domain]])) for _ in range(rng.randint(1, 400))]
        else:  # wide: every zone, 1971 to 2026 in one batch
            batch = [random_event(rng, d, rng.choice(ZONES[zones[d]])) for d in rng.choices(domains, k=400)]
        if written and batch_no % 2:  # redeliveries of events already counted (same hash, same event)
            batch += rng.sample(written, min(len(written), 30))
        if batch_no % 4 == 1:  # the same event twice inside one batch
            batch += rng.sample(batch, min(len(batch), 20))
        rng.shuffle(batch)
        writer.write(batch)
        written += batch
        assert stored(servers.pg_dsn, domains) == reference(written, zones), f"after batch {batch_no}"


def test_monrovias_odd_day_starts_are_kept_to_the_second(servers, writer):
    """1971 Monrovia days start at 00:44:30 UTC: an event at 00:44:29 belongs to the day before."""
    domain = f"monrovia-{uuid.uuid4().hex[:8]}.example.com"
    sites.add(servers.pg_dsn, domain, tz="Africa/Monrovia")
    writer.write([StoredEvent(v=1, hash=uuid.uuid4().hex, domain=domain, url=f"https://{domain}/", ts=t,
                              received_at=t, type="pageview")
                  for t in (utc(1971, 3, 2, 0, 44, 29, 999999), utc(1971, 3, 2, 0, 44, 30),
                            utc(1971, 3, 3, 0, 44, 29))])
    with psycopg.connect(servers.pg_dsn) as conn:
        rows = conn.execute("SELECT bucket_start, events FROM rollup_1d WHERE domain = %s ORDER BY 1",
                            (domain,)).fetchall()
    assert rows == [(utc(1971, 3, 1, 0, 44, 30), 1), (utc(1971, 3, 2, 0, 44, 30), 2)]


def test_a_failed_batch_leaves_nothing_and_counts_once_when_written_again(servers, writer):
    """The events' statement runs first (in a savepoint); a failure after it, here the offsets'
    check, rolls the whole batch back: no tier, no ingestion row, no seen hash."""
    domain = f"fail-{uuid.uuid4().hex[:8]}.example.com"
    rng = random.Random(9)
    batch = [random_event(rng, domain, utc(2026, 11, 2, 12)) for _ in range(50)]
    with pytest.raises(psycopg.errors.CheckViolation, match="next_offset"):
        writer.write(batch, next_offset=-1)
    assert stored(servers.pg_dsn, [domain]) == {"15m": {}, "1h": {}, "1d": {}, "ingestion": {}}
    with psycopg.connect(servers.pg_dsn) as conn:
        (seen,), = conn.execute("SELECT count(*) FROM seen_events WHERE hash = ANY(%s::uuid[])",
                                ([e.hash for e in batch],)).fetchall()
    assert seen == 0
    writer.write(batch)
    writer.write(batch)  # a redelivery of the whole batch adds nothing
    assert stored(servers.pg_dsn, [domain]) == reference(batch, {})


def test_a_wide_batch_creates_only_the_partitions_of_days_holding_events(servers, writer):
    domain = f"wide-{uuid.uuid4().hex[:8]}.example.com"
    days = [utc(1975, 3, 3, 12), utc(1975, 3, 4, 1), utc(1975, 3, 10, 23, 59)]  # days no other test writes
    writer.write([StoredEvent(v=1, hash=uuid.uuid4().hex, domain=domain, url=f"https://{domain}/", ts=t,
                              received_at=t, type="impression") for t in days])
    with psycopg.connect(servers.pg_dsn) as conn:
        names = {r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r'"
            " AND (relname LIKE 'seen_events_p197503%%' OR relname LIKE 'rollup_15m_p197503%%')").fetchall()}
    assert names == {f"{t}_p197503{d}" for t in ("seen_events", "rollup_15m") for d in ("03", "04", "10")}
    assert sum(r[0] for r in stored(servers.pg_dsn, [domain])["15m"].values()) == 3


@pytest.mark.parametrize(("values", "literal"), [
    (["plain", "{braces},commas", "NULL", "", " spaced ", "ünï", "a'b"], True),
    (["plain", 'a "quoted" one', "back\\slash", "tab\there", "new\nline"], False),
    ([True, False, None], True),
    ([Decimal("1.5"), None, Decimal("1E+3"), 7, Decimal("0.000001")], True),
])
def test_array_literals_read_back_as_the_same_values(servers, values, literal):
    """`_array` hands PostgreSQL an array literal written by msgspec, or the list itself when a string
    would need escaping: either way the server reads the same values."""
    param = _array(values)
    assert isinstance(param, str) is literal
    kind = {str: "text", bool: "boolean"}.get(type(values[0]), "numeric")
    with psycopg.connect(servers.pg_dsn) as conn:
        (got,), = conn.execute(f"SELECT %s::{kind}[]", (param,)).fetchall()
    assert got == values
