"""Serve the collector under granian (Rust HTTP front, N worker processes, one spool segment each).

Chosen over gunicorn by `make bench` (see docs/adr/0004-wsgi-servers.md). Each worker
builds its app from the same TALLY_* variables the parent already validated: under WSGI with
`collector.wsgi:create_app_from_env`, under RSGI (`interface="rsgi"`: /collect natively async,
docs/adr/0025-collector-speed.md) with `collector.rsgi:create_app_from_env`.

Worker deaths (docs/adr/0033-supervision-keeps-healthy-parts-up.md): granian 2.8.7 exits ("Worker crash
loop detected") when a worker it respawned dies again within 5.5 s, whatever killed it, and offers no
setting for that. `CollectorServer` narrows the rule to what it is meant for: a worker that *exits by
itself* with an error that soon after being spawned (it cannot build its app) is a crash loop, and the
master exits with status 1 (its supervisor restarts it with backoff); a worker *killed by a signal*
(kill -9, the OOM killer) is respawned at once, however often.
"""

from __future__ import annotations

import resource
import time
from typing import Any

from granian.constants import Interfaces
from granian.log import logger as granian_log
from granian.server.mp import MPServer

from core.config import Settings

TARGETS = {"wsgi": ("collector.wsgi:create_app_from_env", Interfaces.WSGI),
           "rsgi": ("collector.rsgi:create_app_from_env", Interfaces.RSGI)}
FAILED_START_S = 5.5  # granian's own window: a worker exiting by itself sooner after its spawn is a crash loop
BACKLOG = 2048  # the listening socket's queue of connections not accepted yet
# Connections a worker holds open at once (granian's `backpressure`; its default, BACKLOG // workers, let ~2,100
# sockets that never send a byte take a 2-worker collector off the air: an attack review). granian 2.8.7 has no
# idle timeout for a socket that sends nothing and no per-address cap: the reverse proxy bounds clients in
# production (README "Production: behind a reverse proxy"); this only raises the bar without one.
MAX_CONNECTIONS_PER_WORKER = 16_384
WORKERS_KILL_TIMEOUT_S = 10  # a worker that does not stop within this (SIGSTOPped, hung) is killed at shutdown


class CollectorServer(MPServer):
    """granian's server with worker processes (what `granian.Granian` is on a GIL build), with the crash-loop
    rule narrowed to workers that fail on their own (module doc)."""

    def _respawn_workers(self, workers: list[int], spawn_target: Any, target_loader: Any,
                         delay: float = 0) -> None:
        failed = [idx for idx in workers if self._failed_on_start(idx)]
        if failed:
            granian_log.error(f"worker-{failed[0] + 1} exited with an error within {FAILED_START_S}s of its start: "
                              "crash loop, exiting")
            # granian's own way out of its serve loop: stop, then exit with status 1 (children failed)
            self.interrupt_children.extend(failed)
            self.interrupt_signal = True
            self.main_loop_interrupt.set()
            return
        super()._respawn_workers(workers, spawn_target, target_loader, delay)
        for idx in workers:  # granian exits when a slot it just respawned dies again within 5.5 s: not here
            self.respawned_wrks.pop(idx, None)

    def _failed_on_start(self, idx: int) -> bool:
        """True when worker slot `idx`'s (dead) worker exited by itself with an error soon after its spawn.
        Graceful respawns (reload, lifetime, RSS) pass live workers: never a failure."""
        if idx >= len(self.wrks):
            return False
        worker = self.wrks[idx]
        code = worker.inner.exitcode  # multiprocessing: negative = killed by that signal
        return code is not None and code > 0 and time.monotonic() - worker.birth < FAILED_START_S


def serve(settings: Settings, host: str, port: int, workers: int, *, interface: str | None = None,
          **options: object) -> None:
    """Run granian until it is stopped. `interface`: "rsgi" or "wsgi" (default: TALLY_COLLECTOR_INTERFACE,
    itself rsgi by default); `options`: further Granian arguments (the bench tries some)."""
    target, kind = TARGETS[interface or settings.collector_interface]
    files = _open_files_limit()  # importing granian raised the soft limit to the hard one
    per_worker = max(64, min(MAX_CONNECTIONS_PER_WORKER, files - 256))  # a connection is a file; some for the rest
    if per_worker < MAX_CONNECTIONS_PER_WORKER:
        granian_log.warning(f"the open-files limit is {files}: each collector worker holds at most {per_worker} "
                            f"connections (raise `ulimit -n` to {2 * MAX_CONNECTIONS_PER_WORKER} for "
                            f"{MAX_CONNECTIONS_PER_WORKER})")
    options.setdefault("backpressure", per_worker)
    if kind == Interfaces.WSGI:  # granian's WSGI threads default to backpressure / 2: keep them what they were
        options.setdefault("blocking_threads", max(1, BACKLOG // max(1, workers) // 2))
    CollectorServer(
        target,
        factory=True,
        interface=kind,
        address=host,
        port=port,
        workers=workers,
        backlog=BACKLOG,
        respawn_failed_workers=True,
        workers_kill_timeout=WORKERS_KILL_TIMEOUT_S,
        log_access=False,
        **options,  # type: ignore[arg-type]  # whatever the bench tries
    ).serve()


def _open_files_limit() -> int:
    """The soft limit of open files the workers inherit (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft
