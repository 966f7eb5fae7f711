"""`tally backfill FILE`: import historical events (JSON Lines or CSV) through the collector's path.

Validation, hashing and the spool are the collector's (collector/backfill.py); the running shipper
and both workers carry the events on. A domain must be a registered site (the sites registry in
PostgreSQL, read once at the start); no site key is needed, this is an operator tool.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import Settings

if TYPE_CHECKING:
    from collector.backfill import BadLine, Progress
    from core.event import Limits
    from tally.cli_support import SubParsers

PROGRESS_DIR = "backfill"  # under TALLY_HOME: one progress file per imported file (by SHA-256)
NO_TTL_DAYS = 200 * 365  # TALLY_RAW_RETENTION_DAYS=0 (no TTL): any time from 1970 on


def register(sub: SubParsers) -> None:
    p = sub.add_parser("backfill", help="import historical events from a .jsonl or .csv file",
                       description="Import historical events through the collector's validation, hashing and "
                       "spool, with a progress bar; resumable after a crash (run it again). Bad lines are "
                       "listed with their line numbers and skipped; the exit status is then 1.")
    p.add_argument("file", type=Path)
    p.add_argument("--format", choices=("jsonl", "csv"), default=None, help="default: from the file name")
    p.add_argument("--chunk-lines", type=int, default=5000, help="lines per durable spool append (default 5000)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--force", action="store_true",
                   help="import a file again although it was imported completely (see README: dedup window)")
    p.set_defaults(func=cmd_backfill)


def limits_for(settings: Settings) -> Limits:
    """The collector's limits with the past-age window opened to what ClickHouse keeps (its TTL)."""
    from core.event import Limits

    days = settings.raw_retention_days or NO_TTL_DAYS
    return Limits(max_future_skew=timedelta(seconds=settings.max_future_skew_s), max_past_age=timedelta(days=days))


def _fail(message: str, code: int = 2) -> int:
    print(f"tally backfill: {message}", file=sys.stderr)
    return code


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    import psycopg
    from tqdm import tqdm

    from collector.backfill import BackfillError, backfill
    from oltp import sites
    from spool.segments import SpoolFull, SpoolWriter
    from tally.roots import require_pg

    if not 1 <= args.chunk_lines <= 1_000_000:
        return _fail("--chunk-lines must be between 1 and 1000000")
    if not args.file.is_file():
        return _fail(f"{args.file}: no such file")
    try:
        registered = {s.domain for s in sites.list_sites(require_pg(settings))}
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(f"cannot reach PostgreSQL to read the registered sites ({reason}); is `tally up` running, "
                     "or TALLY_PG_DSN right?", 1)
    spool = SpoolWriter(settings.spool_dir, max_bytes=settings.spool_segment_bytes,
                        max_age_s=settings.spool_segment_age_s, reserve_bytes=settings.spool_reserve_bytes)
    started = time.monotonic()
    bar = tqdm(unit=" lines", file=sys.stderr, disable=None, dynamic_ncols=True, desc=args.file.name)

    def on_bad(bad: BadLine) -> None:
        bar.write(str(bad), file=sys.stderr)

    def on_start(progress: Progress) -> None:
        bar.reset(total=max(progress.lines, progress.next_line - 1))
        bar.update(progress.next_line - 1)  # resumed: what earlier runs did

    try:
        summary = backfill(args.file, spool=spool, progress_dir=settings.home / PROGRESS_DIR,
                           registered=registered.__contains__, limits=limits_for(settings), fmt=args.format,
                           chunk_lines=args.chunk_lines, force=args.force, on_bad=on_bad, on_chunk=bar.update,
                           on_start=on_start)
    except BackfillError as exc:
        return _fail(str(exc))
    except SpoolFull:
        return _fail(f"the spool disk ({settings.spool_dir}) is full; free space and run the same command again "
                     "to resume", 1)
    finally:
        bar.close()
        spool.close()  # seals the open segment: the shipper ships it
    p = summary.progress
    seconds = time.monotonic() - started
    if args.json:
        print(json.dumps({"file": str(args.file), "spooled_now": summary.imported_now, "seconds": round(seconds, 3),
                          "resumed_from": summary.resumed_from, "imported": p.imported, "bad": p.bad,
                          "bad_lines": p.bad_lines[:1000],
                          "oldest": summary.oldest.isoformat() if summary.oldest else None,
                          "newest": summary.newest.isoformat() if summary.newest else None}))
        return 1 if p.bad else 0
    resumed = f", resumed at line {summary.resumed_from}" if summary.resumed_from > 1 else ""
    span = (f", event times {summary.oldest:%Y-%m-%d %H:%M} .. {summary.newest:%Y-%m-%d %H:%M} UTC"
            if summary.oldest and summary.newest else "")
    print(f"backfill {args.file.name}: {summary.imported_now} events spooled in {seconds:.1f}s{resumed}{span}; "
          f"{p.imported} in all, {p.bad} bad lines"
          + (f" (lines {', '.join(map(str, p.bad_lines[:20]))}{', ...' if p.bad > 20 else ''})" if p.bad else ""))
    return 1 if p.bad else 0
