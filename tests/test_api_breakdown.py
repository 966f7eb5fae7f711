"""Breakdowns, filters, percentiles, visitors and unknown domains in the customers' API (issue 17 §3, ADR 48).

Rows are put straight into the dimension tables (migration 0010) as the rollup sink writes them: each event in
its 15-minute, hourly and daily row of every dimension, in the cube and in the value bins (`put_events`, a
small reference of the sink); visitors through oltp.visitors.add_visitors, the sink's own call. So whichever
tiers a range is read from, the answer must be the events inside it. Against the session's PostgreSQL, with
Flask's test client (no server, no broker).
"""

from __future__ import annotations

import csv
import random
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from oltp import sites, tokens
from oltp.partitions import ensure_partitions
from oltp.percentiles import GAMMA, ZERO_BIN, bin_of, bin_value, parse_percentiles, quantiles
from oltp.queries import DailyZone
from oltp.spans import spans
from tally.roots import build_api
from tests import test_stats

pytestmark = pytest.mark.servers("postgres")  # nothing here asks the broker, ClickHouse or the analyst server
live = test_stats.live  # the fixture: a real API server in a thread
DIMS = ("page", "source", "country", "device", "browser", "os")
DAY = timedelta(days=1)


@pytest.fixture()
def api(make_settings, servers):
    app = build_api(make_settings())
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "admin", name="test_api_breakdown")
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    yield client
    app.extensions["tally_backends"].rollups.pool.close()


@pytest.fixture()
def site(servers, domain) -> str:
    sites.add(servers.pg_dsn, domain)  # UTC: local days are UTC days
    return domain


def floor(t: datetime, seconds: int) -> datetime:
    ts = int(t.timestamp())
    return datetime.fromtimestamp(ts - ts % seconds, UTC)


def put_events(dsn: str, domain: str, events: list[dict]) -> None:
    """Each event {ts, type, value?, visitor?, page, source, ...} into every table as the sink writes it (UTC site)."""
    from oltp.visitors import add_visitors

    with psycopg.connect(dsn, autocommit=True) as conn:
        lo, hi = min(e["ts"] for e in events) - DAY, max(e["ts"] for e in events) + DAY
        for table in ("rollup_dim_15m", "rollup_dim_1h", "rollup_dim_1d", "rollup_cube_1h", "rollup_cube_1d",
                      "value_bins_15m", "value_bins_1h", "value_bins_1d", "rollup_15m", "rollup_1h", "rollup_1d"):
            ensure_partitions(conn, table, lo, hi)
        groups = []
        for e in events:
            _put_one(conn, domain, e)
            if e.get("visitor"):
                day = floor(e["ts"], 86400)
                groups += [("1h", domain, "", floor(e["ts"], 3600), "", "", [e["visitor"]]),
                           ("1d", domain, "UTC", day, "", "", [e["visitor"]])]
                groups += [("1d", domain, "UTC", day, d, e.get(d, ""), [e["visitor"]]) for d in DIMS]
        if groups:
            with conn.cursor() as cur:
                add_visitors(cur, groups)


