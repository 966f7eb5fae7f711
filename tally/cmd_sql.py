"""`tally sql QUERY [--format csv|tsv|json|jsonl] [--json]`: analyst SQL through the API (read-only, limited).

Without `--format` it prints a header line and one tab-separated line per row (from the API's JSON);
with one it copies the API's encoding of that format (olap/analyst.py) to stdout as it streams.
Exit codes: 0 done, 1 the API refused the query or could not be reached, 2 usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from core.config import Settings

if TYPE_CHECKING:
    from tally.cli_support import SubParsers

FORMATS = ("csv", "tsv", "json", "jsonl")  # the API's result formats (`?format=`)


def register(sub: SubParsers) -> None:
    sql = sub.add_parser("sql", help="run analyst SQL through the API (read-only, limited)",
                         description="Run one read-only query on ClickHouse through the API, with TALLY_TOKEN "
                         "or the admin token of `tally up`.")
    sql.add_argument("query")
    sql.add_argument("--format", choices=FORMATS, default=None,
                     help="the API's encoding of the result (default: a header line, then tab-separated rows)")
    sql.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    sql.add_argument("--api-url", default=None, help="default: http://TALLY_BIND_HOST:TALLY_API_PORT")
    sql.set_defaults(func=cmd_sql)


def _fail(message: str) -> int:
    print(f"tally sql: {message}", file=sys.stderr)
    return 1


def _refusal(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", {}).get("message", exc))
    except (ValueError, AttributeError):
        return str(exc)


def cmd_sql(settings: Settings, args: argparse.Namespace) -> int:
    from tally.roots import cli_token

    url = (args.api_url or f"http://{settings.bind_host}:{settings.api_port}").rstrip("/") + "/api/v1/sql"
    if args.format:
        url += f"?format={args.format}"
    headers = {"Content-Type": "application/json"}
    token = cli_token(settings)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps({"sql": args.query}).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=settings.sql_max_execution_s + 10) as resp:
            if args.format:
                shutil.copyfileobj(resp, sys.stdout.buffer)
                return 0
            body: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return _fail(_refusal(exc))
    except urllib.error.URLError as exc:
        return _fail(f"cannot reach the API at {url} ({exc.reason}); is `tally up` running?")
    print("\t".join(body["columns"]))
    for row in body["rows"]:
        print("\t".join("" if v is None else str(v) for v in row))
    return 0
