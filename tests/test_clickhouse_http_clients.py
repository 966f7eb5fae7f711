"""Real ClickHouse clients other than clickhouse-connect against the ClickHouse-compatible endpoint (issue 18).

- The official Node client `@clickhouse/client` (pinned by tests/node/package-lock.json), installed with
  `npm ci` into a cache directory shared between runs (NODE_PATH points there), driven by tests/node/clients.cjs;
  skipped only where `node` or `npm` is absent.
- Raw HTTP shaped as curl sends it (GET `?query=`, POST body with curl's form content type, `/ping`, gzip,
  basic auth and the `X-ClickHouse-User`/`-Key` headers) and as Grafana's ClickHouse data source does over HTTP
  (clickhouse-go v2.43, the version grafana/clickhouse-datasource pins: POST body, `default_format=Native`,
  `client_protocol_version`, `database`, settings as URL arguments, `max_execution_time` from its query timeout,
  `Accept-Encoding: gzip`, the `SELECT displayName(), version(), revision(), timezone()` handshake).
- The escape corpus of tests/test_analyst.py through the endpoint: every refusal still refused, in
  ClickHouse's error shape, with no answer rows.

One endpoint for the module, in this process over the session's analyst server.
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import pytest

from tests.conftest import registered
from tests.test_analyst import ESCAPES
from tests.test_analyst_server import make_token
from tests.test_clickhouse_http import endpoint_settings, request, serve_endpoint

NODE_DIR = Path(__file__).parent / "node"
NODE_CLIENT_VERSION = "1.23.1"
#: ClickHouse's error body: `Code: <n>. DB::Exception: <message>. (<NAME>) (version <v>)`
ERROR_BODY = re.compile(r"Code: (\d+)\. DB::Exception: (.+) \(([A-Z][A-Z0-9_]+)\) \(version [^)]+\)\n?", re.S)
#: clickhouse-go v2.43 (grafana/clickhouse-datasource's pin) over HTTP: its URL arguments and handshake
GO_PROTOCOL_VERSION = 54460
GO_HELLO = "SELECT displayName(), version(), revision(), timezone()"
#: its User-Agent: the products Grafana adds, clickhouse-go, then the comments (client_info.go)
GO_AGENT = ("grafana/12.3.0 clickhouse-datasource/4.11.2 clickhouse-go/2.43.0 "
            "(grafana_user:admin; lv:go/1.26.0; os:linux)")


# ------------------------------------------------------------------------------------------- the endpoint

@dataclass(frozen=True)
class Endpoint:
    port: int
    analyst: str = field(repr=False)  # tokens stay out of failure reports
    customer: str = field(repr=False)
    analyst_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def endpoint(servers, analyst_url, tmp_path_factory):
    """`tally clickhouse-http`'s app, started as tests/test_clickhouse_http.py starts it, with tokens of its own."""
    domain = registered(servers.pg_dsn, f"d{uuid.uuid4().hex[:10]}.example.com")
    analyst = make_token(servers.pg_dsn, "analyst")
    port, server = serve_endpoint(endpoint_settings(servers, analyst_url, tmp_path_factory.mktemp("chhttp-clients")))
    yield Endpoint(port, analyst, make_token(servers.pg_dsn, "customer", (domain,)),
                   "_".join(analyst.split("_")[1:3]))
    server.close()


def basic(token: str, user: str = "analyst") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def ch_error(status: int, headers: dict[str, str], body: bytes) -> tuple[int, str, str]:
    """(code, message, NAME) of a ClickHouse-shaped error answer; fails on anything else."""
    text = body.decode("utf-8", "replace")
    assert 400 <= status < 600, (status, text[:300])
    found = ERROR_BODY.fullmatch(text)
    assert found, f"not ClickHouse's error shape: {text[:300]!r}"
    assert headers.get("x-clickhouse-exception-code") == found.group(1), (headers, text[:200])
    return int(found.group(1)), found.group(2), found.group(3)


# ------------------------------------------------------------------------- the official Node client

