"""What a request's User-Agent says: browser family, OS family and a device class (ua-parser + a few words).

Called once per request (`core.event.event_from_hit` classifies once per HitContext) and cached per
User-Agent string: the stores keep what this returns, cut to their column widths (core/event.py).
"""

from __future__ import annotations

from functools import lru_cache

from ua_parser import parse


@lru_cache(maxsize=4096)
def classify_user_agent(ua: str) -> tuple[str | None, str | None, str | None]:
    """(browser, os, device) of a User-Agent: device is bot, tablet, mobile or desktop."""
    result = parse(ua)
    browser = result.user_agent.family if result.user_agent else None
    os_name = result.os.family if result.os else None
    lowered = ua.lower()
    if any(word in lowered for word in ("bot", "spider", "crawl")):
        device = "bot"
    elif "ipad" in lowered or "tablet" in lowered:
        device = "tablet"
    elif "mobi" in lowered or "android" in lowered or "iphone" in lowered:
        device = "mobile"
    else:
        device = "desktop"
    return browser, os_name, device
