"""The collector's lean path, shared by its two transports (collector/fast_path.py under WSGI,
collector/rsgi.py under RSGI): which requests it takes (`LeanGate`), and how it answers (`lean_answer`).

The lean path takes the hot request, a server's `POST /collect`: no `Origin` (the CORS logic stays in
Flask), no Transfer-Encoding, an allowed Host, a query of at most `site=<key>`, a plain Content-Length
within TALLY_MAX_BODY_BYTES, an accepted Content-Type. It reads the body, runs the admission pipeline
(collector/admission.py) on it, parse included, and answers without Flask, exactly as the Flask route
would: the same status, JSON body and headers (plus the `Vary: Origin` of the blueprint's after_request),
and the request counted by route and status as collector/metrics.py counts Flask's answers. Everything
else, and a body shorter than its Content-Length (the client went away), is Flask's.
See docs/adr/0025-collector-speed.md and 0037-admission-pipeline.md.
"""

from __future__ import annotations

import re
from functools import lru_cache

import orjson
from werkzeug.http import HTTP_STATUS_CODES, parse_options_header

from collector.admission import Refusal
from collector.body import content_type_ok
from core import metrics
from core.config import Settings
from core.event import Event
from core.http import error_body, host_allowed

ENDPOINT = "collector.collect"  # how Flask (and the request counter) names the /collect route
LEAN_QUERY = re.compile(r"(?:site=([A-Za-z0-9_-]{1,128}))?")  # what a server sends; anything else: Flask
Headers = list[tuple[str, str]]


@lru_cache(maxsize=64)
def media_type_ok(content_type: str) -> bool:
    """`content_type_ok` for a raw Content-Type header, read as werkzeug reads `request.mimetype`."""
    mimetype, params = parse_options_header(content_type)
    return content_type_ok(mimetype.lower(), params)


class LeanGate:
    """The one lean-request predicate (module doc), over what either transport reads of a request."""

    def __init__(self, settings: Settings) -> None:
        self.allowed_hosts = settings.allowed_hosts
        self.max_body = settings.max_body_bytes

    def __call__(self, path: str | None, method: str | None, plain: bool, host: str | None, query: str,
                 length: str, content_type: str) -> tuple[str | None, int] | None:
        """(the `?site=` key or None, the Content-Length) when the lean path takes the request; else None.
        `plain`: the request has neither an `Origin` nor a `Transfer-Encoding` header."""
        if path != "/collect" or method != "POST" or not plain:
            return None
        match = LEAN_QUERY.fullmatch(query)
        if (match is None or not host or not host_allowed(host, self.allowed_hosts) or not length.isdigit()
                or int(length) > self.max_body or not media_type_ok(content_type)):
            return None
        return match.group(1), int(length)


def lean_answer(result: Refusal | list[Event]) -> tuple[int, Headers, bytes]:
    """(status, headers without Content-Length, body) of the admission's `result`, as the Flask route
    answers it; counts the request by route and status. A refusal was counted by the pipeline."""
    if isinstance(result, Refusal):
        body = error_body(result.code, result.message, **result.extra)
        headers = [("Content-Type", "application/json"), ("Vary", "Origin")]
        if result.retry_after is not None:
            headers.insert(1, ("Retry-After", str(result.retry_after)))
        status = result.status
    else:
        body = orjson.dumps({"accepted": len(result), "hashes": [e.hash for e in result]})
        headers, status = [("Content-Type", "application/json"), ("Vary", "Origin")], 202
    metrics.count_collector_request(ENDPOINT, status)
    return status, headers, body


def status_line(status: int) -> str:
    """The WSGI status line werkzeug writes for `status` (e.g. "202 ACCEPTED")."""
    return f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}"
