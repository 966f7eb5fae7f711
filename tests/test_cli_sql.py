"""`tally sql` end to end (ADR 53, ADR 40): the query from an argument, `-f FILE` or stdin; `--param` bound by
ClickHouse through the API and the analyst server; `--format pretty|csv|tsv|jsonl|json`, pretty by default on a
terminal and the old tab-separated default elsewhere; every usage error exits 2 naming what is wrong.

One real API (waitress, on a port) per module, relaying to the session's analyst server (chDB)."""

from __future__ import annotations

import http.server
import io
import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import psycopg
import pytest

from infra.processes import free_port, tcp_open, wait_until
from olap.params import MAX_PARAMS
from tally.cli import main
from tally.cmd_sql import LfRecords
from tests.conftest import SECRET, serve_in_thread

TALLY = str(Path(sys.executable).parent / "tally")


@pytest.fixture(scope="module")
def api(servers, analyst_url, tmp_path_factory):
    """(base url, analyst token) of a real API server."""
    from core.config import Settings
    from oltp import tokens
    from tally.roots import build_api

    settings = Settings.from_env({"TALLY_HOME": str(tmp_path_factory.mktemp("clisql")),
                                  "TALLY_PG_DSN": servers.pg_dsn, "TALLY_SECRET": SECRET,
                                  "TALLY_ANALYST_URL": analyst_url})
    app = build_api(settings)
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "analyst", name="test_cli_sql")
    port = free_port()
    server = serve_in_thread(app, port)
    wait_until(lambda: tcp_open("127.0.0.1", port), what="api", timeout=10)
    yield f"http://127.0.0.1:{port}", token
    server.close()
    app.extensions["tally_backends"].rollups.pool.close()


@pytest.fixture()
def sql(api, monkeypatch, tmp_path, capsys):
    """Run `tally sql ARGS --api-url <api>` in this process: (exit code, stdout, stderr)."""
    url, token = api
    monkeypatch.setenv("TALLY_TOKEN", token)
    monkeypatch.setenv("TALLY_HOME", str(tmp_path / "home"))

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["sql", *args, "--api-url", url])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_params_are_bound_end_to_end(sql):
    code, out, err = sql("SELECT {d:String} AS d, {n:UInt8} + 1 AS m, '%(d)s' AS p", "--param", "d=it's; a=b",
                         "--param", "n=41", "--format", "csv")
    assert (code, err) == (0, ""), err
    assert out == "d,m,p\nit's; a=b,42,%(d)s\n"
    code, out, _ = sql("SELECT {a:Array(String)} AS a, {t:Nullable(String)} AS t", "--param", "a=['x','y']",
                       "--param", "t=\\N", "--format", "jsonl")
    assert code == 0 and json.loads(out) == {"a": ["x", "y"], "t": None}


def test_a_query_the_api_refuses_exits_1_naming_the_parameter(sql):
    code, out, err = sql("SELECT {n:UInt8}")
    assert code == 1 and out == "" and "none was sent for {n:UInt8}" in err, err
    code, _, err = sql("SELECT {n:UInt8}", "--param", "n=lots")
    assert code == 1 and "query parameter 'n'" in err, err
    code, _, err = sql("SELECT 1", "--param", "n=1")
    assert code == 1 and "query parameter n: not used" in err, err


@pytest.mark.parametrize("fmt, expected", [
    ("csv", "x,y\n1,\"a,b\"\n"),
    ("tsv", "x\ty\n1\ta,b\n"),
    ("jsonl", '{"x":1,"y":"a,b"}\n'),
])
def test_streamed_formats_are_the_apis_encoding(sql, fmt, expected):
    code, out, _ = sql("SELECT {x:UInt8} AS x, 'a,b' AS y", "--param", "x=1", "--format", fmt)
    assert code == 0 and out == expected, out


def test_json_is_the_apis_document_ending_in_a_newline(sql):
    for args in (("--format", "json"), ("--json",)):
        code, out, _ = sql("SELECT {x:UInt8} AS x, 'a,b' AS y", "--param", "x=1", *args)
        assert code == 0 and json.loads(out) == {"columns": ["x", "y"], "types": ["UInt8", "String"],
                                                 "rows": [[1, "a,b"]], "row_count": 1}
        assert out.endswith("}\n") and out.count("\n") == 1, repr(out)  # a shell prompt starts on its own line


