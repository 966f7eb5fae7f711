"""The collector as a granian RSGI app: `POST /collect` (no `Origin`) natively async, the rest via Flask.

What `tally collector` serves by default (TALLY_COLLECTOR_INTERFACE=rsgi; `wsgi` serves the Flask app,
collector.wsgi, directly). Both answer every request alike (tests/test_collector_rsgi.py).

Why (docs/adr/0025-collector-speed.md, "async /collect"): under WSGI each /collect request is a
thread that blocks until its group's fdatasync, so every request passes the worker's GIL between
threads at least twice. Here a request waiting for durability is a future on the worker's event
loop; one flusher thread writes + fdatasyncs a whole group and wakes the loop once.

The native path takes exactly what the WSGI fast path takes (collector/lean.py: one predicate, one
responder) and runs the same admission pipeline (collector/admission.py), parse included, without Flask
and without an app context; only the spool differs (an awaited group commit). Every other request, and
a body shorter than its Content-Length, goes to the Flask app through `collector.wsgi_bridge` (a thread
pool), unchanged.

Stopping (SIGTERM from the master: granian's graceful shutdown; the master's death: SIGKILL, see __rsgi_init__): granian
calls `__rsgi_del__` once the worker stops serving; it stops the sealer thread (which spools the refusal
counts one last time), lets the flush under way finish and seals the worker's open spool segment, so the
shipper ships it without waiting for orphan recovery, and nothing of the worker opens another one.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from typing import Any

from flask import Flask

from collector.admission import CHECKS, INTERNAL_ERROR, PARSE, Admission, Intake, Refusal
from collector.client_ip import client_address
from collector.fast_path import CollectFastPath
from collector.lean import LeanGate, lean_answer
from collector.sealer import Sealer
from collector.wsgi import create_app_from_env as flask_app_from_env
from collector.wsgi_bridge import WSGIBridge
from core.event import Event
from spool.async_writer import AsyncSpool
from spool.segments import SpoolFull

log = logging.getLogger(__name__)


class CollectorRSGI:
    """RSGI app: `__rsgi__(scope, proto)` per request; `__rsgi_del__(loop)` as a worker stops."""

    def __init__(self, app: Flask, *, bridge_threads: int = 16) -> None:
        self.app = app
        settings = app.config["TALLY"]
        self.gate = LeanGate(settings)
        self.trusted = settings.trusted_proxies
        self.admission: Admission = app.extensions["tally_admission"]
        wsgi = app.wsgi_app
        flask_wsgi = wsgi.flask_wsgi if isinstance(wsgi, CollectFastPath) else wsgi  # the gate already said no
        self.bridge = WSGIBridge(flask_wsgi, threads=bridge_threads, max_body=settings.max_body_bytes)
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
        """The worker is stopping: stop the sealer thread (it spools the refusal counts one last time), finish
        the flush under way, stop the bridge, seal the open segment.
        A request still waiting then is never answered 2xx (its lines may be in the sealed segment:
        at-least-once, deduplicated downstream); a Flask request still running may open a new segment,
        which orphan recovery seals once this process is gone."""
        sealer: Sealer | None = self.app.extensions.get("tally_sealer")
        if sealer is not None:
            sealer.stop()  # before the seal below: the sealer thread never opens a segment after it
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
        lean = self.gate(scope.path, scope.method, "origin" not in headers and "transfer-encoding" not in headers,
                         headers.get("host"), scope.query_string, headers.get("content-length", ""),
                         headers.get("content-type", ""))
        if lean is None:
            await self.bridge(scope, proto)
            return
        url_key, length = lean
        raw = await proto()
        if len(raw) < length:  # the client went away mid-body: Flask answers it as werkzeug does
            await self.bridge(scope, proto, body=raw)
            return
        # Every X-Forwarded-For line, in order (as the WSGI servers join them), only when a proxy is trusted.
        forwarded = ",".join(headers.get_all("x-forwarded-for")) if self.trusted else None
        intake = Intake(raw, url_key, user_agent=headers.get("user-agent"),
                        client_ip=client_address(_client_ip(scope.client), forwarded, self.trusted))
        result: Refusal | list[Event]
        try:
            result = await self._admit(intake)
        except Exception:  # as Flask's handler: logged, answered in the JSON error shape
            log.exception("collector: POST /collect failed")
            result = INTERNAL_ERROR
        proto.response_bytes(*lean_answer(result))

    async def _admit(self, intake: Intake) -> Refusal | list[Event]:
        """The admission pipeline with the spool's group commit awaited; the checks run off the loop when
        they may query PostgreSQL (a site key the registry copy lacks)."""
        admission = self.admission
        refusal = admission.screen(intake, PARSE)
        if refusal is None:
            if admission.may_block(intake):
                refusal = await asyncio.get_running_loop().run_in_executor(
                    self._blocking, admission.screen, intake, CHECKS)
            else:
                refusal = admission.screen(intake, CHECKS)
        if refusal is not None:
            return refusal
        try:
            await self.spool.append([e.to_json() for e in intake.events])
        except SpoolFull:
            return admission.spool_full(intake)
        return admission.accept(intake)


def _client_ip(client: str) -> str:
    """The address part of granian's `host:port` (`[v6]:port` for IPv6), as WSGI's REMOTE_ADDR."""
    host = client.rsplit(":", 1)[0] if client.count(":") == 1 or client.startswith("[") else client
    return host[1:-1] if host.startswith("[") else host


def create_app_from_env() -> CollectorRSGI:
    """One granian RSGI worker's app (built like collector.wsgi's, from the TALLY_* variables)."""
    return CollectorRSGI(flask_app_from_env())
