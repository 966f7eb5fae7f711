"""Analyst SQL in ClickHouse's own output formats, for the ClickHouse-compatible endpoint (ADR 50).

- `take_format`: a trailing `FORMAT <name>` (clickhouse-connect appends one to every query) is taken off
  ClickHouse's canonical single-line text of the query and becomes the format (allowlisted,
  olap/ch_formats.py). The rest is then prepared like any analyst query (olap/analyst.py `prepare`): parsed
  again and checked whole, so what runs is still exactly what was checked; any other FORMAT, SETTINGS or
  INTO OUTFILE stays refused there.
- `stream_raw`: ClickHouse encodes the result (`raw_stream(query, fmt=...)`), under the same limits as
  tally's formats: ClickHouse's own (time, memory, rows, `readonly = 1` last), the byte cap counted here
  on what is handed out, and the deadline checked per chunk (the watchdog bounds a chunk that never comes).
  Rows are not counted (the bytes are ClickHouse's encoding, not rows): the audit log stores 0 and
  `tally sql-log` shows `-`; X-ClickHouse-Summary leaves out what is not known rather than saying 0.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver._chdbclient import ChdbClient
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from olap.analyst import (
    MAX_SQL_BYTES,
    AnalystQueryError,
    QueryStats,
    SqlLimits,
    _bound,
    _classify,
    _code_of,
    _settings,
    _short,
    prepare,
    session_value,
)
from olap.ch_formats import CH_FORMATS, ch_format_named, is_ch_format, unknown_format_message
from olap.ch_native import capped_revision, client_revision, handshake_block, is_handshake
from olap.ch_settings import (
    HTTP_PARAMETERS,
    MAX_QUERY_ID_CHARS,
    QUERY_ID,
    QUERY_ID_RULE,
    SettingRefused,
    check_forwarded,
)
from olap.formats import FORMATS

log = logging.getLogger(__name__)
_TRAILING_FORMAT = re.compile(r" FORMAT `?([A-Za-z][A-Za-z0-9]*)`?$")  # `Null` comes back quoted
_UNKNOWN_FORMAT = 73
_CHUNK = 64 * 1024


def take_format(client: Client, sql: object) -> tuple[str, str | None]:
    """(the query without its trailing FORMAT clause, the allowlisted format it named or None). A query
    without one comes back as it was sent. Raises AnalystQueryError("refused") for a format not allowed or
    a query ClickHouse cannot parse."""
    if not isinstance(sql, str) or not sql.strip():
        raise AnalystQueryError("refused", "'sql' must be a non-empty string")
    size = len(sql.encode("utf-8", "surrogatepass"))
    if size > MAX_SQL_BYTES:
        raise AnalystQueryError("refused", f"the query is {size} bytes long; analyst SQL is limited to "
                                           f"{MAX_SQL_BYTES} bytes (16 KiB) of UTF-8")
    try:
        rows = client.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": sql}).result_rows
    except ClickHouseError as exc:
        raise AnalystQueryError("refused", _short(str(exc)), _code_of(exc)) from None
    text = str(rows[0][0]) if rows else ""
    found = _TRAILING_FORMAT.search(text)
    if found is None:
        return sql, None
    name = ch_format_named(found.group(1))
    if name is None:
        raise AnalystQueryError("refused", unknown_format_message(found.group(1)), _UNKNOWN_FORMAT)
    return text[:found.start()], name


_SETTINGS_WORD = re.compile(r"\bSETTINGS\b", re.IGNORECASE)


def take_settings(client: Client, text: str) -> tuple[str, dict[str, str]]:
    """(the query without its own SETTINGS clause, the settings it named), when every one is allowed
    (olap/ch_settings.py, as URL settings are); they then apply as the request's do, before the server's limits
    and `readonly = 1`, which a SETTINGS clause left in the text would come after (and be refused by).
    Only the clause of the statement itself: one inside a subquery stays and is refused by the allowlist.
    Raises AnalystQueryError("refused") naming a setting that is not allowed and why."""
    if not _SETTINGS_WORD.search(text):
        return text, {}
    try:
        tree_json = client.query("SELECT parseQueryToJSON({q:String})", parameters={"q": text}).result_rows[0][0]
        tree = json.loads(tree_json)
    except (ClickHouseError, IndexError, ValueError):
        return text, {}  # not a statement this can read (DESCRIBE, SHOW ...): `prepare` decides
    clauses = [select.pop("settings") for select in _top_selects(tree) if "settings" in select]
    if not clauses:
        return text, {}
    named: dict[str, str] = {}
    for clause in clauses:
        named |= _changes(clause)
    if "readonly" in named:  # as in the URL (ch_settings.split_request_settings): 1 or 2 is what runs anyway
        if named["readonly"].strip() not in ("1", "2"):
            raise AnalystQueryError("refused", f"Cannot modify 'readonly' setting to {named['readonly'][:20]!r}: the "
                                               "analyst endpoint is read-only (readonly = 1 or 2 is accepted)", 164)
        del named["readonly"]
    try:
        checked = check_forwarded(named)
    except SettingRefused as exc:
        raise AnalystQueryError("refused", exc.message, exc.code) from None
    if checked.keys() & HTTP_PARAMETERS:
        raise AnalystQueryError("refused", f"{', '.join(sorted(checked.keys() & HTTP_PARAMETERS))} is a URL "
                                           "parameter, not a setting a SETTINGS clause can carry", 115)
    try:
        rows = client.query("SELECT formatQueryFromJSON({t:String})", parameters={"t": json.dumps(tree)}).result_rows
    except ClickHouseError as exc:
        raise AnalystQueryError("refused", _short(str(exc)), _code_of(exc)) from None
    return str(rows[0][0]), checked


def _top_selects(tree: object) -> list[dict[str, Any]]:
    """The SELECTs of a statement's own UNION (not of its subqueries)."""
    if not isinstance(tree, dict) or tree.get("type") != "SelectWithUnionQuery":
        return []
    children = (tree.get("list_of_selects") or {}).get("children") or []
    return [c for c in children if isinstance(c, dict) and c.get("type") == "SelectQuery"]


