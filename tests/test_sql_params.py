"""Query parameters of analyst SQL (ADR 53): `{name:Type}` in the query, the values in the request's `params`,
bound by ClickHouse (never pasted into the text), through the allowlist, the analyst server and the API's
`/api/v1/sql`, against real chDB, PostgreSQL and HTTP servers. Every refusal is a test."""

from __future__ import annotations

import http.client
import json
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit

import psycopg
import pytest

from core.keys import internal_token
from olap.allowlist import param_type_allowed
from olap.analyst import AnalystQueryError, SqlLimits, prepare, run_query
from olap.client import connect
from olap.params import MAX_PARAM_BYTES, MAX_PARAMS, ParamsError, parse_params
from olap.schema import ensure_schema
from tests.conftest import SECRET

DB = "tally"
LIMITS = SqlLimits(max_execution_s=20, max_memory_bytes=1 << 30, max_result_rows=1000, max_result_bytes=1 << 20,
                   max_threads=1)


@pytest.fixture(scope="module")
def ch(servers):
    client = connect(servers.chdb_dsn)
    ensure_schema(client, DB)
    return client


@pytest.fixture(scope="module")
def site(ch):
    """Two domains with two and three events in tally.events: (the first domain, the second)."""
    first, second = (f"p{uuid.uuid4().hex[:10]}.example.com" for _ in range(2))
    now = datetime.now(UTC).replace(microsecond=0)
    rows = [[uuid.uuid4().hex, domain, f"https://{domain}/", now, now, "impression", 2.5, None, None, "Firefox",
             "Linux", "desktop", None, "v1"] for domain in (first, first, second, second, second)]
    ch.insert(f"{DB}.events", rows, column_names=["hash", "domain", "url", "ts", "received_at", "type", "value",
                                                   "referrer", "user_agent", "browser", "os", "device", "country",
                                                   "visitor"])
    return first, second


def refused(ch, sql: str, params: dict | None) -> str:
    with pytest.raises(AnalystQueryError) as info:
        run_query(ch, sql, LIMITS, DB, params)
    assert info.value.code == "refused", info.value.message
    return info.value.message


# --- bound by ClickHouse, never pasted ---------------------------------------------------------------------


def test_a_parameter_filters_the_analyst_tables(ch, site):
    first, second = site
    sql = f"SELECT count() AS n, toFloat64(sum(value)) AS v FROM {DB}.events WHERE domain = {{d:String}}"
    assert run_query(ch, sql, LIMITS, DB, {"d": first}).rows == [[2, 5.0]]
    assert run_query(ch, sql, LIMITS, DB, {"d": second}).rows == [[3, 7.5]]
    # several, one used twice, in IN and in LIMIT; and an empty answer (its header comes from DESCRIBE, bound too)
    rows = run_query(ch, f"SELECT domain, count() FROM {DB}.events WHERE domain IN {{ds:Array(String)}} "
                     "GROUP BY domain ORDER BY domain LIMIT {n:UInt8}", LIMITS, DB,
                     {"ds": f"['{first}','{second}']", "n": "5"}).rows
    assert rows == sorted([[first, 2], [second, 3]])
    empty = run_query(ch, f"SELECT domain FROM {DB}.events WHERE domain = {{d:String}}", LIMITS, DB, {"d": "none"})
    assert empty.columns == ["domain"] and empty.rows == []


@pytest.mark.parametrize("value", [
    "x' OR 1 = 1 --", "'); DROP TABLE tally.events; --", "%(d)s", "{e:String}", "$$ $heredoc$", "é 日本",
])
def test_a_value_is_data_whatever_it_holds(ch, site, value):
    """Quotes, comments, another placeholder, Python %-formatting, heredocs: the value comes back as itself, the
    canonical text that runs still has the placeholder and not the value, and the table is still there."""
    sql = "SELECT {d:String} AS d, '%(d)s' AS literal, length({d:String}) AS len"
    text = prepare(ch, sql, DB, {"d": value})
    assert "{d:String}" in text and value not in text.replace("'%(d)s'", "")
    assert run_query(ch, sql, LIMITS, DB, {"d": value}).rows == [[value, "%(d)s", len(value.encode())]]
    assert ch.query(f"EXISTS TABLE {DB}.events").result_rows == [(1,)]


def test_values_are_clickhouse_text_as_its_own_param_arguments(ch):
    """As ClickHouse's `param_<name>=`: a backslash escape is read (\\t is a tab, \\N is NULL), arrays are
    written as literals, times and decimals parse as their types."""
    result = run_query(ch, "SELECT {s:String} AS s, {a:Array(String)} AS a, {t:DateTime64(3, 'UTC')} AS t, "
                           "{x:Nullable(Decimal(10, 2))} AS x, {y:Nullable(Int64)} AS y, {u:UUID} AS u, "
                           "{b:Bool} AS b", LIMITS, DB,
                       {"s": "a\\tb'c", "a": "['x','y\\'z']", "t": "2026-01-02 03:04:05.123", "x": "12.345",
                        "y": "\\N", "u": "61f0c404-5cb3-11e7-907b-a6006ad3dba0", "b": "true"})
    assert result.rows == [["a\tb'c", ["x", "y'z"], "2026-01-02T03:04:05.123Z", "12.34", None,
                            "61f0c404-5cb3-11e7-907b-a6006ad3dba0", True]]


