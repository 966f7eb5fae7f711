"""Differential: the faster `event_from_hit` (ADR 25, "Per-event validation cost") against the one it
replaced, on the same generated hits and request contexts.

The reference is `core/event.py` as of commit ba5718b (the last before the rewrite), kept as a copy in
tests/reference/ and loaded by path as a separate module. For every request (a list of hits sharing one
`HitContext`, as the collector calls it) both must either return events with the same fields and the
same stored bytes (`to_json`), hash included when the hit carries an `id`, or raise the same error:
same exception type, same message, and for `EventError` the same `field` and `problem`. Hits
without an `id` get a random hash from both; there the hash is compared by shape only.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from collector.ua import classify_user_agent
from core import event as new
from core.enrich import enrich
from tests.eventlib import event_from_json

REFERENCE = Path(__file__).resolve().parent / "reference" / "event_before_speedup.py"  # core/event.py at ba5718b
FIELDS = ("hash", "domain", "url", "ts", "received_at", "type", "value", "referrer", "user_agent", "browser",
          "os", "device", "country", "visitor")
ENRICHED = ("page", "source", "utm_medium", "utm_campaign")
NOW = datetime.now(UTC).replace(microsecond=123456)
NOW_MS = int(NOW.timestamp() * 1000)


def load_module(name: str, path: Path) -> types.ModuleType:
    """Import the file at `path` as module `name`, apart from `core.event`."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve the annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def old() -> types.ModuleType:
    # A copy kept in the tree (CI may clone without history, so no `git show` here).
    module = load_module("event_reference", REFERENCE)
    assert module.event_from_hit is not new.event_from_hit
    return module


# ------------------------------------------------------------------------------------- strategies

controls = st.sampled_from(["\x00", "\n", "\t", "\x1f", "\x7f", "\x80", "\x9f", "\u00a0", "\u2028", "é", "☃"])
text = st.text(alphabet=st.one_of(st.characters(max_codepoint=0x2ff), controls), max_size=12)
junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                 st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

domains = st.one_of(
    st.sampled_from(["example.com", "Example.COM", "example.com.", " example.com ", "www.example.com", "localhost",
                     "a.b.c.example.org", "1.2.3.4", "example.123", "example.0x1f", "-bad.com", "x" * 64 + ".com",
                     "", "ex ample.com", "exämple.com", "com", "a..com"]),
    text, junk)
urls = st.one_of(
    st.builds(lambda scheme, rest: scheme + rest,
              st.sampled_from(["https://", "http://", "HTTPS://", "ftp://", "https:/", "", "http://x.com/"]), text),
    st.sampled_from(["https://example.com/", "http://example.com/a?b=c#d", "https://example.com/" + "a" * 2030,
                     "https://example.com/" + "a" * 2029, "https://example.com/\x00", "https://example.com/\x9f",
                     "https://example.com/\xa0", "https://example.com/\u2028", "", "https://"]),
    junk)
