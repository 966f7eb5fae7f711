"""The analyst server as the API uses it: over real HTTP, with its own ClickHouse clients and audit rows.

Isolation is asserted by order, never by wall-clock: while analyst queries hold every
query slot, the API's health check and customer routes still answer.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import threading
import time
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest

from core.keys import internal_token
from tests.conftest import SECRET, registered, start_analyst_server

SLOW_SQL = "SELECT count() FROM numbers(100000000000000) WHERE sipHash64(number) % 7 = 3"


def post(url: str, body: dict, token: str | None = None, timeout: float = 60):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", "/v1/query", body=json.dumps(body), headers=headers)
    return conn, conn.getresponse()


def query(url: str, sql: str, fmt: str = "json", token_id: str | None = None):
    conn, resp = post(url, {"sql": sql, "format": fmt, "token_id": token_id}, internal_token(SECRET))
    try:
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def make_token(pg_dsn: str, role: str, domains: tuple[str, ...] = ()) -> str:
    from oltp import tokens

    with psycopg.connect(pg_dsn) as conn:
        return tokens.create(conn, role, list(domains), name="analyst server test")[1]


def audit_rows(pg_dsn: str, token_id: str) -> list[tuple]:
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute("SELECT status, rows, bytes, format FROM analyst_queries WHERE token_id = %s "
                            "ORDER BY id", (token_id,)).fetchall()


def test_only_the_api_may_call_it(analyst_url):
    for token in (None, "wrong", internal_token("another-secret-0123456789")):
        conn, resp = post(analyst_url, {"sql": "SELECT 1"}, token)
        assert resp.status == 401 and resp.getheader("WWW-Authenticate") == "Bearer"
        assert json.loads(resp.read())["error"]["code"] == "unauthorized"
        conn.close()


def test_bad_requests_are_named(analyst_url):
    status, _, body = query(analyst_url, "SELECT 1", fmt="xml")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_format"
    conn, resp = post(analyst_url, {"query": "SELECT 1"}, internal_token(SECRET))
    assert resp.status == 400 and json.loads(resp.read())["error"]["code"] == "invalid_body"
    conn.close()


def test_json_and_streamed_formats_and_their_audit_rows(analyst_url, servers):
    token_id = f"tok_{uuid.uuid4().hex[:10]}"
    status, headers, body = query(analyst_url, "SELECT number AS n, toString(number) AS s FROM numbers(3)",
                                  token_id=token_id)
    assert status == 200 and json.loads(body)["rows"] == [[0, "0"], [1, "1"], [2, "2"]]
    status, headers, body = query(analyst_url, "SELECT number AS n, concat('a,\"b', toString(number)) AS s "
                                               "FROM numbers(5000)", fmt="csv", token_id=token_id)
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert rows[0] == ["n", "s"] and len(rows) == 5001 and rows[-1] == ["4999", 'a,"b4999']
    csv_bytes = len(body)
    status, _, body = query(analyst_url, "SELECT file('/etc/passwd')", token_id=token_id)
    assert status == 400 and json.loads(body)["error"]["code"] == "query_refused"
    assert b"root:" not in body
    rows = audit_rows(servers.pg_dsn, token_id)
    assert [(r[0], r[3]) for r in rows] == [("ok", "json"), ("ok", "csv"), ("refused", "json")]
    assert rows[1][1:3] == (5000, csv_bytes)


def test_a_streamed_result_over_the_byte_cap_is_cut_not_ended_cleanly(servers):
    url, server = start_analyst_server(servers, TALLY_SQL_MAX_RESULT_BYTES=str(256 * 1024))
    try:
        token_id = f"tok_{uuid.uuid4().hex[:10]}"
        conn, resp = post(url, {"sql": "SELECT number, repeat('x', 100) FROM numbers(10000000)", "format": "tsv",
                                "token_id": token_id}, internal_token(SECRET))
        if resp.status == 200:  # the cap was hit after the first bytes went out: the body must be incomplete
            with pytest.raises(http.client.IncompleteRead):
                resp.read()
        else:  # or before any byte: a plain error
            assert resp.status == 400 and json.loads(resp.read())["error"]["code"] == "result_too_large"
        conn.close()
        deadline = time.monotonic() + 10
        while not audit_rows(servers.pg_dsn, token_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [r[0] for r in audit_rows(servers.pg_dsn, token_id)] == ["too_large"]
    finally:
        server.close()


def test_the_loader_offsets_answer_while_analysts_hold_every_slot(servers):
    """The shipper asks for the loader's offsets every few seconds to free spool space (ADR 28): a query
    holding the only analyst slot must not make it wait, or analysts could fill the collector's disk."""
    from olap.aggregates import RemoteAggregates

    # 8 s: the slot is seen held (429) before the offsets are asked for, which answer within 3 s or fail
    url, server = start_analyst_server(servers, TALLY_SQL_MAX_CONCURRENT="1", TALLY_SQL_MAX_EXECUTION_S="8")
    try:
        token_id = f"tok_{uuid.uuid4().hex[:10]}"
        slow = threading.Thread(target=lambda: query(url, SLOW_SQL, token_id=token_id))  # holds the slot 8 s
        slow.start()
        deadline = time.monotonic() + 10
        while query(url, "SELECT 1", token_id=token_id)[0] != 429:  # until the slow query holds the slot
            assert time.monotonic() < deadline and slow.is_alive()
            time.sleep(0.05)
        remote = RemoteAggregates(url, internal_token(SECRET), timeout_s=3)
        assert remote.loader_offsets("tally-loader", f"t-{uuid.uuid4().hex[:8]}") == {}  # answered, not 429
        assert slow.is_alive()  # and the analyst query still held its slot meanwhile
        slow.join(30)
    finally:
        server.close()


