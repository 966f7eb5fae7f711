"""The query API against real PostgreSQL and chDB: bad parameters, bad SQL, limits, read-only.

Every call carries an admin token (who may call what is tests/test_auth.py)."""

import uuid
from datetime import UTC

import psycopg
import pytest

from olap.client import connect
from oltp import tokens
from tally.roots import build_api
from tests.conftest import registered


def close_pool(app) -> None:
    app.extensions["tally_backends"].rollups.pool.close()


@pytest.fixture()
def api(make_settings, servers):
    app = build_api(make_settings(TALLY_SQL_MAX_RESULT_ROWS="100"))
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "admin", name="test_api")
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    yield client
    close_pool(app)


@pytest.mark.parametrize("path, params, status, code", [
    ("/api/v1/domains/example.com/clicks", {}, 404, "unknown_metric"),
    ("/api/v1/domains/not_a_domain/impressions", {}, 400, "invalid_domain"),
    ("/api/v1/domains/example.com/impressions", {"granularity": "5m"}, 400, "invalid_granularity"),
    ("/api/v1/domains/example.com/impressions", {"tz": "Mars/Olympus"}, 400, "invalid_tz"),
    ("/api/v1/domains/example.com/impressions", {"tz": "../../etc/passwd"}, 400, "invalid_tz"),
    ("/api/v1/domains/example.com/impressions", {"tz": "America"}, 400, "invalid_tz"),
    ("/api/v1/domains/example.com/impressions", {"tz": "Europe/" + "x" * 300}, 400, "invalid_tz"),
    ("/api/v1/domains/example.com/impressions", {"to": "9999-12-31T23:00:00-05:00"}, 400, "invalid_range"),
    ("/api/v1/domains/example.com/impressions", {"from": "0001-01-01T00:00:00+01:00"}, 400, "invalid_range"),
    ("/api/v1/domains/example.com/impressions", {"from": "last tuesday"}, 400, "invalid_range"),
    ("/api/v1/domains/example.com/impressions", {"from": "2026-01-01T00:00:00"}, 400, "invalid_range"),
    ("/api/v1/domains/example.com/impressions",
     {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, 400, "invalid_range"),
    ("/api/v1/domains/example.com/impressions",
     {"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z", "granularity": "15m"}, 400, "invalid_range"),
    ("/api/v1/domains/example.com/impressions", {"granularty": "1h"}, 400, "unknown_parameter"),
])
def test_bad_query_parameters_are_named(api, path, params, status, code):
    resp = api.get(path, query_string=params)
    assert resp.status_code == status
    assert resp.json["error"]["code"] == code
    assert resp.json["error"]["message"]


def test_empty_domain_gets_every_bucket_zero_filled(api, servers, domain):
    registered(servers.pg_dsn, domain)
    resp = api.get(f"/api/v1/domains/{domain}/impressions", query_string={
        "from": "2026-03-28T00:00:00+01:00", "to": "2026-04-01T00:00:00+02:00", "granularity": "1d",
        "tz": "Europe/Berlin"})
    assert resp.status_code == 200
    buckets = resp.json["buckets"]
    # Four local days, the DST change (2026-03-29) included: starts move from +01:00 to +02:00.
    assert [b["start"] for b in buckets] == ["2026-03-28T00:00:00+01:00", "2026-03-29T00:00:00+01:00",
                                             "2026-03-30T00:00:00+02:00", "2026-03-31T00:00:00+02:00"]
    assert all(b["count"] == 0 for b in buckets) and resp.json["total"] == 0


def test_default_range_is_the_last_day_in_quarter_hours(api, servers, domain):
    registered(servers.pg_dsn, domain)
    resp = api.get(f"/api/v1/domains/{domain}/impressions")
    assert resp.status_code == 200
    assert len(resp.json["buckets"]) in (96, 97)


def test_analyst_sql_returns_columns_and_rows(api):
    resp = api.post("/api/v1/sql", json={"sql": "SELECT 1 AS one, 'x' AS s, toDate('2026-01-02') AS d"})
    assert resp.status_code == 200
    assert resp.json["columns"] == ["one", "s", "d"]
    assert resp.json["rows"] == [[1, "x", "2026-01-02"]]


@pytest.mark.parametrize("body, words", [
    ({"sql": ""}, "non-empty"),
    ({"sql": 42}, "JSON object"),
    ({"sql": "SELEC 1"}, "Syntax error"),
    ({"sql": "SELECT * FROM tally.no_such_table"}, "no_such_table"),
    ({"sql": "DROP TABLE tally.events"}, "only SELECT"),
    ({"sql": "INSERT INTO tally.events (hash) VALUES ('x')"}, "only SELECT"),
    ({"sql": "SET readonly = 0"}, "only SELECT"),
    ({"sql": "SELECT 1; DROP TABLE tally.events"}, "Multi-statements are not allowed"),
    ({"sql": "SELECT $$it's$$; DROP TABLE tally.events; SELECT '$$'"}, "Multi-statements are not allowed"),
    ({"sql": "SELECT 1 # it's\n; DROP TABLE tally.events; SELECT '"}, "Multi-statements are not allowed"),
    ({"sql": "SELECT * FROM file('/etc/passwd', 'LineAsString')"}, "file"),
    ({"sql": "SELECT 'x' INTO OUTFILE '/tmp/tally-should-not-exist' APPEND"}, "INTO OUTFILE"),
    ({"sql": "select 1 into   outfile '/tmp/tally-should-not-exist'"}, "INTO OUTFILE"),
    ({"sql": "SELECT 1 SETTINGS final = 0"}, "setting"),
    ({"sql": "SELECT number FROM numbers(100000)"}, "max rows"),
    ({"sql": "SELECT 1", "extra": True}, "JSON object"),
    ("SELECT 1", "JSON object"),
])
def test_bad_or_unsafe_sql_is_refused_with_the_reason(api, body, words):
    resp = api.post("/api/v1/sql", json=body)
    assert resp.status_code == 400
    assert words.lower() in resp.json["error"]["message"].lower()
    # and the endpoint keeps serving
    assert api.post("/api/v1/sql", json={"sql": "SELECT 2"}).json["rows"] == [[2]]
    # EXISTS is answered from the curated catalog (ADR 51); a table analysts cannot read does not exist to them
    assert api.post("/api/v1/sql", json={"sql": "EXISTS TABLE tally.events"}).json["rows"] == [[1]]
    assert api.post("/api/v1/sql", json={"sql": "EXISTS TABLE tally.consumer_offsets"}).json["rows"] == [[0]]
    assert api.post("/api/v1/sql", json={"sql": "SELECT count() > -1 FROM tally.events"}).json["rows"] == [[True]]


def test_into_outfile_writes_no_file(api, tmp_path):
    target = tmp_path / "owned.txt"
    resp = api.post("/api/v1/sql", json={"sql": f"SELECT 'pwned' INTO OUTFILE '{target}'"})
    assert resp.status_code == 400
    assert not target.exists()


def test_wide_integers_come_back_as_exact_strings(api):
    resp = api.post("/api/v1/sql", json={"sql": "SELECT toUInt256('340282366920938463463374607431768211457') AS big,"
                                                " toInt64(-9223372036854775808) AS small"})
    assert resp.status_code == 200
    assert resp.json["rows"] == [["340282366920938463463374607431768211457", -9223372036854775808]]


def test_refused_statements_leave_the_shared_chdb_session_writable(api, settings, domain):
    """chDB keeps a non-SELECT statement's SETTINGS on the session: the loader shares it and must still write."""
    ch = connect(settings.clickhouse_dsn)
    before = ch.query("SELECT count() FROM tally.events").result_rows
    for sql in ("INSERT INTO FUNCTION file('x.csv') SELECT 1", "DROP TABLE tally.events",
                "CREATE TABLE tally.evil (a Int8) ENGINE = Memory"):
        resp = api.post("/api/v1/sql", json={"sql": sql})
        assert resp.status_code == 400 and "only SELECT" in resp.json["error"]["message"]
    assert ch.query("SELECT count() FROM tally.events").result_rows == before
    assert ch.query("SELECT getSetting('readonly')").result_rows == [(0,)]
    ch.command("CREATE TABLE IF NOT EXISTS tally.scratch_write_probe (a Int8) ENGINE = Memory")
    ch.command("DROP TABLE tally.scratch_write_probe")


def test_dashboard_without_a_session_is_the_login_form(api):
    client = api.application.test_client()  # no bearer header, no cookie
    resp = client.get("/")
    assert resp.status_code == 200 and b'action="/login"' in resp.data and b'name="token"' in resp.data
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]


