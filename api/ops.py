"""Probes and the OpenAPI document: no token; the probes are not rate limited either."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from api.auth import probe, public
from api.backends import backends
from api.openapi import spec_for
from core.http import error, json_response
from core.runstate import down_components

bp = Blueprint("ops", __name__)


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
        with backends().rollups.pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # whatever keeps PostgreSQL from answering, the API is not ready
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
    return json_response(spec_for(current_app))
