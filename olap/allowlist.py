"""What analyst SQL may touch, decided by allowlist over ClickHouse's own parse tree.

The tree is `parseQueryToJSON` of the canonical statement (see olap/analyst.py for how it is
obtained and why the text form of `EXPLAIN AST` is not used). `check(tree, database)` walks it
and raises `Refused` naming the first table, table function, function, clause or construct that
is not allowed:

- the statement is a SELECT (UNION / INTERSECT / EXCEPT included), or an EXPLAIN of one (EXPLAIN_KINDS, with
  their listed options; ADR 51 addendum); no SETTINGS, FORMAT or INTO OUTFILE anywhere;
- query parameters (`{name:Type}`, bound by ClickHouse, ADR 53) stand for values only: their
  types are `PARAM_TYPES` (never `Identifier`, which would name a table or column), and
  `check_parameters` matches them to the values sent and checks those as it checks string literals;
- every table is one of ANALYST_TABLES in `<database>` or a CTE (`WITH name AS (subquery)`) in scope: the
  SELECT that defines it, later CTEs of the same WITH, and subqueries nested inside (a CTE's
  own definition sees itself only with WITH RECURSIVE; the other branches of a UNION do not
  see it); `IN name` is checked the same way; an analyst table named without its database (`FROM events`, not
  a CTE in scope) is returned by `check` for olap/catalog.py to qualify; with `system_catalog` (the
  ClickHouse-compatible endpoint), `system.<x>` for x in CATALOG_TABLES too, which olap/catalog.py then points
  at curated views (ADR 51);
- `currentDatabase()`, `displayName()` and `currentUser()` (CATALOG_FUNCTIONS), without arguments: olap/catalog.py
  answers them; `getSetting('<name>')` for GETSETTING_NAMES, named by a literal;
- table functions are `TABLE_FUNCTIONS` only; in their arguments no call is named like a table function
  (`ALL_TABLE_FUNCTIONS` and the server's own: ClickHouse runs it as one there), and `values()`'s first argument,
  when rows follow, is a literal or a tuple()/array() row, a string one a plain structure (olap/structure.py);
- every function (also `APPLY(f)` column transformers) is allowed by the reviewed table in
  `olap/allowed_functions.py`, which `python -m olap.allowlist --write` generates from
  `system.functions` with the rules below; aggregate combinators (`sumIf`, `uniqState`,
  `groupArrayIf`, ...) are allowed when every way ClickHouse could split the name gives an
  allowed aggregate and allowed combinators;
- some calls have rules on their arguments (ADR 32): super-linear functions are denied in the
  table (`COSTLY`); `multiMatch*`/`multiSearch*` take a literal array of at most `MAX_PATTERNS`
  patterns; aggregates named in strings (`arrayReduce('...')`, `initializeAggregation`, and
  `AggregateFunction(...)` / `SimpleAggregateFunction(...)` in any string literal, e.g. a CAST
  type) are checked like calls, and those strings must be literals;
- every node type, and every key of every node, is one this module knows; anything new in a
  later ClickHouse is refused until it is reviewed here.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from olap.ch_settings import FORWARDED, LOWERED
from olap.client import connect
from olap.params import ParamsError, check_param_name, parse_params
from olap.structure import StructureError, check_structure

# Tables analysts read, inside settings.clickhouse_database.
ANALYST_TABLES = frozenset({"events", "sites", "countries"})

# `system.<name>` analysts may read: curated views in `<database>_catalog` that show only what analysts may see
# (olap/catalog.py, ADR 51). Every other system table stays refused, and so does `<database>_catalog` by name.
CATALOG_TABLES = frozenset({"databases", "tables", "columns", "settings", "functions", "one"})
CATALOG_SUFFIX = "_catalog"
# Calls without arguments that olap/catalog.py replaces with a literal, name -> what it stands for: the current
# database is the analyst database (ClickHouse's answer would be the server session's), the server's display
# name is "tally" (ClickHouse's would be its host name). Exact names, then lower-cased case-insensitive ones.
# The current user is "analyst" whoever asks (the JDBC drivers' handshakes ask; ClickHouse's answer would be the
# analysts' shared ClickHouse user, never a tally token).
CATALOG_FUNCTIONS = {"currentDatabase": "database", "displayName": "display_name", "currentUser": "user"}
CATALOG_FUNCTIONS_CI = {"database": "database", "current_database": "database", "user": "user",
                        "current_user": "user"}
# `getSetting('<name>')` with a literal name from these (the settings the ClickHouse-compatible endpoint forwards,
# lowers or sets, olap/ch_settings.py) is evaluated by ClickHouse: the value the query runs with (readonly: 1, the
# legacy JDBC driver's handshake asks). Any other name, or a computed one, is refused.
GETSETTING_NAMES = frozenset(FORWARDED) | frozenset(LOWERED) | {"readonly"}


def catalog_database(database: str) -> str:
    return database + CATALOG_SUFFIX


def catalog_function(name: str) -> str | None:
    """What a call of `name` stands for if the catalog answers it (a CATALOG_FUNCTIONS value), else None."""
    return CATALOG_FUNCTIONS.get(name) or CATALOG_FUNCTIONS_CI.get(name.lower())

# Generators of numbers and inline rows; nothing that reads files, URLs, other tables or
# databases, programs or the request body. `zeros`/`zeros_mt` are left out: ClickHouse refuses
# them under readonly = 1 (they need CREATE TEMPORARY TABLE), and `SELECT 0 FROM numbers(n)` does
# the same.
TABLE_FUNCTIONS = frozenset({"numbers", "numbers_mt", "generateSeries", "generate_series", "values"})
# Every table function of ClickHouse (system.table_functions; tests/test_analyst.py compares): inside a table
# function's arguments ClickHouse runs a call of one of these names as a table function, so an allowed scalar
# function of the same name (`format`) there read files (a third review: `numbers(format(Values, ...))`).
ALL_TABLE_FUNCTIONS = frozenset({
    "SQLStandardValues", "arrowstream", "azureBlobStorage", "azureBlobStorageCluster", "bigquery", "cluster",
    "clusterAllReplicas", "cosn", "deltaLake", "deltaLakeAzure", "deltaLakeAzureCluster", "deltaLakeCluster",
    "deltaLakeLocal", "deltaLakeS3", "deltaLakeS3Cluster", "dictionary", "eval", "executable", "file", "fileCluster",
    "filesystem", "format", "fuzzJSON", "fuzzQuery", "gcs", "generateRandom", "generateSeries", "generate_series",
    "hdfs", "hdfsCluster", "hudi", "hudiCluster", "iceberg", "icebergAzure", "icebergAzureCluster", "icebergCluster",
    "icebergHDFS", "icebergHDFSCluster", "icebergLocal", "icebergLocalCluster", "icebergS3", "icebergS3Cluster",
    "input", "jdbc", "loop", "merge", "mergeTreeAnalyzeIndexes", "mergeTreeAnalyzeIndexesUUID",
    "mergeTreeCodecBlockCounts", "mergeTreeIndex", "mergeTreeProjection", "mergeTreeTextIndex", "mongodb", "mysql",
    "null", "numbers", "numbers_mt", "odbc", "oss", "paimon", "paimonAzure", "paimonAzureCluster", "paimonCluster",
    "paimonHDFS", "paimonHDFSCluster", "paimonLocal", "paimonS3", "paimonS3Cluster", "postgresql", "primes",
    "prometheusQuery", "prometheusQueryRange", "python", "redis", "remote", "remoteSecure", "s3", "s3Cluster",
    "sqlite", "timeSeriesData", "timeSeriesMetricFamilies", "timeSeriesMetrics", "timeSeriesSamples",
    "timeSeriesSelector", "timeSeriesTags", "url", "urlCluster", "values", "view", "viewExplain", "viewIfPermitted",
    "ytsaurus", "zeros", "zeros_mt",
})
_ALL_TABLE_FUNCTIONS_ANY_CASE = {n.lower() for n in ALL_TABLE_FUNCTIONS}  # and the server's (learn_table_functions)


def learn_table_functions(client: Any) -> int:
    """Add the server's own table function names (a newer ClickHouse may have more than ALL_TABLE_FUNCTIONS) to those
    refused inside a table function's arguments; returns how many were new. Raises what the client raises."""
    names = {str(r[0]).lower() for r in client.query("SELECT name FROM system.table_functions").result_rows}
    new = names - _ALL_TABLE_FUNCTIONS_ANY_CASE
    _ALL_TABLE_FUNCTIONS_ANY_CASE.update(new)
    return len(new)

