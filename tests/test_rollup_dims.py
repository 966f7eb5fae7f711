"""Rollups by dimension, the cube, the value bins and the cap (ADR 46) against a brute-force reference.

Real PostgreSQL (the session's server): batches go through `RollupSink.write`; every table of migration 0010
must then hold what counting each distinct non-bot hash once, in Python, gives, with the live cap rule
(per domain, dimension and local day, first come; a batch's new values by their events, most first, then by
value). The visitor groups handed to `oltp.visitors.add_visitors` are captured and compared too.
"""

from __future__ import annotations

import itertools
import math
import random
import uuid
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.batch import Batch
from core.event import StoredEvent
from oltp import rollup_sink, sites
from oltp.queries import boundaries
from oltp.rollup_dims import DIMENSIONS, GAMMA, OTHER, ZERO_BIN, bin_of
from oltp.rollup_sink import RollupSink
from oltp.tiers import zone

QUARTER, HOUR = timedelta(minutes=15), timedelta(hours=1)
ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
# Around local midnight in Kathmandu (+05:45): its events fall on two local days and in quarters off the UTC hour.
AROUND = datetime(2026, 6, 1, 18, 15, tzinfo=UTC)
ZONES = ("Asia/Kathmandu", "UTC")
TABLES = ("dim_15m", "dim_1h", "dim_1d", "cube_1h", "cube_1d", "bins_15m", "bins_1h", "bins_1d", "dim_keys")


def floor(t: datetime, step: timedelta) -> datetime:
    return ORIGIN + (t - ORIGIN) // step * step


