"""What analyst tools ask on connect and to browse, answered from curated views, never the real `system`
database (ADR 51).

Tools ask the same few things of every ClickHouse: `SELECT version(), timezone()`, `currentDatabase()`,
`system.settings` (clickhouse-connect, on connect), `SHOW DATABASES`, `SHOW TABLES FROM db`, `DESCRIBE TABLE
db.t`, `EXISTS TABLE db.t`, and `system.databases` / `system.tables` / `system.columns` / `system.functions`
queries (Grafana, DBeaver's JDBC driver, SQLAlchemy). Analyst SQL answers them all through the one checked path
(olap/analyst.py `prepare`):

- `<db>_catalog` holds one VIEW per name in `olap.allowlist.CATALOG_TABLES`, over the system table of that
  name, showing only what analysts may see: the analyst database, its `ANALYST_TABLES` and their columns, the
  settings the ClickHouse-compatible endpoint accepts (olap/ch_settings.py) at their defaults, the functions
  the allowlist allows; paths, definers and dependencies blanked. The views run as their definer (`SQL
  SECURITY DEFINER`), so the analysts' ClickHouse user needs SELECT on `<db>_catalog.*` and nothing in
  `system`. ClickHouse migration 4 creates them; `ensure_current` replaces any whose definition changed
  (a new analyst table, setting or allowed function), found by the fingerprint in each view's COMMENT.
- `statement_as_select` turns SHOW DATABASES / SHOW TABLES / SHOW COLUMNS / SHOW SETTINGS / DESCRIBE / EXISTS /
  SHOW CREATE TABLE / SHOW CREATE DATABASE (as
  ClickHouse's canonical single-line text, matched whole and strictly) into the SELECT over `system.<x>` that
  gives ClickHouse's own answer (same column names), which then goes through `prepare` like any query.
- On the ClickHouse-compatible endpoint (`prepare(..., system_catalog=True)`; tools query `system` there) the
  allowlist lets a query name `system.<x>` for x in CATALOG_TABLES; on every path it may call
  `currentDatabase()` and `displayName()` without arguments. `rewrite` then points those tables at
  `<db>_catalog.<x>` and turns the calls into literals (the analyst database's name; "tally"), and `prepare`
  runs the rewritten text only after parsing and checking it again (`check(..., rewritten=True)`, which
  refuses `system` and lets `<db>_catalog` through). `qualify` names the analyst tables a query wrote without
  their database (`FROM events`, which `check` returns) `<db>.<t>` in the same pass. `currentUser()` is the
  literal "analyst". `/api/v1/sql` and `tally sql` keep refusing `system.*`
  by name (ADR 9); their SHOW / DESCRIBE / EXISTS are answered from the same views.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from olap.allowlist import (
    ANALYST_TABLES,
    CATALOG_TABLES,
    Refused,
    catalog_database,
    catalog_function,
    check,
    function_table,
)
from olap.ch_settings import FORWARDED, TRANSPORT
from olap.cluster import on_cluster

# Settings listed in the curated system.settings: those the ClickHouse-compatible endpoint accepts (it forwards
# FORWARDED to ClickHouse after checking their values, and handles or ignores TRANSPORT itself). clickhouse-connect
# sends a listed, writable setting on every query when it wants it (date_time_input_format, enable_http_compression,
# cancel_http_readonly_queries_on_client_close, ...), so nothing the endpoint refuses may be listed.
CLIENT_SETTINGS = frozenset(FORWARDED) | TRANSPORT

# What displayName() answers (ClickHouse's would be the server's host name), and currentUser() (ClickHouse's would be
# the analysts' shared ClickHouse user; never a token's or another user's name).
DISPLAY_NAME = "tally"
CURRENT_USER = "analyst"
_COMMENT_PREFIX = "tally catalog "
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _literal(name: str) -> str:
    if not _PLAIN.fullmatch(name):  # every name here comes from code (tables, settings, functions)
        raise ValueError(f"{name!r} is not a plain name")
    return f"'{name}'"


def _in(names: Iterable[str]) -> str:
    return f"({', '.join(_literal(n) for n in sorted(names))})"


# Ends every view body that filters: a LIMIT (far above any row count the views can have) is a barrier ClickHouse
# cannot push a predicate through, since filtering before a LIMIT changes what the LIMIT keeps. Without it an
# analyst's WHERE over a view is pushed down and evaluated, with the view's own WHERE, on the rows the view drops:
# an expression that can fail (`throwIf(name = 'x')`, `intDiv(1, ...)`) then answers whether a hidden table,
# column or database (or its engine) exists. With it, the analyst's WHERE only ever sees the view's rows. Checked
# on ClickHouse 24.8 (old and new analyzer, enable_optimize_predicate_expression and optimize_move_to_prewhere on
# and off) and chDB's 26.9; a `SETTINGS enable_optimize_predicate_expression = 0` or `query_plan_filter_push_down
# = 0` in the view body, a CTE, ORDER BY or HAVING do not stop the push-down (ADR 51, addendum).
_BARRIER = " LIMIT 1000000000"


def _view_bodies(db: str) -> dict[str, str]:
    """Name -> the SELECT of each curated view, for the analyst database `db`."""
    tables, none = _in(ANALYST_TABLES), "CAST([] AS Array(String))"
    allowed = (name for name, entry in function_table().functions.items() if entry[0] == "allow")
    return {
        "databases": "SELECT name, engine, '' AS data_path, '' AS metadata_path, uuid, engine_full, comment, "
                     f"is_external, name AS database FROM system.databases WHERE name = {_literal(db)}{_BARRIER}",
        "tables": "SELECT database, name, uuid, engine, is_temporary, "
                  f"{none} AS data_paths, '' AS metadata_path, metadata_modification_time, {none} AS "
                  f"dependencies_database, {none} AS dependencies_table, create_table_query, engine_full, as_select, "
                  "partition_key, sorting_key, primary_key, sampling_key, storage_policy, total_rows, total_bytes, "
                  "total_bytes_uncompressed, parts, active_parts, total_marks, lifetime_rows, lifetime_bytes, comment, "
                  f"has_own_data, {none} AS loading_dependencies_database, {none} AS loading_dependencies_table, "
                  f"{none} AS loading_dependent_database, {none} AS loading_dependent_table, name AS table "
                  f"FROM system.tables WHERE database = {_literal(db)} AND name IN {tables}{_BARRIER}",
        "columns": "SELECT database, table, name, type, position, default_kind, default_expression, "
                   "data_compressed_bytes, data_uncompressed_bytes, marks_bytes, comment, is_in_partition_key, "
                   "is_in_sorting_key, is_in_primary_key, is_in_sampling_key, compression_codec, "
                   "character_octet_length, numeric_precision, numeric_precision_radix, numeric_scale, "
                   f"datetime_precision, name AS column FROM system.columns WHERE database = {_literal(db)} "
                   f"AND table IN {tables}{_BARRIER}",
        # At their defaults, changeable: what a client may send (the endpoint checks the values).
        "settings": "SELECT name, default AS value, toUInt8(0) AS changed, description, min, max, "
                    "toUInt8(0) AS readonly, type, default, alias_for, is_obsolete "
                    f"FROM system.settings WHERE name IN {_in(CLIENT_SETTINGS)}{_BARRIER}",
        "functions": "SELECT name, is_aggregate, case_insensitive, alias_to, '' AS create_query, origin, description, "
                     "syntax, arguments, parameters, returned_value, examples, introduced_in, categories "
                     f"FROM system.functions WHERE name IN {_in(allowed)}{_BARRIER}",
        "one": "SELECT dummy FROM system.one",  # one row, none hidden: no barrier needed
    }


def _fingerprint(body: str) -> str:
    return _COMMENT_PREFIX + hashlib.sha256(body.encode()).hexdigest()[:16]


def _create(db: str, name: str, body: str) -> str:
    return (f"CREATE OR REPLACE VIEW {catalog_database(db)}.{name} DEFINER = CURRENT_USER SQL SECURITY DEFINER "
            f"AS {body} COMMENT '{_fingerprint(body)}'")


def statements(db: str) -> list[str]:
    """ClickHouse migration 4: the catalog database and its views (idempotent: CREATE OR REPLACE)."""
    views = _view_bodies(db)
    assert set(views) == CATALOG_TABLES, "a view for every catalog table"
    return [f"CREATE DATABASE IF NOT EXISTS {catalog_database(db)}",
            *(_create(db, name, body) for name, body in sorted(views.items()))]


def ensure_current(client: Client, db: str, cluster: str | None = None) -> list[str]:
    """Replace the views whose definition is not the current one (after migration 4); returns their names. On a
    cluster (TALLY_CLICKHOUSE_CLUSTER) the node asked decides, and every node gets the new view (ON CLUSTER)."""
    rows = client.query("SELECT name, comment FROM system.tables WHERE database = {d:String}",
                        parameters={"d": catalog_database(db)}).result_rows
    have = {str(name): str(comment) for name, comment in rows}
    stale = [name for name, body in sorted(_view_bodies(db).items()) if have.get(name) != _fingerprint(body)]
    for name in stale:
        statement = _create(db, name, _view_bodies(db)[name])
        for text in [statement] if cluster is None else on_cluster([statement], db, cluster):
            client.command(text)
    return stale


# --- statements tools send that are not SELECTs ------------------------------------------------------

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_STRING = r"'(?:[^'\\]|\\.)*'"
_FORMAT = r"(?: FORMAT (?P<format>[A-Za-z][A-Za-z0-9]*))?"
_LIKE = rf"(?: (?P<negate>NOT )?(?P<like>I?LIKE) (?P<pattern>{_STRING}))?"
_LIMIT = r"(?: LIMIT (?P<limit>\d{1,9}))?"
_TABLE = rf"(?:(?P<db>{_IDENT})\.)?(?P<table>{_IDENT})"
_STATEMENTS = {
    "show_databases": re.compile(rf"SHOW DATABASES{_LIKE}{_LIMIT}{_FORMAT}"),
    "show_tables": re.compile(rf"SHOW TABLES(?: FROM (?P<db>{_IDENT}))?{_LIKE}{_LIMIT}{_FORMAT}"),
    "describe": re.compile(rf"DESCRIBE TABLE {_TABLE}{_FORMAT}"),
    "exists_table": re.compile(rf"EXISTS TABLE {_TABLE}{_FORMAT}"),
    "exists_database": re.compile(rf"EXISTS DATABASE (?P<db>{_IDENT}){_FORMAT}"),
    "show_create": re.compile(rf"SHOW CREATE TABLE {_TABLE}{_FORMAT}"),
    "show_columns": re.compile(rf"SHOW COLUMNS FROM (?P<table>{_IDENT})(?: FROM (?P<db>{_IDENT}))?{_LIKE}{_LIMIT}"
                               f"{_FORMAT}"),
    "show_settings": re.compile(rf"SHOW SETTINGS{_LIKE}{_LIMIT}{_FORMAT}"),
    "show_create_database": re.compile(rf"SHOW CREATE DATABASE (?P<db>{_IDENT}){_FORMAT}"),
}
SUPPORTED = ("SELECT, SHOW DATABASES, SHOW TABLES [FROM db] [LIKE '...'], SHOW COLUMNS FROM table [FROM db], SHOW "
             "SETTINGS LIKE '...', DESCRIBE [TABLE] db.table, EXISTS [TABLE] db.table, EXISTS DATABASE db, SHOW CREATE "
             "TABLE db.table, SHOW CREATE DATABASE db and EXPLAIN [PLAN | ESTIMATE | AST] SELECT")
# The columns of ClickHouse's DESCRIBE answer.
_DESCRIBE_COLUMNS = ("name", "type", "default_type", "default_expression", "comment", "codec_expression",
                     "ttl_expression")
# `system.<x>` -> [(column, type), ...] of the curated view (olap/analyst.py asks ClickHouse), for DESCRIBE
# system.<x> on the ClickHouse-compatible endpoint.
CatalogColumns = Callable[[str], list[tuple[str, str]]]


def statement_as_select(text: str, database: str, catalog_columns: CatalogColumns | None = None) -> str | None:
    """The SELECT over `system.<x>` (the curated views) answering the statement `text` (ClickHouse's canonical
    single-line form) as ClickHouse would, with its `FORMAT` kept; None if `text` is none of those forms.
    `catalog_columns`: where `system.<x>` may be read (the ClickHouse-compatible endpoint), DESCRIBE of one
    answers with its curated view's columns. Raises Refused for a database or table analysts may not read."""
    for kind, pattern in _STATEMENTS.items():
        match = pattern.fullmatch(text)
        if match:
            parts = match.groupdict()
            if kind == "describe" and parts.get("db") == "system" and parts["table"] in CATALOG_TABLES:
                select = _describe_catalog(str(parts["table"]), catalog_columns)
            else:
                select = _SELECTS[kind](parts, database)
            return select + (f" FORMAT {parts['format']}" if parts.get("format") else "")
    return None


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _describe_catalog(table: str, catalog_columns: CatalogColumns | None) -> str:
    """DESCRIBE system.<table> as a SELECT over `values(...)` of its curated view's columns."""
    if catalog_columns is None:
        raise Refused(f"table system.{table} is not available to analysts here; the ClickHouse-compatible endpoint "
                      f"(TALLY_CLICKHOUSE_HTTP_PORT) answers DESCRIBE system.{table} and SELECTs from it")
    structure = ", ".join(f"{column} String" for column in _DESCRIBE_COLUMNS)
    rows = ", ".join(f"({_quoted(name)}, {_quoted(kind)}, '', '', '', '', '')" for name, kind in catalog_columns(table))
    return f"SELECT * FROM values({_quoted(structure)}, {rows})"


