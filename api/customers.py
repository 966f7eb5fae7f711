"""The customers' JSON API: their domains, a summary, the ingestion status and series per bucket.

Each route reads the rollups in PostgreSQL (oltp/queries.py). Refusals are raised as `ApiError`;
a store that does not answer and a range outside retention are answered by api/errors.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from flask import Blueprint, Response, current_app, request

from api import insights
from api.auth import allow, current_principal
from api.backends import Backends, backends
from api.errors import ApiError, install_range_handlers
from api.params import (
    decimal_text,
    domain_arg,
    filters_arg,
    iso,
    only_parameters,
    parse_time,
    percentiles_arg,
    require_registered,
    tz_arg,
)
from core.event import EVENT_TYPES
from core.http import json_response
from olap.formats import FORMATS, csv_text
from oltp.filters import Filter, filter_text
from oltp.ingestion import ingestion_status
from oltp.insights import FILTERED_PERCENTILES_NOTE, Insights
from oltp.percentiles import label, quantiles
from oltp.queries import GRANULARITIES, Bucket, Series, SiteRow, Totals, bucket_bounds

bp = Blueprint("customers", __name__)
install_range_handlers(bp)  # a QueryError here is the caller's range (summary, series): 400 (api/errors.py)
for _rule, _view in insights.ROUTES:  # breakdown, visitors (api/insights.py)
    bp.add_url_rule(_rule, view_func=_view, methods=["GET"])


def _totals_json(t: Totals) -> dict[str, Any]:
    return {"total": t.events, "valued": t.valued, "value_sum": decimal_text(t.value_sum),
            "value_avg": decimal_text(t.value_avg)}


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
      summary: Totals, visitors, percentiles and the change from the previous period
      description: >
        The period is made of whole UTC quarter hours (the 15-minute tier) and ends with the quarter hour
        holding `as_of`, which is still filling: it counts what has arrived so far. The previous period
        is the same number of quarter hours just before, all complete. `change_pct` is
        (total - previous_total) / previous_total * 100, null when the previous total is 0.
        `visitors` are the distinct visitors of the period (HLL sketches merged over it; bots never count).
        `percentiles=50,95,99` adds `percentiles` (both event types) and per metric (`metrics.*.percentiles`)
        of the events' values (DDSketch bins, within 1 %; null when no event carried a value).
        `filter=dimension:value` (repeatable or comma-separated, ANDed; `(none)` for no value) counts only the
        matching events, from the dimension rollups (`tier` says which; two or more filters: the hourly and daily
        tiers, the UTC hours around the period); under a filter, visitors are those of that value over the site's
        local days covering the period (one filter) or null (two or more), and percentiles are null (`notes`).
        An unregistered domain answers 404 `unknown_domain`.
      tags: [customers]
      parameters:
        - {name: last, in: query, required: false, schema: {type: string, enum: ['1h', '24h', '7d'], default: '24h'}}
        - percentiles
        - filter
      responses:
        200:
          description: the summary
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Summary'}
        404:
          description: '`unknown_domain`: not a registered site (nor listed on the asking customer token)'
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
    """
    domain = domain_arg(domain)
    only_parameters("last", "percentiles", "filter")
    last = request.args.get("last", "24h")
    if last not in SUMMARY_PERIODS:
        raise ApiError(400, "invalid_period", f"last must be one of {', '.join(SUMMARY_PERIODS)}")
    filters, ps = filters_arg(request.args), percentiles_arg(request.args)
    require_registered(domain)
    now = datetime.now(UTC)
    summary = backends().rollups.summary(domain, SUMMARY_PERIODS[last], now)
    extra = Insights(backends().rollups).summary(domain, summary.window, filters, ps, now)
    w = summary.window
    metrics = _summary_metrics(extra.current or summary.current, extra.previous or summary.previous,
                               extra.percentiles_by_type)
    body: dict[str, Any] = {
        "domain": domain, "last": last, "tier": extra.tier or "15m", "from": w.start.isoformat(),
        "to": w.end.isoformat(), "as_of": w.as_of.isoformat(), "partial_bucket_start": w.partial_start.isoformat(),
        "previous_from": w.previous_start.isoformat(), "previous_to": w.start.isoformat(),
        "metrics": metrics, "visitors": extra.visitors, "previous_visitors": extra.previous_visitors,
        "filters": [filter_text(f) for f in filters], "notes": extra.notes,
    }
    if extra.percentiles is not None:
        body["percentiles"] = extra.percentiles
    return json_response(body)


def _summary_metrics(current: dict[str, Totals], previous: dict[str, Totals],
                     percentiles: dict[str, dict[str, float | None]] | None) -> dict[str, dict[str, Any]]:
    metrics = {}
    for event_type in EVENT_TYPES:
        cur, prev = current[event_type], previous[event_type]
        change = None if prev.events == 0 else round((cur.events - prev.events) / prev.events * 100, 2)
        metrics[f"{event_type}s"] = {**_totals_json(cur), "previous_total": prev.events,
                                     "previous_value_sum": decimal_text(prev.value_sum), "change_pct": change}
        if percentiles is not None:
            metrics[f"{event_type}s"]["percentiles"] = percentiles[event_type]
    return metrics


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
        written (by any site's events: null for a customer token). Tells "no traffic" from "the tag is
        broken": refusals show why events did not count, with
        the most recent offending value of the reasons fixed in the tag (`refused_values`: the domain an
        event named, the page origin), and `origins` lists the site's registered page origins.
      tags: [customers]
      responses:
        200:
          description: the status
          content:
            application/json:
              schema: {$ref: '#/components/schemas/IngestionStatus'}
        404:
          description: '`unknown_domain`: not a registered site (nor listed on the asking customer token)'
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
    """
    domain = domain_arg(domain)
    only_parameters()
    require_registered(domain)
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
        "capped": [{"dimension": c.dimension, "day_start": c.day_start.isoformat(), "other_events": c.events}
                   for c in status.capped],
        "last_event_at": iso(status.last_event_at),
        "freshness": _freshness(status.customer_store_written_at, found),
    })


def _freshness(rollups_written_at: datetime | None, found: Backends) -> dict[str, str | None]:
    """When each store was last written: by any site's events, so a customer token gets nulls (with few sites,
    these times would tell one customer when another's site has traffic; attack review)."""
    principal = current_principal()
    if principal is None or principal.role == "customer":
        return {"customer_store_written_at": None, "analyst_store_written_at": None}
    return {"customer_store_written_at": iso(rollups_written_at),
            "analyst_store_written_at": found.analyst.loader_written_at()}


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
    filters: tuple[Filter, ...] = ()
    percentiles: tuple[float, ...] = ()


def _series_request(domain: str, metric: str) -> SeriesRequest:
    """The series request in the URL, checked in the order the API has always refused in."""
    if metric not in METRICS:
        raise ApiError(404, "unknown_metric", f"metric must be one of {', '.join(sorted(METRICS))}")
    domain = domain_arg(domain)
    only_parameters("from", "to", "granularity", "tz", "format", "filter", "percentiles")
    args = request.args
    fmt = args.get("format", "json")
    if fmt not in SERIES_FORMATS:
        raise ApiError(400, "invalid_format", f"format must be one of {', '.join(SERIES_FORMATS)}")
    granularity = args.get("granularity", "15m")
    if granularity not in GRANULARITIES:
        raise ApiError(400, "invalid_granularity", f"granularity must be one of {', '.join(GRANULARITIES)}")
    tz = tz_arg(args)
    end = parse_time("to", args.get("to"), datetime.now(UTC))
    start = parse_time("from", args.get("from"), end - timedelta(hours=24))
    filters, ps = filters_arg(args), percentiles_arg(args)
    bucket_bounds(start, end, granularity, tz)  # a bad range is named whatever the domain (400 before 404)
    require_registered(domain)
    return SeriesRequest(domain, metric, fmt, granularity, tz, start, end, filters, ps)


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
        `filter` counts only the matching events (two or more filters: hourly and daily tiers only, so 15-minute
        buckets are refused); `percentiles` adds each bucket's and the range's (null under a filter; in CSV one
        column each). Visitors per bucket: /visitors. An unregistered domain answers 404 `unknown_domain`.
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
        - filter
        - percentiles
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
          description: '`unknown_metric`, or `unknown_domain`: not a registered site (nor on the customer token)'
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
    """
    req = _series_request(domain, metric)
    served = backends().rollups.serve(req.domain, METRICS[req.metric], req.start, req.end, req.granularity, req.tz,
                                      filters=req.filters, with_bins=bool(req.percentiles) and not req.filters)
    pcts = _bucket_percentiles(req, served)
    return _series_csv(req, served, pcts) if req.fmt == "csv" else json_response(_series_json(req, served, pcts))


def _bucket_percentiles(req: SeriesRequest, served: Series) -> list[dict[str, float | None]] | None:
    """Each bucket's percentiles when asked (all null under a filter: bins are per domain and type)."""
    if not req.percentiles:
        return None
    bins = served.bins or [{} for _ in served.buckets]
    return [quantiles(b, req.percentiles) for b in bins]


def _series_json(req: SeriesRequest, served: Series, pcts: list[dict[str, float | None]] | None) -> dict[str, Any]:
    buckets = served.buckets
    valued = sum(b.valued for b in buckets)
    value_sum = sum((b.value_sum for b in buckets), Decimal("0.000000"))
    out = {
        "domain": req.domain,
        "metric": req.metric,
        "granularity": req.granularity,
        "tz": req.tz.key,
        "tier": served.tier,
        "from": req.start.isoformat(),
        "to": req.end.isoformat(),
        **_totals_json(Totals(sum(b.count for b in buckets), valued, value_sum)),
        "buckets": [_bucket_json(b, req.tz, pcts[i] if pcts else None) for i, b in enumerate(buckets)],
    }
    if req.filters:
        out["filters"] = [filter_text(f) for f in req.filters]
    if pcts is not None:
        merged: dict[int, int] = {}
        for by_bin in served.bins or []:
            for k, c in by_bin.items():
                merged[k] = merged.get(k, 0) + c
        out["percentiles"] = quantiles(merged, req.percentiles)
        if req.filters:
            out["notes"] = [FILTERED_PERCENTILES_NOTE]
    return out


def _bucket_json(b: Bucket, tz: ZoneInfo, pct: dict[str, float | None] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"start": b.start.astimezone(tz).isoformat(),
                           "end": b.end.astimezone(tz).isoformat() if b.end else None,
                           "count": b.count, "valued": b.valued, "value_sum": decimal_text(b.value_sum)}
    if b.length_s is not None:
        out["length_s"] = b.length_s
    if pct is not None:
        out["percentiles"] = pct
    return out


def _series_csv(req: SeriesRequest, served: Series, pcts: list[dict[str, float | None]] | None) -> Response:
    """One row per bucket; with `percentiles`, one more column per percentile (p50, ...; empty when null)."""
    names = [label(p) for p in req.percentiles]
    rows: list[tuple[object, ...]] = [(*CSV_COLUMNS, *names)]
    for i, b in enumerate(served.buckets):
        row = _bucket_json(b, req.tz)
        extra = ["" if pcts is None or pcts[i][n] is None else pcts[i][n] for n in names]
        rows.append((row["start"], row["end"], row["count"], row["valued"], row["value_sum"],
                     row.get("length_s", ""), *extra))
    resp = Response(csv_text(rows), content_type=FORMATS["csv"].content_type)
    resp.headers["Content-Disposition"] = f'attachment; filename="{req.domain}-{req.metric}-{req.granularity}.csv"'
    resp.headers["X-Tally-Tier"] = served.tier
    return resp
