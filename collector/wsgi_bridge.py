"""Serve a WSGI app (the collector's Flask app) from an RSGI server: the request runs in a thread pool.

`WSGIBridge(app)(scope, proto)` builds the WSGI environ from the RSGI scope the way granian's own
WSGI interface builds it (so the Flask app sees the same request either way), reads the body,
calls the app in one of the bridge's threads, and sends its status, headers and body as one response.
The event loop never blocks on the app.

Bodies are bounded, not streamed: with `max_body` set, a chunked body is read only up to `max_body + 1`
bytes (enough for the app to see it is too large and refuse it), and a declared Content-Length above
`max_body` is never kept: the app sees the length and refuses it (413, as Flask's MAX_CONTENT_LENGTH
does under WSGI). Such a body is read and dropped chunk by chunk first if it declares at most
`2 * max_body` (so the client, still sending, gets the 413 rather than a reset connection), and not
read at all beyond that. So a request holds at most `max_body + 1` bytes of body in memory here;
granian's own WSGI interface reads a whole body, however large, before calling the app.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_BASE = {
    "GATEWAY_INTERFACE": "CGI/1.1",
    "SCRIPT_NAME": "",
    "SERVER_SOFTWARE": "Granian",
    "wsgi.errors": sys.stderr,
    "wsgi.input_terminated": True,
    "wsgi.multiprocess": False,
    "wsgi.multithread": True,
    "wsgi.run_once": False,
    "wsgi.version": (1, 0),
}


def environ_from_scope(scope: Any, body: bytes) -> dict[str, Any]:
    """The WSGI environ of an RSGI HTTP request whose body is `body`."""
    server_host, _, server_port = scope.server.rpartition(":")
    client_host = scope.client.rpartition(":")[0]
    environ: dict[str, Any] = {
        **_BASE,
        "REQUEST_METHOD": scope.method,
        "PATH_INFO": scope.path.encode("utf-8", "surrogateescape").decode("latin-1"),  # granian decoded it
        "QUERY_STRING": scope.query_string,
        "SERVER_PROTOCOL": f"HTTP/{scope.http_version}",
        "SERVER_NAME": server_host.strip("[]"),
        "SERVER_PORT": server_port,
        "REMOTE_ADDR": client_host.strip("[]"),
        "wsgi.url_scheme": scope.scheme,
        "wsgi.input": io.BytesIO(body),
    }
    for name, value in scope.headers.items():
        key = name.upper().replace("-", "_")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            environ[key] = value
            continue
        key = "HTTP_" + key
        if key in environ:  # repeated: joined as granian's WSGI interface joins them
            value = f"{environ[key]}{';' if key == 'HTTP_COOKIE' else ','}{value}"
        environ[key] = value
    return environ


class WSGIBridge:
    """An RSGI handler running `app` (WSGI) in a pool of `threads` threads."""

    def __init__(self, app: WSGIApp, *, threads: int = 16, max_body: int | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi-bridge")

    async def __call__(self, scope: Any, proto: Any, *, body: bytes | None = None) -> None:
        """Answer the request with the app's response; `body`: the request's body if already read."""
        if body is None:
            body = await self._read_body(scope, proto)
        environ = environ_from_scope(scope, body)
        loop = asyncio.get_running_loop()
        status, headers, data = await loop.run_in_executor(self.executor, self._run, environ)
        proto.response_bytes(status, headers, data)

    async def _read_body(self, scope: Any, proto: Any) -> bytes:
        if self.max_body is None:
            whole: bytes = await proto()
            return whole
        length = scope.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:  # refused by its declared length: never kept
            if int(length) <= 2 * self.max_body:
                async for _ in proto:  # dropped as it arrives (at most 2 * max_body bytes)
                    pass
            return b""
        parts, size = [], 0
        async for chunk in proto:
            parts.append(chunk[:self.max_body + 1 - size])  # kept: at most max_body + 1 bytes in all
            size += len(parts[-1])
            if size > self.max_body:
                break  # nothing more is taken from the connection
        return b"".join(parts)

    def _run(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            started[:] = [status, headers]

        result = self.app(environ, start_response)
        try:
            data = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        return int(status.split(" ", 1)[0]), headers, data

    def close(self) -> None:
        self.executor.shutdown(wait=False)
