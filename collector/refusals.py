"""Whose refused events these are: every refusal of the collector is counted here, by the site it is owed to.

A refusal counts in the metrics always (`site="unknown"` when it is nobody's) and, when a registered site
owns it, in that site's own counts (`RefusalCounter`, spooled by collector/sealer.py to the customer's
ingestion status). Who owns a refusal is its `Blame` (collector/admission.py builds them):

- `NOBODY`: one refusal, nobody's (a body that cannot be read, an empty batch: no event to go by);
- `Blame.request(domain)`: one refusal of the whole request, the site's whose registered key it carried;
- `SENDERS`: each event, owed to the site its registered key names (own `site` field, else `?site=`);
  anyone can write any domain into an event, so a made-up or missing key never counts against a
  customer's domain. Capped: one client address makes at most its share of a site's limit count (ADR 29);
- `SITES`: each event of a request that passed every check (each carries its own domain's key and was
  charged to the sender's share already), so by its domain, uncapped (the spool refused it).

A refusal may also be `noted`: (site, offending value), the value the site owner fixes in the tag (an
event's domain, a page's origin). It is kept with the site's count of that reason, one per (site,
reason) and only when the site's count took some of the request's events: a value is as bounded as the
counts are (only a registered key's site, only within the sender's share; cut to REFUSAL_VALUE_MAX).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from collector.registry import SiteRegistry
from collector.site_limits import RefusalCounter, SiteLimiter
from core import metrics
from core.event import EventError, normalize_domain
from oltp.sites import Site


@dataclass(frozen=True, slots=True)
class Blame:
    """Whose events a refusal counts against (module doc): `kind` nobody / request / senders / sites."""

    kind: str
    domain: str | None = None  # kind "request": the site whose registered key the request carried

    @staticmethod
    def request(domain: str | None) -> Blame:
        return Blame("request", domain)


NOBODY = Blame("nobody")
SENDERS = Blame("senders")
SITES = Blame("sites")


class RefusalLedger:
    """Counts refusals (module doc) into the metrics and `counter`, by the registry's current copy."""

    def __init__(self, registry: SiteRegistry, limiter: SiteLimiter, counter: RefusalCounter) -> None:
        self.registry = registry
        self.limiter = limiter
        self.counter = counter

    def count(self, reason: str, blame: Blame, items: list[Any] | None = None, url_key: str | None = None,
              client: str | None = None, noted: tuple[str, str] | None = None) -> None:
        """Count one refused request: its `items` (the batch, if it was read), its `?site=` key, its address,
        the (site, offending value) it names (module doc)."""
        if blame.kind == "senders" and items is not None:
            sites = self.registry.snapshot()
            self._count(reason, Counter(key_owners(items, url_key, sites.by_key if sites is not None else {})),
                        client, noted=noted)
        elif blame.kind == "sites" and items is not None:
            self._count(reason, Counter(_domains(items)), None, capped=False)
        elif blame.kind == "request":
            self._count(reason, {blame.domain: 1}, client)
        else:
            self._count(reason, {None: 1}, client)

    def _count(self, reason: str, owners: Mapping[str | None, int], client: str | None, *,
               capped: bool = True, noted: tuple[str, str] | None = None) -> None:
        """Count refused events by the site that owns them (None: nobody's). The metrics count every one
        (`site="unknown"` for None); a site's own count (spooled, on its status) takes at most `client`'s
        share of the site's limit per window (SiteLimiter.countable), so one sender cannot inflate a
        site's refusal counters without bound (ADR 29)."""
        sites = self.registry.snapshot()
        registered: Mapping[str, Site] = sites.by_domain if sites is not None else {}
        for domain, n in owners.items():
            metrics.count_refused(domain, reason, n, registered)
            site = registered.get(domain) if domain is not None else None
            if domain is None or site is None:
                self.counter.add(None, reason, n)
                continue
            if capped:
                n = self.limiter.countable(domain, n, (site.rate_per_s, site.burst), client)
            if n:
                self.counter.add(domain, reason, n, noted[1] if noted is not None and noted[0] == domain else None)


def key_owners(items: list[Any], url_key: str | None, by_key: Mapping[str, Site]) -> list[str | None]:
    """Each item's site as its key names it (own `site` field, else `url_key`): the domain of a registered
    key, else None."""
    out: list[str | None] = []
    for item in items:
        key = (item.get("site") if isinstance(item, dict) else None) or url_key
        site = by_key.get(key) if isinstance(key, str) else None
        out.append(site.domain if site is not None else None)
    return out


def _domains(items: list[Any]) -> list[str | None]:
    """Each item's domain as the refusal counters name it (None when it is unreadable)."""
    out: list[str | None] = []
    for item in items:
        try:
            out.append(normalize_domain(item.get("domain")) if isinstance(item, dict) else None)
        except EventError:
            out.append(None)
    return out