def _changes(clause: object) -> dict[str, str]:
    """A SETTINGS clause's `name = literal` pairs as text."""
    unreadable = AnalystQueryError("refused", "this SETTINGS clause cannot be checked; write it as name = value")
    if not isinstance(clause, dict) or clause.get("type") != "SetQuery" or set(clause) - {"type", "changes"}:
        raise unreadable
    changes = clause.get("changes")
    if not isinstance(changes, list):
        raise unreadable
    out: dict[str, str] = {}
    for change in changes:
        if not isinstance(change, dict) or not isinstance(change.get("name"), str) or set(change) - {"name", "value"}:
            raise unreadable
        value = (change.get("value") or {}).get("value")
        if not isinstance(value, (str, int, float, bool)):
            raise unreadable
        out[change["name"]] = str(int(value)) if isinstance(value, bool) else str(value)
    return out


def _embedded(client: Client) -> bool:
    """Whether `client` is clickhouse-connect's chDB client. Its raw_stream applies per-call settings with SET
    and restores them after, which fails once `readonly = 1` is set (the session stays read-only, and the next
    query's settings are refused), and it reads the whole answer first; a trailing SETTINGS clause, as its
    own query path uses, does neither."""
    return isinstance(client, ChdbClient)


_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _settings_clause(settings: Mapping[str, Any]) -> str:
    """`name = 'value', ...`; values quoted (ClickHouse converts them to the setting's type)."""
    parts = []
    for name, value in settings.items():
        if not _SETTING_NAME.fullmatch(name):
            raise AnalystQueryError("failed", f"unexpected setting name {name[:40]!r}")
        text = str(int(value) if isinstance(value, bool) else value).replace("\\", "\\\\").replace("'", "\\'")
        parts.append(f"{name} = '{text}'")
    return ", ".join(parts)


