"""`tally chaos --minutes N [--seed S] [--faults a,b] [--hosts N]`: the long chaos run (issue 9 §2, ADR 24).

`--hosts N` (N > 1) runs it against `tally up --hosts N` with the multi-host faults (tally/chaos/hosts.py,
ADR 59): a whole collector host killed and brought back, a rollup worker killed for good, one added, the
topic grown, an API process killed while API clients retry on the other.

Starts its own `tally up` (a new TALLY_HOME, free ports: it never touches a running platform), sends a
seeded load with retries and duplicates, kills and restarts processes at random points for N minutes,
waits for both stores to settle, and prints one row per fault and a summary (tally/chaos/ does the work).

Exit codes: 0 nothing acknowledged lost and nothing counted twice in either store; 1 a loss, a double
count, or a run that could not finish (the summary says which); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import Settings

if TYPE_CHECKING:
    from tally.chaos.run import ChaosReport
    from tally.cli_support import SubParsers


def register(sub: SubParsers) -> None:
    """Add `tally chaos`; it sets `func=cmd_chaos(settings, args) -> exit code`."""
    from tally.chaos import FAULTS
    from tally.chaos.hosts import TOPOLOGY_FAULTS

    chaos = sub.add_parser(
        "chaos", help="kill and restart the platform's processes under load; check nothing is lost or counted twice",
        description="Runs its own `tally up` (new TALLY_HOME, free ports) under a seeded load with client retries "
        "and duplicates, kills processes at random points, then compares both stores with every acknowledged "
        "event. Faults: " + "; ".join(f"{f.name}: {f.description}" for f in FAULTS.values())
        + ". With --hosts N: " + "; ".join(f"{f.name}: {f.description}" for f in TOPOLOGY_FAULTS.values()))
    chaos.add_argument("--hosts", type=int, default=1, metavar="N",
                       help="run against `tally up --hosts N` with the multi-host faults (default 1)")
    chaos.add_argument("--minutes", type=float, default=10.0, help="how long the load and the faults run "
                       "(default 10; settling comes after)")
    chaos.add_argument("--seed", type=int, default=None, help="seed of the load and the fault schedule "
                       "(default: random, printed)")
    chaos.add_argument("--faults", default=None, metavar="LIST",
                       help="comma-separated fault names to cycle through (default: all)")
    chaos.add_argument("--home", default=None, metavar="DIR",
                       help="TALLY_HOME of the run (a new, empty directory; default: a temporary one, "
                       "removed after a passing run)")
    chaos.add_argument("--json", action="store_true", help="print the faults and the summary as one JSON object "
                       "(progress still goes to stderr)")
    chaos.set_defaults(func=cmd_chaos)


def cmd_chaos(settings: Settings, args: argparse.Namespace) -> int:
    from rich.console import Console

    from tally.chaos import FAULTS, ChaosPlan, ChaosRun, parse_faults

    err = Console(stderr=True, soft_wrap=True)  # paths stay whole, whatever the terminal width
    try:
        from tally.chaos.hosts import TOPOLOGY_FAULTS

        known = FAULTS if args.hosts == 1 else TOPOLOGY_FAULTS
        faults = parse_faults(args.faults, known) if args.faults is not None else None
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
        plan = ChaosPlan.long_form(args.minutes, seed, faults, hosts=args.hosts)
    except ValueError as exc:
        print(f"tally chaos: {exc}", file=sys.stderr)
        return 2
    if args.home is not None:
        home = Path(args.home)
        if home.exists() and any(home.iterdir()):
            print(f"tally chaos: --home {home} is not empty (the run needs a fresh TALLY_HOME)", file=sys.stderr)
            return 2
        keep = True
    else:
        home = Path(tempfile.mkdtemp(prefix="tally-chaos-")) / "home"
        keep = False
    hosts = f", {plan.hosts} hosts" if plan.hosts > 1 else ""
    err.print(f"tally chaos: seed {seed}, {args.minutes:g} min{hosts}, faults {', '.join(plan.faults)}; home {home}")
    report = ChaosRun(plan, home, progress=lambda line: err.print(line, markup=False, highlight=False)).run()
    if args.json:
        print(json.dumps(as_json(report)))
    else:
        Console().print(*render(report))
    if report.passed and not keep:
        shutil.rmtree(home.parent, ignore_errors=True)
    elif not report.passed:
        err.print(f"logs kept in {home / 'logs'}", markup=False)
    return 0 if report.passed else 1


def as_json(report: ChaosReport) -> dict[str, Any]:
    """The report as `--json` prints it: plan, faults, the ledger's counts, each store's check."""
    ledger = report.ledger
    checks = {c.store: {"stored": c.stored, "lost": c.lost, "duplicated": c.duplicated, "maybe": c.maybe,
                        "lost_in_spool": c.lost_in_spool, "detail": c.detail}
              for c in (report.spool, report.pg, report.ch) if c is not None}
    return {"passed": report.passed, "seed": report.plan.seed, "faults": [dataclasses.asdict(f) for f in report.faults],
            "startup_s": report.startup_s, "settle_s": report.settle_s, "error": report.error,
            "requests": ledger.requests, "accepted_requests": ledger.accepted_requests,
            "failed_requests": ledger.failed_requests, "retries": ledger.retries, "duplicates": ledger.duplicates,
            "acknowledged": len(ledger.acked), "checks": checks,
            "churn": None if report.churn is None else {"kills": report.churn.kills, "pauses": report.churn.pauses},
            **_hosts_json(report)}


def _hosts_json(report: ChaosReport) -> dict[str, Any]:
    if report.plan.hosts == 1:
        return {}
    api = report.api
    return {"hosts": report.plan.hosts, "collector_urls": report.collector_urls,
            "rollup_workers_at_start": report.rollup_workers,
            "api": None if api is None else {"requests": api.requests, "retried": api.retried, "failed": api.failed}}


def _hosts_rows(report: ChaosReport) -> list[tuple[str, str]]:
    """The summary rows of a multi-host run: what `tally up` served, and the API clients' requests."""
    if report.plan.hosts == 1:
        return []
    rows = [("collector hosts (URLs printed by tally up)", f"{len(report.collector_urls)}: "
             + ", ".join(u.removesuffix("/collect") for u in report.collector_urls)),
            ("rollup workers at start", str(report.rollup_workers))]
    if report.api is not None:
        rows.append(("API requests / answered after a retry / failed",
                     f"{report.api.requests} / {report.api.retried} / {report.api.failed}"))
    return rows


