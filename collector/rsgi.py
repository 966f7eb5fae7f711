"""The collector as a granian RSGI app: `POST /collect` (no `Origin`) natively async, the rest via Flask.

What `tally collector` serves by default (TALLY_COLLECTOR_INTERFACE=rsgi; `wsgi` serves the Flask app,
collector.wsgi, directly). Both answer every request alike (tests/test_collector_rsgi.py).

Why (docs/adr/0025-collector-speed.md, "async /collect"): under WSGI each /collect request is a
thread that blocks until its group's fdatasync, so every request passes the worker's GIL between
threads at least twice. Here a request waiting for durability is a future on the worker's event
loop; one flusher thread writes + fdatasyncs a whole group and wakes the loop once.

The native path takes exactly the cases collector/fast_path.py takes (a server's POST /collect:
no Origin, allowed Host, query at most `site=<key>`, a plain Content-Length within
TALLY_MAX_BODY_BYTES, an accepted Content-Type, a body that parses) and runs the same admission
(`collector.app.screen`, the spool, `collector.app.admitted`). Every other request, and a body that
does not parse, goes to the Flask app through `collector.wsgi_bridge` (a thread pool), unchanged.

Stopping (SIGTERM from the master: granian's graceful shutdown; the master's death: SIGKILL, see __rsgi_init__): granian
calls `__rsgi_del__` once the worker stops serving; it lets the flush under way finish and seals the
worker's open spool segment, so the shipper ships it without waiting for orphan recovery.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from typing import Any

import orjson
from flask import Flask, Response

from collector.app import admitted, screen, spool_full
from collector.body import BodyError, parse_events
from collector.fast_path import ENDPOINT, LEAN_QUERY, media_type_ok
from collector.wsgi_bridge import WSGIBridge
from core import metrics
from core.http import error, host_allowed
from spool.async_writer import AsyncSpool
from spool.segments import SpoolFull

log = logging.getLogger(__name__)

_JSON_VARY = [("content-type", "application/json"), ("vary", "Origin")]


class CollectorRSGI:
    """RSGI app: `__rsgi__(scope, proto)` per request; `__rsgi_del__(loop)` as a worker stops."""

    def __init__(self, app: Flask, *, bridge_threads: int = 16) -> None:
        self.app = app
        settings = app.config["TALLY"]
        self.allowed_hosts = settings.allowed_hosts
        self.max_body = settings.max_body_bytes
        self.bridge = WSGIBridge(app.wsgi_app, threads=bridge_threads, max_body=self.max_body)
        self._blocking = self.bridge.executor  # for what may block (a registry lookup): never on the loop
        self.spool = AsyncSpool(app.extensions["tally_spool"])

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """The master's death stops this worker with SIGKILL (collector.wsgi's die_with_parent: the
        parent-death signal and a watch thread). A graceful SIGTERM here was tried and dropped: a worker
        in granian's graceful stop was seen outliving its master in the full suite, watch thread
        included (tests/test_collector_orphans.py). Nothing is lost by the hard stop: everything
        acknowledged is fdatasync'd and the shipper recovers the open segment. If the master is already
        gone (it may die while this worker starts), stop now: granian's workers are multiprocessing
        children, which know their parent's pid."""
        master = multiprocessing.parent_process()
        if master is not None and master.pid != os.getppid():
            log.warning("collector: the granian master died while this worker started; stopping")
            os.kill(os.getpid(), signal.SIGKILL)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        """The worker is stopping: finish the flush under way, stop the bridge, seal the open segment.
        A request still waiting then is never answered 2xx (its lines may be in the sealed segment:
        at-least-once, deduplicated downstream); a Flask request still running may open a new segment,
        which orphan recovery seals once this process is gone."""
        self.spool.close()
        self.bridge.close()
        try:
            self.app.extensions["tally_spool"].close()
        except OSError:
            log.exception("collector: sealing the spool segment at shutdown failed (orphan recovery will)")
        else:
            log.info("collector: worker stopping, spool segment sealed")

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":  # websockets are not served: closed at once
            proto.close(403)
            return
        headers = scope.headers
        if (scope.path != "/collect" or scope.method != "POST" or "origin" in headers
                or "transfer-encoding" in headers):
            await self.bridge(scope, proto)
            return
        host = headers.get("host")
        query = LEAN_QUERY.fullmatch(scope.query_string)
        length = headers.get("content-length", "")
        if (not host or not host_allowed(host, self.allowed_hosts) or query is None or not length.isdigit()
                or int(length) > self.max_body or not media_type_ok(headers.get("content-type", ""))):
            await self.bridge(scope, proto)
            return
        raw = await proto()
        try:
            if len(raw) < int(length):
                raise BodyError(400, "bad_request", "incomplete body")
            items = parse_events(raw)
        except BodyError:
            await self.bridge(scope, proto, body=raw)  # Flask reads the same bytes and refuses them
            return
        result: Response | list[Any]
        url_key, peer = query.group(1), (headers.get("user-agent"), _client_ip(scope.client))
        try:
            if self._keys_known(url_key, items):
                result = self._screen(items, url_key, peer)
            else:  # screen may query PostgreSQL for a key added since the last refresh: not on the loop
                result = await asyncio.get_running_loop().run_in_executor(
                    self._blocking, self._screen, items, url_key, peer)
            if not isinstance(result, Response):
                try:
                    await self.spool.append([e.to_json() for e in result])
                except SpoolFull:
                    with self.app.app_context():
                        result = spool_full(items)
                else:
                    result = admitted(result)
        except Exception:  # as Flask's handler: logged, answered in the JSON error shape
            log.exception("collector: POST /collect failed")
            with self.app.app_context():
                result = error(500, "internal_error", "unexpected error; it was logged")
        if isinstance(result, Response):  # a refusal, counted by screen
            result.vary.add("Origin")
            metrics.count_collector_request(ENDPOINT, result.status_code)
            proto.response_bytes(result.status_code, _header_list(result), result.get_data())
            return
        body = orjson.dumps({"accepted": len(result), "hashes": [e.hash for e in result]})
        metrics.count_collector_request(ENDPOINT, 202)
        proto.response_bytes(202, _JSON_VARY, body)


    def _keys_known(self, url_key: str | None, items: list[Any]) -> bool:
        """Whether the registry copy holds every site key the request names (then screen never blocks)."""
        sites = self.app.extensions["tally_registry"].snapshot()
        if sites is None:
            return True  # refused at once (registry_unavailable): screen queries nothing
        known = sites.by_key
        if url_key and url_key not in known:
            return False
        return all(not isinstance(item, dict) or not isinstance(k := item.get("site"), str) or not k or k in known
                   for item in items)

    def _screen(self, items: list[Any], url_key: str | None, peer: tuple[str | None, str | None]
                ) -> Response | list[Any]:
        with self.app.app_context():
            return screen(items, url_key, peer=peer)


def _client_ip(client: str) -> str:
    """The address part of granian's `host:port` (`[v6]:port` for IPv6), as WSGI's REMOTE_ADDR."""
    host = client.rsplit(":", 1)[0] if client.count(":") == 1 or client.startswith("[") else client
    return host[1:-1] if host.startswith("[") else host


def _header_list(resp: Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in resp.headers.items() if k.lower() != "content-length"]


def create_app_from_env() -> CollectorRSGI:
    """One granian RSGI worker's app (built like collector.wsgi's, from the TALLY_* variables)."""
    from collector.wsgi import create_app_from_env as flask_app_from_env

    return CollectorRSGI(flask_app_from_env())
