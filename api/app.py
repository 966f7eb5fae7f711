"""The query API: customer rollups from PostgreSQL, analyst SQL relayed to the analyst server, the dashboard.

This process holds no ClickHouse client: analyst SQL runs in `tally analyst-server` (ADR 10), so
nothing here ever waits on ClickHouse but the one thread relaying an analyst's own answer."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from flask import Blueprint, Flask, Response, current_app, redirect, render_template, request

from api.analyst_proxy import AnalystService, AnalystUnavailable
from api.auth import allow, current_principal, install_auth, probe, public
from core.config import Settings
from core.event import EVENT_TYPES, EventError, normalize_domain
from core.http import error, install_host_check, install_json_errors, json_response
from core.runstate import down_components
from oltp import tokens
from oltp.ingestion import ingestion_status
from oltp.queries import GRANULARITIES, Bucket, OutsideRetention, QueryError, RollupReader, SiteRow, Totals

bp = Blueprint("api", __name__)


@dataclass(frozen=True, slots=True)
class Backends:
    rollups: RollupReader
    analyst: AnalystService


def _backends() -> Backends:
    return current_app.extensions["tally_backends"]


def _parse_time(name: str, value: str | None, default: datetime) -> datetime:
    if value is None or value == "":
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"'{name}' is not an ISO-8601 time: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise QueryError(f"'{name}' must carry a UTC offset, e.g. 2026-01-01T00:00:00Z")
    if not 1970 <= parsed.year <= 9000:
        raise QueryError(f"'{name}' must be between the years 1970 and 9000")
    return parsed.astimezone(UTC)


def _tz_arg(args) -> ZoneInfo | Response:
    try:
        return ZoneInfo(args.get("tz", "UTC"))
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: 'America' is a directory, names too long
        return error(400, "invalid_tz", f"unknown time zone {args.get('tz', '')[:64]!r}")


def _domain_arg(domain: str) -> str | Response:
    try:
        return normalize_domain(domain)
    except EventError as exc:
        return error(400, "invalid_domain", str(exc))


def _decimal(value: Decimal | None) -> str | None:
    return None if value is None else f"{value:.6f}"


def _totals_json(t: Totals) -> dict[str, Any]:
    return {"total": t.events, "valued": t.valued, "value_sum": _decimal(t.value_sum),
            "value_avg": _decimal(t.value_avg)}


def _collector_url() -> str:
    """Where pages send their hits: the host this API was reached on, with the collector's port."""
    host = request.host
    if host.startswith("["):
        name = host[: host.index("]") + 1] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return f"{request.scheme}://{name}:{current_app.config['TALLY'].collector_port}"


def _tag(row: SiteRow) -> str:
    """The page tag for a site, with its URL rule so the tag keeps what the collector keeps (ADR 30)."""
    attrs = (' data-raw-urls="true"' if row.raw_urls
             else f' data-keep-query="{",".join(row.keep_query)}"' if row.keep_query else "")
    return f'<script defer src="{_collector_url()}/tag.js" data-site="{row.site_key}"{attrs}></script>'


@bp.get("/api/v1/domains")
@allow("admin", "analyst", "customer")
def list_domains() -> Response:
    """The domains the caller may read: a customer token's own, every registered site for admins and analysts.
    ---
    get:
      summary: List the caller's domains
      description: >
        Customers get the domains their token lists (registered or not); admins and analysts get every
        registered site. Each registered domain carries its site key and the page tag to install; the
        collector URL is the host this API was reached on with the collector's port (TALLY_COLLECTOR_PORT).
      tags: [customers]
      responses:
        200:
          description: the domains
          content:
            application/json:
              schema: {$ref: '#/components/schemas/DomainList'}
    """
    principal = current_principal()
    assert principal is not None
    reader = _backends().rollups
    try:
        if principal.role == "customer":
            found = {row.domain: row for row in reader.sites(list(principal.domains))}
            rows = [found.get(d) or SiteRow(d, "UTC", "", reader.has_events(d)) for d in principal.domains]
        else:
            rows = reader.sites()
    except psycopg.OperationalError:
        return error(503, "store_unavailable", "PostgreSQL is unavailable; retry shortly")
    return json_response({
        "role": principal.role,
        "collector_url": _collector_url(),
        "domains": [{"domain": r.domain, "tz": r.tz, "registered": bool(r.site_key),
                     "site_key": r.site_key or None, "tag": _tag(r) if r.site_key else None,
                     "has_events": r.has_events} for r in rows],
    })


