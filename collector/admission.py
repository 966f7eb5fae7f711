"""The one admission pipeline of `POST /collect` and `GET /i.gif`: named steps, each passing the request
on or refusing it with its reason (docs/adr/0037-admission-pipeline.md).

    parse_batch -> drop_empty_batch -> drop_oversized_batch -> put_sites -> drop_foreign_origin
      -> put_context -> put_events -> drop_over_limit -> (spool) -> accept

A step reads and fills the request's `Intake` (`put_*`), or returns a `Refusal` that ends the pipeline
(`drop_*`, and a `put_*` that cannot do its job); the pipeline counts that refusal once, by whom it is
owed to (its `Blame`, collector/refusals.py), and nothing of the request is written. A refusal the site
owner fixes in the tag (the event's domain, the page's origin) also names the offending value and the site
whose valid key the event carried (`noted`): that site's ingestion panel shows it (issue 17 item 5). `put_events` holds
two checks per event, in event order (validation, then its site key): a refusal names the first event
with either problem, and validating an event needs its key's site (the site's URL rule). `put_context`
is the enrichment: what every event of the request gets alike (receive time, User-Agent and its
classification, the client address the visitor key is derived from and its country; ADR 44). The
transport resolves the client address once (collector/client_ip.py) and everything per-address uses it.

The spool comes after the steps and is the transport's (a blocking append under WSGI, an awaited
group commit under RSGI: collector/rsgi.py); `accept` counts the events once they are durable. No step
touches Flask's request, `g` or app context: the lean paths (collector/lean.py) run the pipeline
without Flask, and the Flask routes read what they need from the `Intake` afterwards (its `cors`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from collector.body import BodyError, parse_events
from collector.edge import origin_allowed, request_origin
from collector.geo import CountryOf, country_of
from collector.refusals import NOBODY, SENDERS, SITES, Blame, RefusalLedger, key_owners
from collector.registry import SiteRegistry, Snapshot
from collector.site_limits import SiteLimiter
from collector.ua import classify_user_agent
from core import metrics
from core.config import Settings
from core.event import REFUSAL_VALUE_MAX, Event, EventError, HitContext, Limits, event_from_hit
from oltp.sites import Site
from spool.segments import SpoolFull, SpoolWriter


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused request: its answer (HTTP status, error code, message, extra JSON fields, Retry-After
    seconds) and whose events it counts against. `code` is also the reason it is counted under.
    `noted`: (the site whose registered key the refused event carried, the offending value), kept with
    that site's count of the reason; never part of the answer."""

    status: int
    code: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)
    retry_after: int | None = None
    blame: Blame = NOBODY
    noted: tuple[str, str] | None = None


def offending(value: object) -> str:
    """A value a sender chose, as a site's refusal counts keep it: text, non-printable characters as `?`,
    at most REFUSAL_VALUE_MAX characters."""
    text = value if isinstance(value, str) else repr(value)
    text = text[:REFUSAL_VALUE_MAX]
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


# What a refused event's domain may be shown as: a host name or an address (IP literals, ports, upper case and
# underscores are what a site owner needs to see); anything else is free text a sender chose.
_HOST_LIKE = re.compile(r"[A-Za-z0-9._:\[\]-]{1,253}")


def offending_domain(value: object) -> str:
    """A refused event's domain as its site's panel shows it: as sent when it looks like a host name or an address,
    else a note of what it was, so that the public site key cannot put free text on the owner's dashboard (an
    attack review sent `Visit https://evil.example now`)."""
    return offending(value) if isinstance(value, str) and _HOST_LIKE.fullmatch(value) else "(not a host name)"


def offending_origin(value: str | None) -> str:
    """A refused request's `Origin` as its site's panel shows it: normalised (`scheme://host[:port]`), `null`, or a
    note that it was not an origin (free text, as in offending_domain)."""
    if value is not None and value.strip() == "null":
        return "null"
    origin = request_origin(value)
    return offending(origin) if origin is not None else "(not an origin)"  # normalize_origin: a host name or an IP


INTERNAL_ERROR = Refusal(500, "internal_error", "unexpected error; it was logged")  # never counted


class Intake:
    """One request on its way through the pipeline: what the transport read, then what the steps found.

    `cors`: the page origin the answer may be read by (the Flask route starts it from the `?site=` site,
    the steps narrow it); meaningful only when `origin` is not None."""

    __slots__ = ("body", "client_ip", "cors", "cors_origin", "ctx", "events", "items", "origin", "sites",
                 "url_key", "user_agent")

    def __init__(self, body: bytes | None, url_key: str | None, *, user_agent: str | None,
                 client_ip: str | None, origin: str | None = None, cors_origin: str | None = None,
                 cors: str | None = None, items: list[Any] | None = None) -> None:
        self.body = body
        self.url_key = url_key
        self.user_agent = user_agent
        self.client_ip = client_ip
        self.origin = origin  # the raw `Origin` header (None: not a browser's cross-origin request)
        self.cors_origin = cors_origin  # its normalised form, when readable (None for `null` or garbage)
        self.cors = cors
        self.items: list[Any] = items if items is not None else []
        self.sites: Snapshot | None = None
        self.ctx: HitContext | None = None
        self.events: list[Event] = []