def npm_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tally-test-npm"


def installed_node_modules() -> tuple[Path, float | None]:
    """node_modules with the pinned client, installed once per lock file content: (path, seconds it took or None
    when it was there already). `npm ci` checks the lock's integrity hashes; a file lock serialises installs."""
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    digest = hashlib.sha256((NODE_DIR / "package.json").read_bytes() + lock).hexdigest()[:16]
    root = npm_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    home = root / digest
    marker = home / "node_modules" / "@clickhouse" / "client" / "package.json"
    with open(root / f"{digest}.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if marker.exists() and json.loads(marker.read_text())["version"] == NODE_CLIENT_VERSION:
            return home / "node_modules", None
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir()
        for name in ("package.json", "package-lock.json"):
            shutil.copy(NODE_DIR / name, home / name)
        started = time.monotonic()
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=home,
                              capture_output=True, text=True, timeout=600)
        took = time.monotonic() - started
        assert done.returncode == 0, f"npm ci failed in {home}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        (home / "installed.json").write_text(json.dumps({"seconds": round(took, 1), "at": time.time()}))
        return home / "node_modules", took


@pytest.fixture(scope="module")
def node(endpoint):
    """Every call of tests/node/clients.cjs against the endpoint, run once: {call: outcome}."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH: the official Node client cannot be installed or run here")
    modules, took = installed_node_modules()
    if took is not None:
        print(f"npm ci of @clickhouse/client@{NODE_CLIENT_VERSION}: {took:.1f} s (cached in {modules.parent})")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "NODE_PATH": str(modules),
           "TALLY_CH_URL": endpoint.url, "TALLY_CH_ANALYST": endpoint.analyst,
           "TALLY_CH_CUSTOMER": endpoint.customer}
    done = subprocess.run(["node", str(NODE_DIR / "clients.cjs")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["_client_version"]["value"] == NODE_CLIENT_VERSION
    return report


def ok(node, call: str):
    outcome = node[call]
    assert outcome["ok"], f"{call}: {outcome['error']}"
    return outcome["value"]


def refused(node, call: str) -> dict:
    outcome = node[call]
    assert not outcome["ok"], f"{call} was answered: {outcome['value']}"
    error = outcome["error"]
    assert error["cls"] == "ClickHouseError", error  # the client parsed ClickHouse's error shape
    return error


def test_node_ping_and_select_ping(node):
    assert ok(node, "ping") == {"success": True, "error": None}
    assert ok(node, "ping_select") == {"success": True, "error": None}


def test_node_query_json_each_row_with_its_query_id_and_headers(node):
    got = ok(node, "json_each_row")
    assert got["rows"] == [{"n": 0, "s": "0"}, {"n": 1, "s": "1"}, {"n": 2, "s": "2"}]
    assert got["query_id"] == "tally-node-json-each-row"
    assert got["headers"]["x-clickhouse-query-id"] == "tally-node-json-each-row"
    assert got["headers"]["x-clickhouse-format"] == "JSONEachRow"
    assert json.loads(got["headers"]["x-clickhouse-summary"])["result_bytes"] is not None  # only what is known
    assert got["headers"]["x-clickhouse-timezone"]


def test_node_json_document(node):
    got = ok(node, "json_document")
    assert got["meta"] == [{"name": "n", "type": "UInt32"}, {"name": "s", "type": "String"}]
    assert got["data"] == [{"n": 0, "s": "0"}, {"n": 1, "s": "1"}, {"n": 2, "s": "2"}] and got["rows"] == 3


def test_node_csv_and_tsv_text(node):
    got = ok(node, "csv_text")
    assert got["text"] == '0,"a,""b0"\n1,"a,""b1"\n2,"a,""b2"\n'
    assert got["headers"]["x-clickhouse-format"] == "CSV"
    assert ok(node, "tsv_with_names_text")["text"] == "n\ts\n0\t0\n1\t1\n2\t2\n"


def test_node_stream(node):
    got = ok(node, "stream")
    assert got["rows"] == 5000 and got["sum"] == sum(range(5000)) and got["chunks"] >= 1


def test_node_query_params_are_bound_not_pasted(node):
    got = ok(node, "query_params")
    value = "it's a 'quoted' \\ value; DROP TABLE tally.events"
    assert got["rows"] == [{"x": 42, "s": value, "len": len(value.encode())}]


def test_node_harmless_settings_are_honoured(node):
    got = ok(node, "harmless_settings")
    assert got["rows"] == [{"big": "7", "t": "2026-01-02T03:04:05Z"}]


def test_node_settings_that_would_lift_a_limit_are_refused(node):
    for call in ("refused_setting_readonly", "refused_setting_limit"):
        error = refused(node, call)
        assert error["code"] in ("115", "164"), error


def test_node_compression_both_ways(node):
    got = ok(node, "response_compression")
    assert got["rows"] == [{"n": 0, "s": "0"}, {"n": 1, "s": "1"}, {"n": 2, "s": "2"}]
    assert got["headers"]["content-encoding"] == "gzip"
    assert ok(node, "request_compression")["rows"] == got["rows"]


def test_node_session_id_is_accepted(node):
    assert ok(node, "session_option")["rows"] == [{"n": 0, "s": "0"}, {"n": 1, "s": "1"}, {"n": 2, "s": "2"}]


def test_node_reads_tally_tables_with_and_without_a_database(node):
    assert ok(node, "events_table")["rows"] == [{"ok": 1, "sane": 1}]
    assert ok(node, "database_option")["rows"] == [{"ok": 1}]


def test_node_exec_with_its_own_format_clause(node):
    assert ok(node, "exec_with_own_format")["text"] == "one\n1\n"


def test_node_customer_and_bad_tokens_are_refused_with_clickhouse_codes(node):
    assert refused(node, "customer_token")["code"] == "497"
    assert refused(node, "wrong_token")["code"] == "516"
    assert refused(node, "no_password")["code"] == "516"


def test_node_escapes_writes_and_statements_are_refused(node):
    assert refused(node, "refused_system_users")["code"] == "497"
    assert refused(node, "refused_file")["code"] == "497"
    for call in ("refused_insert", "refused_command"):
        error = refused(node, call)
        assert error["code"] in ("62", "36", "164", "497"), error


def test_node_queries_are_audited_with_the_client(node, endpoint, servers):
    with psycopg.connect(servers.pg_dsn) as conn:
        clients = {row[0] for row in conn.execute(
            "SELECT client FROM analyst_queries WHERE token_id = %s", (endpoint.analyst_id,))}
    assert any(c and c.startswith(f"clickhouse-js/{NODE_CLIENT_VERSION}") for c in clients), clients


# --------------------------------------------------------------------------------------- raw HTTP: curl

def test_curl_get_query_answers_tab_separated(endpoint):
    status, headers, body = request(endpoint, "GET", "/?" + urlencode({"query": "SELECT 1"}), headers={
        **basic(endpoint.analyst, "x"), "User-Agent": "curl/7.88.1", "Accept": "*/*"})
    assert (status, body) == (200, b"1\n")
    assert headers["x-clickhouse-format"] == "TabSeparated"
    assert headers["x-clickhouse-query-id"] and headers["x-clickhouse-timezone"]
    assert "result_bytes" in json.loads(headers["x-clickhouse-summary"])  # only what is known (no made-up 0s)


def test_curl_post_body_with_curls_form_content_type(endpoint):
    """`curl --data-binary 'SELECT ...'` labels the body application/x-www-form-urlencoded: it is still the query."""
    sql = b"SELECT 'a=b&c=d' AS s, 2 AS n FORMAT CSVWithNames"
    status, headers, body = request(endpoint, "POST", "/", sql, {
        **basic(endpoint.analyst), "Content-Type": "application/x-www-form-urlencoded", "User-Agent": "curl/7.88.1"})
    assert (status, body) == (200, b'"s","n"\n"a=b&c=d",2\n'), body[:300]
    assert headers["x-clickhouse-format"] == "CSVWithNames"


def test_ping_and_root_answer_ok_without_a_token(endpoint):
    for target in ("/ping", "/"):
        status, _, body = request(endpoint, "GET", target)
        assert (status, body) == (200, b"Ok.\n"), target


def test_clickhouse_user_and_key_headers_authenticate(endpoint):
    status, _, body = request(endpoint, "POST", "/?default_format=JSONCompact", b"SELECT 3 AS three", {
        "X-ClickHouse-User": "analyst", "X-ClickHouse-Key": endpoint.analyst})
    assert status == 200 and json.loads(body)["data"] == [[3]]


def test_format_from_the_header_and_from_default_format(endpoint):
    auth = basic(endpoint.analyst)
    status, headers, body = request(endpoint, "POST", "/", b"SELECT 4 AS four", {**auth,
                                                                               "X-ClickHouse-Format": "JSONEachRow"})
    assert (status, body, headers["x-clickhouse-format"]) == (200, b'{"four":4}\n', "JSONEachRow")
    status, headers, body = request(endpoint, "GET", "/?" + urlencode(
        {"query": "SELECT 5 AS five", "default_format": "TabSeparatedWithNames"}), headers=auth)
    assert (status, body) == (200, b"five\n5\n")


def test_query_id_is_echoed(endpoint):
    query_id = f"curl-{uuid.uuid4()}"
    status, headers, _ = request(endpoint, "GET", "/?" + urlencode({"query": "SELECT 1", "query_id": query_id}),
                                 headers=basic(endpoint.analyst))
    assert status == 200 and headers["x-clickhouse-query-id"] == query_id


def test_gzip_response_when_asked_and_gzip_request_body(endpoint):
    auth = basic(endpoint.analyst)
    sql = "SELECT toUInt32(number) AS n FROM numbers(1000) FORMAT TSV"
    expected = "".join(f"{i}\n" for i in range(1000)).encode()
    status, headers, body = request(endpoint, "POST", "/?enable_http_compression=1", sql.encode(),
                                    {**auth, "Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert gzip.decompress(body) == expected
    status, headers, body = request(endpoint, "POST", "/", gzip.compress(sql.encode()),
                                    {**auth, "Content-Encoding": "gzip"})
    assert (status, body) == (200, expected)


def test_no_token_wrong_token_and_customer_token(endpoint):
    status, headers, body = request(endpoint, "GET", "/?query=SELECT%201")
    assert status == 401 and ch_error(status, headers, body)[0] == 516
    status, headers, body = request(endpoint, "GET", "/?query=SELECT%201", headers=basic("tly_tok_0000000000_nope"))
    assert status == 401 and ch_error(status, headers, body)[0] == 516
    status, headers, body = request(endpoint, "GET", "/?query=SELECT%201", headers=basic(endpoint.customer))
    assert status == 403 and ch_error(status, headers, body)[0] == 497
    status, headers, body = request(endpoint, "POST", "/", b"SELECT 1", {
        "X-ClickHouse-User": "c", "X-ClickHouse-Key": endpoint.customer})
    assert status == 403 and ch_error(status, headers, body)[0] == 497


# ---------------------------------------------------------------------- raw HTTP: Grafana (clickhouse-go)

def read_varuint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


FIXED = {"UInt8": "<B", "UInt16": "<H", "UInt32": "<I", "UInt64": "<Q", "Int8": "<b", "Int16": "<h", "Int32": "<i",
         "Int64": "<q", "Float64": "<d", "DateTime": "<I"}


def read_native(buf: bytes, revision: int) -> tuple[list[tuple[str, str]], list[list[object]]]:
    """The columns and rows of a Native answer as clickhouse-go reads it at `revision` (simple types only)."""
    columns: list[tuple[str, str]] = []
    rows: list[list[object]] = []
    pos = 0
    while pos < len(buf):
        ncols, pos = read_varuint(buf, pos)
        nrows, pos = read_varuint(buf, pos)
        block: list[list[object]] = []
        columns = []
        for _ in range(ncols):
            names = []
            for _ in range(2):
                size, pos = read_varuint(buf, pos)
                names.append(buf[pos:pos + size].decode())
                pos += size
            name, kind = names
            if revision >= 54454:  # DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION: a "custom serialization" byte
                assert buf[pos] == 0, (f"clickhouse-go fails here: 'custom serialization for column {name}. not "
                                       f"supported' (no 0 byte after the type at protocol version {revision})")
                pos += 1
            values: list[object] = []
            fmt = FIXED.get(kind.split("(")[0])
            for _ in range(nrows):
                if kind == "String":
                    size, pos = read_varuint(buf, pos)
                    values.append(buf[pos:pos + size].decode())
                    pos += size
                else:
                    assert fmt, f"no reader for {kind} here"
                    values.append(struct.unpack_from(fmt, buf, pos)[0])
                    pos += struct.calcsize(fmt)
            columns.append((name, kind))
            block.append(values)
        rows.extend(list(r) for r in zip(*block, strict=True))
    return columns, rows


def go_request(endpoint: Endpoint, sql: str, **settings: str) -> tuple[int, dict[str, str], bytes]:
    """One query the way clickhouse-go sends it over HTTP for Grafana: settings and protocol in the URL, the
    query in the POST body, basic auth (no TLS), gzip accepted, Grafana's query timeout as max_execution_time."""
    args = {"database": "tally", "max_execution_time": "65", **settings, "default_format": "Native",
            "client_protocol_version": str(GO_PROTOCOL_VERSION), "query_id": str(uuid.uuid4())}
    return request(endpoint, "POST", "/?" + urlencode(args), sql.encode(), {
        **basic(endpoint.analyst, "grafana"), "User-Agent": GO_AGENT, "Accept-Encoding": "gzip",
        "Content-Type": "text/plain; charset=utf-8"})


def go_body(headers: dict[str, str], body: bytes) -> bytes:
    return gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body


def go_handshake(endpoint: Endpoint) -> int:
    """clickhouse-go's HTTP handshake; the revision it then reads every Native answer at. It reads this answer at
    its own protocol version (conn_http.go: dialHttp, queryHello; lib/proto/block.go: Decode)."""
    status, headers, body = go_request(endpoint, GO_HELLO)
    assert status == 200, body[:300]
    columns, rows = read_native(go_body(headers, body), GO_PROTOCOL_VERSION)
    assert [kind for _, kind in columns] == ["String", "String", "UInt32", "String"]
    (display, version, revision, zone), = rows
    assert display and re.match(r"\d+\.\d+", str(version)) and isinstance(revision, int) and zone
    return revision


def test_grafana_handshake_ping_and_a_panel_query(endpoint):
    revision = go_handshake(endpoint)
    status, headers, body = go_request(endpoint, "SELECT 1")  # db.PingContext
    assert status == 200 and read_native(go_body(headers, body), revision) == ([("1", "UInt8")], [[1]])
    panel = ("SELECT toUInt32(number) AS n, toString(number) AS s FROM numbers(3) "
             "WHERE n IN (SELECT toUInt32(number) FROM numbers(10)) ORDER BY n")
    status, headers, body = go_request(endpoint, panel)
    assert status == 200, body[:300]
    assert read_native(go_body(headers, body), revision) == (
        [("n", "UInt32"), ("s", "String")], [[0, "0"], [1, "1"], [2, "2"]])
    status, headers, body = go_request(endpoint, "SELECT count() AS c FROM tally.events")
    assert status == 200 and read_native(go_body(headers, body), revision)[0] == [("c", "UInt64")]


