"""The ClickHouse-compatible endpoint (issue 18 §1, ADR 50) with clickhouse-connect and raw HTTP, no mocks.

One endpoint for the module (`tally clickhouse-http`'s app from its composition root, in this process) over the
session's analyst server and PostgreSQL. Tokens are made per module.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import re
import uuid
import zlib
from dataclasses import dataclass
from urllib.parse import urlencode

import clickhouse_connect
import lz4.frame
import psycopg
import pyarrow
import pytest
from backports import zstd
from clickhouse_connect.driver.exceptions import DatabaseError

from core.config import Settings
from tests.conftest import SECRET, registered, serve_in_thread, start_analyst_server
from tests.test_analyst_server import SLOW_SQL, make_token

ERROR_BODY = re.compile(r"Code: (\d+)\. DB::Exception: (.+)\. \(([A-Z][A-Z0-9_]+)\) \(version [^)]+\)\n", re.S)


@dataclass(frozen=True)
class Endpoint:
    port: int
    analyst: str
    admin: str
    customer: str

    @property
    def token_id(self) -> str:
        return "_".join(self.analyst.split("_")[:2]) if self.analyst.count("_") >= 2 else self.analyst


def endpoint_settings(servers, analyst_url: str, home, **env: str) -> Settings:
    return Settings.from_env({
        "TALLY_HOME": str(home), "TALLY_PG_DSN": servers.pg_dsn, "TALLY_CLICKHOUSE_DSN": servers.chdb_dsn,
        "TALLY_SECRET": SECRET, "TALLY_ANALYST_URL": analyst_url,
        "TALLY_API_RATE_LIMIT": "100000/minute;10000/second", **env})


def serve_endpoint(settings: Settings):
    from infra.processes import free_port, tcp_open, wait_until
    from tally.roots import build_clickhouse_http

    port = free_port()
    server = serve_in_thread(build_clickhouse_http(settings), port)
    wait_until(lambda: tcp_open("127.0.0.1", port), what="clickhouse http endpoint", timeout=10)
    return port, server


@pytest.fixture(scope="module")
def endpoint(servers, analyst_url, tmp_path_factory):
    domain = registered(servers.pg_dsn, f"d{uuid.uuid4().hex[:10]}.example.com")
    port, server = serve_endpoint(endpoint_settings(servers, analyst_url, tmp_path_factory.mktemp("chhttp")))
    yield Endpoint(port, make_token(servers.pg_dsn, "analyst"), make_token(servers.pg_dsn, "admin"),
                   make_token(servers.pg_dsn, "customer", (domain,)))
    server.close()


def client(endpoint: Endpoint, token: str | None = None, username: str = "analyst", **kwargs):
    return clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port, username=username,
                                         password=endpoint.analyst if token is None else token, **kwargs)


def request(endpoint: Endpoint, method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=60)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def basic(token: str, user: str = "someone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def ch_error(status: int, headers: dict[str, str], body: bytes) -> tuple[int, str, str]:
    """(code, message, NAME) of an answer in ClickHouse's error shape; fails on anything else."""
    text = body.decode()
    found = ERROR_BODY.fullmatch(text)
    assert found, text[:300]
    assert headers["x-clickhouse-exception-code"] == found.group(1)
    return int(found.group(1)), found.group(2), found.group(3)


def audit_rows(pg_dsn: str, query_id: str) -> list[tuple]:
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute("SELECT status, format, client, token_id, error FROM analyst_queries "
                            "WHERE query_id = %s ORDER BY id", (query_id,)).fetchall()


# --------------------------------------------------------------------------------- clickhouse-connect


def test_clickhouse_connect_query_and_command(endpoint):
    c = client(endpoint)
    result = c.query("SELECT number AS n, toString(number) AS s FROM numbers(3) ORDER BY n")
    assert result.column_names == ("n", "s") and result.result_rows == [(0, "0"), (1, "1"), (2, "2")]
    assert c.command("SELECT 40 + 2") == 42
    assert c.query("SELECT count() FROM tally.events").result_rows[0][0] >= 0


def test_clickhouse_connect_arrow_block_stream_and_raw_csv(endpoint):
    c = client(endpoint)
    table = c.query_arrow("SELECT number AS n, toString(number) AS s FROM numbers(5)")
    assert isinstance(table, pyarrow.Table) and table.column("n").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("s").to_pylist() == ["0", "1", "2", "3", "4"]
    rows = []
    with c.query_row_block_stream("SELECT number FROM numbers(9000)") as blocks:
        for block in blocks:
            rows.extend(r[0] for r in block)
    assert rows == list(range(9000))
    assert c.raw_query("SELECT number AS n, 'a,b' AS s FROM numbers(2)", fmt="CSV") == b'0,"a,b"\n1,"a,b"\n'


