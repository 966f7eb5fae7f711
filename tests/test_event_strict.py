"""The collector's strictness on client input (ADR 15): what it acknowledges, both consumers store.

Pure logic; every accepted event is also run through the workers' decoder (`decode_stored`).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.event import EventError, HitContext, Limits, decode_stored, event_from_hit, normalize_domain

pytestmark = pytest.mark.servers("postgres")

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
SECRET = b"k" * 32


def hit(ua_fields=("Firefox", "Linux", "desktop"), user_agent="Mozilla/5.0 Firefox/131.0", **fields):
    body = {"domain": "example.com", "url": "https://example.com/a", "type": "impression", **fields}
    ctx = HitContext(received_at=NOW, user_agent=user_agent, client_ip="203.0.113.9")
    return event_from_hit(body, ctx, Limits(), SECRET, lambda ua: ua_fields)


@pytest.mark.parametrize("value", ["١٢٣", "１", "1_000", " 1", "1 ", "1e3", "1E3", "NaN", "nan", "Infinity", "-0",
                                   "-1", "+1", ".5", "5.", "0x10", "1,5", "", "١.5", True, False])
def test_value_strings_are_plain_ascii_decimals_only(value):
    with pytest.raises(EventError) as info:
        hit(value=value)
    assert info.value.field == "value"


@pytest.mark.parametrize("value, stored", [("0", "0"), ("12", "12"), ("12.50", "12.5"), ("0.000001", "0.000001"),
                                           ("1000000000", "1E+9"), (1000, "1E+3"), (0.5, "0.5"), (7, "7")])
def test_plain_values_are_accepted_and_stored_as_the_workers_read_them(value, stored):
    e = hit(value=value)
    assert str(e.value) == stored
    assert decode_stored(e.to_json()).value == e.value


@pytest.mark.parametrize("ts", ["２０２６-11-21T11:00:00+00:00", "2026-11-21T1１:00:00+00:00", "1763722800000",
                                "2026-11-21T11:00:00+00:00\u00a0"])
def test_ts_strings_are_ascii_iso_only(ts):
    with pytest.raises(EventError) as info:
        hit(ts=ts)
    assert info.value.field == "ts"


def test_epoch_milliseconds_as_a_json_number_still_work():
    at = datetime(2026, 11, 21, 11, 0, tzinfo=UTC)
    assert hit(ts=int(at.timestamp() * 1000)).ts == at


@pytest.mark.parametrize("domain", ["127.0.0.1", "10.0.0.1.", "[::1]", "::1", "192.168.0.1:80", "1.2.3", "example.123"])
def test_ip_literals_are_not_domains(domain):
    with pytest.raises(EventError) as info:
        normalize_domain(domain)
    assert info.value.field == "domain"


@pytest.mark.parametrize("domain", ["bob.test\n.", "bob.\ntest", "bob.test\n.."])
def test_a_newline_inside_a_domain_is_refused(domain):  # `$` matched before a final newline: an attack review
    with pytest.raises(EventError) as info:
        normalize_domain(domain)
    assert info.value.field == "domain"


@pytest.mark.parametrize("domain", ["example.com", "123.example.com", "1a.example.com", "localhost",
                                    "xn--bcher-kva.example"])
def test_host_names_with_digits_are_fine(domain):
    assert normalize_domain(domain) == domain


@pytest.mark.parametrize("field, text", [("url", "https://example.com/\x00"), ("url", "https://example.com/a\tb"),
                                         ("url", "https://example.com/\r\n"), ("referrer", "https://r.example/\x7f"),
                                         ("referrer", "https://r.example/\x9b"), ("url", "https://example.com/\x1b[31m")])
def test_control_characters_in_urls_are_refused(field, text):
    with pytest.raises(EventError) as info:
        hit(**{field: text})
    assert info.value.field == field and "control" in info.value.problem


def test_non_ascii_urls_are_fine():
    e = hit(url="https://example.com/über?q=日本", referrer="https://r.example/é")
    assert decode_stored(e.to_json()).url == "https://example.com/über?q=日本"


def test_user_agent_fields_are_cut_to_what_the_stores_hold():
    e = hit(ua_fields=("B" * 200, "O" * 65, "D" * 33), user_agent="U" * 1000)
    assert (e.browser, e.os, e.device, e.user_agent) == ("B" * 64, "O" * 64, "D" * 32, "U" * 512)
    decode_stored(e.to_json())
    assert hit(ua_fields=(None, "", None)).os is None


def test_ip_literals_cannot_be_registered_either():
    from oltp.sites import SiteError, check_domain

    with pytest.raises(SiteError) as info:
        check_domain("127.0.0.1")
    assert info.value.code == "invalid_domain" and "IP address" in info.value.message
