"""Per-site event rate limits at the collector, per-address shares of them, and the counts of refused events.

A site's limit is "rate events per second with a burst" (defaults TALLY_SITE_RATE_PER_S and
TALLY_SITE_BURST, per-site overrides from the registry). It is enforced with a sliding-window
counter in process memory (O(1) memory per site, the algorithm of the `limits` library's
SlidingWindowCounter): a window of W = max(1, ceil(burst / rate)) seconds holding
A = max(burst, rate * W) events, so a quiet site may send `burst` events at once and the long-run
rate is `rate`. The cost of a request is its number of events. The counter is our own (one dict
entry per site, one lock), not the library's MemoryStorage, which starts a timer thread every
10 ms while counters live and costs ~30 us per request (docs/adr/0025-collector-speed.md).

Inside a site's budget, one client address may use at most `address_share` of it (window W, at most
floor(share * A) events; TALLY_SITE_ADDRESS_SHARE, default 0.1), whatever its headers say: an `Origin`
header is no proof of a browser (anything outside a browser can send one), so it earns no bigger share.
A request is charged to the site and to its address only if both have room, so refused requests
consume nothing. The address is the client's (the peer's, or the one a trusted proxy forwarded:
collector/client_ip.py, ADR 44; IPv4 as is, IPv6 by its /56: a home gets a /56 or a /48
from its ISP, so one household has 256 or more /64s); the per-address state is an LRU of at most
`max_addresses` (domain, address) entries per worker (~0.3 KB each), so memory is bounded whatever the
number of addresses; an evicted address starts afresh, which can only let it send more, never refuse
anyone else. The shares bound what one address (or one /56) takes; they do not stop a distributed
sender: 1/share addresses (ten at the default) together take the whole site limit, which still
bounds the total. See docs/adr/0029-per-address-shares.md.

The same entry bounds the refusals one address makes count for a site (`countable`): at most its
share per window, so one sender cannot inflate a site's refusal counters without bound.

Each collector worker process has its own memory, so with N workers each enforces 1/N of the
limit (`workers=N`), and each address's share of that 1/N; see docs/adr/0011-sites-registry.md. Several
collector hosts behind one load balancer (TALLY_COLLECTOR_HOSTS = H) split it further: each worker of
each host enforces 1/(H x N), so the site's limit is the total across hosts and workers whatever their
number, as long as the balancer spreads a site's requests evenly (`worker_share`; `tally sites show`
prints the shares; docs/adr/0060-site-limits-across-hosts-and-topic-grow.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from core.net import client_key

ADDRESS_SLOTS = 65_536  # (domain, address) entries kept per worker process


@dataclass(frozen=True, slots=True)
class Refused:
    """A domain that is over its limit: `retry_after` whole seconds (>= 1). `address`: the request's
    client address was over its share of the site's limit (the site itself had room)."""

    domain: str
    retry_after: int
    too_big: bool  # the request alone is larger than what the window ever holds
    address: bool = False
    limit: int = 0  # the events per window the refusing counter allows


@dataclass(frozen=True, slots=True)
class WindowLimit:
    """One worker's share of a site's limit: at most `amount` events per sliding `window` seconds."""

    amount: int
    window: int


def worker_share(rate_per_s: float, burst: int, *, hosts: int = 1, workers: int = 1) -> WindowLimit:
    """One worker's share of a site limit of `rate_per_s` events/s with `burst`, when `hosts` collector hosts of
    `workers` worker processes each enforce it: rate and burst divided by hosts x workers (the burst rounded up,
    at least 1), held as at most `amount` events per sliding `window` seconds (the window long enough for the
    burst: a quiet site may send it at once; the long-run rate is the share)."""
    if hosts < 1 or workers < 1:
        raise ValueError("hosts and workers must be >= 1")
    parts = hosts * workers
    rate = rate_per_s / parts
    size = max(1, math.ceil(burst / parts))
    window = max(1, math.ceil(size / rate))
    return WindowLimit(max(size, math.floor(rate * window)), window)


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


