"""Property: what the collector acknowledges, both stores store, with the same values (ADR 15).

Hypothesis generates request bodies (valid-looking events with random field values: numbers as JSON
numbers and as strings, unicode digits, huge / tiny / negative / float values, times as ISO strings
with odd offsets and as epoch milliseconds, urls with unicode and control characters, long strings,
wrong types, unknown fields, repeated keys in the raw JSON text, nested junk, batches mixing good and
bad events), random User-Agent headers (very long ones, ones whose ua-parser family is over 64
characters) and random content types, and posts them to the real collector app (Flask's test client,
a site registered in the real PostgreSQL, a real spool on disk). For every request:

- refused (4xx): nothing was written to the spool;
- accepted (2xx): the spool holds exactly the acknowledged events (the answer's hashes, in order), each
  decoded by `core.event.decode_stored` (what both workers run) without rejection and re-validated by
  `tests.eventlib.event_from_json`, carrying what was sent (type, value, ts to the ms, domain; url and referrer as the
  default URL rule of core/urls.py keeps them) and the
  User-Agent fields; then the records go through the real sinks (`RollupSink.write` into PostgreSQL,
  `LoaderSink.write` into chDB, as the consumer loop calls them) and the stored rows must be those
  events: `tally.events FINAL` row by row (url, type, value, ts to the ms, referrer, browser/os/device,
  user agent), `seen_events` (hash, ts) and `rollup_15m` (count, valued, value_sum per type and bucket);
- never a 5xx.

Each example registers a fresh site, so the stores' rows of one example are exactly its events.
Bounded for CI: 150 examples, derandomized, no deadline (the stores take a few ms per example).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from collector.app import create_app
from collector.registry import SiteRegistry
from collector.ua import classify_user_agent
from core.batch import Batch
from core.config import Settings
from core.event import decode_stored
from core.urls import DEFAULT
from olap.client import connect
from olap.loader_sink import LoaderSink
from olap.schema import ensure_schema as ensure_ch_schema
from oltp import sites
from oltp.rollup_sink import RollupSink
from spool.segments import SpoolWriter, read_record, segment_records
from tests.conftest import SECRET
from tests.eventlib import event_from_json

# CI: 150 derandomized examples. Bug hunting: TALLY_PROPERTY_EXAMPLES=3000 (then random, not derandomized).
EXAMPLES = int(os.environ.get("TALLY_PROPERTY_EXAMPLES", "150"))
hsettings.register_profile(
    "collector-property-ci", max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES == 150, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
PROFILE = hsettings.get_profile("collector-property-ci")

NOW = datetime.now(UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LONG_FAMILY_UA = "Z" * 120 + "/1.0 CFNetwork/1.0 Darwin/20"  # ua-parser's family: the 120 Z's


# --------------------------------------------------------------------------------------------------
# The request model: JSON text built by hand (so keys can repeat and numbers keep their spelling).
# Placeholders are resolved per example: the fresh site's domain and key.


@dataclass(frozen=True)
class Dom:
    """The example's registered domain, spelled `variant` (upper-case, trailing dot, ...)."""

    variant: str = "exact"

    def text(self, domain: str) -> str:
        spelled = {"exact": domain, "upper": domain.upper(), "dot": domain + ".", "spaces": f" {domain} ",
                   "sub": "www." + domain}[self.variant]
        return json.dumps(spelled)


@dataclass(frozen=True)
class Key:
    """The example's site key (`ok`), another registered site's key (`other`), or junk."""

    variant: str = "ok"

    def text(self, key: str, other: str) -> str:
        return json.dumps({"ok": key, "other": other, "unknown": "pk_" + "x" * 22}[self.variant])


@dataclass(frozen=True)
class UrlOn:
    """An http(s) URL on the example's domain with `path` after it."""

    scheme: str
    path: str

    def text(self, domain: str) -> str:
        return json.dumps(f"{self.scheme}://{domain}/{self.path}", ensure_ascii=False)


