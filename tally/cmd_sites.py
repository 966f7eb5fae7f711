"""`tally sites add|list|show|update|rotate-secret|remove|sign-pixel`: admin commands against PostgreSQL
(TALLY_PG_DSN or a running `tally up`).

Exit codes: 0 done, 1 refused (duplicate domain, bad time zone, origin or query parameter name, unknown
domain, a pixel lifetime beyond TALLY_PIXEL_MAX_TTL_S, PostgreSQL unreachable) with a message on stderr,
2 configuration error (from `tally.cli`). `update` follows ADR 40 throughout: 2 for a bad value (origin,
time zone, rate, burst, query parameter name, account), 1 for what is not there (the domain, an origin
to remove).
The secret is printed only by `add` and `rotate-secret`, to stdout, never logged.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC
from typing import TYPE_CHECKING, Any

import psycopg

from core.config import Settings
from tally.roots import read_run_state, require_pg

if TYPE_CHECKING:
    from tally.cli_support import SubParsers


def register(sub: SubParsers) -> None:
    """Add this group's subparsers; each sets `func=handler(settings, args) -> exit code`."""
    sites = sub.add_parser("sites", help="register the sites (domains) that may send events")
    cmds = sites.add_subparsers(dest="sites_command", required=True, metavar="SUBCOMMAND")

    add = cmds.add_parser("add", help="register a domain; prints its site key, secret and tag snippet")
    add.add_argument("domain")
    add.add_argument("--tz", default="UTC", help="IANA time zone of the site (default UTC)")
    add.add_argument("--origin", action="append", default=[], metavar="ORIGIN",
                     help="a page origin allowed to send (https://example.com); repeat for several")
    add.add_argument("--rate", type=float, default=None, metavar="N",
                     help="events per second this site may send (default TALLY_SITE_RATE_PER_S)")
    add.add_argument("--burst", type=int, default=None, metavar="N",
                     help="events this site may send at once (default TALLY_SITE_BURST)")
    add.add_argument("--respect-dnt", action="store_true", help="the tag sends nothing when Do Not Track is on")
    add.add_argument("--account", default=None, metavar="NAME", help="the customer the site belongs to (free text)")
    _url_rule_arguments(add)
    add.add_argument("--json", action="store_true", help="print one JSON object")
    add.set_defaults(func=cmd_add)

    _update_parser(cmds)

    ls = cmds.add_parser("list", help="list the registered sites (no secrets)")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(func=cmd_list)

    show = cmds.add_parser("show", help="one site (no secret), with its rate limit and each collector host's and "
                                        "worker's share of it")
    show.add_argument("domain")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.add_argument("--tag", action="store_true",
                      help="print only the site's page tag, with data-domain (it counts for the site on any host: "
                           "localhost, staging)")
    show.set_defaults(func=cmd_show)

    rotate = cmds.add_parser("rotate-secret", help="give a site a new secret (the old one stops working)")
    rotate.add_argument("domain")
    rotate.add_argument("--json", action="store_true", help="print one JSON object")
    rotate.set_defaults(func=cmd_rotate_secret)

    rm = cmds.add_parser("remove", help="unregister a site (its key stops being accepted)")
    rm.add_argument("domain")
    rm.add_argument("--json", action="store_true", help="print one JSON object")
    rm.set_defaults(func=cmd_remove)

    sign = cmds.add_parser("sign-pixel", help="print a signed pixel URL (/i.gif) for a site (README: Signed pixels)")
    sign.add_argument("domain")
    sign.add_argument("--url", required=True, help="the page or message the pixel counts (absolute http(s) URL)")
    sign.add_argument("--ttl", required=True, metavar="DURATION",
                      help="how long the URL is valid: a number with s, m, h or d (e.g. 7d), at most "
                           "TALLY_PIXEL_MAX_TTL_S (default 7d)")
    sign.add_argument("--type", default="pageview", choices=("pageview", "impression"),
                      help="the event type (default pageview)")
    sign.add_argument("--value", default=None, help="a decimal value for the event (optional)")
    sign.add_argument("--referrer", default=None, help="a referrer URL for the event (optional)")
    sign.add_argument("--collector-url", default=None, metavar="URL",
                      help="the collector's base URL (default: the running `tally up`'s, else "
                           "http://TALLY_BIND_HOST:TALLY_COLLECTOR_PORT)")
    sign.add_argument("--json", action="store_true", help="print one JSON object (url, exp)")
    sign.set_defaults(func=cmd_sign_pixel)


