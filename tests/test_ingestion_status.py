"""Ingestion status through the real pipeline: refusals counted at the collector travel as count records
(spool -> tansu -> rollup worker -> PostgreSQL), once each, next to accepted events, bots and late events."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta

import psycopg

from collector.sealer import flush_refusals
from core.event import REFUSALS_MARK, decode_refusal_count
from spool.segments import read_record, sealed_segments, segment_records
from tests.conftest import registered
from tests.test_pipeline import pipeline  # noqa: F401 - the fixture


def status(pipeline, domain):  # noqa: F811
    resp = pipeline.api.get(f"/api/v1/domains/{domain}/status", headers=pipeline.api_headers)
    assert resp.status_code == 200, resp.json
    return resp.json


def test_status_counts_accepted_bots_late_and_refusals_by_reason_once(pipeline, domain):  # noqa: F811
    now = datetime.now(UTC)
    ev = {"domain": domain, "url": f"https://{domain}/", "type": "pageview"}
    pipeline.post([ev] * 3)
    pipeline.post(ev, **{"User-Agent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"})
    pipeline.post({**ev, "ts": (now - timedelta(hours=2)).isoformat()})  # arrives long after its quarter hour
    collector = pipeline.collector
    key = pipeline.site_query(ev)["site"]
    bad = collector.post("/collect", json={**ev, "type": "click"}, query_string={"site": key})
    assert bad.status_code == 400
    # A made-up key naming the domain (2 -> 2,002 refusals on its status in four requests, before issue 15):
    # not the domain's refusal, it is counted globally (the metrics' `unknown` site) and never spooled.
    for made_up in ([ev, ev], [ev] * 500, [ev] * 500, {"site": "pk_made_up_in_the_event_000", **ev}):
        unknown = collector.post("/collect", json=made_up, query_string={"site": "pk_not_a_registered_key_00"})
        assert unknown.status_code == 401
    assert collector.post("/collect", json=[ev] * 3).status_code == 401  # no key at all: globally too
    stranger = collector.post("/collect", json={**ev, "domain": "never-registered.example"},
                              query_string={"site": key})
    assert stranger.status_code == 403  # the key's site's refusal: its key, another domain

    assert flush_refusals(collector.application) == 2  # (domain, invalid_event), (domain, site_mismatch)
    pipeline.spool.close()
    (segment,) = sealed_segments(pipeline.settings.spool_dir)
    counts = [decode_refusal_count(read_record(line)) for line in segment_records(segment.read_bytes())
              if REFUSALS_MARK in line]
    assert {(c.domain, c.reason, c.count) for c in counts} == {
        (domain, "invalid_event", 1), (domain, "site_mismatch", 1)}
    backup = segment.with_suffix(".bak")
    shutil.copy(segment, backup)
    assert pipeline.shipper.ship_once() == 7  # 5 events + 2 count records
    backup.rename(segment)  # shipped twice, as after a shipper crash: every record counted once anyway
    assert pipeline.shipper.ship_once() == 7
    pipeline.drain()

    body = status(pipeline, domain)
    for period in ("1h", "24h"):
        p = body["periods"][period]
        assert p["accepted"] == 5 and p["bots"] == 1 and p["late"] == 1
        assert p["refused"] == {"invalid_event": 1, "site_mismatch": 1}
        assert p["refused_total"] == 2
    assert datetime.fromisoformat(body["last_event_at"]) >= now - timedelta(minutes=1)
    assert pipeline.loader.stored_rejects == 0 and pipeline.rollups.stored_rejects == 0  # counts are not events
    # ClickHouse holds the 5 events and no count record
    assert pipeline.sql(f"SELECT count() FROM tally.events WHERE domain = '{domain}'") == [[5]]
    with psycopg.connect(pipeline.settings.pg_dsn) as conn:
        (n,) = conn.execute("SELECT count(*) FROM collector_refusals WHERE domain = 'never-registered.example'"
                            ).fetchone()
    assert n == 0


def test_status_of_a_quiet_domain_and_refusals(pipeline, domain):  # noqa: F811
    unknown = pipeline.api.get(f"/api/v1/domains/{domain}/status", headers=pipeline.api_headers)
    assert unknown.status_code == 404 and unknown.json["error"]["code"] == "unknown_domain"  # ADR 48
    registered(pipeline.settings.pg_dsn, domain)
    body = status(pipeline, domain)
    assert body["periods"]["1h"] == {"since": body["periods"]["1h"]["since"], "accepted": 0, "refused": {},
                                     "refused_total": 0, "refused_values": {}, "bots": 0, "late": 0}
    assert body["origins"] == []  # registered, no origin yet
    assert body["last_event_at"] is None
    assert set(body["freshness"]) == {"customer_store_written_at", "analyst_store_written_at"}


def test_a_customer_token_gets_no_store_write_times(pipeline, domain, monkeypatch):  # noqa: F811
    """They are every site's: with few sites, one customer would learn when another's site has traffic."""
    import dataclasses

    import api.customers
    from tests.test_analyst_server import make_token

    pipeline.post({"domain": domain, "url": f"https://{domain}/", "type": "pageview"})  # registers the site
    pipeline.ship()
    pipeline.drain()
    written = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    real = api.customers.ingestion_status
    monkeypatch.setattr(api.customers, "ingestion_status", lambda *a: dataclasses.replace(
        real(*a), customer_store_written_at=written))
    analyst = pipeline.api.application.extensions["tally_backends"].analyst
    monkeypatch.setattr(analyst, "loader_written_at", lambda: "2026-01-02T03:04:06+00:00")
    admin = status(pipeline, domain)
    assert admin["freshness"] == {"customer_store_written_at": written.isoformat(),
                                  "analyst_store_written_at": "2026-01-02T03:04:06+00:00"}
    token = make_token(pipeline.settings.pg_dsn, "customer", (domain,))
    resp = pipeline.api.get(f"/api/v1/domains/{domain}/status", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.data
    assert resp.json["freshness"] == {"customer_store_written_at": None, "analyst_store_written_at": None}
    assert resp.json["last_event_at"] == admin["last_event_at"] is not None  # their own site's facts stay


def test_a_spool_that_refuses_the_counts_keeps_them_for_the_next_flush(pipeline, domain, monkeypatch):  # noqa: F811
    from spool.segments import SpoolFull

    ev = {"domain": domain, "url": f"https://{domain}/", "type": "pageview"}
    pipeline.post(ev)  # registers the site
    key = pipeline.site_query(ev)["site"]
    assert pipeline.collector.post("/collect", json={**ev, "type": "x"}, query_string={"site": key}).status_code == 400
    app = pipeline.collector.application

    def full(_lines):
        raise SpoolFull(28, "spool disk is full")

    monkeypatch.setattr(app.extensions["tally_spool"], "append", full)
    try:
        flush_refusals(app)
    except SpoolFull:
        pass
    else:
        raise AssertionError("the spool's refusal must reach the caller")
    monkeypatch.undo()
    assert app.extensions["tally_refusals"].snapshot() == {(domain, "invalid_event"): 1}
    assert flush_refusals(app) == 1


def test_refusals_of_reasons_no_keyed_request_has_are_not_a_sites(pipeline, domain):  # noqa: F811
    """Rows counted before issue 15 item 8 (a made-up key could put `unknown_site_key` on any domain) are
    not shown on the domain's status; a keyed refusal of the same quarter hour is."""
    now = datetime.now(UTC)
    quarter = datetime.fromtimestamp(int(now.timestamp()) // 900 * 900, tz=UTC)
    with psycopg.connect(pipeline.settings.pg_dsn, autocommit=True) as conn:
        for reason, n in (("unknown_site_key", 2000), ("missing_site_key", 5), ("registry_unavailable", 3),
                          ("rate_limited", 7)):
            conn.execute("INSERT INTO collector_refusals (domain, reason, bucket_start, events)"
                         " VALUES (%s, %s, %s, %s)", (domain, reason, quarter, n))
    pipeline.post({"domain": domain, "url": f"https://{domain}/", "type": "pageview"})  # registers the site
    body = status(pipeline, domain)
    assert body["periods"]["1h"]["refused"] == {"rate_limited": 7} and body["periods"]["1h"]["refused_total"] == 7


def test_one_sender_cannot_inflate_a_sites_refusals_on_its_status(pipeline, domain):  # noqa: F811
    """The review: `[0,0,...]` (2 bytes per item, within the 256 KiB body cap) sent with a site's public key
    showed "refused": {"batch_too_large": 120000} on the site's status after one request. Now a refusal of
    the whole request counts once, and one address's refusals count for a site up to its share of the
    site's limit per window (here 10 per 100 s window: rate 1/s, burst 100)."""
    from oltp import sites

    sites.add(pipeline.settings.pg_dsn, domain, rate_per_s=1, burst=100)
    ev = {"domain": domain, "url": f"https://{domain}/", "type": "pageview"}
    pipeline.post(ev)  # the collector's registry copy learns the site
    key = pipeline.site_query(ev)["site"]
    collector = pipeline.collector
    zeros = b"[" + b",".join([b"0"] * 120_000) + b"]"
    resp = collector.post(f"/collect?site={key}", data=zeros, content_type="text/plain")
    assert resp.status_code == 413 and resp.json["error"]["code"] == "batch_too_large"
    for _ in range(5):  # 2,500 invalid events from one address
        resp = collector.post("/collect", json=[{**ev, "type": "click"}] * 500, query_string={"site": key})
        assert resp.status_code == 400
    assert flush_refusals(collector.application) == 2
    assert pipeline.ship() == 3  # the event and two count records
    pipeline.drain()
    refused = status(pipeline, domain)["periods"]["1h"]["refused"]
    assert refused["batch_too_large"] == 1
    # the address's 10, whatever the reasons (11 if the 100 s window turned meanwhile)
    assert 10 <= refused["batch_too_large"] + refused["invalid_event"] <= 11, refused


def test_a_sites_refusals_name_the_offending_domain_or_origin(pipeline, domain):  # noqa: F811
    """Issue 17 item 5: what the owner fixes in the tag, by reason (the most recent value of each): the domain
    an event named with the site's key (another host, an IP literal: the tag needs data-domain) and the page
    origin not registered. The answers are unchanged; a request without the site's key leaves no value."""
    from oltp import sites

    sites.add(pipeline.settings.pg_dsn, domain, origins=["https://" + domain])
    ev = {"domain": domain, "url": f"https://{domain}/", "type": "pageview"}
    pipeline.post(ev)  # the collector's registry copy learns the site
    key = pipeline.site_query(ev)["site"]
    collector, q = pipeline.collector, {"site": key}
    app = collector.application

    def code(resp):
        return resp.status_code, resp.json["error"]["code"]

    assert code(collector.post("/collect", json={**ev, "domain": "localhost"}, query_string=q)) \
        == (403, "site_mismatch")
    assert code(collector.post("/collect", json={**ev, "domain": "staging." + domain}, query_string=q)) \
        == (403, "site_mismatch")
    long_origin = "http://" + ".".join(["a" * 60] * 4) + ".example"  # a valid origin of 258 characters
    assert code(collector.post("/collect", json=ev, query_string=q, headers={"Origin": long_origin})) \
        == (403, "origin_not_allowed")
    assert len(app.extensions["tally_refusals"].values()[(domain, "origin_not_allowed")]) == 200  # cut
    assert code(collector.post("/collect", json=ev, query_string=q, headers={"Origin": "http://127.0.0.1:8000"})) \
        == (403, "origin_not_allowed")
    assert code(collector.post("/collect", json={**ev, "domain": "127.0.0.1"}, query_string=q)) \
        == (400, "invalid_event")
    assert code(collector.post("/collect", json={**ev, "type": "click"}, query_string=q)) == (400, "invalid_event")
    # strangers: a made-up key, no key; with the site's domain and an unregistered origin
    for query in ({"site": "pk_not_a_registered_key_00"}, {}):
        resp = collector.post("/collect", json={**ev, "domain": "evil.example"}, query_string=query,
                              headers={"Origin": "https://evil.example"})
        assert resp.status_code == 401
    assert flush_refusals(app) == 3
    pipeline.ship()
    pipeline.drain()

    body = status(pipeline, domain)
    assert body["origins"] == ["https://" + domain]
    for period in ("1h", "24h"):
        p = body["periods"][period]
        assert p["refused"] == {"invalid_event": 2, "origin_not_allowed": 2, "site_mismatch": 2}
        assert p["refused_values"] == {"invalid_event": "127.0.0.1", "origin_not_allowed": "http://127.0.0.1:8000",
                                       "site_mismatch": "staging." + domain}
    with psycopg.connect(pipeline.settings.pg_dsn) as conn:
        rows = conn.execute("SELECT domain, value FROM collector_refusals WHERE value LIKE '%%evil%%'").fetchall()
    assert rows == []


def test_a_senders_share_bounds_the_values_too(pipeline, domain):  # noqa: F811
    """A value is kept only with a count the site took: past one address's share of the site's limit, a
    stranger holding the public key changes neither the counts nor the value shown."""
    from oltp import sites

    sites.add(pipeline.settings.pg_dsn, domain, rate_per_s=1, burst=100)  # 10 countable per address window
    ev = {"domain": domain, "url": f"https://{domain}/", "type": "pageview"}
    pipeline.post(ev)
    key = pipeline.site_query(ev)["site"]
    collector = pipeline.collector
    for i in range(11):
        resp = collector.post("/collect", json=[{**ev, "domain": f"m{i}.example"}], query_string={"site": key})
        assert resp.status_code == 403
    counter = collector.application.extensions["tally_refusals"]
    assert counter.snapshot()[(domain, "site_mismatch")] <= 11
    noted = counter.values()[(domain, "site_mismatch")]
    for i in range(50):  # over the share now: neither counted nor noted
        collector.post("/collect", json=[{**ev, "domain": f"flood{i}.example"}], query_string={"site": key})
    assert counter.values()[(domain, "site_mismatch")] == noted and noted.startswith("m")
    assert counter.snapshot()[(domain, "site_mismatch")] <= 11


def test_old_count_records_decode_without_a_value():
    """Records spooled before issue 17 (no `value`) still decode; a value is cut to 200 characters."""
    from core.event import refusal_count_json

    t = datetime(2026, 12, 1, tzinfo=UTC)
    old = (b'{"v":1,"kind":"refusals","hash":"0123456789abcdef0123456789abcdef","domain":"a.example",'
           b'"reason":"site_mismatch","count":3,"window_end":"2026-12-01T00:00:00Z"}')
    assert decode_refusal_count(old).value is None
    assert b'"value"' not in refusal_count_json("a.example", "rate_limited", 1, t)
    assert decode_refusal_count(refusal_count_json("a.example", "site_mismatch", 1, t, "x" * 500)).value == "x" * 200


def test_offending_values_are_printable_and_cut():
    from collector.admission import offending, offending_domain, offending_origin

    assert offending("a\x00b\nc") == "a?b?c"
    assert offending("é" * 300) == "é" * 200
    assert offending(12) == "12"
    # what a stranger holding the public site key sends cannot become free text on the owner's panel
    for sent, shown in (("127.0.0.1", "127.0.0.1"), ("[::1]:8000", "[::1]:8000"), ("Staging_1.Example.com",
                        "Staging_1.Example.com"), ("Visit https://evil.example now", "(not a host name)"),
                        ("bob.test\n", "(not a host name)"), ("", "(not a host name)"), (12, "(not a host name)")):
        assert offending_domain(sent) == shown, sent
    for sent, shown in (("http://localhost:8000", "http://localhost:8000"), ("https://a.example:443", "https://a.example"),
                        ("null", "null"), ("IMPORTANT: tally support - log in at https://x.example", "(not an origin)"),
                        ("garbage", "(not an origin)"), (None, "(not an origin)"),
                        ("http://[v1.IMPORTANT:log in at tally-support.example now]", "(not an origin)"),  # IPvFuture
                        ("http://[::1]:8000", "http://[::1]:8000")):
        assert offending_origin(sent) == shown, sent


def test_a_stranger_cannot_write_text_into_a_sites_refused_values(pipeline, domain):  # noqa: F811
    from oltp import sites

    sites.add(pipeline.settings.pg_dsn, domain, origins=["https://" + domain])
    ev = {"domain": domain, "url": f"https://{domain}/", "type": "pageview"}
    pipeline.post(ev)
    key = pipeline.site_query(ev)["site"]
    collector = pipeline.collector
    phishing = "IMPORTANT: your site key leaked, log in at https://tally-support.example"
    assert collector.post("/collect", json=ev, query_string={"site": key},
                          headers={"Origin": phishing}).status_code == 403
    assert collector.post("/collect", json={**ev, "domain": "Visit https://evil.example now"},
                          query_string={"site": key}).status_code == 400
    values = collector.application.extensions["tally_refusals"].values()
    assert values[(domain, "origin_not_allowed")] == "(not an origin)"
    assert values[(domain, "invalid_event")] == "(not a host name)"


def test_a_capped_site_sees_which_dimension_hit_the_cap_and_what_went_to_other(pipeline, domain):  # noqa: F811
    """ADR 46: with 2 pages admitted per day, the third and fourth distinct pages are counted as '(other)'; the
    status names the dimension, the day and the events folded (none for a dimension under the cap)."""
    pipeline.rollups.sink.cap = 2  # TALLY_DIMENSION_CAP=2 for this worker
    now = datetime.now(UTC)
    pipeline.post([{"domain": domain, "url": f"https://{domain}{p}", "type": "pageview"}
                   for p in ["/a", "/a", "/b", "/b", "/c", "/d", "/d"]])
    pipeline.ship()
    pipeline.drain()
    capped = status(pipeline, domain)["capped"]
    assert [(c["dimension"], c["other_events"]) for c in capped] == [("page", 3)]
    day = datetime.fromisoformat(capped[0]["day_start"])
    assert now - timedelta(days=1) < day <= now