def _like(parts: dict[str, Any], column: str) -> str:
    if not parts.get("like"):
        return ""
    return f" AND {column} {parts['negate'] or ''}{parts['like']} {parts['pattern']}"


def _limit(parts: dict[str, Any]) -> str:
    return f" LIMIT {int(parts['limit'])}" if parts.get("limit") else ""


def _own_database(parts: dict[str, Any], database: str) -> str:
    db = parts.get("db") or database  # unqualified: the current database, which for analysts is `database`
    if db != database:
        raise Refused(f"database {db} is not available to analysts (only {database})")
    return db


def _analyst_table(parts: dict[str, Any], database: str) -> tuple[str, str]:
    db, table = parts.get("db") or database, str(parts["table"])
    if db != database or table not in ANALYST_TABLES:
        allowed = ", ".join(f"{database}.{t}" for t in sorted(ANALYST_TABLES))
        raise Refused(f"table {db}.{table} is not available to analysts (allowed: {allowed})")
    return db, table


def _show_databases(parts: dict[str, Any], database: str) -> str:
    return f"SELECT name FROM system.databases WHERE 1{_like(parts, 'name')} ORDER BY name{_limit(parts)}"


def _show_tables(parts: dict[str, Any], database: str) -> str:
    db = _own_database(parts, database)
    return (f"SELECT name FROM system.tables WHERE database = '{db}'{_like(parts, 'name')} ORDER BY name"
            f"{_limit(parts)}")