def _update_parser(cmds: SubParsers) -> None:
    """`tally sites update`: every change in one transaction; the key and secret stay."""
    update = cmds.add_parser("update", help="change a site's origins, time zone, rate limit, account or what its "
                                            "event URLs keep (README: What URLs keep); its key and secret stay")
    update.add_argument("domain")
    update.add_argument("--add-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow another page origin (https://example.com); repeat for several")
    update.add_argument("--remove-origin", action="append", default=[], metavar="ORIGIN",
                        help="withdraw a registered page origin; repeat for several")
    update.add_argument("--tz", default=None, help="the site's IANA time zone (says which tiers need `tally rebuild`)")
    _url_rule_arguments(update, changing=True)
    update.add_argument("--rate", type=float, default=None, metavar="N", help="events per second this site may send")
    update.add_argument("--burst", type=int, default=None, metavar="N", help="events this site may send at once")
    update.add_argument("--account", default=None, metavar="NAME",
                        help="the customer the site belongs to ('' clears it)")
    update.add_argument("--json", action="store_true", help="print one JSON object")
    update.set_defaults(func=cmd_update)


def _url_rule_arguments(parser: argparse.ArgumentParser, *, changing: bool = False) -> None:
    """--keep-query / --raw-urls (and, to change a site, --clean-urls): the site's URL rule (core/urls.py)."""
    parser.add_argument("--keep-query", default=None, metavar="NAME,NAME",
                        help="query parameters its page URLs keep besides utm_source, utm_medium, utm_campaign, "
                             "utm_term and utm_content (comma-separated; '' for none)")
    raw = parser.add_mutually_exclusive_group() if changing else parser
    raw.add_argument("--raw-urls", action="store_const", const=True, default=None,
                     help="store page URLs and referrers as sent (query strings, fragments, full referrers)")
    if changing:
        raw.add_argument("--clean-urls", dest="raw_urls", action="store_const", const=False,
                         help="back to the default rule (query strings cut to the kept parameters, no fragments, "
                              "referrers of other sites as their origin)")


def _keep_query(text: str | None) -> list[str] | None:
    return None if text is None else [n for n in text.split(",") if n.strip()]


def collector_url(settings: Settings) -> str:
    """The running `tally up`'s collector URL, else the one TALLY_BIND_HOST / TALLY_COLLECTOR_PORT give."""
    url = read_run_state(settings.home).get("collector_url")
    return str(url) if url else f"http://{settings.bind_host}:{settings.collector_port}"


def tag_snippet(settings: Settings, site_key: str, keep_query: tuple[str, ...] = (), raw_urls: bool = False,
                domain: str | None = None) -> str:
    """The page tag; with the site's URL rule, so the tag keeps what the collector keeps (core/urls.py), and with
    `domain` as its data-domain (events count for that site whatever host the page is on)."""
    attrs = (' data-raw-urls="true"' if raw_urls
             else f' data-keep-query="{",".join(keep_query)}"' if keep_query else "")
    attrs += f' data-domain="{domain}"' if domain else ""
    return f'<script defer src="{collector_url(settings)}/tag.js" data-site="{site_key}"{attrs}></script>'


def _fail(message: str, code: int = 1) -> int:
    """Say what went wrong; exit 1 (a finding), or 2 for a bad argument value (the CLI's exit codes, ADR 40)."""
    print(f"tally sites: {message}", file=sys.stderr)
    return code


def _run(settings: Settings, action: Any, *, bad_value_exit: int = 1) -> int:
    """Run `action(dsn)` with the schema in place; SiteError and an unreachable PostgreSQL exit 1 (a bad
    value, SiteError `invalid_*`, exits `bad_value_exit`: `update` gives 2, as ADR 40 says)."""
    from oltp.schema import ensure_schema
    from oltp.sites import SiteError

    dsn = require_pg(settings)
    try:
        ensure_schema(dsn)
        return int(action(dsn))
    except SiteError as exc:
        return _fail(exc.message, bad_value_exit if exc.code.startswith("invalid_") else 1)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(f"cannot reach PostgreSQL ({reason}); is `tally up` running, or TALLY_PG_DSN right?")


