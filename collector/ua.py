"""What a request's User-Agent says: browser family, OS family and a device class (ua-parser + a few words).

Called once per request (`core.event.event_from_hit` classifies once per HitContext) and cached per
User-Agent string: the stores keep what this returns, cut to their column widths (core/event.py).

Device `bot` (THE bot test everywhere: bots are counted in the ingestion panel, never in visitors or
breakdowns) is a crawler (`bot`, `spider`, `crawl`, `slurp`, `externalhit` in the User-Agent) or a
browser driven by a program that says so: headless Chrome / Firefox, Playwright, Puppeteer,
Lighthouse and PageSpeed, PhantomJS, Selenium / WebDriver, SlimerJS, Cypress, GTmetrix. HTTP client
libraries (curl, python-requests, ...) are not bots here: a site fed from its own servers sends with
them (docs/adr/0044-enrichment-at-the-edge.md).
"""

from __future__ import annotations

import re
from functools import lru_cache

from ua_parser import parse

BOT_WORDS = ("bot", "spider", "crawl", "slurp", "externalhit",  # crawlers
             "headless", "playwright", "puppeteer", "lighthouse", "page ?speed", "phantomjs", "selenium",
             "webdriver", "slimerjs", "cypress", "gtmetrix")  # automated browsers, page testers
_BOT_RE = re.compile("|".join(BOT_WORDS))


@lru_cache(maxsize=4096)
def classify_user_agent(ua: str) -> tuple[str | None, str | None, str | None]:
    """(browser, os, device) of a User-Agent: device is bot, tablet, mobile or desktop."""
    result = parse(ua)
    browser = result.user_agent.family if result.user_agent else None
    os_name = result.os.family if result.os else None
    lowered = ua.lower()
    if _BOT_RE.search(lowered):
        device = "bot"
    elif "ipad" in lowered or "tablet" in lowered:
        device = "tablet"
    elif "mobi" in lowered or "android" in lowered or "iphone" in lowered:
        device = "mobile"
    else:
        device = "desktop"
    return browser, os_name, device