def test_more_queries_than_slots_get_429_and_the_slot_comes_back(servers):
    url, server = start_analyst_server(servers, TALLY_SQL_MAX_CONCURRENT="1", TALLY_SQL_MAX_EXECUTION_S="3")
    try:
        token_id = f"tok_{uuid.uuid4().hex[:10]}"
        results: list[tuple[int, bytes]] = []
        slow = threading.Thread(target=lambda: results.append(query(url, SLOW_SQL, token_id=token_id)[::2]))
        slow.start()
        deadline = time.monotonic() + 10
        while not audit_rows(servers.pg_dsn, token_id) and slow.is_alive() and time.monotonic() < deadline:
            status, headers, body = query(url, "SELECT 1", token_id=token_id)
            if status == 429:
                break
            time.sleep(0.05)
        assert status == 429 and headers["Retry-After"] == "1", body
        assert json.loads(body)["error"]["code"] == "analyst_busy"
        slow.join(30)
        status_slow, body_slow = results[0]
        assert status_slow == 400 and json.loads(body_slow)["error"]["code"] == "query_timeout"
        assert query(url, "SELECT 1")[0] == 200  # the slot was handed back
        statuses = [r[0] for r in audit_rows(servers.pg_dsn, token_id)]
        assert "busy" in statuses and statuses[-1] == "timeout"
    finally:
        server.close()


def test_api_health_and_customer_routes_answer_while_analyst_queries_hold_every_slot(make_settings, servers, domain):
    """Isolation by order, not by clock: both slow queries are still running when the other routes answer."""
    from tally.roots import build_api

    url, server = start_analyst_server(servers, TALLY_SQL_MAX_CONCURRENT="2", TALLY_SQL_MAX_EXECUTION_S="8")
    app = build_api(make_settings(TALLY_ANALYST_URL=url))
    try:
        client = app.test_client()
        analyst, customer = make_token(servers.pg_dsn, "analyst"), make_token(servers.pg_dsn, "customer", (domain,))
        slots = []
        slow = [threading.Thread(target=lambda: slots.append(client.post(
            "/api/v1/sql", json={"sql": SLOW_SQL}, headers={"Authorization": f"Bearer {analyst}"}).status_code))
            for _ in range(2)]
        for t in slow:
            t.start()
        wait_busy = time.monotonic() + 15
        while time.monotonic() < wait_busy:  # until the analyst server reports every slot taken
            busy = client.post("/api/v1/sql", json={"sql": "SELECT 1"}, headers={"Authorization": f"Bearer {analyst}"})
            if busy.status_code == 429:
                break
        assert busy.status_code == 429 and busy.json["error"]["code"] == "analyst_busy"
        assert client.get("/healthz").status_code == 200
        series = client.get(f"/api/v1/domains/{domain}/impressions", headers={"Authorization": f"Bearer {customer}"})
        assert series.status_code == 200 and series.json["total"] == 0
        assert all(t.is_alive() for t in slow) and slots == []  # both analyst queries were still running
        for t in slow:
            t.join(60)
        assert slots == [400, 400]  # cut by the 8 s limit, in ClickHouse
    finally:
        app.extensions["tally_backends"].rollups.pool.close()
        server.close()


def test_api_says_503_when_the_analyst_server_is_down(make_settings, servers):
    from infra.processes import free_port
    from tally.roots import build_api

    app = build_api(make_settings(TALLY_ANALYST_URL=f"http://127.0.0.1:{free_port()}"))
    try:
        analyst = make_token(servers.pg_dsn, "analyst")
        resp = app.test_client().post("/api/v1/sql", json={"sql": "SELECT 1"},
                                      headers={"Authorization": f"Bearer {analyst}"})
        assert resp.status_code == 503 and resp.json["error"]["code"] == "analyst_unavailable"
        assert resp.headers["Retry-After"] == "5"
    finally:
        app.extensions["tally_backends"].rollups.pool.close()