Token = Any  # str (JSON text) | Dom | Key | UrlOn


@dataclass(frozen=True)
class Obj:
    """One event object as (key, JSON text) pairs, in order; keys may repeat."""

    pairs: tuple[tuple[str, Token], ...]
    escape_keys: bool = False  # spell keys with \\u escapes (the repeated-key check must see through them)


@dataclass(frozen=True)
class Request:
    body: Any  # Obj | tuple of items (an array) | str (raw text)
    content_type: str | None = "application/json"
    user_agent: str | None = None
    query_site: str | None = "ok"  # "ok" | "other" | "junk" | None
    site_suffix: str | None = None  # the site's domain is p<random>.<suffix> (else p<random>.example.com)

    def render(self, domain: str, key: str, other_key: str) -> bytes:
        def tok(t: Token) -> str:
            if isinstance(t, (Dom, UrlOn)):
                return t.text(domain)
            if isinstance(t, Key):
                return t.text(key, other_key)
            return t

        def item(x: Any) -> str:
            if isinstance(x, Obj):
                keys = [escape_first(k) if x.escape_keys else json.dumps(k)[1:-1] for k, _ in x.pairs]
                return "{" + ", ".join(f'"{k}": {tok(v)}' for k, (_, v) in zip(keys, x.pairs, strict=True)) + "}"
            if isinstance(x, tuple):
                return "[" + ", ".join(item(y) for y in x) + "]"
            return tok(x)

        return item(self.body).encode("utf-8", "surrogatepass")


def escape_first(key: str) -> str:
    """A key's JSON spelling (without quotes) with its first character as a \\u escape."""
    if not key:
        return ""
    first = json.dumps(key[0])[1:-1] if ord(key[0]) > 0x7F else f"\\u{ord(key[0]):04x}"
    return first + json.dumps(key[1:], ensure_ascii=False)[1:-1]


def event(*pairs: tuple[str, Token], escape_keys: bool = False) -> Obj:
    return Obj(tuple(pairs), escape_keys)


def good(**fields: Token) -> Obj:
    """A valid event on the example's site, with `fields` added or replaced (None drops a field)."""
    base: dict[str, Token] = {"domain": Dom(), "url": UrlOn("https", "p"), "type": '"impression"'}
    base.update(fields)
    return Obj(tuple((k, v) for k, v in base.items() if v is not None))


# --------------------------------------------------------------------------------------------------
# Strategies


def js(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


junk_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8).map(js)

number_text = st.one_of(
    st.integers(-5, 10**9 + 5).map(str),
    st.integers(-(2**70), 2**70).map(str),  # beyond 64 bits too
    st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False).map(lambda d: str(d)),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(min_value=0, max_value=1e9).map(repr),
    st.sampled_from(["1.5", "1.50", "15e-1", "1E2", "-0", "-0.0", "0.0000001", "1e400", "-1e-400",
                     "1000000000", "1000000000.000001", "999999999.999999", "0.1e1", "5e-324"]),
)
string_value = st.one_of(
    st.from_regex(r"\A[0-9]{1,10}(\.[0-9]{1,7})?\Z"),
    st.sampled_from(["١٢٣", "１", "1_000", " 1", "1 ", "1e3", "-0", "+1", "NaN", "Infinity", "0x10", "1.", ".5",
                     "", "٣.٥", "１.５", "12.5", "0.000001", "00001.5", "1000000001"]),
    st.text(st.characters(categories=["Nd", "Po", "Zs"]), max_size=6),
).map(js)
value_text = st.one_of(number_text, string_value, st.sampled_from(["true", "false", "null", "[]", "{}", '{"v": 1}']))


def iso(dt: datetime, style: str) -> str:
    if style == "Z":
        return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if style == "z":
        return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "z")
    if style == "naive":
        return dt.replace(tzinfo=None).isoformat()
    if style == "basic":
        return dt.strftime("%Y%m%dT%H%M%S%z")
    return dt.isoformat()


