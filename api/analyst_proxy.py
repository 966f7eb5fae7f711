"""The API's client for the analyst server: forwards analyst SQL and streams the answer back.

The API process holds no ClickHouse client at all: a slow analyst query
occupies one API thread while its bytes are relayed, never a lock that the
customer API or the health checks need.

`timeout_s` is Settings.sql_relay_timeout_s: the analyst server's slot wait and
watchdog deadline (from TALLY_SQL_MAX_EXECUTION_S) plus a margin (ADR 32). The
analyst server answers within it; if it does not, the caller gets 504
`analyst_timeout` instead of waiting on.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

_CHUNK = 64 * 1024


class AnalystUnavailable(OSError):
    """The analyst server could not be reached (the API answers 503)."""


@dataclass
class Upstream:
    status: int
    content_type: str
    retry_after: str | None
    body: Iterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)  # the analyst server's X-ClickHouse-* headers


class AnalystService:
    def __init__(self, base_url: str, token: str, *, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path.rstrip("/") + "/v1/query"
        self._token = token
        self.timeout_s = timeout_s

    def query(self, sql: str, fmt: str, token_id: str | None, params: Mapping[str, str] | None = None, *,
              settings: Mapping[str, str] | None = None, client: str | None = None,
              query_id: str | None = None) -> Upstream:
        """Send one query (with the values of its `{name:Type}` parameters, olap/params.py); the returned body
        must be consumed or closed (it holds the connection). `settings`, `client` (the caller's User-Agent)
        and `query_id`: the ClickHouse-compatible endpoint's (olap/ch_query.py), sent only when given."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        request: dict[str, object] = {"sql": sql, "format": fmt, "token_id": token_id}
        if params:
            request["params"] = dict(params)
        for name, value in (("settings", dict(settings) if settings else None), ("client", client),
                            ("query_id", query_id)):
            if value:
                request[name] = value
        try:
            conn.request("POST", self._path, body=orjson.dumps(request),
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"})
            resp = conn.getresponse()
        except TimeoutError:
            conn.close()
            return self._timed_out()
        except OSError as exc:
            conn.close()
            raise AnalystUnavailable(f"the analyst server at {self._host}:{self._port} is unreachable ({exc})") from exc

        def relay() -> Iterator[bytes]:
            try:
                while True:
                    chunk = resp.read1(_CHUNK) if hasattr(resp, "read1") else resp.read(_CHUNK)
                    if not chunk:
                        break
                    yield chunk
                # http.client raises IncompleteRead when the server cut a chunked body short: re-raised here,
                # so our server cuts the client's response short too instead of ending it cleanly.
            finally:
                conn.close()

        return Upstream(resp.status, resp.getheader("Content-Type", "application/json"),
                        resp.getheader("Retry-After"), relay(),
                        {k: v for k, v in resp.getheaders() if k.lower().startswith("x-clickhouse-")})

    def _timed_out(self) -> Upstream:
        body = orjson.dumps({"error": {"code": "analyst_timeout", "message": (
            f"the analyst server did not answer within {self.timeout_s:g} s (its time limit plus a margin); "
            "the query was cancelled there or is being cancelled")}})
        return Upstream(504, "application/json", None, iter((body,)))

    def loader_written_at(self) -> str | None:
        """When the loader last wrote to ClickHouse (ISO time), or None if unknown or unreachable (2 s)."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=2)
        try:
            conn.request("GET", self._path.rsplit("/", 1)[0] + "/freshness",
                         headers={"Authorization": f"Bearer {self._token}"})
            resp = conn.getresponse()
            body = resp.read()
            return orjson.loads(body).get("loader_written_at") if resp.status == 200 else None
        except (OSError, ValueError):
            return None
        finally:
            conn.close()
