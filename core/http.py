"""JSON responses and the one error shape every HTTP endpoint answers with:
{"error": {"code": "...", "message": "...", ...}}."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def error_body(code: str, message: str, **extra: Any) -> bytes:
    """The bytes of the one error shape (what `error` answers; the collector's lean paths send them as is)."""
    return orjson.dumps({"error": {"code": code, "message": message, **extra}})


def error(status: int, code: str, message: str, **extra: Any) -> Response:
    return Response(error_body(code, message, **extra), status=status, mimetype="application/json")


def _http_error(exc: HTTPException) -> Response:
    code = (exc.name or "error").lower().replace(" ", "_")
    return error(exc.code or 500, code, exc.description or exc.name or "error")


def _internal_error(_exc: Exception) -> Response:
    # Unexpected bugs still answer JSON; Flask has already logged the traceback.
    return error(500, "internal_error", "unexpected error; it was logged")


def host_allowed(host_header: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names one of `allowed` (exact names, or ".example.com" for any subdomain).

    The port is ignored; IPv6 literals come bracketed ("[::1]:8701").
    """
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".")
    if not host:
        return False
    for name in allowed:
        if host == name or (name.startswith(".") and (host.endswith(name) or host == name[1:])):
            return True
    return False


def install_host_check(app: Flask, allowed_hosts: tuple[str, ...]) -> None:
    """Answer 400 to any request whose Host is not allowed (closes DNS rebinding), before any route runs."""

    def check() -> Response | None:
        if host_allowed(request.host, allowed_hosts):
            return None
        return error(400, "host_not_allowed", "this server does not answer to that Host name; "
                     "its operator can add it to TALLY_ALLOWED_HOSTS")

    app.before_request(check)


def install_json_errors(app: Flask) -> None:
    """404s, 405s, 413s and unexpected 500s answer in the JSON error shape too."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(500, _internal_error)
