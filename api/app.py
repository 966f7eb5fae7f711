"""The query API: customer rollups from PostgreSQL, analyst SQL relayed to the analyst server, the dashboard.

This process holds no ClickHouse client: analyst SQL runs in `tally analyst-server` (ADR 10), so
nothing here ever waits on ClickHouse but the one thread relaying an analyst's own answer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from flask import Blueprint, Flask, Response, current_app, render_template, request

from api.analyst_proxy import AnalystService, AnalystUnavailable
from oltp.queries import GRANULARITIES, QueryError, RollupReader
from core.event import EVENT_TYPES, EventError, normalize_domain
from core.config import Settings
from core.http import error, install_host_check, install_json_errors, json_response
from api.auth import allow, current_principal, install_auth, probe, public

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
    return parsed.astimezone(timezone.utc)


@bp.get("/api/v1/domains/<domain>/<metric>")
@allow("admin", "analyst", "customer", domain_arg="domain")
def domain_series(domain: str, metric: str) -> Response:
    metrics = {f"{t}s": t for t in EVENT_TYPES}  # impressions, pageviews
    if metric not in metrics:
        return error(404, "unknown_metric", f"metric must be one of {', '.join(sorted(metrics))}")
    try:
        domain = normalize_domain(domain)
    except EventError as exc:
        return error(400, "invalid_domain", str(exc))
    args = request.args
    unknown = sorted(set(args) - {"from", "to", "granularity", "tz"})
    if unknown:
        return error(400, "unknown_parameter", f"unknown query parameter {unknown[0]!r}")
    granularity = args.get("granularity", "15m")
    if granularity not in GRANULARITIES:
        return error(400, "invalid_granularity", f"granularity must be one of {', '.join(GRANULARITIES)}")
    try:
        tz = ZoneInfo(args.get("tz", "UTC"))
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: 'America' is a directory, names too long
        return error(400, "invalid_tz", f"unknown time zone {args.get('tz', '')[:64]!r}")
    now = datetime.now(timezone.utc)
    try:
        end = _parse_time("to", args.get("to"), now)
        start = _parse_time("from", args.get("from"), end - timedelta(hours=24))
        buckets = _backends().rollups.series(domain, metrics[metric], start, end, granularity, tz)
    except QueryError as exc:
        return error(400, "invalid_range", str(exc))
    except psycopg.OperationalError:
        return error(503, "store_unavailable", "PostgreSQL is unavailable; retry shortly")
    return json_response({
        "domain": domain,
        "metric": metric,
        "granularity": granularity,
        "tz": tz.key,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "total": sum(b.count for b in buckets),
        "buckets": [{"start": b.start.astimezone(tz).isoformat(), "count": b.count} for b in buckets],
    })


@bp.post("/api/v1/sql")
@allow("admin", "analyst")
def analyst_sql() -> Response:
    """Relay one analyst query to the analyst server; `?format=` (or Accept) picks json, csv, tsv or jsonl."""
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


@bp.get("/")
@public
def dashboard() -> str:
    return render_template("dashboard.html")


@bp.get("/healthz")
@probe
def healthz() -> Response:
    return json_response({"status": "ok"})


def create_app(settings: Settings, backends: Backends) -> Flask:
    app = Flask(__name__)
    app.config["TALLY"] = settings
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.extensions["tally_backends"] = backends
    install_host_check(app, settings.allowed_hosts)
    # Tokens live in PostgreSQL next to the rollups: the API reads them through the same pool.
    install_auth(app, lambda: backends.rollups.pool, settings.api_rate_limit)
    app.register_blueprint(bp)
    install_json_errors(app)
    return app
