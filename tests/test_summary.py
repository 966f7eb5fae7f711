"""GET /api/v1/domains/<domain>/summary against real PostgreSQL: the current, partial quarter hour,
the previous period of the same length and the change, from rows put into rollup_15m and from events
put through the whole pipeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from oltp import tokens
from oltp.queries import QueryError, summary_window
from tally.roots import build_api
from tests.conftest import registered
from tests.test_pipeline import Pipeline

Q = timedelta(minutes=15)


def floor15(t: datetime) -> datetime:
    return t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)


def test_the_window_is_whole_quarter_hours_ending_with_the_partial_one():
    now = datetime(2026, 11, 23, 10, 7, 30, tzinfo=UTC)
    w = summary_window(now, 3600)
    assert w.end == datetime(2026, 11, 23, 10, 15, tzinfo=UTC)  # the quarter holding `now` is in
    assert w.start == datetime(2026, 11, 23, 9, 15, tzinfo=UTC)
    assert w.previous_start == datetime(2026, 11, 23, 8, 15, tzinfo=UTC)
    assert w.partial_start == datetime(2026, 11, 23, 10, 0, tzinfo=UTC) and w.as_of == now
    on_the_quarter = summary_window(datetime(2026, 11, 23, 10, 0, tzinfo=UTC), 86400)
    assert on_the_quarter.end == datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
    assert on_the_quarter.end - on_the_quarter.start == timedelta(days=1)
    with pytest.raises(QueryError):
        summary_window(now, 1000)


@pytest.fixture()
def api(make_settings, servers):
    app = build_api(make_settings())
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "admin", name="test_summary")
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    yield client
    app.extensions["tally_backends"].rollups.pool.close()


def put(servers, domain, event_type, start, events, valued=0, value_sum=None):
    registered(servers.pg_dsn, domain)  # the API answers only registered sites (ADR 48)
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO rollup_15m (domain, event_type, bucket_start, events, valued, value_sum)"
                     " VALUES (%s, %s, %s, %s, %s, %s)", (domain, event_type, start, events, valued, value_sum))


def summary_of(api, domain, last, expected_end):
    """The summary, or None if a quarter hour went by between the test's clock and the server's."""
    resp = api.get(f"/api/v1/domains/{domain}/summary", query_string={"last": last})
    assert resp.status_code == 200, resp.json
    return resp.json if resp.json["to"] == expected_end.isoformat() else None


def test_summary_counts_the_partial_bucket_and_compares_with_the_previous_period(api, servers, domain):
    for _attempt in range(2):  # a quarter-hour boundary can pass mid-test: then once more
        partial = floor15(datetime.now(UTC))
        end = partial + Q
        start = end - timedelta(hours=1)
        d = f"a{_attempt}{domain}"
        put(servers, d, "impression", partial, 5, 2, "3.000000")  # the current, still-filling quarter
        put(servers, d, "impression", start, 7)  # the period's first quarter
        put(servers, d, "impression", start - Q, 4)  # the previous period's last quarter
        put(servers, d, "impression", start - 4 * Q, 6, 1, "10.000000")  # the previous period's first
        put(servers, d, "impression", start - 5 * Q, 100)  # before both periods: not counted
        put(servers, d, "impression", end, 50)  # a quarter in the future (clock skew): not counted
        put(servers, d, "pageview", start - 2 * Q, 3)
        body = summary_of(api, d, "1h", end)
        if body is not None:
            break
    else:
        pytest.fail("two quarter-hour boundaries in one test")
    assert body["from"] == start.isoformat() and body["partial_bucket_start"] == partial.isoformat()
    assert body["previous_from"] == (start - timedelta(hours=1)).isoformat()
    assert body["previous_to"] == start.isoformat()
    assert start.isoformat() <= body["as_of"] < end.isoformat()
    assert body["metrics"]["impressions"] == {
        "total": 12, "valued": 2, "value_sum": "3.000000", "value_avg": "1.500000",
        "previous_total": 10, "previous_value_sum": "10.000000", "change_pct": 20.0}
    assert body["metrics"]["pageviews"] == {
        "total": 0, "valued": 0, "value_sum": "0.000000", "value_avg": None,
        "previous_total": 3, "previous_value_sum": "0.000000", "change_pct": -100.0}


def test_no_previous_events_means_no_percentage(api, servers, domain):
    put(servers, domain, "pageview", floor15(datetime.now(UTC)) - timedelta(hours=2), 9)
    body = api.get(f"/api/v1/domains/{domain}/summary", query_string={"last": "7d"}).json
    assert body["last"] == "7d"
    assert body["metrics"]["pageviews"]["total"] == 9
    assert body["metrics"]["pageviews"]["previous_total"] == 0 and body["metrics"]["pageviews"]["change_pct"] is None


@pytest.mark.parametrize("query, code", [({"last": "2h"}, "invalid_period"), ({"since": "1h"}, "unknown_parameter")])
def test_bad_summary_parameters_are_named(api, domain, query, code):
    resp = api.get(f"/api/v1/domains/{domain}/summary", query_string=query)
    assert resp.status_code == 400 and resp.json["error"]["code"] == code


def test_a_customer_gets_only_its_own_summary(api, servers, domain):
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, customer = tokens.create(conn, "customer", [domain])
    headers = {"Authorization": f"Bearer {customer}"}
    assert api.get(f"/api/v1/domains/{domain}/summary", headers=headers).status_code == 200
    other = api.get("/api/v1/domains/other.example.com/summary", headers=headers)
    assert other.status_code == 403 and other.json["error"]["code"] == "forbidden_domain"


def test_summary_of_events_put_through_the_pipeline(settings, domain):
    pipeline = Pipeline(settings)
    try:
        for _attempt in range(2):
            d = f"p{_attempt}{domain}"
            now = datetime.now(UTC)
            partial = floor15(now)
            end = partial + Q
            # 3 impressions (values 1.25 each) in the current quarter, 2 in the previous 24 hours' period,
            # 1 page view 23 hours ago (this period) and 1 more than 7 days old is refused by the collector,
            # so nothing else is put.
            this = max(partial, now - timedelta(seconds=30)).isoformat()
            prev = (end - timedelta(hours=24) - 2 * Q).isoformat()
            pipeline.post([{"domain": d, "url": f"https://{d}/", "type": "impression", "ts": this, "value": "1.25"}] * 3
                          + [{"domain": d, "url": f"https://{d}/", "type": "impression", "ts": prev}] * 2
                          + [{"domain": d, "url": f"https://{d}/x", "type": "pageview",
                              "ts": (now - timedelta(hours=23)).isoformat()}])
            pipeline.ship()
            pipeline.drain()
            resp = pipeline.api.get(f"/api/v1/domains/{d}/summary", headers=pipeline.api_headers)
            assert resp.status_code == 200
            if resp.json["to"] == end.isoformat():
                break
        else:
            pytest.fail("two quarter-hour boundaries in one test")
        m = resp.json["metrics"]
        assert (m["impressions"]["total"], m["impressions"]["valued"], m["impressions"]["value_sum"],
                m["impressions"]["value_avg"]) == (3, 3, "3.750000", "1.250000")
        assert (m["impressions"]["previous_total"], m["impressions"]["change_pct"]) == (2, 50.0)
        assert (m["pageviews"]["total"], m["pageviews"]["previous_total"]) == (1, 0)
        # the same numbers as the series over the same quarter hours
        series = pipeline.impressions(d, datetime.fromisoformat(resp.json["from"]),
                                      datetime.fromisoformat(resp.json["as_of"]))
        assert series["total"] == 3 and series["value_sum"] == "3.750000"
    finally:
        pipeline.close()
