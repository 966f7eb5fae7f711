"""Analyst SQL against real chDB and PostgreSQL: the allowlist (walked over ClickHouse's own lists of
table functions and functions), an escape corpus, queries that must keep working, limits that
ClickHouse enforces (a timeout cancels the query), the four output formats, and the audit log."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from olap import allowlist
from olap.allowlist import PURE_OTHERS, SERVER_CONSTANTS, TABLE_FUNCTIONS, catalog_function, function_table
from olap.analyst import (
    AnalystQueryError,
    QueryStats,
    SqlLimits,
    _session_readonly,
    prepare,
    run_query,
    stream,
)
from olap.client import connect
from olap.formats import FORMATS
from olap.schema import ensure_schema
from oltp import audit

DB = "tally"
LIMITS = SqlLimits(max_execution_s=20, max_memory_bytes=1 << 30, max_result_rows=1000, max_result_bytes=1 << 20,
                   max_threads=1)


@pytest.fixture(scope="module")
def ch(servers):
    client = connect(servers.chdb_dsn)
    ensure_schema(client, DB)
    return client


@pytest.fixture(scope="module")
def own_client(servers):
    """Clients of their own (separate chDB handles on the same engine): queries beside the shared one."""
    made = []

    def make():
        client = clickhouse_connect.get_client(dsn=servers.chdb_dsn)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def site(ch):
    """A domain with a few events in tally.events."""
    domain = f"a{uuid.uuid4().hex[:10]}.example.com"
    now = datetime.now(UTC).replace(microsecond=0)
    rows = []
    for i in range(6):
        ts = now - timedelta(minutes=10 * i)
        rows.append([f"{uuid.uuid4().hex}", domain, f"https://{domain}/p{i % 3}", ts, ts,
                     "pageview" if i % 2 else "impression", None if i % 3 == 0 else i * 1.5, None, None,
                     "Firefox", "Linux", "desktop", None, f"v{i % 2}"])
    ch.insert(f"{DB}.events", rows, column_names=["hash", "domain", "url", "ts", "received_at", "type", "value",
                                                   "referrer", "user_agent", "browser", "os", "device", "country",
                                                   "visitor"])
    return domain


def refused(ch, sql: str, database: str = DB) -> str:
    with pytest.raises(AnalystQueryError) as info:
        prepare(ch, sql, database)
    assert info.value.code == "refused", info.value.message
    return info.value.message


# --- (a) table functions: ClickHouse's own list, every one not allowed is refused --------------------

def test_every_table_function_not_on_the_allowlist_is_refused(ch):
    names = [r[0] for r in ch.query("SELECT name FROM system.table_functions").result_rows]
    assert TABLE_FUNCTIONS <= set(names), "an allowlisted table function does not exist: a typo?"
    denied = [n for n in names if n not in TABLE_FUNCTIONS]
    assert {"file", "url", "s3", "remote", "remoteSecure", "mysql", "postgresql", "sqlite", "executable", "input",
            "merge", "cluster", "view", "dictionary", "zeros"} <= set(denied)
    for name in denied:
        # a call that parses: most take any arguments; viewIfPermitted has syntax of its own
        call = next(c for c in (f"`{name}`()", f"`{name}`(SELECT 1)", f"`{name}`(SELECT 1 ELSE null('a Int8'))")
                    if "Syntax error" not in refused(ch, f"SELECT * FROM {c}"))
        for sql in (f"SELECT * FROM {call}",
                    f"SELECT * FROM numbers((SELECT count() FROM {call}))",  # nested in an argument
                    f"SELECT 1 FROM {DB}.events WHERE domain IN (SELECT * FROM {call})"):
            message = refused(ch, sql)
            assert f"table function {name} " in message, (sql, message)


@pytest.mark.parametrize("sql, rows", [
    ("SELECT * FROM numbers(3)", [[0], [1], [2]]),
    ("SELECT * FROM numbers_mt(2)", [[0], [1]]),
    ("SELECT * FROM generateSeries(1, 3)", [[1], [2], [3]]),
    ("SELECT * FROM generate_series(2, 3)", [[2], [3]]),
    ("SELECT * FROM values('a UInt8, b String', (1, 'x'), (2, 'y'))", [[1, "x"], [2, "y"]]),
])
def test_every_allowlisted_table_function_works(ch, sql, rows):
    assert sorted(run_query(ch, sql, LIMITS).rows) == rows
    name = sql.split("FROM ")[1].split("(")[0]
    assert name in TABLE_FUNCTIONS


# values() reads a string first argument as a column list whose declarations ClickHouse evaluates: a security
# review read the server's files with `b String ALIAS file('...')` (olap/structure.py)
@pytest.mark.parametrize("structure", [
    "a UInt8, b String ALIAS file('/etc/hostname')", "a UInt8, b String ALIAS hostName()",
    "a UInt8, b String DEFAULT hostName()", "a UInt8, b String MATERIALIZED hostName()",
    "a UInt8, b String EPHEMERAL hostName()", "a UInt8 CODEC(ZSTD)", "a UInt8 TTL now()", "a UInt8 COMMENT 'x'",
    "a UInt8 NOT NULL", "a UInt8, b Tuple(x String) ALIAS tuple(getSetting('max_threads'))",
    "a UInt8, b String  alias  file('/etc/hostname')",
    # no type: ClickHouse reads the word in its place as the clause (a second review)
    "a UInt8, b ALIAS(file('/etc/hostname'))", "a UInt8, b alias(tuple(hostName(), currentUser()))",
    "a UInt8, b DEFAULT(hostName())", "a UInt8, b Nullable(ALIAS(hostName()))", "a UInt8, b Tuple(x ALIAS(1))",
    "a UInt8, b UInt8(hostName())", "a UInt8, b Array(ALIAS(1))",
])
def test_a_values_structure_with_column_clauses_is_refused(ch, structure):
    quoted = structure.replace("'", "''")
    for sql in (f"SELECT * FROM values('{quoted}', 1)",
                f"SELECT count() FROM numbers((SELECT count() FROM values('{quoted}', 1)))"):
        assert "as the column structure" in refused(ch, sql), sql
    assert "cannot represent faithfully" in refused(ch, f"SELECT * FROM values((('{quoted}')), 1)")


def test_a_values_structure_cannot_come_from_a_query_parameter_or_an_alias(ch):
    evil = "a UInt8, b ALIAS hostName()"
    for sql, words in (("SELECT b FROM values({s:String}, 1)", "values(): with rows after it"),
                       ("SELECT b FROM values(({s:String}), 1)", "cannot represent faithfully"),
                       # a name is read as the string of the alias it names (a second review)
                       ("WITH {s:String} AS s SELECT b FROM values(s, 1)", "values(): with rows after it"),
                       ("SELECT {s:String} AS s, b FROM values(s, 1)", "values(): with rows after it"),
                       (f"WITH '{evil}' AS s SELECT b FROM values(s, 1)", "values(): with rows after it"),
                       (f"SELECT '{evil}' AS s, b FROM values(s, 1)", "values(): with rows after it"),
                       (f"SELECT b FROM values(toString('{evil}'), 1)", "values(): with rows after it"),
                       (f"SELECT b FROM values((SELECT '{evil}'), 1)", "values(): with rows after it")):
        with pytest.raises(AnalystQueryError) as info:
            prepare(ch, sql, DB, {"s": evil})
        assert info.value.code == "refused" and words in info.value.message, (sql, info.value.message)
    # a parameter among the rows, or values() with rows only, still works
    assert run_query(ch, "SELECT * FROM values('a UInt8', {n:UInt8})", LIMITS, params={"n": "7"}).rows == [[7]]
    assert run_query(ch, "SELECT * FROM values({s:String})", LIMITS, params={"s": "x"}).rows == [["x"]]


@pytest.mark.parametrize("structure, rows", [
    ("d DateTime64(3, 'UTC'), e Enum8('a' = 1, 'b' = -2)", "(0, 'b')"),
    ("t Tuple(a String, b Array(UInt8)), m Map(String, UInt64)", "(('x', [1]), map('k', 2))"),
    ("`x` LowCardinality(Nullable(String)), y Decimal(10, 2)", "('v', 1.5)"),
])
def test_a_values_structure_of_names_and_types_works(ch, structure, rows):
    quoted = structure.replace("'", "''")
    assert len(run_query(ch, f"SELECT * FROM values('{quoted}', {rows})", LIMITS).rows) == 1
    assert run_query(ch, "SELECT * FROM values(tuple(1, 'x'), (2, 'y'))", LIMITS).rows == [[1, "x"], [2, "y"]]


@pytest.mark.parametrize("sql, words", [
    ("SELECT * FROM numbers(format(Values, 'a String', '(toUInt8(hostName()))'))", "would run as the table function"),
    ("SELECT * FROM numbers(1 + length(format(Values, 'a String', '(1)')))", "would run as the table function"),
    ("SELECT * FROM generate_series(1, format(JSONEachRow, 'a String', '{}'))", "would run as the table function"),
    ("SELECT * FROM values(1, format('{}', 1))", "would run as the table function"),
    ("SELECT * FROM numbers(FORMAT(Values, 'a String', '(1)'))", "function FORMAT is not allowed"),
])
def test_a_table_function_name_inside_a_table_functions_arguments_is_refused(ch, sql, words):
    # ClickHouse runs it as the table function (a third review read files this way under readonly = 2)
    assert words in refused(ch, sql)
    assert run_query(ch, "SELECT format('{}-{}', 'a', 'b')", LIMITS).rows == [["a-b"]]  # elsewhere, as before


def test_the_table_function_names_are_clickhouses(ch):
    assert allowlist.ALL_TABLE_FUNCTIONS == {r[0] for r in ch.query("SELECT name FROM system.table_functions")
                                             .result_rows}
    assert allowlist.learn_table_functions(ch) == 0  # the analyst server adds a newer server's own at its start

    class Newer:  # a ClickHouse with a table function named like an allowed scalar function
        def query(self, sql):
            return SimpleNamespace(result_rows=[("lower",)])

    try:
        assert allowlist.learn_table_functions(Newer()) == 1
        assert "would run as the table function" in refused(ch, "SELECT * FROM numbers(length(lower('ab')))")
    finally:
        allowlist._ALL_TABLE_FUNCTIONS_ANY_CASE.discard("lower")


def test_a_string_row_first_is_refused_with_how_to_name_the_column(ch):
    message = refused(ch, "SELECT * FROM values('Germany', 'France')")
    assert "Name the columns first, as in values('c String', 'Germany', 'France')" in message
    assert run_query(ch, "SELECT * FROM values('c String', 'Germany', 'France')", LIMITS).rows == [["Germany"],
                                                                                               ["France"]]
    from olap.structure import check_structure

    check_structure("a AggregateFunction(1, sum, UInt64)")  # a versioned aggregate type is a plain structure too


def test_the_structures_type_names_are_clickhouses(ch):
    from olap.structure import TYPE_NAMES, TYPE_NAMES_ANY_CASE

    families = ch.query("SELECT name, case_insensitive FROM system.data_type_families WHERE position(name, ' ') = 0")
    exact = {n for n, ci in families.result_rows if not ci}
    any_case = {n.lower() for n, ci in families.result_rows if ci}
    assert TYPE_NAMES == exact and TYPE_NAMES_ANY_CASE == any_case
    assert not {"alias", "default", "materialized", "ephemeral", "codec", "ttl", "comment"} & (
        {n.lower() for n in TYPE_NAMES} | TYPE_NAMES_ANY_CASE)


def test_the_parametrised_cases_cover_the_whole_table_function_allowlist():
    covered = {"numbers", "numbers_mt", "generateSeries", "generate_series", "values"}
    assert covered == TABLE_FUNCTIONS


# --- (b) functions: ClickHouse's own list -----------------------------------------------------------

def test_every_function_not_on_the_allowlist_is_refused(ch):
    table = function_table()
    names = [r[0] for r in ch.query("SELECT name FROM system.functions").result_rows]
    denied = [n for n in names if not table.allows(n)]
    assert len(denied) > 150
    failures = []
    for name in denied:
        for sql in (f"SELECT `{name}`(1)", f"SELECT arrayMap(x -> `{name}`(x), [1])"):
            try:
                prepare(ch, sql, DB)
                failures.append(sql)
            except AnalystQueryError as exc:
                # currentDatabase() is answered by the catalog (ADR 51), without arguments only
                expected = "takes no arguments" if catalog_function(name) else f"function {name} "
                if exc.code != "refused" or expected not in exc.message:
                    failures.append(f"{sql}: {exc.message}")
    assert not failures, failures[:20]


DENIED_CATEGORIES = {"Other", "Internal", "Dictionary", "Embedded Dictionary", "Introspection", "Machine Learning",
                     "AI", ""}


def test_denied_categories_are_denied_except_the_reviewed_pure_ones(ch):
    table = function_table()
    rows = ch.query("SELECT name, categories, alias_to FROM system.functions").result_rows
    category = {name: cat for name, cat, _ in rows}
    leaks = []
    for name, cat, alias_to in rows:
        effective = category.get(alias_to, "") if alias_to else cat
        reviewed = PURE_OTHERS | SERVER_CONSTANTS  # version() (ADR 51)
        if effective in DENIED_CATEGORIES and table.allows(name) and name not in reviewed \
                and alias_to not in reviewed:
            leaks.append(name)
    assert not leaks
    # and the ones the security issue names, by name
    for name in ("file", "getSetting", "getSettingOrDefault", "getServerSetting", "hostName", "FQDN", "getMacro",
                 "filesystemAvailable", "filesystemCapacity", "filesystemUnreserved", "joinGet", "joinGetOrNull",
                 "dictGet", "dictGetString", "dictHas", "currentUser", "uptime", "sleep", "sleepEachRow",
                 "getClientHTTPHeader", "hasColumnInTable", "showCertificate", "addressToSymbol", "flameGraph",
                 "aiGenerate", "catboostEvaluate", "serverUUID", "globalVariable", "generateSerialID"):
        if name in category:
            assert not table.allows(name), name
            assert not table.allows(name.upper()), name


def test_the_function_table_is_what_the_rules_give_on_this_clickhouse(ch):
    """olap/allowed_functions.py is generated: regenerate with `python -m olap.allowlist --write` and review."""
    assert allowlist.render(*allowlist.generate(ch)) == allowlist.DATA_FILE.read_text()


def test_combinators_are_clickhouses_and_split_safely(ch):
    table = function_table()
    live = {r[0] for r in ch.query("SELECT name FROM system.aggregate_function_combinators").result_rows}
    assert set(table.combinators) == live
    for name in ("sumIf", "uniqState", "groupArrayIf", "countDistinct", "COUNTDistinct", "quantilesIfOrNull",
                 "sumArrayIf", "avgMerge", "uniqExactIf", "maxMap", "anyLastIf", "argMaxIf", "sumResample",
                 "COUNT", "Count", "LOWER", "lambda"):
        assert table.allows(name), name
    for name in ("flameGraphIf", "fileIf", "hostNameState", "sumIfX", "noSuchFunction", "dictGetIf", "sleepIf",
                 "plusIf", "OrNull", "State"):
        assert not table.allows(name), name


# --- (c) the escape corpus ----------------------------------------------------------------------------

ESCAPES = [
    # files, processes, the network, other databases
    ("SELECT file('/etc/passwd')", "function file "),
    ("SELECT FILE('/etc/passwd')", "function FILE "),
    ("SELECT `file`('/proc/self/environ')", "function file "),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table function file "),
    ("SELECT * FROM FILE('/proc/self/environ', 'LineAsString')", "table function FILE "),
    ("SELECT * FROM sqlite('/tmp/x.db', 't')", "table function sqlite "),
    ("SELECT * FROM url('http://127.0.0.1:1/', CSV, 'a String')", "table function url "),
    ("SELECT * FROM s3('http://127.0.0.1:1/b/k.csv', 'CSV')", "table function s3 "),
    ("SELECT * FROM remote('127.0.0.1', system.one)", "table function remote "),
    ("SELECT * FROM remoteSecure('127.0.0.1', default.t)", "table function remoteSecure "),
    ("SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')", "table function mysql "),
    ("SELECT * FROM postgresql('h:5432', 'db', 't', 'u', 'p')", "table function postgresql "),
    ("SELECT * FROM executable('x.sh', TSV, 'a String')", "table function executable "),
    ("SELECT * FROM input('a String')", "table function input "),
    ("SELECT * FROM merge('system', '.*')", "table function merge "),
    ("SELECT * FROM view(SELECT * FROM system.one)", "table function view "),
    ("SELECT * FROM zeros(10)", "table function zeros "),
    ("SELECT * FROM (EXPLAIN SELECT 1)", "table function viewExplain "),
    ("SELECT dictGet('d', 'a', toUInt64(1))", "function dictGet "),
    ("SELECT dictGetString('d', 'a', toUInt64(1))", "function dictGetString "),
    ("SELECT joinGet('tally.j', 'v', 1)", "function joinGet "),
    ("SELECT getSetting(concat('read', 'only'))", "not getSetting(a computed name)"),
    ("SELECT filesystemAvailable()", "function filesystemAvailable "),
    ("SELECT hostName(), 1", "function hostName "),
    ("SELECT getMacro('shard')", "function getMacro "),
    ("SELECT currentRoles()", "function currentRoles "),
    ("SELECT getSetting('max_memory_usage')", "not getSetting('max_memory_usage')"),
    ("SELECT sleep(3)", "function sleep "),
    # system tables, information_schema, other databases and tables
    ("SELECT * FROM system.clusters", "table system.clusters "),
    ("SELECT name FROM SYSTEM.TABLES", "table SYSTEM.TABLES "),
    ("SELECT * FROM `system`.`users`", "table system.users "),
    ("SELECT * FROM information_schema.tables", "table information_schema.tables "),
    ("SELECT * FROM INFORMATION_SCHEMA.COLUMNS", "table INFORMATION_SCHEMA.COLUMNS "),
    ("SELECT * FROM tally.consumer_offsets", "table tally.consumer_offsets "),
    ("SELECT * FROM default.secrets", "table default.secrets "),
    ("SELECT count() FROM tables", "table tables "),  # unqualified: the analyst tables only (ADR 51)
    ("SELECT * FROM `tally.events`", "table tally.events "),  # one identifier with a dot is not db.table
    # nested: subqueries, CTEs, joins, IN, lambdas, column transformers, windows, combinators
    ("SELECT * FROM (SELECT * FROM (SELECT file('/etc/passwd') AS p))", "function file "),
    ("WITH x AS (SELECT * FROM system.users) SELECT * FROM x", "table system.users "),
    ("WITH file('/etc/passwd') AS f SELECT f", "function file "),
    ("SELECT * FROM tally.events AS e INNER JOIN system.processes AS p ON 1 = 1", "table system.processes "),
    ("SELECT * FROM tally.events AS e LEFT JOIN (SELECT * FROM system.parts) AS p USING (domain)",
     "table system.parts "),
    ("SELECT 1 WHERE 1 IN system.grants", "table system.grants "),
    ("SELECT 1 FROM tally.events WHERE domain GLOBAL NOT IN tally.rejected_records", "table tally.rejected_records "),
    ("SELECT 1 WHERE 'x' IN (SELECT name FROM system.server_settings)", "table system.server_settings "),
    ("SELECT file('/etc/passwd') AS count", "function file "),
    ("SELECT arrayMap(x -> file(x), ['/etc/passwd'])", "function file "),
    ("SELECT * APPLY(file) FROM (SELECT '/etc/passwd' AS p)", "function file "),
    ("SELECT COLUMNS('p') APPLY(x -> file(x)) FROM (SELECT '/etc/passwd' AS p)", "function file "),
    ("SELECT * REPLACE(file('/etc/passwd') AS p) FROM (SELECT 1 AS p)", "function file "),
    ("SELECT * FROM numbers((SELECT count() FROM file('/etc/passwd', 'LineAsString')))", "table function file "),
    ("SELECT 1 WHERE (SELECT count() FROM url('http://127.0.0.1:1/', CSV, 'a String')) > 0",
     "table function url "),
    ("SELECT sum(number) OVER (ORDER BY hostName()) FROM numbers(3)", "function hostName "),
    ("SELECT quantile(0.5)(length(file('/etc/passwd')))", "function file "),
    ("SELECT fileIf('/etc/passwd', 1)", "function fileIf "),
    ("SELECT * FROM tally.events ARRAY JOIN [file('/etc/passwd')] AS a", "function file "),
    ("SELECT file('/etc/passwd') AS `b\n    Function plus`", "function file "),
    ("SELECT number FROM numbers(1) WHERE number IN (SELECT * FROM zeros(1))", "table function zeros "),
    ("SELECT CASE WHEN 1 THEN file('/etc/passwd') END", "function file "),
    # CTE scope: only where ClickHouse resolves the name to the CTE
    ("WITH shadow AS (SELECT * FROM shadow) SELECT * FROM shadow", "table shadow "),
    ("SELECT * FROM (WITH shadow AS (SELECT 1) SELECT * FROM shadow) AS s, shadow", "table shadow "),
    ("WITH shadow AS (SELECT 1 AS v) SELECT v FROM shadow UNION ALL SELECT v FROM shadow", "table shadow "),
    ("WITH b AS (SELECT * FROM shadow), shadow AS (SELECT 1 AS v) SELECT * FROM b", "table shadow "),
    ("WITH [1] AS shadow SELECT 1 IN shadow", "table shadow "),
    ("WITH shadow AS (SELECT 1 AS v) SELECT * FROM numbers((SELECT count() FROM shadow))", "table shadow "),
    # SETTINGS anywhere, FORMAT, INTO OUTFILE, parameters
    ("SELECT 1 SETTINGS readonly = 0", "SETTINGS"),
    ("SELECT * FROM (SELECT 1 SETTINGS max_threads = 64)", "SETTINGS"),
    ("WITH x AS (SELECT 1 SETTINGS max_execution_time = 0) SELECT * FROM x", "SETTINGS"),
    ("SELECT 1 UNION ALL SELECT 2 SETTINGS max_result_rows = 0", "SETTINGS"),
    ("SELECT 1 WHERE 1 IN (SELECT 1 SETTINGS max_result_bytes = 0)", "SETTINGS"),
    ("SELECT 1 FORMAT JSON", "?format="),
    ("select 1 format TabSeparated", "?format="),
    ("SELECT 'x' INTO OUTFILE '/tmp/tally-should-not-exist' APPEND", "INTO OUTFILE"),
    ("select 1 /* c */ into   OutFile '/tmp/tally-should-not-exist' TRUNCATE", "INTO OUTFILE"),
    ("SELECT {p:String}", "query parameters"),
    # not a SELECT, or more than one statement
    ("SELECT 1; SELECT file('/etc/passwd')", "Multi-statements are not allowed"),
    ("SELECT 1 # it's\n; DROP TABLE tally.events; SELECT '", "Multi-statements are not allowed"),
    ("SELECT $$it's$$; DROP TABLE tally.events; SELECT '$$'", "Multi-statements are not allowed"),
    ("SELECT 1 -- ;\nFROM system.users", "table system.users "),
    ("DROP TABLE tally.events", "only SELECT"),
    ("INSERT INTO FUNCTION file('x.csv') SELECT 1", "only SELECT"),
    ("SET readonly = 0", "only SELECT"),
    ("EXPLAIN PIPELINE SELECT 1", "EXPLAIN PIPELINE is not allowed"),  # EXPLAIN [PLAN|SYNTAX|...]: ADR 51
    ("EXPLAIN SELECT * FROM system.users", "table system.users "),
    ("SHOW TABLES FROM system", "database system is not available"),  # SHOW/DESCRIBE: the catalog's (ADR 51)
    ("DESCRIBE TABLE system.users", "table system.users is not available"),
    ("SELEC 1", "Syntax error"),
    ("", "non-empty"),
]


def test_the_escape_corpus_is_big_enough():
    assert len(ESCAPES) >= 40


@pytest.mark.parametrize("sql, words", ESCAPES)
def test_escape_attempt_is_refused_naming_what(ch, sql, words):
    assert words in refused(ch, sql)


def test_refusals_do_not_depend_on_the_database_name(ch):
    assert "table tally.events " in refused(ch, "SELECT count() FROM tally.events", database="analytics")
    assert prepare(ch, "SELECT count() FROM analytics.events", "analytics")


def test_non_string_sql_is_refused(ch):
    for value in (None, 42, ["SELECT 1"], {"sql": "SELECT 1"}):
        with pytest.raises(AnalystQueryError) as info:
            prepare(ch, value, DB)
        assert info.value.code == "refused" and "non-empty string" in info.value.message


def test_a_server_without_parse_query_to_json_refuses_everything():
    class OldServer:
        def query(self, *args, **kwargs):
            raise DatabaseError("Code: 46. DB::Exception: Unknown function parseQueryToJSON. (UNKNOWN_FUNCTION)")

    with pytest.raises(AnalystQueryError) as info:
        prepare(OldServer(), "SELECT 1", DB)
    assert info.value.code == "refused" and "26.8" in info.value.message


def test_out_of_scope_cte_names_would_read_real_tables(ch):
    """Why the scope rules matter: ClickHouse reads default.shadow where the CTE is not in scope."""
    ch.command("CREATE TABLE IF NOT EXISTS default.shadow (v String) ENGINE = Memory")
    try:
        ch.command("TRUNCATE TABLE default.shadow")
        ch.command("INSERT INTO default.shadow VALUES ('TABLE')")
        raw = ch.query("WITH shadow AS (SELECT v FROM shadow) SELECT v FROM shadow").result_rows
        assert raw == [("TABLE",)]  # ... and that query is in the corpus above, refused
        assert "table shadow " in refused(ch, "WITH shadow AS (SELECT v FROM shadow) SELECT v FROM shadow")
        assert run_query(ch, "WITH shadow AS (SELECT 'cte' AS v) SELECT v FROM (SELECT v FROM shadow)",
                         LIMITS).rows == [["cte"]]
    finally:
        ch.command("DROP TABLE IF EXISTS default.shadow")


# --- legitimate analyst queries keep working -----------------------------------------------------------

LEGIT = [
    "SELECT 1 AS one, 'x' AS s, toDate('2026-01-02') AS d",
    "SELECT domain, countIf(type = 'impression') AS imps, sumIf(value, value IS NOT NULL) AS total, "
    "groupArrayIf(url, type = 'pageview') AS urls, quantilesIf(0.5, 0.9)(toFloat64(value), value IS NOT NULL) AS q, "
    "finalizeAggregation(uniqState(visitor)) AS visitors, uniqExactIf(visitor, 1) AS v2, COUNT(DISTINCT url) AS u "
    "FROM tally.events WHERE domain = '{d}' GROUP BY domain",
    "SELECT url, ts, row_number() OVER (PARTITION BY domain ORDER BY ts) AS n, lagInFrame(url) OVER w AS prev, "
    "sum(value) OVER (ORDER BY ts ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS running "
    "FROM tally.events WHERE domain = '{d}' WINDOW w AS (ORDER BY ts ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) "
    "ORDER BY ts",
    "SELECT arrayMap(x -> x * 2, range(3)) AS doubled, arrayFilter((x, y) -> y > 0, [1, 2], [0, 1]) AS kept, "
    "arrayReduce('sum', [1, 2, 3]) AS total, arraySort(x -> -x, [3, 1, 2]) AS desc",
    "WITH d AS (SELECT * FROM tally.events WHERE domain = '{d}'), c AS (SELECT count() AS n FROM d) SELECT n FROM c",
    "SELECT a.url, count() AS pairs FROM tally.events AS a INNER JOIN tally.events AS b "
    "ON a.visitor = b.visitor AND a.hash != b.hash WHERE a.domain = '{d}' AND b.domain = '{d}' GROUP BY a.url "
    "ORDER BY a.url",
    "SELECT number, number % 3 AS m FROM numbers(5)",
    "SELECT count() FROM tally.events WHERE domain IN (SELECT domain FROM tally.events WHERE domain = '{d}')",
    "WITH p AS (SELECT domain FROM tally.events WHERE domain = '{d}') SELECT count() FROM tally.events "
    "WHERE domain IN p",
    "SELECT 1 AS x UNION ALL SELECT 2 EXCEPT SELECT 2",
    "SELECT toStartOfHour(ts) AS h, count() AS c FROM tally.events WHERE domain = '{d}' "
    "AND ts > now() - INTERVAL 7 DAY GROUP BY h ORDER BY h",
    "SELECT COLUMNS('^(url|domain)$') APPLY(length) FROM tally.events WHERE domain = '{d}' LIMIT 1",
    "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT sum(n) FROM r",
    "SELECT 'file(''/etc/passwd'') INTO OUTFILE SETTINGS FORMAT JSON system.tables' AS s, 1 AS file",
    "SELECT /* file('x') SETTINGS */ 1 -- system.tables",
    "SELECT LOWER('A'), Count() FROM numbers(2)",
    "SELECT type, CASE WHEN value IS NULL THEN 'none' ELSE 'some' END AS has_value, count() FROM tally.events "
    "WHERE domain = '{d}' GROUP BY ALL ORDER BY ALL",
    "SELECT 1 AS `a\n  Function file`",
    # WITH TOTALS passes the allowlist (the ClickHouse-compatible port keeps the row) but tally's own formats refuse
    # it (tests/test_analyst_output.py); ROLLUP gives the totals as a row
    "SELECT domain, uniqExact(visitor) FROM tally.events FINAL WHERE domain = '{d}' GROUP BY domain WITH ROLLUP",
    "SELECT extractURLParameter(url, 'q'), domainWithoutWWW(url), cutQueryString(url) FROM tally.events "
    "WHERE domain = '{d}' LIMIT 2",
    "SELECT number FROM numbers(10) ORDER BY number DESC LIMIT 3 OFFSET 1",
    "SELECT toTypeName(x), x FROM (SELECT [1, 2] AS x) ARRAY JOIN x",
]


@pytest.mark.parametrize("sql", LEGIT)
def test_legitimate_query_works(ch, site, sql):
    result = run_query(ch, sql.replace("{d}", site), LIMITS)
    assert result.columns


def test_legitimate_queries_return_what_they_should(ch, site):
    rows = run_query(ch, LEGIT[4].replace("{d}", site), LIMITS).rows
    assert rows == [[6]]
    assert run_query(ch, "SELECT arrayMap(x -> x * 2, range(3))", LIMITS).rows == [[[0, 2, 4]]]
    assert run_query(ch, LEGIT[12], LIMITS).rows == [[15]]
    assert run_query(ch, LEGIT[13], LIMITS).rows[0][1] == 1  # the literal is data, `file` an alias


def test_combinator_state_functions_pass_the_check(ch):
    # clickhouse-connect cannot decode AggregateFunction columns, so -State is checked, not fetched.
    assert prepare(ch, "SELECT uniqState(visitor), sumStateIf(value, 1) FROM tally.events", DB)


# --- (d, e) result size: bytes and rows -------------------------------------------------------------------

def collect(client, sql: str, limits: SqlLimits,
            fmt: str = "csv") -> tuple[bytes, QueryStats, AnalystQueryError | None]:
    stats, out, error = QueryStats(), [], None
    try:
        for chunk in stream(client, prepare(client, sql, DB), limits, fmt, stats):
            out.append(chunk)
    except AnalystQueryError as exc:
        error = exc
    return b"".join(out), stats, error


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_group_array_cannot_get_around_the_row_limit(ch, fmt):
    limits = SqlLimits(20, 1 << 30, 10, 1 << 20, 1)
    body, stats, error = collect(ch, "SELECT groupArray(number) FROM numbers(1000000)", limits, fmt)
    assert error is not None and error.code == "too_large", error
    assert len(body) <= limits.max_result_bytes and stats.bytes <= limits.max_result_bytes


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("wide", [
    "repeat(toString(number % 10), 200)",  # ClickHouse's max_result_bytes stops it
    "repeat('x', 10000)",  # a constant: ClickHouse counts it once per block, our own count stops it
])
def test_wide_rows_stop_at_the_byte_cap(ch, fmt, wide):
    limits = SqlLimits(20, 1 << 30, 100_000, 1 << 20, 1)
    body, stats, error = collect(ch, f"SELECT {wide} AS wide, number FROM numbers(100000)", limits, fmt)
    assert error is not None and error.code == "too_large", error
    assert len(body) <= limits.max_result_bytes and stats.bytes == len(body)


def test_the_encoded_size_is_capped_even_when_clickhouse_counts_less(ch):
    """char(1) is one byte in ClickHouse and six in JSON (\\u0001): our own count stops it."""
    limits = SqlLimits(20, 1 << 30, 100, 1 << 20, 1)
    sql = "SELECT repeat(char(1), 400000) AS s"
    _, _, ok = collect(ch, sql, limits, "tsv")  # 400 kB as TSV: fits
    assert ok is None
    body, stats, error = collect(ch, sql, limits, "json")  # 2.4 MB as JSON: does not
    assert error is not None and error.code == "too_large" and "max result bytes" in error.message
    assert body == b"" and stats.bytes <= limits.max_result_bytes


def test_the_row_cap_holds(ch):
    limits = SqlLimits(20, 1 << 30, 100, 1 << 20, 1)
    body, stats, error = collect(ch, "SELECT number FROM numbers(100000)", limits, "csv")
    assert error is not None and error.code == "too_large" and "max rows" in error.message
    assert body.count(b"\n") <= 101
    with pytest.raises(AnalystQueryError) as info:
        run_query(ch, "SELECT number FROM numbers(101)", limits)
    assert info.value.code == "too_large"
    assert len(run_query(ch, "SELECT number FROM numbers(100)", limits).rows) == 100


def test_memory_limit_holds(ch):
    limits = SqlLimits(20, 32 << 20, 100, 1 << 20, 1)
    with pytest.raises(AnalystQueryError) as info:
        run_query(ch, "SELECT length(groupArray(toString(number))) FROM numbers(10000000)", limits)
    assert info.value.code == "failed" and "MEMORY_LIMIT_EXCEEDED" in info.value.message


def test_max_threads_is_applied(ch):
    # the analyst's query cannot read settings (getSetting is refused); check what ClickHouse was given
    from olap.analyst import _settings

    settings = _settings(ch, SqlLimits(20, 1 << 30, 100, 1 << 20, 3))
    assert settings["max_threads"] == 3 and list(settings)[-1] == "readonly" and settings["readonly"] == 1
    assert ch.query("SELECT getSetting('max_threads')", settings=settings).result_rows == [(3,)]


# --- (f) a timeout cancels the query in ClickHouse ---------------------------------------------------------

def running(admin, marker: str) -> int:
    return admin.query("SELECT count() FROM system.processes WHERE query LIKE {m:String} "
                       "AND query NOT LIKE '%system.processes%'", parameters={"m": f"%{marker}%"}).result_rows[0][0]


def test_a_timeout_cancels_the_query_in_clickhouse(own_client):
    client, admin = own_client(), own_client()
    marker = f"slow-{uuid.uuid4().hex[:8]}"
    sql = (f"SELECT count() FROM numbers_mt(1000000000000) WHERE cityHash64(number) % 7 = 3 "
           f"AND '{marker}' != ''")
    text = prepare(client, sql, DB)
    outcome: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            b"".join(stream(client, text, SqlLimits(2, 1 << 30, 10, 1 << 20, 1), "json", QueryStats()))
        except AnalystQueryError as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 5
    seen = 0
    while not seen and time.monotonic() < deadline:
        seen = running(admin, marker)
        time.sleep(0.05)
    assert seen == 1, "the query never showed up in system.processes"
    worker.join(30)
    error = outcome["error"]
    assert isinstance(error, AnalystQueryError) and error.code == "timeout", error
    assert outcome["seconds"] < 6
    assert running(admin, marker) == 0  # gone from ClickHouse, not just from the response


def test_closing_a_stream_cancels_the_query_in_clickhouse(own_client):
    client, admin = own_client(), own_client()
    marker = f"stream-{uuid.uuid4().hex[:8]}"
    text = prepare(client, f"SELECT number, '{marker}' AS m FROM numbers_mt(1000000000000)", DB)
    chunks = stream(client, text, SqlLimits(60, 1 << 30, 10**9, 1 << 40, 1), "csv", QueryStats())
    assert next(chunks).startswith(b"number,m\r\n0,")
    assert running(admin, marker) == 1
    chunks.close()  # what the server does when the HTTP client goes away
    assert running(admin, marker) == 0
    assert client.query("SELECT 1").result_rows == [(1,)]  # and the client is usable again


# --- (g) formats, parsed back ---------------------------------------------------------------------------

TRICKY = ("SELECT number AS n, ['a,b', 'q\"uote', concat('line', char(10), 'break'), concat('tab', char(9), 'x'), "
          "'back\\\\slash', 'ünï', ''][number + 1] AS s, if(number = 2, NULL, number * 1.5) AS v, [number, 1] AS arr, "
          "toDateTime64('2026-01-02 03:04:05.123', 3, 'UTC') AS t FROM numbers(7) ORDER BY n")
EXPECTED_S = ["a,b", 'q"uote', "line\nbreak", "tab\tx", "back\\slash", "ünï", ""]


def test_json_keeps_todays_shape(ch):
    body, stats, error = collect(ch, TRICKY, LIMITS, "json")
    assert error is None
    doc = json.loads(body)
    assert set(doc) == {"columns", "types", "rows", "row_count"}
    assert doc["columns"] == ["n", "s", "v", "arr", "t"] and doc["row_count"] == 7 == stats.rows
    assert doc["types"][0] == "UInt64" and doc["types"][4].startswith("DateTime64")
    assert [r[1] for r in doc["rows"]] == EXPECTED_S
    assert doc["rows"][2][2] is None and doc["rows"][3][3] == [3, 1]
    assert doc["rows"][0][4] == "2026-01-02T03:04:05.123Z"  # with its zone (ADR 52)
    assert stats.bytes == len(body)


def test_csv_parses_back_with_quotes_and_newlines(ch):
    body, stats, error = collect(ch, TRICKY, LIMITS, "csv")
    assert error is None and stats.bytes == len(body) and stats.rows == 7
    rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
    assert rows[0] == ["n", "s", "v", "arr", "t"]
    assert [r[1] for r in rows[1:]] == EXPECTED_S
    assert rows[3][2] == "" and rows[4][3] == "[3,1]" and rows[1][4] == "2026-01-02T03:04:05.123Z"


def tsv_unescape(field: str) -> str | None:
    if field == "\\N":
        return None
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\":
            out.append({"t": "\t", "n": "\n", "r": "\r", "0": "\0", "\\": "\\"}[field[i + 1]])
            i += 2
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def test_tsv_escapes_tabs_newlines_and_backslashes(ch):
    body, stats, error = collect(ch, TRICKY, LIMITS, "tsv")
    assert error is None and stats.bytes == len(body)
    lines = body.decode().split("\n")
    assert lines[-1] == "" and len(lines) == 9  # header + 7 rows, each ending in a newline
    rows = [[tsv_unescape(f) for f in line.split("\t")] for line in lines[:-1]]
    assert rows[0] == ["n", "s", "v", "arr", "t"]
    assert [r[1] for r in rows[1:]] == EXPECTED_S and rows[3][2] is None


def test_jsonl_is_one_object_per_line(ch):
    body, stats, error = collect(ch, TRICKY, LIMITS, "jsonl")
    assert error is None and stats.bytes == len(body)
    objects = [json.loads(line) for line in body.decode().splitlines()]
    assert len(objects) == 7 and [o["s"] for o in objects] == EXPECTED_S and objects[2]["v"] is None
    _, _, duplicate = collect(ch, "SELECT 1, 1", LIMITS, "jsonl")
    assert duplicate is not None and "appears twice" in duplicate.message


@pytest.mark.parametrize("fmt, expected", [("csv", b"a,b\r\n"), ("tsv", b"a\tb\n"), ("jsonl", b""),
                                           ("json", b'{"columns":["a","b"],"types":["UInt64","String"],'
                                                    b'"rows":[],"row_count":0}')])
def test_empty_results_still_have_a_header(ch, fmt, expected):
    body, _, error = collect(ch, "SELECT number AS a, toString(number) AS b FROM numbers(5) WHERE number > 10",
                             LIMITS, fmt)
    assert error is None and body == expected


def test_csv_streams_in_chunks_and_errors_come_before_the_first_byte(ch):
    chunks = list(stream(ch, prepare(ch, "SELECT number FROM numbers(300000)", DB),
                         SqlLimits(20, 1 << 30, 10**6, 1 << 24, 1), "csv", QueryStats()))
    assert len(chunks) > 2 and b"".join(chunks).count(b"\n") == 300001
    failing = stream(ch, prepare(ch, "SELECT throwIf(number = 0, 'boom') FROM numbers(3)", DB), LIMITS, "csv",
                     QueryStats())
    with pytest.raises(AnalystQueryError) as info:
        next(failing)
    assert info.value.code == "failed" and "boom" in info.value.message


def test_unknown_format_is_refused(ch):
    with pytest.raises(AnalystQueryError) as info:
        next(stream(ch, "SELECT 1", LIMITS, "xml", QueryStats()))
    assert info.value.code == "refused"


def test_analyst_queries_leave_the_shared_session_writable(ch):
    run_query(ch, "SELECT 1", LIMITS)
    assert ch.query("SELECT getSetting('readonly')").result_rows == [(0,)]
    assert _session_readonly(ch) == 0


def test_sessions_that_are_already_readonly(own_client):
    two = own_client()
    two.command("SET readonly = 2")  # what the production profile gives (docs/clickhouse-analyst-user.sql)
    assert run_query(two, "SELECT number FROM numbers(3)", LIMITS).rows == [[0], [1], [2]]
    with pytest.raises(AnalystQueryError) as info:
        run_query(two, "SELECT number FROM numbers(5000)", LIMITS)
    assert info.value.code == "too_large"
    one = own_client()
    one.command("SET readonly = 1")
    with pytest.raises(AnalystQueryError) as info:
        run_query(one, "SELECT 1", LIMITS)
    assert info.value.code == "failed" and "readonly = 2" in info.value.message


# --- the production user's SQL parses ---------------------------------------------------------------------

def test_the_analyst_user_sql_parses_statement_by_statement(ch):
    text = (Path(__file__).resolve().parents[1] / "docs" / "clickhouse-analyst-user.sql").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    statements = [s.strip() for s in body.split(";") if s.strip()]
    canonical = [ch.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": s}).result_rows[0][0]
                 for s in statements]
    assert len(canonical) == 7
    profile, user, revoke, *grants = canonical
    assert profile.startswith("CREATE SETTINGS PROFILE IF NOT EXISTS `tally_analyst` SETTINGS readonly = 2,")
    for setting in ("max_execution_time = 30 MAX 30", "max_memory_usage = 2147483648 MAX 2147483648",
                    "max_result_rows = 10000 MAX 10000", "max_result_bytes = 67108864 MAX 67108864",
                    "result_overflow_mode = 'throw'", "timeout_overflow_mode = 'throw'"):
        assert setting in profile
    assert "SETTINGS PROFILE `tally_analyst`" in user and "DEFAULT DATABASE tally" in user
    assert revoke == "REVOKE ALL ON *.* FROM tally_analyst"
    assert grants == [f"GRANT SELECT ON {table} TO tally_analyst"  # the analyst tables and views (ADR 51, 52)
                      for table in ("tally.events", "tally.sites", "tally.countries", "tally_catalog.*")]


# --- (h) the audit log -----------------------------------------------------------------------------------

def test_audit_record_and_last(servers):
    class Entry:  # the analyst server hands over an object with these attributes
        token_id = "tok_0123456789"
        started_at = datetime.now(UTC)
        sql = f"SELECT 'audit-{uuid.uuid4().hex}'"
        format = "csv"
        status = "too_large"
        rows = 12
        bytes = 34567
        duration_ms = 12.6
        error = "the result is larger than 1048576 bytes"

    first = audit.record(servers.pg_dsn, Entry())
    second = audit.record(servers.pg_dsn, sql="SELECT file('/etc/passwd')", format="json", status="refused",
                          error="function file is not allowed in analyst SQL")
    newest = audit.last(servers.pg_dsn, 2)
    assert [r.id for r in newest] == [second, first]
    assert newest[1].token_id == "tok_0123456789" and newest[1].rows == 12 and newest[1].bytes == 34567
    assert newest[1].duration_ms == 13 and newest[1].status == "too_large" and newest[1].sql == Entry.sql
    assert newest[0].token_id is None and newest[0].status == "refused" and newest[0].rows == 0
    with pytest.raises(ValueError):
        audit.record(servers.pg_dsn, sql="SELECT 1", format="json", status="sideways")
    with pytest.raises(ValueError):
        audit.last(servers.pg_dsn, 0)


def test_the_audit_table_refuses_unknown_statuses_itself(servers):
    import psycopg

    with psycopg.connect(servers.pg_dsn) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO analyst_queries (started_at, sql, format, status)"
                     " VALUES (now(), 'x', 'json', 'nope')")


def test_the_audit_schema_is_idempotent(servers):
    from oltp.schema import ensure_schema as ensure_pg

    ensure_pg(servers.pg_dsn)
    ensure_pg(servers.pg_dsn)


def sql_log(servers, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn)
    return subprocess.run([sys.executable, "-m", "tally.cli", "sql-log", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_sql_log_command(servers, tmp_path):
    marker = f"log-{uuid.uuid4().hex[:8]}"
    audit.record(servers.pg_dsn, token_id="tok_00000000ab", sql=f"SELECT '{marker}'\nFROM numbers(1)",
                 format="tsv", status="ok", rows=1, bytes=9, duration_ms=3)
    audit.record(servers.pg_dsn, token_id="tok_00000000ab", sql=f"SELECT file('{marker}')", format="json",
                 status="refused", error="function file is not allowed in analyst SQL")
    out = sql_log(servers, tmp_path, "--last", "2", "--json")
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert [r["status"] for r in records] == ["refused", "ok"]
    assert records[0]["error"].startswith("function file") and records[1]["rows"] == 1
    assert records[1]["sql"] == f"SELECT '{marker}'\nFROM numbers(1)"
    text = sql_log(servers, tmp_path, "--last", "2")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["started", "(UTC)", "token"]
    assert f"SELECT '{marker}' FROM numbers(1)" in text.stdout and "! function file is not allowed" in text.stdout
    bad = sql_log(servers, tmp_path, "--last", "0")
    assert bad.returncode == 2 and "--last" in bad.stderr


# --- the limits cover the whole statement, not only its last SELECT -----------------------------------

SLOW = "SELECT count() AS c FROM numbers_mt(1000000000000) WHERE cityHash64(number) % 7 = 3"


@pytest.mark.parametrize("sql", [
    f"{SLOW} UNION ALL SELECT 1",  # the limits ride at the end of the text: they must reach the first branch
    f"WITH x AS ({SLOW}) SELECT (SELECT c FROM x)",  # a scalar subquery, run while the query is planned
    f"SELECT 1 WHERE 1 IN ({SLOW})",
])
def test_the_time_limit_covers_every_part_of_the_statement(ch, sql):
    started = time.monotonic()
    with pytest.raises(AnalystQueryError) as info:
        run_query(ch, sql, SqlLimits(1, 1 << 30, 10, 1 << 20, 1))
    assert info.value.code == "timeout" and time.monotonic() - started < 5


def test_the_row_limit_covers_every_union_branch(ch):
    limits = SqlLimits(20, 1 << 30, 100, 1 << 20, 1)
    assert len(run_query(ch, "SELECT number FROM numbers(50) UNION ALL SELECT number FROM numbers(50)", limits).rows) \
        == 100
    with pytest.raises(AnalystQueryError) as info:
        run_query(ch, "SELECT number FROM numbers(60) UNION ALL SELECT number FROM numbers(60)", limits)
    assert info.value.code == "too_large"