@pytest.mark.parametrize("template", ["dashboard.html", "login.html", "_logo.html"])
def test_pages_load_no_script_or_style_from_another_host(template):
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "api" / "templates" / template).read_text()
    assert not re.search(r"""<script[^>]+src=["']?(https?:)?//""", text, re.I)
    assert not re.search(r"""<link[^>]+href=["']?(https?:)?//""", text, re.I)
    assert "https://" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def _put_rollup(servers, domain, event_type, start, events, valued=0, value_sum=None):
    from datetime import timedelta

    from oltp.partitions import ensure_partitions
    from oltp.tiers import rederive

    registered(servers.pg_dsn, domain)
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        ensure_partitions(conn, "rollup_15m", start, start)
        conn.execute("INSERT INTO rollup_15m (domain, event_type, bucket_start, events, valued, value_sum)"
                     " VALUES (%s, %s, %s, %s, %s, %s)", (domain, event_type, start, events, valued, value_sum))
    with psycopg.connect(servers.pg_dsn) as conn:  # the coarser tiers, as the rollup sink writes them
        rederive(conn, start, start + timedelta(minutes=15), domain)


def test_series_carries_values_and_the_length_of_dst_days(api, servers, domain):
    from datetime import datetime

    _put_rollup(servers, domain, "impression", datetime(2026, 3, 29, 10, 0, tzinfo=UTC), 4, 2, "1.500000")
    _put_rollup(servers, domain, "impression", datetime(2026, 3, 30, 10, 0, tzinfo=UTC), 3)
    resp = api.get(f"/api/v1/domains/{domain}/impressions", query_string={
        "from": "2026-03-28T00:00:00+01:00", "to": "2026-03-31T00:00:00+02:00", "granularity": "1d",
        "tz": "Europe/Berlin"})
    assert resp.status_code == 200
    body = resp.json
    assert [(b["start"], b["count"], b["valued"], b["value_sum"], b.get("length_s")) for b in body["buckets"]] == [
        ("2026-03-28T00:00:00+01:00", 0, 0, "0.000000", None),
        ("2026-03-29T00:00:00+01:00", 4, 2, "1.500000", 23 * 3600),  # the spring-forward day: 23 hours
        ("2026-03-30T00:00:00+02:00", 3, 0, "0.000000", None)]
    assert body["buckets"][1]["end"] == "2026-03-30T00:00:00+02:00"
    assert (body["total"], body["valued"], body["value_sum"], body["value_avg"]) == (7, 2, "1.500000", "0.750000")