def test_grafana_row_limit_setting_is_honoured(endpoint):
    """With the data source's "Enable row limit", clickhouse-go sends Grafana's row limit as the `limit` setting:
    it only ever lowers what is returned."""
    revision = go_handshake(endpoint)
    status, headers, body = go_request(endpoint, "SELECT toUInt32(number) AS n FROM numbers(10)", limit="2")
    assert status == 200, body[:300]
    assert read_native(go_body(headers, body), revision) == ([("n", "UInt32")], [[0], [1]])


@pytest.mark.parametrize("asked", [0, 54453, 54454, GO_PROTOCOL_VERSION])
def test_the_handshake_is_written_at_the_revision_asked_and_says_54453(asked):
    from olap.ch_native import NATIVE_REVISION, handshake_block

    block = handshake_block("tally", "26.9.2.1", "UTC", asked)
    assert read_native(block, asked) == ([("displayName()", "String"), ("version()", "String"),
                                          ("revision()", "UInt32"), ("timezone()", "String")],
                                         [["tally", "26.9.2.1", NATIVE_REVISION, "UTC"]])
    assert NATIVE_REVISION < 54454


def test_a_clickhouse_server_is_asked_for_native_at_the_handshakes_revision_at_most():
    from olap.ch_native import capped_revision

    assert capped_revision({"client_protocol_version": "54460", "limit": "2"}) == {
        "client_protocol_version": "54453", "limit": "2"}
    assert capped_revision({"client_protocol_version": "54000"}) == {"client_protocol_version": "54000"}
    assert capped_revision({"limit": "2"}) == {"limit": "2"}


