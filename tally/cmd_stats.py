"""`tally stats DOMAIN --last 24h`: the dashboard's numbers in the terminal, read through the API.

It calls `GET /api/v1/domains/<domain>/summary?last=` and the two series endpoints for the same period
with the CLI token (TALLY_TOKEN, else the admin token `tally up` wrote), and prints them with rich:
one table of totals, value sum / average and the change from the previous period, and one table with a
row per bucket. The API URL is the running `tally up`'s (from its run state), else
http://TALLY_BIND_HOST:TALLY_API_PORT, or `--api-url`.

Exit codes: 0 done, 1 the API refused or could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from datetime import datetime
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from core.config import Settings

PERIODS = ("1h", "24h", "7d")
DEFAULT_GRANULARITY = {"1h": "15m", "24h": "1h", "7d": "1d"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subparsers; each sets `func=handler(settings, args) -> exit code`."""
    stats = sub.add_parser("stats", help="print a domain's totals and per-bucket counts (through the API)",
                           description="Totals, value sum and average and the change from the previous period "
                           "(the current, partial quarter hour included), then one row per bucket; read through "
                           "the API with TALLY_TOKEN or the admin token of `tally up`.")
    stats.add_argument("domain")
    stats.add_argument("--last", choices=PERIODS, default="24h", help="the period (default 24h)")
    stats.add_argument("--granularity", choices=("15m", "1h", "1d"), default=None,
                       help="bucket size of the table (default: 15m for 1h, 1h for 24h, 1d for 7d)")
    stats.add_argument("--tz", default=None, help="IANA time zone of the buckets (default: the site's, else UTC)")
    stats.add_argument("--json", action="store_true", help="print the API's answers as one JSON object")
    stats.add_argument("--api-url", default=None, help="default: the running `tally up`, else "
                       "http://TALLY_BIND_HOST:TALLY_API_PORT")
    stats.set_defaults(func=cmd_stats)


class ApiError(Exception):
    pass


def api_url(settings: Settings, explicit: str | None) -> str:
    from tally.roots import read_run_state

    url = explicit or read_run_state(settings.home).get("api_url") or \
        f"http://{settings.bind_host}:{settings.api_port}"
    return str(url).rstrip("/")


def _get(base: str, path: str, token: str | None, query: dict[str, str] | None = None) -> dict:
    url = base + path + (f"?{urlencode(query)}" if query else "")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = str(exc)
        raise ApiError(f"{exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise ApiError(f"cannot reach the API at {base} ({exc.reason}); is `tally up` running?") from None


def _site_tz(base: str, token: str | None, domain: str) -> str:
    try:
        listing = _get(base, "/api/v1/domains", token)
    except ApiError:
        return "UTC"
    for entry in listing.get("domains", []):
        if entry.get("domain") == domain.lower().rstrip("."):
            return str(entry.get("tz") or "UTC")
    return "UTC"


def fetch(settings: Settings, args: argparse.Namespace) -> dict:
    from tally.roots import cli_token

    base, token = api_url(settings, args.api_url), cli_token(settings)
    domain = quote(args.domain, safe="")
    summary = _get(base, f"/api/v1/domains/{domain}/summary", token, {"last": args.last})
    tz = args.tz or _site_tz(base, token, args.domain)
    query = {"from": summary["from"], "to": summary["as_of"], "tz": tz,
             "granularity": args.granularity or DEFAULT_GRANULARITY[args.last]}
    series = {metric: _get(base, f"/api/v1/domains/{domain}/{metric}", token, query)
              for metric in ("impressions", "pageviews")}
    return {"summary": summary, "series": series}


def _change(m: dict) -> str:
    if m["change_pct"] is None:
        return "new" if m["total"] else "–"
    return f"{m['change_pct']:+.2f}%"


def render(data: dict, console) -> None:
    from rich.table import Table

    summary, series = data["summary"], data["series"]
    imp, pv = series["impressions"], series["pageviews"]
    tz = ZoneInfo(imp["tz"])
    local = lambda text: datetime.fromisoformat(text).astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")  # noqa: E731
    totals = Table(title=f"{summary['domain']}, last {summary['last']}: {local(summary['from'])} to "
                         f"{local(summary['as_of'])} (the last quarter hour is still filling)")
    for column in ("metric", "total", "previous", "change", "valued", "value sum", "value avg"):
        totals.add_column(column, justify="left" if column == "metric" else "right")
    for metric in ("impressions", "pageviews"):
        m = summary["metrics"][metric]
        totals.add_row(metric, f"{m['total']:,}", f"{m['previous_total']:,}", _change(m), f"{m['valued']:,}",
                       m["value_sum"], m["value_avg"] or "–")
    console.print(totals)
    title = f"per {imp['granularity']} bucket, {imp['tz']}"
    if imp["buckets"] and datetime.fromisoformat(imp["buckets"][0]["start"]) < datetime.fromisoformat(summary["from"]):
        title += " (the first bucket starts before the period, so its counts may differ from the totals)"
    buckets = Table(title=title)
    for column in ("bucket start", "impressions", "page views", "value sum"):
        buckets.add_column(column, justify="left" if column == "bucket start" else "right")
    for a, b in zip(imp["buckets"], pv["buckets"]):
        start = datetime.fromisoformat(a["start"]).strftime("%Y-%m-%d %H:%M%z")
        if "length_s" in a:
            start += f" ({a['length_s'] / 3600:g} h)"
        value_sum = f"{float(a['value_sum']) + float(b['value_sum']):.6f}"
        buckets.add_row(start, f"{a['count']:,}", f"{b['count']:,}", value_sum)
    buckets.add_section()
    buckets.add_row("total", f"{imp['total']:,}", f"{pv['total']:,}",
                    f"{float(imp['value_sum']) + float(pv['value_sum']):.6f}")
    console.print(buckets)


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    try:
        data = fetch(settings, args)
    except ApiError as exc:
        print(f"tally stats: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data))
        return 0
    from rich.console import Console

    render(data, Console())
    return 0