def test_the_admin_token_works_and_the_user_name_is_free(endpoint):
    assert client(endpoint, endpoint.admin, username="whoever").command("SELECT 1") == 1


def test_a_customer_token_is_refused_with_access_denied(endpoint):
    with pytest.raises(DatabaseError) as caught:
        client(endpoint, endpoint.customer).query("SELECT 1")
    assert caught.value.code == 497 and "customer token may not run analyst SQL" in str(caught.value)
    status, headers, body = request(endpoint, "GET", "/?query=SELECT%201", None, basic(endpoint.customer))
    assert status == 403 and ch_error(status, headers, body)[0] == 497


def test_no_or_an_unknown_token_is_refused_with_authentication_failed(endpoint):
    for headers in ({}, basic("tly_nope_0123456789abcdef0123456789"), {"X-ClickHouse-Key": "x" * 40}):
        status, got, body = request(endpoint, "GET", "/?query=SELECT%201", None, headers)
        assert status == 401 and ch_error(status, got, body)[:1] == (516,)
        assert got["www-authenticate"].startswith("Basic")
    with pytest.raises(DatabaseError) as caught:
        client(endpoint, "not-a-token")
    assert caught.value.code == 516


def test_a_token_in_the_url_is_refused_without_being_looked_at(endpoint):
    target = "/?" + urlencode({"query": "SELECT 1", "user": "a", "password": endpoint.analyst})
    status, headers, body = request(endpoint, "GET", target)
    code, message, _name = ch_error(status, headers, body)
    assert status == 401 and code == 516 and "basic auth" in message and endpoint.analyst not in message


def test_a_setting_that_raises_a_limit_or_readonly_is_refused(endpoint):
    c = client(endpoint)
    with pytest.raises(DatabaseError) as caught:
        c.query("SELECT 1", settings={"max_memory_usage": "100000000000"})
    assert caught.value.code == 164 and "max_memory_usage" in str(caught.value)
    for name, value, code in (("readonly", "0", 164), ("max_result_rows", "100000000", 164),
                              ("allow_ddl", "1", 164), ("no_such_thing", "1", 115),
                              ("date_time_output_format", "evil", 36)):
        status, headers, body = request(endpoint, "GET", "/?" + urlencode({"query": "SELECT 1", name: value}),
                                        None, basic(endpoint.analyst))
        assert status == 400 and ch_error(status, headers, body)[0] == code, (name, body)


def test_harmless_settings_are_honoured_and_limits_may_only_go_down(endpoint):
    args = {"query": "SELECT toDateTime('2026-01-02 03:04:05', 'UTC') AS t", "date_time_output_format": "iso",
            "max_execution_time": "100000", "readonly": "1", "session_id": "s", "session_timeout": "60"}
    status, _, body = request(endpoint, "GET", "/?" + urlencode(args), None, basic(endpoint.analyst))
    assert status == 200 and body == b"2026-01-02T03:04:05Z\n"


# ------------------------------------------------------------------------------------------- raw HTTP


def test_raw_get_post_and_the_query_split_between_url_and_body(endpoint):
    auth = basic(endpoint.analyst)
    status, headers, body = request(endpoint, "GET", "/?query=SELECT%201", None, auth)
    assert (status, body) == (200, b"1\n")
    assert headers["x-clickhouse-format"] == "TabSeparated" and headers["x-clickhouse-timezone"]
    assert headers["x-clickhouse-query-id"] and json.loads(headers["x-clickhouse-summary"])["result_bytes"] == "2"
    assert headers["x-clickhouse-server-display-name"] == "tally"
    status, _, body = request(endpoint, "POST", "/", b"SELECT 2 AS x FORMAT JSONEachRow", auth)
    assert (status, body) == (200, b'{"x":2}\n')
    status, _, body = request(endpoint, "POST", "/?query=SELECT", b"3", auth)
    assert (status, body) == (200, b"3\n")
    status, headers, body = request(endpoint, "POST", "/?default_format=CSVWithNames", b"SELECT 4 AS y",
                                    {"X-ClickHouse-User": "u", "X-ClickHouse-Key": endpoint.analyst})
    assert (status, body) == (200, b'"y"\n4\n') and headers["content-type"].startswith("text/csv")