def _describe(parts: dict[str, Any], database: str) -> str:
    db, table = _analyst_table(parts, database)
    return ("SELECT name, type, default_kind AS default_type, default_expression, comment, compression_codec AS "
            f"codec_expression, '' AS ttl_expression FROM system.columns WHERE database = '{db}' AND "
            f"table = '{table}' ORDER BY position")


def _exists_table(parts: dict[str, Any], database: str) -> str:
    # A table analysts cannot see does not exist for them (ClickHouse answers 0 without SHOW access too).
    db, table = parts.get("db") or database, parts["table"]
    return f"SELECT toUInt8(count() > 0) AS result FROM system.tables WHERE database = '{db}' AND name = '{table}'"


def _exists_database(parts: dict[str, Any], database: str) -> str:
    return f"SELECT toUInt8(count() > 0) AS result FROM system.databases WHERE name = '{parts['db']}'"


def _show_create(parts: dict[str, Any], database: str) -> str:
    db, table = _analyst_table(parts, database)
    return f"SELECT create_table_query AS statement FROM system.tables WHERE database = '{db}' AND name = '{table}'"


def _show_columns(parts: dict[str, Any], database: str) -> str:
    db, table = _analyst_table(parts, database)
    return ("SELECT name AS field, type, if(startsWith(type, 'Nullable(') OR startsWith(type, "
            "'LowCardinality(Nullable('), 'YES', 'NO') AS `null`, "
            "arrayStringConcat(arrayFilter(k -> (k != ''), [if(is_in_primary_key, 'PRI', ''), "
            "if(is_in_sorting_key, 'SOR', '')]), ' ') AS key, nullIf(default_expression, '') AS `default`, "
            f"'' AS extra FROM system.columns WHERE database = '{db}' AND table = '{table}'{_like(parts, 'name')} "
            f"ORDER BY field{_limit(parts)}")


