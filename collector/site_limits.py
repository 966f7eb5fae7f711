"""Per-site event rate limits at the collector, and the counts of refused events.

A site's limit is "rate events per second with a burst" (defaults TALLY_SITE_RATE_PER_S and
TALLY_SITE_BURST, per-site overrides from the registry). It is enforced with a sliding-window
counter in process memory (O(1) memory per site, the algorithm of the `limits` library's
SlidingWindowCounter): a window of W = max(1, ceil(burst / rate)) seconds holding
A = max(burst, rate * W) events, so a quiet site may send `burst` events at once and the long-run
rate is `rate`. The cost of a request is its number of events. The counter is our own (one dict
entry per site, one lock), not the library's MemoryStorage, which starts a timer thread every
10 ms while counters live and costs ~30 us per request (docs/adr/0025-collector-speed.md).

Each collector worker process has its own memory, so with N workers each enforces 1/N of the
limit (`workers=N`); see docs/adr/0011-sites-registry.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refused:
    """A domain that is over its limit: `retry_after` whole seconds (>= 1)."""

    domain: str
    retry_after: int
    too_big: bool  # the request alone is larger than what the window ever holds


@dataclass(frozen=True, slots=True)
class WindowLimit:
    """One worker's share of a site's limit: at most `amount` events per sliding `window` seconds."""

    amount: int
    window: int

    def get_expiry(self) -> int:
        return self.window


class _Counter:
    """A site's sliding-window counter: events in the current fixed window and in the one before."""

    __slots__ = ("current", "index", "limit", "previous")

    def __init__(self, limit: WindowLimit, index: int) -> None:
        self.limit, self.index, self.previous, self.current = limit, index, 0, 0

    def weighted(self, now: float) -> float:
        """The events the sliding window holds at `now`: the previous window's count weighted by how much
        of it the sliding window still covers, plus the current window's count (rolls the windows on)."""
        window = self.limit.window
        index = int(now // window)
        if index != self.index:
            self.previous = self.current if index == self.index + 1 else 0
            self.current, self.index = 0, index
        return self.previous * (1.0 - (now / window) % 1.0) + self.current


class SiteLimiter:
    """Thread-safe per-domain limiter (one per worker process)."""

    def __init__(self, default_rate_per_s: float, default_burst: int, *, workers: int = 1,
                 clock: Callable[[], float] = time.time) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.default_rate_per_s = default_rate_per_s
        self.default_burst = default_burst
        self.workers = workers
        self._clock = clock
        self._items: dict[tuple[float | None, int | None], WindowLimit] = {}
        self._counters: dict[str, _Counter] = {}
        self._lock = threading.Lock()

    def item_for(self, rate_per_s: float | None, burst: int | None) -> WindowLimit:
        """This worker's share of a site's limit (cached per (rate, burst))."""
        item = self._items.get((rate_per_s, burst))
        if item is None:
            rate = (rate_per_s or self.default_rate_per_s) / self.workers
            size = max(1, math.ceil((burst or self.default_burst) / self.workers))
            window = max(1, math.ceil(size / rate))
            item = WindowLimit(max(size, math.floor(rate * window)), window)
            self._items[(rate_per_s, burst)] = item  # a benign race: both threads compute the same item
        return item

    def hit(self, costs: Mapping[str, int], overrides: Mapping[str, tuple[float | None, int | None]]) -> Refused | None:
        """Charge `costs` (events per domain); None if every domain had room, else the first that did not.

        All domains are tested and then charged under one lock, so a refused request charges nothing.
        Only registered domains reach here (the caller checked every event's site), so the counters
        are bounded by the registry.
        """
        items = {d: self.item_for(*overrides.get(d, (None, None))) for d in costs}
        now = self._clock()
        with self._lock:
            counters = []
            for domain, cost in costs.items():
                item = items[domain]
                counter = self._counters.get(domain)
                if counter is None or counter.limit != item:  # new site, or its limit changed: start afresh
                    counter = self._counters[domain] = _Counter(item, int(now // item.window))
                if cost > item.amount or math.floor(counter.weighted(now)) + cost > item.amount:
                    return self._refused(domain, cost, item)
                counters.append((counter, cost))
            for counter, cost in counters:
                counter.current += cost
        return None

    @staticmethod
    def _refused(domain: str, cost: int, item: WindowLimit) -> Refused:
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
