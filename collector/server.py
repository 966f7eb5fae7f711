"""Serve the collector under granian (Rust HTTP front, N worker processes, one spool segment each).

Chosen over gunicorn by `make bench` (see docs/adr/0004-wsgi-servers.md). Each worker
builds its app with `collector.wsgi:create_app_from_env`, i.e. from the same TALLY_*
variables the parent already validated.
"""

from __future__ import annotations

from granian import Granian
from granian.constants import Interfaces

from core.config import Settings


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    Granian(
        "collector.wsgi:create_app_from_env",
        factory=True,
        interface=Interfaces.WSGI,
        address=host,
        port=port,
        workers=workers,
        backlog=2048,
        respawn_failed_workers=True,
        log_access=False,
    ).serve()