def _put_one(conn: psycopg.Connection, domain: str, e: dict) -> None:
    value = e.get("value")
    valued = 0 if value is None else 1
    upd = ("ON CONFLICT ({pk}) DO UPDATE SET events = r.events + 1, valued = r.valued + EXCLUDED.valued, "
           "value_sum = coalesce(r.value_sum, 0) + coalesce(EXCLUDED.value_sum, 0)")
    for tier, step in (("15m", 900), ("1h", 3600), ("1d", 86400)):
        start = floor(e["ts"], step)
        tzc, tzv = (", tz", ", 'UTC'") if tier == "1d" else ("", "")
        base = (domain, e["type"], start)
        conn.execute(f"INSERT INTO rollup_{tier} AS r (domain{tzc}, event_type, bucket_start, events, valued, "
                     f"value_sum) VALUES (%s{tzv}, %s, %s, 1, %s, %s) "
                     + upd.format(pk=f"domain{tzc}, event_type, bucket_start"), (*base, valued, value))
        for d in DIMS:
            conn.execute(f"INSERT INTO rollup_dim_{tier} AS r (domain{tzc}, event_type, bucket_start, dimension, key, "
                         f"events, valued, value_sum) VALUES (%s{tzv}, %s, %s, %s, %s, 1, %s, %s) "
                         + upd.format(pk=f"domain{tzc}, dimension, bucket_start, event_type, key"),
                         (*base, d, e.get(d, ""), valued, value))
        if tier != "15m":
            cols = ", ".join(DIMS)
            conn.execute(f"INSERT INTO rollup_cube_{tier} AS r (domain{tzc}, event_type, bucket_start, {cols}, "
                         f"events, valued, value_sum) VALUES (%s{tzv}, %s, %s, {', '.join(['%s'] * 6)}, 1, %s, %s) "
                         + upd.format(pk=f"domain{tzc}, bucket_start, event_type, {cols}"),
                         (*base, *(e.get(d, "") for d in DIMS), valued, value))
        if value is not None:
            pk = f"domain{tzc}, event_type, bucket_start, bin"
            conn.execute(f"INSERT INTO value_bins_{tier} AS r (domain{tzc}, event_type, bucket_start, bin, count) "
                         f"VALUES (%s{tzv}, %s, %s, %s, 1) ON CONFLICT ({pk}) DO UPDATE SET count = r.count + 1",
                         (*base, bin_of(float(value))))


def ev(ts: datetime, page: str = "/a", type_: str = "pageview", **kw) -> dict:
    return {"ts": ts, "type": type_, "page": page, **kw}


def get(api, domain, path, **params):
    return api.get(f"/api/v1/domains/{domain}/{path}", query_string=params)


# ---------------------------------------------------------------- percentiles and spans (no store)

def test_percentiles_follow_the_ddsketch_rank_rule_within_one_percent():
    rng = random.Random(7)
    values = [rng.lognormvariate(2, 1.5) for _ in range(2000)] + [0.0] * 30
    counts: dict[int, int] = {}
    for v in values:
        counts[bin_of(v)] = counts.get(bin_of(v), 0) + 1
    ordered = sorted(values)
    found = quantiles(counts, (1, 50, 90, 95, 99, 99.9))
    for p in (1, 50, 90, 95, 99, 99.9):
        exact = ordered[int(p / 100 * (len(ordered) - 1))]
        est = found[f"p{p:g}"]
        assert est is not None and abs(est - exact) <= 0.01 * exact + 1e-9, (p, est, exact)
    assert quantiles({bin_of(v): 1 for v in (1, 2, 3, 4, 100)}, (50,))["p50"] == pytest.approx(3, rel=0.01)
    assert quantiles({}, (50, 99)) == {"p50": None, "p99": None}
    assert bin_value(ZERO_BIN) == 0 and bin_value(0) == pytest.approx(2 / (GAMMA + 1))
    assert parse_percentiles("50,95,99.9") == (50.0, 95.0, 99.9)
    for bad in ("0", "100", "abc", ",".join(str(i) for i in range(1, 12)), "nan"):
        with pytest.raises(ValueError):
            parse_percentiles(bad)


def _counting_float(monkeypatch) -> list[str]:
    """Count oltp.percentiles' conversions of a part to a number (a module global shadows the builtin)."""
    from oltp import percentiles

    calls: list[str] = []

    def counting(text: str) -> float:
        calls.append(text)
        return float(text)

    monkeypatch.setattr(percentiles, "float", counting, raising=False)
    return calls


def test_too_many_percentiles_are_refused_before_any_is_parsed(monkeypatch):
    """Attack review: 38,000 values took 7.9 s of CPU (each parsed, then `not in` a list) before the count was
    checked. The count is now checked on the raw parts, repeats included, before any is converted."""
    from oltp.percentiles import MAX_PERCENTILES, PercentileError

    calls = _counting_float(monkeypatch)
    for text in (",".join(f"{i / 1000:g}" for i in range(1, 100_001)),  # 100,000 values, ~600 KB
                 ",".join(["50"] * (MAX_PERCENTILES + 1)),  # 11 repeats of one: 11 given, refused too
                 ",".join(str(i) for i in range(1, MAX_PERCENTILES + 2)) + ",abc"):
        with pytest.raises(PercentileError, match=f"^at most {MAX_PERCENTILES} percentiles$"):
            parse_percentiles(text)
    assert calls == []
    ten = ",".join(str(i) for i in range(1, MAX_PERCENTILES + 1))
    assert parse_percentiles(ten) == tuple(float(i) for i in range(1, MAX_PERCENTILES + 1))
    assert parse_percentiles(" 99,50, 99.0,5e1,1e1") == (99.0, 50.0, 10.0)  # repeats dropped, first order kept
    assert len(calls) == MAX_PERCENTILES + 5