def test_ping_and_a_bare_get_answer_ok_without_a_token(endpoint):
    for target in ("/ping", "/"):
        assert request(endpoint, "GET", target)[::2] == (200, b"Ok.\n")


def test_responses_are_compressed_when_asked_and_bodies_may_be_compressed(endpoint):
    auth = basic(endpoint.analyst)
    sql = "SELECT number FROM numbers(1000) FORMAT TSV"
    expected = "".join(f"{n}\n" for n in range(1000)).encode()
    decode = {"gzip": gzip.decompress, "deflate": zlib.decompress, "zstd": zstd.decompress,
              "lz4": lz4.frame.decompress}
    for accepted, chosen in (("br, gzip", "gzip"), ("lz4,zstd,gzip,deflate", "gzip"), ("deflate", "deflate"),
                             ("zstd, lz4", "zstd"), ("lz4", "lz4")):
        status, headers, body = request(endpoint, "POST", "/?enable_http_compression=1", sql.encode(),
                                        {**auth, "Accept-Encoding": accepted})
        assert status == 200 and headers["content-encoding"] == chosen
        assert decode[chosen](body) == expected
    status, headers, body = request(endpoint, "POST", "/", sql.encode(), {**auth, "Accept-Encoding": "gzip"})
    assert status == 200 and "content-encoding" not in headers  # not asked with enable_http_compression
    status, _, body = request(endpoint, "POST", "/", zlib.compress(b"SELECT 5"),
                              {**auth, "Content-Encoding": "deflate"})
    assert (status, body) == (200, b"5\n")


def test_query_id_and_client_reach_the_audit_log(endpoint, servers):
    query_id = f"q-{uuid.uuid4().hex}"
    target = "/?" + urlencode({"query": "SELECT 1 FORMAT JSONCompact", "query_id": query_id})
    status, headers, _ = request(endpoint, "GET", target, None, {**basic(endpoint.analyst),
                                                                 "User-Agent": "curl/8.1 test"})
    assert status == 200 and headers["x-clickhouse-query-id"] == query_id
    refused_id = f"q-{uuid.uuid4().hex}"
    target = "/?" + urlencode({"query": "SELECT * FROM file('/etc/passwd')", "query_id": refused_id})
    request(endpoint, "GET", target, None, {**basic(endpoint.analyst), "User-Agent": "curl/8.1 test"})
    assert [r[:3] for r in audit_rows(servers.pg_dsn, query_id)] == [("ok", "JSONCompact", "curl/8.1 test")]
    assert [r[0] for r in audit_rows(servers.pg_dsn, refused_id)] == ["refused"]


def test_errors_are_in_clickhouse_shape_with_its_codes(endpoint):
    auth = basic(endpoint.analyst)
    cases = (("SELECT * FROM file('/etc/passwd')", 497), ("SELECT name FROM system.users", 497),
             ("SELEC 1", 62), ("SELECT 1 FORMAT Protobuf", 73), ("INSERT INTO tally.events VALUES (1)", None),
             ("SELECT 1 SETTINGS max_threads = 64", None))
    for sql, code in cases:
        status, headers, body = request(endpoint, "POST", "/", sql.encode(), auth)
        got, message, _name = ch_error(status, headers, body)
        assert status == 400 and (code is None or got == code), (sql, got, message)
        assert b"root:" not in body
    status, headers, body = request(endpoint, "GET", "/?query=SELECT%201&database=system", None, auth)
    assert ch_error(status, headers, body)[0] == 81
    with pytest.raises(DatabaseError) as caught:
        client(endpoint).query("SELECT * FROM file('/etc/passwd')")
    assert caught.value.code == 497 and "file" in str(caught.value)


def test_a_result_over_the_byte_cap_is_refused_or_cut(servers, tmp_path):
    url, analyst = start_analyst_server(servers, TALLY_SQL_MAX_RESULT_BYTES=str(128 * 1024),
                                        TALLY_SQL_MAX_RESULT_ROWS="10000000")
    port, server = serve_endpoint(endpoint_settings(servers, url, tmp_path))
    try:
        ep = Endpoint(port, make_token(servers.pg_dsn, "analyst"), "", "")
        status, headers, body = request(ep, "GET", "/?" + urlencode({
            "query": "SELECT number FROM numbers(100000)", "wait_end_of_query": "1"}), None, basic(ep.analyst))
        assert status == 400 and ch_error(status, headers, body)[0] == 396
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # streamed: cut after its first chunk
        # ClickHouse's own byte limit counts the rows in memory (1 byte each, 100 KB): ours, the output
        wide = ("SELECT toUInt8(1) AS a_column_name_long_enough_to_make_each_row_of_output_fifty_times_its_size "
                "FROM numbers(100000) FORMAT JSONEachRow")
        conn.request("GET", "/?" + urlencode({"query": wide}), headers=basic(ep.analyst))
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
    finally:
        server.close()
        analyst.close()


def test_busy_slots_answer_429_with_too_many_simultaneous_queries(servers, tmp_path):
    url, analyst = start_analyst_server(servers, TALLY_SQL_MAX_CONCURRENT="1", TALLY_SQL_MAX_EXECUTION_S="3")
    port, server = serve_endpoint(endpoint_settings(servers, url, tmp_path))
    try:
        ep = Endpoint(port, make_token(servers.pg_dsn, "analyst"), "", "")
        slow = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        slow.request("POST", "/", SLOW_SQL.encode(), basic(ep.analyst))
        for _ in range(100):  # until the slow one holds the slot
            status, headers, body = request(ep, "POST", "/", b"SELECT 1", basic(ep.analyst))
            if status == 429:
                break
        assert status == 429 and ch_error(status, headers, body)[0] == 202 and headers["retry-after"]
        slow.close()  # it is cut at its deadline; nothing here waits for that
    finally:
        server.close()
        analyst.close()


def test_unknown_paths_and_methods_answer_in_clickhouse_shape(endpoint):
    status, headers, body = request(endpoint, "GET", "/nope", None, basic(endpoint.analyst))
    assert status == 404 and ch_error(status, headers, body)[0] == 36
    status, headers, body = request(endpoint, "PUT", "/", b"SELECT 1", basic(endpoint.analyst))
    assert status == 405 and ch_error(status, headers, body)[0] == 36


def test_a_streamed_tsv_is_unchanged_for_the_api_sql_route(analyst_url):
    """/api/v1/sql keeps tally's own formats and refuses FORMAT in the text (the analyst server's contract)."""
    from tests.test_analyst_server import query

    status, _, body = query(analyst_url, "SELECT 1 FORMAT JSON", fmt="csv")
    assert status == 400 and "FORMAT clauses are not allowed" in json.loads(body)["error"]["message"]
    status, _, body = query(analyst_url, "SELECT 1", fmt="Native")
    assert status == 200 and body  # a ClickHouse format is the endpoint's request: ClickHouse encodes
    assert io.BytesIO(body).read(1) == b"\x01"  # one column


def test_the_settings_doc_lists_exactly_the_allowlist():
    """docs/clickhouse-http.md names every setting olap/ch_settings.py lets through, and no other."""
    from pathlib import Path

    from olap.ch_settings import FORWARDED, LOWERED, TRANSPORT

    text = (Path(__file__).parent.parent / "docs" / "clickhouse-http.md").read_text()
    forwarded = text.split("<!-- forwarded -->", 1)[1].split("**Lowered only**", 1)[0]
    transport = text.split("<!-- transport -->", 1)[1].split("**Refused**", 1)[0]
    named = re.compile(r"`([a-z][a-z0-9_]*)`")
    assert set(named.findall(forwarded)) == set(FORWARDED)
    assert set(named.findall(transport)) - {"readonly"} == set(TRANSPORT)
    assert set(LOWERED) == {"max_execution_time"} and "`max_execution_time`" in text


def test_sql_log_shows_the_client(servers, tmp_path):
    from oltp import audit
    from tests.test_analyst import sql_log

    marker = f"ua-{uuid.uuid4().hex[:8]}"
    audit.record(servers.pg_dsn, token_id="tok_00000000cd", sql="SELECT 1", format="Native", status="ok",
                 client=f"clickhouse-connect/1.12.0 {marker}", query_id=marker)
    out = sql_log(servers, tmp_path, "--last", "1", "--json")
    assert out.returncode == 0, out.stderr
    (record,) = json.loads(out.stdout)
    assert record["client"] == f"clickhouse-connect/1.12.0 {marker}" and record["query_id"] == marker
    text = sql_log(servers, tmp_path, "--last", "1")
    assert text.stdout.splitlines()[0].split()[3] == "client" and "clickhouse-connect/1.12.0" in text.stdout


def test_tally_clickhouse_http_serves_as_its_own_process(servers, analyst_url, tmp_path):
    """`tally clickhouse-http` (what `tally up` supervises) answers /ping and queries on its port."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from infra.processes import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_ANALYST_URL=analyst_url, TALLY_CLICKHOUSE_HTTP_PORT=str(port), TALLY_LOG_DIR="-")
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "clickhouse-http"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ep = Endpoint(port, make_token(servers.pg_dsn, "analyst"), "", "")
        deadline = time.monotonic() + 30
        while True:
            try:
                if request(ep, "GET", "/ping")[::2] == (200, b"Ok.\n"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        assert request(ep, "GET", "/?query=SELECT%2042", None, basic(ep.analyst))[::2] == (200, b"42\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_the_api_sql_route_records_its_client_too(make_settings, servers):
    from oltp import tokens
    from tally.roots import build_api

    api = build_api(make_settings()).test_client()
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "analyst", name="client audit")
    marker = f"m{uuid.uuid4().hex[:10]}"
    resp = api.post("/api/v1/sql", json={"sql": f"SELECT '{marker}' AS m"},
                    headers={"Authorization": f"Bearer {token}", "User-Agent": "tally-cli/0.1 test"})
    assert resp.status_code == 200
    with psycopg.connect(servers.pg_dsn) as conn:
        rows = conn.execute("SELECT client, format FROM analyst_queries WHERE sql LIKE %s", (f"%{marker}%",)).fetchall()
    assert rows == [("tally-cli/0.1 test", "json")]


@pytest.mark.parametrize("compress", ["lz4", "zstd", "gzip", "deflate"])
def test_clickhouse_connect_reads_each_compression_it_asks_for(endpoint, compress):
    """clickhouse-connect sends enable_http_compression=1 (the curated system.settings lists it writable, ADR 51)
    with Accept-Encoding: the endpoint answers in that encoding, and the client decodes it."""
    c = client(endpoint, compress=compress)
    assert c.compression == compress
    assert c.query("SELECT number AS n FROM numbers(2000)").result_columns[0] == list(range(2000))
    assert c.command("SELECT 'x'") == "x"


@pytest.mark.parametrize("fmt", ["CSVWithNames", "JSON", "Parquet", "TSV"])
def test_an_answer_cut_by_a_cap_leaves_nothing_for_the_next_query(endpoint, fmt):
    """chDB hands what a failed query had written to the next query on its connection unless it is taken."""
    auth = basic(endpoint.analyst)
    for _ in range(3):  # more than the query slots: each slot's client gets a cut answer and a next query
        try:
            request(endpoint, "POST", "/", f"SELECT number FROM numbers(100000) FORMAT {fmt}".encode(), auth)
        except http.client.IncompleteRead:
            pass
        assert request(endpoint, "POST", "/", b"SELECT 41 + 1 FORMAT TSV", auth)[::2] == (200, b"42\n")


def test_grafana_row_limit_and_offset_only_lower_what_comes_back(endpoint):
    args = {"query": "SELECT number FROM numbers(10)", "limit": "2", "offset": "3"}
    assert request(endpoint, "GET", "/?" + urlencode(args), None, basic(endpoint.analyst))[::2] == (200, b"3\n4\n")


def test_the_analyst_server_checks_the_new_fields_itself(analyst_url):
    """The endpoint checks settings first; the analyst server checks them again, and refuses unknown fields."""
    from core.keys import internal_token
    from tests.test_analyst_server import post

    for body, words in (({"sql": "SELECT 1", "format": "CSV", "settings": {"max_threads": "64"}}, "max_threads"),
                        ({"sql": "SELECT 1", "format": "csv", "settings": {"date_time_output_format": "iso"}},
                         "ClickHouse format only"),
                        ({"sql": "SELECT 1", "format": "CSV", "sneaky": 1}, "unknown field 'sneaky'"),
                        ({"sql": "SELECT 1", "format": "CSV", "client": "x" * 201}, "client"),
                        ({"sql": "SELECT 1", "format": "Protobuf"}, "format")):
        conn, resp = post(analyst_url, body, internal_token(SECRET))
        answer = json.loads(resp.read())
        conn.close()
        assert resp.status == 400 and words in answer["error"]["message"], (body, answer)
    conn, resp = post(analyst_url, {"sql": "SELECT 1 AS a FORMAT JSONEachRow", "format": "TabSeparated",
                                    "settings": {"wait_end_of_query": "1"}, "query_id": "q1"}, internal_token(SECRET))
    assert resp.status == 200 and resp.read() == b'{"a":1}\n'
    assert resp.getheader("X-ClickHouse-Format") == "JSONEachRow" and resp.getheader("X-ClickHouse-Query-Id") == "q1"
    conn.close()