SUMMARY_PERIODS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}


@bp.get("/api/v1/domains/<domain>/summary")
@allow("admin", "analyst", "customer", domain_arg="domain")
def domain_summary(domain: str) -> Response:
    """Totals of the last hour, day or week, with the previous period of the same length.
    ---
    get:
      summary: Totals and the change from the previous period
      description: >
        The period is made of whole UTC quarter hours (the 15-minute tier) and ends with the quarter hour
        holding `as_of`, which is still filling: it counts what has arrived so far. The previous period
        is the same number of quarter hours just before, all complete. `change_pct` is
        (total - previous_total) / previous_total * 100, null when the previous total is 0.
      tags: [customers]
      parameters:
        - {name: last, in: query, required: false, schema: {type: string, enum: ['1h', '24h', '7d'], default: '24h'}}
      responses:
        200:
          description: the summary
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Summary'}
    """
    domain = _domain_arg(domain)
    if isinstance(domain, Response):
        return domain
    unknown = sorted(set(request.args) - {"last"})
    if unknown:
        return error(400, "unknown_parameter", f"unknown query parameter {unknown[0]!r}")
    last = request.args.get("last", "24h")
    if last not in SUMMARY_PERIODS:
        return error(400, "invalid_period", f"last must be one of {', '.join(SUMMARY_PERIODS)}")
    try:
        summary = _backends().rollups.summary(domain, SUMMARY_PERIODS[last], datetime.now(UTC))
    except OutsideRetention as exc:
        return error(400, "outside_retention", str(exc), tier=exc.tier, retention_days=exc.retention_days,
                     retained_from=exc.retained_from.isoformat(), alternatives=exc.alternatives)
    except psycopg.OperationalError:
        return error(503, "store_unavailable", "PostgreSQL is unavailable; retry shortly")
    w = summary.window
    metrics = {}
    for event_type in EVENT_TYPES:
        cur, prev = summary.current[event_type], summary.previous[event_type]
        change = None if prev.events == 0 else round((cur.events - prev.events) / prev.events * 100, 2)
        metrics[f"{event_type}s"] = {**_totals_json(cur), "previous_total": prev.events,
                                     "previous_value_sum": _decimal(prev.value_sum), "change_pct": change}
    return json_response({
        "domain": domain, "last": last, "tier": "15m", "from": w.start.isoformat(), "to": w.end.isoformat(),
        "as_of": w.as_of.isoformat(), "partial_bucket_start": w.partial_start.isoformat(),
        "previous_from": w.previous_start.isoformat(), "previous_to": w.start.isoformat(),
        "metrics": metrics,
    })


@bp.get("/api/v1/domains/<domain>/status")
@allow("admin", "analyst", "customer", domain_arg="domain")
def domain_status(domain: str) -> Response:
    """Ingestion status: what arrived, what the collectors refused and why, and how fresh each store is.
    ---
    get:
      summary: Ingestion status (accepted, refused by reason, bots, late, last event, freshness)
      description: >
        For the last hour and the last 24 hours, by the UTC quarter hour events arrived in (the current one
        included): events accepted, events the collectors refused by reason, bots, late events (arrived more
        than 5 minutes after their quarter hour); when the newest event arrived; when each store was last
        written. Tells "no traffic" from "the tag is broken": refusals show why events did not count.
      tags: [customers]
      responses:
        200:
          description: the status
          content:
            application/json:
              schema: {$ref: '#/components/schemas/IngestionStatus'}
    """
    domain = _domain_arg(domain)
    if isinstance(domain, Response):
        return domain
    if request.args:
        return error(400, "unknown_parameter", f"unknown query parameter {sorted(request.args)[0]!r}")
    now = datetime.now(UTC)
    backends = _backends()
    try:
        status = ingestion_status(backends.rollups.pool, domain, now)
    except psycopg.OperationalError:
        return error(503, "store_unavailable", "PostgreSQL is unavailable; retry shortly")
    iso = lambda t: t.isoformat() if t is not None else None  # noqa: E731
    return json_response({
        "domain": domain, "as_of": now.isoformat(),
        "periods": {name: {"since": p.since.isoformat(), "accepted": p.accepted, "refused": p.refused,
                           "refused_total": sum(p.refused.values()), "bots": p.bots, "late": p.late}
                    for name, p in status.periods.items()},
        "last_event_at": iso(status.last_event_at),
        "freshness": {"customer_store_written_at": iso(status.customer_store_written_at),
                      "analyst_store_written_at": backends.analyst.loader_written_at()},
    })