# Function nodes the parser makes from syntax, which system.functions does not list.
SYNTAX_FUNCTIONS = frozenset({"lambda", "exists", "grouping"})

# `x IN <identifier>` reads the table of that name: the identifier is checked as a table.
IN_FUNCTIONS = frozenset({"in", "notIn", "globalIn", "globalNotIn", "nullIn", "notNullIn", "globalNullIn",
                          "globalNotNullIn"})

# --- the rules `--write` applies to system.functions -------------------------------------------

# Categories whose functions compute only on their arguments.
ALLOWED_CATEGORIES = frozenset({
    "Aggregate Functions", "Arithmetic", "Arrays", "Bit", "Bitmap", "Comparison", "Conditional",
    "Dates and Times", "Distance", "Encoding", "Encryption", "Financial", "Geo", "Geo Polygon", "Hash",
    "IP Address", "JSON", "Logical", "Map", "Mathematical", "Null", "NumericIndexedVector", "QBit",
    "Random Number", "Rounding", "String", "String Replacement", "String Search", "String Splitting",
    "Time Series", "Time Window", "Tuple", "Type Conversion", "URL", "UUID",
})
# Everything else is denied unless listed in PURE_OTHERS: in this ClickHouse that is "Other" (server
# and session state, files, settings, sleeping), "Internal", "Dictionary", "Embedded Dictionary"
# (server-side data), "Introspection", "Machine Learning" (models from server files), "AI" (calls
# out to a model provider), and any category a later version adds.

# Reviewed one by one from "Other" and "Internal": they compute only on their arguments.
PURE_OTHERS = frozenset({
    "MACNumToString", "MACStringToNum", "MACStringToOUI", "bar", "blockNumber", "blockSerializedSize",
    "blockSize", "byteSize", "caseWithExpression", "colorOKLABToSRGB", "colorOKLCHToSRGB", "colorSRGBToOKLAB",
    "colorSRGBToOKLCH", "countDigits", "defaultValueOfArgumentType", "defaultValueOfTypeName", "digits",
    "dumpColumnStructure", "errorCodeToName", "finalizeAggregation", "flipCoordinates", "formatQuery",
    "formatQueryOrNull", "formatQuerySingleLine", "formatQuerySingleLineOrNull", "formatReadableDecimalSize",
    "formatReadableQuantity", "formatReadableSize", "formatReadableTimeDelta", "getSizeOfEnumType",
    "getSubcolumn", "icebergBucket", "icebergTruncate", "identity", "ignore", "indexHint",
    "initializeAggregation", "isConstant", "isDecimalOverflow", "lowCardinalityIndices", "lowCardinalityKeys",
    "materialize", "minSampleSizeContinuous", "minSampleSizeConversion", "neighbor", "normalizeQuery",
    "normalizeQueryKeepNames", "normalizedQueryHash", "normalizedQueryHashKeepNames", "parseISO8601Duration",
    "parseReadableSize", "parseReadableSizeOrNull", "parseReadableSizeOrZero", "parseTimeDelta",
    "rowNumberInAllBlocks", "rowNumberInBlock", "runningAccumulate", "runningConcurrency", "runningDifference",
    "runningDifferenceStartingWithFirstValue", "throwIf", "toColumnTypeName", "toTypeName", "transform",
    "variantElement", "variantType", "visibleWidth",
})

# Reviewed from "Other": constants of the server that clients ask for on connect (clickhouse-connect, Grafana)
# and that the ClickHouse-compatible endpoint names anyway (its errors end with "(version ...)"). ADR 51.
SERVER_CONSTANTS = frozenset({"version", "revision"})

# Super-linear in the length of one argument (O(n*m) dynamic programming or automata): one call on two
# 65,000-byte strings takes 4.7 s inside one block, where neither max_execution_time nor KILL QUERY
# reaches it (ClickHouse checks both between blocks; measured, ADR 32). Aliases follow their target.
COSTLY = {name: "super-linear in its arguments' length: one call can outrun the time limit inside a block"
          for name in ("editDistance", "editDistanceUTF8", "damerauLevenshteinDistance", "jaroSimilarity",
                       "jaroWinklerSimilarity", "arrayLevenshteinDistance", "arrayLevenshteinDistanceWeighted",
                       "arraySimilarity", "multiFuzzyMatchAny", "multiFuzzyMatchAnyIndex",
                       "multiFuzzyMatchAllIndices")}

# Denied although their category is allowed.
DENIED = {
    "flameGraph": "symbolises server stack addresses (introspection)",
    "inIgnoreSet": "internal", "notInIgnoreSet": "internal", "globalInIgnoreSet": "internal",
    "globalNotInIgnoreSet": "internal", "nullInIgnoreSet": "internal", "notNullInIgnoreSet": "internal",
    "globalNullInIgnoreSet": "internal", "globalNotNullInIgnoreSet": "internal",
    **COSTLY,
}

# --- rules on arguments, checked on every call (see _Arguments) ----------------------------------

# multiMatch* compile their patterns (vectorscan) per call site: 64 patterns 39 ms, 256: 0.24 s,
# 1,000: 1.8 s, in one call (measured); multiSearch* cost grows with the needle count too. Their
# pattern list must be a literal array of at most MAX_PATTERNS strings of at most MAX_PATTERN_BYTES.
PATTERN_FUNCTION_PREFIXES = ("multimatch", "multisearch")
MAX_PATTERNS = 64
MAX_PATTERN_BYTES = 1024

# Functions that take an aggregate function's name (with combinators and parameters) as a string:
# argument index -> the name must be a string literal naming an allowed aggregate. ClickHouse evaluates
# the parameters in that string as constant expressions (`arrayReduce('quantile(length(currentDatabase())
# / 100)', ...)` runs currentDatabase()), so only plain number and string literals may appear there.
AGGREGATE_NAME_ARGUMENTS = {"arrayreduce": 0, "arrayreduceinranges": 0, "initializeaggregation": 0}

# Functions that take a type name as a string (index; -1: the last argument). The type must be a string
# literal (ClickHouse folds `concat('Aggregate', 'Function(...)')` into a type otherwise), and every
# AggregateFunction(...) / SimpleAggregateFunction(...) in any string literal names allowed aggregates.
TYPE_ARGUMENTS = {"cast": 1, "_cast": 1, "accuratecast": 1, "accuratecastornull": 1, "accuratecastordefault": 1,
                  "reinterpret": 1, "defaultvalueoftypename": 0, "kqlparametercast": 1, "variantelement": 1,
                  "dynamicelement": 1, "jsonextract": -1, "jsonextractcaseinsensitive": -1,
                  "jsonextractkeysandvalues": -1, "jsonextractkeysandvaluescaseinsensitive": -1}

