"""The loader hands ClickHouse JSON lines written by msgspec (ADR 27): what ClickHouse stores must be
exactly the decoded events, field by field, for the awkward values too (Decimal exponents, the
largest and smallest values, microseconds beyond DateTime64(3), 1970 and 2299, quotes, backslashes,
control and non-BMP characters, nulls, LowCardinality columns)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.batch import Batch
from core.event import decode_stored
from olap.client import connect
from olap.loader_sink import LoaderSink, events_json_lines
from olap.schema import EVENT_COLUMNS, ensure_schema

UTC = UTC
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def record(**fields) -> bytes:
    base = {"v": 1, "hash": uuid.uuid4().hex, "domain": "example.com", "url": "https://example.com/",
            "ts": "2026-11-23T10:00:00.000Z", "received_at": "2026-11-23T10:00:01.000Z", "type": "pageview"}
    base.update(fields)
    return orjson.dumps(base)


DB = "tally_json_insert"  # a database of its own on the session's chDB (one engine per process)


@pytest.fixture(scope="module")
def ch(servers):
    client = connect(servers.chdb_dsn)
    ensure_schema(client, DB, 0)
    return client


def stored(client, hashes: list[str]) -> dict[str, tuple]:
    rows = client.query(f"SELECT {', '.join(EVENT_COLUMNS)} FROM {DB}.events FINAL WHERE hash IN {{h:Array(String)}}",
                        parameters={"h": hashes}).result_rows
    return {r[0].decode(): (r[0].decode(), *r[1:]) for r in rows}  # FixedString comes back as bytes


def expected(e) -> tuple:
    ms = lambda t: (EPOCH + timedelta(milliseconds=(t - EPOCH) // timedelta(milliseconds=1))).replace(tzinfo=None)  # noqa: E731
    return (e.hash, e.domain, e.url, ms(e.ts), ms(e.received_at), e.type,
            None if e.value is None else Decimal(e.value).quantize(Decimal("0.000001")),
            e.referrer, e.user_agent, e.browser, e.os, e.device, e.country, e.visitor,
            e.page, e.source, e.utm_medium, e.utm_campaign)


def write(client, events: list) -> None:
    sink = LoaderSink(client, DB, f"g-{uuid.uuid4().hex[:6]}")
    sink.write(Batch(topic="t", topic_id="x", events=events, next_offsets={0: len(events)},
                     first_offsets={0: 0}, replay=uuid.uuid4().hex))


AWKWARD = [
    record(value="100"),  # normalised to Decimal('1E+2'), written as "1E+2"
    record(value="1000000000"),  # the largest value accepted
    record(value="999999999.999999"),
    record(value="0.000001"),
    record(value=0),
    record(value=7),
    record(ts="2026-01-01T00:14:59.999999Z"),  # DateTime64(3) keeps .999 (truncates, as the old insert did)
    record(ts="1970-01-01T00:00:00Z", received_at="2299-12-31T23:59:59Z"),
    record(ts="2026-03-29T02:30:00.5+05:45"),
    record(url='https://example.com/"q"\\b\u2028\u00e9\U0001F600?a=1&b=%20', referrer="https://r.example/\t",
           user_agent="UA \"x\" \\ y", browser="Firefox", os="Linux", device="bot", country="DE", visitor="ab" * 16),
    record(type="impression", referrer=None, user_agent=None, browser=None, os=None, device=None, country=None),
    # Issue 17 (ADR 45): the enrichment columns (migration 2), their longest values and awkward characters.
    record(page="/pricing?plan=pro", source="Hacker News", utm_medium="social", utm_campaign="launch day"),
    record(page="/" + "p" * 2047, source="s" * 64, utm_medium="m" * 128, utm_campaign='"c"\\ \u00e9\U0001F600' * 10),
    record(page="/%E2%98%83", source="example.org", utm_medium=None, utm_campaign=None),
]


def test_awkward_values_are_stored_exactly(ch):
    events = [decode_stored(r) for r in AWKWARD]
    assert events[0].value == Decimal("1E+2") and b'"1E+2"' in events_json_lines(events[:1])  # the case in point
    write(ch, events)
    got = stored(ch, [e.hash for e in events])
    assert len(got) == len(events)
    for e in events:
        assert got[e.hash] == expected(e), e.hash


_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)


@hsettings(max_examples=25, deadline=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.fixed_dictionaries({
    "ts": st.datetimes(datetime(1970, 1, 1), datetime(2299, 12, 31), timezones=st.just(UTC)),
    "value": st.one_of(st.none(), st.decimals(0, Decimal("1000000000"), places=6).map(str)),
    "url": _text.map(lambda s: "https://example.com/" + s),
    "user_agent": st.one_of(st.none(), _text), "referrer": st.one_of(st.none(), _text.map(lambda s: "https://x/" + s)),
    "page": st.one_of(st.none(), _text.map(lambda s: "/" + s)), "source": st.one_of(st.none(), _text),
    "utm_medium": st.one_of(st.none(), _text), "utm_campaign": st.one_of(st.none(), _text),
}), min_size=1, max_size=20))
def test_generated_events_are_stored_exactly(ch, rows):
    events = [decode_stored(record(**{**r, "ts": r["ts"].isoformat()})) for r in rows]
    write(ch, events)
    got = stored(ch, [e.hash for e in events])
    assert [got[e.hash] for e in events] == [expected(e) for e in events]
