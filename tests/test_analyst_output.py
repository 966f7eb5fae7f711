"""Item 10 of issue 15: what analysts get back. (a) csv/tsv cells cannot start a spreadsheet formula,
(b) result types nested too deeply are a 400 naming the problem, not a 500, (c) ClickHouse's hints
never name tables or functions analysts cannot use."""

from __future__ import annotations

import csv
import io
import json

import clickhouse_connect
import pytest

from olap.analyst import MAX_RESULT_NESTING, QueryStats, SqlLimits, prepare, public_message, stream
from olap.client import connect
from olap.schema import ensure_schema
from tests.test_analyst_server import query

DB = "tally"
LIMITS = SqlLimits(max_execution_s=20, max_memory_bytes=1 << 30, max_result_rows=1000, max_result_bytes=1 << 20,
                   max_threads=1)
UA = '=HYPERLINK("http://evil.test","x")'


@pytest.fixture(scope="module")
def ch(servers):
    client = connect(servers.chdb_dsn)
    ensure_schema(client, DB)
    return client


def output(ch, sql: str, fmt: str) -> str:
    return b"".join(stream(ch, prepare(ch, sql, DB), LIMITS, fmt, QueryStats())).decode()


FORMULAS = ("SELECT s, toInt32(n) AS n, f, toString(n) AS text_n FROM values('s String, n Int32, f Float64', "
            "('=1+1', -5, -1.5), ('+1', 3, 0.5), ('-2', -7, -0.25), ('@SUM(A1)', 0, 0), ('plain', 1, 1), "
            "(concat(char(9), 'tab'), 2, 2), (concat(char(13), 'cr'), 4, 4), ('a=b', 5, 5), ('', 6, 6)) ")


def test_csv_string_cells_that_start_a_formula_are_neutralised_numbers_are_not(ch):
    rows = list(csv.reader(io.StringIO(output(ch, FORMULAS, "csv"))))
    assert rows[0] == ["s", "n", "f", "text_n"]
    assert [r[0] for r in rows[1:]] == ["'=1+1", "'+1", "'-2", "'@SUM(A1)", "plain", "'\ttab", "'\rcr", "a=b", ""]
    assert [r[1] for r in rows[1:]] == ["-5", "3", "-7", "0", "1", "2", "4", "5", "6"]  # numbers stay numbers
    assert [r[2] for r in rows[1:4]] == ["-1.5", "0.5", "-0.25"]
    assert [r[3] for r in rows[1:4]] == ["'-5", "'3"[1:], "'-7"]  # a number turned into text is text


def test_tsv_string_cells_that_start_a_formula_are_neutralised(ch):
    lines = output(ch, FORMULAS, "tsv").split("\n")
    cells = [line.split("\t") for line in lines[1:] if line]
    assert [c[0] for c in cells] == ["'=1+1", "'+1", "'-2", "'@SUM(A1)", "plain", "'\\ttab", "'\\rcr", "a=b", ""]
    assert [c[1] for c in cells][:3] == ["-5", "3", "-7"]


def test_column_names_are_neutralised_too(ch):
    assert output(ch, "SELECT 1 AS `=cmd`, 2 AS `@x`, 3 AS ok", "csv").splitlines()[0] == "'=cmd,'@x,ok"
    assert output(ch, "SELECT 1 AS `=cmd`", "tsv").splitlines()[0] == "'=cmd"


def test_json_formats_keep_values_as_they_are(ch):
    assert json.loads(output(ch, "SELECT '=1+1' AS s", "json"))["rows"] == [["=1+1"]]
    assert json.loads(output(ch, "SELECT '=1+1' AS s", "jsonl")) == {"s": "=1+1"}


def test_a_user_agent_formula_does_not_reach_a_spreadsheet(analyst_url):
    """What ../shared/checks/11-hardening looks at: no line, its quotes stripped, starts with = + - @."""
    sql = f"SELECT arrayJoin(['{UA}', '-1', '+1', '@a', 'ok']) AS ua"
    status, _, body = query(analyst_url, sql, fmt="csv")
    cells = [c.strip('"') for c in body.decode().splitlines()]
    assert status == 200 and cells[0] == "ua" and cells[1].startswith("'=HYPERLINK(")
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells)