def test_the_default_off_a_terminal_tells_null_from_empty(sql):
    """Header line and tab-separated rows as before; NULL is `\\N` (as in tsv), '' stays empty, and a tab, a
    newline or a backslash in a value is escaped as tsv escapes it, so each row is one line."""
    code, out, _ = sql("SELECT {x:UInt8} AS x, NULL AS y, 'a b' AS z, '' AS e, 'N' AS n, "
                       "concat('t', char(9), 'n', char(10), 'b', char(92), 'N') AS s", "--param", "x=1")
    assert code == 0 and out == "x\ty\tz\te\tn\ts\n1\t\\N\ta b\t\tN\tt\\tn\\nb\\\\N\n", repr(out)


DECIMALS = ("SELECT toDecimal64(846.17, 6) AS d, toDecimal32(-1.5, 3) AS e, toDecimal64(100, 4) AS f, "
            "toDecimal64(0, 6) AS z, CAST(NULL AS Nullable(Decimal(10, 2))) AS n, toDecimal128(0.000001, 6) AS t")


def test_decimals_show_as_clickhouse_prints_them(sql):
    """The API's JSON keeps the column's scale (`"846.170000"`); the default output and pretty show `846.17`, as
    ClickHouse (and clickhouse-client) print it. Only the showing changes: --format json is the API's."""
    code, out, _ = sql(DECIMALS)
    assert code == 0 and out == "d\te\tf\tz\tn\tt\n846.17\t-1.5\t100\t0\t\\N\t0.000001\n", repr(out)
    code, out, _ = sql(DECIMALS, "--format", "pretty")
    cells = next(line for line in out.splitlines() if "846" in line).replace("│", " ").replace("|", " ").split()
    assert code == 0 and cells == ["846.17", "-1.5", "100", "0", "NULL", "0.000001"], out
    code, out, _ = sql(DECIMALS, "--format", "json")
    assert code == 0 and json.loads(out)["rows"] == [["846.170000", "-1.500", "100.0000", "0.000000", None,
                                                      "0.000001"]]


def test_decimal_text_without_trailing_zeros():
    from tally.cmd_sql import ch_decimal

    assert [ch_decimal(t) for t in ("846.170000", "100.0000", "0E-6", "-0.000", "12", "-3.10", "1E+3", "x")] == \
        ["846.17", "100", "0", "0", "12", "-3.1", "1000", "x"]


def test_csv_records_end_in_lf_as_clickhouse_client_writes_them(sql):
    """The API's CSV is RFC 4180 (CRLF); `tally sql --format csv` ends records with LF so that line tools work
    (`grep -x`), and keeps a CRLF or a quote inside a value."""
    code, out, _ = sql("SELECT 1 AS a, concat('x', char(13), char(10), 'y\"') AS b", "--format", "csv")
    assert code == 0 and out == 'a,b\n1,"x\r\ny"""\n', repr(out)
    records = LfRecords()
    chunks = [b'a,"b\r', b'\n""\r\n', b'c"\r', b'\n1,2\r', b"\n"]
    assert b"".join(records.feed(c) for c in chunks) + records.end() == b'a,"b\r\n""\r\nc"\n1,2\n'


def test_pretty_is_an_aligned_table_whose_cells_cannot_drive_the_terminal(sql):
    code, out, _ = sql("SELECT number AS n, if(number = 1, NULL, concat('v', toString(number), char(27), '[2J'))"
                       " AS label FROM numbers(3)", "--format", "pretty")
    assert code == 0
    lines = out.splitlines()
    assert "\x1b" not in out and "v0\\x1b[2J" in out, out
    widths = {len(line) for line in lines[:-1]}
    assert len(widths) == 1, out  # every line of the table is as wide as the others
    header = next(line for line in lines if " n " in line)
    assert header.index("label") > header.index("n") and "NULL" in out and lines[-1] == "3 rows"
    cells = [line for line in lines if "v2" in line][0]
    assert cells.index("2") < cells.index("v2")  # numbers are right-aligned in their column


def test_pretty_is_the_default_on_a_terminal(api, tmp_path):
    """A real pseudo-terminal as stdout: the table; the same command into a pipe: the tab-separated lines."""
    url, token = api
    env = {**os.environ, "TALLY_TOKEN": token, "TALLY_HOME": str(tmp_path), "COLUMNS": "100", "TERM": "xterm"}
    argv = [TALLY, "sql", "SELECT 1 AS one, 'x' AS s", "--api-url", url]
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        os.close(slave)
        out = read_all(master, proc)
    finally:
        os.close(master)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    text = out.decode()
    assert "one" in text and "1 row" in text and ("┃" in text or "│" in text or "|" in text), text
    piped = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert (piped.returncode, piped.stdout) == (0, "one\ts\n1\tx\n"), piped.stderr


