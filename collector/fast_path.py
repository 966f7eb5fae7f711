"""A lean WSGI path for the collector's hot request: `POST /collect` from a server (no `Origin`).

Flask's request machinery (request context, URL matching, before/after hooks, Response
objects) costs about as much CPU as the whole admission of a one-event request, so this path
answers the common case itself, in front of the Flask app, with exactly the same admission code:
`collector.app.admit` (validation, site keys, rate limits, the spool's fsync before the 202,
refusal counts) run in the Flask *app* context. Everything else goes to Flask unchanged:

- any other route or method, a request with an `Origin` header (the CORS logic stays in one place),
  a Host that is not allowed, a query other than `site=<key>`, a body without a plain
  Content-Length or over TALLY_MAX_BODY_BYTES, a Content-Type other than the accepted ones;
- a body that does not parse (the bytes read are put back, so Flask reads and refuses the same body).

A refusal from `admit` (already counted there) is answered as Flask would: the same JSON error
response, plus the `Vary: Origin` that the blueprint's after_request adds, and the request counted
by route and status like `collector/metrics.py` counts Flask's answers. The 202 is written without
a Response object. tests/test_collector_fast_path.py checks that both paths answer alike.
See docs/adr/0025-collector-speed.md.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import orjson
from flask import Flask, Response
from werkzeug.http import parse_options_header

from collector.body import BodyError, content_type_ok, parse_events
from core import metrics
from core.http import error, host_allowed

log = logging.getLogger(__name__)

ENDPOINT = "collector.collect"  # how Flask (and the request counter) names the /collect route
LEAN_QUERY = re.compile(r"(?:site=([A-Za-z0-9_-]{1,128}))?")  # what a server sends; anything else: Flask
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@lru_cache(maxsize=64)
def media_type_ok(content_type: str) -> bool:
    """`content_type_ok` for a raw Content-Type header, read as werkzeug reads `request.mimetype`."""
    mimetype, params = parse_options_header(content_type)
    return content_type_ok(mimetype.lower(), params)


class CollectFastPath:
    """WSGI middleware: serves `POST /collect` without an `Origin` itself, everything else via `flask_wsgi`."""

    def __init__(self, app: Flask, flask_wsgi: WSGIApp, admit: Callable[..., Response | list[Any]]) -> None:
        """`admit`: collector.app.admit, the one admission path (passed in: collector.app imports us)."""
        self.app = app
        self.flask_wsgi = flask_wsgi
        self.admit = admit
        settings = app.config["TALLY"]
        self.allowed_hosts = settings.allowed_hosts
        self.max_body = settings.max_body_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if (environ.get("PATH_INFO") != "/collect" or environ.get("REQUEST_METHOD") != "POST"
                or "HTTP_ORIGIN" in environ or "HTTP_TRANSFER_ENCODING" in environ):
            return self.flask_wsgi(environ, start_response)
        host = environ.get("HTTP_HOST")
        query = LEAN_QUERY.fullmatch(environ.get("QUERY_STRING", ""))
        length = environ.get("CONTENT_LENGTH", "")
        if (not host or not host_allowed(host, self.allowed_hosts) or query is None or not length.isdigit()
                or int(length) > self.max_body or not media_type_ok(environ.get("CONTENT_TYPE", ""))):
            return self.flask_wsgi(environ, start_response)
        raw = _read(environ["wsgi.input"], int(length))
        try:
            if len(raw) < int(length):  # the client went away mid-body: Flask answers it as werkzeug does
                raise BodyError(400, "bad_request", "incomplete body")
            items = parse_events(raw)
        except BodyError:
            environ["wsgi.input"] = io.BytesIO(raw)  # Flask reads the same bytes and refuses them
            return self.flask_wsgi(environ, start_response)
        with self.app.app_context():
            try:
                result = self.admit(items, query.group(1), peer=(environ.get("HTTP_USER_AGENT"),
                                                            environ.get("REMOTE_ADDR")))
            except Exception:  # as Flask's handler: logged, answered in the JSON error shape
                log.exception("collector: POST /collect failed")
                result = error(500, "internal_error", "unexpected error; it was logged")
        if isinstance(result, Response):  # a refusal, counted by admit
            result.vary.add("Origin")
            metrics.count_collector_request(ENDPOINT, result.status_code)
            return result(environ, start_response)
        body = orjson.dumps({"accepted": len(result), "hashes": [e.hash for e in result]})
        metrics.count_collector_request(ENDPOINT, 202)
        start_response("202 ACCEPTED", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                        ("Vary", "Origin")])
        return [body]


def _read(stream: Any, length: int) -> bytes:
    """Up to `length` bytes of the body (fewer only if the client closed the connection)."""
    data = stream.read(length)
    if len(data) >= length:
        return data[:length]
    parts = [data]
    got = len(data)
    while got < length:
        chunk = stream.read(length - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
