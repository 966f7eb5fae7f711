"""`tally sites add|list|rotate-secret|remove`: admin commands against PostgreSQL (TALLY_PG_DSN or a running `tally up`).

Exit codes: 0 done, 1 refused (duplicate domain, bad time zone or origin, unknown domain,
PostgreSQL unreachable) with a message on stderr, 2 configuration error (from `tally.cli`).
The secret is printed only by `add` and `rotate-secret`, to stdout, never logged.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import psycopg

from core.config import Settings
from tally.roots import read_run_state, require_pg


def register(sub: argparse._SubParsersAction) -> None:
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
    add.add_argument("--json", action="store_true", help="print one JSON object")
    add.set_defaults(func=cmd_add)

    ls = cmds.add_parser("list", help="list the registered sites (no secrets)")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(func=cmd_list)

    rotate = cmds.add_parser("rotate-secret", help="give a site a new secret (the old one stops working)")
    rotate.add_argument("domain")
    rotate.add_argument("--json", action="store_true", help="print one JSON object")
    rotate.set_defaults(func=cmd_rotate_secret)

    rm = cmds.add_parser("remove", help="unregister a site (its key stops being accepted)")
    rm.add_argument("domain")
    rm.set_defaults(func=cmd_remove)


def collector_url(settings: Settings) -> str:
    """The running `tally up`'s collector URL, else the one TALLY_BIND_HOST / TALLY_COLLECTOR_PORT give."""
    url = read_run_state(settings.home).get("collector_url")
    return str(url) if url else f"http://{settings.bind_host}:{settings.collector_port}"


def tag_snippet(settings: Settings, site_key: str) -> str:
    return f'<script defer src="{collector_url(settings)}/tag.js" data-site="{site_key}"></script>'


def _fail(message: str) -> int:
    print(f"tally sites: {message}", file=sys.stderr)
    return 1


def _run(settings: Settings, action: Any) -> int:
    """Run `action(dsn)` with the schema in place; SiteError and an unreachable PostgreSQL exit 1."""
    from oltp.schema import ensure_schema
    from oltp.sites import SiteError

    dsn = require_pg(settings)
    try:
        ensure_schema(dsn)
        return int(action(dsn))
    except SiteError as exc:
        return _fail(exc.message)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(f"cannot reach PostgreSQL ({reason}); is `tally up` running, or TALLY_PG_DSN right?")


def cmd_add(settings: Settings, args: argparse.Namespace) -> int:
    from oltp import sites

    def action(dsn: str) -> int:
        site = sites.add(dsn, args.domain, tz=args.tz, origins=args.origin, rate_per_s=args.rate,
                         burst=args.burst, respect_dnt=args.respect_dnt)
        tag = tag_snippet(settings, site.site_key)
        if args.json:
            out = site.public_dict()
            out["secret"] = site.secret
            out["tag"] = tag
            print(json.dumps(out))
            return 0
        print(f"""registered {site.domain} (time zone {site.tz})
  site key  {site.site_key}      (public: goes into the page tag and every hit)
  secret    {site.secret}      (private: keep it on your server; it signs pixel URLs)
  origins   {', '.join(site.origins) or '(none)'}

Put this tag on your pages:
  {tag}
or send events yourself:
  curl -X POST '{collector_url(settings)}/collect?site={site.site_key}' -H 'Content-Type: application/json' \\
    -d '{{"domain": "{site.domain}", "url": "https://{site.domain}/", "type": "pageview"}}'""")
        return 0

    return _run(settings, action)


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    from oltp import sites

    def action(dsn: str) -> int:
        rows = [s.public_dict() for s in sites.list_sites(dsn)]
        if args.json:
            print(json.dumps(rows))
            return 0
        if not rows:
            print("no sites registered; add one with `tally sites add DOMAIN`")
            return 0
        print("domain\ttz\tsite key\torigins\trate/s\tburst")
        for r in rows:
            print("\t".join([r["domain"], r["tz"], r["site_key"], ",".join(r["origins"]) or "-",
                             "default" if r["rate_per_s"] is None else f"{r['rate_per_s']:g}",
                             "default" if r["burst"] is None else str(r["burst"])]))
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
        print(f"removed {sites.check_domain(args.domain)}; collectors refuse its key within "
              f"{settings.registry_refresh_s:g} s")
        return 0

    return _run(settings, action)