def server_timezone(client: Client) -> str:
    """ClickHouse's `timezone()` for this client's session (asked once per client), for X-ClickHouse-Timezone."""
    return session_value(client, "SELECT timezone()")


_EXPLAIN = re.compile(r"\s*EXPLAIN\b", re.IGNORECASE)


def stream_raw(client: Client, text: str, limits: SqlLimits, fmt: str, stats: QueryStats, tag: str | None = None,
               settings: Mapping[str, str] | None = None,
               params: Mapping[str, str] | None = None) -> Iterator[bytes]:
    """Run `text` (what `prepare` returned) and yield ClickHouse's own encoding of it as `fmt`, in chunks.

    `settings` are the request's harmless settings (olap/ch_settings.py, checked by the caller). Raises
    AnalystQueryError on overflow, timeout or failure, possibly after some chunks; closing the generator
    closes the stream, which cancels the query."""
    all_settings = _settings(client, limits, tag, settings)
    embedded = _embedded(client)
    clause: str | None = None
    if embedded:  # as clickhouse-connect's chDB backend sends settings with every other query
        clause = _settings_clause({k: v for k, v in all_settings.items() if k not in HTTP_PARAMETERS})  # no HTTP
        text, all_settings = f"{text}\n SETTINGS {clause}", {}
    ended = False
    try:
        if _EXPLAIN.match(text):  # chDB cannot stream an EXPLAIN ("Streaming query is not supported"): a page of text
            source: Any = io.BytesIO(client.raw_query(text, parameters=_bound(text, params), settings=all_settings,
                                                      fmt=fmt))
        else:
            source = client.raw_stream(text, parameters=_bound(text, params), settings=all_settings, fmt=fmt)
        if not isinstance(source, io.IOBase):  # the sync client's answer; StreamContext is the async one's
            raise AnalystQueryError("failed", "unexpected raw stream from the ClickHouse client")
        try:
            yield from _chunks(source, limits, stats)
            ended = True
        finally:
            source.close()
    except ClickHouseError as exc:
        raise without_clause(_classify(exc), clause) from None
    finally:
        if embedded and not ended:
            _flush(client)


# The server's own SETTINGS clause (`name = 'value', ...`, appended for chDB) as ClickHouse echoes the query in a
# message; a query's own SETTINGS clause was taken off before (take_settings), so any such list is the server's.
_OUR_CLAUSE = re.compile(r"\s*\bSETTINGS\s+\w+ = '(?:[^'\\]|\\.)*'(?:, \w+ = '(?:[^'\\]|\\.)*')*")


def without_clause(exc: AnalystQueryError, clause: str | None = None) -> AnalystQueryError:
    """`exc` with the server's SETTINGS clause (limits, readonly, the watchdog's tag) taken out of its message:
    `clause` as far as the message echoes it (a message may be cut inside it), and any whole list of the shape."""
    message = exc.message
    if clause:
        full = f" SETTINGS {clause}"
        start = message.find(full[:24])
        if start >= 0:
            end = start
            while end < len(message) and end - start < len(full) and message[end] == full[end - start]:
                end += 1
            message = message[:start] + message[end:]
    message = _OUR_CLAUSE.sub("", message)
    return exc if message == exc.message else AnalystQueryError(exc.code, message, exc.ch_code)


def _chunks(source: io.IOBase, limits: SqlLimits, stats: QueryStats) -> Iterator[bytes]:
    """The stream's bytes in chunks, under the byte cap and the time limit (checked after each chunk)."""
    deadline = time.monotonic() + float(limits.max_execution_s) + 1.0
    while chunk := source.read(_CHUNK):
        if stats.bytes + len(chunk) > limits.max_result_bytes:
            raise AnalystQueryError("too_large", f"the result is larger than {limits.max_result_bytes} bytes (max "
                                                 "result bytes); aggregate more or add a LIMIT", 396)
        stats.bytes += len(chunk)
        yield chunk
        if time.monotonic() > deadline:
            raise AnalystQueryError("timeout", f"the query ran longer than {limits.max_execution_s} s (max "
                                               "execution time)", 159)