def _show_settings(parts: dict[str, Any], database: str) -> str:
    return f"SELECT name, type, value FROM system.settings WHERE 1{_like(parts, 'name')} ORDER BY name{_limit(parts)}"


def _show_create_database(parts: dict[str, Any], database: str) -> str:
    return f"SELECT 'CREATE DATABASE {_own_database(parts, database)}' AS statement"


_SELECTS = {"show_databases": _show_databases, "show_tables": _show_tables, "describe": _describe,
            "exists_table": _exists_table, "exists_database": _exists_database, "show_create": _show_create,
            "show_columns": _show_columns, "show_settings": _show_settings,
            "show_create_database": _show_create_database}


# --- rewriting a checked SELECT --------------------------------------------------------------------


def rewrite(tree: dict[str, Any], database: str) -> bool:
    """Point `system.<x>` (tables, `IN system.x`, and `system.x.column` names) at `<database>_catalog.<x>`
    and replace `currentDatabase()` by `database`'s name, in place; True when anything changed.
    `tree` has passed `olap.allowlist.check`."""
    return _Rewriter(database).node(tree, in_select_list=False)


class _Rewriter:
    def __init__(self, database: str) -> None:
        self.database = database
        self.catalog = catalog_database(database)

    def node(self, node: Any, in_select_list: bool) -> bool:
        changed = False
        if isinstance(node, list):
            for index, child in enumerate(node):
                replacement = self._literal_for(child, in_select_list)
                if replacement is not None:
                    node[index], changed = replacement, True
                else:
                    changed |= self.node(child, in_select_list)
            return changed
        if not isinstance(node, dict):
            return False
        if node.get("type") in ("TableIdentifier", "Identifier"):
            return self._identifier(node)
        for key, child in node.items():
            replacement = self._literal_for(child, False)
            if replacement is not None:
                node[key], changed = replacement, True
                continue
            select_list = node.get("type") == "SelectQuery" and key == "select"
            if select_list and isinstance(child, dict):
                changed |= self.node(child.get("children", []), True)
            else:
                changed |= self.node(child, False)
        return changed

    def _identifier(self, node: dict[str, Any]) -> bool:
        parts = node.get("name_parts")
        if isinstance(parts, list) and len(parts) >= 2 and parts[0] == "system" and parts[1] in CATALOG_TABLES:
            node["name_parts"] = [self.catalog, *parts[1:]]
            node["name"] = ".".join(node["name_parts"])
            return True
        return False

    def _literal_for(self, node: Any, in_select_list: bool) -> dict[str, Any] | None:
        """The literal standing for a call of a CATALOG_FUNCTIONS name (`currentDatabase()`, `displayName()`; named
        as ClickHouse names the call when it is a column of the result), or None if `node` is not one."""
        if not isinstance(node, dict) or node.get("type") != "Function":
            return None
        name = node.get("name")
        stands_for = catalog_function(name) if isinstance(name, str) else None
        if stands_for is None:
            return None
        value = {"database": self.database, "user": CURRENT_USER}.get(stands_for, DISPLAY_NAME)
        literal: dict[str, Any] = {"type": "Literal", "value": {"field_type": "String", "value": value}}
        alias = node.get("alias") or (f"{name}()" if in_select_list else None)
        if alias:
            literal["alias"] = alias
        return literal


