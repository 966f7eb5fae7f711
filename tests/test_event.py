"""Unit tests of the event contract (pure logic, no servers)."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from core.event import EventError, HitContext, Limits, event_from_hit, event_hash
from tests.eventlib import event_from_json

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
CTX = HitContext(received_at=NOW, user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/131.0", client_ip="203.0.113.9")
SECRET = b"k" * 32


def hit(**fields):
    body = {"domain": "Example.COM", "url": "https://example.com/a", "type": "impression"}
    body.update(fields)
    return event_from_hit(body, CTX, Limits(), SECRET, lambda ua: ("Firefox", "Linux", "desktop"))


def test_valid_hit_is_normalised_and_stamped():
    e = hit(ts="2026-11-21T11:59:00+01:00", value="1.50", referrer="https://ref.example/")
    assert e.domain == "example.com"
    assert e.ts == datetime(2026, 11, 21, 10, 59, tzinfo=UTC)
    assert e.received_at == NOW
    assert e.value == Decimal("1.5")
    assert len(e.hash) == 32 and int(e.hash, 16) >= 0
    assert (e.browser, e.os, e.device) == ("Firefox", "Linux", "desktop")
    assert e.visitor and "203.0.113.9" not in e.to_json().decode()


def test_missing_ts_defaults_to_received_time_and_epoch_ms_is_accepted():
    assert hit().ts == NOW
    assert hit(ts=int((NOW - timedelta(minutes=1)).timestamp() * 1000)).ts == NOW - timedelta(minutes=1)


def test_client_id_makes_the_hash_deterministic_per_domain():
    ts = "2026-11-21T11:00:00Z"
    e = hit(id="abc", ts=ts)
    assert e.hash == hit(id="abc", ts=ts).hash == event_hash(
        "example.com", "abc", ts=e.ts, type="impression", url="https://example.com/a")
    assert e.hash != event_hash("other.com", "abc", ts=e.ts, type="impression", url="https://example.com/a")
    assert hit().hash != hit().hash


def test_a_client_id_hash_covers_the_whole_client_content():
    """ADR 14: an exact resend is the same event; the same id with any other difference is another."""
    ts = "2026-11-21T11:00:00Z"
    base = dict(id="abc", ts=ts, value="1.5", referrer="https://r.example/")
    same = hit(**base).hash
    # the same content written differently is the same event (normalised before hashing)
    assert hit(**{**base, "value": "1.500000", "ts": "2026-11-21T12:00:00+01:00"}).hash == same
    assert hit(**{**base, "domain": "EXAMPLE.com."}).hash == same
    assert hit(**{**base, "ts": "2026-11-21T11:00:00.0004Z"}).hash == same  # stored to the millisecond
    for change in ({"ts": "2026-11-21T11:00:00.001Z"}, {"type": "pageview"}, {"url": "https://example.com/b"},
                   {"value": "1.6"}, {"value": None}, {"referrer": None}, {"referrer": "https://r.example/x"},
                   {"id": "abd"}, {"domain": "other.com"}):
        assert hit(**{**base, **change}).hash != same, change
    # what the collector adds itself (receive time, user agent, visitor) is not client content
    later = HitContext(received_at=NOW + timedelta(seconds=30), user_agent="curl/8", client_ip="198.51.100.1")
    body = {"domain": "example.com", "url": "https://example.com/a", "type": "impression", **base}
    assert event_from_hit(body, later, Limits(), SECRET).hash == same
    with pytest.raises(TypeError):
        event_hash("example.com", "abc")  # a client id without its content: refused, never the old rule


def test_json_round_trip():
    e = hit(value=3, referrer="https://r.example/x")
    back = event_from_json(e.to_json())
    assert back == e


@pytest.mark.parametrize("fields, field, words", [
    ({"domain": None}, "domain", "required"),
    ({"domain": "not a host"}, "domain", "not a valid host"),
    ({"domain": "nodots"}, "domain", "not a valid host"),
    ({"url": None}, "url", "required"),
    ({"url": "javascript:alert(1)"}, "url", "absolute http"),
    ({"url": "https://x/" + "a" * 3000}, "url", "longer than"),
    ({"type": "click"}, "type", "impression, pageview"),
    ({"ts": "2026-11-21T12:30:00Z"}, "ts", "future"),
    ({"ts": "2026-10-01T00:00:00Z"}, "ts", "older than"),
    ({"ts": "2026-11-21T11:00:00"}, "ts", "UTC offset"),
    ({"ts": "yesterday"}, "ts", "ISO-8601"),
    ({"ts": True}, "ts", "ISO-8601"),
    ({"ts": "0001-01-01T00:00:00+01:00"}, "ts", "between the years"),
    ({"ts": "9999-12-31T23:59:59-05:00"}, "ts", "between the years"),
    ({"value": -1}, "value", "between 0"),
    ({"value": "1.0000001"}, "value", "6 decimal places"),
    ({"value": "NaN"}, "value", "between 0"),
    ({"value": float("inf")}, "value", "finite"),
    ({"value": "ten"}, "value", "not a decimal"),
    ({"value": [1]}, "value", "decimal number"),
    ({"id": ""}, "id", "non-empty"),
    ({"id": "evt-1"}, "ts", "required when 'id'"),
    ({"id": 5}, "id", "non-empty"),
    ({"colour": "red"}, "colour", "unknown field"),
    ({"referrer": "ftp://x"}, "referrer", "absolute http"),
])
def test_bad_fields_are_named(fields, field, words):
    with pytest.raises(EventError) as info:
        hit(**fields)
    assert info.value.field == field
    assert words in info.value.problem


def test_non_object_hit_is_rejected():
    with pytest.raises(EventError) as info:
        event_from_hit(["x"], CTX, Limits(), SECRET)
    assert info.value.field == "$"


@pytest.mark.parametrize("raw, field", [
    (b"not json", "$"),
    (b"[1, 2]", "$"),
    (b'{"v": 99}', "v"),
    (b'{"v": 1, "hash": "xyz"}', "hash"),
    (b'{"v": 1, "hash": "' + b"a" * 32 + b'", "domain": "example.com", "url": "https://e.com/",'
     b' "ts": 5, "received_at": "2026-01-01T00:00:00Z", "type": "pageview"}', "ts"),
    (b'{"v": 1, "hash": "' + b"a" * 32 + b'", "domain": "example.com", "url": "https://e.com/",'
     b' "ts": "0001-01-01T00:00:00+01:00", "received_at": "2026-01-01T00:00:00Z", "type": "pageview"}', "ts"),
])
def test_stored_records_are_revalidated(raw, field):
    with pytest.raises(EventError) as info:
        event_from_json(raw)
    assert info.value.field == field