def test_parameters_work_in_table_functions_and_subqueries(ch):
    rows = run_query(ch, "WITH t AS (SELECT number FROM numbers({n:UInt32}) WHERE number >= {low:UInt32}) "
                         "SELECT sum(number) FROM t", LIMITS, DB, {"n": "10", "low": "7"}).rows
    assert rows == [[24]]


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql, params, words", [
    # the query and the values must match one to one
    ("SELECT {n:UInt8}", None, "none was sent for {n:UInt8}"),
    ("SELECT {n:UInt8}, {m:String}", {"n": "1"}, "none was sent for {m:String}"),
    ("SELECT {n:UInt8}", {"n": "1", "extra": "2"}, "query parameter extra: not used in the query"),
    ("SELECT 1", {"n": "1"}, "query parameter n: not used in the query"),
    ("SELECT '{n:UInt8}'", {"n": "1"}, "query parameter n: not used"),  # a string that looks like one is not one
    # a parameter stands for a value: never a table, column or database name
    ("SELECT {c:Identifier}", {"c": "hash"}, "type Identifier"),
    ("SELECT * FROM {t:Identifier}", {"t": "system.users"}, "type Identifier"),
    ("SELECT * FROM {db:Identifier}.events", {"db": "system"}, "type Identifier"),
    ("SELECT 1 IN {t:Identifier}", {"t": "system.users"}, "type Identifier"),
    ("SELECT 1 FROM tally.events WHERE domain GLOBAL IN {t:Identifier}", {"t": "system.users"}, "type Identifier"),
    # types: plain values only
    ("SELECT {x:AggregateFunction(groupArray, String)}", {"x": "[]"}, "type AggregateFunction(groupArray, String)"),
    ("SELECT {x:JSON}", {"x": "{}"}, "type JSON is not allowed"),
    ("SELECT {x:Map(String, String)}", {"x": "{}"}, "type Map(String, String) is not allowed"),
    ("SELECT {x:Tuple(String)}", {"x": "('a')"}, "is not allowed"),
    ("SELECT {x:Dynamic}", {"x": "1"}, "type Dynamic is not allowed"),
    ("SELECT {x:INT}", {"x": "1"}, "type INT is not allowed"),
    ("SELECT {x:Array(Array(Array(Array(Array(UInt8)))))}", {"x": "[]"}, "is not allowed"),
    ("SELECT {x:FixedString(concat(1))}", {"x": "a"}, "is not allowed"),
    # where the allowlist needs a literal, a parameter does not do
    ("SELECT arrayReduce({f:String}, [1, 2])", {"f": "sum"}, "string literal"),
    ("SELECT CAST(1, {t:String})", {"t": "UInt8"}, "string literal"),
    ("SELECT multiMatchAny('a', {p:Array(String)})", {"p": "['a']"}, "literal array"),
    # a value is checked as a string literal is: no aggregate named in an AggregateFunction type
    ("SELECT {s:String}", {"s": "AggregateFunction(file, String)"}, "query parameter s: aggregate function file"),
    ("SELECT {s:String}", {"s": "Aggregate\\x46unction(file, String)"}, "query parameter s:"),
    # what the parameters' own checks refuse
    ("SELECT {x:String}", {"x-y": "1"}, "name 'x-y' is not valid"),
    ("SELECT {x:String}", {"x": 1}, "the value must be a string"),
    ("SELECT {x:String}", ["x"], "params must be a JSON object"),
    ("SELECT {x:String}", {"x": "a" * (MAX_PARAM_BYTES + 1)}, f"at most {MAX_PARAM_BYTES} bytes"),
    ("SELECT {x:String}", {f"p{i}": "1" for i in range(MAX_PARAMS + 1)}, f"at most {MAX_PARAMS} query parameters"),
    ("SELECT {x:String}", {"x": "\ud800"}, "not valid Unicode"),
])
def test_refused_naming_what(ch, sql, params, words):
    message = refused(ch, sql, params)
    assert words in message, message


def test_without_values_a_query_with_parameters_is_still_refused_as_before(ch):
    assert "query parameters" in refused(ch, "SELECT {p:String}", None)


@pytest.mark.parametrize("sql, value", [
    ("SELECT {n:UInt8}", "abc"), ("SELECT {n:UInt8}", "5 "), ("SELECT {n:UInt8}", ""),
    ("SELECT {d:Date}", "yesterday"), ("SELECT {a:Array(String)}", "[a, b]"), ("SELECT {u:UUID}", "not-a-uuid"),
])
def test_a_value_that_does_not_parse_as_its_type_is_refused_naming_the_parameter(ch, sql, value):
    name = sql[8]
    message = refused(ch, sql, {name: value})
    assert f"query parameter '{name}'" in message, message


