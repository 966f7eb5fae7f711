"""Item 9 of issue 15: aggregate functions named in strings are checked against the same verdict table.

`arrayReduce`, `arrayReduceInRanges` and `initializeAggregation` take an aggregate's name (with
combinators and parameters) as a string, and type names (`CAST`, `::`, `defaultValueOfTypeName`, ...)
can hold `AggregateFunction(...)` / `SimpleAggregateFunction(...)`. Before, none of these strings
was looked at: `arrayReduce('stochasticLinearRegression', ...)` ran although the table denies it, and
ClickHouse evaluates the parameters in such a string, so `arrayReduce('quantile(f())', ...)` ran
functions the allowlist denies. Every refusal below is one test case; the allowed forms still work.
"""

from __future__ import annotations

import json

import pytest

from olap.allowlist import AGGREGATE_NAME_ARGUMENTS, TYPE_ARGUMENTS, function_table
from olap.analyst import AnalystQueryError, SqlLimits, prepare, run_query
from olap.client import connect
from olap.schema import ensure_schema
from tests.test_analyst_server import query

DB = "tally"
LIMITS = SqlLimits(max_execution_s=20, max_memory_bytes=1 << 30, max_result_rows=1000, max_result_bytes=1 << 20,
                   max_threads=1)
SLR = "stochasticLinearRegression"


@pytest.fixture(scope="module")
def ch(servers):
    client = connect(servers.chdb_dsn)
    ensure_schema(client, DB)
    return client


@pytest.mark.parametrize("sql, words", [
    # aggregate names in arrayReduce / arrayReduceInRanges / initializeAggregation
    (f"SELECT arrayReduce('{SLR}', [1., 2.], [1., 2.])", f"aggregate function {SLR} (in arrayReduce)"),
    (f"SELECT arrayReduce('{SLR}State', [1., 2.], [1., 2.])", f"aggregate function {SLR}State"),
    (f"SELECT arrayReduce('{SLR}(0.1)', [1., 2.], [1., 2.])", f"aggregate function {SLR} "),
    ("SELECT arrayReduce('noSuchAggregate', [1])", "aggregate function noSuchAggregate"),
    ("SELECT arrayReduce('sumx', [1])", "aggregate function sumx"),
    ("SELECT arrayReduce('length', [1])", "aggregate function length"),  # a plain function, not an aggregate
    ("SELECT arrayReduce('flameGraph', [1])", "aggregate function flameGraph"),
    ("SELECT arrayReduce(concat('s', 'um'), [1, 2, 3])", "must be written as a string literal"),
    ("SELECT arrayReduce(toString(number), [1]) FROM numbers(1)", "must be written as a string literal"),
    ("SELECT arrayReduce('quantile(length(currentDatabase()) / 100)', [1, 2, 3])", "plain number or string literals"),
    ("SELECT arrayReduce('quantile(0.5 + 0.1)', [1, 2, 3])", "plain number or string literals"),
    ("SELECT arrayReduce('sum; DROP', [1])", "is not an aggregate function name"),
    ("SELECT arrayReduceInRanges('hierarchicalKMeans', [(1, 2)], [1, 2, 3])", "aggregate function hierarchicalKMeans"),
    ("SELECT arrayReduceInRanges(concat('su', 'm'), [(1, 2)], [1, 2, 3])", "must be written as a string literal"),
    ("SELECT initializeAggregation('stochasticLogisticRegressionState', 1., 1.)",
     "aggregate function stochasticLogisticRegressionState (in initializeAggregation)"),
    ("SELECT initializeAggregation(concat('sum', 'State'), 1)", "must be written as a string literal"),
    ("SELECT cast(1, concat('UInt', '8'))", "CAST: the type name"),  # CAST is case-insensitive
    # AggregateFunction / SimpleAggregateFunction types, wherever a type name is a string
    (f"SELECT CAST(arrayReduce('sumState', [1]), 'AggregateFunction({SLR}, Float64, Float64)')",
     f"aggregate function {SLR} (in the type"),
    (f"SELECT number::AggregateFunction(1, {SLR}, Float64, Float64) FROM numbers(1)", f"aggregate function {SLR}"),
    (f"SELECT CAST(number AS AggregateFunction({SLR}State, Float64)) FROM numbers(1)",
     f"aggregate function {SLR}State"),
    ("SELECT CAST(1, 'SimpleAggregateFunction(noSuchAgg, UInt8)')", "aggregate function noSuchAgg"),
    ("SELECT accurateCastOrNull(1, 'Array(AggregateFunction(flameGraph, UInt8))')", "aggregate function flameGraph"),
    ("SELECT defaultValueOfTypeName('Tuple(a AggregateFunction(hierarchicalKMeans, Float64))')",
     "aggregate function hierarchicalKMeans"),
    ("SELECT * FROM values('a AggregateFunction(stochasticLinearRegression, Float64, Float64)', 1)",
     "aggregate function stochasticLinearRegression"),
    ("SELECT CAST(1, concat('UInt', '64'))", "CAST: the type name must be written as a string literal"),
    ("SELECT accurateCast(1, concat('Aggregate', 'Function(sum, UInt8)'))", "accurateCast: the type name"),
    ("SELECT defaultValueOfTypeName(toString(number)) FROM numbers(1)", "defaultValueOfTypeName: the type name"),
    ("SELECT JSONExtract('{}', concat('UInt', '8'))", "JSONExtract: the type name"),
    ("SELECT * APPLY(arrayReduce) FROM numbers(1)", "APPLY(arrayReduce) is not allowed"),
])
def test_aggregates_named_in_strings_are_checked(ch, sql, words):
    with pytest.raises(AnalystQueryError) as info:
        prepare(ch, sql, DB)
    assert info.value.code == "refused" and words in info.value.message, info.value.message