def test_series_as_csv_has_a_header_and_one_row_per_bucket(api, servers, domain):
    import csv
    from datetime import datetime

    _put_rollup(servers, domain, "pageview", datetime(2026, 10, 25, 1, 15, tzinfo=UTC), 5, 1, "2.000000")
    query = {"from": "2026-10-25T00:00:00+02:00", "to": "2026-10-26T00:00:00+01:00", "granularity": "1d",
             "tz": "Europe/Berlin"}
    resp = api.get(f"/api/v1/domains/{domain}/pageviews", query_string={**query, "format": "csv"})
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    assert f'filename="{domain}-pageviews-1d.csv"' in resp.headers["Content-Disposition"]
    rows = list(csv.reader(resp.get_data(as_text=True).splitlines()))
    assert rows == [["start", "end", "count", "valued", "value_sum", "length_s"],
                    ["2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00", "5", "1", "2.000000", "90000"]]
    as_json = api.get(f"/api/v1/domains/{domain}/pageviews", query_string=query).json
    assert len(rows) - 1 == len(as_json["buckets"])
    bad = api.get(f"/api/v1/domains/{domain}/pageviews", query_string={**query, "format": "xml"})
    assert bad.status_code == 400 and bad.json["error"]["code"] == "invalid_format"


def test_domains_lists_registered_sites_for_admins_and_own_domains_for_customers(api, servers, domain):
    from oltp import sites

    site = sites.add(servers.pg_dsn, domain, tz="Asia/Kathmandu")
    listing = api.get("/api/v1/domains")
    assert listing.status_code == 200 and listing.json["role"] == "admin"
    mine = {d["domain"]: d for d in listing.json["domains"]}[domain]
    assert mine["tz"] == "Asia/Kathmandu" and mine["registered"] and mine["site_key"] == site.site_key
    assert mine["has_events"] is False
    assert mine["tag"] == f'<script defer src="http://localhost:8700/tag.js" data-site="{site.site_key}"></script>'
    assert listing.json["collector_url"] == "http://localhost:8700"
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, customer = tokens.create(conn, "customer", [domain, "unregistered.example.org"])
    resp = api.get("/api/v1/domains", headers={"Authorization": f"Bearer {customer}"})
    assert resp.status_code == 200 and resp.json["role"] == "customer"
    assert [(d["domain"], d["registered"], d["tz"]) for d in resp.json["domains"]] == [
        (domain, True, "Asia/Kathmandu"), ("unregistered.example.org", False, "UTC")]


