"""Item 3 of issue 15, the parts that bound work before the watchdog is needed (ADR 32): super-linear
functions refused, pattern lists capped, small blocks, and a query text cap."""

from __future__ import annotations

import pytest

from olap.allowlist import COSTLY, MAX_PATTERNS, function_table
from olap.analyst import (
    MAX_BLOCK_ROWS,
    MAX_RANGE_ELEMENTS,
    MAX_SQL_BYTES,
    AnalystQueryError,
    SqlLimits,
    prepare,
    run_query,
)
from olap.client import connect
from olap.schema import ensure_schema

DB = "tally"
LIMITS = SqlLimits(max_execution_s=20, max_memory_bytes=1 << 30, max_result_rows=1000, max_result_bytes=1 << 20,
                   max_threads=1)
# ../shared/checks/11-hardening's probe: 14 s of one block on this machine with a 5 s limit, before.
PROBE = "SELECT sum(editDistance(repeat('a', 65000 - number), repeat('b', 65000))) FROM numbers(3)"


@pytest.fixture(scope="module")
def ch(servers):
    client = connect(servers.chdb_dsn)
    ensure_schema(client, DB)
    return client


def refused(ch, sql: str) -> str:
    with pytest.raises(AnalystQueryError) as info:
        prepare(ch, sql, DB)
    assert info.value.code == "refused", info.value.message
    return info.value.message


def test_the_probe_is_refused_before_it_runs(ch):
    assert "function editDistance is not allowed" in refused(ch, PROBE) and "super-linear" in refused(ch, PROBE)


@pytest.mark.parametrize("name, call", [
    ("editDistance", "editDistance('a', 'b')"), ("editDistanceUTF8", "editDistanceUTF8('a', 'b')"),
    ("levenshteinDistance", "levenshteinDistance('a', 'b')"),  # an alias of editDistance
    ("levenshteinDistanceUTF8", "levenshteinDistanceUTF8('a', 'b')"),
    ("damerauLevenshteinDistance", "damerauLevenshteinDistance('a', 'b')"),
    ("jaroSimilarity", "jaroSimilarity('a', 'b')"), ("jaroWinklerSimilarity", "jaroWinklerSimilarity('a', 'b')"),
    ("arrayLevenshteinDistance", "arrayLevenshteinDistance([1], [2])"),
    ("arrayLevenshteinDistanceWeighted", "arrayLevenshteinDistanceWeighted([1], [2], [1.], [1.])"),
    ("arraySimilarity", "arraySimilarity([1], [2], [1.], [1.])"),
    ("multiFuzzyMatchAny", "multiFuzzyMatchAny('a', 1, ['a'])"),
    ("multiFuzzyMatchAnyIndex", "multiFuzzyMatchAnyIndex('a', 1, ['a'])"),
    ("multiFuzzyMatchAllIndices", "multiFuzzyMatchAllIndices('a', 1, ['a'])"),
])
def test_super_linear_functions_are_refused_saying_why(ch, name, call):
    for sql in (f"SELECT {call}", f"SELECT count() FROM {DB}.events WHERE {call} > 0"):
        message = refused(ch, sql)
        assert f"function {name} is not allowed" in message and "super-linear" in message, message


def test_every_costly_rule_names_a_function_clickhouse_has(ch):
    table = function_table()
    for name in COSTLY:
        assert table.functions[name][0] == "deny", name