SERIES_FORMATS = ("json", "csv")
CSV_COLUMNS = ("start", "end", "count", "valued", "value_sum", "length_s")


@bp.get("/api/v1/domains/<domain>/<metric>")
@allow("admin", "analyst", "customer", domain_arg="domain")
def domain_series(domain: str, metric: str) -> Response:
    """Every bucket of a range, zero-filled, in a time zone (docs/adr/0012-bucket-rule.md).
    ---
    get:
      summary: Impressions or page views per bucket
      description: >
        Buckets start at local bucket boundaries of `tz` (days follow DST); a bucket whose length differs
        from the nominal one (a 23- or 25-hour day, a Lord Howe half hour) carries `length_s`. `value_sum`
        and `valued` sum the values of the events that carried one. `?format=csv` answers text/csv with a
        header row (start, end, count, valued, value_sum, length_s) and one row per bucket. `tier` (the
        `X-Tally-Tier` header for CSV) names the rollup tier that served the answer: the coarsest that aligns
        exactly with the buckets (1d: daily buckets in the site's registered zone; 1h: every boundary a UTC
        whole hour; else 15m) and still keeps the range; the numbers are the same whichever serves. A range
        no aligned tier keeps any more (TALLY_RETENTION_15M/1H/1D_DAYS) is refused with 400
        `outside_retention`, naming the retention and the granularities that can answer.
      tags: [customers]
      parameters:
        - {name: metric, in: path, required: true, schema: {type: string, enum: [impressions, pageviews]}}
        - {name: from, in: query, required: false, description: 'ISO-8601 with offset; default: 24 hours before to',
           schema: {type: string, format: date-time}}
        - {name: to, in: query, required: false, description: 'ISO-8601 with offset; default: now',
           schema: {type: string, format: date-time}}
        - {name: granularity, in: query, required: false,
           schema: {type: string, enum: ['15m', '1h', '1d'], default: '15m'}}
        - {name: tz, in: query, required: false, description: IANA time zone name, schema: {type: string, default: UTC}}
        - {name: format, in: query, required: false, schema: {type: string, enum: [json, csv], default: json}}
      responses:
        200:
          description: the series
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Series'}
            text/csv:
              schema: {type: string}
        400:
          description: >
            a bad parameter or range (`invalid_range`, ...), or `outside_retention`: no tier that aligns with these
            buckets still keeps the range; the error also has `tier`, `retention_days`, `retained_from` and
            `alternatives` (granularities that can answer it)
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
        404:
          description: unknown metric
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
    """
    metrics = {f"{t}s": t for t in EVENT_TYPES}  # impressions, pageviews
    if metric not in metrics:
        return error(404, "unknown_metric", f"metric must be one of {', '.join(sorted(metrics))}")
    domain = _domain_arg(domain)
    if isinstance(domain, Response):
        return domain
    args = request.args
    unknown = sorted(set(args) - {"from", "to", "granularity", "tz", "format"})
    if unknown:
        return error(400, "unknown_parameter", f"unknown query parameter {unknown[0]!r}")
    fmt = args.get("format", "json")
    if fmt not in SERIES_FORMATS:
        return error(400, "invalid_format", f"format must be one of {', '.join(SERIES_FORMATS)}")
    granularity = args.get("granularity", "15m")
    if granularity not in GRANULARITIES:
        return error(400, "invalid_granularity", f"granularity must be one of {', '.join(GRANULARITIES)}")
    tz = _tz_arg(args)
    if isinstance(tz, Response):
        return tz
    now = datetime.now(UTC)
    try:
        end = _parse_time("to", args.get("to"), now)
        start = _parse_time("from", args.get("from"), end - timedelta(hours=24))
        served = _backends().rollups.serve(domain, metrics[metric], start, end, granularity, tz)
    except OutsideRetention as exc:
        return error(400, "outside_retention", str(exc), tier=exc.tier, retention_days=exc.retention_days,
                     retained_from=exc.retained_from.isoformat(), alternatives=exc.alternatives)
    except QueryError as exc:
        return error(400, "invalid_range", str(exc))
    except psycopg.OperationalError:
        return error(503, "store_unavailable", "PostgreSQL is unavailable; retry shortly")
    buckets = served.buckets
    if fmt == "csv":
        resp = _series_csv(domain, metric, granularity, tz, buckets)
        resp.headers["X-Tally-Tier"] = served.tier
        return resp
    valued = sum(b.valued for b in buckets)
    value_sum = sum((b.value_sum for b in buckets), Decimal("0.000000"))
    return json_response({
        "domain": domain,
        "metric": metric,
        "granularity": granularity,
        "tz": tz.key,
        "tier": served.tier,
        "from": start.isoformat(),
        "to": end.isoformat(),
        **_totals_json(Totals(sum(b.count for b in buckets), valued, value_sum)),
        "buckets": [_bucket_json(b, tz) for b in buckets],
    })