def day_start(tz: str, t: datetime) -> datetime:
    s = int(t.timestamp() // 1)
    found = boundaries(zone(tz), s - 3 * 86400, s + 3 * 86400, 86400)
    return datetime.fromtimestamp(found[bisect_right(found, s) - 1], UTC)


def _add(table: dict, key: tuple, value: Decimal | None) -> None:
    n, valued, total = table.get(key, (0, 0, None))
    if value is not None:
        valued, total = valued + 1, (total or 0) + value
    table[key] = (n + 1, valued, total)


class Reference:
    """The new tables as counting each distinct non-bot hash once gives them, batch by batch (the cap is
    first come), and the union of the visitor groups."""

    def __init__(self, zones: dict[str, str], cap: int) -> None:
        self.zones, self.cap = zones, cap
        self.seen: set[str] = set()
        self.t: dict[str, dict] = {name: {} for name in TABLES}
        self.visitors: dict[tuple, set[str]] = {}

    def batch(self, events: Sequence[StoredEvent]) -> None:
        fresh: dict[str, StoredEvent] = {}
        for e in events:
            if e.hash not in self.seen:
                fresh[e.hash] = e
        self.seen |= fresh.keys()
        people = [e for e in fresh.values() if e.device != "bot"]
        capped = self._cap(people)
        for e in people:
            self._count(e, capped)

    def _values(self, e: StoredEvent) -> dict[str, str]:
        return {d: getattr(e, d) or "" for d in DIMENSIONS}

    def _cap(self, people: list[StoredEvent]) -> dict[tuple, str]:
        """(domain, day, dimension, value) -> its key: the value, or OTHER when folded."""
        counts: Counter[tuple] = Counter()
        for e in people:
            day = day_start(self.zones[e.domain], e.ts)
            for d, v in self._values(e).items():
                if v:
                    counts[(e.domain, day, d, v)] += 1
        keys = self.t["dim_keys"]
        out: dict[tuple, str] = {}
        new = sorted((k for k in counts if (k[0], k[2], k[1], k[3]) not in keys), key=lambda k: (-counts[k], k[3]))
        for k in counts:
            out[k] = k[3]
        for k in new:
            used = sum(1 for x in keys if x[:3] == (k[0], k[2], k[1]))
            if used < self.cap:
                keys[(k[0], k[2], k[1], k[3])] = ()
            else:
                out[k] = OTHER
        return out

    def _count(self, e: StoredEvent, capped: dict[tuple, str]) -> None:
        tz = self.zones[e.domain]
        day, quarter, hour = day_start(tz, e.ts), floor(e.ts, QUARTER), floor(e.ts, HOUR)
        keys = {d: capped.get((e.domain, day, d, v), v) for d, v in self._values(e).items()}
        value = None if e.value is None else Decimal(e.value)
        for d, k in keys.items():
            _add(self.t["dim_15m"], (e.domain, e.type, quarter, d, k), value)
            _add(self.t["dim_1h"], (e.domain, e.type, hour, d, k), value)
            _add(self.t["dim_1d"], (e.domain, tz, e.type, day, d, k), value)
        tup = tuple(keys[d] for d in DIMENSIONS)
        _add(self.t["cube_1h"], (e.domain, e.type, hour, *tup), value)
        _add(self.t["cube_1d"], (e.domain, tz, e.type, day, *tup), value)
        if value is not None:
            b = bin_of(value)
            for name, key in (("bins_15m", (e.domain, e.type, quarter)), ("bins_1h", (e.domain, e.type, hour)),
                              ("bins_1d", (e.domain, tz, e.type, day))):
                self.t[name][(*key, b)] = (self.t[name].get((*key, b), (0,))[0] + 1,)
        if e.visitor is not None:
            groups = [("1h", e.domain, "", hour, "", ""), ("1d", e.domain, tz, day, "", "")]
            groups += [("1d", e.domain, tz, day, d, k) for d, k in keys.items()]
            for g in groups:
                self.visitors.setdefault(g, set()).add(e.visitor)


_SQL = {
    "dim_15m": "SELECT domain, event_type, bucket_start, dimension, key, events, valued, value_sum FROM rollup_dim_15m",
    "dim_1h": "SELECT domain, event_type, bucket_start, dimension, key, events, valued, value_sum FROM rollup_dim_1h",
    "dim_1d": "SELECT domain, tz, event_type, bucket_start, dimension, key, events, valued, value_sum"
              " FROM rollup_dim_1d",
    "cube_1h": f"SELECT domain, event_type, bucket_start, {', '.join(DIMENSIONS)}, events, valued, value_sum"
               " FROM rollup_cube_1h",
    "cube_1d": f"SELECT domain, tz, event_type, bucket_start, {', '.join(DIMENSIONS)}, events, valued, value_sum"
               " FROM rollup_cube_1d",
    "bins_15m": "SELECT domain, event_type, bucket_start, bin, count FROM value_bins_15m",
    "bins_1h": "SELECT domain, event_type, bucket_start, bin, count FROM value_bins_1h",
    "bins_1d": "SELECT domain, tz, event_type, bucket_start, bin, count FROM value_bins_1d",
    "dim_keys": "SELECT domain, dimension, day_start, key FROM dim_keys",
}


def stored(dsn: str, domains: Iterable[str]) -> dict[str, dict]:
    """Every new table's rows of these domains, as the reference keys them."""
    out: dict[str, dict] = {}
    with psycopg.connect(dsn) as conn:
        for name, sql in _SQL.items():
            width = 0 if name == "dim_keys" else 1 if name.startswith("bins") else 3
            rows = conn.execute(sql + " WHERE domain = ANY(%s)", (list(domains),)).fetchall()
            out[name] = {tuple(r[:len(r) - width]): tuple(r[len(r) - width:]) for r in rows}
    return out


def event(domain: str, n: int, *, ts: datetime, type: str = "pageview", value: Decimal | None = None,
          **dims: Any) -> StoredEvent:
    return StoredEvent(v=1, hash=uuid.UUID(int=n).hex, domain=domain, url=f"https://{domain}/", ts=ts,
                       received_at=ts + timedelta(seconds=5), type=type, value=value, **dims)


class Writer:
    def __init__(self, dsn: str, cap: int) -> None:
        self.sink = RollupSink(dsn, f"g-{uuid.uuid4().hex[:8]}", dimension_cap=cap)
        self.topic, self.offset = f"t-{uuid.uuid4().hex[:8]}", 0

    def write(self, events: list[StoredEvent]) -> None:
        self.offset += len(events)
        self.sink.write(Batch(topic=self.topic, topic_id="T", events=list(events), next_offsets={0: self.offset}))


@pytest.fixture()
def groups(monkeypatch):
    """The visitor groups the sink hands to oltp.visitors.add_visitors, unioned per group."""
    got: dict[tuple, set[str]] = {}

    def capture(cur: Any, batch_groups: Sequence[tuple]) -> None:
        for grain, domain, tz, start, dimension, key, visitors in batch_groups:
            assert len(visitors) == len(set(visitors))
            got.setdefault((grain, domain, tz, start, dimension, key), set()).update(visitors)

    monkeypatch.setattr(rollup_sink, "add_visitors", capture)
    return got


def new_domains(dsn: str) -> dict[str, str]:
    run = uuid.uuid4().hex[:10]
    zones = {f"kathmandu-{run}.example.com": "Asia/Kathmandu", f"utc-{run}.example.com": "UTC"}
    sites.add(dsn, f"kathmandu-{run}.example.com", tz="Asia/Kathmandu")
    return zones


def check(dsn: str, ref: Reference, groups: dict[tuple, set[str]]) -> None:
    got = stored(dsn, ref.zones)
    for name in TABLES:
        assert got[name] == ref.t[name], name
    mine = {k: v for k, v in groups.items() if k[1] in ref.zones}
    assert mine == ref.visitors


# ---------------------------------------------------------------- the property test

POOLS: dict[str, list[Any]] = {
    "page": [None, "/", "/a", "/b", "/c"], "source": [None, "Google", "x.org"], "country": [None, "DE", "US"],
    "device": [None, "bot", "desktop", "mobile"], "browser": [None, "Firefox"], "os": [None, "Linux", "iOS"],
    "visitor": [None, "a" * 32, "b" * 32, "c" * 32],
}
VALUES = [None, Decimal(0), Decimal("0.000001"), Decimal("0.5"), Decimal(1), Decimal("1000.25"), Decimal("999999.999")]

event_specs = st.fixed_dictionaries({
    "zone": st.sampled_from(ZONES), "minutes": st.integers(-300, 300),
    "type": st.sampled_from(["pageview", "impression"]),
    "value": st.sampled_from(VALUES), **{k: st.sampled_from(v) for k, v in POOLS.items()}})


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(event_specs, min_size=1, max_size=25),
       batches=st.lists(st.lists(st.integers(0, 24), min_size=1, max_size=12), min_size=1, max_size=4),
       cap=st.integers(1, 3))