def test_grafana_handshake_through_a_format_clause_and_without_a_protocol_version(endpoint):
    """Without client_protocol_version (revision 0) the same answer has no custom-serialization byte."""
    status, _headers, body = request(endpoint, "POST", "/", (GO_HELLO + " FORMAT Native").encode(),
                                     basic(endpoint.analyst))
    assert status == 200
    assert read_native(body, 0)[1][0][2] == 54453


def test_grafana_error_is_clickhouse_shaped(endpoint):
    status, headers, body = go_request(endpoint, "SELECT * FROM system.users")
    code, message, name = ch_error(status, headers, go_body(headers, body))
    assert (code, name) == (497, "ACCESS_DENIED") and "system.users" in message


# ------------------------------------------------------------------- the escape corpus through the endpoint

#: Corpus entries the ClickHouse interface answers by design: a trailing FORMAT clause picks the output format
#: there (clickhouse-connect and the Node client append one to every query).
ANSWERED_HERE = {"SELECT 1 FORMAT JSON", "select 1 format TabSeparated"}
#: Refusals of a statement kind, a SETTINGS clause, a parameter or an empty query: the endpoint has its own
#: rules and words for those (ClickHouse's session and settings conventions, docs/clickhouse-http.md), so only
#: the refusal itself is held. A refused table, function, file, statement count or syntax is named as in the corpus.
ENDPOINT_WORDED = {"only SELECT", "SETTINGS", "non-empty", "query parameters"}
CORPUS = [(sql, words) for sql, words in ESCAPES if sql not in ANSWERED_HERE]