def test_the_tag_shown_carries_the_sites_url_rule(api, servers):
    """The dashboard's tag keeps what the collector keeps (ADR 30): extra query parameters, or raw URLs."""
    from oltp import sites

    kept, raw = (f"d{uuid.uuid4().hex[:10]}.example.com" for _ in range(2))
    sites.add(servers.pg_dsn, kept, keep_query=["ref", "lang"])
    sites.add(servers.pg_dsn, raw, raw_urls=True)
    tags = {d["domain"]: d["tag"] for d in api.get("/api/v1/domains").json["domains"]}
    assert tags[kept].endswith(' data-keep-query="ref,lang"></script>')
    assert tags[raw].endswith(' data-raw-urls="true"></script>')


def test_login_sets_a_session_cookie_that_does_not_hold_the_token(api, servers, domain):
    registered(servers.pg_dsn, domain)
    client = api.application.test_client()
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        info, token = tokens.create(conn, "customer", [domain])
    bad = client.post("/login", data={"token": "tly_tok_ffffffffff_" + "A" * 43})
    assert bad.status_code == 401 and b"unknown, malformed or revoked" in bad.data
    assert client.get_cookie("tally_session") is None
    resp = client.post("/login", data={"token": token, "domain": domain})
    assert resp.status_code == 303 and resp.headers["Location"] == f"/?domain={domain}"
    set_cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
    assert "Secure" not in set_cookie  # plain http here; https requests get Secure
    value = client.get_cookie("tally_session").value
    app = api.application
    decoded = app.session_interface.get_signing_serializer(app).loads(value)  # readable by anyone (signed only)
    assert set(decoded) == {"sid"} and info.id not in str(decoded)  # a random session id, not the token
    assert token.split("_", 3)[3] not in str(decoded) and token.split("_", 3)[3] not in value
    # the cookie reads this customer's domain (GET, same origin), and nothing else
    assert client.get("/").status_code == 200 and b'id="chart"' in client.get("/").data
    assert client.get(f"/api/v1/domains/{domain}/impressions").status_code == 200
    assert client.get(f"/api/v1/domains/{domain}/summary", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    other = client.get("/api/v1/domains/other.example.com/impressions")
    assert other.status_code == 403 and other.json["error"]["code"] == "forbidden_domain"
    # never cross-site, never for writes
    cross = client.get(f"/api/v1/domains/{domain}/impressions", headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 401 and cross.json["error"]["code"] == "cookie_not_accepted"
    foreign = client.get(f"/api/v1/domains/{domain}/impressions", headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 401
    write = client.post("/api/v1/sql", json={"sql": "SELECT 1"})
    assert write.status_code == 401 and write.json["error"]["code"] == "cookie_not_accepted"
    # a signed cookie with a session id the server never issued is refused
    with client.session_transaction() as sess:
        sess["sid"] = "A" * 43
    assert client.get(f"/api/v1/domains/{domain}/impressions").json["error"]["code"] == "invalid_session"
    # revoking the token ends the session at once
    client.post("/login", data={"token": token})
    assert client.get(f"/api/v1/domains/{domain}/impressions").status_code == 200
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        tokens.revoke(conn, info.id)
    assert client.get(f"/api/v1/domains/{domain}/impressions").status_code == 401
    assert b'action="/login"' in client.get("/").data


def test_login_from_another_site_and_logout(api, servers):
    client = api.application.test_client()
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "analyst")
    forged = client.post("/login", data={"token": token}, headers={"Origin": "https://evil.example"})
    assert forged.status_code == 403 and client.get_cookie("tally_session") is None
    assert client.post("/login", data={"token": token}).status_code == 303
    assert client.get("/api/v1/domains").status_code == 200
    again = client.get("/login?domain=example.com")
    assert again.status_code == 303 and again.headers["Location"] == "/?domain=example.com"
    out = client.post("/logout")
    assert out.status_code == 303 and out.headers["Location"] == "/login"
    assert client.get_cookie("tally_session") is None
    assert client.get("/api/v1/domains").status_code == 401


def test_https_requests_get_a_secure_cookie(api, servers):
    client = api.application.test_client()
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "analyst")
    resp = client.post("/login", data={"token": token}, base_url="https://localhost")
    assert resp.status_code == 303 and "Secure" in resp.headers["Set-Cookie"]


# A PostgreSQL outage answers 503: tests/test_auth.py::test_token_store_outage_is_a_503_not_a_401
# (the token check is the first thing that needs PostgreSQL).