def render(report: ChaosReport) -> list[Any]:
    """Rich renderables: the table per fault, then the summary table (and the error, if any)."""
    from rich.table import Table

    faults = Table(title=f"Faults (seed {report.plan.seed})")
    for column in ("#", "fault", "what was killed", "at", "held", "restart", "next 202", "result"):
        faults.add_column(column, justify="right" if column in ("#", "at", "held", "restart", "next 202") else "left")
    for i, f in enumerate(report.faults, 1):
        faults.add_row(str(i), f.name, f.target, f"{f.at_s:.0f}s", f"{f.held_s:.0f}s" if f.held_s else "-",
                       "-" if f.restart_s is None else f"{f.restart_s:.1f}s",
                       "-" if f.next_ack_s is None else f"{f.next_ack_s:.1f}s",
                       ("ok" if f.error is None else f"error: {f.error[:200]}") + (f"; {f.note}" if f.note else ""))
    ledger = report.ledger
    summary = Table(title="Summary: " + ("PASS" if report.passed else "FAIL"))
    summary.add_column("")
    summary.add_column("value", justify="right")
    rows = [
        ("tally up started in", f"{report.startup_s:.1f}s"),
        ("requests sent / with 202 / failed", f"{ledger.requests} / {ledger.accepted_requests} / "
                                              f"{ledger.failed_requests}"),
        ("client retries / exact duplicates sent", f"{ledger.retries} / {ledger.duplicates}"),
        ("events acknowledged (expected)", str(len(ledger.acked))),
        ("settled in", "-" if report.settle_s is None else f"{report.settle_s:.1f}s"),
    ]
    if report.churn is not None:
        rows.append(("collector workers killed / paused (churn)", f"{report.churn.kills} / {report.churn.pauses}"))
    rows += _hosts_rows(report)
    if report.spool is not None:
        rows.append(("acknowledged events seen in the spool / never there",
                     f"{report.spool.stored} / {report.spool.lost}"))
    for check in (report.pg, report.ch):
        if check is None:
            continue
        after = "" if check.lost_in_spool is None else f" (of them in the spool: {check.lost_in_spool})"
        rows += [(f"in {check.store}", str(check.stored)),
                 (f"{check.store}: lost / counted twice", f"{check.lost}{after} / {check.duplicated}"),
                 (f"{check.store}: unacknowledged attempts stored", str(check.maybe))]
    for name, value in rows:
        summary.add_row(name, value)
    out: list[Any] = [faults, summary]
    notes = [line for check in (report.spool, report.pg, report.ch) if check is not None for line in check.detail]
    notes += report.churn.errors[:5] if report.churn is not None else []
    notes += ledger.errors[:10]
    notes += report.api.errors[:5] if report.api is not None else []
    if report.error:
        notes.append(f"run error: {report.error}")
    if notes:
        from rich.text import Text

        out.append(Text("\n".join(notes)))
    return out