@pytest.mark.parametrize("sql, words", [
    ("SELECT multiMatchAny('x', arrayMap(i -> toString(i), range(5000)))", "must be a literal array of strings"),
    ("SELECT multiMatchAny(url, [domain]) FROM tally.events", "must be a literal array of strings"),
    ("WITH ['a', 'b'] AS p SELECT multiSearchAny('x', p)", "must be a literal array of strings"),
    ("SELECT multiMatchAny('x')", "must be a literal array of strings"),
    ("SELECT multiMatchAny('x', [" + ", ".join(f"'p{i}'" for i in range(MAX_PATTERNS + 1)) + "])",
     f"at most {MAX_PATTERNS} patterns per call (65 given)"),
    ("SELECT multiSearchFirstIndexCaseInsensitiveUTF8('x', array(" + ", ".join("'n'" for _ in range(100)) + "))",
     "at most 64 patterns"),
    ("SELECT multiMatchAllIndices('x', ['" + "a" * 1025 + "'])", "each pattern must be at most 1024 bytes"),
    ("SELECT * APPLY(multiSearchAny) FROM numbers(1)", "APPLY(multiSearchAny) is not allowed"),
])
def test_pattern_lists_are_literal_and_capped(ch, sql, words):
    assert words in refused(ch, sql)


def test_pattern_lists_within_the_cap_work(ch):
    patterns = ", ".join(f"'p{i}x'" for i in range(MAX_PATTERNS - 1)) + ", 'h.llo'"
    assert run_query(ch, f"SELECT multiMatchAny('hello', [{patterns}])", LIMITS).rows == [[1]]
    assert run_query(ch, "SELECT multiSearchAny('hello', array('ell', 'zz'))", LIMITS).rows == [[1]]


def test_blocks_are_small_so_the_limit_is_checked_often(ch):
    rows = run_query(ch, "SELECT max(blockSize()) AS biggest, count() FROM numbers(200000)", LIMITS).rows
    assert rows == [[MAX_BLOCK_ROWS, 200000]]  # ClickHouse's default is 65,409 rows per block


def test_the_query_text_is_capped_at_16_kib(ch):
    assert MAX_SQL_BYTES == 16 * 1024  # documented in README (Analyst SQL)
    head, tail = "SELECT length('", "') AS n"
    fits = head + "x" * (MAX_SQL_BYTES - len(head) - len(tail)) + tail
    assert len(fits.encode()) == MAX_SQL_BYTES
    assert run_query(ch, fits, LIMITS).rows == [[MAX_SQL_BYTES - len(head) - len(tail)]]
    message = refused(ch, fits.replace("x", "xy", 1))
    assert f"{MAX_SQL_BYTES + 1} bytes long" in message and "16 KiB" in message
    # counted in bytes of UTF-8: 6,000 three-byte characters are 18,000 bytes
    assert "bytes long" in refused(ch, "SELECT '" + "€" * 6000 + "'")


def failed(ch, sql: str) -> str:
    with pytest.raises(AnalystQueryError) as info:
        run_query(ch, sql, LIMITS)
    assert info.value.code == "failed", info.value.message
    return info.value.message


def test_range_is_capped_so_the_quadratic_probe_fails_at_once(ch):
    """The review's probe: one constant-folded hasAll quadratic in n (320,000: 3.7 s; 5,000,000 would be ~15 min).
    `range` now makes at most MAX_RANGE_ELEMENTS per call and block (ClickHouse's default: 500,000,000)."""
    assert MAX_RANGE_ELEMENTS == 262_144
    probe = ("SELECT hasAll(range(320000), arrayReverse(range(320000))) "
             "+ hasAll(range(320001), arrayReverse(range(320001)))")
    message = failed(ch, probe)
    assert "would produce 320000 array elements" in message and f"maximum of {MAX_RANGE_ELEMENTS}" in message
    assert f"maximum of {MAX_RANGE_ELEMENTS}" in failed(ch, f"SELECT length(range({MAX_RANGE_ELEMENTS + 1}))")
    # per block of rows: 8,192 rows of 33 elements each is over the cap, 32 each is not
    assert "array elements" in failed(ch, "SELECT sum(length(range(33 + number % 2))) FROM numbers(8192)")
    assert run_query(ch, "SELECT sum(length(range(32 - number % 2))) FROM numbers(20000)", LIMITS).rows == [[630000]]
    assert run_query(ch, f"SELECT length(range({MAX_RANGE_ELEMENTS}))", LIMITS).rows == [[MAX_RANGE_ELEMENTS]]
