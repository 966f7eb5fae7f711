"""Synthetic traffic for `tally up --demo`: real HTTP hits, with the demo sites' keys, against the running collector."""

from __future__ import annotations

import json
import logging
import random
import threading
import urllib.request
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)

DEMO_DOMAINS = ("demo.tally.test", "shop.tally.test", "blog.tally.test")
_UAS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0",
)


def register_demo_sites(dsn: str) -> dict[str, str]:
    """Register each demo domain unless it already is (idempotent); returns {domain: site key}."""
    from oltp import sites

    keys = {}
    for domain in DEMO_DOMAINS:
        site = sites.get(dsn, domain)
        if site is None:
            try:
                site = sites.add(dsn, domain, origins=[f"https://{domain}"])
            except sites.SiteError:  # registered meanwhile by another process
                site = sites.get(dsn, domain)
        assert site is not None
        keys[domain] = site.site_key
    return keys


def demo_batch(rng: random.Random, size: int, now: datetime,
               keys: dict[str, str] | None = None) -> list[dict[str, str]]:
    """`size` random events over the demo domains; each carries its site's key (`site`) when `keys` has it."""
    events = []
    for _ in range(size):
        domain = rng.choice(DEMO_DOMAINS)
        ts = now - timedelta(seconds=rng.randint(0, 6 * 3600) if rng.random() < 0.5 else rng.randint(0, 60))
        event = {"domain": domain, "url": f"https://{domain}/p/{rng.randint(1, 40)}",
                 "type": "impression" if rng.random() < 0.7 else "pageview",
                 "ts": ts.isoformat().replace("+00:00", "Z")}
        if rng.random() < 0.2:
            event["value"] = f"{rng.randint(1, 500) / 100:.2f}"
        if keys and domain in keys:
            event["site"] = keys[domain]
        events.append(event)
    return events


def send(collector_url: str, events: list[dict[str, str]], user_agent: str) -> int:
    req = urllib.request.Request(collector_url + "/collect", data=json.dumps(events).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": user_agent})
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
                         rng.choice(_UAS))
        except OSError as exc:
            log.warning("demo: collector not reachable (%s)", exc)
    log.info("demo: sent %d events", sent)