def assert_refused(status: int, headers: dict[str, str], body: bytes, words: str) -> None:
    code, message, _name = ch_error(status, headers, body)
    assert code in (497, 62, 36, 164, 115, 60, 46, 47, 456), (code, message)
    assert words in ENDPOINT_WORDED or words.lower() in message.lower(), message
    assert b"root:" not in body  # nothing of /etc/passwd


@pytest.mark.parametrize("sql, words", CORPUS)
def test_escape_attempt_is_refused_through_the_endpoint(endpoint, sql, words):
    status, headers, body = request(endpoint, "POST", "/", sql.encode(), basic(endpoint.analyst))
    assert_refused(status, headers, body, words)


def test_escape_corpus_is_refused_over_get_and_with_clickhouse_headers(endpoint):
    failures = []
    for sql, words in CORPUS:
        if not sql:
            continue  # GET / without a query is the health answer, as on ClickHouse
        for method, target, body, headers in (
                ("GET", "/?" + urlencode({"query": sql}), None, basic(endpoint.analyst)),
                ("POST", "/?default_format=JSONEachRow", sql.encode(),
                 {"X-ClickHouse-User": "a", "X-ClickHouse-Key": endpoint.analyst})):
            status, got_headers, got = request(endpoint, method, target, body, headers)
            try:
                assert_refused(status, got_headers, got, words)
            except AssertionError as exc:
                failures.append(f"{method} {sql!r}: {exc}")
    assert not failures, failures[:10]


def test_escape_corpus_split_between_the_url_and_the_body_is_refused(endpoint):
    """ClickHouse joins `?query=` and the body with a newline: the joined text is what gets checked. (The words
    may differ: a newline ends a `--` comment that a space did not.)"""
    failures = []
    for sql, _words in CORPUS:
        cut = sql.find(" ", len(sql) // 2)
        if cut < 0:
            continue
        target = "/?" + urlencode({"query": sql[:cut]})
        status, headers, body = request(endpoint, "POST", target, sql[cut + 1:].encode(), basic(endpoint.analyst))
        try:
            assert_refused(status, headers, body, "")
        except AssertionError as exc:
            failures.append(f"{sql!r}: {exc}")
    assert not failures, failures[:10]


@pytest.mark.parametrize("sql", sorted(ANSWERED_HERE))
def test_a_trailing_format_clause_is_the_output_format_here(endpoint, sql):
    status, headers, body = request(endpoint, "POST", "/", sql.encode(), basic(endpoint.analyst))
    assert status == 200, body[:300]
    expected = {"JSON": "JSON", "TabSeparated": "TabSeparated"}[sql.split()[-1]]
    assert headers["x-clickhouse-format"] == expected
    if expected == "JSON":
        assert json.loads(body)["data"] == [{"1": 1}]
    else:
        assert body == b"1\n"


def test_the_corpus_through_the_endpoint_is_most_of_it():
    assert len(CORPUS) >= 80


# ----------------------------------------- the caps, last: a cut answer must leave nothing behind it

def test_the_result_caps_hold_in_clickhouse_shape(endpoint):
    status, headers, body = request(endpoint, "POST", "/", b"SELECT number FROM numbers(100000) FORMAT TSV",
                                    basic(endpoint.analyst))
    code = int(headers.get("x-clickhouse-exception-code", "0"))
    assert code == 396, (status, headers, body[:200])
    assert b"TOO_MANY_ROWS_OR_BYTES" in body and b"99999\n" not in body


@pytest.mark.parametrize("fmt", ["TSV", "JSONEachRow", "Native", "CSVWithNames"])
def test_a_result_over_the_cap_never_arrives_complete(endpoint, fmt):
    """Over the row cap after a first small block: a ClickHouse-shaped error, or, once rows have gone out, a
    body cut short (never a complete-looking answer missing its tail)."""
    sql = f"SELECT number FROM (SELECT number FROM numbers(5) UNION ALL SELECT number FROM numbers(20000)) FORMAT {fmt}"
    try:
        status, headers, body = request(endpoint, "POST", "/", sql.encode(), basic(endpoint.analyst))
    except http.client.IncompleteRead:
        return
    code, message, name = ch_error(status, headers, body)
    assert (code, name) == (396, "TOO_MANY_ROWS_OR_BYTES"), message


@pytest.mark.parametrize("fmt", ["CSVWithNames", "TabSeparatedWithNames", "Native", "JSONEachRow"])
def test_an_answer_cut_by_a_cap_leaves_nothing_for_the_next_query(endpoint, fmt):
    """What an over-the-cap query had written (its header, some rows) must not turn up in the next answer of the
    same analyst ClickHouse client: the next queries get their own answers, whole."""
    over = f"SELECT number FROM numbers(100000) FORMAT {fmt}"
    for _ in range(3):  # more rounds than query slots: every slot gets a cut query and a next one
        try:
            request(endpoint, "POST", "/", over.encode(), basic(endpoint.analyst))
        except http.client.IncompleteRead:
            pass
        status, _, body = request(endpoint, "POST", "/", b"SELECT 41 + 1 AS x FORMAT TSV", basic(endpoint.analyst))
        assert (status, body) == (200, b"42\n"), body[:200]
