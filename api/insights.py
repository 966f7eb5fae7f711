"""The customers' breakdowns and visitors series (issue 17, ADR 48): from the dimension rollups and the
visitor sketches in PostgreSQL (oltp/insights.py). Same rules as api/customers.py: every parameter
checked (400 naming it), then the domain must be a registered site (404 `unknown_domain`).

The views live here to keep api/customers.py small; they are routes of the customers' blueprint (so their
public names are `api.domain_breakdown`, `api.domain_visitors`: api/names.py), registered by `ROUTES`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pycountry
from flask import Response, request

from api.auth import allow
from api.backends import backends
from api.errors import ApiError
from api.params import (
    decimal_text,
    domain_arg,
    filters_arg,
    int_arg,
    only_parameters,
    parse_time,
    require_registered,
    tz_arg,
)
from core.http import json_response
from olap.formats import FORMATS, csv_text
from oltp.breakdown import METRICS, Breakdown, BreakdownQuery, BreakdownRow
from oltp.filters import DIMENSIONS, Filter, filter_text, shown_key
from oltp.insights import Insights
from oltp.queries import QUARTER_S, QueryError, bucket_bounds, summary_window

LAST = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "90d": 90 * 86400}
MAX_RANGE = timedelta(days=400)
MAX_LIMIT = 1000
MAX_OFFSET = 100_000
MAX_VISITOR_ROWS = 1000  # offset + limit of a visitors breakdown (its cost is one sketch merge per value and day)


@dataclass(frozen=True, slots=True)
class BreakdownRequest:
    query: BreakdownQuery
    tz: ZoneInfo
    fmt: str


def _range(args: Any, now: datetime) -> tuple[datetime, datetime]:
    """`last` (whole UTC quarter hours ending with the one holding now, as the summary) or `from`/`to`
    (widened to the quarter hours overlapping them); default last=24h."""
    if "last" in args and ("from" in args or "to" in args):
        raise ApiError(400, "invalid_range", "give either last or from/to, not both")
    if "from" not in args and "to" not in args:
        last = args.get("last", "24h")
        if last not in LAST:
            raise ApiError(400, "invalid_period", f"last must be one of {', '.join(LAST)}")
        w = summary_window(now, LAST[last])
        return w.start, w.end
    end = parse_time("to", args.get("to"), now)
    start = parse_time("from", args.get("from"), end - timedelta(hours=24))
    if end <= start:
        raise QueryError("'to' must be after 'from'")
    if end - start > MAX_RANGE:
        raise QueryError(f"the range is longer than {MAX_RANGE.days} days")
    a, b = int(start.timestamp()) // QUARTER_S * QUARTER_S, -(-end.timestamp() // QUARTER_S) * QUARTER_S
    return datetime.fromtimestamp(a, UTC), datetime.fromtimestamp(int(b), UTC)


def _breakdown_request(domain: str) -> BreakdownRequest:
    domain = domain_arg(domain)
    only_parameters("dimension", "metric", "last", "from", "to", "tz", "limit", "offset", "filter", "format")
    args = request.args
    dimension = args.get("dimension", "")
    if dimension not in DIMENSIONS:
        raise ApiError(400, "invalid_dimension", f"dimension must be one of {', '.join(DIMENSIONS)}")
    metric = args.get("metric", "pageviews")
    if metric not in METRICS:
        raise ApiError(400, "invalid_metric", f"metric must be one of {', '.join(METRICS)}")
    fmt = args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, "invalid_format", "format must be one of json, csv")
    tz = tz_arg(args)
    limit = int_arg(args, "limit", 10, 1, MAX_LIMIT)
    offset = int_arg(args, "offset", 0, 0, MAX_OFFSET)
    filters = filters_arg(args)
    lo, hi = _range(args, datetime.now(UTC))
    query = BreakdownQuery(domain, dimension, metric, lo, hi, filters, limit, offset)
    if metric == "visitors" and offset + limit > MAX_VISITOR_ROWS:
        raise ApiError(400, "invalid_offset", f"a visitors breakdown ranks at most its first {MAX_VISITOR_ROWS} "
                       "values (each merges its days' sketches): offset + limit must be at most that")
    if metric == "visitors" and query.uses_cube():
        raise ApiError(400, "invalid_filter", "visitors are kept per dimension value, not per combination: a "
                       "visitors breakdown takes only a filter on the dimension it breaks down")
    require_registered(domain)
    return BreakdownRequest(query, tz, fmt)


@allow("admin", "analyst", "customer", domain_arg="domain")
def domain_breakdown(domain: str) -> Response:
    """A metric per value of one dimension over a range, most first.
    ---
    get:
      summary: Top pages, sources, countries, devices, browsers or OS
      description: >
        Rows sorted by `count` descending (then key): page views, impressions, the value sum (`metric=value`,
        both types) or visitors per value of `dimension` over the range, bots excluded. `(none)` is the row of
        events without a value (direct traffic, no country); `(other)` the values past the site's daily cap
        (TALLY_DIMENSION_CAP). `total` is the metric over every value, `share` = count / total. Country rows
        carry the country's `name`. The range: `last` (whole UTC quarter hours ending with the current one, as
        the summary) or `from`/`to` (the quarter hours overlapping them); the answer's `from`/`to` are the range
        counted. It is read from several tiers at once (`tier`, e.g. 1d+1h+15m: whole local days, whole hours,
        quarter hours). `filter` (one or more, ANDed): a filter on another dimension or two or more filters are
        answered from the hourly and daily tiers over the UTC hours covering the range (`notes`). Visitors are
        kept per local day of the site: `metric=visitors` counts the site's local days covering the range (its
        `from`/`to`), and takes only a filter on the dimension broken down. `format=csv` answers text/csv.
      tags: [customers]
      parameters:
        - {name: dimension, in: query, required: true,
           schema: {type: string, enum: [page, source, country, device, browser, os]}}
        - {name: metric, in: query, required: false,
           schema: {type: string, enum: [visitors, pageviews, impressions, value], default: pageviews}}
        - {name: last, in: query, required: false,
           schema: {type: string, enum: ['1h', '24h', '7d', '30d', '90d'], default: '24h'}}
        - {name: from, in: query, required: false, description: 'ISO-8601 with offset (instead of last)',
           schema: {type: string, format: date-time}}
        - {name: to, in: query, required: false, description: 'ISO-8601 with offset; default: now',
           schema: {type: string, format: date-time}}
        - {name: tz, in: query, required: false, description: IANA time zone the answer's times are shown in,
           schema: {type: string, default: UTC}}
        - {name: limit, in: query, required: false, schema: {type: integer, minimum: 1, maximum: 1000, default: 10}}
        - {name: offset, in: query, required: false, schema: {type: integer, minimum: 0, maximum: 100000, default: 0}}
        - filter
        - {name: format, in: query, required: false, schema: {type: string, enum: [json, csv], default: json}}
      responses:
        200:
          description: the breakdown
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Breakdown'}
            text/csv:
              schema: {type: string}
        404:
          description: '`unknown_domain`: not a registered site (nor listed on the asking customer token)'
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
    """
    req = _breakdown_request(domain)
    found = Insights(backends().rollups).breakdown(req.query, datetime.now(UTC))
    rows = [_row_json(req.query, r, found.total) for r in found.rows]
    return _breakdown_csv(req, found, rows) if req.fmt == "csv" else json_response(_breakdown_json(req, found, rows))


def _breakdown_json(req: BreakdownRequest, found: Breakdown, rows: list[dict[str, Any]]) -> dict[str, Any]:
    q = req.query
    return {"domain": q.domain, "dimension": q.dimension, "metric": q.metric, "tier": found.tier,
            "from": found.lo.astimezone(req.tz).isoformat(), "to": found.hi.astimezone(req.tz).isoformat(),
            "total": _number(found.total), "limit": q.limit, "offset": q.offset,
            "filters": [filter_text(f) for f in q.filters], "notes": found.notes, "rows": rows}


def _number(value: int | Decimal) -> int | float:
    return float(value) if isinstance(value, Decimal) else int(value)


def country_name(code: str) -> str | None:
    """The common English name of an ISO 3166-1 alpha-2 code (pycountry), None for none or (other)."""
    found = pycountry.countries.get(alpha_2=code) if len(code) == 2 else None
    return None if found is None else str(getattr(found, "common_name", None) or found.name)


def _row_json(q: BreakdownQuery, r: BreakdownRow, total: int | Decimal) -> dict[str, Any]:
    count = _number(r.count)
    out: dict[str, Any] = {"key": shown_key(r.key), "count": count,
                           "share": round(float(count) / float(total), 4) if total else 0.0,
                           "value_sum": decimal_text(r.value_sum)}
    if q.dimension == "country":
        out["name"] = country_name(r.key)
    return out


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: keys come from visitors' URLs and referrers, so one starting
    like a formula (`=cmd|...`) is prefixed with `'` (OWASP's CSV injection advice); None is empty."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _breakdown_csv(req: BreakdownRequest, found: Breakdown, rows: list[dict[str, Any]]) -> Response:
    q = req.query
    columns = ("key", "count", "share", "value_sum", *(("name",) if q.dimension == "country" else ()))
    table: list[tuple[object, ...]] = [columns]
    table += [tuple(_cell(row.get(c)) for c in columns) for row in rows]
    resp = Response(csv_text(table), content_type=FORMATS["csv"].content_type)
    resp.headers["Content-Disposition"] = f'attachment; filename="{q.domain}-{q.dimension}-{q.metric}.csv"'
    resp.headers["X-Tally-Tier"] = found.tier
    return resp


@allow("admin", "analyst", "customer", domain_arg="domain")
def domain_visitors(domain: str) -> Response:
    """Distinct visitors per bucket (HLL sketches, within 2 %).
    ---
    get:
      summary: Visitors per hour or day
      description: >
        Distinct visitors (the daily visitor key of non-bot events) per bucket, from the hourly and daily HLL
        sketches: `granularity` 1h (every bucket on whole UTC hours) or 1d (the site's zone: daily sketches;
        another zone whose days start on whole hours: each day merged from its hours). 15-minute buckets are
        refused (visitors are not kept per quarter hour). `total` is the visitors of the whole range (sketches
        merged: not the sum of the buckets). One `filter`: daily buckets in the site's zone only; two or more
        are refused (sketches are kept per dimension value, not per combination).
      tags: [customers]
      parameters:
        - {name: from, in: query, required: false, description: 'ISO-8601 with offset; default: 7 days before to',
           schema: {type: string, format: date-time}}
        - {name: to, in: query, required: false, description: 'ISO-8601 with offset; default: now',
           schema: {type: string, format: date-time}}
        - {name: granularity, in: query, required: false, schema: {type: string, enum: ['1h', '1d'], default: '1h'}}
        - {name: tz, in: query, required: false, description: IANA time zone name, schema: {type: string, default: UTC}}
        - filter
        - {name: format, in: query, required: false, schema: {type: string, enum: [json, csv], default: json}}
      responses:
        200:
          description: the visitors per bucket
          content:
            application/json:
              schema: {$ref: '#/components/schemas/VisitorSeries'}
            text/csv:
              schema: {type: string}
        404:
          description: '`unknown_domain`: not a registered site (nor listed on the asking customer token)'
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
    """
    req = _visitors_request(domain)
    insights = Insights(backends().rollups)
    served, total = insights.visitors_series(req.domain, req.start, req.end, req.granularity, req.tz, req.filters)
    buckets = [{"start": b.start.astimezone(req.tz).isoformat(),
                "end": b.end.astimezone(req.tz).isoformat() if b.end else None,
                "count": b.count, **({"length_s": b.length_s} if b.length_s is not None else {})}
               for b in served.buckets]
    if req.fmt == "csv":
        return _visitors_csv(req, served.tier, buckets)
    return json_response({"domain": req.domain, "metric": "visitors", "granularity": req.granularity,
                          "tz": req.tz.key, "tier": served.tier, "from": req.start.isoformat(),
                          "to": req.end.isoformat(), "total": total,
                          "filters": [filter_text(f) for f in req.filters], "buckets": buckets})


@dataclass(frozen=True, slots=True)
class VisitorsRequest:
    domain: str
    fmt: str
    granularity: str
    tz: ZoneInfo
    start: datetime
    end: datetime
    filters: tuple[Filter, ...]


def _visitors_request(domain: str) -> VisitorsRequest:
    domain = domain_arg(domain)
    only_parameters("from", "to", "granularity", "tz", "filter", "format")
    args = request.args
    fmt = args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, "invalid_format", "format must be one of json, csv")
    granularity = args.get("granularity", "1h")
    if granularity not in ("1h", "1d"):
        raise ApiError(400, "invalid_granularity", "granularity must be 1h or 1d: visitors are kept per hour and "
                       "per day, not per quarter hour")
    tz = tz_arg(args)
    end = parse_time("to", args.get("to"), datetime.now(UTC))
    start = parse_time("from", args.get("from"), end - timedelta(days=7))
    filters = filters_arg(args)
    bucket_bounds(start, end, granularity, tz)  # a bad range is named whatever the domain (400 before 404)
    require_registered(domain)
    return VisitorsRequest(domain, fmt, granularity, tz, start, end, filters)


def _visitors_csv(req: VisitorsRequest, tier: str, buckets: list[dict[str, Any]]) -> Response:
    table: list[tuple[object, ...]] = [("start", "end", "count", "length_s")]
    table += [(b["start"], b["end"], b["count"], b.get("length_s", "")) for b in buckets]
    resp = Response(csv_text(table), content_type=FORMATS["csv"].content_type)
    resp.headers["Content-Disposition"] = f'attachment; filename="{req.domain}-visitors-{req.granularity}.csv"'
    resp.headers["X-Tally-Tier"] = tier
    return resp

# (rule, view) of each route, added to the customers' blueprint by api/customers.py (GET).
ROUTES = (("/api/v1/domains/<domain>/breakdown", domain_breakdown),
          ("/api/v1/domains/<domain>/visitors", domain_visitors))