def _flush(client: Client) -> None:
    """After a raw stream that did not end cleanly on chDB: one tiny query whose answer is thrown away. chDB 4.4
    keeps what a failed query had written (a CSV header, a JSON document's start, Parquet's magic) and hands it
    out in front of the next query's answer on the same connection; this query takes it."""
    try:
        client.raw_query("SELECT 1", fmt="TabSeparated")
    except Exception:  # a client the watchdog closed, or one still streaming elsewhere: nothing to take
        log.debug("analyst: flushing a chDB connection after a cut answer failed", exc_info=True)


# --- the analyst server's request fields for this endpoint ----------------------------------------

# What `POST /v1/query` accepts (olap/server.py); anything else is refused, naming the field.
REQUEST_FIELDS = frozenset({"sql", "format", "token_id", "params", "settings", "client", "query_id"})
MAX_CLIENT_CHARS = 200


@dataclass
class Extras:
    """A query request's fields beyond sql/format/token_id/params. `format` starts as the request's and
    becomes the query's own FORMAT, if it names one (set by `ch_stream` before the first chunk)."""

    format: str
    clickhouse: bool = False  # a ClickHouse format: the endpoint's request (ClickHouse encodes, ClickHouse errors)
    settings: dict[str, str] = field(default_factory=dict)  # harmless, checked (olap/ch_settings.py)
    buffered: bool = False  # wait_end_of_query = 1: the whole answer before the status line
    client: str | None = None  # who asked (User-Agent), for the audit log
    query_id: str | None = None
    timezone: str = "UTC"  # the session's, once known

    def streamed(self) -> bool:
        return not self.buffered if self.clickhouse else FORMATS[self.format].streamed

    def content_type(self) -> str:
        return CH_FORMATS[self.format] if self.clickhouse else FORMATS[self.format].content_type


def request_extras(body: Mapping[str, Any], fmt: str) -> Extras | str:
    """The extra fields of a well-formed request body (sql and format already checked), or what is wrong."""
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        return f"unknown field {unknown[0][:40]!r}; a query request has {', '.join(sorted(REQUEST_FIELDS))}"
    settings = body.get("settings") or {}
    if not isinstance(settings, dict) or not all(isinstance(v, str) for v in settings.values()):
        return "settings must be an object of setting names to text values"
    settings = dict(settings)
    buffered = settings.pop("wait_end_of_query", "0") in ("1", "true")
    try:
        checked = check_forwarded(settings)
    except SettingRefused as exc:
        return exc.message
    client, query_id = body.get("client"), body.get("query_id")
    for name, value, limit in (("client", client, MAX_CLIENT_CHARS), ("query_id", query_id, MAX_QUERY_ID_CHARS)):
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            return f"{name} must be text of at most {limit} characters"
    if query_id is not None and not QUERY_ID.fullmatch(query_id):
        return QUERY_ID_RULE
    clickhouse = is_ch_format(fmt)
    if checked and not clickhouse:
        return "settings are taken with a ClickHouse format only (the ClickHouse-compatible endpoint)"
    return Extras(fmt, clickhouse, checked, buffered and clickhouse, client, query_id)


def ch_stream(client: Client, sql: str, database: str, limits: SqlLimits, stats: QueryStats, tag: str,
              extras: Extras, params: Mapping[str, str] | None = None) -> Iterator[bytes]:
    """A query of the ClickHouse endpoint: its FORMAT taken off (the format of `extras` set from it), prepared
    as every analyst query is, run in ClickHouse's own encoding."""
    text, named = take_format(client, sql)
    if named is not None:
        extras.format = named
    text, own = take_settings(client, text)
    settings = {**extras.settings, **own}  # the query's own win, as in ClickHouse
    try:
        prepared = prepare(client, text, database, params, system_catalog=True)  # tools browse system.* (ADR 51)
    except AnalystQueryError as exc:
        raise _endpoint_worded(exc) from None
    extras.timezone = settings.get("session_timezone") or server_timezone(client)
    if is_handshake(text, extras.format):
        block = _handshake(client, prepared, extras.timezone, client_revision(settings))
        stats.bytes += len(block)
        yield block
        return
    bounded = bound_rows(client, prepared)
    yield from stream_raw(client, bounded, limits, extras.format, stats, tag, capped_revision(settings), params)