Step = Callable[["Admission", Intake], Refusal | None]


def parse_batch(adm: Admission, intake: Intake) -> Refusal | None:
    """The body's events (a JSON object is a batch of one): UTF-8 JSON, no repeated keys."""
    try:
        intake.items = parse_events(intake.body or b"")
    except BodyError as exc:
        return Refusal(exc.status, exc.code, exc.message, exc.extra)
    return None


def drop_empty_batch(adm: Admission, intake: Intake) -> Refusal | None:
    if not intake.items:
        return Refusal(400, "empty_batch", "the batch holds no events")
    return None


def drop_oversized_batch(adm: Admission, intake: Intake) -> Refusal | None:
    """One refusal, however many items (nothing was read one by one), the request's first event's site's."""
    limit = adm.settings.max_batch_events
    if len(intake.items) <= limit:
        return None
    sites = adm.registry.snapshot()
    owner = key_owners(intake.items[:1], intake.url_key, sites.by_key)[0] if sites is not None else None
    return Refusal(413, "batch_too_large", f"at most {limit} events per request", blame=Blame.request(owner))


def put_sites(adm: Admission, intake: Intake) -> Refusal | None:
    """One consistent copy of the sites registry for the whole request (reloaded first if it lacks a key
    the request names: it may query PostgreSQL, rate-limited there)."""
    keys = [intake.url_key, *(item.get("site") for item in intake.items if isinstance(item, dict))]
    intake.sites = adm.registry.snapshot_knowing(keys)
    if intake.sites is None:
        intake.cors = None  # the origin cannot be checked: the answer is not readable by a page
        return registry_unavailable(adm.registry, SENDERS)
    return None


def drop_foreign_origin(adm: Admission, intake: Intake) -> Refusal | None:
    """Before anything else: a page origin a site did not register learns nothing and writes nothing."""
    if intake.origin is None:
        return None
    assert intake.sites is not None
    by_key, known = intake.sites.by_key, 0
    for index, item in enumerate(intake.items):
        key = (item.get("site") if isinstance(item, dict) else None) or intake.url_key
        site = by_key.get(key) if isinstance(key, str) else None
        known += site is not None
        if site is not None and not origin_allowed(intake.cors_origin, site):
            intake.cors = None
            origin = intake.origin[:200]
            return Refusal(403, "origin_not_allowed", f"event {index}: origin {origin!r} is not registered for "
                           f"{site.domain} (`tally sites add --origin`)", {
                               "index": index, "field": "Origin", "origin": origin, "domain": site.domain},
                           blame=SENDERS, noted=(site.domain, offending_origin(intake.origin)))
    if known == len(intake.items):  # every event's site registered it: every answer is the page's to read
        intake.cors = intake.cors_origin
    return None


def put_context(adm: Admission, intake: Intake) -> Refusal | None:
    """What every event of the request gets alike: the receive time, the User-Agent, the client address and
    its country (the address itself is never stored: core/event.py keeps only the visitor key derived from it)."""
    ip = intake.client_ip
    intake.ctx = HitContext(received_at=datetime.now(UTC), user_agent=intake.user_agent, client_ip=ip,
                            country=adm.country_of(ip) if ip else None)
    return None


def put_events(adm: Admission, intake: Intake) -> Refusal | None:
    """Every event validated and stamped under its site's URL rule, with a registered key for its own
    domain; else the refusal of the first that is not (all or nothing)."""
    assert intake.sites is not None and intake.ctx is not None
    by_key, ctx, url_key = intake.sites.by_key, intake.ctx, intake.url_key
    limits, visitor_key, classify = adm.limits, adm.visitor_key, classify_user_agent
    events = intake.events = []
    for index, item in enumerate(intake.items):
        key = (item.get("site") if isinstance(item, dict) else None) or url_key
        site = by_key.get(key) if isinstance(key, str) else None
        try:
            event = event_from_hit(item, ctx, limits, visitor_key, classify,
                                   site.url_rule if site is not None else None)
        except EventError as exc:
            noted = (site.domain, offending_domain(item.get("domain"))) if site is not None and exc.field == "domain" \
                and isinstance(item, dict) else None  # e.g. an IP literal: the tag needs data-domain
            return Refusal(400, "invalid_event", f"event {index}: {exc}", {"index": index, **exc.as_dict()},
                           blame=SENDERS, noted=noted)
        if not key or site is None or site.domain != event.domain:
            return _unkeyed(index, key, site, event.domain)
        events.append(event)
    return None


def _unkeyed(index: int, key: object, site: Site | None, domain: str) -> Refusal:
    """The refusal of event `index`, valid but without a registered key (`key`, naming `site`) for `domain`."""
    if not key:
        return Refusal(401, "missing_site_key", f"event {index}: no site key; send ?site=<key> or a 'site' field "
                       "(`tally sites add DOMAIN` prints the key)", {"index": index, "field": "site"}, blame=SENDERS)
    if site is None:
        return Refusal(401, "unknown_site_key", f"event {index}: the site key is not registered",
                       {"index": index, "field": "site"}, blame=SENDERS)
    return Refusal(403, "site_mismatch", f"event {index}: the site key is not for domain {domain} (domains match "
                   "exactly; register www. names separately)", {"index": index, "field": "site", "domain": domain},
                   blame=SENDERS, noted=(site.domain, offending_domain(domain)))


