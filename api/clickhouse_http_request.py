"""Reading a request of the ClickHouse-compatible endpoint (ADR 50): who sends it, and what it asks.

Credentials, by ClickHouse's conventions: HTTP basic auth (any user name; the password is a tally token),
`X-ClickHouse-User` / `X-ClickHouse-Key`, or `Authorization: Bearer <token>`. Analyst and admin tokens
only: a customer token gets 403 (497 ACCESS_DENIED), none or an unknown one 401 (516
AUTHENTICATION_FAILED). A token in the URL (`?password=`) is refused before it is looked at: URLs end up
in access logs and browser histories.

The query is the URL's `query` and the body, joined by a newline (ClickHouse's rule), or a
multipart/form-data body's `query` and `param_<name>` fields; a body with Content-Encoding
(gzip, deflate, zstd, lz4) is decompressed, at most MAX_BODY bytes. The format is the query's own trailing
FORMAT (taken off by the analyst server), else `X-ClickHouse-Format`, else `default_format`, else
TabSeparated. `database` may be the analyst database (or `default`, which tools send when none is set);
any other is refused (81 UNKNOWN_DATABASE). URL settings are checked by olap/ch_settings.py.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from flask import Request
from psycopg_pool import ConnectionPool

from api.clickhouse_http_answer import ChError, decompress_body
from olap.ch_formats import DEFAULT_FORMAT, ch_format_named, unknown_format_message
from olap.ch_settings import QUERY_ID, QUERY_ID_RULE, SettingRefused, split_request_settings
from oltp.tokens import Principal, verify

MAX_BODY = 1024 * 1024  # decompressed; the analyst server refuses a query over 16 KiB with a clear message
MAX_CLIENT_CHARS = 200
MAX_AUDITED_WRITE = 4096  # of a refused write's text, kept in the audit log
_HOW = ("send a tally analyst token as the password of HTTP basic auth (any user name) or in "
        "X-ClickHouse-Key; `tally tokens create --role analyst` makes one")


@dataclass(frozen=True)
class ChRequest:
    """One query request of the endpoint, read and checked."""

    sql: str
    format: str  # the default format, unless the query names its own
    settings: dict[str, str]  # forwarded to ClickHouse (harmless ones only); wait_end_of_query included
    params: dict[str, str]  # param_<name>
    query_id: str
    client: str | None  # the User-Agent
    compress: bool  # enable_http_compression
    zlib_level: int | None


def credentials(request: Request) -> str | None:
    """The token the request carries, or None. Raises ChError for a token in the URL or conflicting ways."""
    if "password" in request.args:
        raise ChError(401, 516, "a token in the URL (?password=) is not accepted: URLs end up in logs; " + _HOW)
    key = request.headers.get("X-ClickHouse-Key")
    header = request.headers.get("Authorization")
    if key is not None and header is not None:
        raise ChError(400, 516, "send the token once: either Authorization or X-ClickHouse-Key, not both")
    if key is not None:
        return key.strip() or None
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() != "basic":
        raise ChError(401, 516, f"the Authorization scheme must be Basic or Bearer; {_HOW}")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ChError(401, 516, f"the Basic credentials are not valid base64 of user:password; {_HOW}") from None
    _user, sep, password = decoded.partition(":")
    return password if sep and password else None


def authenticate(request: Request, pool: ConnectionPool) -> Principal:
    """The verified analyst or admin token of the request, or ChError (401, 403, 503)."""
    token = credentials(request)
    if token is None:
        raise ChError(401, 516, f"Authentication failed: {_HOW}")
    try:
        principal = verify(pool, token)
    except psycopg.Error:
        raise ChError(503, 210, "PostgreSQL is unavailable, so the token cannot be checked; retry shortly",
                      "5") from None
    if principal is None:
        raise ChError(401, 516, f"Authentication failed: the token is unknown, malformed or revoked; {_HOW}")
    if principal.role not in ("admin", "analyst"):
        refused = ChError(403, 497, f"a {principal.role} token may not run analyst SQL; use an analyst token")
        refused.token_id = principal.token_id
        raise refused
    return principal


def read_request(request: Request, database: str) -> ChRequest:
    """The query request, or ChError naming what is wrong with it (with the query, if it was read, as `sql`)."""
    args = {name: values[-1] for name, values in request.args.lists()}
    fields: dict[str, str] = {}
    if request.mimetype == "multipart/form-data":
        if request.files:
            raise ChError(400, 36, "external data (files sent with the query) is not accepted by the analyst "
                                   "endpoint")
        fields = {name: values[-1] for name, values in request.form.lists()}
        if "password" in fields:
            raise ChError(401, 516, "a token in a form field (password) is not accepted; " + _HOW)
        # Form fields are request parameters, as ClickHouse reads them: the same rules as the URL's apply.
        args |= {name: value for name, value in fields.items() if name != "query"}
    sql = _query_text(request, args, fields)
    try:
        return _checked(request, args, database, sql)
    except ChError as exc:
        exc.sql = sql
        raise


def _checked(request: Request, args: dict[str, str], database: str, sql: str) -> ChRequest:
    _check_database(args.get("database") or request.headers.get("X-ClickHouse-Database"), database)
    for name in ("compress", "decompress"):
        if args.get(name, "0") not in ("0", "false"):
            raise ChError(400, 36, f"{name}=1 (ClickHouse's own block compression) is not supported; use HTTP "
                                   "compression: enable_http_compression=1 with Accept-Encoding")
    try:
        settings, params = split_request_settings(args)
    except SettingRefused as exc:
        raise ChError(400, exc.code, exc.message) from None
    if args.get("wait_end_of_query", "0") in ("1", "true"):
        settings["wait_end_of_query"] = "1"
    return ChRequest(sql, _default_format(request, args), settings, params, _query_id(args),
                     (request.headers.get("User-Agent") or "")[:MAX_CLIENT_CHARS] or None,
                     args.get("enable_http_compression", "0") in ("1", "true"), _zlib_level(args))


# Statements that write or change state, named by their first word (after comments and brackets): refused at
# once with READONLY, before a body that may be binary data (an INSERT's rows) is read. Only for the message:
# anything else still has to pass the allowlist, which takes SELECT (and the catalog's SHOW, DESCRIBE, EXISTS).
_WRITE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*(INSERT|CREATE|ALTER|DROP|TRUNCATE|OPTIMIZE|SYSTEM|"
                    r"KILL|SET|USE|RENAME|DETACH|ATTACH|GRANT|REVOKE|DELETE|UPDATE|EXCHANGE|UNDROP|BACKUP|"
                    r"RESTORE|MOVE|REPLACE)\b", re.IGNORECASE | re.DOTALL)
_WHY_NOT = {
    "SET": "the analyst endpoint keeps no session; send a setting as a URL parameter (?name=value) or in the "
           "query's SETTINGS clause (docs/clickhouse-http.md lists those allowed)",
    "USE": "the analyst endpoint keeps no session; send ?database=tally (or X-ClickHouse-Database) or name "
           "tables as tally.<table>",
}


def refuse_writes(sql: str) -> None:
    """ChError 164 READONLY when `sql` starts with a statement that writes or changes state."""
    found = _WRITE.match(sql)
    if found is None:
        return
    word = found.group(1).upper()
    why = _WHY_NOT.get(word, "the analyst endpoint is read-only: SELECT, SHOW, DESCRIBE and EXISTS only")
    raise ChError(400, 164, f"{word} is not allowed: {why}")


def _query_text(request: Request, args: Mapping[str, str], fields: Mapping[str, str]) -> str:
    refuse_writes(args.get("query", ""))
    if fields:
        body = fields.get("query", "")
    else:
        raw = request.get_data(cache=False)
        raw = decompress_body(raw, request.headers.get("Content-Encoding", ""), MAX_BODY)
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ChError(400, 36, "the query must be UTF-8 text") from None
    head = args.get("query", "")
    sql = f"{head}\n{body}" if head and body else head or body
    if not sql.strip():
        raise ChError(400, 62, "Empty query: send it in the URL (?query=) or the body")
    try:
        refuse_writes(sql)
    except ChError as exc:
        exc.sql = sql[:MAX_AUDITED_WRITE]  # the statement, not all of an INSERT's rows
        raise
    return sql


def _check_database(name: str | None, database: str) -> None:
    if name and name not in (database, "default"):
        raise ChError(400, 81, f"Database {name[:64]} does not exist: the analyst endpoint serves the database "
                               f"{database} only")


def _default_format(request: Request, args: Mapping[str, str]) -> str:
    asked = request.headers.get("X-ClickHouse-Format") or args.get("default_format") or DEFAULT_FORMAT
    name = ch_format_named(asked)
    if name is None:
        raise ChError(400, 73, unknown_format_message(asked))
    return name


def _query_id(args: Mapping[str, str]) -> str:
    given = args.get("query_id", "")
    if given and not QUERY_ID.fullmatch(given):
        raise ChError(400, 36, QUERY_ID_RULE)
    return given or str(uuid.uuid4())


def _zlib_level(args: Mapping[str, str]) -> int | None:
    value = args.get("http_zlib_compression_level")
    if value is None:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 9:
        raise ChError(400, 36, "http_zlib_compression_level must be 1 to 9")
    return int(value)
