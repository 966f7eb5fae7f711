"""`tally reconcile --from --to [--domain] [--json]`: do PostgreSQL's rollups agree with ClickHouse? (ADR 20)

Compares every (domain, type, UTC quarter hour) that overlaps [from, to) in both stores, prints a table of
the differences (rich) or one JSON object (`--json`), and records the run in `reconcile_runs`.
PostgreSQL: TALLY_PG_DSN or the running `tally up`'s. ClickHouse: directly with an http(s) DSN; with the
embedded chDB (only the analyst server may open it) through the analyst server's internal route, with
the key derived from TALLY_SECRET (or the `tally up` secret under TALLY_HOME).

Exit codes: 0 no difference ("0 differences"), 1 differences listed, 2 bad arguments or configuration,
3 the stores could not be compared (unreachable, or the loader not caught up); messages on stderr.

Also here: `start_schedule`, the periodic reconcile the analyst server runs (TALLY_RECONCILE_INTERVAL_S).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from core.config import LOADER_GROUP, ROLLUP_GROUP, Settings
from tally.cli_support import add_wait_argument, wait_seconds

if TYPE_CHECKING:
    from oltp.reconcile import Groups, Report, Source
    from tally.cli_support import SubParsers

log = logging.getLogger(__name__)

SCHEDULE_WINDOW = timedelta(hours=3)   # the scheduled run covers the last 3 settled hours ...
SCHEDULE_LAG = timedelta(minutes=15)   # ... ending one quarter hour before the current one
MAX_RANGE = timedelta(days=400)


class ArgumentProblem(ValueError):
    """A bad --from/--to/--domain: exit 2 with this message."""


def parse_time(text: str, flag: str, now: datetime | None = None) -> datetime:
    """`10m` / `24h` / `7d` ago, or ISO-8601 with an offset (or Z) -> aware UTC datetime (tally/timespec.py);
    raises ArgumentProblem naming the flag."""
    from tally.timespec import TimeSyntaxError
    from tally.timespec import parse_time as parse

    try:
        return parse(text, flag, now)
    except TimeSyntaxError as exc:
        raise ArgumentProblem(str(exc)) from None


def parse_range(args: argparse.Namespace) -> tuple[datetime, datetime]:
    """The quarter hours overlapping [--from, --to): (floor(from), ceil(to)). Raises ArgumentProblem."""
    from oltp.reconcile import ceil_quarter, floor_quarter

    now = datetime.now(UTC)
    lo, hi = parse_time(args.from_, "--from", now), parse_time(args.to or "0s", "--to", now)
    if lo >= hi:
        raise ArgumentProblem(f"--from ({lo.isoformat()}) must be before --to ({hi.isoformat()})")
    if hi - lo > MAX_RANGE:
        raise ArgumentProblem(f"the range is longer than {MAX_RANGE.days} days; split it")
    if args.domain is not None and not args.domain.strip():
        raise ArgumentProblem("--domain is empty")
    return floor_quarter(lo), ceil_quarter(hi)


def parse_wait(text: str) -> float:
    """`--wait` in seconds (tally/cli_support.py: 1s to 1h); raises ArgumentProblem naming it."""
    from tally.timespec import TimeSyntaxError

    try:
        return wait_seconds(text)
    except TimeSyntaxError as exc:
        raise ArgumentProblem(str(exc)) from None


def add_range_arguments(parser: argparse.ArgumentParser) -> None:
    from tally.timespec import time_help

    parser.add_argument("--from", dest="from_", required=True, metavar="TIME",
                        help=time_help("start (floored to the quarter hour)"))
    parser.add_argument("--to", default=None, metavar="TIME", help=time_help(
                        "end, exclusive; the quarter hour holding it is included (default: now)"))
    parser.add_argument("--domain", default=None, help="only this domain (default: every domain)")
    add_wait_argument(parser, "for the loader to catch up with the rollup worker")


def register(sub: SubParsers) -> None:
    """Add this group's subparsers; each sets `func=handler(settings, args) -> exit code`."""
    rec = sub.add_parser("reconcile", help="compare PostgreSQL rollups with ClickHouse events per quarter hour",
                         description="Compare the 15-minute rollups in PostgreSQL with the deduplicated events in "
                         "ClickHouse per (domain, type, quarter hour); exit 1 if any differ. Events still in flight "
                         "are told apart from real differences (README: Reconcile and rebuild).",
                         epilog="exit codes: 0 no difference; 1 differences (listed); 2 a usage or configuration "
                         "error; 3 the stores could not be compared (unreachable, or the loader not caught up)")
    add_range_arguments(rec)
    rec.add_argument("--json", action="store_true", help="print one JSON object")
    rec.set_defaults(func=cmd_reconcile)


def groups(settings: Settings) -> Groups:
    from oltp.reconcile import Groups

    return Groups(ROLLUP_GROUP, LOADER_GROUP, settings.topic)


