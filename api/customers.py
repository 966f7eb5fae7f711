"""The customers' JSON API: their domains, a summary, the ingestion status and series per bucket.

Each route reads the rollups in PostgreSQL (oltp/queries.py). Refusals are raised as `ApiError`;
a store that does not answer and a range outside retention are answered by api/errors.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import Blueprint, Response, current_app, request
from werkzeug.datastructures import MultiDict

from api.auth import allow, current_principal
from api.backends import backends
from api.errors import ApiError, install_range_handlers
from core.event import EVENT_TYPES, EventError, normalize_domain
from core.http import json_response
from olap.formats import FORMATS, csv_text
from oltp.ingestion import ingestion_status
from oltp.queries import GRANULARITIES, Bucket, QueryError, Series, SiteRow, Totals

bp = Blueprint("customers", __name__)
install_range_handlers(bp)  # a QueryError here is the caller's range (summary, series): 400 (api/errors.py)


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


def _tz_arg(args: MultiDict[str, str]) -> ZoneInfo:
    try:
        return ZoneInfo(args.get("tz", "UTC"))
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: 'America' is a directory, names too long
        raise ApiError(400, "invalid_tz", f"unknown time zone {args.get('tz', '')[:64]!r}") from None


def _domain_arg(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except EventError as exc:
        raise ApiError(400, "invalid_domain", str(exc)) from None


def _only_parameters(*allowed: str) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise ApiError(400, "unknown_parameter", f"unknown query parameter {unknown[0]!r}")


def _decimal(value: Decimal | None) -> str | None:
    return None if value is None else f"{value:.6f}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


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
    reader = backends().rollups
    if principal.role == "customer":
        found = {row.domain: row for row in reader.sites(list(principal.domains))}
        rows = [found.get(d) or SiteRow(d, "UTC", "", reader.has_events(d)) for d in principal.domains]
    else:
        rows = reader.sites()
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
    _only_parameters("last")
    last = request.args.get("last", "24h")
    if last not in SUMMARY_PERIODS:
        raise ApiError(400, "invalid_period", f"last must be one of {', '.join(SUMMARY_PERIODS)}")
    summary = backends().rollups.summary(domain, SUMMARY_PERIODS[last], datetime.now(UTC))
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
        written. Tells "no traffic" from "the tag is broken": refusals show why events did not count, with
        the most recent offending value of the reasons fixed in the tag (`refused_values`: the domain an
        event named, the page origin), and `origins` lists the site's registered page origins.
      tags: [customers]
      responses:
        200:
          description: the status
          content:
            application/json:
              schema: {$ref: '#/components/schemas/IngestionStatus'}
    """
    domain = _domain_arg(domain)
    _only_parameters()
    now = datetime.now(UTC)
    found = backends()
    status = ingestion_status(found.rollups.pool, domain, now)
    return json_response({
        "domain": domain, "as_of": now.isoformat(),
        "periods": {name: {"since": p.since.isoformat(), "accepted": p.accepted, "refused": p.refused,
                           "refused_total": sum(p.refused.values()), "refused_values": p.refused_values,
                           "bots": p.bots, "late": p.late}
                    for name, p in status.periods.items()},
        "origins": None if status.origins is None else list(status.origins),
        "last_event_at": _iso(status.last_event_at),
        "freshness": {"customer_store_written_at": _iso(status.customer_store_written_at),
                      "analyst_store_written_at": found.analyst.loader_written_at()},
    })


SERIES_FORMATS = ("json", "csv")
CSV_COLUMNS = ("start", "end", "count", "valued", "value_sum", "length_s")
METRICS = {f"{t}s": t for t in EVENT_TYPES}  # impressions, pageviews


@dataclass(frozen=True, slots=True)
class SeriesRequest:
    domain: str
    metric: str
    fmt: str
    granularity: str
    tz: ZoneInfo
    start: datetime
    end: datetime


def _series_request(domain: str, metric: str) -> SeriesRequest:
    """The series request in the URL, checked in the order the API has always refused in."""
    if metric not in METRICS:
        raise ApiError(404, "unknown_metric", f"metric must be one of {', '.join(sorted(METRICS))}")
    domain = _domain_arg(domain)
    _only_parameters("from", "to", "granularity", "tz", "format")
    args = request.args
    fmt = args.get("format", "json")
    if fmt not in SERIES_FORMATS:
        raise ApiError(400, "invalid_format", f"format must be one of {', '.join(SERIES_FORMATS)}")
    granularity = args.get("granularity", "15m")
    if granularity not in GRANULARITIES:
        raise ApiError(400, "invalid_granularity", f"granularity must be one of {', '.join(GRANULARITIES)}")
    tz = _tz_arg(args)
    end = _parse_time("to", args.get("to"), datetime.now(UTC))
    start = _parse_time("from", args.get("from"), end - timedelta(hours=24))
    return SeriesRequest(domain, metric, fmt, granularity, tz, start, end)


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
    req = _series_request(domain, metric)
    served = backends().rollups.serve(req.domain, METRICS[req.metric], req.start, req.end, req.granularity, req.tz)
    if req.fmt == "csv":
        resp = _series_csv(req, served.buckets)
        resp.headers["X-Tally-Tier"] = served.tier
        return resp
    return json_response(_series_json(req, served))


def _series_json(req: SeriesRequest, served: Series) -> dict[str, Any]:
    buckets = served.buckets
    valued = sum(b.valued for b in buckets)
    value_sum = sum((b.value_sum for b in buckets), Decimal("0.000000"))
    return {
        "domain": req.domain,
        "metric": req.metric,
        "granularity": req.granularity,
        "tz": req.tz.key,
        "tier": served.tier,
        "from": req.start.isoformat(),
        "to": req.end.isoformat(),
        **_totals_json(Totals(sum(b.count for b in buckets), valued, value_sum)),
        "buckets": [_bucket_json(b, req.tz) for b in buckets],
    }


def _bucket_json(b: Bucket, tz: ZoneInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"start": b.start.astimezone(tz).isoformat(),
                           "end": b.end.astimezone(tz).isoformat() if b.end else None,
                           "count": b.count, "valued": b.valued, "value_sum": _decimal(b.value_sum)}
    if b.length_s is not None:
        out["length_s"] = b.length_s
    return out


def _series_csv(req: SeriesRequest, buckets: list[Bucket]) -> Response:
    rows: list[tuple[object, ...]] = [CSV_COLUMNS]
    for b in buckets:
        row = _bucket_json(b, req.tz)
        rows.append((row["start"], row["end"], row["count"], row["valued"], row["value_sum"],
                     row.get("length_s", "")))
    resp = Response(csv_text(rows), content_type=FORMATS["csv"].content_type)
    resp.headers["Content-Disposition"] = f'attachment; filename="{req.domain}-{req.metric}-{req.granularity}.csv"'
    return resp