def test_every_new_table_equals_the_brute_force_reference(servers, groups, specs, batches, cap):
    """Random small batches (duplicates inside a batch and across batches, bots, missing dimensions, two
    zones, values and none, a cap of 1-3): every table of migration 0010 and the visitor groups are what the
    reference counts."""
    zones = new_domains(servers.pg_dsn)
    by_zone = {tz: d for d, tz in zones.items()}
    base = uuid.uuid4().int >> 32 << 32
    pool = [event(by_zone[s["zone"]], base + i, ts=AROUND + timedelta(minutes=s["minutes"], seconds=i), type=s["type"],
                  value=s["value"], **{k: s[k] for k in POOLS}) for i, s in enumerate(specs)]
    ref, writer = Reference(zones, cap), Writer(servers.pg_dsn, cap)
    try:
        for indices in batches:
            batch = [pool[i % len(pool)] for i in indices]
            writer.write(batch)
            ref.batch(batch)
        check(servers.pg_dsn, ref, groups)
    finally:
        writer.sink.close()


# ---------------------------------------------------------------- exactly once, the cap, the bins

def test_a_redelivered_part_of_a_batch_adds_nothing_to_any_new_table(servers, groups):
    zones = new_domains(servers.pg_dsn)
    rng = random.Random(17)
    pool = [event(rng.choice(list(zones)), uuid.uuid4().int, ts=AROUND + timedelta(minutes=rng.randint(-200, 200)),
                  value=rng.choice(VALUES), **{k: rng.choice(v) for k, v in POOLS.items()}) for _ in range(60)]
    ref, writer = Reference(zones, 1000), Writer(servers.pg_dsn, 1000)
    try:
        writer.write(pool[:40])
        ref.batch(pool[:40])
        first = stored(servers.pg_dsn, zones)
        assert first["dim_1d"] and first["cube_1d"] and first["bins_15m"] and first["dim_keys"]
        writer.write(pool[20:40])  # redelivered alone: nothing changes
        assert stored(servers.pg_dsn, zones) == first
        writer.write(pool[30:60])  # a redelivered part with new events: only the new ones count
        ref.batch(pool[30:60])
        check(servers.pg_dsn, ref, groups)
    finally:
        writer.sink.close()


def test_a_failing_batch_leaves_no_trace_in_the_new_tables_nor_the_offsets(servers, monkeypatch):
    zones = new_domains(servers.pg_dsn)
    domain = next(iter(zones))

    def fail(cur: Any, batch_groups: Sequence[tuple]) -> None:
        raise RuntimeError("visitors failed")

    monkeypatch.setattr(rollup_sink, "add_visitors", fail)
    writer = Writer(servers.pg_dsn, 1000)
    try:
        with pytest.raises(RuntimeError, match="visitors failed"):
            writer.write([event(domain, uuid.uuid4().int, ts=AROUND, page="/x", visitor="a" * 32, value=Decimal(2))])
        assert all(not rows for rows in stored(servers.pg_dsn, zones).values())
        assert writer.sink.committed(writer.topic, "T", [0]) == {}
    finally:
        writer.sink.close()


