"""Per-site event rate limits at the collector, and the counts of refused events.

A site's limit is "rate events per second with a burst" (defaults TALLY_SITE_RATE_PER_S and
TALLY_SITE_BURST, per-site overrides from the registry). It is enforced with the `limits`
library's sliding-window counter in process memory (O(1) memory per site): a window of
W = max(1, ceil(burst / rate)) seconds holding A = max(burst, rate * W) events, so a quiet site
may send `burst` events at once and the long-run rate is `rate`. The cost of a request is its
number of events.

Each collector worker process has its own memory, so with N workers each enforces 1/N of the
limit (`workers=N`); see docs/adr/0011-sites-registry.md.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter


@dataclass(frozen=True, slots=True)
class Refused:
    """A domain that is over its limit: `retry_after` whole seconds (>= 1)."""

    domain: str
    retry_after: int
    too_big: bool  # the request alone is larger than what the window ever holds


class SiteLimiter:
    """Thread-safe per-domain limiter (one per worker process)."""

    def __init__(self, default_rate_per_s: float, default_burst: int, *, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.default_rate_per_s = default_rate_per_s
        self.default_burst = default_burst
        self.workers = workers
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._items: dict[tuple[float, int], RateLimitItemPerSecond] = {}
        self._lock = threading.Lock()

    def item_for(self, rate_per_s: float | None, burst: int | None) -> RateLimitItemPerSecond:
        """This worker's share of a site's limit as a `limits` item (cached per (rate, burst))."""
        rate = (rate_per_s or self.default_rate_per_s) / self.workers
        size = max(1, math.ceil((burst or self.default_burst) / self.workers))
        key = (rate, size)
        item = self._items.get(key)
        if item is None:
            window = max(1, math.ceil(size / rate))
            amount = max(size, math.floor(rate * window))
            item = RateLimitItemPerSecond(amount, window, namespace="site")
            with self._lock:
                self._items[key] = item
        return item

    def hit(self, costs: Mapping[str, int], overrides: Mapping[str, tuple[float | None, int | None]]) -> Refused | None:
        """Charge `costs` (events per domain); None if every domain had room, else the first that did not.

        Domains are tested first and charged only if all have room, so a refused request charges
        nothing (up to a race with a concurrent request, in which case this one is refused).
        """
        items = {d: self.item_for(*overrides.get(d, (None, None))) for d in costs}
        for domain, cost in costs.items():
            item = items[domain]
            if cost > item.amount or not self._limiter.test(item, domain, cost=cost):
                return self._refused(domain, cost, item)
        for domain, cost in costs.items():
            if not self._limiter.hit(items[domain], domain, cost=cost):
                return self._refused(domain, cost, items[domain])
        return None

    @staticmethod
    def _refused(domain: str, cost: int, item: RateLimitItemPerSecond) -> Refused:
        window = item.get_expiry()
        wait = math.ceil(min(cost, item.amount) * window / item.amount)
        return Refused(domain, max(1, min(window, wait)), cost > item.amount)


class RefusalCounter:
    """Refused events per (domain, reason), thread-safe. The domain is None when it was unreadable."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str | None, str]] = Counter()
        self._lock = threading.Lock()

    def add(self, domain: str | None, reason: str, events: int = 1) -> None:
        with self._lock:
            self._counts[(domain, reason)] += events

    def snapshot(self) -> dict[tuple[str | None, str], int]:
        """A copy of the counts so far."""
        with self._lock:
            return dict(self._counts)

    def take(self) -> dict[tuple[str | None, str], int]:
        """The counts so far, resetting them (for a shipper that forwards them)."""
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
            return counts
