"""Ingestion status through the real pipeline: refusals counted at the collector travel as count records
(spool -> tansu -> rollup worker -> PostgreSQL), once each, next to accepted events, bots and late events."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta

import psycopg

from collector.sealer import flush_refusals
from core.event import REFUSALS_MARK, decode_refusal_count
from spool.segments import read_record, sealed_segments, segment_records
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
    body = status(pipeline, domain)
    assert body["periods"]["1h"] == {"since": body["periods"]["1h"]["since"], "accepted": 0, "refused": {},
                                     "refused_total": 0, "bots": 0, "late": 0}
    assert body["last_event_at"] is None
    assert set(body["freshness"]) == {"customer_store_written_at", "analyst_store_written_at"}
    bad = pipeline.api.get(f"/api/v1/domains/{domain}/status?last=1h", headers=pipeline.api_headers)
    assert bad.status_code == 400 and bad.json["error"]["code"] == "unknown_parameter"
    assert pipeline.api.get(f"/api/v1/domains/{domain}/status").status_code == 401


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