def test_the_cap_folds_later_values_into_other_and_keeps_admitted_ones(servers, groups):
    """Cap 2: the first batch's two most frequent new pages are admitted (ties by value), the third is
    '(other)'; a later batch's new page is '(other)' while an admitted one is still counted as itself;
    '' (no page) never takes a slot. Another day has its own slots."""
    zones = new_domains(servers.pg_dsn)
    domain = next(d for d, tz in zones.items() if tz == "UTC")
    t = datetime(2026, 6, 1, 10, tzinfo=UTC)
    n = itertools.count(uuid.uuid4().int >> 64)
    writer = Writer(servers.pg_dsn, 2)
    try:
        writer.write([event(domain, next(n), ts=t, page=p) for p in ["/c", "/c", "/b", "/a", None, None]])
        writer.write([event(domain, next(n), ts=t, page=p) for p in ["/d", "/a", "/c"]])
        writer.write([event(domain, next(n), ts=t + timedelta(days=1), page="/d")])
        with psycopg.connect(servers.pg_dsn) as conn:
            day = dict(conn.execute("SELECT key, events FROM rollup_dim_1d WHERE domain = %s AND dimension = 'page'"
                                    " AND bucket_start = %s", (domain, t.replace(hour=0))).fetchall())
            keys = conn.execute("SELECT day_start, key FROM dim_keys WHERE domain = %s AND dimension = 'page'"
                                " ORDER BY 1, 2", (domain,)).fetchall()
        assert day == {"/c": 3, "/a": 2, OTHER: 2, "": 2}
        assert [k for _, k in keys] == ["/a", "/c", "/d"]
    finally:
        writer.sink.close()


@pytest.mark.parametrize("value", ["0.000001", "0.5", "1", "1.0101", "2.5", "1000", "123456.789", "1000000000"])
def test_a_bin_holds_its_value_within_the_relative_accuracy(value):
    """bin = ceil(ln(v) / ln(GAMMA)): GAMMA^(bin-1) < v <= GAMMA^bin, so the bin's midpoint 2 GAMMA^bin / (GAMMA + 1)
    is within 1 % of v (DDSketch's guarantee, relative accuracy 0.01)."""
    v = Decimal(value)
    b = bin_of(v)
    assert GAMMA ** (b - 1) < float(v) * (1 + 1e-12) and float(v) <= GAMMA ** b * (1 + 1e-12)
    assert math.isclose(2 * GAMMA ** b / (GAMMA + 1), float(v), rel_tol=0.01)
    assert bin_of(Decimal(0)) == ZERO_BIN


def test_the_widest_enriched_event_fits_every_rollup_key(servers):
    """A page of 2,000 CJK characters is ~6 KB of UTF-8, over a B-tree row's 2,704 bytes: enrichment cuts it
    to MAX_PAGE_BYTES so that the widest event any sender can make (page, a 64-character non-ASCII source,
    browser and os at their widths, a 253-character domain) fits the dimension, cube and cap keys. Before,
    one such public hit failed every batch of its Kafka partition, forever."""
    from core.enrich import MAX_PAGE_BYTES, enrich
    from core.event import MAX_BROWSER, MAX_OS

    label = uuid.uuid4().hex[:20]
    domain = ".".join([label] + ["d" * 60] * 3 + ["com"])[-253:].lstrip(".")
    rng = random.Random(7)  # varied characters: a B-tree compresses a row of one repeated character below the limit
    path = "".join(chr(0x4E00 + rng.randrange(20000)) for _ in range(2000))  # ~6 KB of UTF-8
    page, source, _, _ = enrich(f"https://{domain}/{path}?utm_source=" + "%E5%AD%97" * 80, None, domain)
    assert page.startswith("/" + path[:10]) and len(page.encode()) <= MAX_PAGE_BYTES and len(source or "") == 64
    def cjk(n: int) -> str:
        return "".join(chr(0x4E00 + rng.randrange(20000)) for _ in range(n))

    widest = event(domain, uuid.uuid4().int, ts=datetime.now(UTC), value=Decimal(1), page=page, source=source,
                   country="DE", device="desktop", browser=cjk(MAX_BROWSER), os=cjk(MAX_OS))
    writer = Writer(servers.pg_dsn, 1000)
    try:
        writer.write([widest])
    finally:
        writer.sink.close()
    with psycopg.connect(servers.pg_dsn) as conn:
        assert conn.execute("SELECT page FROM rollup_cube_1d WHERE domain = %s", (domain,)).fetchall() == [(page,)]
