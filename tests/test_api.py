"""The query API against real PostgreSQL and chDB: bad parameters, bad SQL, limits, read-only.

Every call carries an admin token (who may call what is tests/test_auth.py)."""

import psycopg
import pytest

from olap.client import connect
from oltp import tokens
from tally.roots import build_api


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


def test_empty_domain_gets_every_bucket_zero_filled(api, domain):
    resp = api.get(f"/api/v1/domains/{domain}/impressions", query_string={
        "from": "2026-03-28T00:00:00+01:00", "to": "2026-04-01T00:00:00+02:00", "granularity": "1d",
        "tz": "Europe/Berlin"})
    assert resp.status_code == 200
    buckets = resp.json["buckets"]
    # Four local days, the DST change (2026-03-29) included: starts move from +01:00 to +02:00.
    assert [b["start"] for b in buckets] == ["2026-03-28T00:00:00+01:00", "2026-03-29T00:00:00+01:00",
                                             "2026-03-30T00:00:00+02:00", "2026-03-31T00:00:00+02:00"]
    assert all(b["count"] == 0 for b in buckets) and resp.json["total"] == 0


def test_default_range_is_the_last_day_in_quarter_hours(api, domain):
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
    assert api.post("/api/v1/sql", json={"sql": "EXISTS TABLE tally.events"}).status_code == 400
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


def test_dashboard_page_is_served(api):
    resp = api.get("/")
    assert resp.status_code == 200
    assert b"/api/v1/domains/" in resp.data and b"<svg" in resp.data


# A PostgreSQL outage answers 503: tests/test_auth.py::test_token_store_outage_is_a_503_not_a_401
# (the token check is the first thing that needs PostgreSQL).
