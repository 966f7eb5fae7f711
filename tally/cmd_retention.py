"""`tally retention [--dry-run] [--json]`: drop the time partitions past their retention (ADR 18).

Per tier (TALLY_RETENTION_15M_DAYS, _1H_DAYS, _1D_DAYS; 0 = forever) and for the dedup window
(seen_events, TALLY_DEDUP_WINDOW_DAYS), a partition is dropped when its whole range ended at or
before now minus the retention. Also creates the partitions for now and the next two periods.
The ingestion status tables (ingestion_15m, collector_refusals) follow the 15-minute tier: their
expired rows are deleted (oltp/prune.py).
The rollup worker does the same every hour; this command is for doing it now, or looking
(`--dry-run` changes nothing). PostgreSQL: TALLY_PG_DSN or a running `tally up`'s.
Exit codes: 0 done (also when nothing expired), 1 PostgreSQL unreachable or a drop failed, 2 configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import psycopg

from core.config import Settings
from tally.roots import require_pg

if TYPE_CHECKING:
    from tally.cli_support import SubParsers


def register(sub: SubParsers) -> None:
    """Add the subparser; it sets `func=handler(settings, args) -> exit code`."""
    p = sub.add_parser("retention", help="drop rollup and dedup-window partitions past their retention",
                       description="List, per table, the time partitions past retention and drop them.")
    p.add_argument("--dry-run", action="store_true", help="only list what would be dropped")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_retention)


def cmd_retention(settings: Settings, args: argparse.Namespace) -> int:
    from oltp import partitions, prune

    dsn = require_pg(settings)
    now = datetime.now(UTC)
    keep = partitions.keep_days_from(settings)
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            plans = partitions.maintain(conn, keep, now, dry_run=args.dry_run)
            status = prune.prune_status(conn, settings.retention_15m_days, now, dry_run=args.dry_run)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"tally retention: cannot reach PostgreSQL or drop a partition ({reason})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "now": now.isoformat(), "tables": [
            {"table": p.table, "keep_days": p.keep_days, "cutoff": p.cutoff.isoformat() if p.cutoff else None,
             "partitioned": p.partitioned, "partitions": len(p.partitions),
             "expired": [
                 {"name": x.name, "start": x.start.isoformat(), "end": x.end.isoformat()} for x in p.expired]}
            for p in plans], "status_tables": [
            {"table": r.table, "keep_days": r.keep_days, "cutoff": r.cutoff.isoformat() if r.cutoff else None,
             "expired_rows": r.expired_rows} for r in status]}))
        return 0
    verb = "would drop" if args.dry_run else "dropped"
    print(f"{'table':<12} {'keep':>10} {'cutoff (UTC)':<17} {'partitions':>10} {verb:>10}  names")
    for p in plans:
        keep_s = "forever" if p.keep_days == 0 else f"{p.keep_days} d"
        cutoff = p.cutoff.strftime("%Y-%m-%d %H:%M") if p.cutoff else "-"
        count = str(len(p.partitions)) if p.partitioned else "(plain)"
        names = ", ".join(x.name for x in p.expired[:6]) + (" ..." if len(p.expired) > 6 else "")
        print(f"{p.table:<12} {keep_s:>10} {cutoff:<17} {count:>10} {len(p.expired):>10}  {names or '-'}")
    for r in status:  # rows, not partitions
        keep_s = "forever" if r.keep_days == 0 else f"{r.keep_days} d"
        cutoff = r.cutoff.strftime("%Y-%m-%d %H:%M") if r.cutoff else "-"
        print(f"{r.table:<12} {keep_s:>10} {cutoff:<17} {'(rows)':>10} {r.expired_rows:>10}  -")
    return 0