@pytest.mark.parametrize("sql", [
    "SELECT " + "[" * 400 + "1" + "]" * 400,  # the driver's type parser recursed until RecursionError: was 500
    "SELECT " + "[" * (MAX_RESULT_NESTING + 1) + "1" + "]" * (MAX_RESULT_NESTING + 1),
    f"SELECT CAST([], '{'Array(' * 40}UInt8{')' * 40}')",
    "SELECT " + "tuple(" * 40 + "1" + ")" * 40,
    # tuple elements named `)`: the count took the name's parenthesis for a closing one, so 140 levels passed
    # (ClickHouse's own AST depth limit stopped it short of the driver's RecursionError)
    "SELECT defaultValueOfTypeName('" + "Tuple(`)` " * 140 + "UInt8" + ")" * 140 + "')",
])
def test_results_nested_too_deeply_are_refused_with_400(analyst_url, sql):
    status, _, body = query(analyst_url, sql)
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "query_refused", body[:300]
    assert f"nested more than {MAX_RESULT_NESTING} levels deep" in error["message"]
    assert query(analyst_url, "SELECT 1")[0] == 200  # the slot's client still works


def test_results_nested_within_the_limit_work(analyst_url):
    depth = MAX_RESULT_NESTING
    status, _, body = query(analyst_url, "SELECT " + "[" * depth + "1" + "]" * depth + " AS a, "
                                         "CAST(1, 'Enum8(''((((((((((((((((((((((((((((((((((('' = 1)') AS e")
    assert status == 200, body[:300]
    assert json.loads(body)["rows"][0][1] == "(" * 35


def test_parentheses_inside_quoted_names_and_labels_do_not_count():
    from olap.analyst import _nesting

    assert _nesting("Tuple(`)` Tuple(`)` UInt8))") == 2
    assert _nesting('Tuple("))" Tuple("\\")" UInt8))') == 2  # double-quoted, with an escaped quote
    assert _nesting("Tuple(`a``)` UInt8, `\\`)` UInt8)") == 1  # a doubled and an escaped backquote
    assert _nesting("Enum8(')))' = 1, '\\')' = 2)") == 1
    assert _nesting("Tuple(" * 40 + "`(` UInt8" + ")" * 40) == 40


def clickhouse_message(servers, sql: str) -> str:
    """What ClickHouse itself says about `sql`, asked without the allowlist (an operator's session)."""
    client = clickhouse_connect.get_client(dsn=servers.chdb_dsn)
    try:
        client.query(sql)
    except Exception as exc:
        return str(exc)
    finally:
        client.close()
    raise AssertionError(f"{sql} did not fail")


def test_hints_naming_tables_or_functions_analysts_cannot_use_are_dropped(ch, servers):
    message = clickhouse_message(servers, f"SELECT * FROM {DB}.consumer_offset")
    assert f"Maybe you meant {DB}.consumer_offsets" in message  # what ClickHouse says
    assert "consumer_offsets" not in public_message(message, DB) and "Maybe" not in public_message(message, DB)
    message = clickhouse_message(servers, "SELECT fil('x')")  # file() is denied: not a hint to give
    assert "Maybe you meant: ['file']" in message
    assert "file" not in public_message(message, DB) and "Maybe" not in public_message(message, DB)
    assert public_message(message, DB).startswith(message.split(" Maybe")[0])  # the rest is kept


def test_hints_naming_what_analysts_may_use_are_kept(ch, servers):
    message = clickhouse_message(servers, f"SELECT * FROM {DB}.event")
    assert f"Maybe you meant {DB}.events?" in public_message(message, DB)
    message = clickhouse_message(servers, f"SELECT domian FROM {DB}.events")
    assert "Maybe you meant: ['domain']" in public_message(message, DB)
    message = clickhouse_message(servers, "SELECT sumx(1)")
    assert "Maybe you meant" in public_message(message, DB)


def test_the_server_passes_clickhouse_errors_through_the_filter(analyst_url):
    status, _, body = query(analyst_url, f"SELECT domian FROM {DB}.events")
    assert status == 400 and "Maybe you meant: ['domain']" in json.loads(body)["error"]["message"]