class _AddressCounter:
    """One address's use of one site's window: the events it was admitted and the refused events that
    counted for the site, each at most `share` events per sliding window (the address's share of `limit`)."""

    __slots__ = ("current", "index", "limit", "previous", "refused_current", "refused_previous", "share")

    def __init__(self, limit: WindowLimit, index: int, share: int) -> None:
        self.limit, self.index, self.share = limit, index, share
        self.previous = self.current = self.refused_previous = self.refused_current = 0

    def weighted(self, now: float) -> tuple[float, float]:
        """(admitted events, counted refusals) in the sliding window at `now` (as `_Counter.weighted`)."""
        window = self.limit.window
        index = int(now // window)
        if index != self.index:
            follows = index == self.index + 1
            self.previous = self.current if follows else 0
            self.refused_previous = self.refused_current if follows else 0
            self.current = self.refused_current = 0
            self.index = index
        weight = 1.0 - (now / window) % 1.0
        return (self.previous * weight + self.current, self.refused_previous * weight + self.refused_current)


address_key = client_key  # one rule for every per-client bound (core/net.py)


class SiteLimiter:
    """Thread-safe per-domain limiter with per-address shares (one per worker process)."""

    def __init__(self, default_rate_per_s: float, default_burst: int, *, workers: int = 1, hosts: int = 1,
                 address_share: float = 1.0, max_addresses: int = ADDRESS_SLOTS,
                 clock: Callable[[], float] = time.time) -> None:
        if workers < 1 or hosts < 1:
            raise ValueError("workers and hosts must be >= 1")
        if not 0 < address_share <= 1 or max_addresses < 1:
            raise ValueError("need 0 < address_share <= 1 and max_addresses >= 1")
        self.default_rate_per_s = default_rate_per_s
        self.default_burst = default_burst
        self.workers = workers
        self.hosts = hosts  # collector hosts sharing every site's limit (TALLY_COLLECTOR_HOSTS)
        self.address_share = address_share
        self.shares = address_share < 1  # False: admissions keep no per-address state at all
        self.max_addresses = max_addresses
        self._clock = clock
        self._items: dict[tuple[float | None, int | None], WindowLimit] = {}
        self._counters: dict[str, _Counter] = {}
        self._addresses: OrderedDict[tuple[str, str], _AddressCounter] = OrderedDict()
        self._lock = threading.Lock()

    def item_for(self, rate_per_s: float | None, burst: int | None) -> WindowLimit:
        """This worker's share of a site's limit (cached per (rate, burst)): `worker_share` of it."""
        item = self._items.get((rate_per_s, burst))
        if item is None:
            item = worker_share(rate_per_s or self.default_rate_per_s, burst or self.default_burst,
                                hosts=self.hosts, workers=self.workers)
            self._items[(rate_per_s, burst)] = item  # a benign race: both threads compute the same item
        return item

    def share_of(self, item: WindowLimit) -> int:
        """The events per window one address may send for a site whose limit is `item` (at least 1)."""
        return max(1, math.floor(item.amount * self.address_share))

    def hit(self, costs: Mapping[str, int], overrides: Mapping[str, tuple[float | None, int | None]],
            address: str | None = None) -> Refused | None:
        """Charge `costs` (events per domain); None if every domain had room, else the first that did not.

        `address`: the client's address (None: no per-address share is kept). All domains, and the
        address's share of each, are tested and then charged under one lock, so a refused request
        charges nothing. Only registered domains reach here (the caller checked every event's site), so
        the site counters are bounded by the registry and the address counters by `max_addresses`.
        """
        items = {d: self.item_for(*overrides.get(d, (None, None))) for d in costs}
        now = self._clock()
        key = address_key(address) if address and self.shares else None
        with self._lock:
            charges = []
            for domain, cost in costs.items():
                item = items[domain]
                counter = self._counters.get(domain)
                if counter is None or counter.limit != item:  # new site, or its limit changed: start afresh
                    counter = self._counters[domain] = _Counter(item, int(now // item.window))
                if cost > item.amount or math.floor(counter.weighted(now)) + cost > item.amount:
                    return self._refused(domain, cost, item.amount, item.window)
                mine = None if key is None else self._address_counter(domain, key, item, now)
                if mine is not None:
                    used = mine.weighted(now)[0]
                    if cost > mine.share or math.floor(used) + cost > mine.share:
                        return self._refused(domain, cost, mine.share, item.window, address=True)
                charges.append((counter, mine, cost))
            for counter, mine, cost in charges:
                counter.current += cost
                if mine is not None:
                    mine.current += cost
        return None

    def countable(self, domain: str, refused: int, override: tuple[float | None, int | None],
                  address: str | None) -> int:
        """How many of `refused` events from `address` may count as `domain`'s refusals (its status): at most
        the address's share of the site's window per window, as many as it could have had admitted; the
        rest are counted in the metrics only. So one sender cannot inflate a site's refusal counters
        without bound (ADR 29). Without an address (never so for a real request), all of them."""
        if not address or refused <= 0:
            return max(0, refused)
        item = self.item_for(*override)
        now = self._clock()
        key = address_key(address)
        with self._lock:
            mine = self._address_counter(domain, key, item, now)
            counted = min(refused, max(0, mine.share - math.floor(mine.weighted(now)[1])))
            mine.refused_current += counted
        return counted

    def _address_counter(self, domain: str, key: str, item: WindowLimit, now: float) -> _AddressCounter:
        """The (domain, address) counter, most recently used; the least recently used goes beyond the cap."""
        slot = (domain, key)
        mine = self._addresses.get(slot)
        if mine is None or (mine.limit is not item and mine.limit != item):
            mine = self._addresses[slot] = _AddressCounter(item, int(now // item.window), self.share_of(item))
            if len(self._addresses) > self.max_addresses:
                self._addresses.popitem(last=False)
        else:
            self._addresses.move_to_end(slot)
        return mine

    @staticmethod
    def _refused(domain: str, cost: int, amount: int, window: int, *, address: bool = False) -> Refused:
        wait = math.ceil(min(cost, amount) * window / amount)
        return Refused(domain, max(1, min(window, wait)), cost > amount, address, amount)


class RefusalCounter:
    """Refused events per (domain, reason), thread-safe. The domain is None when the request did not
    carry a registered key for it: such refusals are nobody's to see (counted in the metrics only)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str | None, str]] = Counter()
        self._values: dict[tuple[str | None, str], str] = {}  # the most recent offending value per count
        self._lock = threading.Lock()

    def add(self, domain: str | None, reason: str, events: int = 1, value: str | None = None) -> None:
        """Count `events`; `value` (if any) replaces the (domain, reason)'s offending value: one per count."""
        with self._lock:
            self._counts[(domain, reason)] += events
            if value is not None:
                self._values[(domain, reason)] = value

    def values(self) -> dict[tuple[str | None, str], str]:
        """A copy of the offending values so far."""
        with self._lock:
            return dict(self._values)

    def take_noted(self) -> tuple[dict[tuple[str | None, str], int], dict[tuple[str | None, str], str]]:
        """The counts and offending values so far, resetting both at once (for the sealer's flush)."""
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
            values, self._values = self._values, {}
            return counts, values

    def restore(self, counts: Mapping[tuple[str | None, str], int],
                values: Mapping[tuple[str | None, str], str]) -> None:
        """Put back what `take_noted` gave (a flush that failed); a value noted since is newer and stays."""
        with self._lock:
            self._counts.update(counts)
            for key, value in values.items():
                self._values.setdefault(key, value)

    def snapshot(self) -> dict[tuple[str | None, str], int]:
        """A copy of the counts so far."""
        with self._lock:
            return dict(self._counts)

    def take(self) -> dict[tuple[str | None, str], int]:
        """The counts so far, resetting them (for a shipper that forwards them)."""
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
            return counts