# --- query parameters (ADR 53) ---------------------------------------------------------------------

# The types a query parameter may have: plain values. Not Identifier (it names a table or column), nor types whose
# text can name functions (AggregateFunction) or carry open structures (JSON, Dynamic, Variant, Object, Map, Tuple).
PARAM_TYPES = frozenset({
    "UInt8", "UInt16", "UInt32", "UInt64", "UInt128", "UInt256", "Int8", "Int16", "Int32", "Int64", "Int128",
    "Int256", "Float32", "Float64", "BFloat16", "Bool", "String", "FixedString", "UUID", "IPv4", "IPv6", "Date",
    "Date32", "DateTime", "DateTime64", "Decimal", "Decimal32", "Decimal64", "Decimal128", "Decimal256",
})
# ... of which these take arguments (a precision, scale, length or time zone), and these wrap another type.
PARAM_TYPES_WITH_ARGUMENTS = frozenset({"FixedString", "DateTime", "DateTime64", "Decimal", "Decimal32", "Decimal64",
                                        "Decimal128", "Decimal256"})
PARAM_TYPE_WRAPPERS = ("Nullable", "Array")
MAX_PARAM_TYPE_DEPTH = 4
_TYPE_ARGUMENT = r"\s*(?:\d{1,3}|'[A-Za-z0-9_/+-]{1,64}')\s*"
_PARAM_TYPE = re.compile(rf"\s*([A-Za-z][A-Za-z0-9]*)\s*(?:\(({_TYPE_ARGUMENT}(?:,{_TYPE_ARGUMENT})?)\))?\s*")
_WRAPPED_TYPE = re.compile(rf"\s*({'|'.join(PARAM_TYPE_WRAPPERS)})\s*\((.*)\)\s*", re.DOTALL)
_IDENTIFIER_PARAMETER = ("query parameters of type Identifier ({name:Identifier}) are not allowed: a parameter "
                         "stands for a value; write table and column names in the query")

DATA_FILE = Path(__file__).with_name("allowed_functions.py")


class Refused(ValueError):
    """The query uses something analysts may not; the message names it."""


# --- the function table ------------------------------------------------------------------------


class FunctionTable:
    """The reviewed verdict for every function name, with ClickHouse's lookup rules."""

    def __init__(self, functions: Mapping[str, tuple[str, str, bool, str]], combinators: Mapping[str, str]):
        self.functions = dict(functions)  # name -> (verdict, kind, case_insensitive, why)
        self.combinators = dict(combinators)  # suffix -> verdict
        self._ci: dict[str, tuple[str, str, bool, str]] = {}
        for name, entry in self.functions.items():
            if entry[2]:
                other = self._ci.get(name.lower())
                # two case-insensitive names that fold together: the stricter verdict wins
                self._ci[name.lower()] = entry if other is None or entry[0] != "allow" else other

    def _lookup(self, name: str) -> tuple[str, str, bool, str] | None:
        # ClickHouse: the exact name first, then the case-insensitive registry.
        return self.functions.get(name) or self._ci.get(name.lower())

    def allows(self, name: str) -> bool:
        entry = self._lookup(name)
        if entry is not None:
            return entry[0] == "allow"
        if name in SYNTAX_FUNCTIONS:
            return True
        verdicts = list(self._combinator_splits(name, 0))
        return bool(verdicts) and all(verdicts)

    def why_costly(self, name: str) -> str | None:
        """The reason a function is denied for its cost (COSTLY), else None."""
        entry = self._lookup(name)
        return entry[3] if entry is not None and entry[0] == "deny" and entry[3] in COSTLY.values() else None

    def allows_aggregate(self, name: str) -> bool:
        """Whether `name` is an allowed aggregate function, alone or with allowed combinators."""
        entry = self._lookup(name)
        if entry is not None:
            return entry[0] == "allow" and entry[1] == "aggregate"
        verdicts = list(self._combinator_splits(name, 0))
        return bool(verdicts) and all(verdicts)

    def _combinator_splits(self, name: str, depth: int) -> Iterator[bool]:
        """One verdict per way of reading `name` as <aggregate><combinator>...; nothing if none."""
        if depth > 8:
            yield False
            return
        for suffix, verdict in self.combinators.items():
            if not name.endswith(suffix) or len(name) == len(suffix):
                continue
            base = name[: -len(suffix)]
            entry = self._lookup(base)
            if entry is not None:
                yield verdict == "allow" and entry[0] == "allow" and entry[1] == "aggregate"
            else:
                for inner in self._combinator_splits(base, depth + 1):
                    yield verdict == "allow" and inner


_TABLE: FunctionTable | None = None


def function_table() -> FunctionTable:
    global _TABLE
    if _TABLE is None:
        # Imported on first use, not at the top: `python -m olap.allowlist --write` regenerates this file,
        # so it must run when the file is missing or broken (e.g. a ClickHouse upgrade mid-edit).
        from olap import allowed_functions as data  # noqa: PLC0415

        _TABLE = FunctionTable(data.FUNCTIONS, data.COMBINATORS)
    return _TABLE


# --- the tree walk -----------------------------------------------------------------------------

# Node type -> (keys holding plain values, keys holding child nodes). Anything else is refused.
_PLAIN_ALIAS = frozenset({"alias"})
_NODES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "ExpressionList": (frozenset(), frozenset({"children"})),
    "Identifier": (frozenset({"name", "name_parts", "alias"}), frozenset()),
    "Literal": (frozenset({"value", "alias"}), frozenset()),
    "Asterisk": (frozenset(), frozenset({"transformers"})),
    "QualifiedAsterisk": (frozenset(), frozenset({"qualifier", "transformers"})),
    "ColumnsRegexpMatcher": (frozenset({"pattern"}), frozenset({"transformers"})),
    "ColumnsListMatcher": (frozenset(), frozenset({"column_list", "transformers"})),
    "QualifiedColumnsRegexpMatcher": (frozenset({"pattern"}), frozenset({"qualifier", "transformers"})),
    "QualifiedColumnsListMatcher": (frozenset(), frozenset({"qualifier", "column_list", "transformers"})),
    "ColumnsTransformerList": (frozenset(), frozenset({"children"})),
    "ColumnsExceptTransformer": (frozenset({"pattern", "is_strict"}), frozenset({"children"})),
    "ColumnsReplaceTransformer": (frozenset({"is_strict"}), frozenset({"children"})),
    "ColumnsReplaceTransformerReplacement": (frozenset({"name"}), frozenset({"children"})),
    "OrderByElement": (frozenset({"direction", "nulls_direction", "with_fill"}),
                       frozenset({"expression", "collation", "fill_from", "fill_to", "fill_step", "fill_staleness"})),
    "InterpolateElement": (frozenset({"column"}), frozenset({"expr"})),
    "WindowDefinition": (frozenset({"frame_is_default", "frame_type", "frame_begin_type", "frame_begin_preceding",
                                    "frame_end_type", "frame_end_preceding", "parent_window_name"}),
                         frozenset({"partition_by", "order_by", "frame_begin_offset", "frame_end_offset"})),
    "WindowListElement": (frozenset({"name"}), frozenset({"definition"})),
    "TablesInSelectQuery": (frozenset(), frozenset({"children"})),
    "TablesInSelectQueryElement": (frozenset(), frozenset({"table_expression", "table_join", "array_join"})),
    "TableJoin": (frozenset({"kind", "strictness", "locality", "is_natural"}),
                  frozenset({"on_expression", "using_expression_list"})),
    "ArrayJoin": (frozenset({"kind"}), frozenset({"expression_list"})),
    "SampleRatio": (frozenset({"numerator", "denominator"}), frozenset()),
    "Subquery": (frozenset({"alias"}), frozenset({"children"})),
}
_FUNCTION_PLAIN = frozenset({"name", "alias", "is_operator", "is_lambda_function", "is_window_function", "kind",
                             "nulls_action", "window_name"})