@pytest.mark.parametrize("query, accept, expected", [
    ("?format=csv", None, "text/csv"), ("?format=tsv", None, "text/tab-separated-values"),
    ("?format=jsonl", None, "application/x-ndjson"), ("", "text/csv", "text/csv"),
    ("", "application/x-ndjson", "application/x-ndjson"), ("", None, "application/json"),
    ("", "text/html, */*", "application/json"),
    # the Accept header may carry parameters and any case (RFC 9110): the very type we answer with names it
    ("", "text/csv; charset=utf-8", "text/csv"), ("", "Text/CSV", "text/csv"),
    ("", "application/jsonl", "application/x-ndjson"), ("", "text/html, text/tab-separated-values;q=0.5",
                                                      "text/tab-separated-values"),
])
def test_api_picks_the_format_from_the_query_or_accept(make_settings, servers, query, accept, expected):
    from tally.roots import build_api

    app = build_api(make_settings())
    try:
        analyst = make_token(servers.pg_dsn, "analyst")
        headers = {"Authorization": f"Bearer {analyst}", **({"Accept": accept} if accept else {})}
        resp = app.test_client().post(f"/api/v1/sql{query}", json={"sql": "SELECT 1 AS one"}, headers=headers)
        assert resp.status_code == 200 and resp.content_type.startswith(expected)
        bad = app.test_client().post("/api/v1/sql?format=xml", json={"sql": "SELECT 1"}, headers=headers)
        assert bad.status_code == 400 and bad.json["error"]["code"] == "invalid_format"
    finally:
        app.extensions["tally_backends"].rollups.pool.close()


def test_csv_is_text_csv_in_utf_8_on_every_path(make_settings, servers, analyst_url, domain):
    """One table of result formats (olap/formats.py): the analyst server, the API's SQL relay and the
    API's series download all label CSV `text/csv; charset=utf-8` (ADR 39)."""
    from olap.formats import FORMATS
    from tally.roots import build_api

    expected = "text/csv; charset=utf-8"
    assert FORMATS["csv"].content_type == expected
    registered(servers.pg_dsn, domain)  # the API answers only registered sites (ADR 48)
    status, headers, body = query(analyst_url, "SELECT 'é' AS accent", fmt="csv")
    assert status == 200 and headers["Content-Type"] == expected and body.decode("utf-8") == "accent\r\né\r\n"
    app = build_api(make_settings())
    try:
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(servers.pg_dsn, 'admin')}"
        relayed = client.post("/api/v1/sql?format=csv", json={"sql": "SELECT 'é' AS accent"})
        assert relayed.status_code == 200 and relayed.headers["Content-Type"] == expected
        by_accept = client.post("/api/v1/sql", json={"sql": "SELECT 1 AS one"}, headers={"Accept": expected})
        assert by_accept.status_code == 200 and by_accept.headers["Content-Type"] == expected
        assert by_accept.get_data() == b"one\r\n1\r\n"
        series = client.get(f"/api/v1/domains/{domain}/impressions", query_string={"format": "csv"})
        assert series.status_code == 200 and series.headers["Content-Type"] == expected
        assert series.get_data(as_text=True).startswith("start,end,count,valued,value_sum,length_s\r\n")
    finally:
        app.extensions["tally_backends"].rollups.pool.close()


def test_a_huge_constant_column_is_stopped_by_the_default_memory_cap_not_materialised_here(analyst_url):
    """1,000 rows of 1 MB each once took the API to 4.87 GB RSS. ClickHouse counts a constant column once in
    max_result_bytes, so the default memory cap (512 MiB) is what stops it, inside ClickHouse."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for fmt in ("json", "csv"):
        status, _, body = query(analyst_url, "SELECT repeat('x', 1000000) AS s FROM numbers(1000)", fmt=fmt)
        assert status == 400, body[:200]
        assert json.loads(body)["error"]["code"] in ("query_failed", "result_too_large")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 700, f"this process grew by {grown_mb:.0f} MB"


def test_freshness_times_carry_their_zone_even_when_the_driver_hands_them_back_naive():
    """The loader's offsets' `written_at` is DateTime64(6, 'UTC'); clickhouse-connect over chDB answers it
    naive, and the API's status route relays it as an OpenAPI date-time, which needs a zone."""
    from datetime import UTC, datetime

    from olap.server import utc_iso

    assert utc_iso(datetime(2026, 12, 6, 15, 54, 23, 944108)) == "2026-12-06T15:54:23.944108+00:00"
    assert utc_iso(datetime(2026, 12, 6, 15, 54, tzinfo=UTC)) == "2026-12-06T15:54:00+00:00"
    assert utc_iso(None) is None and utc_iso(datetime(1970, 1, 1)) is None
