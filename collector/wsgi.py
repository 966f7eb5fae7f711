"""WSGI entry point for a collector worker process: its composition root."""

from __future__ import annotations

import os

from flask import Flask

from collector.app import create_app
from core.config import Settings


def create_app_from_env() -> Flask:
    """Build one worker's app from the TALLY_* variables the parent already validated.

    granian ends its workers without running atexit handlers, so a worker's open
    spool segment is sealed by the spool's age-based sealer while it runs, or by the
    shipper once the worker is gone and its lock with it (collector.spool.recover_orphans).
    """
    return create_app(Settings.from_env(os.environ))