def read_all(fd: int, proc: subprocess.Popen, timeout: float = 60.0) -> bytes:
    """Everything written to the pty `fd` until the process ends (a pty's reader gets EIO at the end)."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    return b"".join(chunks)


def test_the_query_from_a_file_or_stdin(sql, tmp_path, monkeypatch):
    query = tmp_path / "q.sql"
    query.write_text("-- the analysts' question\nSELECT {n:UInt8} AS n\n")
    assert sql("-f", str(query), "--param", "n=7", "--format", "csv")[:2] == (0, "n\n7\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT 8 AS n"))
    assert sql("-f", "-", "--format", "csv")[:2] == (0, "n\n8\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT 9 AS n;\n"))  # no argument, stdin not a terminal
    assert sql("--format", "csv")[:2] == (0, "n\n9\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT 'stdin' AS n"))  # an argument wins over stdin
    assert sql("SELECT 10 AS n", "--format", "csv")[:2] == (0, "n\n10\n")


def usage_cases(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty.sql").write_text("  \n")
    (tmp / "latin1.sql").write_bytes("SELECT 'é'".encode("latin-1"))
    (tmp / "dir").mkdir()
    many = [arg for i in range(MAX_PARAMS + 1) for arg in ("--param", f"p{i}=1")]
    return [
        (["SELECT 1", "-f", str(tmp / "empty.sql")], "not both"),
        (["-f", str(tmp / "missing.sql")], f"cannot read the query from {tmp / 'missing.sql'}: No such file"),
        (["-f", str(tmp / "dir")], "Is a directory"),
        (["-f", str(tmp / "latin1.sql")], "cannot read the query from"),
        (["-f", str(tmp / "empty.sql")], "is empty"),
        (["   "], "the query from the argument is empty"),
        (["SELECT {n:UInt8}", "--param", "n"], "--param takes NAME=VALUE (got 'n')"),
        (["SELECT {n:UInt8}", "--param", "n=1", "--param", "n=2"], "--param n is given twice"),
        (["SELECT {n:UInt8}", "--param", "n-1=1"], "name 'n-1' is not valid"),
        (["SELECT {n:UInt8}", "--param", "=1"], "name '' is not valid"),
        (["SELECT 1", *many], f"at most {MAX_PARAMS} query parameters"),
        (["SELECT 1", "--param", f"n={'x' * 20000}"], "at most 16384 bytes"),
    ]


def test_usage_errors_exit_2_naming_what(sql, tmp_path):
    for args, words in usage_cases(tmp_path):
        code, out, err = sql(*args)
        assert (code, out) == (2, ""), (args, err)
        assert err.startswith("tally sql: ") and words in err, (args, err)


def test_no_query_with_stdin_a_terminal_is_a_usage_error(sql, monkeypatch):
    master, slave = pty.openpty()
    try:
        with open(slave, closefd=False) as terminal:
            monkeypatch.setattr(sys, "stdin", terminal)
            code, out, err = sql("--format", "csv")
    finally:
        os.close(master)
        os.close(slave)
    assert (code, out) == (2, "") and "no query: give it as an argument, with -f FILE, or on standard input" in err


def test_the_help_names_the_formats_and_an_unknown_one_is_the_subcommands_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["sql", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "{pretty,csv,tsv,json,jsonl}" in out and "--param NAME=VALUE" in out, out
    assert "-f FILE" in out and "[query]" in out, out
    with pytest.raises(SystemExit) as refused:
        main(["sql", "SELECT 1", "--format", "xml"])
    assert refused.value.code == 2 and "usage: tally sql" in capsys.readouterr().err


# --- what the CLI says when something goes wrong (issue 18 walkthrough: 10, 18) ---------------------------


def test_a_format_clause_is_refused_pointing_at_format_and_the_clickhouse_endpoint(sql):
    code, out, err = sql("SELECT 1 AS x FORMAT JSON")
    assert (code, out) == (1, ""), err
    assert "FORMAT clauses are not allowed in tally sql: use --format pretty|csv|tsv|json|jsonl" in err, err
    assert "TALLY_CLICKHOUSE_HTTP_PORT" in err and "accepts FORMAT" in err and "?format=" not in err, err


def test_the_format_hint_holds_whatever_the_server_suggests_for_other_paths():
    """The server's message is path-neutral or names `?format=`: `tally sql` says --format either way, once."""
    from core.config import Settings
    from tally.cmd_sql import with_hint

    settings = Settings.from_env({"TALLY_CLICKHOUSE_HTTP_PORT": "18703"})
    for server_says in ("FORMAT clauses are not allowed: ask for csv, tsv, jsonl or json with ?format=",
                        "FORMAT clauses are not allowed: use the format option of your client (tally sql --format, "
                        "?format=) or the ClickHouse-compatible endpoint"):
        said = with_hint(server_says, settings)
        assert said.startswith("FORMAT clauses are not allowed in tally sql: use --format pretty|csv"), said
        assert "port 18703" in said and said.count("ClickHouse-compatible endpoint") == 1, said


