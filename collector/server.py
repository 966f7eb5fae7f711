"""Serve the collector under granian (Rust HTTP front, N worker processes, one spool segment each).

Chosen over gunicorn by `make bench` (see docs/adr/0004-wsgi-servers.md). Each worker
builds its app from the same TALLY_* variables the parent already validated: under WSGI with
`collector.wsgi:create_app_from_env`, under RSGI (`interface="rsgi"`: /collect natively async,
docs/adr/0025-collector-speed.md) with `collector.rsgi:create_app_from_env`.
"""

from __future__ import annotations

from granian import Granian
from granian.constants import Interfaces

from core.config import Settings

TARGETS = {"wsgi": ("collector.wsgi:create_app_from_env", Interfaces.WSGI),
           "rsgi": ("collector.rsgi:create_app_from_env", Interfaces.RSGI)}


def serve(settings: Settings, host: str, port: int, workers: int, *, interface: str | None = None,
          **options: object) -> None:
    """Run granian until it is stopped. `interface`: "rsgi" or "wsgi" (default: TALLY_COLLECTOR_INTERFACE,
    itself rsgi by default); `options`: further Granian arguments (the bench tries some)."""
    target, kind = TARGETS[interface or settings.collector_interface]
    Granian(
        target,
        factory=True,
        interface=kind,
        address=host,
        port=port,
        workers=workers,
        backlog=2048,
        respawn_failed_workers=True,
        log_access=False,
        **options,  # type: ignore[arg-type]
    ).serve()