def qualify(unqualified: Iterable[dict[str, Any]], database: str) -> bool:
    """Name the analyst tables `check` found without a database (`FROM events`, `x IN events`) as
    `<database>.<t>`, in place: the analyst database is the current one for analysts, whatever database the
    ClickHouse session runs in. True when any was."""
    changed = False
    for node in unqualified:
        name = str(node["name"])
        node["name"], node["name_parts"] = f"{database}.{name}", [database, name]
        changed = True
    return changed


def resolve(client: Client, tree: dict[str, Any], database: str,
            unqualified: Iterable[dict[str, Any]] = ()) -> str | None:
    """The text to run for a checked query that names analyst tables without their database (`unqualified`,
    what `check` returned), reads the catalog or calls currentDatabase(), or None when it does none of that (run
    the canonical text as it is). The rewritten tree is formatted, parsed and checked again (`check(...,
    rewritten=True)`), so what runs is what was checked. Raises Refused."""
    qualified = qualify(unqualified, database)
    if not rewrite(tree, database) and not qualified:
        return None
    try:
        rows = client.query("SELECT formatQueryFromJSON({t:String}) AS text, parseQueryToJSON(text) AS tree, "
                            "formatQueryFromJSON(tree) = text AS faithful",
                            parameters={"t": json.dumps(tree)}).result_rows
    except ClickHouseError as exc:
        raise Refused(f"the query could not be pointed at the analyst catalog: {str(exc)[:200]}") from None
    text, tree_json, faithful = rows[0]
    if not faithful:
        raise Refused("the query could not be pointed at the analyst catalog faithfully; rewrite it")
    check(json.loads(tree_json), database, rewritten=True)
    return str(text)
