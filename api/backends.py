"""What the API's routes read from: the rollups in PostgreSQL and the analyst server (ADR 10)."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from api.analyst_proxy import AnalystService
from oltp.queries import RollupReader


@dataclass(frozen=True, slots=True)
class Backends:
    rollups: RollupReader
    analyst: AnalystService


EXTENSION = "tally_backends"


def backends() -> Backends:
    """This app's backends (set by api.app.create_app)."""
    found: Backends = current_app.extensions[EXTENSION]
    return found
