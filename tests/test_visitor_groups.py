"""The rollup sink's visitor groups, built in Python from the batch's events (ADR 46/47), and the write-side
shape of the tables by dimension (no secondary index to maintain). Unit tests: no server.

The end-to-end equality with a brute-force reference (caps, redeliveries, bots, zones) is
tests/test_rollup_dims.py's property test; these pin the rules one by one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from core.event import StoredEvent
from oltp import schema
from oltp.rollup_dims import OTHER
from oltp.rollup_sink import _visitor_groups
from oltp.tiers import DayStarts

T = datetime(2026, 6, 1, 18, 20, tzinfo=UTC)  # Kathmandu (+05:45): the local day started at 18:15 UTC
ZONES = {"k.example": "Asia/Kathmandu", "u.example": "UTC"}


def ev(n: int, domain: str = "u.example", *, ts: datetime = T, **fields: Any) -> StoredEvent:
    return StoredEvent(v=1, hash=uuid.UUID(int=n).hex, domain=domain, url=f"https://{domain}/", ts=ts,
                       received_at=ts, type="pageview", **fields)


def starts(lo: datetime, hi: datetime) -> dict[str, list[int]]:
    days = DayStarts()
    return {tz: days.covering(tz, int(lo.timestamp()), int(hi.timestamp())) for tz in set(ZONES.values())}


def as_dict(groups: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], set[str]]:
    out: dict[tuple[Any, ...], set[str]] = {}
    for *key, visitors in groups:
        assert len(visitors) == len(set(visitors))
        assert tuple(key) not in out
        out[tuple(key)] = set(visitors)
    return out


def test_groups_per_hour_day_and_value_in_the_sites_zone_without_bots_or_visitorless_events():
    a, b = "a" * 32, "b" * 32
    events = [ev(1, "k.example", page="/x", visitor=a), ev(2, "k.example", ts=T - timedelta(minutes=30), visitor=b),
              ev(3, "k.example", page="/x", visitor=None), ev(4, "k.example", page="/bot", device="bot", visitor=b)]
    got = as_dict(_visitor_groups(events, ZONES, starts(T - timedelta(days=1), T), [], False))
    hour, early_hour = T.replace(minute=0), T.replace(hour=17, minute=0)
    today, yesterday = datetime(2026, 6, 1, 18, 15, tzinfo=UTC), datetime(2026, 5, 31, 18, 15, tzinfo=UTC)
    assert got[("1h", "k.example", "", hour, "", "")] == {a}
    assert got[("1h", "k.example", "", early_hour, "", "")] == {b}
    assert got[("1d", "k.example", "Asia/Kathmandu", today, "", "")] == {a}
    assert got[("1d", "k.example", "Asia/Kathmandu", yesterday, "", "")] == {b}  # 17:50 UTC: the day before
    assert got[("1d", "k.example", "Asia/Kathmandu", today, "page", "/x")] == {a}
    assert got[("1d", "k.example", "Asia/Kathmandu", yesterday, "page", "")] == {b}  # no page: ''
    assert not any(k[4] == "page" and k[5] == "/bot" for k in got)  # bots count nowhere
    assert len(got) == 2 + 2 + 2 * 6


def test_folded_values_are_other_and_after_the_deduplicating_statement_only_counted_events_count():
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    day = datetime(2026, 6, 1, tzinfo=UTC)
    events = [ev(1, page="/in", visitor=a), ev(2, page="/late", visitor=b), ev(3, page="/late", visitor=c),
              ev(2, page="/late", visitor=b)]  # hash 2 twice (one event); hash 3 was counted before
    rows = [("page", "u.example", day, "/late"), (None, uuid.UUID(int=1).hex, None, None),
            (None, uuid.UUID(int=2).hex, None, None)]
    got = as_dict(_visitor_groups(events, ZONES, starts(T, T), rows, True))
    assert got[("1d", "u.example", "UTC", day, "page", "/in")] == {a}
    assert got[("1d", "u.example", "UTC", day, "page", OTHER)] == {b}
    assert got[("1d", "u.example", "UTC", day, "", "")] == {a, b}
    assert ("1d", "u.example", "UTC", day, "page", "/late") not in got
    # the all-new statement returns no hashes: every event counts
    assert as_dict(_visitor_groups(events, ZONES, starts(T, T), rows[:1], False))[
        ("1d", "u.example", "UTC", day, "page", OTHER)] == {b, c}


def test_the_tables_by_dimension_keep_only_their_primary_key():
    """Each upsert maintains every index of its table; a filtered series reads the primary key (ADR 46)."""
    for table in (schema.rollup_dim_15m, schema.rollup_dim_1h, schema.rollup_dim_1d):
        assert not table.indexes, table.name
