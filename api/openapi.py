"""The API's OpenAPI 3.1 document, generated from the Flask app itself with apispec.

Each route documents what is particular to it in its docstring, after a `---` line (apispec's YAML
convention): parameters, request body, its success answers and route-specific errors. What every route
shares is added here from the code, so it cannot drift: the path (from the URL rule), path parameters,
security (from `@allow` / `@public` / `@probe` in api/auth.py: bearer for every protected route, plus
the dashboard's session cookie for GET), the roles (`x-tally-roles`) and the error answers that the
Host check, the token check, the rate limiter and the error handlers give (all in the JSON error shape
of core/http.py). `tests/test_openapi.py` checks that every URL rule is covered and runs schemathesis
against a live server with this document.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from apispec import APISpec, yaml_utils
from flask import Flask

from api.auth import declared_access
from api.names import public_name
from api.session import COOKIE_NAME

_RULE_ARG = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
TITLE = "tally API"
VERSION = "1"

_ERROR = {"$ref": "#/components/schemas/Error"}
_DECIMAL = {"type": "string", "pattern": r"^-?[0-9]+\.[0-9]{6}$",
            "description": "an exact decimal with 6 places, as a string"}
_DECIMAL_OR_NULL = {"type": ["string", "null"], "pattern": r"^-?[0-9]+\.[0-9]{6}$",
                    "description": "an exact decimal with 6 places, as a string; null when no event carried a value"}
_TIME = {"type": "string", "format": "date-time"}
# The canonical form (the API also takes upper case and a trailing dot): labels of letters, digits and
# '-', the last one starting with a letter (an all-digit last label would be an IPv4 address).
DOMAIN_PATTERN = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"

_PERCENTILES = {"type": "object", "additionalProperties": {"type": ["number", "null"]},
                "description": "with `percentiles`: {\"p50\": ..., \"p95\": ...} of the events' values (within "
                               "1 %); null where no event carried a value, and under a filter"}
_FILTERS = {"type": "array", "items": {"type": "string"}, "description": "the filters applied (dimension:value)"}
_NOTES = {"type": "array", "items": {"type": "string"},
          "description": "how the answer was narrowed or widened (combined filters, visitors under a filter)"}

# Query parameters several routes share (referenced from the routes' docstrings).
PARAMETERS: dict[str, dict[str, Any]] = {
    "filter": {"name": "filter", "in": "query", "required": False, "style": "form", "explode": True,
               "description": "dimension:value, repeatable or comma-separated, ANDed; (none) matches events "
                              "without a value; e.g. filter=country:DE&filter=page:/pricing",
               "schema": {"type": "array", "maxItems": 6,
                          "items": {"type": "string", "pattern": "^(page|source|country|device|browser|os):[^,]+$"}}},
    "percentiles": {"name": "percentiles", "in": "query", "required": False,
                    "description": "up to 10 comma-separated percentiles in (0, 100), e.g. 50,95,99",
                    "schema": {"type": "string",
                               "pattern": "^[0-9]{1,2}(\\.[0-9]{1,3})?(,[0-9]{1,2}(\\.[0-9]{1,3})?){0,9}$"}},
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "description": "Every error answer: a stable `code`, a human `message`, sometimes more fields "
                       "(e.g. `retry_after_s` with 429).",
        "properties": {"error": {"type": "object", "properties": {"code": {"type": "string"},
                                                                  "message": {"type": "string"}},
                                 "required": ["code", "message"], "additionalProperties": True}},
        "required": ["error"],
    },
    "Bucket": {
        "type": "object",
        "properties": {
            "start": {**_TIME, "description": "first instant, with its own UTC offset in the requested zone"},
            "end": {**_TIME, "description": "the next bucket's start"},
            "count": {"type": "integer", "minimum": 0},
            "valued": {"type": "integer", "minimum": 0, "description": "events that carried a value"},
            "value_sum": _DECIMAL,
            "length_s": {"type": "integer", "minimum": 1,
                         "description": "present only when the bucket's length differs from the nominal "
                                        "900 / 3600 / 86400 s (DST days, Lord Howe hours)"},
            "percentiles": _PERCENTILES,
        },
        "required": ["start", "end", "count", "valued", "value_sum"],
        "additionalProperties": False,
    },
    "Series": {
        "type": "object",
        "properties": {
            "domain": {"type": "string"},
            "metric": {"type": "string", "enum": ["impressions", "pageviews"]},
            "granularity": {"type": "string", "enum": ["15m", "1h", "1d"]},
            "tz": {"type": "string"},
            "tier": {"type": "string", "enum": ["15m", "1h", "1d"],
                     "description": "the rollup tier that served the answer (ADR 19); the numbers are the same "
                                    "whichever tier serves"},
            "from": _TIME,
            "to": _TIME,
            "total": {"type": "integer", "minimum": 0},
            "valued": {"type": "integer", "minimum": 0},
            "value_sum": _DECIMAL,
            "value_avg": _DECIMAL_OR_NULL,
            "buckets": {"type": "array", "items": {"$ref": "#/components/schemas/Bucket"}},
            "filters": _FILTERS,
            "percentiles": _PERCENTILES,
            "notes": _NOTES,
        },
        "required": ["domain", "metric", "granularity", "tz", "tier", "from", "to", "total", "valued",
                     "value_sum", "value_avg", "buckets"],
        "additionalProperties": False,
    },
    "SummaryMetric": {
        "type": "object",
        "properties": {
            "total": {"type": "integer", "minimum": 0},
            "valued": {"type": "integer", "minimum": 0},
            "value_sum": _DECIMAL,
            "value_avg": _DECIMAL_OR_NULL,
            "previous_total": {"type": "integer", "minimum": 0},
            "previous_value_sum": _DECIMAL,
            "change_pct": {"type": ["number", "null"],
                           "description": "(total - previous_total) / previous_total * 100, 2 decimals; "
                                          "null when previous_total is 0"},

            "percentiles": _PERCENTILES,
        },
        "required": ["total", "valued", "value_sum", "value_avg", "previous_total", "previous_value_sum",
                     "change_pct"],
        "additionalProperties": False,
    },
    "Summary": {
        "type": "object",
        "properties": {
            "domain": {"type": "string"},
            "last": {"type": "string", "enum": ["1h", "24h", "7d"]},
            "tier": {"type": "string", "description": "the rollup tier that served it: 15m, or under a filter the "
                                                      "tiers read (e.g. 1d+1h+15m)"},
            "from": {**_TIME, "description": "start of the period (a UTC quarter hour)"},
            "to": {**_TIME, "description": "end of the current quarter hour (after as_of)"},
            "as_of": {**_TIME, "description": "when the summary was taken"},
            "partial_bucket_start": {**_TIME, "description": "start of the current quarter hour, still filling"},
            "previous_from": _TIME,
            "previous_to": _TIME,
            "metrics": {"type": "object",
                        "properties": {"impressions": {"$ref": "#/components/schemas/SummaryMetric"},
                                       "pageviews": {"$ref": "#/components/schemas/SummaryMetric"}},
                        "required": ["impressions", "pageviews"], "additionalProperties": False},
            "visitors": {"type": ["integer", "null"], "minimum": 0,
                         "description": "distinct visitors of the period (HLL); null under two or more filters"},
            "previous_visitors": {"type": ["integer", "null"], "minimum": 0},
            "percentiles": _PERCENTILES,
            "filters": _FILTERS,
            "notes": _NOTES,
        },
        "required": ["domain", "last", "tier", "from", "to", "as_of", "partial_bucket_start", "previous_from",
                     "previous_to", "metrics", "visitors", "previous_visitors", "filters", "notes"],
        "additionalProperties": False,
    },
    "BreakdownRow": {
        "type": "object",
        "properties": {
            "key": {"type": "string", "description": "the value; (none) for events without one, (other) past the cap"},
            "count": {"type": "number", "minimum": 0,
                      "description": "events, visitors, or the value sum (metric=value) of this value"},
            "share": {"type": "number", "minimum": 0, "description": "count / total (4 decimals)"},
            "value_sum": _DECIMAL_OR_NULL,
            "name": {"type": ["string", "null"], "description": "country rows: the country's name"},
        },
        "required": ["key", "count", "share", "value_sum"],
        "additionalProperties": False,
    },
    "Breakdown": {
        "type": "object",
        "properties": {
            "domain": {"type": "string"},
            "dimension": {"type": "string", "enum": ["page", "source", "country", "device", "browser", "os"]},
            "metric": {"type": "string", "enum": ["visitors", "pageviews", "impressions", "value"]},
            "tier": {"type": "string", "description": "the tiers read, coarsest first (e.g. 1d+1h+15m)"},
            "from": {**_TIME, "description": "start of the range counted"},
            "to": {**_TIME, "description": "end of the range counted"},
            "total": {"type": "number", "minimum": 0, "description": "the metric over every value"},
            "limit": {"type": "integer", "minimum": 1},
            "offset": {"type": "integer", "minimum": 0},
            "filters": _FILTERS,
            "notes": _NOTES,
            "rows": {"type": "array", "items": {"$ref": "#/components/schemas/BreakdownRow"}},
        },
        "required": ["domain", "dimension", "metric", "tier", "from", "to", "total", "limit", "offset", "filters",
                     "notes", "rows"],
        "additionalProperties": False,
    },
    "VisitorSeries": {
        "type": "object",
        "properties": {
            "domain": {"type": "string"},
            "metric": {"type": "string", "enum": ["visitors"]},
            "granularity": {"type": "string", "enum": ["1h", "1d"]},
            "tz": {"type": "string"},
            "tier": {"type": "string", "enum": ["1h", "1d"]},
            "from": _TIME,
            "to": _TIME,
            "total": {"type": "integer", "minimum": 0, "description": "visitors of the whole range (not a sum)"},
            "filters": _FILTERS,
            "buckets": {"type": "array", "items": {
                "type": "object",
                "properties": {"start": _TIME, "end": _TIME, "count": {"type": "integer", "minimum": 0},
                               "length_s": {"type": "integer", "minimum": 1}},
                "required": ["start", "end", "count"], "additionalProperties": False}},
        },
        "required": ["domain", "metric", "granularity", "tz", "tier", "from", "to", "total", "filters", "buckets"],
        "additionalProperties": False,
    },
    "IngestionPeriod": {
        "type": "object",
        "properties": {
            "since": {**_TIME, "description": "start of the first UTC quarter hour counted (by arrival time)"},
            "accepted": {"type": "integer", "minimum": 0, "description": "events acknowledged and stored"},
            "refused": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                        "description": "events the collectors refused, by reason (bad body, site key, origin, "
                                       "signature, rate limit, too old, ...)"},
            "refused_total": {"type": "integer", "minimum": 0},
            "refused_values": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 200},
                               "description": "the most recent offending value of a reason the site owner fixes in "
                                              "the tag: the domain an event named (site_mismatch, invalid_event), "
                                              "the page origin (origin_not_allowed)"},
            "bots": {"type": "integer", "minimum": 0, "description": "accepted events from bot user agents"},
            "late": {"type": "integer", "minimum": 0,
                     "description": "accepted events that arrived more than 5 minutes after their quarter hour"},
        },
        "required": ["since", "accepted", "refused", "refused_total", "refused_values", "bots", "late"],
        "additionalProperties": False,
    },
    "IngestionStatus": {
        "type": "object",
        "properties": {
            "domain": {"type": "string"},
            "as_of": _TIME,
            "periods": {"type": "object",
                        "properties": {"1h": {"$ref": "#/components/schemas/IngestionPeriod"},
                                       "24h": {"$ref": "#/components/schemas/IngestionPeriod"}},
                        "required": ["1h", "24h"], "additionalProperties": False},
            "last_event_at": {"type": ["string", "null"], "format": "date-time",
                              "description": "when the newest accepted event arrived (null: none yet)"},
            "freshness": {
                "type": "object",
                "properties": {
                    "customer_store_written_at": {
                        "type": ["string", "null"], "format": "date-time",
                        "description": "the rollup worker's last write to PostgreSQL (any site's events; null for a "
                                       "customer token)"},
                    "analyst_store_written_at": {
                        "type": ["string", "null"], "format": "date-time",
                        "description": "the loader's last write to ClickHouse (any site's events; null for a "
                                       "customer token)"},
                },
                "required": ["customer_store_written_at", "analyst_store_written_at"],
                "additionalProperties": False,
            },
            "origins": {"type": ["array", "null"], "items": {"type": "string"},
                        "description": "the page origins registered for the site (`tally sites update "
                                       "--add-origin`); null: the domain is not registered"},
            "capped": {"type": "array", "description": "dimensions that reached TALLY_DIMENSION_CAP distinct values "
                                                       "on a local day of the last 7 (newest first): later new values "
                                                       "of that day were counted as `(other)`",
                       "items": {"type": "object", "properties": {
                           "dimension": {"type": "string", "enum": ["page", "source", "country", "device", "browser",
                                                                    "os"]},
                           "day_start": _TIME,
                           "other_events": {"type": "integer", "minimum": 0,
                                            "description": "events counted as `(other)` that day"}},
                           "required": ["dimension", "day_start", "other_events"], "additionalProperties": False}},
        },
        "required": ["domain", "as_of", "periods", "last_event_at", "freshness", "origins", "capped"],
        "additionalProperties": False,
    },
    "Domain": {
        "type": "object",
        "properties": {
            "domain": {"type": "string"},
            "tz": {"type": "string", "description": "the site's IANA time zone (UTC for an unregistered domain)"},
            "registered": {"type": "boolean"},
            "site_key": {"type": ["string", "null"], "description": "public key for the page tag"},
            "tag": {"type": ["string", "null"], "description": "the <script> tag to put on the site's pages"},
            "has_events": {"type": "boolean", "description": "whether any event was ever counted"},
        },
        "required": ["domain", "tz", "registered", "site_key", "tag", "has_events"],
        "additionalProperties": False,
    },
    "DomainList": {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": ["admin", "analyst", "customer"]},
            "collector_url": {"type": "string"},
            "domains": {"type": "array", "items": {"$ref": "#/components/schemas/Domain"}},
        },
        "required": ["role", "collector_url", "domains"],
        "additionalProperties": False,
    },
    "SqlRequest": {
        "type": "object",
        "properties": {
            "sql": {"type": "string", "description": "one SELECT over the analyst tables"},
            "params": {"type": "object", "maxProperties": 64,
                       "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                       "additionalProperties": {"type": "string", "maxLength": 16384},
                       "description": "values of the query's {name:Type} parameters, as ClickHouse text; bound "
                                      "by ClickHouse, never pasted into the query"},
        },
        "required": ["sql"],
        "examples": [{"sql": "SELECT type, count() FROM tally.events GROUP BY type"},
                     {"sql": "SELECT count() FROM tally.events WHERE domain = {d:String}",
                      "params": {"d": "example.com"}}],
        "additionalProperties": False,
    },
    "SqlResult": {
        "type": "object",
        "properties": {"columns": {"type": "array", "items": {"type": "string"}},
                       "types": {"type": "array", "items": {"type": "string"}},
                       "rows": {"type": "array", "items": {"type": "array"}},
                       "row_count": {"type": "integer", "minimum": 0}},
        "required": ["columns", "types", "rows", "row_count"],
    },
    "TokenRequest": {
        "type": "object",
        "properties": {"role": {"type": "string", "enum": ["admin", "analyst", "customer"]},
                       "domains": {"type": "array", "items": {"type": "string"},
                                   "description": "customers only, at least one"},
                       "name": {"type": "string", "maxLength": 200}},
        "required": ["role"],
        "additionalProperties": False,
    },
    "TokenInfo": {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "^tok_[0-9a-f]{10}$"},
                       "name": {"type": "string"},
                       "role": {"type": "string", "enum": ["admin", "analyst", "customer"]},
                       "domains": {"type": "array", "items": {"type": "string"}},
                       "created_at": _TIME,
                       "revoked_at": {"type": ["string", "null"], "format": "date-time"}},
        "required": ["id", "name", "role", "domains", "created_at", "revoked_at"],
    },
    "CreatedToken": {
        "allOf": [{"$ref": "#/components/schemas/TokenInfo"},
                  {"type": "object", "properties": {"token": {"type": "string"}}, "required": ["token"]}],
    },
    "TokenList": {
        "type": "object",
        "properties": {"tokens": {"type": "array", "items": {"$ref": "#/components/schemas/TokenInfo"}}},
        "required": ["tokens"],
    },
}

SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "`Authorization: Bearer tly_<id>_<secret>` (create with `tally tokens create`)"},
    "sessionCookie": {"type": "apiKey", "in": "cookie", "name": COOKIE_NAME,
                      "description": "the dashboard's session (POST /login); same-origin GET requests only"},
}

_PATH_PARAMS = {
    "domain": {"description": "a site's domain (host name; compared after lower-casing)",
               "schema": {"type": "string", "pattern": DOMAIN_PATTERN, "maxLength": 253}},
    "filename": {"description": "a file under api/static", "schema": {"type": "string"}, "example": "dashboard.js"},
}


def _error(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ERROR}}}
    if headers:
        out["headers"] = headers
    return out


def _static_operation() -> dict[str, Any]:
    return {"get": {"summary": "Static files of the dashboard (uPlot is vendored under vendor/)",
                    "tags": ["dashboard"],
                    "responses": {"200": {"description": "the file",
                                          "content": {"*/*": {"schema": {"type": "string"}}}},
                                  "304": {"description": "not modified"},
                                  "404": _error("no such file")}}}


def _complete(operation: dict[str, Any], method: str, endpoint: str, view: Any, rule_args: set[str], *,
              has_body: bool) -> None:
    """Add what the code decides for every route: path parameters, security, roles and shared errors."""
    access, probe = declared_access(endpoint, view)
    params = operation.setdefault("parameters", [])
    named = {(p["name"], p["in"]) for p in params if isinstance(p, dict)}  # (a str: a shared parameter)
    for arg in sorted(rule_args):
        if (arg, "path") not in named:
            params.append({"name": arg, "in": "path", "required": True,
                           **copy.deepcopy(_PATH_PARAMS.get(arg, {"schema": {"type": "string"}}))})
    if not params:
        del operation["parameters"]
    responses = operation.setdefault("responses", {})
    responses = {str(k): v for k, v in responses.items()}
    operation["responses"] = responses
    responses.setdefault("400", _error("a bad parameter or body, or a Host not in TALLY_ALLOWED_HOSTS "
                                       "(`host_not_allowed`)"))
    responses.setdefault("500", _error("an unexpected error (logged)"))
    if has_body:
        responses.setdefault("413", _error("the body exceeds 1 MiB"))
    if not probe:
        responses.setdefault("429", _error("over TALLY_API_RATE_LIMIT (per token, or per address without one)",
                                           **{"Retry-After": {"schema": {"type": "integer"}}}))
    if access == "public":
        operation["security"] = []
        if not probe and endpoint not in ("static", "ops.openapi_document"):
            responses.setdefault("503", _error("PostgreSQL is unavailable"))
        return
    roles = sorted(access)
    operation["x-tally-roles"] = roles
    operation["security"] = [{"bearerAuth": []}] + ([{"sessionCookie": []}] if method == "get" else [])
    bearer = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    responses.setdefault("401", _error("no, malformed, unknown or revoked token; an expired session", **bearer))
    if roles != ["admin", "analyst", "customer"] or getattr(view, "tally_domain_arg", None):
        responses.setdefault("403", _error("the token's role may not call this route, or a customer token does "
                                           "not list this domain", **bearer))
    responses.setdefault("503", _error("PostgreSQL (or the analyst server) is unavailable",
                                       **{"Retry-After": {"schema": {"type": "integer"}}}))


def build_spec(app: Flask) -> dict[str, Any]:
    spec = APISpec(
        title=TITLE, version=VERSION, openapi_version="3.1.0",
        info={"description": "Per-domain web analytics: customer rollups (PostgreSQL) and analyst SQL. "
                             "Errors answer {\"error\": {\"code\", \"message\", ...}}."},
        servers=[{"url": "/"}],
    )
    for name, schema in SCHEMAS.items():
        spec.components.schema(name, schema)
    for name, scheme in SECURITY_SCHEMES.items():
        spec.components.security_scheme(name, scheme)
    for name, param in PARAMETERS.items():
        spec.components.parameter(name, param["in"], {k: v for k, v in param.items() if k != "in"})
    with app.test_request_context():
        for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
            view = app.view_functions[rule.endpoint]
            methods = sorted(m.lower() for m in (rule.methods or ()) if m not in ("HEAD", "OPTIONS"))
            path = _RULE_ARG.sub(r"{\1}", rule.rule)  # <conv:name> -> {name}
            if rule.endpoint == "static":
                operations = _static_operation()
            else:
                operations = yaml_utils.load_operations_from_docstring(view.__doc__ or "")
            for method in methods:
                if method not in operations:
                    raise ValueError(f"{rule.rule} {method.upper()} ({rule.endpoint}) has no OpenAPI operation "
                                     "in its docstring")
                operation = operations[method]
                operation.setdefault("operationId", public_name(rule.endpoint).replace(".", "_"))
                _complete(operation, method, rule.endpoint, view, set(rule.arguments),
                          has_body=method in ("post", "put", "patch"))
            spec.path(path=path, operations={m: operations[m] for m in methods})
    return spec.to_dict()


def spec_for(app: Flask) -> dict[str, Any]:
    """The document for `app`, built once."""
    cached = app.extensions.get("tally_openapi")
    if cached is None:
        cached = app.extensions["tally_openapi"] = build_spec(app)
    return cached