def test_a_range_is_cut_into_the_coarsest_pieces_that_cover_it_exactly():
    lo, hi = datetime(2026, 11, 2, 10, 15, tzinfo=UTC), datetime(2026, 11, 5, 3, 45, tzinfo=UTC)
    found = spans(lo, hi, DailyZone("UTC", "UTC", datetime(1970, 1, 1, tzinfo=UTC)))
    assert [(s.tier, s.lo.isoformat()[5:16], s.hi.isoformat()[5:16]) for s in found] == [
        ("15m", "11-02T10:15", "11-02T11:00"), ("1h", "11-02T11:00", "11-03T00:00"),
        ("1d", "11-03T00:00", "11-05T00:00"), ("1h", "11-05T00:00", "11-05T03:00"),
        ("15m", "11-05T03:00", "11-05T03:45")]
    cube = spans(lo, hi, DailyZone("UTC", "UTC", datetime(1970, 1, 1, tzinfo=UTC)), hourly_only=True)
    assert cube[0].lo == datetime(2026, 11, 2, 10, tzinfo=UTC) and cube[-1].hi == datetime(2026, 11, 5, 4, tzinfo=UTC)
    assert {s.tier for s in cube} == {"1h", "1d"}
    # Kathmandu's days start at hh:15 UTC: kept for the counts, not for the hourly-only cube
    ktm = DailyZone("Asia/Kathmandu", "Asia/Kathmandu", datetime(1970, 1, 1, tzinfo=UTC))
    assert "1d" in {s.tier for s in spans(lo, hi, ktm)}
    assert "1d" not in {s.tier for s in spans(lo, hi, ktm, hourly_only=True)}


# ---------------------------------------------------------------- breakdowns

def test_breakdown_counts_only_the_range_from_every_tier_sorted_with_share(api, servers, site):
    day0 = floor(datetime.now(UTC), 86400) - 5 * DAY
    lo, hi = day0 + timedelta(hours=10, minutes=15), day0 + 2 * DAY + timedelta(hours=3, minutes=45)
    inside = [day0 + timedelta(hours=10, minutes=20), day0 + timedelta(hours=15), day0 + DAY + timedelta(hours=12),
              day0 + 2 * DAY + timedelta(hours=1), day0 + 2 * DAY + timedelta(hours=3, minutes=40)]
    outside = [day0 + timedelta(hours=10, minutes=10), day0 + 2 * DAY + timedelta(hours=3, minutes=50)]
    events = ([ev(t, "/a") for t in inside] + [ev(t, "/b") for t in inside[:3]] + [ev(t, "/c") for t in outside * 5]
              + [ev(inside[2], "/a", "impression")])
    put_events(servers.pg_dsn, site, events)
    resp = get(api, site, "breakdown", dimension="page", metric="pageviews", **{"from": lo.isoformat(),
                                                                               "to": hi.isoformat()})
    assert resp.status_code == 200, resp.json
    body = resp.json
    assert body["tier"] == "1d+1h+15m" and body["total"] == 8
    assert [(r["key"], r["count"], r["share"]) for r in body["rows"]] == [("/a", 5, 0.625), ("/b", 3, 0.375)]
    assert (body["from"], body["to"]) == (lo.isoformat(), hi.isoformat())
    page2 = get(api, site, "breakdown", dimension="page", limit="1", offset="1",
                **{"from": lo.isoformat(), "to": hi.isoformat()}).json
    assert [r["key"] for r in page2["rows"]] == ["/b"] and page2["total"] == 8
    past = get(api, site, "breakdown", dimension="page", offset="5", **{"from": lo.isoformat(), "to": hi.isoformat()})
    assert past.json["rows"] == [] and past.json["total"] == 8
    both = get(api, site, "breakdown", dimension="page", metric="impressions",
               **{"from": lo.isoformat(), "to": hi.isoformat()}).json
    assert [(r["key"], r["count"]) for r in both["rows"]] == [("/a", 1)]