def _bucket_json(b: Bucket, tz: ZoneInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"start": b.start.astimezone(tz).isoformat(),
                           "end": b.end.astimezone(tz).isoformat() if b.end else None,
                           "count": b.count, "valued": b.valued, "value_sum": _decimal(b.value_sum)}
    if b.length_s is not None:
        out["length_s"] = b.length_s
    return out


def _series_csv(domain: str, metric: str, granularity: str, tz: ZoneInfo, buckets: list[Bucket]) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for b in buckets:
        row = _bucket_json(b, tz)
        writer.writerow([row["start"], row["end"], row["count"], row["valued"], row["value_sum"],
                         row.get("length_s", "")])
    resp = Response(out.getvalue(), mimetype="text/csv")
    resp.headers["Content-Disposition"] = f'attachment; filename="{domain}-{metric}-{granularity}.csv"'
    return resp


@bp.post("/api/v1/sql")
@allow("admin", "analyst")
def analyst_sql() -> Response:
    """Relay one analyst query to the analyst server; `?format=` (or Accept) picks json, csv, tsv or jsonl.
    ---
    post:
      summary: Run one read-only analyst SELECT over tally.events (ClickHouse)
      tags: [analysts]
      parameters:
        - {name: format, in: query, required: false, schema: {type: string, enum: [json, csv, tsv, jsonl]}}
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: '#/components/schemas/SqlRequest'}
      responses:
        200:
          description: the result; csv, tsv and jsonl stream
          content:
            application/json:
              schema: {$ref: '#/components/schemas/SqlResult'}
            text/csv: {schema: {type: string}}
            text/tab-separated-values: {schema: {type: string}}
            application/x-ndjson: {schema: {type: string}}
    """
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or set(body) - {"sql"} or not isinstance(body.get("sql"), str):
        return error(400, "invalid_body", 'send a JSON object {"sql": "SELECT ..."}')
    fmt = _result_format()
    if fmt is None:
        return error(400, "invalid_format", f"format must be one of {', '.join(RESULT_FORMATS)} "
                     "(?format=csv, or an Accept header naming one)")
    principal = current_principal()
    try:
        upstream = _backends().analyst.query(body["sql"], fmt, principal.token_id if principal else None)
    except AnalystUnavailable:
        resp = error(503, "analyst_unavailable", "the analyst server is unavailable; retry shortly")
        resp.headers["Retry-After"] = "5"
        return resp
    resp = Response(upstream.body, status=upstream.status, content_type=upstream.content_type)
    if upstream.retry_after:
        resp.headers["Retry-After"] = upstream.retry_after
    return resp