def cmd_add(settings: Settings, args: argparse.Namespace) -> int:
    from oltp import sites

    def action(dsn: str) -> int:
        site = sites.add(dsn, args.domain, tz=args.tz, origins=args.origin, rate_per_s=args.rate,
                         burst=args.burst, respect_dnt=args.respect_dnt, keep_query=_keep_query(args.keep_query) or (),
                         raw_urls=bool(args.raw_urls), account=args.account)
        tag = tag_snippet(settings, site.site_key, site.keep_query, site.raw_urls)
        if args.json:
            out = site.public_dict()
            out["secret"] = site.secret
            out["tag"] = tag
            print(json.dumps(out))
            return 0
        print(f"""registered {site.domain} (time zone {site.tz})
  site key  {site.site_key}      (public: goes into the page tag and every hit)
  secret    {site.secret}      (private: keep it on your server; it signs pixel URLs)
  origins   {', '.join(site.origins) or '(none: the collector refuses the tag on any page; add --origin)'}

Put this tag on your pages:
  {tag}
or send events yourself:
  curl -X POST '{collector_url(settings)}/collect?site={site.site_key}' -H 'Content-Type: application/json' \\
    -d '{{"domain": "{site.domain}", "url": "https://{site.domain}/", "type": "pageview"}}'""")
        return 0

    return _run(settings, action)


def cmd_update(settings: Settings, args: argparse.Namespace) -> int:
    """One transaction of every change asked (oltp.sites.update); the key and the secret stay."""
    from oltp import sites

    keep = _keep_query(args.keep_query)
    change = sites.Change(tuple(args.add_origin), tuple(args.remove_origin), args.tz, args.rate, args.burst,
                          None if keep is None else tuple(keep), args.raw_urls,
                          sites.UNCHANGED if args.account is None else args.account)
    if change == sites.Change():
        return _fail("update: nothing to change; give --add-origin, --remove-origin, --tz, --rate, --burst, "
                     "--account, --keep-query, --raw-urls or --clean-urls", code=2)

    def action(dsn: str) -> int:
        before, site = sites.update(dsn, args.domain, change)
        tag = tag_snippet(settings, site.site_key, site.keep_query, site.raw_urls)
        rebuild = zone_change(settings, before, site)
        if args.json:
            print(json.dumps({**site.public_dict(), "tag": tag, "rebuild": rebuild}))
            return 0
        print(_update_text(settings, args, site, tag, rebuild))
        return 0

    return _run(settings, action, bad_value_exit=2)


def zone_change(settings: Settings, before: Any, after: Any) -> dict[str, Any] | None:
    """What a time zone change means for the rollup tiers (oltp/tiers.py, ADR 19), or None if the zone
    stayed: 15m and 1h are UTC buckets and unaffected; 1d is written in the new zone from the first local
    day starting an hour from now, and `tally rebuild` (from ClickHouse's raw events) redoes the days before
    in it: from the site's registration, or as far back as raw events are kept (TALLY_RAW_RETENTION_DAYS)."""
    from datetime import datetime, timedelta

    if before.tz == after.tz:
        return None
    since = after.created_at.astimezone(UTC).strftime("%Y-%m-%dT00:00:00Z") if after.created_at else None
    days = settings.raw_retention_days
    if since is None or (days and after.created_at < datetime.now(UTC) - timedelta(days=days)):
        since = f"{days or 400}d"
    return {"from_tz": before.tz, "to_tz": after.tz, "unaffected": ["15m", "1h"], "tiers": ["1d"],
            "command": f"tally rebuild --from {since} --domain {after.domain}"}


def _update_text(settings: Settings, args: argparse.Namespace, site: Any, tag: str,
                 rebuild: dict[str, Any] | None) -> str:
    lines = [f"updated {site.domain} (site key and secret unchanged): {_url_rule_text(site.keep_query, site.raw_urls)}"]
    if args.rate is not None or args.burst is not None:
        lines.append(f"  limit     {site.rate_per_s or settings.site_rate_per_s:g} events/s, burst "
                     f"{site.burst or settings.site_burst}")
    if args.add_origin or args.remove_origin:
        lines.append(f"  origins   {', '.join(site.origins) or '(none: browsers are refused; add --add-origin)'}")
    if args.account is not None:
        lines.append(f"  account   {site.account or '(none)'}")
    if rebuild is not None:
        lines.append(f"  time zone {rebuild['from_tz']} -> {rebuild['to_tz']}: the 15m and 1h tiers (UTC) are "
                     "unaffected; the daily tier (1d) is written in the new zone from the first local day starting "
                     f"an hour from now. To redo the days before in it: {rebuild['command']}")
    lines.append(f"collectors apply it within {settings.registry_refresh_s:g} s; the page tag for it:\n  {tag}")
    return "\n".join(lines)