def test_breakdown_of_the_last_hour_names_countries_and_none_and_answers_csv(api, servers, site):
    now = datetime.now(UTC)
    put_events(servers.pg_dsn, site, [ev(now, country="US", device="desktop", source="Hacker News")] * 5
               + [ev(now, country="US", device="mobile", source="")] * 3 + [ev(now, country="", device="mobile")])
    country = get(api, site, "breakdown", dimension="country", last="1h").json  # the quarter holding now is in
    assert [(r["key"], r["count"], r.get("name")) for r in country["rows"]] == [
        ("US", 8, "United States"), ("(none)", 1, None)]
    source = get(api, site, "breakdown", dimension="source", last="1h").json["rows"]
    assert (source[0]["key"], source[0]["count"]) == ("Hacker News", 5)
    assert source[1] == {"key": "(none)", "count": 4, "share": round(4 / 9, 4), "value_sum": "0.000000"}
    device = get(api, site, "breakdown", dimension="device", last="1h", format="csv")
    assert device.status_code == 200 and device.mimetype == "text/csv"
    assert list(csv.reader(device.get_data(as_text=True).splitlines())) == [
        ["key", "count", "share", "value_sum"], ["desktop", "5", "0.5556", "0.000000"],
        ["mobile", "4", "0.4444", "0.000000"]]


def test_breakdown_filters_read_the_dimension_or_the_cube_tables(api, servers, site):
    t = floor(datetime.now(UTC), 86400) - 3 * DAY + timedelta(hours=5, minutes=20)
    put_events(servers.pg_dsn, site, [ev(t, "/a", country="DE", device="mobile", value="2")] * 4
               + [ev(t, "/a", country="US", device="desktop", value="1")] * 2
               + [ev(t, "/b", country="DE", device="desktop")] * 3)
    rng = {"from": (t - timedelta(minutes=5)).isoformat(), "to": (t + timedelta(minutes=10)).isoformat()}
    same = get(api, site, "breakdown", dimension="page", filter="page:/a", **rng).json
    assert [(r["key"], r["count"]) for r in same["rows"]] == [("/a", 6)] and same["tier"] == "15m"
    other = get(api, site, "breakdown", dimension="page", filter="country:DE", **rng).json
    assert [(r["key"], r["count"]) for r in other["rows"]] == [("/a", 4), ("/b", 3)]
    assert other["tier"] == "1h" and other["notes"] and other["filters"] == ["country:DE"]
    assert other["from"] == floor(t, 3600).isoformat()  # widened to the covering hour, and said
    two = api.get(f"/api/v1/domains/{site}/breakdown", query_string=[
        ("dimension", "page"), ("filter", "country:DE"), ("filter", "device:desktop"), *rng.items()]).json
    assert [(r["key"], r["count"]) for r in two["rows"]] == [("/b", 3)]
    comma = get(api, site, "breakdown", dimension="page", filter="country:DE,device:desktop", **rng).json
    assert comma["rows"] == two["rows"]
    value = get(api, site, "breakdown", dimension="country", metric="value", **rng).json
    assert [(r["key"], r["count"], r["value_sum"]) for r in value["rows"]] == [
        ("DE", 8.0, "8.000000"), ("US", 2.0, "2.000000")] and value["total"] == 10.0