def test_the_parameter_types(ch):
    for ok in ("String", "UInt64", "Nullable(String)", "Array(Nullable(Int32))", "Array( String )", "Decimal(10,2)",
               "Decimal(10, 2)", "DateTime('Europe/Berlin')", "DateTime64(3, 'America/Argentina/Buenos_Aires')",
               "FixedString(16)", "Date32", "IPv6", "Bool"):
        assert param_type_allowed(ok), ok
    for bad in ("Identifier", "string", "LowCardinality(String)", "String(1)", "UInt8('x')", "Nullable(String",
                "Array(String))", "Decimal(1, 2, 3)", "DateTime(now())", "Array(String), Array(String)", "", "Nothing"):
        assert not param_type_allowed(bad), bad


def test_parse_params_shapes():
    assert parse_params(None) == {}
    assert parse_params({"d": "example.com", "_x1": ""}) == {"d": "example.com", "_x1": ""}
    for bad in ("x", 1, [("d", "x")], {"": "x"}, {"1d": "x"}, {"d" * 65: "x"}, {"d": None}, {"d": ["x"]},
                {"d$": "x"}, {"é": "x"}):
        with pytest.raises(ParamsError):
            parse_params(bad)


# --- the analyst server's `params` field and the API's body ----------------------------------------------


def post_query(url: str, body: dict) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", "/v1/query", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {internal_token(SECRET)}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_the_analyst_server_binds_params_and_names_bad_ones(analyst_url):
    status, body = post_query(analyst_url, {"sql": "SELECT {n:UInt16} * 2 AS twice, {s:String} AS s",
                                            "format": "json", "params": {"n": "21", "s": "it's"}})
    assert status == 200 and body["rows"] == [[42, "it's"]], body
    for params, code, words in (
        ({"n": 5}, "invalid_params", "query parameter n: the value must be a string"),
        ("n=5", "invalid_params", "params must be a JSON object"),
        ({"n-1": "5"}, "invalid_params", "name 'n-1' is not valid"),
        ({}, "query_refused", "none was sent for {n:UInt16}"),
        ({"n": "5", "m": "6"}, "query_refused", "query parameter m: not used"),
        ({"n": "-1x"}, "query_refused", "query parameter 'n'"),
    ):
        status, body = post_query(analyst_url, {"sql": "SELECT {n:UInt16}", "params": params})
        assert status == 400 and body["error"]["code"] == code and words in body["error"]["message"], body


@pytest.fixture(scope="module")
def api(servers, analyst_url, tmp_path_factory):
    """The API app (Flask's test client, no port) relaying to the session's analyst server, and an analyst token."""
    from core.config import Settings
    from oltp import tokens
    from tally.roots import build_api

    settings = Settings.from_env({"TALLY_HOME": str(tmp_path_factory.mktemp("sqlparams")),
                                  "TALLY_PG_DSN": servers.pg_dsn, "TALLY_SECRET": SECRET,
                                  "TALLY_ANALYST_URL": analyst_url})
    app = build_api(settings)
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "analyst", name="test_sql_params")
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    yield client
    app.extensions["tally_backends"].rollups.pool.close()


def test_the_api_relays_params(api):
    resp = api.post("/api/v1/sql?format=csv", json={"sql": "SELECT {d:String} AS d", "params": {"d": "a,b"}})
    assert resp.status_code == 200 and resp.get_data(as_text=True) == 'd\r\n"a,b"\r\n'
    resp = api.post("/api/v1/sql", json={"sql": "SELECT {d:Date} AS d", "params": {"d": "2026-02-03"}})
    assert resp.status_code == 200 and resp.json["rows"] == [["2026-02-03"]]


@pytest.mark.parametrize("body, code, words", [
    ({"sql": "SELECT {d:String}", "params": {"d": 1}}, "invalid_params", "query parameter d: the value must be"),
    ({"sql": "SELECT {d:String}", "params": "d=1"}, "invalid_params", "params must be a JSON object"),
    ({"sql": "SELECT {d:String}", "params": {"d;drop": "1"}}, "invalid_params", "is not valid"),
    ({"sql": "SELECT {d:String}", "params": {f"p{i}": "1" for i in range(MAX_PARAMS + 1)}}, "invalid_params",
     "at most 64"),
    ({"sql": "SELECT {d:String}"}, "query_refused", "none was sent for {d:String}"),
    ({"sql": "SELECT 1", "params": {"d": "x"}}, "query_refused", "query parameter d: not used"),
    ({"sql": "SELECT {d:Date}", "params": {"d": "soon"}}, "query_refused", "query parameter 'd'"),
    ({"sql": "SELECT 1", "parameters": {"d": "x"}}, "invalid_body", '"params"'),
])
def test_the_api_names_bad_params(api, body, code, words):
    resp = api.post("/api/v1/sql", json=body)
    assert resp.status_code == 400 and resp.json["error"]["code"] == code, resp.json
    assert words in resp.json["error"]["message"], resp.json