def _url_rule_text(keep_query: tuple[str, ...], raw_urls: bool) -> str:
    from core.urls import DEFAULT_KEEP_QUERY

    if raw_urls:
        return "URLs and referrers are stored as sent"
    return f"page URLs keep the query parameters {', '.join(DEFAULT_KEEP_QUERY + keep_query)}; no fragments"


def collector_layout(settings: Settings) -> tuple[int, int]:
    """(collector hosts, workers per host) sharing every site's limit: the running `tally up`'s (its run state's
    `collector_hosts`, `collector_workers`), else TALLY_COLLECTOR_HOSTS and TALLY_COLLECTOR_WORKERS here (run
    `tally sites` with the collectors' settings)."""
    state = read_run_state(settings.home)
    hosts, workers = state.get("collector_hosts"), state.get("collector_workers")
    return (hosts if isinstance(hosts, int) and hosts >= 1 else settings.collector_hosts,
            workers if isinstance(workers, int) and workers >= 1 else settings.collector_workers)


def limit_shares(settings: Settings, rate_per_s: float | None, burst: int | None) -> dict[str, Any]:
    """A site's limit (its own, else the defaults) and what each collector host, each worker and one client
    address of it enforce (collector.site_limits.worker_share: the collectors' own rule; ADR 60)."""
    from collector.site_limits import worker_share

    hosts, workers = collector_layout(settings)
    rate, size = rate_per_s or settings.site_rate_per_s, burst or settings.site_burst
    item = worker_share(rate, size, hosts=hosts, workers=workers)
    address = max(1, int(item.amount * settings.site_address_share))
    return {"rate_per_s": rate, "burst": size, "own": rate_per_s is not None or burst is not None,
            "hosts": hosts, "workers": workers,
            "per_host": {"rate_per_s": rate / hosts, "burst": -(-size // hosts)},
            "per_worker": {"rate_per_s": rate / (hosts * workers), "events": item.amount, "window_s": item.window},
            "per_address": {"events": address, "window_s": item.window}}


def _limit_text(limit: dict[str, Any]) -> str:
    host, worker, address = limit["per_host"], limit["per_worker"], limit["per_address"]
    return (f"{limit['rate_per_s']:g} events/s, burst {limit['burst']} "
            f"({'its own' if limit['own'] else 'TALLY_SITE_RATE_PER_S / TALLY_SITE_BURST'}), in total across "
            f"{limit['hosts']} collector host(s) x {limit['workers']} worker(s)\n"
            f"  per host  {host['rate_per_s']:g} events/s, burst {host['burst']} (TALLY_COLLECTOR_HOSTS "
            f"{limit['hosts']}; a balancer that spreads the site's requests evenly gives it the whole limit)\n"
            f"  per worker at most {worker['events']} events per {worker['window_s']} s window "
            f"({worker['rate_per_s']:g} events/s; TALLY_COLLECTOR_WORKERS {limit['workers']})\n"
            f"  one client address at most {address['events']} events per {address['window_s']} s window of each "
            "worker (TALLY_SITE_ADDRESS_SHARE)")


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    """One site without its secret, with its limit and the shares each host, worker and address enforce."""
    from oltp import sites

    def action(dsn: str) -> int:
        site = sites.get(dsn, args.domain)
        if site is None:
            return _fail(f"{sites.check_domain(args.domain)} is not registered (see `tally sites list`)")
        if args.tag:
            print(tag_snippet(settings, site.site_key, site.keep_query, site.raw_urls, site.domain))
            return 0
        row = {**site.public_dict(), "limit": limit_shares(settings, site.rate_per_s, site.burst)}
        if args.json:
            print(json.dumps(row))
            return 0
        print(f"{site.domain}\n  account   {site.account or '-'}\n  tz        {site.tz}\n"
              f"  site key  {site.site_key}\n  origins   {', '.join(site.origins) or '-'}\n"
              f"  urls      {_url_rule_text(site.keep_query, site.raw_urls)}\n  limit     {_limit_text(row['limit'])}")
        return 0

    return _run(settings, action)


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    from oltp import sites

    def action(dsn: str) -> int:
        rows = [{**s.public_dict(), "limit": limit_shares(settings, s.rate_per_s, s.burst)}
                for s in sites.list_sites(dsn)]
        if args.json:
            print(json.dumps(rows))
            return 0
        if not rows:
            print("no sites registered; add one with `tally sites add DOMAIN`")
            return 0
        print("domain\taccount\ttz\tsite key\torigins\trate/s\tburst\turls")
        for r in rows:
            urls = "raw" if r["raw_urls"] else "+" + ",".join(r["keep_query"]) if r["keep_query"] else "default"
            print("\t".join([r["domain"], r["account"] or "-", r["tz"], r["site_key"], ",".join(r["origins"]) or "-",
                             "default" if r["rate_per_s"] is None else f"{r['rate_per_s']:g}",
                             "default" if r["burst"] is None else str(r["burst"]), urls]))
        hosts, workers = rows[0]["limit"]["hosts"], rows[0]["limit"]["workers"]
        print(f"(rate/s and burst are each site's total: each of {hosts} collector host(s) enforces 1/{hosts} of "
              f"them, each of its {workers} worker(s) 1/{hosts * workers}; `tally sites show DOMAIN` shows the shares)")
        return 0

    return _run(settings, action)


def cmd_rotate_secret(settings: Settings, args: argparse.Namespace) -> int:
    from oltp import sites

    def action(dsn: str) -> int:
        secret = sites.rotate_secret(dsn, args.domain)
        domain = sites.check_domain(args.domain)
        print(json.dumps({"domain": domain, "secret": secret}) if args.json
              else f"new secret for {domain}: {secret}\n(the old secret no longer works; the site key is unchanged)")
        return 0

    return _run(settings, action)


def cmd_remove(settings: Settings, args: argparse.Namespace) -> int:
    from oltp import sites

    def action(dsn: str) -> int:
        sites.remove(dsn, args.domain)
        domain = sites.check_domain(args.domain)
        print(json.dumps({"domain": domain, "removed": True}) if args.json else
              f"removed {domain}; collectors refuse its key within {settings.registry_refresh_s:g} s")
        return 0

    return _run(settings, action)


def parse_ttl(text: str, max_ttl_s: int) -> int:
    """`7d`, `12h`, `15m`, `90s` as seconds (tally/timespec.py; 1 s .. `max_ttl_s`, TALLY_PIXEL_MAX_TTL_S: the
    collector refuses a URL whose `exp` is further away); ValueError otherwise."""
    from tally.timespec import parse_duration

    seconds = int(parse_duration(text, "--ttl").total_seconds())  # TimeSyntaxError is a ValueError
    if not 0 < seconds <= max_ttl_s:
        raise ValueError(f"--ttl {text.strip()!r} must be between 1s and {max_ttl_s}s ({max_ttl_s / 86400:g}d, "
                         "TALLY_PIXEL_MAX_TTL_S): the collector refuses pixel URLs that live longer")
    return seconds


def pixel_url(base: str, secret: str, params: dict[str, str]) -> str:
    """`<base>/i.gif?<signed query>` (core/pixel.py's rule)."""
    from core.pixel import signed_query

    return f"{base.rstrip('/')}/i.gif?{signed_query(secret, params)}"


def cmd_sign_pixel(settings: Settings, args: argparse.Namespace) -> int:
    import time
    from datetime import datetime

    from core.event import EventError, HitContext, Limits, event_from_hit
    from oltp import sites

    try:
        ttl = parse_ttl(args.ttl, settings.pixel_max_ttl_s)
    except ValueError as exc:
        return _fail(str(exc), code=2)
    base = args.collector_url or collector_url(settings)
    if not base.startswith(("http://", "https://")) or any(c.isspace() for c in base):
        return _fail(f"--collector-url {base!r} must be an http(s) URL", code=2)

    def action(dsn: str) -> int:
        site = sites.get(dsn, args.domain)
        if site is None:
            return _fail(f"{sites.check_domain(args.domain)} is not registered (see `tally sites list`)")
        event = {"domain": site.domain, "url": args.url, "type": args.type}
        if args.value is not None:
            event["value"] = args.value
        if args.referrer is not None:
            event["referrer"] = args.referrer
        try:  # exactly what the collector will check, so that a signed URL is never refused as invalid
            stored = event_from_hit(event, HitContext(received_at=datetime.now(UTC)), Limits(), b"check",
                                    urls=site.url_rule)
        except EventError as exc:
            return _fail(f"--{exc.field}: {exc.problem}", code=2)
        if stored.url != args.url:
            print(f"tally sites: note: the collector stores the URL as {stored.url} (the site's URL rule; "
                  "see `tally sites update --keep-query`)", file=sys.stderr)
        exp = int(time.time()) + ttl
        url = pixel_url(base, site.secret, {"site": site.site_key, **event, "exp": str(exp)})
        print(json.dumps({"url": url, "exp": exp}) if args.json else url)
        return 0

    return _run(settings, action)