def unknown_domain(conn: Any, domain: str | None) -> str | None:
    """Why `--domain` names no registered site (the message names it), or None (no --domain, or a site)."""
    from core.event import EventError, normalize_domain

    if domain is None:
        return None
    try:
        name = normalize_domain(domain)
    except EventError as exc:
        return f"--domain {domain[:80]!r} is not a domain ({exc})"
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM sites WHERE domain = %s)", (name,)).fetchone()
    if row and row[0]:
        return None
    return f"unknown domain {name}: not a registered site (`tally sites list`)"


def _fail(command: str, message: str, code: int) -> int:
    print(f"tally {command}: {message}", file=sys.stderr)
    return code


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    import psycopg

    from olap.aggregates import AggregatesError
    from oltp.reconcile import NotSettled, reconcile, record_run
    from tally.roots import clickhouse_source, require_pg

    try:
        lo, hi = parse_range(args)
        wait_s = parse_wait(args.wait)
    except ArgumentProblem as exc:
        return _fail("reconcile", str(exc), 2)
    dsn = require_pg(settings)
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            unknown = unknown_domain(conn, args.domain)
    except psycopg.Error as exc:
        return _fail("reconcile", f"PostgreSQL failed: {type(exc).__name__}: {str(exc).strip()[:300]}", 3)
    if unknown:
        return _fail("reconcile", unknown, 2)
    source = clickhouse_source(settings)
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            report = reconcile(conn, source, lo, hi, groups(settings), domain=args.domain, wait_s=wait_s,
                               dedup_days=settings.dedup_window_days)
            record_run(conn, "cli", lo, hi, args.domain, report)
    except (AggregatesError, NotSettled) as exc:
        return _fail("reconcile", str(exc), 3)
    except psycopg.Error as exc:
        return _fail("reconcile", f"PostgreSQL failed: {type(exc).__name__}: {str(exc).strip()[:300]}", 3)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print_report(report)
    return 1 if report.differences else 0


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console.width = 160  # a pipe or a file: no 80-column wrap of domain names
    scope = f" for {report.domain}" if report.domain else ""
    console.print(f"reconcile {report.lo.isoformat()} .. {report.hi.isoformat()}{scope}: "
                  f"{report.buckets} buckets compared, {report.rechecked} rechecked exactly")
    if not report.differences:
        console.print("0 differences")
        return
    table = Table("domain", "type", "bucket (UTC)", "field", "pg", "ch", "diff")
    for column in table.columns:
        column.no_wrap = True
    for d in report.differences:
        # escaped: a dimension's field names its value (`page[/a/2].events`), which rich would read as markup
        table.add_row(escape(d.domain), d.event_type, d.bucket_start.strftime("%Y-%m-%d %H:%M"), escape(d.field),
                      *("" if v is None else str(v) for v in (d.pg, d.ch, d.diff)))
    console.print(table)
    n, m = len(report.differences), report.mismatched_buckets
    console.print(f"{n} difference{'s' * (n != 1)} in {m} bucket{'s' * (m != 1)}")


# ---------------------------------------------------------------- the schedule (inside the analyst server)

def scheduled_range(now: datetime) -> tuple[datetime, datetime]:
    from oltp.reconcile import floor_quarter

    hi = floor_quarter(now) - SCHEDULE_LAG
    return hi - SCHEDULE_WINDOW, hi


def run_scheduled_once(settings: Settings, dsn: str, source: Source) -> int | None:
    """One scheduled reconcile of the last settled hours; records it; returns the mismatched buckets (None: failed)."""
    import psycopg

    from oltp.reconcile import reconcile, record_run

    lo, hi = scheduled_range(datetime.now(UTC))
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        try:
            report = reconcile(conn, source, lo, hi, groups(settings), dedup_days=settings.dedup_window_days)
        except Exception as exc:
            conn.rollback()
            log.warning("reconcile: scheduled run failed: %s", exc)
            record_run(conn, "schedule", lo, hi, None, None, f"{type(exc).__name__}: {exc}")
            return None
        record_run(conn, "schedule", lo, hi, None, report)
    if report.differences:
        log.warning("reconcile: %d buckets differ between PostgreSQL and ClickHouse in %s .. %s",
                    report.mismatched_buckets, lo.isoformat(), hi.isoformat())
    return report.mismatched_buckets


def start_schedule(settings: Settings, stop: threading.Event, *,
                   first_delay_s: float = 60.0) -> threading.Thread | None:
    """Reconcile every TALLY_RECONCILE_INTERVAL_S (0: never) in a daemon thread of this process, which must be
    able to open ClickHouse (the analyst server). The result goes to `reconcile_runs` (the metrics read it)."""
    from tally.roots import clickhouse_source, require_pg

    interval = settings.reconcile_interval_s
    if interval <= 0:
        return None
    dsn = require_pg(settings)

    def loop() -> None:
        source = None
        delay = min(first_delay_s, interval)
        while not stop.wait(delay):
            delay = interval
            try:
                source = source or clickhouse_source(settings, in_process=True)
                run_scheduled_once(settings, dsn, source)
            except Exception:
                log.exception("reconcile: scheduled run could not be recorded")

    thread = threading.Thread(target=loop, name="reconcile-schedule", daemon=True)
    thread.start()
    return thread