def drop_over_limit(adm: Admission, intake: Intake) -> Refusal | None:
    """Charge the events to their sites' limits and to the client address's share of them (ADR 29)."""
    assert intake.sites is not None
    costs = Counter(e.domain for e in intake.events)
    by_domain = intake.sites.by_domain
    over = adm.limiter.hit(costs, {d: (by_domain[d].rate_per_s, by_domain[d].burst) for d in costs},
                           intake.client_ip)
    if over is None:
        return None
    if over.address:
        code = "address_rate_limited"
        message = (f"this batch is larger than what one client address may send at once for {over.domain} "
                   f"({over.limit} events); send smaller batches" if over.too_big else
                   f"this client address is over its share of {over.domain}'s event rate limit; retry later "
                   "(a site fed from its own servers raises its limit: `tally sites update DOMAIN --rate N --burst N`)")
    else:
        code = "rate_limited"
        message = (f"this batch is larger than what {over.domain} may send at once; send smaller batches"
                   if over.too_big else f"{over.domain} is over its event rate limit; retry later")
    return Refusal(429, code, message, {"domain": over.domain}, retry_after=over.retry_after, blame=SENDERS)


PARSE: tuple[Step, ...] = (parse_batch,)
CHECKS: tuple[Step, ...] = (drop_empty_batch, drop_oversized_batch, put_sites, drop_foreign_origin, put_context,
                            put_events, drop_over_limit)
SCREEN = PARSE + CHECKS


def registry_unavailable(registry: SiteRegistry, blame: Blame = NOBODY) -> Refusal:
    """The 503 of a request while this process has no copy of the sites registry (never loaded)."""
    return Refusal(503, "registry_unavailable", "the collector cannot read the sites registry yet; retry later",
                   retry_after=max(1, math.ceil(registry.refresh_s)), blame=blame)


class Admission:
    """The pipeline with what its steps need: one per collector app (`app.extensions["tally_admission"]`)."""

    def __init__(self, settings: Settings, registry: SiteRegistry, limiter: SiteLimiter, ledger: RefusalLedger,
                 spool: SpoolWriter, visitor_key: bytes, limits: Limits, country: CountryOf = country_of) -> None:
        self.settings = settings
        self.registry = registry
        self.limiter = limiter
        self.ledger = ledger
        self.spool = spool
        self.visitor_key = visitor_key
        self.limits = limits
        self.country_of = country  # collector/geo.py: the embedded data, or TALLY_GEOIP_DB's file

    def screen(self, intake: Intake, steps: Sequence[Step] = SCREEN) -> Refusal | None:
        """Run `steps`: None when every one passed (`intake.events` ready to spool), else the refusal (counted)."""
        for step in steps:
            refusal = step(self, intake)
            if refusal is not None:
                return self.refuse(refusal, intake)
        return None

    def admit(self, intake: Intake, steps: Sequence[Step] = SCREEN) -> Refusal | list[Event]:
        """`screen`, then the spool (write + fdatasync, blocking this thread until durable), then `accept`."""
        refusal = self.screen(intake, steps)
        if refusal is not None:
            return refusal
        try:
            self.spool.append(e.to_json() for e in intake.events)
        except SpoolFull:
            return self.spool_full(intake)
        return self.accept(intake)

    def accept(self, intake: Intake) -> list[Event]:
        """Count the request's events as accepted, once they are durable in the spool; returns them."""
        metrics.count_accepted(Counter(e.domain for e in intake.events))  # one update per domain
        if intake.origin is not None:
            intake.cors = intake.cors_origin  # every event's site registered this origin (drop_foreign_origin)
        return intake.events

    def spool_full(self, intake: Intake) -> Refusal:
        """The refusal (counted) of a screened request whose events the spool's full disk refused."""
        return self.refuse(Refusal(503, "spool_full", "the collector's disk is full; retry later", retry_after=30,
                                   blame=SITES), intake)

    def refuse(self, refusal: Refusal, intake: Intake | None = None) -> Refusal:
        """Count `refusal` (by its blame: the request's events, its `?site=` key, its address); returns it."""
        if intake is None:
            self.ledger.count(refusal.code, refusal.blame)
        else:
            self.ledger.count(refusal.code, refusal.blame, intake.items, intake.url_key, intake.client_ip,
                              refusal.noted)
        return refusal

    def may_block(self, intake: Intake) -> bool:
        """Whether `put_sites` may query PostgreSQL: the request names a site key the registry copy lacks."""
        sites = self.registry.snapshot()
        if sites is None:
            return False  # refused at once (registry_unavailable): nothing is queried
        known = sites.by_key
        if intake.url_key and intake.url_key not in known:
            return True
        return not all(not isinstance(item, dict) or not isinstance(k := item.get("site"), str) or not k
                       or k in known for item in intake.items)
