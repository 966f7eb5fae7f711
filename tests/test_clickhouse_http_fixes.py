"""The ClickHouse-compatible endpoint after the new-analyst walkthrough of issue 18 (its items 4, 5, 6, 8, 9, 11,
15, 20, 21-24, 28): status and banner, error text, writes refused as read-only, harmless settings and SETTINGS
clauses, the summary header and sql-log rows, keep-alive, and the docs agreeing with the code.

Against the module endpoint of tests/test_clickhouse_http.py (the session's analyst server and PostgreSQL);
no stack of its own.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from tests import test_clickhouse_http
from tests.test_analyst_server import SLOW_SQL
from tests.test_clickhouse_http import basic, ch_error, client, request

ROOT = Path(__file__).resolve().parents[1]
endpoint = test_clickhouse_http.endpoint  # the module's endpoint (a fixture)


def post(ep, sql: str, **args: str) -> tuple[int, dict[str, str], bytes]:
    target = "/?" + urlencode(args) if args else "/"
    return request(ep, "POST", target, sql.encode(), basic(ep.analyst))


# ------------------------------------------------------------------------- item 8: the error text, once


@pytest.mark.parametrize(("sql", "args", "code", "name"), [
    ("SELEC 1", {}, 62, "SYNTAX_ERROR"),
    ("SELECT no_such_column", {}, 47, "UNKNOWN_IDENTIFIER"),
    ("SELECT throwIf(number = 0) FROM numbers(1)", {}, 395, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO"),
    ("SELECT number FROM numbers(20000)", {"wait_end_of_query": "1"}, 396, "TOO_MANY_ROWS_OR_BYTES"),
    (SLOW_SQL, {"max_execution_time": "1", "wait_end_of_query": "1"}, 159, "TIMEOUT_EXCEEDED"),
])
def test_clickhouse_errors_say_their_code_and_name_once(endpoint, sql, args, code, name):
    c = client(endpoint)
    with pytest.raises(DatabaseError) as caught:
        c.query(sql, settings=args or None)
    text = str(caught.value)
    assert text.count("DB::Exception") == 1 and text.count(f"({name})") == 1, text
    assert "UNKNOWN_EXCEPTION" not in text and caught.value.code == code
    status, headers, body = post(endpoint, sql, **args)
    assert ch_error(status, headers, body)[::2] == (code, name)


def test_every_name_in_the_table_is_clickhouses_own(servers):
    from olap.ch_errors import NAMES
    from olap.client import connect

    codes = ",".join(str(code) for code in sorted(NAMES))
    rows = connect(servers.chdb_dsn).query(f"SELECT c, errorCodeToName(c) FROM (SELECT arrayJoin([{codes}]) AS c)")
    assert dict(rows.result_rows) == NAMES


def test_the_name_comes_from_clickhouses_message_else_the_table():
    from olap.ch_errors import exception_text

    theirs = "Code: 62. DB::Exception: Syntax error: failed at position 1. (SYNTAX_ERROR) (version 26.9.2.1)"
    assert exception_text(62, theirs, "tally") == (
        "Code: 62. DB::Exception: Syntax error: failed at position 1. (SYNTAX_ERROR) (version tally)\n")
    assert exception_text(159, "the query ran longer than 3 s (max execution time)", "tally") == (
        "Code: 159. DB::Exception: the query ran longer than 3 s (max execution time). (TIMEOUT_EXCEEDED) "
        "(version tally)\n")
    assert exception_text(999, "odd", "tally").endswith("(UNKNOWN_EXCEPTION) (version tally)\n")


# ---------------------------------------------------------------- item 9: writes are refused as read-only


def test_clickhouse_connect_insert_is_refused_as_read_only(endpoint):
    c = client(endpoint)
    with pytest.raises(DatabaseError) as caught:
        c.insert("tally.sites", [["x.example", "Acme"]], column_names=["domain", "account"])
    assert caught.value.code == 164
    assert "INSERT is not allowed: the analyst endpoint is read-only" in str(caught.value)
    assert str(caught.value).count("DB::Exception") == 1


@pytest.mark.parametrize("sql", [
    "INSERT INTO tally.events VALUES (1)", "insert into tally.sites (domain) values ('a')",
    "/* c */ -- line\n INSERT INTO tally.sites SELECT * FROM tally.sites", "CREATE TABLE t (x UInt8) ENGINE = Memory",
    "ALTER TABLE tally.events DELETE WHERE 1", "DROP TABLE tally.events", "TRUNCATE TABLE tally.events",
    "OPTIMIZE TABLE tally.events FINAL", "SYSTEM SHUTDOWN", "KILL QUERY WHERE 1", "DELETE FROM tally.events WHERE 1",
    "SET max_threads = 64", "USE system", "GRANT ALL ON *.* TO default", "RENAME TABLE tally.events TO tally.x",
])
def test_statements_that_write_or_keep_state_are_refused_as_read_only(endpoint, sql):
    status, headers, body = post(endpoint, sql)
    code, message, name = ch_error(status, headers, body)
    word = sql.split("--")[-1].split("\n")[-1].split()[0].upper() if "--" in sql else sql.split()[0].upper()
    assert (status, code, name) == (400, 164, "READONLY") and message.startswith(f"{word} is not allowed"), message
    if word == "SET":
        assert "SETTINGS clause" in message and "URL parameter" in message
    if word == "USE":
        assert "database=tally" in message


def test_an_insert_with_binary_rows_in_the_body_is_refused_before_the_body_is_read(endpoint):
    """clickhouse-connect and the Node client put `INSERT ... FORMAT X` in the URL and the rows in the body."""
    target = "/?" + urlencode({"query": "INSERT INTO tally.events FORMAT Native"})
    status, headers, body = request(endpoint, "POST", target, b"\x01\x00\xff\xfe\x80binary", basic(endpoint.analyst))
    code, message, _ = ch_error(status, headers, body)
    assert code == 164 and message.startswith("INSERT is not allowed: the analyst endpoint is read-only")


def test_reading_statements_are_not_taken_for_writes(endpoint):
    for sql, expected in (("SELECT 1 AS settings", b"1\n"), ("WITH 2 AS x SELECT x", b"2\n"),
                          ("(SELECT 3)", b"3\n"), ("SELECT 'INSERT' AS s", b"INSERT\n")):
        assert post(endpoint, sql)[::2] == (200, expected), sql


# -------------------------------------------------------------------- items 11, 20: harmless settings


def test_session_timezone_applies_and_is_the_answers_timezone(endpoint):
    status, headers, body = post(endpoint, "SELECT toString(toDateTime(0))", session_timezone="Asia/Tokyo")
    assert (status, body) == (200, b"1970-01-01 09:00:00\n") and headers["x-clickhouse-timezone"] == "Asia/Tokyo"
    got = client(endpoint).query("SELECT toString(toDateTime(0))", settings={"session_timezone": "America/New_York"})
    assert got.result_rows == [("1969-12-31 19:00:00",)]
    status, headers, body = post(endpoint, "SELECT 1", session_timezone="Mars/Olympus")
    assert ch_error(status, headers, body)[0] == 36


def test_extremes_and_totals_are_kept_in_clickhouse_formats(endpoint):
    status, _, body = post(endpoint, "SELECT number FROM numbers(3) FORMAT JSONCompact", extremes="1")
    assert status == 200 and json.loads(body)["extremes"] == {"min": [0], "max": [2]}
    status, _, body = post(endpoint, "SELECT number % 2 AS k, count() AS n FROM numbers(4) GROUP BY k WITH TOTALS "
                                     "ORDER BY k FORMAT JSONCompact", output_format_json_quote_64bit_integers="0")
    assert status == 200 and json.loads(body)["totals"] == [0, 4]


def test_join_use_nulls_and_prefer_column_name_to_alias_are_honoured(endpoint):
    join = ("SELECT b.y AS y FROM (SELECT 1 AS x) AS a LEFT JOIN (SELECT 2 AS x, 'q' AS y) AS b ON a.x = b.x "
            "FORMAT JSONEachRow")
    assert post(endpoint, join)[::2] == (200, b'{"y":""}\n')
    assert post(endpoint, join, join_use_nulls="1")[::2] == (200, b'{"y":null}\n')
    alias = "SELECT avg(number) AS number, max(number) AS m FROM numbers(10) FORMAT JSONEachRow"
    status, headers, body = post(endpoint, alias)
    assert status == 400  # ClickHouse: an aggregate inside an aggregate, without the setting
    assert post(endpoint, alias, prefer_column_name_to_alias="1", output_format_json_quote_64bit_integers="0")[::2] \
        == (200, b'{"number":4.5,"m":9}\n')


def test_a_settings_clause_of_allowed_settings_is_taken(endpoint):
    sql = "SELECT b.y AS y FROM (SELECT 1 AS x) AS a LEFT JOIN (SELECT 2 AS x, 'q' AS y) AS b ON a.x = b.x"
    got = client(endpoint).query(sql + " SETTINGS join_use_nulls = 1, session_timezone = 'UTC'")
    assert got.result_rows == [(None,)]
    status, _, body = post(endpoint, "SELECT number FROM numbers(3) SETTINGS extremes = 1 FORMAT JSONCompact")
    assert status == 200 and json.loads(body)["extremes"] == {"min": [0], "max": [2]}
    # the clause wins over the URL, as in ClickHouse; and max_execution_time may be lowered there too
    status, _, body = post(endpoint, "SELECT toString(toDateTime(0)) SETTINGS session_timezone = 'Asia/Tokyo', "
                                     "max_execution_time = 5", session_timezone="UTC")
    assert (status, body) == (200, b"1970-01-01 09:00:00\n")


@pytest.mark.parametrize(("where", "name", "value", "code", "why"), [
    ("url", "max_threads", "64", 164, "change a limit"), ("clause", "max_threads", "64", 164, "change a limit"),
    ("url", "max_result_rows", "100000000", 164, "change a limit"),
    ("clause", "max_execution_time", "100000", None, None),  # lowered only: accepted, the server's applies
    ("url", "allow_ddl", "1", 164, "what analyst SQL may read or do"),
    ("clause", "readonly", "0", 164, "read-only"), ("url", "log_queries", "0", 164, "what is logged"),
    ("clause", "additional_table_filters", "'x'", 164, "what analyst SQL may read or do"),
    ("url", "join_algorithm", "hash", 115, "harmless settings listed"),
    ("clause", "no_such_setting", "1", 115, "harmless settings listed"),
    ("clause", "date_time_output_format", "'evil'", 36, "cannot be"),
])
def test_settings_not_allowed_are_refused_saying_why(endpoint, where, name, value, code, why):
    if where == "url":
        status, headers, body = post(endpoint, "SELECT 1", **{name: value})
    else:
        status, headers, body = post(endpoint, f"SELECT 1 SETTINGS {name} = {value}")
    if code is None:
        assert (status, body) == (200, b"1\n")
        return
    got, message, _ = ch_error(status, headers, body)
    assert (status, got) == (400, code) and why in message and name in message, message


def test_a_settings_clause_inside_a_subquery_stays_refused(endpoint):
    status, headers, body = post(endpoint, "SELECT * FROM (SELECT 1 SETTINGS extremes = 1)")
    assert status == 400 and "SETTINGS" in ch_error(status, headers, body)[1]


def test_api_sql_still_refuses_settings_clauses(analyst_url):
    from tests.test_analyst_server import query

    status, _, body = query(analyst_url, "SELECT 1 SETTINGS extremes = 1", fmt="json")
    assert status == 400 and "SETTINGS clauses are not allowed" in json.loads(body)["error"]["message"]


# --------------------------------------------------------------------- item 6: docs = lists = the view


def _doc_names(text: str, start: str, end: str) -> set[str]:
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", text.split(start, 1)[1].split(end, 1)[0]))


def test_system_settings_lists_exactly_what_the_docs_say(endpoint):
    from olap.ch_settings import FORWARDED, LOWERED, TRANSPORT

    text = (ROOT / "docs" / "clickhouse-http.md").read_text()
    honoured = _doc_names(text, "<!-- forwarded -->", "**Lowered only**")
    ignored = _doc_names(text, "<!-- transport -->", "**Refused**") - {"readonly"}
    lowered = _doc_names(text, "**Lowered only**", "**Handled")
    not_listed = _doc_names(text, "<!-- not-listed -->", "<!-- end -->")
    assert honoured == set(FORWARDED) and ignored == set(TRANSPORT) and lowered >= set(LOWERED)
    assert not_listed <= honoured | ignored | set(LOWERED) | {"readonly"}
    view = {row[0] for row in client(endpoint).query("SELECT name FROM system.settings").result_rows}
    assert view == (honoured | ignored | set(LOWERED) | {"readonly"}) - not_listed


# ---------------------------------------------------------------------------------- item 24: keep-alive


def test_one_connection_serves_several_queries(endpoint):
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=60)
    try:
        conn.connect()
        sock = conn.sock
        for n in range(3):
            fmt = ("TSV", "JSONEachRow", "Native")[n]
            conn.request("POST", "/", f"SELECT {n} AS n FORMAT {fmt}".encode(), basic(endpoint.analyst))
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200 and body and resp.getheader("Connection") != "close"
            assert resp.getheader("Content-Length") == str(len(body))
            assert conn.sock is sock  # the same socket: the server kept it open
        conn.request("POST", "/?enable_http_compression=1", b"SELECT 7", {**basic(endpoint.analyst),
                                                                          "Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Encoding") == "gzip" and resp.read()
        assert conn.sock is sock
    finally:
        conn.close()


def test_a_long_answer_still_streams(endpoint):
    status, headers, body = post(endpoint, "SELECT number FROM numbers(9000) FORMAT JSONEachRow",
                                 output_format_json_quote_64bit_integers="1")
    assert status == 200 and len(body) > 100_000 and body.count(b"\n") == 9000
    big = "SELECT repeat('x', 100) AS s FROM numbers(5000) FORMAT TSV"
    status, headers, body = post(endpoint, big)
    assert status == 200 and len(body) == 5000 * 101 and headers.get("transfer-encoding") == "chunked"


# ------------------------------------------------------------- item 15: the summary header and sql-log rows


def test_the_summary_header_leaves_out_what_is_not_known(endpoint):
    status, headers, _ = post(endpoint, "SELECT 1")
    assert status == 200 and json.loads(headers["x-clickhouse-summary"]) == {"result_bytes": "2"}
    status, headers, _ = post(endpoint, "SELECT 1", wait_end_of_query="1")
    summary = json.loads(headers["x-clickhouse-summary"])
    assert set(summary) == {"result_bytes", "elapsed_ns"} and summary["result_bytes"] == "2"
    assert int(summary["elapsed_ns"]) > 0
    status, headers, _ = post(endpoint, "SELECT repeat('x', 100) FROM numbers(5000)")
    assert status == 200 and json.loads(headers["x-clickhouse-summary"]) == {}  # streamed: nothing known yet
    assert "0" not in json.loads(headers["x-clickhouse-summary"]).values()


def test_sql_log_shows_no_rows_for_clickhouse_formats_and_keeps_its_columns(servers, tmp_path):
    from oltp import audit
    from tests.test_analyst import sql_log

    marker = f"fmt-{uuid.uuid4().hex[:8]}"
    long_format = "JSONCompactStringsEachRowWithNamesAndTypes"
    audit.record(servers.pg_dsn, token_id="tok_00000000ee", sql=f"SELECT '{marker}' AS a", format=long_format,
                 status="ok", rows=0, bytes=99, duration_ms=4, client="node", query_id=f"{marker}-ch")
    audit.record(servers.pg_dsn, token_id="tok_00000000ee", sql=f"SELECT '{marker}' AS b", format="csv",
                 status="ok", rows=5, bytes=98, duration_ms=3, client="cli", query_id=f"{marker}-csv")
    out = sql_log(servers, tmp_path, "--last", "200")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header, mine = lines[0], [line for line in lines if marker in line]
    assert len(mine) == 2
    bytes_end = header.index("bytes") + len("bytes")  # right-aligned numbers end under their heading
    rows_end = header.index("rows") + len("rows")
    by_format = {("ch" if long_format in line else "csv"): line for line in mine}
    assert by_format["ch"][bytes_end - 2:bytes_end] == "99" and by_format["csv"][bytes_end - 2:bytes_end] == "98"
    assert by_format["ch"][rows_end - 1] == "-" and by_format["csv"][rows_end - 1] == "5"
    records = json.loads(sql_log(servers, tmp_path, "--last", "200", "--json").stdout)
    rows = {r["format"]: r["rows"] for r in records if marker in r["sql"]}
    assert rows == {long_format: None, "csv": 5}


# ------------------------------------------------------------------------------ item 4: tally status


def _stack_json(home: Path, clickhouse_http_url: str) -> None:
    (home / "run").mkdir(parents=True)
    (home / "run" / "stack.json").write_text(json.dumps({
        "pid": os.getpid(), "collector_url": "http://127.0.0.1:1", "api_url": "http://127.0.0.1:1",
        "analyst_url": "http://127.0.0.1:1", "clickhouse_http_url": clickhouse_http_url,
        "pids": {"clickhouse-http": os.getpid()}}))


def test_status_shows_the_clickhouse_http_process_up_and_down(endpoint, tmp_path):
    from rich.console import Console

    from core.config import Settings
    from infra.processes import free_port
    from tally.cmd_status import collect, render

    _stack_json(tmp_path / "up", f"http://127.0.0.1:{endpoint.port}")
    report = collect(Settings.from_env({"TALLY_HOME": str(tmp_path / "up")}), timeout_s=1)
    assert report["processes"]["clickhouse-http"] == {"state": "up", "pid": os.getpid(),
                                                      "url": f"http://127.0.0.1:{endpoint.port}", "detail": None}
    _stack_json(tmp_path / "down", f"http://127.0.0.1:{free_port()}")
    report = collect(Settings.from_env({"TALLY_HOME": str(tmp_path / "down")}), timeout_s=1)
    down = report["processes"]["clickhouse-http"]
    assert down["state"] == "down" and "/ping" in down["detail"] and report["ok"] is False
    console = Console(file=io.StringIO(), width=200)
    render(report, console)
    text = console.file.getvalue()
    assert "clickhouse-http" in text and "clickhouse-http" in text.splitlines()[-1]  # not healthy: ...
    settings_only = collect(Settings.from_env({"TALLY_HOME": str(tmp_path / "none"),
                                               "TALLY_CLICKHOUSE_HTTP_PORT": str(endpoint.port)}), timeout_s=1)
    assert settings_only["processes"]["clickhouse-http"]["state"] == "up"


# ----------------------------------------------------------------------- item 5: the banner and README


DEMO = ("demo.tally.test", "blog.tally.test", "shop.tally.test")


def test_the_banners_labels_line_up_and_the_readme_shows_it_as_printed():
    from tally.cmd_up import Banner

    banner = Banner("http://127.0.0.1:8700", "http://127.0.0.1:8701", ".tally/logs", Path(".tally/admin-token"),
                    "tly_tok_..._...", DEMO, "http://127.0.0.1:8703")
    text = banner.text()
    assert "  clickhouse http  http://127.0.0.1:8703/" in text
    starts = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in text.splitlines()
              if line.startswith("  ") and line[2] != " "}
    indents = {len(line) - len(line.lstrip()) for line in text.splitlines() if line.startswith("   ")}
    assert len(starts) == 1 and indents == starts, text  # every value, and every continuation, in one column
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"prints the URLs:\n\n```\n(tally is up\..*?)```", readme, re.DOTALL).group(1)
    assert block == text.strip("\n").replace("\nPress Ctrl-C to stop.", "") + "\n"


# -------------------------------------------------------------------- items 21-23, 28: what the docs say


def test_the_docs_cover_slots_limits_exports_node_and_the_user_name():
    text = (ROOT / "docs" / "clickhouse-http.md").read_text()
    for words in ("TALLY_SQL_MAX_CONCURRENT", "TALLY_SQL_MAX_RESULT_ROWS", "TALLY_SQL_MAX_RESULT_BYTES",
                  "query_row_block_stream", "LIMIT n OFFSET m", "@clickhouse/client", "createClient",
                  "user name is\nignored"):
        assert words in text, words
    analysts = (ROOT / "docs" / "analysts.md").read_text()
    for doc in (text, analysts, (ROOT / "README.md").read_text()):
        assert "token's id" not in doc


def test_the_user_name_is_ignored_even_when_it_is_another_tokens_id(endpoint):
    other = endpoint.admin.split("_")[2]
    assert client(endpoint, username=f"tok_{other}").command("SELECT 1") == 1