@pytest.mark.parametrize("params, code", [
    ({}, "invalid_dimension"),
    ({"dimension": "city"}, "invalid_dimension"),
    ({"dimension": "page", "metric": "sessions"}, "invalid_metric"),
    ({"dimension": "page", "limit": "0"}, "invalid_limit"),
    ({"dimension": "page", "limit": "1001"}, "invalid_limit"),
    ({"dimension": "page", "offset": "-1"}, "invalid_offset"),
    ({"dimension": "page", "filter": "city:Paris"}, "invalid_filter"),
    ({"dimension": "page", "filter": "country"}, "invalid_filter"),
    ({"dimension": "page", "filter": "country:DE,country:US"}, "invalid_filter"),
    ({"dimension": "page", "last": "2d"}, "invalid_period"),
    ({"dimension": "page", "last": "1h", "from": "2026-01-01T00:00:00Z"}, "invalid_range"),
    ({"dimension": "page", "from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "invalid_range"),
    ({"dimension": "page", "format": "xml"}, "invalid_format"),
    ({"dimension": "page", "tz": "Mars/Olympus"}, "invalid_tz"),
    ({"dimension": "page", "limt": "5"}, "unknown_parameter"),
    ({"dimension": "page", "metric": "visitors", "filter": "country:DE"}, "invalid_filter"),
])
def test_bad_breakdown_parameters_are_named(api, site, params, code):
    resp = get(api, site, "breakdown", **params)
    assert resp.status_code == 400 and resp.json["error"]["code"] == code, resp.json


# ---------------------------------------------------------------- series and summary: filters, percentiles, visitors

def test_a_filtered_series_counts_the_matching_events(api, servers, site):
    t = floor(datetime.now(UTC), 86400) - 2 * DAY + timedelta(hours=7, minutes=5)
    put_events(servers.pg_dsn, site, [ev(t, "/a", country="DE")] * 5 + [ev(t, "/b", country="DE")] * 3
               + [ev(t, "/a", country="US")] * 2)
    rng = {"from": floor(t, 3600).isoformat(), "to": (floor(t, 3600) + timedelta(hours=1)).isoformat()}
    one = get(api, site, "pageviews", granularity="15m", filter="page:/a", **rng).json
    assert one["total"] == 7 and [b["count"] for b in one["buckets"]] == [7, 0, 0, 0]
    none = get(api, site, "pageviews", granularity="15m", filter="source:(none)", **rng).json
    assert none["total"] == 10
    two = get(api, site, "pageviews", granularity="1h", filter="page:/a,country:DE", **rng).json
    assert two["total"] == 5 and two["tier"] == "1h" and two["filters"] == ["page:/a", "country:DE"]
    refused = get(api, site, "pageviews", granularity="15m", filter="page:/a,country:DE", **rng)
    assert refused.status_code == 400 and "hourly and daily" in refused.json["error"]["message"]
    bad = get(api, site, "pageviews", filter="planet:mars", **rng)
    assert bad.status_code == 400 and bad.json["error"]["code"] == "invalid_filter"
    assert "planet" in bad.json["error"]["message"]


def test_summary_has_visitors_and_percentiles_and_series_per_bucket(api, servers, site):
    now = datetime.now(UTC)
    put_events(servers.pg_dsn, site, [ev(now, "/v", "impression", value=str(v), visitor=f"v{v}")
                                      for v in (1, 2, 3, 4, 100)] + [ev(now, "/v", visitor="v1")])
    body = get(api, site, "summary", last="1h", percentiles="50,95,99").json
    assert body["visitors"] == 5 and body["filters"] == [] and body["notes"] == []
    assert body["percentiles"]["p50"] == pytest.approx(3, abs=0.1)
    assert body["percentiles"]["p99"] == pytest.approx(4, rel=0.01)  # rank 0.99 * 4 = 3.96: the 4th value
    assert body["metrics"]["impressions"]["percentiles"]["p50"] == pytest.approx(3, abs=0.1)
    assert body["metrics"]["pageviews"]["percentiles"] == {"p50": None, "p95": None, "p99": None}
    plain = get(api, site, "summary", last="1h").json
    assert "percentiles" not in plain and plain["visitors"] == 5
    filtered = get(api, site, "summary", last="1h", percentiles="50", filter="page:/v").json
    assert filtered["percentiles"] == {"p50": None} and filtered["visitors"] == 5 and filtered["notes"]
    assert filtered["metrics"]["impressions"]["total"] == 5
    q = floor(now, 900)
    series = get(api, site, "impressions", percentiles="50", **{"from": (q - timedelta(minutes=15)).isoformat(),
                                                               "to": (q + timedelta(minutes=15)).isoformat()}).json
    assert [b["percentiles"]["p50"] for b in series["buckets"]][0] is None
    assert series["buckets"][1]["percentiles"]["p50"] == pytest.approx(3, abs=0.1)
    as_csv = get(api, site, "impressions", percentiles="50,99", format="csv",
                 **{"from": q.isoformat(), "to": (q + timedelta(minutes=15)).isoformat()})
    header, row = list(csv.reader(as_csv.get_data(as_text=True).splitlines()))
    assert header[-2:] == ["p50", "p99"] and float(row[-2]) == pytest.approx(3, abs=0.1)
    hour = floor(now, 3600)
    visitors = get(api, site, "visitors", granularity="1h", **{"from": (hour - timedelta(hours=1)).isoformat(),
                                                              "to": (hour + timedelta(hours=1)).isoformat()})
    assert visitors.status_code == 200, visitors.json
    assert [b["count"] for b in visitors.json["buckets"]] == [0, 5] and visitors.json["total"] == 5
    days = {"from": (floor(now, 86400) - DAY).isoformat(), "to": (floor(now, 86400) + DAY).isoformat()}
    for filters in ({}, {"filter": "page:/v"}):  # the daily sketches; under a filter, the value's
        daily = get(api, site, "visitors", granularity="1d", **filters, **days).json
        assert daily["tier"] == "1d" and [b["count"] for b in daily["buckets"]] == [0, 5] and daily["total"] == 5
    other = get(api, site, "visitors", granularity="1d", filter="page:/other", **days).json
    assert [b["count"] for b in other["buckets"]] == [0, 0] and other["total"] == 0
    # days of another zone (on whole UTC hours): each merged from its hours, the total from the same fetch
    berlin = get(api, site, "visitors", granularity="1d", tz="Europe/Berlin", **days).json
    assert berlin["tier"] == "1h" and sum(b["count"] for b in berlin["buckets"]) == 5 and berlin["total"] == 5
    quarter = get(api, site, "visitors", granularity="15m")
    assert quarter.status_code == 400 and "quarter hour" in quarter.json["error"]["message"]


def test_a_visitors_breakdown_ranks_keys_by_their_sketches(api, servers, site):
    t = floor(datetime.now(UTC), 86400) - 2 * DAY + timedelta(hours=9)
    events = ([ev(t, "/many", visitor=f"m{i}") for i in range(40)]  # 40 visitors, 40 views
              + [ev(t, "/loyal", visitor="l1") for _ in range(60)])  # 1 visitor, 60 views
    put_events(servers.pg_dsn, site, events)
    body = get(api, site, "breakdown", dimension="page", metric="visitors",
               **{"from": t.isoformat(), "to": (t + timedelta(hours=1)).isoformat()}).json
    assert [(r["key"], r["count"]) for r in body["rows"]] == [("/many", 40), ("/loyal", 1)]
    assert body["total"] == 41 and body["tier"] == "1d"
    assert (body["from"], body["to"]) == (floor(t, 86400).isoformat(), (floor(t, 86400) + DAY).isoformat())


def test_a_visitors_breakdown_merges_at_most_so_many_values_and_says_so(api, servers, site):
    from oltp.breakdown import MAX_VISITOR_KEYS
    from oltp.visitors import add_visitors

    day = floor(datetime.now(UTC), 86400) - 2 * DAY
    pages = [f"/p{i:03d}" for i in range(MAX_VISITOR_KEYS + 20)]  # each: 2 page views of 1 visitor
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        ensure_partitions(conn, "rollup_dim_1d", day, day)
        conn.execute("INSERT INTO rollup_dim_1d (domain, tz, event_type, bucket_start, dimension, key, events, valued)"
                     " SELECT %s, 'UTC', 'pageview', %s, 'page', p, 2, 0 FROM unnest(%s::text[]) p",
                     (site, day, pages))
        with conn.cursor() as cur:
            add_visitors(cur, [("1d", site, "UTC", day, "", "", pages)]
                         + [("1d", site, "UTC", day, "page", p, [p]) for p in pages])
        # each page's bound (ADR 62) is its 1 visitor: the first keys settle the ranking, exactly
        body = get(api, site, "breakdown", dimension="page", metric="visitors",
                   **{"from": day.isoformat(), "to": (day + DAY).isoformat()}).json
        assert [(r["key"], r["count"]) for r in body["rows"]] == [(p, 1) for p in pages[:10]]
        assert body["notes"] == []
        # rows written before migration 0014 keep no bound: their 2 events are the bound, which cannot settle it
        conn.execute("UPDATE visitors_dim_1d SET n = NULL WHERE domain = %s", (site,))
    body = get(api, site, "breakdown", dimension="page", metric="visitors",
               **{"from": day.isoformat(), "to": (day + DAY).isoformat()}).json
    assert [r["count"] for r in body["rows"]] == [1] * 10 and body["total"] == len(pages)
    assert body["notes"] and f"counted for the {MAX_VISITOR_KEYS} values that could have the most" in body["notes"][0]


# ---------------------------------------------------------------- unknown domains

@pytest.mark.parametrize("path", ["summary", "status", "impressions", "pageviews?format=csv", "visitors",
                                  "breakdown?dimension=page"])
def test_an_unregistered_domain_is_404_on_every_domain_route(api, path):
    resp = api.get(f"/api/v1/domains/nope.test/{path}")
    assert resp.status_code == 404 and resp.json["error"]["code"] == "unknown_domain"
    assert "nope.test" in resp.json["error"]["message"]


def test_customers_keep_403_for_other_domains_and_read_the_unregistered_ones_their_token_lists(api, servers, site):
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "customer", [site, "unregistered-mine.example.org"])
    headers = {"Authorization": f"Bearer {token}"}
    assert api.get(f"/api/v1/domains/{site}/summary", headers=headers).status_code == 200
    for other in ("nope.test", f"x{uuid.uuid4().hex[:6]}.example.com"):  # existing or not: the same 403
        resp = api.get(f"/api/v1/domains/{other}/breakdown?dimension=page", headers=headers)
        assert resp.status_code == 403 and resp.json["error"]["code"] == "forbidden_domain"
    mine = api.get("/api/v1/domains/unregistered-mine.example.org/impressions", headers=headers)
    assert mine.status_code == 200 and mine.json["total"] == 0  # granted by an admin: known, not yet registered
    admin = api.get("/api/v1/domains/unregistered-mine.example.org/impressions")
    assert admin.status_code == 404 and admin.json["error"]["code"] == "unknown_domain"


# ---------------------------------------------------------------- the CLI

def test_tally_stats_with_an_unregistered_domain_exits_non_zero_naming_it(live, servers, tmp_path):
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "admin", name="test_api_breakdown stats")
    resp = test_stats.run_stats(tmp_path, token, "nope.test", "--last", "1h", "--api-url", live)
    assert resp.returncode == 1 and "404" in resp.stderr and "nope.test is not a registered site" in resp.stderr