offsets = st.one_of(st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timedelta(minutes=m)),
                    st.integers(-86399, 86399).map(lambda s: timedelta(seconds=s)),
                    st.sampled_from([timedelta(hours=5, minutes=45), timedelta(hours=-9, minutes=-30),
                                     timedelta(hours=14), timedelta(0)]))
times_near_now = st.integers(-8 * 86400 * 1000, 6 * 60 * 1000).map(lambda ms: NOW + timedelta(milliseconds=ms))
ts_text = st.one_of(
    st.builds(lambda t, off, style: js(iso(t.astimezone(timezone(off)), style)), times_near_now, offsets,
              st.sampled_from(["offset", "offset", "Z", "z", "naive", "basic"])),
    times_near_now.map(lambda t: str((t - EPOCH) // timedelta(milliseconds=1))),  # epoch ms, JSON number
    times_near_now.map(lambda t: repr((t - EPOCH) / timedelta(milliseconds=1))),  # with a fraction
    times_near_now.map(lambda t: js(str((t - EPOCH) // timedelta(milliseconds=1)))),  # as a string: refused
    st.sampled_from(['"1970-01-01T00:00:00Z"', '"2999-12-31T23:59:59+00:00"', '"2026-02-30T00:00:00Z"',
                     '"23:59:60"', '"\u0662\u0660\u0662\u0666-01-01T00:00:00Z"', "-1", "1e20", "true", '""']),
)
times_in_window = st.integers(-7 * 86400 * 1000 + 120_000, 4 * 60 * 1000).map(
    lambda ms: NOW + timedelta(milliseconds=ms))
good_ts_text = st.one_of(
    st.builds(lambda t, off, style: js(iso(t.astimezone(timezone(off)), style)), times_in_window, offsets,
              st.sampled_from(["offset", "Z", "z"])),
    times_in_window.map(lambda t: str((t - EPOCH) // timedelta(milliseconds=1))),
    times_in_window.map(lambda t: repr((t - EPOCH) / timedelta(milliseconds=1))),
)
url_path = st.one_of(st.text(max_size=30),
                     st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20),
                     st.integers(2030, 2100).map(lambda n: "a" * n))
# what a browser sends: no control characters, any other unicode, up to the 2048-character limit
clean_path = st.one_of(st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=40),
                       st.integers(1990, 2030).map(lambda n: "ü" * n))
url_text = st.one_of(
    st.builds(UrlOn, st.sampled_from(["https", "http", "HTTPS", "ftp", "javascript"]), url_path),
    st.sampled_from(['""', "null", "1", '"/relative"', '"https://"', '"https://x.example/\\u0000"',
                     '"https://x.example/\\u2028"', '"https://x.example/\\ud800"', '"https://x.example/\\u0085"']),
    st.text(max_size=20).map(js),
)
field_names = ["id", "domain", "url", "ts", "type", "value", "referrer", "site"]
domain_text = st.one_of(
    st.builds(Dom, st.sampled_from(["exact", "exact", "exact", "upper", "dot", "spaces", "sub"])),
    st.sampled_from(['"127.0.0.1"', '"[::1]"', '"::1"', '"10.0.0.1."', '"0x7f.0.0.1"', '"example.123"',
                     '"localhost"', '""', "null", "42", '"ex ample.com"', '"exämple.com"']),
    st.text(max_size=12).map(js),
)
id_text = st.one_of(st.text(min_size=1, max_size=20).map(js), st.text(min_size=125, max_size=131).map(js),
                    st.sampled_from(['""', "1", "null", "[]"]))
type_text = st.one_of(st.sampled_from(['"impression"', '"pageview"']),
                      st.sampled_from(['"PAGEVIEW"', '"click"', "1", "null"]),
                      st.text(max_size=10).map(js))
site_text = st.one_of(st.builds(Key, st.sampled_from(["ok", "ok", "other", "unknown"])),
                      st.sampled_from(['""', "1", "null", '"' + "k" * 129 + '"']))

value_for = {"id": id_text, "domain": domain_text, "url": url_text, "ts": ts_text, "type": type_text,
             "value": value_text, "referrer": st.one_of(url_text, st.just("null")), "site": site_text}


@st.composite
def event_objects(draw) -> Obj:
    """Mostly valid-looking events: a valid base with some fields drawn at random, sometimes a field
    repeated, an unknown field or nested junk. (The coin flips use a drawn Random: hypothesis's own
    integers lean to their bounds, which would make nearly every event invalid.)"""
    coin = draw(st.randoms(use_true_random=True)).random
    fields: dict[str, Token] = {"domain": Dom(), "url": UrlOn("https", "p")}
    for name in field_names:
        if coin() < 0.04:  # a few fields get any value at all
            fields[name] = draw(value_for[name])
        elif name in ("type", "value", "ts", "id", "referrer", "url") and coin() < 0.5:
            fields[name] = draw({"type": st.sampled_from(['"impression"', '"pageview"']),
                                 "value": st.one_of(st.decimals(0, 10**9, places=2).map(str),
                                                    st.decimals(0, 1000, places=6).map(lambda d: js(str(d))),
                                                    st.floats(0, 1e9).map(lambda f: repr(round(f, 3))),
                                                    value_text),
                                 "ts": good_ts_text, "id": st.uuids().map(lambda u: js(str(u))),
                                 "referrer": st.builds(UrlOn, st.sampled_from(["https", "http"]), clean_path),
                                 "url": st.builds(UrlOn, st.sampled_from(["https", "http"]), clean_path),
                                 }[name])
    if "id" in fields and "ts" not in fields and coin() < 0.8:
        fields["ts"] = draw(good_ts_text)
    pairs = list(fields.items())
    draw(st.randoms(use_true_random=False)).shuffle(pairs)
    if coin() < 0.06:  # a repeated key, same or another value
        name = draw(st.sampled_from(field_names))
        pairs.insert(draw(st.integers(0, len(pairs))), (name, draw(value_for[name])))
    if coin() < 0.04:  # an unknown field
        pairs.append((draw(st.text(max_size=8)), draw(junk_json)))
    if coin() < 0.04:  # nested junk in a known field
        pairs.append((draw(st.sampled_from(field_names)), draw(junk_json)))
    return Obj(tuple(pairs), escape_keys=coin() < 0.1)


bodies = st.one_of(
    event_objects(),
    event_objects(),
    event_objects(),
    st.lists(event_objects(), min_size=0, max_size=6).map(tuple),
    st.lists(event_objects(), min_size=1, max_size=6).map(tuple),
    st.lists(st.one_of(event_objects(), junk_json), min_size=1, max_size=4).map(tuple),
    junk_json,
    st.text(max_size=30),
    st.sampled_from(["", "[", "{", '[{"domain": 1,}]', "NaN", "[Infinity]", "\ufeff{}", "[[]]", "[{}]"]),
)
content_types = st.one_of(
    st.sampled_from(["application/json", "text/plain", "text/plain;charset=UTF-8", "application/json; charset=utf8",
                     'application/json; charset="utf-8"', "TEXT/PLAIN", "Application/JSON; Charset=UTF-8"]),
    st.sampled_from(["application/json", "text/plain"]),
    st.sampled_from(["application/json", "text/plain"]),
    st.sampled_from(["application/json", "text/plain"]),
    st.sampled_from(["application/json; charset=latin-1", "application/x-www-form-urlencoded", "application/ld+json",
                     "text/html", "multipart/form-data; boundary=x", "", "text/plain; charset=utf-16"]),
    st.none(),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=30),
)
latin1 = st.characters(min_codepoint=0x20, max_codepoint=0xff, exclude_characters="\x7f")
user_agents = st.one_of(
    st.none(),
    st.sampled_from([
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
        "Googlebot/2.1 (+http://www.google.com/bot.html)", LONG_FAMILY_UA, ""]),
    st.text(latin1, max_size=60),
    st.builds(lambda s, n: (s or "x") * n, st.text(latin1, min_size=1, max_size=5), st.integers(100, 3000)),
    st.builds(lambda fam: fam + "/1.0 CFNetwork/1.0 Darwin/20",
              st.text(st.characters(min_codepoint=0x41, max_codepoint=0xff, exclude_characters="\x7f/ ();"),
                      min_size=60, max_size=200)),
)

# Registered domains other than *.example.com: long labels, hyphens, digits, punycode, numeric labels
# (refused when last), up to the 253-character limit.
host_suffixes = st.one_of(
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?){0,3}\Z"),
    st.sampled_from(["xn--bcher-kva.example", "co.uk", "0.example", "example.1", "example.0x1f", "a" * 63 + ".com",
                     ".".join(["b" * 63] * 3) + ".cc", "localhost"]),
)


@st.composite
def requests(draw) -> Request:
    """Mostly bodies of events with a good content type and ?site= key; the rest anything."""
    coin = draw(st.randoms(use_true_random=True)).random
    body = draw(st.one_of(event_objects(), st.lists(event_objects(), min_size=1, max_size=6).map(tuple))
                if coin() < 0.8 else bodies)
    ctype = draw(st.sampled_from(["application/json", "text/plain"]) if coin() < 0.8 else content_types)
    site = "ok" if coin() < 0.9 else draw(st.sampled_from(["other", "junk", None]))
    suffix = draw(host_suffixes) if coin() < 0.25 else None
    return Request(body, ctype, draw(user_agents), site, suffix)


# --------------------------------------------------------------------------------------------------
# The real collector, spool and sinks


@dataclass
class Env:
    settings: Settings
    spool: SpoolWriter
    registry: SiteRegistry
    client: Any
    rollup: RollupSink
    loader: LoaderSink
    ch: Any
    db: str
    other_key: str
    topic: str = field(default_factory=lambda: f"prop-{uuid.uuid4().hex[:10]}")
    offset: int = 0
    stats: dict = field(default_factory=lambda: defaultdict(int))

    def new_site(self, suffix: str | None = None) -> tuple[str, str]:
        if suffix is not None:
            try:
                domain = f"p{uuid.uuid4().hex[:12]}.{suffix}"
                key = sites.add(self.settings.pg_dsn, domain).site_key
            except sites.SiteError as exc:
                assert exc.code == "invalid_domain", exc
                self.stats["site suffix refused"] += 1
            else:
                self.stats["site suffix registered"] += 1
                assert self.registry.refresh()
                return domain, key
        domain = f"p{uuid.uuid4().hex[:12]}.example.com"
        key = sites.add(self.settings.pg_dsn, domain).site_key
        assert self.registry.refresh()
        return domain, key

    def take_spooled(self) -> list[bytes]:
        """Every record written to the spool since the last call (the segments are then removed)."""
        self.spool.close()  # seal the open segment
        records = []
        for path in sorted(Path(self.settings.spool_dir).glob("*")):
            if path.is_file():
                records += [read_record(line) for line in segment_records(path.read_bytes())]
                path.unlink()
        return records


@pytest.fixture(scope="module")
def env(servers, tmp_path_factory):
    home = tmp_path_factory.mktemp("property")
    settings = Settings.from_env({
        "TALLY_HOME": str(home / "home"), "TALLY_KAFKA_BOOTSTRAP": servers.bootstrap,
        "TALLY_PG_DSN": servers.pg_dsn, "TALLY_CLICKHOUSE_DSN": servers.chdb_dsn, "TALLY_SECRET": SECRET,
        "TALLY_SPOOL_DIR": str(home / "spool"), "TALLY_REGISTRY_REFRESH_S": "60"})
    spool = SpoolWriter(settings.spool_dir, max_bytes=1 << 24, max_age_s=3600)
    registry = SiteRegistry.from_settings(settings).start(background=False)
    app = create_app(settings, spool, start_sealer=False, registry=registry)
    ch = connect(settings.clickhouse_dsn)
    ensure_ch_schema(ch, settings.clickhouse_database)
    group = f"prop-{uuid.uuid4().hex[:8]}"
    other = sites.add(settings.pg_dsn, f"other-{uuid.uuid4().hex[:10]}.example.com").site_key
    e = Env(settings, spool, registry, app.test_client(), RollupSink(settings.pg_dsn, group),
            LoaderSink(ch, settings.clickhouse_database, group), ch, settings.clickhouse_database, other)
    yield e
    print(f"\ncollector property: {dict(e.stats)}")
    e.rollup.close()
    registry.stop()
    spool.close()


# --------------------------------------------------------------------------------------------------
# The property


def post(env: Env, req: Request) -> tuple[Any, str, list[bytes], bytes]:
    domain, key = env.new_site(req.site_suffix)
    raw = req.render(domain, key, env.other_key)
    headers = {}
    if req.content_type is not None:
        headers["Content-Type"] = req.content_type
    if req.user_agent is not None:
        headers["User-Agent"] = req.user_agent
    query = {"ok": {"site": key}, "other": {"site": env.other_key}, "junk": {"site": "pk_junk"},
             None: {}}[req.query_site]
    resp = env.client.post("/collect", data=raw, headers=headers, query_string=query)
    return resp, domain, env.take_spooled(), raw


def check(env: Env, req: Request) -> Any:
    """The property for one request; returns the response."""
    resp, domain, records, raw = post(env, req)
    status = resp.status_code
    assert status < 500, (status, resp.get_data(as_text=True))
    if status >= 300:
        assert 400 <= status < 500, status
        assert records == [], f"refused with {status} but {len(records)} records were spooled"
        err = resp.json["error"]
        env.stats[f"refused {err['code']}" + (f" ({err['field']})" if err.get("field") else "")] += 1
        return resp
    assert status == 202
    env.stats["accepted"] += 1
    items = orjson.loads(raw)
    items = items if isinstance(items, list) else [items]
    assert resp.json["accepted"] == len(items) == len(records) and records
    assert [orjson.loads(r)["hash"] for r in records] == resp.json["hashes"]
    stored = [decode_stored(r) for r in records]  # what both workers run: must not refuse
    ua = resp.request.headers.get("User-Agent") or None
    for sent, rec, s in zip(items, records, stored, strict=True):
        full = event_from_json(rec)  # the full re-validation agrees too
        assert (full.hash, full.url, full.ts, full.value) == (s.hash, s.url, s.ts, s.value)
        assert s.domain == domain
        # stored as the site's URL rule keeps them (the default: core/urls.py, ADR 30)
        assert s.url == DEFAULT.page(sent["url"])
        assert s.type == sent.get("type", "pageview")
        assert s.referrer == DEFAULT.referrer(sent.get("referrer") or None, s.url)
        if sent.get("value") is None:
            assert s.value is None
        else:
            assert s.value == Decimal(str(sent["value"]))
        if sent.get("ts") is not None:
            assert abs(s.ts - sent_time(sent["ts"])) < timedelta(milliseconds=1)
            assert s.ts.microsecond % 1000 == 0
        assert s.user_agent == (ua[:512] if ua else None)
        browser, os_name, device = classify_user_agent(ua[:512]) if ua else (None, None, None)
        assert (s.browser, s.os, s.device) == ((browser or None) and browser[:64], (os_name or None) and os_name[:64],
                                               (device or None) and device[:32])
        if browser and len(browser) > 64:
            env.stats["browser family cut"] += 1
    store_and_compare(env, domain, stored)
    return resp


def sent_time(value: Any) -> datetime:
    if isinstance(value, (int, float)):
        return EPOCH + timedelta(milliseconds=value)
    return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))


def store_and_compare(env: Env, domain: str, stored: list) -> None:
    """Both real sinks store the batch (as the consumer loop hands it over); the rows must be the events."""
    batch = Batch(topic=env.topic, topic_id="", events=list(stored),
                  first_offsets={0: env.offset}, next_offsets={0: env.offset + len(stored)})
    env.offset += len(stored)
    env.rollup.write(batch)
    env.loader.write(batch)
    env.stats["stored batches"] += 1
    by_hash = {}
    for s in stored:
        by_hash.setdefault(s.hash, s)  # a resend in the same batch (same hash) is the same event

    rows = env.ch.query(
        "SELECT toString(hash), url, type, value, toUnixTimestamp64Milli(ts), referrer, browser, os, device,"
        f" user_agent, domain FROM {env.db}.events FINAL WHERE domain = {{d:String}}",
        parameters={"d": domain}).result_rows
    assert len(rows) == len(by_hash), (len(rows), len(by_hash))
    for h, url, typ, value, ts_ms, referrer, browser, os_name, device, ua, dom in rows:
        s = by_hash[h]
        assert (url, typ, referrer, browser, os_name, device, ua, dom) == \
            (s.url, s.type, s.referrer, s.browser, s.os, s.device, s.user_agent, s.domain)
        assert (value is None and s.value is None) or value == s.value, (value, s.value)
        assert ts_ms == (s.ts - EPOCH) // timedelta(milliseconds=1)

    with psycopg.connect(env.settings.pg_dsn) as conn:
        seen = dict(conn.execute("SELECT replace(hash::text, '-', ''), ts FROM seen_events"
                                 " WHERE hash = ANY(%s::uuid[])",
                                 (list(by_hash),)).fetchall())
        rollups = {(t, b): (int(n), int(v), s) for t, b, n, v, s in conn.execute(
            "SELECT event_type, bucket_start, events, valued, value_sum FROM rollup_15m WHERE domain = %s",
            (domain,)).fetchall()}
    assert seen == {h: s.ts for h, s in by_hash.items()}
    expected: dict = defaultdict(lambda: [0, 0, None])
    for s in by_hash.values():
        quarter = s.ts.replace(minute=s.ts.minute - s.ts.minute % 15, second=0, microsecond=0)
        cell = expected[(s.type, quarter)]
        cell[0] += 1
        if s.value is not None:
            cell[1] += 1
            cell[2] = (cell[2] or Decimal(0)) + s.value
    assert rollups == {k: tuple(v) for k, v in expected.items()}


# A retry inside one batch (same id and content, other spellings: one event) and the same id with another
# value (another event).
_TS = NOW - timedelta(minutes=3)
RESEND_BATCH = (good(id='"r-1"', ts=js(_TS.isoformat()), value="1.5"),
                good(id='"r-1"', ts=js(_TS.astimezone(timezone(timedelta(hours=5, minutes=45))).isoformat()),
                     value='"1.500"'),
                good(id='"r-1"', ts=js(_TS.isoformat()), value="2"))

# Explicit examples: the cases the issue names.
UNICODE_VALUES = ["١٢٣", "１", "1_000", " 1"]


@PROFILE
@given(req=requests())
@example(req=Request(good(value=js("١٢٣"))))
@example(req=Request(good(value=js("１"))))
@example(req=Request(good(value=js("1_000"))))
@example(req=Request(good(value=js(" 1"))))
@example(req=Request(good(value="1.5"), user_agent=LONG_FAMILY_UA))
@example(req=Request(event(("domain", Dom()), ("url", UrlOn("https", "a")), ("url", UrlOn("https", "b")))))
@example(req=Request((good(), event(("domain", Dom()), ("url", UrlOn("https", "x")), ("type", '"pageview"'),
                                    ("type", '"impression"'))), content_type="text/plain"))
@example(req=Request(good(), content_type="text/plain"))
@example(req=Request(good(domain='"127.0.0.1"')))
@example(req=Request(good(domain='"[::1]"')))
@example(req=Request(good(id=js("abc"), ts=js(NOW.isoformat()))))
@example(req=Request(RESEND_BATCH, content_type="text/plain"))
def test_acknowledged_means_stored_in_both_stores(env, req):
    check(env, req)


# --------------------------------------------------------------------------------------------------
# The named cases, one by one, with their exact verdicts.


@pytest.mark.parametrize("value", UNICODE_VALUES)
def test_unicode_and_python_only_digit_strings_are_refused(env, value):
    resp = check(env, Request(good(value=js(value))))
    assert resp.status_code == 400 and resp.json["error"]["field"] == "value"


def test_a_browser_family_over_64_characters_is_accepted_stored_and_cut(env):
    assert len(classify_user_agent(LONG_FAMILY_UA)[0]) == 120
    resp = check(env, Request(good(value="1.5"), user_agent=LONG_FAMILY_UA))  # check() compares both stores
    assert resp.status_code == 202
    (h,) = resp.json["hashes"]
    (row,) = env.ch.query(f"SELECT browser, os FROM {env.db}.events FINAL WHERE hash = {{h:String}}",
                          parameters={"h": h}).result_rows
    assert row == ("Z" * 64, "iOS")


@pytest.mark.parametrize("body", [
    event(("domain", Dom()), ("url", UrlOn("https", "a")), ("url", UrlOn("https", "b"))),
    event(("domain", Dom()), ("url", UrlOn("https", "a")), ("value", "1"), ("value", "1")),  # even the same value
    event(("domain", Dom()), ("url", UrlOn("https", "a")), ("type", '"pageview"'), ("type", '"pageview"'),
          escape_keys=True),  # spelled "\u0074ype"
    (good(), event(("domain", Dom()), ("domain", Dom()), ("url", UrlOn("https", "a")))),  # the second event
], ids=["url", "value-same", "escaped-type", "second-event-domain"])
def test_repeated_keys_are_refused_naming_the_event_and_field(env, body):
    resp = check(env, Request(body, content_type="text/plain"))
    assert resp.status_code == 400 and resp.json["error"]["code"] == "invalid_event"
    assert resp.json["error"]["index"] == (1 if isinstance(body, tuple) else 0)
    assert "more than once" in resp.json["error"]["problem"]


def test_a_resend_in_one_batch_is_one_event_and_a_changed_one_another(env):
    resp = check(env, Request(RESEND_BATCH, content_type="text/plain"))  # check() compares both stores
    assert resp.status_code == 202
    first, again, changed = resp.json["hashes"]
    assert first == again != changed


@pytest.mark.parametrize("domain", ["127.0.0.1", "[::1]", "::1", "10.0.0.1.", "0x7f.0.0.1", "example.123", "1.2.3.4"])
def test_ip_literal_domains_are_refused(env, domain):
    resp = check(env, Request(good(domain=js(domain))))
    assert resp.status_code == 400 and resp.json["error"]["field"] == "domain"


@pytest.mark.parametrize("domain", ["1.0x7f", "0x7f.0x0.0x0.0x1", "example.0X1F", "a.0x"])
def test_hex_ipv4_literal_domains_are_refused(env, domain):
    """The URL standard reads 0x-hex last labels as IPv4 numbers (Chromium: http://1.0x7f/ is 1.0.0.127):
    such a host can neither be registered nor be sent for."""
    try:
        site = sites.get(env.settings.pg_dsn, domain) or sites.add(env.settings.pg_dsn, domain)
    except sites.SiteError as exc:
        assert exc.code == "invalid_domain"
        return
    assert env.registry.refresh()
    resp = env.client.post("/collect", json={"domain": domain, "url": f"http://{domain}/"},
                           query_string={"site": site.site_key})
    env.take_spooled()
    assert resp.status_code == 400 and resp.json["error"]["field"] == "domain", (resp.status_code, resp.json)
