"""`tally tokens create|list|revoke`: admin commands against PostgreSQL (TALLY_PG_DSN or a running `tally up`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subparsers; each sets `func=handler(settings, args) -> exit code`."""