def test_tally_reconcile_with_an_unregistered_domain_exits_2_naming_it(make_settings, monkeypatch, capsys, servers,
                                                                     site):
    from tally.cmd_reconcile import unknown_domain
    from tests.test_reconcile import cli_runner

    # ClickHouse is a closed port here: the domain is refused before it is asked
    cli = cli_runner(make_settings(), monkeypatch, capsys)
    code, out, err = cli("reconcile", "--from", "1h", "--domain", "nope.test")
    assert code == 2 and out == "" and "unknown domain nope.test" in err and err.startswith("tally reconcile: ")
    code, _, err = cli("reconcile", "--from", "1h", "--domain", "not_a_domain")
    assert code == 2 and "not_a_domain" in err
    with psycopg.connect(servers.pg_dsn) as conn:  # a registered site goes on to the comparison
        assert unknown_domain(conn, site) is None and unknown_domain(conn, site.upper() + ".") is None
        assert unknown_domain(conn, None) is None


# ---------------------------------------------------------------- through the whole pipeline

DESKTOP = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
PHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
         "Version/17.5 Mobile/15E148 Safari/604.1")
HEADLESS = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0 Safari/537.36"


@pytest.mark.servers("postgres", "broker", "chdb")
def test_breakdowns_of_events_put_through_the_pipeline(make_settings, domain):
    """Collector -> spool -> tansu -> rollup worker -> the API: pages and devices without the bot, the
    filtered series, visitors and the impressions' percentiles in the summary."""
    from tests.test_pipeline import Pipeline

    pipeline = Pipeline(make_settings())
    try:
        def send(path, ua, n, type_="pageview", value=None):
            e = {"domain": domain, "url": f"https://{domain}{path}", "type": type_}
            if value is not None:
                e["value"] = value
            pipeline.post([e] * n, **{"User-Agent": ua})

        send("/a", DESKTOP, 5)
        send("/b", PHONE, 3)
        send("/a", HEADLESS, 4)  # a bot: counted in ingestion, not in breakdowns
        for v in ("1", "2", "3", "4", "100"):
            send("/v", DESKTOP, 1, "impression", v)
        pipeline.ship()
        pipeline.drain()
        api, headers = pipeline.api, pipeline.api_headers

        def ask(path, **params):
            resp = api.get(f"/api/v1/domains/{domain}/{path}", query_string=params, headers=headers)
            assert resp.status_code == 200, resp.json
            return resp.json

        pages = ask("breakdown", dimension="page", metric="pageviews", last="1h")
        assert [(r["key"], r["count"]) for r in pages["rows"]] == [("/a", 5), ("/b", 3)]
        devices = {r["key"]: r["count"] for r in ask("breakdown", dimension="device", last="1h")["rows"]}
        assert devices["desktop"] == 5 and devices["mobile"] == 3 and "bot" not in devices
        assert ask("pageviews", granularity="15m", filter="page:/a")["total"] == 5
        summary = ask("summary", last="1h", percentiles="50,95,99")
        assert summary["visitors"] >= 1
        assert summary["metrics"]["impressions"]["percentiles"]["p50"] == pytest.approx(3, abs=0.1)
    finally:
        pipeline.close()


def test_oversized_percentiles_and_ranges_are_refused_before_any_work(api, site, monkeypatch):
    """Attack review, against the routes: a 250 KB `percentiles` list is a 400 before one value is parsed, and a
    27-year daily range at year 6543 is a 400 before the zone's clock changes or any bucket is computed."""
    from oltp import queries

    floats = _counting_float(monkeypatch)
    scans: list[tuple] = []
    real = queries._boundaries
    monkeypatch.setattr(queries, "_boundaries", lambda *a: scans.append(a) or real(*a))
    many = ",".join(f"{i / 1000:g}" for i in range(1, 38_001))
    for path, extra in (("summary", {"last": "24h"}), ("impressions", {})):
        resp = get(api, site, path, percentiles=many, **extra)
        error = resp.json["error"]
        assert resp.status_code == 400 and (error["code"], error["message"]) == (
            "invalid_percentiles", "at most 10 percentiles"), resp.json
    assert floats == []
    resp = get(api, site, "impressions", granularity="1d", tz="America/Santiago",
               **{"from": "6543-01-01T00:00:00Z", "to": "6570-04-01T00:00:00Z"})
    assert resp.status_code == 400 and resp.json["error"]["code"] == "invalid_range", resp.json
    assert "the range spans more than 5000 buckets" in resp.json["error"]["message"]
    assert scans == []