def test_every_aggregate_the_table_denies_is_refused_in_every_string_form(ch):
    table = function_table()
    denied = sorted(n for n, (verdict, kind, _ci, _why) in table.functions.items()
                    if kind == "aggregate" and verdict == "deny")
    assert SLR in denied and "flameGraph" in denied
    for name in denied:
        for sql in (f"SELECT arrayReduce('{name}', [1.], [1.])", f"SELECT initializeAggregation('{name}State', 1.)",
                    f"SELECT arrayReduceInRanges('{name}If', [(1, 1)], [1.], [1])",
                    f"SELECT CAST(1, 'AggregateFunction({name}, Float64)')",
                    f"SELECT CAST(1, 'SimpleAggregateFunction({name}, Float64)')"):
            with pytest.raises(AnalystQueryError) as info:
                prepare(ch, sql, DB)
            assert f"aggregate function {name}" in info.value.message, (sql, info.value.message)


def test_the_rules_name_functions_clickhouse_has(ch):
    names = {r[0].lower() for r in ch.query("SELECT name FROM system.functions").result_rows}
    assert set(AGGREGATE_NAME_ARGUMENTS) <= names and set(TYPE_ARGUMENTS) <= names


@pytest.mark.parametrize("sql, rows", [
    ("SELECT arrayReduce('sumIf', [1, 2], [1, 0])", [[1]]),
    ("SELECT arrayReduce('max', [3, 1, 2])", [[3]]),
    ("SELECT arrayReduce('quantileExact(0.5)', [1, 2, 3])", [[2]]),
    ("SELECT arrayReduce('sequenceMatch(''(?1)(?2)'')', [1, 2], [1, 0], [0, 1])", [[1]]),
    ("SELECT arrayReduce('groupArrayResample(0, 4, 2)', [1, 2, 3], [0, 1, 3])", [[[[1, 2], [3]]]]),
    ("SELECT arrayReduceInRanges('sum', [(1, 2), (2, 2)], [1, 2, 3])", [[[3, 5]]]),
    ("SELECT finalizeAggregation(initializeAggregation('sumState', number)) FROM numbers(3)", [[0], [1], [2]]),
    ("SELECT finalizeAggregation(CAST(arrayReduce('sumState', [1, 2]), 'AggregateFunction(sum, UInt8)'))", [[3]]),
    ("SELECT toTypeName(defaultValueOfTypeName('AggregateFunction(quantiles(0.5, 0.9), UInt8)'))",
     [["AggregateFunction(quantiles(0.5, 0.9), UInt8)"]]),
    ("SELECT CAST(1 AS UInt8), 2::UInt16, accurateCastOrNull(300, 'UInt8')", [[1, 2, None]]),
    ("SELECT JSONExtract('{\"a\": 1}', 'a', 'UInt8')", [[1]]),
    ("SELECT 'AggregateFunction(sum, UInt8)' AS just_a_string", [["AggregateFunction(sum, UInt8)"]]),
])
def test_allowed_aggregates_in_strings_still_work(ch, sql, rows):
    assert run_query(ch, sql, LIMITS, DB).rows == rows


# --- the review of ADR 32 (finding B): ClickHouse's type parser reads more spellings than `AggregateFunction(` --
# Each of these names an aggregate the table denies (or hides which aggregate it names); before, the check looked
# for `AggregateFunction` followed directly by `(` and let them all through (the first one ran and answered 200).

SLR_TYPE = f"{SLR}, Float64, Float64)"
SPELLINGS = "spells AggregateFunction in a way ClickHouse could read as a type"