times = st.one_of(
    st.none(),
    st.integers(NOW_MS - 8 * 86_400_000, NOW_MS + 600_000),
    st.floats(NOW_MS - 8 * 86_400_000, NOW_MS + 600_000),
    st.sampled_from([0, -1, 32503680000000, 10**20, float("inf"), float("nan"), True, "", "2026-01-01",
                     (NOW - timedelta(minutes=3)).isoformat(),
                     (NOW - timedelta(minutes=3)).isoformat().replace("+00:00", "Z"),
                     (NOW - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%f+02:00"),
                     (NOW - timedelta(minutes=1)).replace(tzinfo=None).isoformat(), "0001-01-01T00:00:00Z",
                     (NOW + timedelta(minutes=6)).isoformat(), (NOW - timedelta(days=8)).isoformat(),
                     (NOW - timedelta(minutes=3)).isoformat().replace("+00:00", "z")]),
    st.builds(lambda d: (NOW - d).isoformat(), st.timedeltas(timedelta(minutes=-10), timedelta(days=8))),
    text, junk)
values = st.one_of(
    st.none(), st.integers(-3, 2 * 10**9), st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(min_value=0, max_value=10**9, places=7).map(str),
    st.sampled_from(["1", "1.5", "12.50", "0", "0.000000", "0.0000001", "1000000000", "1000000000.000001",
                     "-1", "1e3", " 1", "1_000", "١٢٣", "", "abc", "1." , ".5", "00012.340000", "9" * 41,
                     1.0, 0.0, -0.0, 1e-7, 123456.1234565, 10**9, True, False]),
    text, junk)
referrers = st.one_of(st.none(), st.just(""), urls)
ids = st.one_of(st.none(), st.sampled_from(["a", "x" * 128, "x" * 129, ""]), st.uuids().map(str), text, junk)
sites = st.one_of(st.none(), st.sampled_from(["k" * 32, "", "k" * 129]), text, junk)
types_ = st.one_of(st.sampled_from(["pageview", "impression", "click", "", "PAGEVIEW"]), junk)
# Mostly well-formed values (so that most hits are accepted and their results compared), then anything.
GOOD = {
    "domain": st.sampled_from(["example.com", "Example.COM", "example.com.", "shop.example.org", "localhost"]),
    "url": st.one_of(
        st.builds(lambda path: "https://example.com/" + path, st.text(alphabet=st.characters(
            min_codepoint=0x20, max_codepoint=0x3ff, blacklist_categories=("Cc",)), max_size=20)),
        st.builds(lambda path, c, n: "http://example.com/" + path + c + "x" * n, st.text(max_size=5), controls,
                  st.integers(0, 2)),
        st.sampled_from(["https://example.com/" + "a" * n for n in (2027, 2028, 2029)])),
    "ts": st.one_of(st.integers(NOW_MS - 6 * 86_400_000, NOW_MS + 200_000),
                    st.builds(lambda d: (NOW - d).isoformat(), st.timedeltas(timedelta(minutes=-4), timedelta(days=6))),
                    st.builds(lambda d: (NOW - d).isoformat().replace("+00:00", "Z"),
                              st.timedeltas(timedelta(0), timedelta(days=6)))),
    "value": st.one_of(st.integers(0, 10**9), st.floats(0, 10**9).map(lambda f: round(f, 6)),
                       st.decimals(min_value=0, max_value=10**9, places=6).map(str),
                       st.sampled_from(["1.50", "0", "0.000000", "12", "00012.340000", 1.5, 0.0, 10**9])),
    "referrer": st.sampled_from(["https://www.google.com/", "http://r.example/?q=a b", "", None]),
    "id": st.uuids().map(str),
    "site": st.just("k" * 32),
    "type": st.sampled_from(["pageview", "impression"]),
}
FIELD_STRATEGIES = {"domain": domains, "url": urls, "ts": times, "value": values, "referrer": referrers, "id": ids,
                    "site": sites, "type": types_}


@st.composite
def hits(draw: st.DrawFn) -> Any:
    shape = draw(st.sampled_from(["dict"] * 30 + ["mapping", "mapping", "list", "string", "none"]))
    if shape == "list":
        return [{"domain": "example.com"}]
    if shape == "string":
        return "example.com"
    if shape == "none":
        return None
    hit: dict[Any, Any] = {}
    for name in ("domain", "url", "id", "site", "ts", "type", "value", "referrer"):
        present = draw(st.integers(0, 9)) < (9 if name in ("domain", "url") else 5)
        if present:
            hit[name] = draw(FIELD_STRATEGIES[name] if draw(st.integers(0, 11)) == 0 else GOOD[name])
    if hit.get("id") is not None and "ts" not in hit and draw(st.integers(0, 4)):
        hit["ts"] = draw(GOOD["ts"])
    if draw(st.integers(0, 19)) == 0:
        hit[draw(st.sampled_from(["extra", "Domain", "user_agent", "hash", "a", "zz"]))] = 1
    return types.MappingProxyType(hit) if shape == "mapping" else hit


contexts = st.builds(
    lambda ua, ip, country, offset: {"received_at": NOW + offset, "user_agent": ua, "client_ip": ip,
                                     "country": country},
    st.one_of(st.none(), st.sampled_from(["", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
                                          "Googlebot/2.1 (+http://www.google.com/bot.html)",
                                          "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148",
                                          "Z" * 120 + "/1.0 CFNetwork/1.0 Darwin/20", "x" * 600]), text),
    st.one_of(st.none(), st.sampled_from(["", "203.0.113.7", "2001:db8::1"])),
    st.one_of(st.none(), st.sampled_from(["US", "de", "", "USA", "Ü1"])),
    st.sampled_from([timedelta(0), timedelta(milliseconds=1), timedelta(days=1)]))


# ------------------------------------------------------------------------------------- comparison


def outcome(module: types.ModuleType, hit: Any, ctx: Any, limits: Any, classify: Any) -> tuple[Any, ...]:
    try:
        event = module.event_from_hit(hit, ctx, limits, b"k" * 32, classify)
    except Exception as exc:
        detail = (exc.field, exc.problem) if isinstance(exc, module.EventError) else ()
        return ("error", type(exc).__name__, str(exc), detail)
    fields = {name: getattr(event, name) for name in FIELDS}
    stored = orjson.loads(event.to_json())
    if module is new:  # issue 17's derived fields, which the reference predates (their values: test_enrich.py)
        derived = tuple(stored.pop(name) for name in ENRICHED)
        assert derived == enrich(event.url, event.referrer, event.domain)
        assert derived == tuple(getattr(event, name) for name in ENRICHED)
    if hit.get("id") is None:  # a random 128-bit id from both: compare its shape, not its value
        assert re.fullmatch(r"[0-9a-f]{32}", fields.pop("hash"))
        stored.pop("hash")
    return ("event", fields, orjson.dumps(stored))


def compare(old: types.ModuleType, requests: list[tuple[dict[str, Any], list[Any]]], classify: Any) -> None:
    for ctx_args, batch in requests:
        old_ctx, new_ctx = old.HitContext(**ctx_args), new.HitContext(**ctx_args)
        old_limits, new_limits = old.Limits(), new.Limits()
        for hit in batch:
            before = outcome(old, hit, old_ctx, old_limits, classify)
            after = outcome(new, hit, new_ctx, new_limits, classify)
            assert after == before, hit
            if before[0] == "event":
                assert before[1]["value"] is None or str(after[1]["value"]) == str(before[1]["value"])


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(requests=st.lists(st.tuples(contexts, st.lists(hits(), min_size=1, max_size=6)), min_size=1, max_size=3),
       classify=st.sampled_from([None, classify_user_agent]))
@example(requests=[({"received_at": NOW, "user_agent": "UA", "client_ip": "203.0.113.7", "country": "US"},
                    [{"domain": "example.com", "url": "https://example.com/", "id": "a", "ts": NOW_MS, "value": "1.50",
                      "referrer": "https://r.example/\x00"}])], classify=classify_user_agent)
def test_new_event_from_hit_matches_the_reference_on_generated_requests(old: types.ModuleType,
                                                                        requests: Any, classify: Any) -> None:
    compare(old, requests, classify)


def test_a_clean_looking_url_with_a_control_character_is_refused_after_the_value_check(old: types.ModuleType) -> None:
    """The fast url check defers to the plain order: a bad value is named before the url's control char."""
    ctx = new.HitContext(received_at=NOW)
    hit = {"domain": "example.com", "url": "https://example.com/\x01", "value": "1e3"}
    with pytest.raises(new.EventError) as caught:
        new.event_from_hit(hit, ctx, new.Limits(), b"k")
    assert caught.value.field == "value" and "1e3" in caught.value.problem
    hit["value"] = "1"
    with pytest.raises(new.EventError) as caught:
        new.event_from_hit(hit, ctx, new.Limits(), b"k")
    assert caught.value.field == "url" and "control characters" in caught.value.problem
    compare(old, [({"received_at": NOW}, [hit, {**hit, "value": "1e3"}])], None)


def test_user_agent_classification_runs_once_per_request_context() -> None:
    """What is the same for every event of a request is computed once per HitContext, not per event."""
    calls: list[str] = []

    def classify(ua: str) -> tuple[str, str, str]:
        calls.append(ua)
        return "Firefox", "Linux", "desktop"

    for _ in range(2):  # two requests with the same headers: two contexts, two classifications
        ctx = new.HitContext(received_at=NOW, user_agent="UA/1", client_ip="203.0.113.7", country="US")
        events = [new.event_from_hit({"domain": "example.com", "url": f"https://example.com/{i}"}, ctx, new.Limits(),
                                     b"k", classify) for i in range(5)]
        assert {(e.browser, e.os, e.device, e.country, e.user_agent) for e in events} == \
            {("Firefox", "Linux", "desktop", "US", "UA/1")}
        assert len({e.visitor for e in events}) == 1 and len({e.hash for e in events}) == 5
    assert calls == ["UA/1", "UA/1"]


def test_events_compare_and_refuse_changes_like_the_dataclass_did(old: types.ModuleType) -> None:
    ctx_args = {"received_at": NOW, "user_agent": "UA", "client_ip": "203.0.113.7"}
    hit = {"domain": "example.com", "url": "https://example.com/", "id": "a", "ts": NOW_MS, "value": 2}
    a = new.event_from_hit(hit, new.HitContext(**ctx_args), new.Limits(), b"k", classify_user_agent)
    b = new.event_from_hit(dict(hit), new.HitContext(**ctx_args), new.Limits(), b"k", classify_user_agent)
    reference = old.event_from_hit(hit, old.HitContext(**ctx_args), old.Limits(), b"k", classify_user_agent)
    assert a == b and hash(a) == hash(b) and a.value == Decimal(2)
    stored = orjson.loads(a.to_json())
    assert tuple(stored.pop(name) for name in ENRICHED) == ("/", None, None, None)  # issue 17's, after the rest
    assert orjson.dumps(stored) == reference.to_json()
    assert event_from_json(a.to_json()).to_json() == a.to_json()  # stored to the millisecond
    with pytest.raises(AttributeError):
        a.url = "https://example.com/other"  # type: ignore[misc]
    assert a.url == "https://example.com/"


def test_the_reference_is_really_the_old_module(old: types.ModuleType) -> None:
    """Guard against comparing the new code with itself (e.g. a reference read from the work tree)."""
    assert "dataclass(frozen=True, slots=True)\nclass Event" in Path(old.__file__).read_text()
    assert "class Event(msgspec.Struct" in Path(new.__file__).read_text()
    assert sys.modules["event_reference"] is old


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(moment=st.datetimes(timezones=st.one_of(st.just(UTC), st.timezones(), st.builds(
    timezone, st.timedeltas(timedelta(hours=-23, minutes=-59), timedelta(hours=23, minutes=59))))))
def test_time_formatting_matches_the_reference(old: types.ModuleType, moment: datetime) -> None:
    """`_iso` (stored times, the hash's ts) and `_day` (the visitor key's day): a shortcut for UTC times."""
    for function in ("_iso", "_day"):
        expected: Any
        try:
            expected = getattr(old, function).__wrapped__(moment)
        except Exception as exc:
            expected = (type(exc), str(exc))
        try:
            got: Any = getattr(new, function).__wrapped__(moment)
        except Exception as exc:
            got = (type(exc), str(exc))
        assert got == expected, (function, moment)


def test_time_formatting_keeps_four_digit_years_and_truncates_to_the_millisecond(old: types.ModuleType) -> None:
    utc = UTC
    for moment in (datetime(1, 1, 2, 3, 4, 5, 999999, tzinfo=utc), datetime(999, 12, 31, tzinfo=utc),
                   datetime(2026, 11, 23, 14, 0, 0, 1500, tzinfo=utc),
                   datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=utc)):
        assert new._iso.__wrapped__(moment) == old._iso.__wrapped__(moment)
        assert new._day.__wrapped__(moment) == old._day.__wrapped__(moment)
    assert new._iso.__wrapped__(datetime(2026, 11, 23, 14, 0, 0, 1500, tzinfo=utc)) == "2026-11-23T14:00:00.001Z"
