"""`tally stats DOMAIN --last 24h`: the dashboard's numbers in the terminal, read through the API.

It calls `GET /api/v1/domains/<domain>/summary?last=` and the two series endpoints for the same period
with the CLI token (TALLY_TOKEN, else the admin token `tally up` wrote), and prints them with rich:
one table of totals, value sum / average and the change from the previous period, and one table with a
row per bucket. The API URL is the running `tally up`'s (from its run state), else
http://TALLY_BIND_HOST:TALLY_API_PORT, or `--api-url`.

`--last` takes any duration (10m, 24h, 30d, 90d: tally/timespec.py). The API's summary covers 1h, 24h
and 7d, with the previous period; for another length the totals come from the two series alone (no
previous period), as on the dashboard.

Exit codes: 0 done, 1 the API refused or could not be reached, 2 usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from core.config import Settings

if TYPE_CHECKING:
    from tally.cli_support import SubParsers

SUMMARY_PERIODS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}  # what the API's summary endpoint takes
DEFAULT_GRANULARITY = {"1h": "15m", "24h": "1h", "7d": "1d"}
MAX_PERIOD = timedelta(days=3660)


def _period(text: str) -> str:
    """`--last`: a duration; one the summary endpoint knows is given in its name (60m -> 1h)."""
    from tally.timespec import TimeSyntaxError, parse_duration

    try:
        length = parse_duration(text, "--last")
    except TimeSyntaxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not timedelta(minutes=1) <= length <= MAX_PERIOD:
        raise argparse.ArgumentTypeError(f"--last {text!r} must be between 1m and {MAX_PERIOD.days}d")
    by_length = {seconds: name for name, seconds in SUMMARY_PERIODS.items()}
    seconds = int(length.total_seconds())
    return by_length.get(seconds, text.strip())


def _granularity(seconds: float) -> str:
    return "15m" if seconds <= 6 * 3600 else "1h" if seconds <= 3 * 86400 else "1d"


def register(sub: SubParsers) -> None:
    """Add this group's subparsers; each sets `func=handler(settings, args) -> exit code`."""
    stats = sub.add_parser("stats", help="print a domain's totals and per-bucket counts (through the API)",
                           description="Totals, value sum and average and the change from the previous period "
                           "(the current, partial quarter hour included), then one row per bucket; read through "
                           "the API with TALLY_TOKEN or the admin token of `tally up`.")
    stats.add_argument("domain")
    stats.add_argument("--last", type=_period, default="24h", metavar="DURATION",
                       help="the period up to now: 1h, 24h, 7d, 30d, 90d, ... (default 24h; the change from the "
                       "previous period is shown for 1h, 24h and 7d)")
    stats.add_argument("--granularity", choices=("15m", "1h", "1d"), default=None,
                       help="bucket size of the table (default: 15m up to 6h, 1h up to 3d, else 1d)")
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


def _get(base: str, path: str, token: str | None, query: dict[str, str] | None = None) -> dict[str, Any]:
    url = base + path + (f"?{urlencode(query)}" if query else "")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer
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


def fetch(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The API's answers: {"summary": the summary endpoint's (None for a period it does not take),
    "series": {"impressions": ..., "pageviews": ...}}."""
    from tally.roots import cli_token
    from tally.timespec import parse_duration

    base, token = api_url(settings, args.api_url), cli_token(settings)
    domain = quote(args.domain, safe="")
    summary: dict[str, Any] | None = None
    if args.last in SUMMARY_PERIODS:
        summary = _get(base, f"/api/v1/domains/{domain}/summary", token, {"last": args.last})
        start, end = summary["from"], summary["as_of"]
        seconds = float(SUMMARY_PERIODS[args.last])
    else:
        now = datetime.now(UTC).replace(microsecond=0)
        seconds = parse_duration(args.last, "--last").total_seconds()
        start, end = (now - timedelta(seconds=seconds)).isoformat(), now.isoformat()
    tz = args.tz or _site_tz(base, token, args.domain)
    query = {"from": start, "to": end, "tz": tz, "granularity": args.granularity or
             DEFAULT_GRANULARITY.get(args.last) or _granularity(seconds)}
    series = {metric: _get(base, f"/api/v1/domains/{domain}/{metric}", token, query)
              for metric in ("impressions", "pageviews")}
    return {"last": args.last, "summary": summary, "series": series}


def _change(m: dict[str, Any]) -> str:
    if m["change_pct"] is None:
        return "new" if m["total"] else "–"
    return f"{m['change_pct']:+.2f}%"


def _local(text: str, tz: ZoneInfo) -> str:
    return datetime.fromisoformat(text).astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")


def _totals_table(data: dict[str, Any]) -> Any:  # -> rich.table.Table
    from rich.table import Table

    summary, series = data["summary"], data["series"]
    imp = series["impressions"]
    tz = ZoneInfo(imp["tz"])
    if summary is not None:
        title = (f"{summary['domain']}, last {summary['last']}: {_local(summary['from'], tz)} to "
                 f"{_local(summary['as_of'], tz)} (the last quarter hour is still filling)")
    else:
        title = (f"{imp['domain']}, last {data['last']}: {_local(imp['from'], tz)} to {_local(imp['to'], tz)} "
                 "(no previous period: the API compares 1h, 24h and 7d)")
    totals = Table(title=title)
    for column in ("metric", "total", "previous", "change", "valued", "value sum", "value avg"):
        totals.add_column(column, justify="left" if column == "metric" else "right")
    for metric in ("impressions", "pageviews"):
        if summary is not None:
            m = summary["metrics"][metric]
            previous, change = f"{m['previous_total']:,}", _change(m)
        else:
            m, previous, change = series[metric], "–", "–"
        totals.add_row(metric, f"{m['total']:,}", previous, change, f"{m['valued']:,}", m["value_sum"],
                       m["value_avg"] or "–")
    return totals


def _buckets_table(data: dict[str, Any]) -> Any:  # -> rich.table.Table
    from rich.table import Table

    imp, pv = data["series"]["impressions"], data["series"]["pageviews"]
    start_of_period = data["summary"]["from"] if data["summary"] is not None else imp["from"]
    title = f"per {imp['granularity']} bucket, {imp['tz']}"
    if imp["buckets"] and datetime.fromisoformat(imp["buckets"][0]["start"]) < datetime.fromisoformat(start_of_period):
        title += " (the first bucket starts before the period, so its counts may differ from the totals)"
    buckets = Table(title=title)
    for column in ("bucket start", "impressions", "page views", "value sum"):
        buckets.add_column(column, justify="left" if column == "bucket start" else "right")
    for a, b in zip(imp["buckets"], pv["buckets"], strict=False):
        start = datetime.fromisoformat(a["start"]).strftime("%Y-%m-%d %H:%M%z")
        if "length_s" in a:
            start += f" ({a['length_s'] / 3600:g} h)"
        value_sum = f"{float(a['value_sum']) + float(b['value_sum']):.6f}"
        buckets.add_row(start, f"{a['count']:,}", f"{b['count']:,}", value_sum)
    buckets.add_section()
    buckets.add_row("total", f"{imp['total']:,}", f"{pv['total']:,}",
                    f"{float(imp['value_sum']) + float(pv['value_sum']):.6f}")
    return buckets


def render(data: dict[str, Any], console: Any) -> None:
    """The totals table, then one row per bucket (rich)."""
    console.print(_totals_table(data))
    console.print(_buckets_table(data))


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