@pytest.mark.parametrize("sql, words", [
    # the review's query, as it was sent
    (f"SELECT finalizeAggregation(defaultValueOfTypeName('AggregateFunction/**/({SLR_TYPE}')) AS w, "
     f"toTypeName(defaultValueOfTypeName('`AggregateFunction`(stochasticLogisticRegression, Float64, Float64)')) AS t",
     SPELLINGS),
    # a comment between the name and the parenthesis, nested comments, a line comment
    (f"SELECT defaultValueOfTypeName('AggregateFunction/**/({SLR_TYPE}')", SPELLINGS),
    (f"SELECT defaultValueOfTypeName('AggregateFunction/* /* */ */({SLR_TYPE}')", SPELLINGS),
    (f"SELECT defaultValueOfTypeName('AggregateFunction -- x\n({SLR_TYPE}')", SPELLINGS),
    # the type's name backquoted or double-quoted
    (f"SELECT toTypeName(defaultValueOfTypeName('`AggregateFunction`({SLR_TYPE}'))", SPELLINGS),
    ("SELECT toTypeName(defaultValueOfTypeName('\"AggregateFunction\"(flameGraph, Array(UInt64))'))", SPELLINGS),
    ("SELECT toTypeName(defaultValueOfTypeName('`SimpleAggregateFunction`(flameGraph, Array(UInt64))'))", SPELLINGS),
    # escapes inside a quoted name: \x46 is F, \N is nothing
    (f"SELECT toTypeName(defaultValueOfTypeName('`Aggregate\\\\x46unction`({SLR_TYPE}'))", SPELLINGS),
    (f"SELECT toTypeName(defaultValueOfTypeName('`Aggregate\\\\NFunction`({SLR_TYPE}'))", SPELLINGS),
    # the aggregate's name quoted, escaped or followed by a comment
    (f"SELECT toTypeName(defaultValueOfTypeName('AggregateFunction(`{SLR}`, Float64, Float64)'))", SPELLINGS),
    ("SELECT toTypeName(defaultValueOfTypeName('AggregateFunction(`s\\\\x75m`, UInt8)'))", SPELLINGS),
    (f"SELECT toTypeName(defaultValueOfTypeName('AggregateFunction({SLR}/**/, Float64, Float64)'))", SPELLINGS),
    # CAST of an analyst-supplied state into a denied aggregate
    (f"SELECT finalizeAggregation(CAST(unhex('00'), 'AggregateFunction/**/({SLR_TYPE}'))", SPELLINGS),
    (f"SELECT CAST('', 'AggregateFunction({SLR_TYPE}')", f"aggregate function {SLR} (in the type"),
    # inside other types, next to a plain allowed one, and as a tuple element's name
    (f"SELECT defaultValueOfTypeName('Tuple(a AggregateFunction(sum, UInt8), b `AggregateFunction`({SLR_TYPE})')",
     SPELLINGS),
    (f"SELECT defaultValueOfTypeName('Nested(a \"AggregateFunction\"({SLR_TYPE})')", SPELLINGS),
    (f"SELECT defaultValueOfTypeName('Array(Nullable(AggregateFunction/**/({SLR_TYPE}))')", SPELLINGS),
    (f"SELECT defaultValueOfTypeName('AggregateFunction(sum, AggregateFunction/**/({SLR_TYPE})')", SPELLINGS),
    ("SELECT * FROM values('a `AggregateFunction`(flameGraph, Array(UInt64))', 1)", SPELLINGS),
    # parameters: only plain literals, one level
    ("SELECT defaultValueOfTypeName('AggregateFunction(quantile(CAST(0.5, ''Float64'')), UInt8)')", SPELLINGS),
    ("SELECT defaultValueOfTypeName('AggregateFunction(quantiles(0.5)(0.1), UInt8)')", SPELLINGS),
    ("SELECT defaultValueOfTypeName('AggregateFunction(quantile(0.5 + 0.1), UInt8)')",
     "plain number or string literals"),
    (f"SELECT defaultValueOfTypeName('AggregateFunction({SLR}(0.1), Float64, Float64)')", f"aggregate function {SLR}"),
    # the type family names are case-sensitive in ClickHouse; any other case is refused all the same
    (f"SELECT defaultValueOfTypeName('aggregatefunction({SLR_TYPE}')", SPELLINGS),
])
def test_every_spelling_clickhouse_reads_as_an_aggregate_type_is_refused(analyst_url, sql, words):
    """Through the real analyst server, as the API sends it."""
    status, _, body = query(analyst_url, sql)
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "query_refused", body[:300]
    assert words in error["message"], error["message"]


@pytest.mark.parametrize("sql, rows", [
    ("SELECT toTypeName(defaultValueOfTypeName('AggregateFunction(sumResample(0, 10, 1), UInt8, UInt8)'))",
     [["AggregateFunction(sumResample(0, 10, 1), UInt8, UInt8)"]]),
    ("SELECT toTypeName(defaultValueOfTypeName('Nested(a AggregateFunction(1, sum, UInt8))'))",
     [["Nested(a AggregateFunction(1, sum, UInt8))"]]),
    ("SELECT toTypeName(defaultValueOfTypeName('AggregateFunction( count )'))", [["AggregateFunction(count)"]]),
    ("SELECT toTypeName(defaultValueOfTypeName('SimpleAggregateFunction(max, UInt8)'))",
     [["SimpleAggregateFunction(max, UInt8)"]]),
    ("SELECT concat('aggregate', ' function') AS words", [["aggregate function"]]),
])
def test_plain_allowed_aggregate_types_still_work(ch, sql, rows):
    assert run_query(ch, sql, LIMITS, DB).rows == rows


def test_text_that_merely_spells_the_word_is_refused_with_the_way_around(ch):
    with pytest.raises(AnalystQueryError) as info:
        prepare(ch, "SELECT count() FROM tally.events WHERE url LIKE '%aggregate-function%'", DB)
    assert SPELLINGS in info.value.message and "concat('aggregate', 'function')" in info.value.message
