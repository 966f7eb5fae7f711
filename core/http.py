"""JSON responses and the one error shape every HTTP endpoint answers with:
{"error": {"code": "...", "message": "...", ...}}."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Flask, Response
from werkzeug.exceptions import HTTPException


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def error(status: int, code: str, message: str, **extra: Any) -> Response:
    return json_response({"error": {"code": code, "message": message, **extra}}, status)


def _http_error(exc: HTTPException) -> Response:
    code = (exc.name or "error").lower().replace(" ", "_")
    return error(exc.code or 500, code, exc.description or exc.name or "error")


def _internal_error(_exc: Exception) -> Response:
    # Unexpected bugs still answer JSON; Flask has already logged the traceback.
    return error(500, "internal_error", "unexpected error; it was logged")


def install_json_errors(app: Flask) -> None:
    """404s, 405s, 413s and unexpected 500s answer in the JSON error shape too."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(500, _internal_error)
