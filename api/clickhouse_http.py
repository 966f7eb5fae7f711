"""The ClickHouse-compatible HTTP endpoint: analyst SQL for ClickHouse's own tools (ADR 50).

A Flask app of the API tier, served by `tally clickhouse-http` on TALLY_CLICKHOUSE_HTTP_PORT at `/`, as a
ClickHouse server is (clickhouse-connect, Grafana, DBeaver, the Node client and curl expect it there).
Stateless: it holds no ClickHouse client and relays every query to the analyst server exactly as
`/api/v1/sql` does (api/analyst_proxy.py): same allowlist, limits, slots (429), watchdog and audit log,
with the format, the harmless settings, the client's User-Agent and the query id added.

Routes: `GET|POST /` (a query; a bare `GET /` answers `Ok.` as ClickHouse does), `GET /ping` (`Ok.`).
What a request may carry: api/clickhouse_http_request.py; what is answered: api/clickhouse_http_answer.py;
the settings allowlist: olap/ch_settings.py; the formats: olap/ch_formats.py; docs/clickhouse-http.md.

Rate limit: TALLY_API_RATE_LIMIT per token (per client address for requests without a valid one), as the
API's, so guessing tokens is throttled too; answered 429 with code 202 and Retry-After.
"""

from __future__ import annotations

import math
import time

from flask import Flask, Response, current_app, g, request
from flask_limiter import Limiter, RateLimitExceeded, RequestLimit
from psycopg_pool import ConnectionPool
from werkzeug.exceptions import HTTPException

from api.analyst_proxy import AnalystService, AnalystUnavailable
from api.clickhouse_http_answer import DISPLAY_NAME, VERSION, ChError, error_response, relay, upstream_error
from api.clickhouse_http_request import MAX_CLIENT_CHARS, authenticate, read_request
from core.config import Settings
from core.http import host_allowed
from olap.ch_errors import exception_text
from olap.ch_formats import DEFAULT_FORMAT
from olap.ch_settings import QUERY_ID
from oltp.audit import record_refusal
from oltp.tokens import Principal

OK = "Ok.\n"
_EXTENSION = "tally_clickhouse_http"


