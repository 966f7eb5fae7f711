"""Synthetic traffic for `tally up --demo`: real HTTP hits, with the demo sites' keys, against the running collector.

Enough for an analyst to ask the design's questions locally (olap/questions.py, docs/analysts.md): the demo sites
belong to two accounts (`DEMO_ACCOUNTS`), the batches come "from" public addresses of several countries
(`DEMO_ADDRESSES`, sent as `X-Forwarded-For`, which the demo stack alone believes from its own loopback sender:
`demo_settings`), with three browsers, some valued events, and times over the last two days (so "yesterday" and
"last week" have answers)."""

from __future__ import annotations

import json
import logging
import random
import threading
import urllib.request
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config import Settings

log = logging.getLogger(__name__)

DEMO_DOMAINS = ("demo.tally.test", "shop.tally.test", "blog.tally.test")
# The customer each demo site belongs to: two accounts, so "revenue by account" has rows to compare.
DEMO_ACCOUNTS = {"demo.tally.test": "Acme Inc.", "shop.tally.test": "Acme Inc.", "blog.tally.test": "Globex Ltd."}
# Public addresses the demo's batches are forwarded for, with the country the collector's embedded registry data
# places them in (a test checks): five in Europe, four elsewhere. Nothing is ever sent to them.
DEMO_ADDRESSES = {"193.99.144.80": "DE", "80.67.169.12": "FR", "212.58.244.20": "GB", "194.109.6.66": "NL",
                  "130.59.31.80": "CH", "8.8.8.8": "US", "200.160.2.3": "BR", "133.242.0.3": "JP",
                  "196.25.1.1": "ZA"}
# The demo's sender: the only peers whose X-Forwarded-For the demo stack believes.
DEMO_PROXIES = ("127.0.0.1/32", "::1/128")
_UAS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0",
)


def demo_settings(settings: Settings) -> Settings:
    """The settings of `tally up --demo`: the collector also believes `X-Forwarded-For` from loopback (DEMO_PROXIES,
    added to any TALLY_TRUSTED_PROXIES given), so the demo's events get countries. Without --demo nothing changes:
    by default no proxy is believed (ADR 44)."""
    extra = tuple(ip_network(net) for net in DEMO_PROXIES if ip_network(net) not in settings.trusted_proxies)
    trusted = (*settings.trusted_proxies, *extra)
    raw = {**settings.raw, "TALLY_TRUSTED_PROXIES": ",".join(str(net) for net in trusted)}  # the children's env
    return settings.with_overrides(trusted_proxies=trusted, raw=raw)


def register_demo_sites(dsn: str) -> dict[str, str]:
    """Register each demo domain with its account unless it already is (idempotent; a demo site registered
    before accounts existed gets its account); returns {domain: site key}."""
    from oltp import sites

    keys = {}
    for domain in DEMO_DOMAINS:
        site = sites.get(dsn, domain)
        if site is None:
            try:
                site = sites.add(dsn, domain, origins=[f"https://{domain}"], account=DEMO_ACCOUNTS[domain])
            except sites.SiteError:  # registered meanwhile by another process
                site = sites.get(dsn, domain)
        elif site.account is None:
            site = sites.update(dsn, domain, sites.Change(account=DEMO_ACCOUNTS[domain]))[1]
        assert site is not None
        keys[domain] = site.site_key
    return keys


def demo_batch(rng: random.Random, size: int, now: datetime,
               keys: dict[str, str] | None = None) -> list[dict[str, str]]:
    """`size` random events over the demo domains; each carries its site's key (`site`) when `keys` has it."""
    events = []
    for _ in range(size):
        domain = rng.choice(DEMO_DOMAINS)
        spread = rng.random()  # half within the last minute, most of the rest within 6 hours, some over 2 days
        ts = now - timedelta(seconds=rng.randint(0, 60) if spread < 0.5 else rng.randint(0, 6 * 3600)
                             if spread < 0.85 else rng.randint(0, 48 * 3600))
        event = {"domain": domain, "url": f"https://{domain}/p/{rng.randint(1, 40)}",
                 "type": "impression" if rng.random() < 0.7 else "pageview",
                 "ts": ts.isoformat().replace("+00:00", "Z")}
        if rng.random() < 0.2:
            event["value"] = f"{rng.randint(1, 500) / 100:.2f}"
        if keys and domain in keys:
            event["site"] = keys[domain]
        events.append(event)
    return events


def send(collector_url: str, events: list[dict[str, str]], user_agent: str, forwarded_for: str | None = None) -> int:
    """POST one batch; `forwarded_for`: the address it is sent on behalf of (`X-Forwarded-For`)."""
    headers = {"Content-Type": "application/json", "User-Agent": user_agent}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    req = urllib.request.Request(collector_url + "/collect", data=json.dumps(events).encode(), method="POST",
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(json.loads(resp.read())["accepted"])


def run_demo(collector_url: str, stop: threading.Event, *, period_s: float = 0.5, seed: int = 7,
             keys: dict[str, str] | None = None) -> None:
    """Send a batch every `period_s` until `stop`; `keys` ({domain: site key}) from `register_demo_sites`.

    The collector learns new sites within TALLY_REGISTRY_REFRESH_S, so the first batches may be refused (logged).
    """
    rng = random.Random(seed)
    sent = 0
    while not stop.wait(period_s):
        try:
            sent += send(collector_url, demo_batch(rng, rng.randint(5, 40), datetime.now(UTC), keys),
                         rng.choice(_UAS), rng.choice(tuple(DEMO_ADDRESSES)))
        except OSError as exc:
            log.warning("demo: collector not reachable (%s)", exc)
    log.info("demo: sent %d events", sent)
