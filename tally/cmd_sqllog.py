"""`tally sql-log`: the analyst-SQL audit log, newest first, from PostgreSQL (TALLY_PG_DSN or a running `tally up`).

Exit codes: 0 done, 1 PostgreSQL unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from datetime import UTC
from typing import TYPE_CHECKING, Any

import psycopg

from core.config import Settings

if TYPE_CHECKING:
    from tally.cli_support import SubParsers


def register(sub: SubParsers) -> None:
    """Add this group's subparsers; each sets `func=handler(settings, args) -> exit code`."""
    log = sub.add_parser("sql-log", help="show the newest analyst SQL queries from the audit log (admin)",
                         description="The analyst-SQL audit log: who ran what, in which format, with what "
                         "outcome (ok, refused, failed, timeout, too_large, busy, cancelled), the client (its "
                         "User-Agent), rows, bytes, time.")
    log.add_argument("--last", type=_positive, default=20, metavar="N", help="how many (default 20)")
    log.add_argument("--json", action="store_true", help="print a JSON array")
    log.set_defaults(func=cmd_sql_log)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError("must be between 1 and 100000")
    return value


def cmd_sql_log(settings: Settings, args: argparse.Namespace) -> int:
    from oltp import audit
    from oltp.schema import ensure_schema
    from tally.roots import require_pg

    dsn = require_pg(settings)
    try:
        ensure_schema(dsn)
        records = audit.last(dsn, args.last)
    except psycopg.OperationalError as exc:
        print(f"tally sql-log: PostgreSQL is unreachable: {str(exc).strip()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([_json(r) for r in records]))
        return 0
    fmt_w = max([6, *(len(_shown(r.format)) for r in records)])  # ClickHouse's format names are long
    print(f"{'started (UTC)':<19} {'token':<15} {'client':<30} {'status':<9} {'format':<{fmt_w}} {'rows':>8} "
          f"{'bytes':>10} {'ms':>7}  sql / error")
    for r in records:
        started = r.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows = "-" if _rows_unknown(r.format) else str(r.rows)
        line = (f"{started:<19} {_shown(r.token_id or '-'):<15} {_shown(r.client or '-')[:30]:<30} "
                f"{_shown(r.status):<9} {_shown(r.format):<{fmt_w}} {rows:>8} {r.bytes:>10} {r.duration_ms:>7}  "
                f"{_shown(r.sql)[:120]}")
        print(line)
        if r.error:
            print(f"{'':<19} {'':<15} {'':<30} {'':<9} {'':<{fmt_w}} {'':>8} {'':>10} {'':>7}  "
                  f"! {_shown(r.error)[:200]}")
    return 0


def _shown(text: str) -> str:
    """One line of `text` safe for a terminal: whitespace runs as one space, and every other control character
    (C0 and C1: ESC, BEL, CSI ...; anyone who can send a query, a format or a User-Agent chooses these) as its
    `\\xNN` escape, so the log cannot move the cursor, retitle or clear the admin's terminal."""
    flat = " ".join(text.split())
    return "".join(f"\\x{ord(ch):02x}" if unicodedata.category(ch) == "Cc" else ch for ch in flat)


def _rows_unknown(fmt: str) -> bool:
    """Rows are not counted for ClickHouse's own formats (the ClickHouse-compatible endpoint: ClickHouse
    encodes, tally only counts the bytes); tally's own formats count them."""
    from olap.formats import FORMATS

    return fmt not in FORMATS


def _json(record: Any) -> dict[str, Any]:
    out: dict[str, Any] = record.as_json()
    if _rows_unknown(record.format):
        out["rows"] = None
    return out