def test_review_findings_on_the_breakdown_inputs_are_refused_or_defused(api, servers, site):
    """Found by review (issue 17): a NUL in a filter was a 500; a visitors breakdown with a large offset merged
    up to every sketch of the range in one request; a source shaped like a spreadsheet formula went into the
    CSV as is; a page holding a comma could not be a filter."""
    now = datetime.now(UTC)
    put_events(servers.pg_dsn, site, [ev(now, page="/a,b", source="=cmd|' /c calc'!A0")] * 2)
    for path in ("summary", "pageviews", "visitors?granularity=1d", "breakdown?dimension=page"):
        sep = "&" if "?" in path else "?"
        r = api.get(f"/api/v1/domains/{site}/{path}{sep}filter=page:/a%00b")
        assert r.status_code == 400 and r.json["error"]["code"] == "invalid_filter", path
    r = get(api, site, "breakdown", dimension="page", metric="visitors", offset="995", limit="10")
    assert r.status_code == 400 and "offset + limit" in r.json["error"]["message"]
    r = get(api, site, "breakdown", dimension="page", last="1h", filter="page:/a,b")
    assert r.status_code == 200 and r.json["filters"] == ["page:/a,b"] and r.json["rows"][0]["count"] == 2
    sources = get(api, site, "breakdown", dimension="source", last="1h", format="csv").get_data(as_text=True)
    assert list(csv.reader(sources.splitlines()))[1][0] == "'=cmd|' /c calc'!A0"