_FUNCTION_KINDS = frozenset({"ORDINARY_FUNCTION", "LAMBDA_FUNCTION", "WINDOW_FUNCTION"})
_SELECT_PLAIN = frozenset({"distinct", "group_by_with_totals", "group_by_with_rollup", "group_by_with_cube",
                           "group_by_with_grouping_sets", "group_by_all", "order_by_all", "limit_with_ties",
                           "recursive_with"})
_SELECT_CHILDREN = frozenset({"select", "tables", "prewhere", "where", "group_by", "having", "window", "qualify",
                              "order_by", "interpolate", "limit_by_offset", "limit_by_length", "limit_by",
                              "limit_offset", "limit_length"})
_UNION_PLAIN = frozenset({"union_mode", "list_of_modes", "is_outfile_append", "is_outfile_truncate",
                          "is_into_outfile_with_stdout"})
_TABLE_EXPRESSION_PLAIN = frozenset({"final"})

_CLAUSES = {  # keys that carry a clause refused by name
    "settings": "SETTINGS clauses are not allowed: limits are set by the server",
    "settings_ast": "SETTINGS clauses are not allowed: limits are set by the server",
    "format_ast": "FORMAT clauses are not allowed: ask for csv, tsv, jsonl or json with ?format=",
    "format": "FORMAT clauses are not allowed: ask for csv, tsv, jsonl or json with ?format=",
    "out_file": "INTO OUTFILE is not allowed: analyst SQL returns rows, it writes no files",
    "compression": "INTO OUTFILE is not allowed: analyst SQL returns rows, it writes no files",
}
_NODE_REFUSALS = {
    "SetQuery": "SETTINGS clauses are not allowed: limits are set by the server",
    "WithElement": "a CTE is only allowed in a WITH clause",
}


# EXPLAIN of a query analysts may run (ADR 51 addendum): these kinds, with these options (0 or 1 each). EXPLAIN
# PIPELINE, TABLE OVERRIDE (reads a table function's source), CURRENT TRANSACTION and any later kind stay refused.
# SYNTAX and QUERY TREE print the query back with the SETTINGS clause the server runs it with (its limits, readonly,
# the watchdog's tag: chDB takes settings in the query's text), so they are refused too (a second review found it).
EXPLAIN_KINDS: dict[str, frozenset[str]] = {
    "EXPLAIN": frozenset({"header", "description", "indexes", "actions", "sorting", "projections", "json"}),
    "EXPLAIN PLAN": frozenset({"header", "description", "indexes", "actions", "sorting", "projections", "json"}),
    "EXPLAIN ESTIMATE": frozenset(),
    "EXPLAIN AST": frozenset(),
}
_EXPLAIN_PRINTS_SETTINGS = frozenset({"EXPLAIN SYNTAX", "EXPLAIN QUERY TREE"})
_EXPLAIN_KEYS = frozenset({"type", "kind", "settings", "query", "is_outfile_append", "is_outfile_truncate",
                           "is_into_outfile_with_stdout"})
STATEMENTS_ANSWERED = ("SHOW DATABASES, SHOW TABLES, SHOW COLUMNS, SHOW SETTINGS, DESCRIBE, EXISTS, SHOW CREATE "
                       "and EXPLAIN")


def statement_name(tree: Mapping[str, Any]) -> str:
    """What a statement is, in its own keywords (`ShowColumnsQuery` -> SHOW COLUMNS), for messages."""
    kind = str(tree.get("type") or "")
    if kind == "ExplainQuery" and isinstance(tree.get("kind"), str):
        return str(tree["kind"])
    words = re.findall(r"[A-Z][a-z]*", kind.removesuffix("Query")) or ["this statement"]
    if kind == "ShowTablesQuery":  # SHOW TABLES / DATABASES / SETTINGS / DICTIONARIES / CLUSTERS ... share it
        flags = [key for key, value in tree.items()
                 if value is True and not key.startswith("is_") and "like" not in key]
        words = ["Show", *(flags[:2] or ["tables"])]
    return " ".join(words).upper()


def not_a_select(name: str) -> Refused:
    return Refused(f"only SELECT queries are allowed, not {name}; analyst SQL is read-only (besides SELECT it "
                   f"answers {STATEMENTS_ANSWERED} for the analyst tables)")


def check(tree: Any, database: str, *, system_catalog: bool = False, rewritten: bool = False) -> list[dict[str, Any]]:
    """Raise Refused unless `tree` (parseQueryToJSON output) is a SELECT analysts may run, or an EXPLAIN
    (EXPLAIN_KINDS) of one. Returns the table nodes that name an analyst table without its database (`FROM
    events`): olap/catalog.py `resolve` qualifies them (`<database>.events`) before anything runs."""
    if not isinstance(tree, dict):
        raise Refused("the query could not be parsed")
    kind = tree.get("type")
    walker = _Walker(database, function_table(), system_catalog, rewritten)
    if kind == "ExplainQuery":
        tree = _explained(tree, walker)
        kind = tree.get("type")
    if kind != "SelectWithUnionQuery":
        raise not_a_select(statement_name(tree))
    walker.select_union(tree, frozenset())
    if rewritten and walker.unqualified:
        raise Refused("the query could not be checked after its table names were qualified; name them tally.<t>")
    return walker.unqualified


def _explained(tree: dict[str, Any], walker: _Walker) -> dict[str, Any]:
    """The query an EXPLAIN explains, if the EXPLAIN's kind and options are allowed. It reads the analyst tables
    only, never the catalog (EXPLAIN of a catalog view would show the view's own query over `system`)."""
    kind, options = tree.get("kind"), tree.get("settings")
    for key in set(tree) & set(_CLAUSES) - {"settings"}:  # "settings" here: the EXPLAIN's options
        raise Refused(_CLAUSES[key])
    if kind in _EXPLAIN_PRINTS_SETTINGS:
        raise Refused(f"{kind} is not allowed: it prints the query with the server's own limits and tag; use "
                      "EXPLAIN AST or EXPLAIN PLAN")
    if kind not in EXPLAIN_KINDS or set(tree) - _EXPLAIN_KEYS:
        raise Refused(f"{kind} is not allowed; analysts may use {', '.join(EXPLAIN_KINDS)} of a SELECT")
    if any(tree.get(key) for key in ("is_outfile_append", "is_outfile_truncate", "is_into_outfile_with_stdout")):
        raise Refused(_CLAUSES["out_file"])
    if options is not None:
        changes = options.get("changes") if isinstance(options, dict) and options.get("type") == "SetQuery" else None
        if not isinstance(changes, list) or set(options) - {"type", "changes"}:
            raise Refused(f"unsupported {kind} options")
        for change in changes:
            literal = change.get("value") if isinstance(change, dict) else None
            name = change.get("name") if isinstance(change, dict) else None
            value = literal.get("value") if isinstance(literal, dict) else None
            if name not in EXPLAIN_KINDS[kind] or value not in (0, 1) or set(change) - {"name", "value"}:
                allowed = ", ".join(f"{o}=0|1" for o in sorted(EXPLAIN_KINDS[kind])) or "none"
                raise Refused(f"{kind} option {name} is not allowed (allowed: {allowed})")
    query = tree.get("query")
    if not isinstance(query, dict) or query.get("type") != "SelectWithUnionQuery":
        raise Refused(f"{kind} is allowed of a SELECT only")
    walker.catalog = None
    return query


