"""Item 9 of issue 15: aggregate functions named in strings are checked against the same verdict table.

`arrayReduce`, `arrayReduceInRanges` and `initializeAggregation` take an aggregate's name (with
combinators and parameters) as a string, and type names (`CAST`, `::`, `defaultValueOfTypeName`, ...)
can hold `AggregateFunction(...)` / `SimpleAggregateFunction(...)`. Before, none of these strings
was looked at: `arrayReduce('stochasticLinearRegression', ...)` ran although the table denies it, and
ClickHouse evaluates the parameters in such a string, so `arrayReduce('quantile(f())', ...)` ran
functions the allowlist denies. Every refusal below is one test case; the allowed forms still work.
"""

from __future__ import annotations

import pytest

from olap.allowlist import AGGREGATE_NAME_ARGUMENTS, TYPE_ARGUMENTS, function_table
from olap.analyst import AnalystQueryError, SqlLimits, prepare, run_query
from olap.client import connect
from olap.schema import ensure_schema

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
    (f"SELECT CAST(number AS AggregateFunction({SLR}State, Float64)) FROM numbers(1)", f"aggregate function {SLR}State"),
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
