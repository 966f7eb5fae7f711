"""Analyst SQL over the API: checked here for shape and format, run by the analyst server (ADR 10),
its answer relayed as it streams."""

from __future__ import annotations

from flask import Blueprint, Response, request

from api.analyst_proxy import AnalystUnavailable
from api.auth import allow, current_principal
from api.backends import backends
from api.errors import ApiError
from core.http import error
from olap.formats import FORMATS, ResultFormat, format_for_accept, format_named
from olap.params import ParamsError, parse_params
from oltp.audit import record_refusal

bp = Blueprint("sql", __name__)


@bp.post("/api/v1/sql")
@allow("admin", "analyst")
def analyst_sql() -> Response:
    """Relay one analyst query to the analyst server; `?format=` (or Accept) picks json, csv, tsv or jsonl;
    `params` carries the values of the query's `{name:Type}` parameters (bound by ClickHouse, ADR 53).
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
    if not isinstance(body, dict) or set(body) - {"sql", "params"} or not isinstance(body.get("sql"), str):
        raise _refused(body, ApiError(400, "invalid_body", 'send a JSON object {"sql": "SELECT ..."}, with "params": '
                                      '{"name": "value"} for the query\'s {name:Type} parameters'))
    try:
        params = parse_params(body.get("params"))
    except ParamsError as exc:
        raise _refused(body, ApiError(400, "invalid_params", str(exc))) from None
    try:
        fmt = _result_format()
    except ApiError as exc:
        raise _refused(body, exc) from None
    principal = current_principal()
    try:
        upstream = backends().analyst.query(body["sql"], fmt.name, principal.token_id if principal else None,
                                            params, client=request.headers.get("User-Agent", "")[:200] or None)
    except AnalystUnavailable:
        resp = error(503, "analyst_unavailable", "the analyst server is unavailable; retry shortly")
        resp.headers["Retry-After"] = "5"
        return resp
    resp = Response(upstream.body, status=upstream.status, content_type=upstream.content_type)
    if upstream.retry_after:
        resp.headers["Retry-After"] = upstream.retry_after
    return resp


def _refused(body: object, exc: ApiError) -> ApiError:
    """`exc`, once this request's refusal is in the audit log (`tally sql-log`) as the analyst server's are."""
    principal = current_principal()
    sql = body.get("sql") if isinstance(body, dict) else None
    record_refusal(backends().rollups.pool, sql=sql if isinstance(sql, str) else "",
                   format=request.args.get("format", "json"), error=f"{exc.code}: {exc.message}",
                   token_id=principal.token_id if principal else None,
                   client=request.headers.get("User-Agent", "")[:200] or None)
    return exc


def _result_format() -> ResultFormat:
    """`?format=` wins; else the first Accept type we serve; else json."""
    if "format" in request.args:
        found = format_named(request.args["format"])
        if found is None:
            raise ApiError(400, "invalid_format", f"format must be one of {', '.join(FORMATS)} "
                           "(?format=csv, or an Accept header naming one)")
        return found
    return format_for_accept(mime for mime, _quality in request.accept_mimetypes) or FORMATS["json"]
