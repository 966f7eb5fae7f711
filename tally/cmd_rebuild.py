"""`tally rebuild --from --to [--domain]`: rebuild PostgreSQL's rollups of a range from ClickHouse's events (ADR 20).

Every tier: `rollup_15m` from `tally.events FINAL`, then the coarser tiers from it (oltp.tiers, when present).
One PostgreSQL transaction per UTC day of the range (each day is all or nothing), while ingestion goes on:
the rollup worker waits for each day's transaction and never counts a rebuilt event again. A progress
bar (tqdm, on stderr) counts the days. Safe to run again: the same events give the same rows.

Exit codes: 0 rebuilt, 2 bad arguments or configuration, 3 stopped by a store failure or a loader that
did not catch up (the days before are rebuilt, that day and the later ones unchanged; run it again).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from core.config import Settings
from tally.cmd_reconcile import (
    ArgumentProblem,
    add_range_arguments,
    groups,
    parse_range,
    parse_wait,
)

if TYPE_CHECKING:
    from oltp.rebuild import ChunkResult
    from tally.cli_support import SubParsers


def register(sub: SubParsers) -> None:
    """Add this group's subparsers; each sets `func=handler(settings, args) -> exit code`."""
    reb = sub.add_parser("rebuild", help="rebuild PostgreSQL rollups (all tiers) of a range from ClickHouse events",
                         description="Recompute the rollups of every quarter hour overlapping [from, to) from the "
                         "raw events in ClickHouse, one transaction per UTC day, while ingestion continues.",
                         epilog="exit codes: 0 rebuilt; 2 a usage or configuration error; 3 stopped by a store "
                         "failure or a loader that did not catch up (run it again)")
    add_range_arguments(reb)
    reb.add_argument("--json", action="store_true", help="print one JSON object per rebuilt day, no progress bar")
    reb.set_defaults(func=cmd_rebuild)


def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    import psycopg
    from tqdm import tqdm

    from olap.aggregates import AggregatesError
    from oltp.rebuild import chunks, rebuild
    from oltp.reconcile import NotSettled
    from tally.roots import clickhouse_source, require_pg

    try:
        lo, hi = parse_range(args)
        wait_s = parse_wait(args.wait)
    except ArgumentProblem as exc:
        print(f"tally rebuild: {exc}", file=sys.stderr)
        return 2
    dsn = require_pg(settings)
    source = clickhouse_source(settings)
    total = sum(1 for _ in chunks(lo, hi))
    bar = tqdm(total=total, unit="day", desc="rebuild", file=sys.stderr, disable=args.json or None)
    summary = {"events": 0, "rows": 0, "days": 0}

    def progress(result: ChunkResult) -> None:
        summary["events"] += result.events
        summary["rows"] += result.rows
        summary["days"] += 1
        bar.update(1)
        bar.set_postfix(events=summary["events"], refresh=False)
        if args.json:
            print(json.dumps({"from": result.lo.isoformat(), "to": result.hi.isoformat(), "events": result.events,
                              "rows": result.rows, "deleted": result.deleted, "tiers": result.tiers}), flush=True)

    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            rebuild(conn, source, lo, hi, groups(settings), domain=args.domain, wait_s=wait_s,
                    dedup_days=settings.dedup_window_days, progress=progress,
                    dimension_cap=settings.dimension_cap)
    except (AggregatesError, NotSettled) as exc:
        bar.close()
        print(f"tally rebuild: {exc}", file=sys.stderr)
        return 3
    except psycopg.Error as exc:
        bar.close()
        print(f"tally rebuild: PostgreSQL failed: {type(exc).__name__}: {str(exc).strip()[:300]}", file=sys.stderr)
        return 3
    bar.close()
    if not args.json:
        scope = f" for {args.domain}" if args.domain else ""
        print(f"rebuilt {lo.isoformat()} .. {hi.isoformat()}{scope}: {summary['days']} day(s), "
              f"{summary['events']} events, {summary['rows']} rollup rows")
    return 0