RESULT_FORMATS = {"json": "application/json", "csv": "text/csv", "tsv": "text/tab-separated-values",
                  "jsonl": "application/x-ndjson"}


def _result_format() -> str | None:
    """`?format=` wins; else the first Accept type we serve; else json."""
    if "format" in request.args:
        fmt = request.args["format"].lower()
        return fmt if fmt in RESULT_FORMATS else None
    by_type = {mime: name for name, mime in RESULT_FORMATS.items()}
    by_type["application/jsonl"] = "jsonl"
    for mime, _quality in request.accept_mimetypes:
        if mime in by_type:
            return by_type[mime]
    return "json"


# --- the dashboard: login, logout, the page ------------------------------------------------------

# The pages load scripts and styles from this origin only (uPlot is vendored under /static/vendor).
_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _page(html: str, status: int = 200) -> Response:
    resp = Response(html, status=status, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = _PAGE_CSP
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    return resp


def _session_principal():
    """The dashboard session's principal on a public page (None: not logged in)."""
    from api import session

    if not session.has_cookie(request):
        return None
    return session.principal(lambda: _backends().rollups.pool)


def _domain_hint() -> str:
    value = request.values.get("domain", "")
    try:
        return normalize_domain(value) if value else ""
    except EventError:
        return ""


def _login_page(message: str = "", status: int = 200) -> Response:
    return _page(render_template("login.html", message=message, domain=_domain_hint()), status)


@bp.get("/")
@public
def dashboard() -> Response:
    """The dashboard, or the login form when this browser has no valid session.
    ---
    get:
      summary: The dashboard page (HTML)
      tags: [dashboard]
      parameters:
        - {name: domain, in: query, required: false, schema: {type: string}}
      responses:
        200:
          description: the dashboard, or the login form
          content: {text/html: {schema: {type: string}}}
    """
    try:
        principal = _session_principal()
    except psycopg.OperationalError:
        return _login_page("PostgreSQL is unavailable; retry shortly", 503)
    if principal is None:
        return _login_page()
    return _page(render_template("dashboard.html", role=principal.role, token_id=principal.token_id))


def _same_origin_form() -> bool:
    """A login or logout form posted from this origin (login CSRF: a cross-site page must not log you in,
    nor out)."""
    from api import session

    return session.same_origin(request)


@bp.get("/login")
@public
def login_form() -> Response:
    """The login form.
    ---
    get:
      summary: The login page (HTML)
      tags: [dashboard]
      parameters:
        - {name: domain, in: query, required: false, schema: {type: string}}
      responses:
        200:
          description: the login form
          content: {text/html: {schema: {type: string}}}
        303:
          description: this browser is already logged in; redirects to the dashboard
          headers:
            Location: {schema: {type: string}}
    """
    try:
        logged_in = _session_principal() is not None
    except psycopg.OperationalError:
        logged_in = False
    if logged_in:
        domain = _domain_hint()
        return redirect(f"/?domain={domain}" if domain else "/", 303)
    return _login_page()


@bp.post("/login")
@public
def login() -> Response:
    """Check a pasted token and start a session: a row in PostgreSQL, its random id in the cookie (api/session.py).
    ---
    post:
      summary: Log in with an API token (sets the HttpOnly, SameSite=Strict session cookie)
      tags: [dashboard]
      requestBody:
        required: true
        content:
          application/x-www-form-urlencoded:
            schema:
              type: object
              properties:
                token: {type: string}
                domain: {type: string}
              required: [token]
      responses:
        303:
          description: logged in; redirects to the dashboard
          headers:
            Location: {schema: {type: string}}
            Set-Cookie: {schema: {type: string}}
        401:
          description: unknown, malformed or revoked token (the login form again)
          content: {text/html: {schema: {type: string}}}
        403:
          description: the form was posted from another site
          content: {text/html: {schema: {type: string}}}
    """
    from api import session

    if not _same_origin_form():
        return _login_page("log in from this site's own login page", 403)
    token = request.form.get("token", "").strip()
    try:
        principal = tokens.verify(_backends().rollups.pool, token) if token else None
        if principal is not None and not session.start(_backends().rollups.pool, principal):
            principal = None  # revoked in between
    except psycopg.OperationalError:
        return _login_page("PostgreSQL is unavailable; retry shortly", 503)
    if principal is None:
        return _login_page("that token is unknown, malformed or revoked", 401)
    domain = _domain_hint()
    return redirect(f"/?domain={domain}" if domain else "/", 303)


@bp.post("/logout")
@public
def logout() -> Response:
    """End this browser's session on the server (a copy of the cookie stops working too) and clear the cookie.
    ---
    post:
      summary: Log out (ends the session server-side, clears the session cookie)
      tags: [dashboard]
      responses:
        303:
          description: logged out; redirects to the login page
          headers:
            Location: {schema: {type: string}}
        403:
          description: the form was posted from another site; the session goes on
          content: {text/html: {schema: {type: string}}}
        503:
          description: PostgreSQL is unavailable; the session was not ended (retry)
          content: {text/html: {schema: {type: string}}}
    """
    from api import session

    if not _same_origin_form():
        return _login_page("log out from this site's own pages", 403)
    try:
        session.end(_backends().rollups.pool)
    except psycopg.OperationalError:
        return _login_page("PostgreSQL is unavailable, so the session was not ended; retry", 503)
    return redirect("/login", 303)


@bp.get("/healthz")
@probe
def healthz() -> Response:
    """Liveness probe.
    ---
    get:
      summary: Health probe (no token, no rate limit)
      tags: [operations]
      responses:
        200:
          description: the process answers
          content:
            application/json:
              schema:
                type: object
                properties: {status: {type: string, const: ok}}
                required: [status]
    """
    return json_response({"status": "ok"})


@bp.get("/readyz")
@probe
def readyz() -> Response:
    """Readiness probe: PostgreSQL answers (the API's store for rollups and tokens). Under `tally up`, `down`
    also names the platform's parts its supervisor reports down (restarting with backoff): they do not make
    the API unready, it serves without them.
    ---
    get:
      summary: Readiness probe (no token, no rate limit)
      tags: [operations]
      responses:
        200:
          description: the API can serve (`down`, under `tally up`, lists other parts that are down)
          content:
            application/json:
              schema:
                type: object
                properties:
                  status: {type: string, const: ready}
                  down: {type: object, additionalProperties: {type: string}}
                required: [status]
        503:
          description: PostgreSQL is unreachable (the JSON error shape, code `not_ready`)
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
    """
    try:
        with _backends().rollups.pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return error(503, "not_ready", f"PostgreSQL is unreachable ({type(exc).__name__})")
    down = down_components(current_app.config["TALLY"].home)
    return json_response({"status": "ready", "down": down} if down else {"status": "ready"})


@bp.get("/api/v1/openapi.json")
@public
def openapi_document() -> Response:
    """This API's OpenAPI 3.1 document, generated from the routes.
    ---
    get:
      summary: The OpenAPI 3.1 document (public, no token needed)
      tags: [operations]
      responses:
        200:
          description: the document
          content: {application/json: {schema: {type: object}}}
    """
    from api.openapi import spec_for

    return json_response(spec_for(current_app))


def create_app(settings: Settings, backends: Backends) -> Flask:
    from api.session import install_sessions

    app = Flask(__name__)
    app.config["TALLY"] = settings
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.extensions["tally_backends"] = backends
    if not settings.secret:
        raise ValueError("the API needs TALLY_SECRET (it keys the dashboard's session cookies)")
    install_sessions(app, settings.secret)
    install_host_check(app, settings.allowed_hosts)
    # Tokens live in PostgreSQL next to the rollups: the API reads them through the same pool.
    install_auth(app, lambda: backends.rollups.pool, settings.api_rate_limit)
    app.register_blueprint(bp)
    from api.metrics import install as install_metrics

    install_metrics(app)  # GET /metrics (allowlisted networks) and requests by route and status
    install_json_errors(app)
    return app