_FORMAT_REFUSED = re.compile(r"^FORMAT clauses are not allowed")


def _endpoint_worded(exc: AnalystQueryError) -> AnalystQueryError:
    """A refusal worded for the ClickHouse endpoint where `prepare`'s words are /api/v1/sql's."""
    if exc.code == "refused" and _FORMAT_REFUSED.match(exc.message):
        return AnalystQueryError("refused", "a FORMAT clause is taken only as the last clause of the query (after "
                                            "any SETTINGS), naming one of the formats this endpoint serves (docs/"
                                            "clickhouse-http.md); or send default_format= or X-ClickHouse-Format",
                                 _UNKNOWN_FORMAT)
    return exc


def _handshake(client: Client, prepared: str, timezone: str, revision: int) -> bytes:
    """clickhouse-go's handshake answered by the endpoint itself (olap/ch_native.py)."""
    try:
        rows = client.query(prepared).result_rows
    except ClickHouseError as exc:
        raise _classify(exc) from None
    display, version = (str(rows[0][0]), str(rows[0][1])) if rows else ("tally", "")
    return handshake_block(display, version, timezone, revision)


def bound_rows(client: Client, prepared: str) -> str:
    """`prepared` as run so that max_result_rows holds: ClickHouse applies it to a plain SELECT's result but not
    to a UNION / EXCEPT / INTERSECT's (chDB 26.9), so a statement of more than one SELECT runs as
    `SELECT * FROM (<it>)`, same columns, names, types and rows. The wrapped text is parsed again and must
    format back to exactly itself with the checked text inside, so nothing but the wrapping changed."""
    try:
        tree = json.loads(client.query("SELECT parseQueryToJSON({q:String})",
                                       parameters={"q": prepared}).result_rows[0][0])
    except (ClickHouseError, IndexError, ValueError):
        return prepared  # not a SELECT statement (prepare has checked what it is)
    if not isinstance(tree, dict) or tree.get("type") != "SelectWithUnionQuery":
        return prepared  # EXPLAIN and the like: one answer of their own
    children = (tree.get("list_of_selects") or {}).get("children") or []
    if len(children) == 1 and isinstance(children[0], dict) and children[0].get("type") == "SelectQuery":
        return prepared
    wrapped = f"SELECT * FROM ({prepared})"
    try:
        same = client.query("SELECT formatQuerySingleLine({w:String}) = {w:String}",
                            parameters={"w": wrapped}).result_rows[0][0]
    except (ClickHouseError, IndexError):
        same = False
    if not same:
        raise AnalystQueryError("refused", "this set operation (UNION, EXCEPT, INTERSECT) cannot be bounded by the "
                                           "row limit as written; wrap it as SELECT * FROM (...)")
    return wrapped


def answer_headers(extras: Extras, stats: QueryStats, elapsed_s: float | None) -> dict[str, str]:
    """ClickHouse's response headers for an answer of the endpoint (`elapsed_s` once it is complete)."""
    # Only what is known: ClickHouse's encodings are not counted in rows, and what was read is not reported by
    # the raw stream; a streamed answer's size and time are not known when its headers go out.
    summary: dict[str, str] = {}
    if elapsed_s is not None:
        summary |= {"result_bytes": str(stats.bytes), "elapsed_ns": str(round(elapsed_s * 1e9))}
    headers = {"X-ClickHouse-Format": extras.format, "X-ClickHouse-Timezone": extras.timezone,
               "X-ClickHouse-Summary": json.dumps(summary, separators=(",", ":"))}
    if extras.query_id:
        headers["X-ClickHouse-Query-Id"] = extras.query_id
    return headers
