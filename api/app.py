"""The query API: customer rollups from PostgreSQL, analyst SQL on ClickHouse, and the dashboard."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from flask import Blueprint, Flask, Response, current_app, render_template, request

from olap.analyst import AnalystQueryError, SqlLimits, run_query
from oltp.queries import GRANULARITIES, QueryError, RollupReader
from core.event import EVENT_TYPES, EventError, normalize_domain
from core.config import Settings
from core.http import error, install_host_check, install_json_errors, json_response

bp = Blueprint("api", __name__)


@dataclass(frozen=True, slots=True)
class Backends:
    rollups: RollupReader
    clickhouse: Any  # clickhouse_connect Client
    sql_limits: SqlLimits


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
def analyst_sql() -> Response:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or set(body) - {"sql"}:
        return error(400, "invalid_body", 'send a JSON object {"sql": "SELECT ..."}')
    backends = _backends()
    try:
        result = run_query(backends.clickhouse, body.get("sql"), backends.sql_limits)
    except AnalystQueryError as exc:
        return error(400, "query_failed", str(exc))
    return json_response({"columns": result.columns, "types": result.types, "rows": result.rows,
                          "row_count": len(result.rows)})


@bp.get("/")
def dashboard() -> str:
    return render_template("dashboard.html")


@bp.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})


def create_app(settings: Settings, backends: Backends) -> Flask:
    app = Flask(__name__)
    app.config["TALLY"] = settings
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.extensions["tally_backends"] = backends
    install_host_check(app, settings.allowed_hosts)
    app.register_blueprint(bp)
    install_json_errors(app)
    return app