def create_clickhouse_app(settings: Settings, pool: ConnectionPool, analyst: AnalystService) -> Flask:
    """The endpoint's app: tokens are read from `pool` (PostgreSQL), queries relayed to `analyst`."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.extensions[_EXTENSION] = (settings, pool, analyst)
    app.before_request(lambda: _host_check(settings.allowed_hosts))
    _install_rate_limit(app, settings.api_rate_limit)
    app.add_url_rule("/", "query", _query, methods=["GET", "POST"])
    app.add_url_rule("/ping", "ping", _ping, methods=["GET"])
    app.register_error_handler(ChError, lambda exc: error_response(exc, g.get("ch_query_id")))
    app.register_error_handler(HTTPException, _http_error)
    return app


def _backends() -> tuple[Settings, ConnectionPool, AnalystService]:
    found: tuple[Settings, ConnectionPool, AnalystService] = current_app.extensions[_EXTENSION]
    return found


def _ok() -> Response:
    return Response(OK, status=200, content_type="text/html; charset=UTF-8",
                    headers={"X-ClickHouse-Server-Display-Name": DISPLAY_NAME})


def _ping() -> Response:
    return _ok()


def _is_probe() -> bool:
    """`/ping` and a bare `GET /`: no token, no rate limit (load balancers and health checks)."""
    return request.path == "/ping" or (request.method in ("GET", "HEAD") and request.path == "/"
                                       and not request.args and not request.content_length)


def _query() -> Response:
    if _is_probe():
        return _ok()
    settings, pool, analyst = _backends()
    try:
        principal = _principal(pool)
    except ChError as exc:
        if exc.status == 403:  # a verified token of a role that may not ask: an attempt worth the audit log
            _audit_refusal(pool, exc, exc.token_id)
        raise
    try:
        asked = read_request(request, settings.clickhouse_database)
    except ChError as exc:
        _audit_refusal(pool, exc, principal.token_id)
        raise
    g.ch_query_id = asked.query_id
    try:
        upstream = analyst.query(asked.sql, asked.format, principal.token_id, asked.params or None,
                                 settings=asked.settings, client=asked.client, query_id=asked.query_id)
    except AnalystUnavailable:
        raise ChError(503, 210, "the analyst server is unavailable; retry shortly", "5") from None
    if upstream.status != 200:
        raise upstream_error(upstream)
    return relay(upstream, request.headers.get("Accept-Encoding", ""), asked.compress, asked.zlib_level)


def _audit_refusal(pool: ConnectionPool, exc: ChError, token_id: str | None) -> None:
    """The endpoint's own refusal in the audit log (`tally sql-log`), as the analyst server's are: the query as
    far as it was read, the client, the query id (when it is a valid one). Never a token or a password."""
    query_id = request.args.get("query_id")
    asked_format = request.headers.get("X-ClickHouse-Format") or request.args.get("default_format") or DEFAULT_FORMAT
    record_refusal(pool, sql=exc.sql if exc.sql is not None else request.args.get("query", ""),
                   format=asked_format, error=exception_text(exc.code, exc.message, VERSION).strip(),
                   token_id=token_id, client=(request.headers.get("User-Agent") or "")[:MAX_CLIENT_CHARS] or None,
                   query_id=query_id if query_id and QUERY_ID.fullmatch(query_id) else None)


def _principal(pool: ConnectionPool) -> Principal:
    """This request's verified token (once per request: the rate limiter's key asks for it first)."""
    found: Principal | ChError | None = g.get("ch_principal")
    if found is None:
        try:
            found = authenticate(request, pool)
        except ChError as exc:
            found = exc
        g.ch_principal = found
    if isinstance(found, ChError):
        raise found
    return found


def _host_check(allowed: tuple[str, ...]) -> Response | None:
    if host_allowed(request.host, allowed):
        return None
    return error_response(ChError(400, 36, "this server does not answer to that Host name; its operator can add "
                                           "it to TALLY_ALLOWED_HOSTS"))


def _rate_key() -> str:
    _settings, pool, _analyst = _backends()
    try:
        return f"token:{_principal(pool).token_id}"
    except ChError:
        return f"addr:{request.remote_addr or 'unknown'}"


def _too_many(limit: RequestLimit) -> Response:
    retry_after = max(1, min(limit.limit.get_expiry(), math.ceil(limit.reset_at - time.time())))
    return error_response(ChError(429, 202, f"rate limit exceeded ({limit.limit}); retry in {retry_after} s",
                                  str(retry_after)))


def _install_rate_limit(app: Flask, rate_limit: str) -> None:
    limiter = Limiter(key_func=_rate_key, app=app, application_limits=[rate_limit], storage_uri="memory://",
                      strategy="sliding-window-counter", headers_enabled=False, on_breach=_too_many,
                      key_prefix="tally-clickhouse-http")
    limiter.request_filter(_is_probe)
    app.register_error_handler(RateLimitExceeded, lambda exc: exc.get_response())


def _http_error(exc: HTTPException) -> Response:
    """404, 405, 413 in ClickHouse's shape."""
    status = exc.code or 500
    if status == 404:
        message = f"There is no handle {request.path[:100]}: use / for queries or /ping"
    elif status == 413:
        message = "the request body is larger than 1 MiB"
    else:
        message = exc.description or exc.name or "error"
    refusal = ChError(status, 36 if status < 500 else 1001, message)
    verified = g.get("ch_principal")  # the rate limiter verified the token before the body was read
    if status == 413 and isinstance(verified, Principal):  # padding a body must not hide an attempt from the log
        _audit_refusal(_backends()[1], refusal, verified.token_id)
    return error_response(refusal)
