"""WSGI entry point for a collector worker process: its composition root."""

from __future__ import annotations

import os
import signal

from flask import Flask

from collector.app import create_app
from core.config import Settings
from core.logs import setup_logging
from infra.processes import die_with_parent


def create_app_from_env() -> Flask:
    """Build one worker's app from the TALLY_* variables the parent already validated.

    granian ends its workers without running atexit handlers, so a worker's open
    spool segment is sealed by the spool's age-based sealer while it runs, or by the
    shipper once the worker is gone and its lock with it (spool.recovery.recover_orphans).
    """
    # Die with the granian master, however it dies: an orphaned worker would keep answering 202 into a
    # spool nobody ships and hold the port against the next start (ADR 16).
    # SIGKILL: with its master gone nobody coordinates a graceful drain, and everything the worker
    # acknowledged is already fdatasync'd; the shipper recovers its open segment once the lock is gone.
    die_with_parent(signal.SIGKILL)
    settings = Settings.from_env(os.environ)
    # Each worker writes the collector's log file too (core/logs.py: safe across processes).
    setup_logging(settings, "collector", terminal_level=None)
    # Each worker process has its own sites-registry copy and rate-limit memory: it enforces
    # 1/TALLY_COLLECTOR_WORKERS of every site's limit (docs/adr/0011-sites-registry.md).
    return create_app(settings, workers=settings.collector_workers)