def test_system_tables_refused_with_one_pointer_to_the_clickhouse_endpoint(sql):
    """The allowlist's message names the endpoint that serves system.tables (for every path); tally sql adds
    nothing to it (one pointer, not two); a table the endpoint does not serve gets none."""
    code, _, err = sql("SELECT name FROM system.tables")
    assert code == 1 and err.startswith("tally sql: the API answered 400 query_refused: table system.tables is "
                                        "not available to analysts"), err
    assert err.count("ClickHouse-compatible endpoint") == 1 and "TALLY_CLICKHOUSE_HTTP_PORT" in err, err
    code, _, err = sql("SELECT name FROM system.users")
    assert code == 1 and "table system.users is not available" in err and "ClickHouse-compatible" not in err, err


@pytest.fixture(scope="module")
def clickhouse_url(servers, analyst_url, tmp_path_factory):
    """The ClickHouse-compatible endpoint (ADR 50), which `tally sql --api-url` may be pointed at by mistake."""
    from core.config import Settings
    from tally.roots import build_clickhouse_http

    settings = Settings.from_env({"TALLY_HOME": str(tmp_path_factory.mktemp("clisqlch")),
                                  "TALLY_PG_DSN": servers.pg_dsn, "TALLY_SECRET": SECRET,
                                  "TALLY_ANALYST_URL": analyst_url})
    port = free_port()
    server = serve_in_thread(build_clickhouse_http(settings), port)
    wait_until(lambda: tcp_open("127.0.0.1", port), what="clickhouse http endpoint", timeout=10)
    yield f"http://127.0.0.1:{port}"
    server.close()


def test_the_clickhouse_endpoint_as_api_url_is_named(api, clickhouse_url, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TALLY_TOKEN", api[1])
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    capsys.readouterr()
    assert main(["sql", "SELECT 1", "--api-url", clickhouse_url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tally sql: {clickhouse_url} answers like a ClickHouse server (HTTP 404), not like "
                          "tally's API"), err
    assert "TALLY_API_PORT" in err and "clickhouse-client" in err and "HTTP Error" not in err, err


class _NotTally(http.server.BaseHTTPRequestHandler):
    """Some other web server: 200 with a web page under /page, 502 from a proxy elsewhere."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        page = self.path.startswith("/page/")
        body = b"<html>hello</html>" if page else b"upstream unavailable"
        self.send_response(200 if page else 502, None if page else "Bad Gateway")
        self.send_header("Content-Type", "text/html" if page else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_other_http_answers_say_their_status_and_the_apis_message(sql, api, monkeypatch, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotTally)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        capsys.readouterr()
        assert main(["sql", "SELECT 1", "--api-url", other]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"tally sql: {other} answered HTTP 502 Bad Gateway, not as tally's API does"), err
        assert main(["sql", "SELECT 1", "--api-url", other + "/page"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"tally sql: {other}/page answered something that is not tally's API"), err
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("TALLY_TOKEN", "tly_tok_nobody_" + "x" * 40)
    code, _, err = sql("SELECT 1")
    assert code == 1 and err.startswith("tally sql: the API answered 401 "), err
    assert "Traceback" not in err and "HTTP Error" not in err, err


# --- who asked: the audit log names tally sql (walkthrough 14) -------------------------------------------


def test_tally_sql_is_named_in_the_audit_log_with_its_version(sql, servers, monkeypatch, capsys):
    """`tally sql` sends `User-Agent: tally-cli/<version>`, which the audit row keeps and `tally sql-log` shows."""
    marker = f"ua-{uuid.uuid4().hex[:12]}"
    assert sql(f"SELECT '{marker}' AS m", "--format", "csv")[:2] == (0, f"m\n{marker}\n")
    monkeypatch.setenv("TALLY_PG_DSN", servers.pg_dsn)

    def logged(*args: str) -> str:
        assert main(["sql-log", "--last", "1000", *args]) == 0
        return capsys.readouterr().out

    wait_until(lambda: marker in logged(), what="the audit row of tally sql", timeout=30)
    client = f"tally-cli/{version('tally')}"
    assert [r["client"] for r in json.loads(logged("--json")) if marker in r["sql"]] == [client]
    assert [line for line in logged().splitlines() if marker in line and client in line], "not in sql-log's table"