class _Walker:
    def __init__(self, database: str, functions: FunctionTable, system_catalog: bool = False,
                 rewritten: bool = False) -> None:
        self.database = database
        self.functions = functions
        # system_catalog: `system.<x>` for x in CATALOG_TABLES may be read (olap/catalog.py points them at the
        # curated views). rewritten: after that rewrite, they are named `<database>_catalog.<x>` instead, and the
        # CATALOG_FUNCTIONS calls are gone (literals).
        self.catalog = catalog_database(database) if rewritten else "system" if system_catalog else None
        self.rewritten = rewritten
        self.unqualified: list[dict[str, Any]] = []  # analyst tables named without their database

    # statements

    def select_union(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        self._expect(node, "SelectWithUnionQuery")
        for key, value in node.items():
            if key == "type":
                continue
            if key in _CLAUSES:
                raise Refused(_CLAUSES[key])
            if key in ("is_outfile_append", "is_outfile_truncate", "is_into_outfile_with_stdout") and value:
                raise Refused(_CLAUSES["out_file"])
            if key in _UNION_PLAIN:
                self._plain(node, key, value)
            elif key == "list_of_selects":
                for child in self._list(value, "ExpressionList"):
                    if child.get("type") == "SelectWithUnionQuery":
                        self.select_union(child, ctes)
                    else:
                        self.select(child, ctes)
            else:
                self._unknown(node, key)

    def select(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        self._expect(node, "SelectQuery")
        if "with" in node:
            ctes = self._with(node["with"], ctes, bool(node.get("recursive_with")))
        for key, value in node.items():
            if key in ("type", "with"):
                continue
            if key in _CLAUSES:
                raise Refused(_CLAUSES[key])
            if key in _SELECT_PLAIN:
                self._plain(node, key, value)
            elif key == "tables":
                self._tables(value, ctes)
            elif key in _SELECT_CHILDREN:
                self.expr(value, ctes)
            else:
                self._unknown(node, key)

    def _with(self, value: Any, outer: frozenset[str], recursive: bool) -> frozenset[str]:
        defined: set[str] = set()
        for element in self._list(value, "ExpressionList"):
            if element.get("type") != "WithElement":
                self.expr(element, outer | defined)  # `expr AS name`: a value, not a table
                continue
            name = element.get("name")
            if not isinstance(name, str) or set(element) - {"type", "name", "subquery"}:
                raise Refused("unsupported WITH element")
            # Earlier CTEs are visible; its own name only WITH RECURSIVE (otherwise ClickHouse reads
            # a real table of that name).
            visible = outer | defined | ({name} if recursive else set())
            self.expr(element.get("subquery"), frozenset(visible))
            defined.add(name)
        return outer | defined

    def _tables(self, value: Any, ctes: frozenset[str]) -> None:
        for element in self._list(value, "TablesInSelectQuery"):
            self._expect(element, "TablesInSelectQueryElement")
            for key, child in element.items():
                if key == "type":
                    continue
                if key == "table_expression":
                    self._table_expression(child, ctes)
                elif key in ("table_join", "array_join"):
                    self.expr(child, ctes)
                else:
                    self._unknown(element, key)

    def _table_expression(self, node: Any, ctes: frozenset[str]) -> None:
        self._expect(node, "TableExpression")
        for key, value in node.items():
            if key == "type":
                continue
            if key in _TABLE_EXPRESSION_PLAIN:
                self._plain(node, key, value)
            elif key == "database_and_table_name":
                self._table(value, ctes)
            elif key == "table_function":
                self._table_function(value)
            elif key in ("subquery", "sample_size", "sample_offset"):
                self.expr(value, ctes)
            else:
                self._unknown(node, key)

    def _table_function(self, node: Any) -> None:
        self._expect(node, "Function")
        name = node.get("name")
        if name not in TABLE_FUNCTIONS:
            raise Refused(f"table function {name} is not allowed; analysts may use "
                          f"{', '.join(sorted(TABLE_FUNCTIONS))}")
        for key, value in node.items():
            if key in ("type", "name", "alias"):
                continue
            if key == "arguments":
                # CTE names are not passed in: whether ClickHouse resolves them inside table
                # function arguments is not something to rely on.
                self.expr(value, frozenset())
                refuse_table_function_calls(name, value)
                if name == "values":
                    check_values_structure(value)
            else:
                self._unknown(node, key)

    def _table(self, node: Any, ctes: frozenset[str]) -> None:
        if not isinstance(node, dict) or node.get("type") not in ("TableIdentifier", "Identifier"):
            raise Refused("unsupported table reference")
        if "children" in node:  # FROM {t:Identifier}, x IN {t:Identifier}
            raise Refused(_IDENTIFIER_PARAMETER)
        if set(node) - {"type", "name", "name_parts", "alias"}:
            raise Refused(f"unsupported table reference {node.get('name')!r}")
        parts = node.get("name_parts") or [node.get("name")]
        if not all(isinstance(p, str) for p in parts):
            raise Refused("unsupported table reference")
        allowed = ", ".join([f"{self.database}.{t}" for t in sorted(ANALYST_TABLES)]
                            + [f"system.{t}" for t in sorted(CATALOG_TABLES) if self.catalog == "system"])
        if len(parts) == 2 and parts[0] == self.database and parts[1] in ANALYST_TABLES:
            return
        if len(parts) == 2 and self.catalog is not None and parts[0] == self.catalog and parts[1] in CATALOG_TABLES:
            return
        if len(parts) == 1 and parts[0] in ctes:  # a CTE of that name wins over the table
            return
        if len(parts) == 1 and parts[0] in ANALYST_TABLES:  # the analyst database is the current one
            self.unqualified.append(node)
            return
        shown = ".".join(parts)
        hint = ""
        if len(parts) == 2 and parts[0] == "system" and parts[1] in CATALOG_TABLES and self.catalog is None:
            hint = ("; the ClickHouse-compatible endpoint (TALLY_CLICKHOUSE_HTTP_PORT) answers system."
                    f"{parts[1]} from a curated view")
        raise Refused(f"table {shown} is not available to analysts (allowed: {allowed}, and CTEs defined "
                      f"in the query){hint}")

    # expressions

    def expr(self, node: Any, ctes: frozenset[str]) -> None:
        if isinstance(node, list):
            for child in node:
                self.expr(child, ctes)
            return
        if not isinstance(node, dict):
            raise Refused("the query could not be parsed")
        kind = node.get("type")
        if kind in _NODE_REFUSALS:
            raise Refused(_NODE_REFUSALS[kind])
        if kind in ("Identifier", "TableIdentifier") and "children" in node:  # its name is a query parameter
            raise Refused(_IDENTIFIER_PARAMETER)
        if kind == "SelectWithUnionQuery":
            self.select_union(node, ctes)
        elif kind == "QueryParameter":
            check_parameter_node(node)
        elif kind == "Function":
            self._function(node, ctes)
        elif kind == "TableIdentifier":
            self._table(node, ctes)
        elif kind == "ColumnsApplyTransformer":
            self._apply(node, ctes)
        elif kind == "Literal":
            check_literal(node, self.functions)
        elif kind in _NODES:
            plain, children = _NODES[kind]
            for key, value in node.items():
                if key == "type":
                    continue
                if key in plain:
                    self._plain(node, key, value)
                elif key in children:
                    self.expr(value, ctes)
                else:
                    self._unknown(node, key)
        else:
            raise Refused(f"unsupported construct {kind}")

    def _function(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        name = node.get("name")
        if isinstance(name, str) and catalog_function(name) and not self.rewritten:
            self._catalog_function(node)
            return
        if name == "getSetting":
            self._get_setting(node)
            return
        if not isinstance(name, str) or not self.functions.allows(name):
            costly = self.functions.why_costly(name) if isinstance(name, str) else None
            raise Refused(f"function {name} is not allowed in analyst SQL" + (f" ({costly})" if costly else ""))
        if node.get("kind", "ORDINARY_FUNCTION") not in _FUNCTION_KINDS:
            raise Refused(f"unsupported use of function {name}")
        for key, value in node.items():
            if key == "type":
                continue
            if key in _FUNCTION_PLAIN:
                self._plain(node, key, value)
            elif key == "arguments":
                arguments = self._list(value, "ExpressionList")
                if name in IN_FUNCTIONS and len(arguments) == 2 and arguments[1].get("type") == "Identifier":
                    self.expr(arguments[0], ctes)
                    self._table(arguments[1], ctes)
                else:
                    self.expr(arguments, ctes)
                check_arguments(name, arguments, self.functions)
            elif key in ("parameters", "window_definition"):
                self.expr(value, ctes)
            else:
                self._unknown(node, key)

    def _catalog_function(self, node: dict[str, Any]) -> None:
        """currentDatabase() / displayName() with no arguments and nothing else: olap/catalog.py replaces it by a
        literal."""
        arguments = node.get("arguments", {"type": "ExpressionList"})
        if set(node) - {"type", "name", "alias", "arguments"} or self._list(arguments, "ExpressionList"):
            raise Refused(f"{node.get('name')}() takes no arguments in analyst SQL")
        self._plain(node, "alias", node.get("alias"))

    @staticmethod
    def _get_setting(node: dict[str, Any]) -> None:
        """getSetting('<name>'): one string literal naming one of GETSETTING_NAMES, and nothing else."""
        arguments = node.get("arguments", {})
        children = arguments.get("children") if isinstance(arguments, dict) else None
        literal = children[0] if isinstance(children, list) and len(children) == 1 else None
        value = literal.get("value") if isinstance(literal, dict) and literal.get("type") == "Literal" else None
        name = value.get("value") if isinstance(value, dict) and value.get("field_type") == "String" else None
        if (set(node) - {"type", "name", "alias", "arguments"} or set(arguments) - {"type", "children"}
                or set(literal or {}) - {"type", "value"} or name not in GETSETTING_NAMES):
            shown = f"'{name}'" if isinstance(name, str) else "a computed name"
            raise Refused(f"function getSetting is allowed for some settings only, not getSetting({shown[:80]}): "
                          "analysts may read the ones the ClickHouse-compatible endpoint accepts, and readonly, "
                          "each named by a string literal")
        _Walker._plain(node, "alias", node.get("alias"))

    def _apply(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        for key, value in node.items():
            if key == "type":
                continue
            if key == "func_name":
                if not isinstance(value, str) or not self.functions.allows(value):
                    raise Refused(f"function {value} is not allowed in analyst SQL")
                if has_argument_rules(value):
                    raise Refused(f"APPLY({value}) is not allowed: call {value} with its arguments written out")
            elif key in ("lambda_arg", "column_name_prefix"):
                self._plain(node, key, value)
            elif key in ("lambda", "parameters"):
                self.expr(value, ctes)
            else:
                self._unknown(node, key)

    # helpers

    @staticmethod
    def _expect(node: Any, kind: str) -> None:
        if not isinstance(node, dict) or node.get("type") != kind:
            found = node.get("type") if isinstance(node, dict) else type(node).__name__
            raise Refused(f"unsupported construct {found} (expected {kind})")

    def _list(self, value: Any, kind: str) -> list[dict[str, Any]]:
        self._expect(value, kind)
        if set(value) - {"type", "children"}:
            raise Refused(f"unsupported construct {kind}")
        children = value.get("children", [])
        if not isinstance(children, list) or not all(isinstance(c, dict) for c in children):
            raise Refused(f"unsupported construct {kind}")
        return children

    @staticmethod
    def _plain(node: dict[str, Any], key: str, value: Any) -> None:
        # A key that should hold a plain value must not hide a node.
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
            if not (key == "value" and node.get("type") == "Literal"):  # literal data: {"field_type", "value"}
                raise Refused(f"unsupported construct {node.get('type')}.{key}")

    @staticmethod
    def _unknown(node: dict[str, Any], key: str) -> None:
        raise Refused(f"unsupported part of the query: {node.get('type')}.{key}")


# --- query parameters ---------------------------------------------------------------------------


def check_parameter_node(node: dict[str, Any]) -> None:
    """A `{name:Type}` node: a valid name and one of the PARAM_TYPES (possibly in Nullable/Array)."""
    name, kind = node.get("name"), node.get("param_type")
    if set(node) - {"type", "name", "param_type", "alias"} or not isinstance(name, str) or not isinstance(kind, str):
        raise Refused("unsupported construct QueryParameter")
    try:
        check_param_name(name)
    except ParamsError as exc:
        raise Refused(str(exc)) from None
    if kind.strip() == "Identifier":
        raise Refused(_IDENTIFIER_PARAMETER)
    if not param_type_allowed(kind):
        raise Refused(f"query parameter {{{name}:{kind}}}: the type {kind} is not allowed for parameters; use "
                      f"{', '.join(sorted(PARAM_TYPES))}, also inside Nullable(...) or Array(...)")


def param_type_allowed(text: str, depth: int = 0) -> bool:
    """Whether `text` (a query parameter's type as written) is one of PARAM_TYPES, with arguments only where it
    takes them (plain numbers or a time zone), inside at most MAX_PARAM_TYPE_DEPTH Nullable/Array wrappers."""
    wrapped = _WRAPPED_TYPE.fullmatch(text)
    if wrapped:
        return depth < MAX_PARAM_TYPE_DEPTH and param_type_allowed(wrapped.group(2), depth + 1)
    match = _PARAM_TYPE.fullmatch(text)
    if not match or match.group(1) not in PARAM_TYPES:
        return False
    return match.group(2) is None or match.group(1) in PARAM_TYPES_WITH_ARGUMENTS


def check_parameters(tree: Any, values: object) -> None:
    """Raise Refused unless `values` is well formed (olap/params.py), the query parameters `tree` uses (after
    `check`) and the values match one to one, and every value passes what a string literal must (an
    `AggregateFunction(...)` spelled in it names an allowed aggregate): ClickHouse substitutes a value where the
    parameter stands, as if it were a literal there."""
    try:
        params = parse_params(values)
    except ParamsError as exc:
        raise Refused(str(exc)) from None
    used: dict[str, str] = {}
    for name, kind in _query_parameters(tree):
        used.setdefault(name, kind)
    missing = [name for name in sorted(used) if name not in params]
    if missing:
        shown = ", ".join(f"{{{name}:{used[name]}}}" for name in missing)
        raise Refused(f"query parameters need a value: none was sent for {shown} (send params "
                      f"{{\"{missing[0]}\": \"...\"}}, or tally sql --param {missing[0]}=...)")
    unused = sorted(set(params) - set(used))
    if unused:
        raise Refused(f"query parameter {', '.join(unused)}: not used in the query (it has no "
                      f"{{{unused[0]}:Type}}); send only the parameters the query uses")
    functions = function_table()
    for name, value in sorted(params.items()):
        try:
            check_aggregate_types(value, functions)
        except Refused as exc:
            raise Refused(f"query parameter {name}: {exc}") from None


def _query_parameters(tree: Any) -> Iterator[tuple[str, str]]:
    """(name, type) of every QueryParameter node in the tree (literal values hold no `type` keys)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "QueryParameter":
                yield str(node.get("name")), str(node.get("param_type"))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


# --- rules on arguments ------------------------------------------------------------------------

# An AggregateFunction / SimpleAggregateFunction type as analysts may write it in a string: the type's name
# spelled plainly (no quotes, comments or escapes), then `(`, an optional version, a plain aggregate name with
# optional parameters, and `,` or `)`. ClickHouse's type parser also reads `AggregateFunction/**/(`,
# `` `AggregateFunction`( ``, `"AggregateFunction"(` and escapes in quoted names (`Aggregate\x46unction`,
# `Aggregate\NFunction`), so check_literal counts every place a string could name one (AGGREGATE_TYPE_WORD in
# its letters, lowercased, with and without escapes decoded) and refuses the string unless each is this form.
_AGGREGATE_TYPE = re.compile(r"(?<![A-Za-z0-9_])(?:Simple)?AggregateFunction[ \t\r\n]*\([ \t\r\n]*"
                             r"(?:\d+[ \t\r\n]*,[ \t\r\n]*)?([A-Za-z_][A-Za-z0-9_]*)"
                             r"(?:\(((?:[^()'\\]|'[^'\\]*')*)\))?[ \t\r\n]*[,)]")
AGGREGATE_TYPE_WORD = "aggregatefunction"
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|N|.)", re.DOTALL)
_AGGREGATE_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*", re.DOTALL)
_PLAIN_PARAMETER = r"\s*(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|'[^'\\]*')\s*"
_PLAIN_PARAMETERS = re.compile(rf"(?:{_PLAIN_PARAMETER}(?:,{_PLAIN_PARAMETER})*)?")


def has_argument_rules(name: str) -> bool:
    folded = name.lower()
    return (folded in AGGREGATE_NAME_ARGUMENTS or folded in TYPE_ARGUMENTS
            or folded.startswith(PATTERN_FUNCTION_PREFIXES))


def check_arguments(name: str, arguments: list[dict[str, Any]], functions: FunctionTable) -> None:
    """The per-call rules above, for a call of `name` (allowed by the table) with these argument nodes."""
    folded = name.lower()
    if folded in AGGREGATE_NAME_ARGUMENTS:
        text = _string_argument(name, arguments, AGGREGATE_NAME_ARGUMENTS[folded], "the aggregate function's name")
        check_aggregate_name(text, functions, f"in {name}")
    if folded in TYPE_ARGUMENTS:
        index = TYPE_ARGUMENTS[folded]
        position = index if index >= 0 else len(arguments) - 1
        if 0 <= position < len(arguments) and (index >= 0 or len(arguments) > 1):  # too few: ClickHouse says so
            _string_argument(name, arguments, position, "the type name")  # its aggregates: check_literal
    if folded.startswith(PATTERN_FUNCTION_PREFIXES):
        _check_patterns(name, arguments)


def _string_argument(name: str, arguments: list[dict[str, Any]], index: int, what: str) -> str:
    node = arguments[index] if -len(arguments) <= index < len(arguments) else None
    value = node.get("value") if isinstance(node, dict) and node.get("type") == "Literal" else None
    if not isinstance(value, dict) or value.get("field_type") != "String" or not isinstance(value.get("value"), str):
        raise Refused(f"{name}: {what} must be written as a string literal ('...'), not computed")
    text: str = value["value"]
    return text


def check_aggregate_name(text: str, functions: FunctionTable, where: str) -> None:
    """`text` is `name` or `name(parameters)`: an allowed aggregate with plain literal parameters."""
    match = _AGGREGATE_NAME.fullmatch(text)
    if not match:
        raise Refused(f"{where}: {text[:80]!r} is not an aggregate function name")
    name, parameters = match.group(1), match.group(2)
    if not functions.allows_aggregate(name):
        raise Refused(f"aggregate function {name} ({where}) is not allowed in analyst SQL")
    if parameters is not None and not _PLAIN_PARAMETERS.fullmatch(parameters):
        raise Refused(f"{where}: the parameters of {name} must be plain number or string literals")


def refuse_table_function_calls(outer: str, node: Any) -> None:
    """Raise Refused for a call, in a table function's arguments (outside subqueries, which are checked as queries),
    whose name is a table function's (ALL_TABLE_FUNCTIONS, in any case): ClickHouse runs it as one there."""
    if isinstance(node, list):
        for child in node:
            refuse_table_function_calls(outer, child)
        return
    if not isinstance(node, dict) or node.get("type") in ("SelectWithUnionQuery", "SelectQuery", "Subquery"):
        return
    name = node.get("name")
    if node.get("type") == "Function" and isinstance(name, str) and name.lower() in _ALL_TABLE_FUNCTIONS_ANY_CASE:
        raise Refused(f"{outer}(): a call of {name} in its arguments would run as the table function {name}; "
                      f"compute that value in a subquery, e.g. {outer}((SELECT ...))")
    for value in node.values():
        refuse_table_function_calls(outer, value)


def check_values_structure(arguments: Any) -> None:
    """`values(structure, rows...)`: ClickHouse reads a first argument that is a string literal (a query parameter
    becomes one) as a column list whose declarations may carry expressions (`ALIAS file(...)`) it evaluates, so that
    argument must be a literal (or a tuple()/array() row), and as a string a plain structure (olap/structure.py): a name
    there is read as the string of the alias it names (`WITH '...' AS s ... values(s, 1)`: a second review)."""
    children = arguments.get("children") if isinstance(arguments, dict) else None
    if not isinstance(children, list):
        raise Refused("values(): its arguments could not be checked")
    if len(children) < 2:
        return  # values(rows): no structure
    first = children[0]
    kind = first.get("type") if isinstance(first, dict) else None
    if kind == "Function" and first.get("name") in ("tuple", "array"):
        return  # a row: (1, now()) or [1, 2]
    if kind != "Literal":  # a name ClickHouse resolves to an alias's string first, a parameter, a call, a subquery
        raise Refused("values(): with rows after it, the first argument must be a literal row or a column structure "
                      "written as a string in the query (ClickHouse reads a string there as the structure), e.g. "
                      "values('a UInt8, b String', (1, 'x'))")
    value = first.get("value")
    if isinstance(value, dict) and value.get("field_type") == "String":
        try:
            check_structure(str(value.get("value")))
        except StructureError as exc:
            raise Refused(f"values(): with rows after it, ClickHouse reads the string {str(value.get('value'))[:80]!r} "
                          f"as the column structure, and it is not a plain list of column names and types ({exc}). "
                          "Name the columns first, as in values('c String', 'Germany', 'France'); defaults, aliases, "
                          "codecs and other column clauses are not allowed") from None


def check_literal(node: dict[str, Any], functions: FunctionTable) -> None:
    """Every AggregateFunction(...)/SimpleAggregateFunction(...) type a string literal could hold is written
    plainly (`_AGGREGATE_TYPE`) and names an allowed aggregate with plain literal parameters."""
    if set(node) - {"type", "value", "alias"}:
        raise Refused("unsupported construct Literal")
    for text in _strings(node.get("value")):
        check_aggregate_types(text, functions)


def check_aggregate_types(text: str, functions: FunctionTable) -> None:
    """Raise Refused unless every possible aggregate function type in `text` is a plain, allowed one."""
    possible = max(_letters(text).count(AGGREGATE_TYPE_WORD), _letters(_unescape(text)).count(AGGREGATE_TYPE_WORD))
    if not possible:
        return
    plain = list(_AGGREGATE_TYPE.finditer(text))
    for match in plain:
        name, parameters = match.group(1), match.group(2)
        if not functions.allows_aggregate(name):
            raise Refused(f"aggregate function {name} (in the type {text[:80]!r}) is not allowed in analyst SQL")
        if parameters is not None and not _PLAIN_PARAMETERS.fullmatch(parameters):
            raise Refused(f"the parameters of {name} (in the type {text[:80]!r}) must be plain number or string "
                          "literals")
    if len(plain) != possible:
        raise Refused(f"the string {text[:80]!r} spells AggregateFunction in a way ClickHouse could read as a type "
                      "but this check cannot: write such types plainly, as AggregateFunction(name, Type, ...) "
                      "with no quotes, comments or escapes (to match text, build it with concat('aggregate', "
                      "'function'))")


def _letters(text: str) -> str:
    """`text` lowercased, letters a-z only: what is left of a type name once quotes, comments and spaces go."""
    return re.sub(r"[^a-z]", "", text.lower())


def _unescape(text: str) -> str:
    """Backslash escapes decoded as ClickHouse decodes them in quoted names (\\xHH, \\N is nothing, \\c is c)."""
    def decode(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape == "N":
            return ""
        return chr(int(escape[1:], 16)) if len(escape) == 3 else escape
    return _ESCAPE.sub(decode, text)


def _strings(value: Any) -> Iterator[str]:
    """The strings in a parseQueryToJSON literal value ({"field_type", "value"}, nested for arrays and tuples)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        yield from _strings(value.get("value"))
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _check_patterns(name: str, arguments: list[dict[str, Any]]) -> None:
    patterns = _literal_strings(arguments[1]) if len(arguments) > 1 else None
    if patterns is None:
        raise Refused(f"{name}: the patterns must be a literal array of strings (['a', 'b'])")
    if len(patterns) > MAX_PATTERNS:
        raise Refused(f"{name}: at most {MAX_PATTERNS} patterns per call ({len(patterns)} given)")
    if any(len(p.encode()) > MAX_PATTERN_BYTES for p in patterns):
        raise Refused(f"{name}: each pattern must be at most {MAX_PATTERN_BYTES} bytes")


def _literal_strings(node: dict[str, Any]) -> list[str] | None:
    """The strings of a literal array (`['a', 'b']` or `array('a', 'b')`), or None if it is anything else."""
    if node.get("type") == "Literal":
        value = node.get("value")
        items = value.get("value") if isinstance(value, dict) and value.get("field_type") == "Array" else None
        if not isinstance(items, list):
            return None
        return _all_strings(items)
    if node.get("type") == "Function" and node.get("name") == "array":
        children = node.get("arguments", {}).get("children", [])
        values = [c.get("value") if isinstance(c, dict) and c.get("type") == "Literal" else None for c in children]
        return _all_strings(values)
    return None


def _all_strings(values: list[Any]) -> list[str] | None:
    """The strings of literal values ({"field_type": "String", "value": ...}), or None unless all are strings."""
    out = [v["value"] for v in values if isinstance(v, dict) and v.get("field_type") == "String"
           and isinstance(v.get("value"), str)]
    return out if len(out) == len(values) else None


# --- generating the function table -------------------------------------------------------------


def verdict(row: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """('allow'|'deny', why) for one system.functions row, by the rules above."""
    name = row["name"]
    target_name = row["alias_to"] or name
    for candidate in (name, target_name):
        if candidate in DENIED:
            return "deny", DENIED[candidate]
    if name in SERVER_CONSTANTS or target_name in SERVER_CONSTANTS:
        return "allow", "reviewed: a constant of the server, which clients ask for on connect"
    if name in PURE_OTHERS or target_name in PURE_OTHERS:
        return "allow", "reviewed: computes on its arguments only"
    target = rows.get(target_name)
    if target is None:
        return "deny", f"alias of {target_name}, which system.functions does not list"
    categories = {c.strip() for c in str(target["categories"]).split(",") if c.strip()}
    if not categories:
        return "deny", "no category: not reviewed"
    outside = sorted(categories - ALLOWED_CATEGORIES)
    if outside:
        return "deny", f"category {', '.join(outside)}"
    return "allow", ", ".join(sorted(categories))


def generate(client: Any) -> tuple[str, dict[str, tuple[str, str, bool, str]], dict[str, str]]:
    """(version, functions, combinators) from a live ClickHouse, by the rules above."""
    version = str(client.query("SELECT version()").result_rows[0][0])
    result = client.query("SELECT name, is_aggregate, case_insensitive, alias_to, categories FROM system.functions")
    rows = {r[0]: dict(zip(("name", "is_aggregate", "case_insensitive", "alias_to", "categories"), r, strict=True))
            for r in result.result_rows}
    functions: dict[str, tuple[str, str, bool, str]] = {}
    for name in sorted(rows):
        row = rows[name]
        target = rows.get(row["alias_to"]) if row["alias_to"] else row
        aggregate = bool(row["is_aggregate"] or (target is not None and target["is_aggregate"]))
        decision, why = verdict(row, rows)
        functions[name] = (decision, "aggregate" if aggregate else "function", bool(row["case_insensitive"]), why)
    combinators = {str(r[0]): "allow" for r in
                   client.query("SELECT name FROM system.aggregate_function_combinators").result_rows}
    return version, functions, combinators


def render(version: str, functions: Mapping[str, tuple[str, str, bool, str]], combinators: Mapping[str, str]) -> str:
    lines = [
        '"""Generated by `python -m olap.allowlist --write` from system.functions; do not edit by hand.',
        "",
        "Change the rules in olap/allowlist.py, regenerate, and review the diff: every new function of a",
        "ClickHouse upgrade shows up here with its verdict. tests/test_analyst.py fails while this file",
        'is not what the rules give for the ClickHouse the tests run on.',
        '"""',
        "",
        f"VERSION = {version!r}",
        "",
        "# name: (verdict, kind, case_insensitive, why)",
        "FUNCTIONS = {",
    ]
    lines += [f"    {name!r}: {tuple(entry)!r}," for name, entry in sorted(functions.items())]
    lines += ["}", "", "# aggregate function combinators (system.aggregate_function_combinators)", "COMBINATORS = {"]
    lines += [f"    {name!r}: {v!r}," for name, v in sorted(combinators.items())]
    lines += ["}", ""]
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m olap.allowlist",
                                     description="Regenerate olap/allowed_functions.py from system.functions.")
    parser.add_argument("--dsn", default="chdb:///tmp/tally-allowlist-chdb",
                        help="ClickHouse to read system.functions from (default: a scratch chDB directory)")
    parser.add_argument("--write", action="store_true", help="write the file (default: report whether it is current)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    text = render(*generate(connect(args.dsn)))
    current = DATA_FILE.read_text() if DATA_FILE.exists() else ""
    if args.write:
        DATA_FILE.write_text(text)
        print(f"wrote {DATA_FILE}")
        return 0
    if text == current:
        print(f"{DATA_FILE} is current")
        return 0
    print(f"{DATA_FILE} differs from what the rules give; run with --write and review the diff", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