# --- times in a named zone (walkthrough item 2) ------------------------------------------------------------------

ZONED = ("SELECT toDateTime('2026-12-01 10:00:00', 'America/New_York') AS ny, "
         "toTimezone(toDateTime('2026-12-01 10:00:00'), 'Europe/Berlin') AS berlin, "
         "[toDateTime('2026-12-01 10:00:00', 'Asia/Tokyo')] AS tokyo, toDateTime('2026-12-01 10:00:00') AS utc")
ZONED_TEXT = ["2026-12-01T10:00:00-05:00", "2026-12-01T11:00:00+01:00", '["2026-12-01T10:00:00+09:00"]',
              "2026-12-01T10:00:00Z"]


def test_a_datetime_with_a_zone_keeps_it_in_every_format(ch):
    """chDB's Native output (what the driver reads) writes DateTime('zone') as plain DateTime: the zone was lost
    (type "DateTime", value in UTC with Z) although DateTime64 kept it."""
    document = json.loads(output(ch, ZONED, "json"))
    assert document["types"] == ["DateTime('America/New_York')", "DateTime('Europe/Berlin')",
                                 "Array(DateTime('Asia/Tokyo'))", "DateTime"]
    assert document["rows"] == [[*ZONED_TEXT[:2], json.loads(ZONED_TEXT[2]), ZONED_TEXT[3]]]
    line = json.loads(output(ch, ZONED, "jsonl"))
    assert [line["ny"], line["berlin"], line["utc"]] == [ZONED_TEXT[0], ZONED_TEXT[1], ZONED_TEXT[3]]
    assert list(csv.reader(io.StringIO(output(ch, ZONED, "csv"))))[1] == ZONED_TEXT
    assert output(ch, ZONED, "tsv").splitlines()[1].split("\t") == ZONED_TEXT


def test_a_zone_from_a_query_parameter_and_an_empty_result_keep_it_too(ch):
    sql = "SELECT toDateTime({s:String}, {tz:String}) AS t"
    params = {"s": "2026-12-01 10:00:00", "tz": "Asia/Kolkata"}
    text = b"".join(stream(ch, prepare(ch, sql, DB, params), LIMITS, "json", QueryStats(), params=params))
    assert json.loads(text)["rows"] == [["2026-12-01T10:00:00+05:30"]]
    assert json.loads(text)["types"] == ["DateTime('Asia/Kolkata')"]
    empty = json.loads(output(ch, "SELECT toDateTime('2026-12-01 10:00:00', 'Asia/Kolkata') AS t WHERE 0", "json"))
    assert empty["types"] == ["DateTime('Asia/Kolkata')"] and empty["rows"] == []


# --- WITH TOTALS (walkthrough item 7) -----------------------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "SELECT number % 2 AS k, count() AS c FROM numbers(4) GROUP BY k WITH TOTALS",
    "SELECT * FROM (SELECT number % 2 AS k, count() AS c FROM numbers(4) GROUP BY k WITH TOTALS) ORDER BY k",
])
@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_with_totals_is_refused_rather_than_losing_the_totals_row(analyst_url, sql, fmt):
    """The driver's block stream has no totals: the row used to disappear silently (200, rows without it)."""
    status, _, body = query(analyst_url, sql, fmt=fmt)
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "query_refused", body[:300]
    assert "WITH TOTALS" in error["message"] and "WITH ROLLUP" in error["message"]
    assert "ClickHouse-compatible endpoint" in error["message"]


def test_totals_as_a_name_or_a_string_are_not_refused_and_rollup_gives_the_totals_row(ch):
    prepare(ch, "SELECT 1 GROUP BY 1 WITH TOTALS", DB)  # the allowlist keeps it: the ClickHouse port answers it
    assert json.loads(output(ch, "SELECT 'with totals' AS `WITH TOTALS`", "json"))["rows"] == [["with totals"]]
    rollup = json.loads(output(ch, "SELECT number % 2 AS k, count() AS c FROM numbers(4) GROUP BY k WITH ROLLUP "
                                   "ORDER BY k, c", "json"))["rows"]
    assert rollup == [[0, 2], [0, 4], [1, 2]]
