"""The lean path under WSGI: `CollectFastPath`, a middleware in front of the Flask app.

Flask's request machinery (request context, URL matching, before/after hooks, Response objects) costs
about as much CPU as the whole admission of a one-event request, so the hot request (collector/lean.py:
a server's `POST /collect`) is answered here, by the one admission pipeline (collector/admission.py),
parse included, without Flask; everything else goes to `flask_wsgi` unchanged. A body shorter than its
Content-Length (the client went away) is put back and goes to Flask too, which answers it as werkzeug
does. tests/test_collector_fast_path.py checks that both paths answer alike.
See docs/adr/0025-collector-speed.md and 0037-admission-pipeline.md.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from typing import Any

from collector.admission import INTERNAL_ERROR, Admission, Intake, Refusal
from collector.client_ip import client_address
from collector.lean import LeanGate, lean_answer, status_line
from core.config import Settings
from core.event import Event

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class CollectFastPath:
    """WSGI middleware: serves the lean requests itself, everything else via `flask_wsgi`."""

    def __init__(self, settings: Settings, flask_wsgi: WSGIApp, admission: Admission) -> None:
        self.flask_wsgi = flask_wsgi
        self.admission = admission
        self.gate = LeanGate(settings)
        self.trusted = settings.trusted_proxies

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        get = environ.get
        lean = self.gate(get("PATH_INFO"), get("REQUEST_METHOD"),
                         "HTTP_ORIGIN" not in environ and "HTTP_TRANSFER_ENCODING" not in environ,
                         get("HTTP_HOST"), get("QUERY_STRING", ""), get("CONTENT_LENGTH", ""), get("CONTENT_TYPE", ""))
        if lean is None:
            return self.flask_wsgi(environ, start_response)
        url_key, length = lean
        raw = _read(environ["wsgi.input"], length)
        if len(raw) < length:  # the client went away mid-body: Flask answers it as werkzeug does
            environ["wsgi.input"] = io.BytesIO(raw)
            return self.flask_wsgi(environ, start_response)
        client_ip = client_address(get("REMOTE_ADDR"), get("HTTP_X_FORWARDED_FOR"), self.trusted)
        intake = Intake(raw, url_key, user_agent=get("HTTP_USER_AGENT"), client_ip=client_ip)
        result: Refusal | list[Event]
        try:
            result = self.admission.admit(intake)
        except Exception:  # as Flask's handler: logged, answered in the JSON error shape
            log.exception("collector: POST /collect failed")
            result = INTERNAL_ERROR
        status, headers, body = lean_answer(result)
        headers.insert(1, ("Content-Length", str(len(body))))
        start_response(status_line(status), headers)
        return [body]


def _read(stream: Any, length: int) -> bytes:
    """Up to `length` bytes of the body (fewer only if the client closed the connection)."""
    data: bytes = stream.read(length)
    if len(data) >= length:
        return data[:length]
    parts = [data]
    got = len(data)
    while got < length:
        chunk: bytes = stream.read(length - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
