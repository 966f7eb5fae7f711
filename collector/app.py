"""The collector: `POST /collect` validates hits, checks their site keys, page origins and rate limits,
stamps them, and spools them before answering 202; `GET /i.gif` does the same for one signed pixel;
`GET /tag.js` serves the JS tag (docs/adr/0011-sites-registry.md, 0015-browser-edge.md)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from collector import metrics as edge_metrics
from collector.body import ACCEPTED_TEXT, ACCEPTED_TYPES, BodyError, content_type_ok, parse_events
from collector.edge import (
    GIF,
    TAG_CACHE_CONTROL,
    PixelRefusal,
    TagAsset,
    cors_headers,
    etag_matches,
    origin_allowed,
    pixel_params,
    preflight_headers,
    request_origin,
    unrequested_headers,
)
from collector.fast_path import CollectFastPath
from collector.registry import SiteRegistry, Snapshot
from collector.site_limits import RefusalCounter, SiteLimiter, address_key
from core import metrics
from core.config import Settings
from core.event import (
    Event,
    EventError,
    HitContext,
    Limits,
    event_from_hit,
    mac_key,
    normalize_domain,
    refusal_count_json,
)
from core.http import error, install_host_check, install_json_errors, json_response
from core.pixel import pixel_hit
from oltp.sites import Site
from spool.segments import SpoolFull, SpoolWriter

log = logging.getLogger(__name__)
bp = Blueprint("collector", __name__)


@lru_cache(maxsize=4096)
def classify_user_agent(ua: str) -> tuple[str | None, str | None, str | None]:
    from ua_parser import parse

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


def _domains(items: list[Any]) -> list[str | None]:
    """Each item's domain as the refusal counters name it (None when it is unreadable)."""
    out: list[str | None] = []
    for item in items:
        try:
            out.append(normalize_domain(item.get("domain")) if isinstance(item, dict) else None)
        except EventError:
            out.append(None)
    return out


def _key_owners(items: list[Any], url_key: str | None, by_key: dict[str, Site]) -> list[str | None]:
    """Each item's site as its key names it (own `site` field, else `url_key`): the domain of a registered
    key, else None. Only a registered key makes a refusal a site's own: anyone can write any domain into
    an event, so a made-up or missing key never counts against a customer's domain."""
    out: list[str | None] = []
    for item in items:
        key = (item.get("site") if isinstance(item, dict) else None) or url_key
        site = by_key.get(key) if isinstance(key, str) else None
        out.append(site.domain if site is not None else None)
    return out


def _refuse(items: list[Any] | None, reason: str, resp: Response, url_key: str | None = None, *,
            screened: bool = False, client: str | None = None) -> Response:
    """Count every event of a refused request under (its site, reason), and answer `resp`.

    Its site is the one its registered key names (`_key_owners`); without one the refusal is counted
    globally (domain None: the metrics' `unknown` site, never a customer's status). `screened`: the
    items passed `screen` (every one carries its own domain's key, and was charged to `client`'s share),
    so their domains are their sites and they count uncapped. `client`: the sender's address, whose
    refusals count for a site up to its share per window (`_count`).
    """
    if items is None:
        _count(reason, {None: 1}, client)
        return resp
    if screened:
        owners = _domains(items)
    else:
        sites = current_app.extensions["tally_registry"].snapshot()
        owners = _key_owners(items, url_key, sites.by_key if sites is not None else {})
    _count(reason, Counter(owners), client, capped=not screened)
    return resp


def _refuse_for(domain: str | None, reason: str, resp: Response, client: str | None = None) -> Response:
    """Count one refused request under `domain` (a site whose registered key it carried), or globally."""
    _count(reason, {domain: 1}, client)
    return resp


def _count(reason: str, owners: Mapping[str | None, int], client: str | None, *, capped: bool = True) -> None:
    """Count refused events by the site that owns them (None: nobody's). The metrics count every one
    (`site="unknown"` for None); a site's own count (spooled, on its status) takes at most `client`'s
    share of the site's limit per window (SiteLimiter.countable), so one sender cannot inflate a site's
    refusal counters without bound (ADR 29)."""
    refusals: RefusalCounter = current_app.extensions["tally_refusals"]
    sites = current_app.extensions["tally_registry"].snapshot()
    registered: Mapping[str, Site] = sites.by_domain if sites is not None else {}
    for domain, n in owners.items():
        metrics.count_refused(domain, reason, n, registered)
        site = registered.get(domain) if domain is not None else None
        if domain is None or site is None:
            refusals.add(None, reason, n)
            continue
        if capped:
            limiter: SiteLimiter = current_app.extensions["tally_limiter"]
            n = limiter.countable(domain, n, (site.rate_per_s, site.burst), client)
        if n:
            refusals.add(domain, reason, n)


def admit(items: list[Any], url_key: str | None, *, origin: str | None = None,
          cors_origin: str | None = None, peer: tuple[str | None, str | None] | None = None
          ) -> Response | list[Event]:
    """The one admission path of `/collect` and `/i.gif`: `screen`, then the spool (write + fdatasync,
    blocking this thread until it is durable), then `admitted`. Returns the spooled events, or the
    refusal to answer (counted; nothing of the request is written). Arguments as `screen`'s."""
    result = screen(items, url_key, origin=origin, cors_origin=cors_origin, peer=peer)
    if isinstance(result, Response):
        return result
    spool: SpoolWriter = current_app.extensions["tally_spool"]
    try:
        spool.append(e.to_json() for e in result)
    except SpoolFull:
        return spool_full(items)
    return admitted(result, origin=origin, cors_origin=cors_origin)


def spool_full(items: list[Any]) -> Response:
    """The refusal of a request whose events the spool's full disk refused (counted)."""
    resp = error(503, "spool_full", "the collector's disk is full; retry later")
    resp.headers["Retry-After"] = "30"
    return _refuse(items, "spool_full", resp, screened=True)


def admitted(events: list[Event], *, origin: str | None = None, cors_origin: str | None = None) -> list[Event]:
    """Count a request's events as accepted, once they are durable in the spool; returns `events`."""
    metrics.count_accepted(Counter(e.domain for e in events))  # one update per domain, after the fsync
    if origin is not None:
        g.tally_cors = cors_origin  # every event's site registered this origin (checked by screen)
    return events


def screen(items: list[Any], url_key: str | None, *, origin: str | None = None,
           cors_origin: str | None = None, peer: tuple[str | None, str | None] | None = None
           ) -> Response | list[Event]:
    """Admission short of the spool: every event valid, with a registered site key for its own domain
    (`site` field, else `url_key`), every site allowing the page origin (when the request has an
    `Origin`) and within its rate limit (charged here). Returns the stamped events, to be spooled and
    then passed to `admitted`, or the refusal to answer (counted; nothing is written). Never blocks on
    the spool; it may query PostgreSQL once for a site key the registry copy lacks (rate-limited there).

    `origin`: the raw `Origin` header (None: not a browser's cross-origin request); `cors_origin`: its
    normalised form when it is readable at all (None for `null` or garbage). `peer`: the request's
    (User-Agent, client address), default Flask's current request (collector/fast_path.py passes them:
    it runs admit in an app context without a request context).
    """
    cfg: Settings = current_app.config["TALLY"]
    user_agent, client_ip = peer if peer is not None else (request.headers.get("User-Agent"), request.remote_addr)
    if not items:
        return _refuse(None, "empty_batch", error(400, "empty_batch", "the batch holds no events"))
    if len(items) > cfg.max_batch_events:  # one refusal, however many items: nothing was read one by one
        return _refuse_for(_request_site(items, url_key), "batch_too_large", error(
            413, "batch_too_large", f"at most {cfg.max_batch_events} events per request"), client_ip)
    registry: SiteRegistry = current_app.extensions["tally_registry"]
    keys = [url_key, *(item.get("site") for item in items if isinstance(item, dict))]
    sites = registry.snapshot_knowing(keys)  # one consistent copy for the whole request
    if sites is None:
        if origin is not None:
            g.tally_cors = None  # the origin cannot be checked: the answer is not readable by a page
        return _refuse(items, "registry_unavailable", _registry_unavailable(registry))
    if origin is not None:
        refused = _check_origin(items, url_key, sites, origin, cors_origin, client_ip)
        if refused is not None:
            return refused
    ctx = HitContext(received_at=datetime.now(UTC), user_agent=user_agent, client_ip=client_ip)
    events = _stamp(items, url_key, sites, ctx)
    if isinstance(events, Response):
        return events
    return _charge(events, items, url_key, sites, client_ip)


def _request_site(items: list[Any], url_key: str | None) -> str | None:
    """The site a refusal of the whole request counts for: the one its first event's key names (its own
    `site` field, else `url_key`), if registered in the registry copy; else None (nobody's)."""
    sites = current_app.extensions["tally_registry"].snapshot()
    return _key_owners(items[:1], url_key, sites.by_key)[0] if sites is not None else None


def _check_origin(items: list[Any], url_key: str | None, sites: Snapshot, origin: str,
                  cors_origin: str | None, client: str | None) -> Response | None:
    """Before anything else: a page origin a site did not register learns nothing and writes nothing."""
    known = 0
    for index, item in enumerate(items):
        key = (item.get("site") if isinstance(item, dict) else None) or url_key
        site = sites.by_key.get(key) if isinstance(key, str) else None
        known += site is not None
        if site is not None and not origin_allowed(cors_origin, site):
            g.tally_cors = None
            return _refuse(items, "origin_not_allowed", error(
                403, "origin_not_allowed", f"event {index}: origin {origin[:200]!r} is not registered for "
                f"{site.domain} (`tally sites add --origin`)", index=index, field="Origin",
                origin=origin[:200], domain=site.domain), url_key, client=client)
    if known == len(items):  # every event's site registered it: every answer is the page's to read
        g.tally_cors = cors_origin
    return None


def _stamp(items: list[Any], url_key: str | None, sites: Snapshot, ctx: HitContext) -> Response | list[Event]:
    """Every event validated and stamped under its site's URL rule, with a registered key for its own
    domain; else the refusal of the first that is not (all or nothing: nothing is spooled)."""
    limits: Limits = current_app.config["TALLY_LIMITS"]
    visitor_key: bytes = current_app.config["TALLY_VISITOR_KEY"]
    events = []
    for index, item in enumerate(items):
        key = (item.get("site") if isinstance(item, dict) else None) or url_key
        site = sites.by_key.get(key) if isinstance(key, str) else None
        try:
            event = event_from_hit(item, ctx, limits, visitor_key, classify_user_agent,
                                   site.url_rule if site is not None else None)
        except EventError as exc:
            return _refuse(items, "invalid_event", error(400, "invalid_event", f"event {index}: {exc}",
                                                         index=index, **exc.as_dict()), url_key, client=ctx.client_ip)
        if not key:
            return _refuse(items, "missing_site_key", error(
                401, "missing_site_key", f"event {index}: no site key; send ?site=<key> or a 'site' field "
                "(`tally sites add DOMAIN` prints the key)", index=index, field="site"), url_key, client=ctx.client_ip)
        if site is None:
            return _refuse(items, "unknown_site_key", error(
                401, "unknown_site_key", f"event {index}: the site key is not registered", index=index,
                field="site"), url_key, client=ctx.client_ip)
        if site.domain != event.domain:
            return _refuse(items, "site_mismatch", error(
                403, "site_mismatch", f"event {index}: the site key is not for domain {event.domain} "
                "(domains match exactly; register www. names separately)", index=index, field="site",
                domain=event.domain), url_key, client=ctx.client_ip)
        events.append(event)
    return events


def _charge(events: list[Event], items: list[Any], url_key: str | None, sites: Snapshot, client_ip: str | None
            ) -> Response | list[Event]:
    """Charge the events to their sites' limits and to the client address's share of them (ADR 29);
    `events`, or the 429 (counted) when a site or this address's share of it has no room."""
    costs = Counter(e.domain for e in events)
    limiter: SiteLimiter = current_app.extensions["tally_limiter"]
    over = limiter.hit(costs, {d: (sites.by_domain[d].rate_per_s, sites.by_domain[d].burst) for d in costs},
                       client_ip)
    if over is None:
        return events
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
    resp = error(429, code, message, domain=over.domain)
    resp.headers["Retry-After"] = str(over.retry_after)
    return _refuse(items, code, resp, url_key, client=client_ip)


def _registry_unavailable(registry: SiteRegistry) -> Response:
    resp = error(503, "registry_unavailable", "the collector cannot read the sites registry yet; retry later")
    resp.headers["Retry-After"] = str(max(1, math.ceil(registry.refresh_s)))
    return resp


def _url_site(sites: Any, key: str | None) -> Site | None:
    return sites.by_key.get(key) if sites is not None and key else None


@bp.post("/collect", provide_automatic_options=False)
def collect() -> Response:
    """Accept a batch only if every event is valid, carries a registered site key for its own domain
    (`site` field, else `?site=`), every site registered the page's `Origin` (if any) and is within its
    rate limit; then spool it (fsync) and 202.

    Bodies: `application/json` or `text/plain` (what the tag and sendBeacon send), UTF-8 JSON.
    Refusals (nothing of the request is written): 400 invalid_event / malformed_json / invalid_encoding /
    empty_batch, 401 missing_site_key / unknown_site_key, 403 site_mismatch / origin_not_allowed, 413,
    415, 429 rate_limited, 503 registry_unavailable / spool_full (with Retry-After).
    """
    url_key = request.args.get("site")
    origin = request.headers.get("Origin")
    cors_origin = request_origin(origin)
    if origin is not None:
        # Until the events are checked, an answer is readable by the page only if the ?site= site
        # registered its origin (so the tag can read a 400's index or a 429's Retry-After).
        site = _url_site(current_app.extensions["tally_registry"].snapshot_knowing([url_key]), url_key)
        g.tally_cors = cors_origin if site is not None and origin_allowed(cors_origin, site) else None
    if not content_type_ok(request.mimetype, request.mimetype_params):
        return _refuse(None, "unsupported_media_type",
                       error(415, "unsupported_media_type", f"send Content-Type: {ACCEPTED_TEXT}",
                             accepted=list(ACCEPTED_TYPES)))
    body = request.get_data(cache=False)
    if request.content_length is None and _cut_at_the_limit(body):
        raise RequestEntityTooLarge()  # the 413 a Content-Length beyond the limit gets
    try:
        items = parse_events(body)
    except BodyError as exc:
        return _refuse(None, exc.code, error(exc.status, exc.code, exc.message, **exc.extra))
    result = admit(items, url_key, origin=origin, cors_origin=cors_origin)
    if isinstance(result, Response):
        return result
    return json_response({"accepted": len(result), "hashes": [e.hash for e in result]}, 202)


def _cut_at_the_limit(body: bytes) -> bool:
    """Whether a body sent without Content-Length (chunked) was longer than TALLY_MAX_BODY_BYTES: werkzeug
    stops reading it at the limit without an error, which would make a too-large batch a parse error."""
    return len(body) >= current_app.config["MAX_CONTENT_LENGTH"] and bool(request.environ["wsgi.input"].read(1))


@bp.route("/collect", methods=["OPTIONS"])
def preflight() -> Response:
    """The CORS preflight of a page that sends `application/json` (the tag sends text/plain: none).

    Allowed only for an origin the `?site=` site registered, for POST with at most Content-Type;
    otherwise 403 without any CORS header. Without an Origin it is a plain OPTIONS: 204 with Allow.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        resp = Response(status=204)
        resp.headers["Allow"] = "POST, OPTIONS"
        return resp
    registry: SiteRegistry = current_app.extensions["tally_registry"]
    sites = registry.snapshot_knowing([request.args.get("site")])
    if sites is None:
        return _registry_unavailable(registry)
    site = _url_site(sites, request.args.get("site"))
    if site is None or not origin_allowed(request_origin(origin), site):
        why = "its ?site= key is not registered" if site is None else f"it is not registered for {site.domain}"
        return error(403, "origin_not_allowed", f"origin {origin[:200]!r} may not send here: {why} "
                     "(`tally sites add --origin`)", field="Origin", origin=origin[:200])
    method = request.headers.get("Access-Control-Request-Method", "")
    if method != "POST":
        return error(403, "method_not_allowed", f"only POST may be sent, not {method[:20]!r}",
                     field="Access-Control-Request-Method")
    extra = unrequested_headers(request.headers.get("Access-Control-Request-Headers"))
    if extra:
        return error(403, "header_not_allowed", f"only Content-Type may be sent, not {extra[0][:40]!r}",
                     field="Access-Control-Request-Headers", header=extra[0][:40])
    resp = Response(status=204)
    resp.headers.update(preflight_headers(request_origin(origin) or ""))
    return resp


@bp.after_request
def _edge_headers(resp: Response) -> Response:
    """/collect: Vary: Origin always, the CORS headers when the answer is the page's to read.
    /i.gif: never cached (every fetch must reach us to count), refusals included."""
    if request.path == "/collect":
        resp.vary.add("Origin")
        origin = g.pop("tally_cors", None)
        if origin and request.method == "POST":
            resp.headers.update(cors_headers(origin))
    elif request.path == "/i.gif":
        resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/tag.js")
def tag() -> Response:
    """The JS tag: precompressed, one strong ETag per encoding, cached for an hour (ADR 15)."""
    asset: TagAsset = current_app.extensions["tally_tag"]
    body, etag = asset.pick(request.accept_encodings["gzip"] > 0)
    if etag_matches(request.headers.get("If-None-Match"), etag):
        resp = Response(status=304)
    else:
        resp = Response(body, status=200, content_type="text/javascript; charset=utf-8")
        if body is asset.gzipped:
            resp.headers["Content-Encoding"] = "gzip"
    resp.headers["ETag"] = etag
    resp.headers["Cache-Control"] = TAG_CACHE_CONTROL
    resp.headers["Vary"] = "Accept-Encoding"
    resp.headers["Access-Control-Allow-Origin"] = "*"  # a public script (lets pages use SRI / crossorigin)
    resp.headers["Cross-Origin-Resource-Policy"] = "cross-origin"  # loadable by pages with COEP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


@bp.get("/i.gif")
def pixel() -> Response:
    """A signed pixel (core/pixel.py): one event, admitted like /collect's, answered with a 1x1 GIF once
    it is in the spool. 400 malformed or `exp` beyond TALLY_PIXEL_MAX_TTL_S, 401 unknown key, 403 wrong
    domain / bad or expired signature. Refetches by one client address (an IPv6 /56), whatever its
    User-Agent, within a UTC quarter hour are one event (the same id and time: the same hash, ADR 31)."""
    if request.method != "GET":  # HEAD (prefetchers, link checkers) must not count a hit
        return error(405, "method_not_allowed", "fetch the pixel with GET")
    registry: SiteRegistry = current_app.extensions["tally_registry"]
    sites = registry.snapshot_knowing(request.args.getlist("site")[:1])
    if sites is None:
        return _refuse(None, "registry_unavailable", _registry_unavailable(registry))
    now, max_ttl_s = time.time(), current_app.config["TALLY"].pixel_max_ttl_s
    try:
        site, params = pixel_params(request.query_string, sites.by_key, now, max_ttl_s)
    except PixelRefusal as exc:
        return _refuse_for(exc.domain, exc.code, error(exc.status, exc.code, exc.message, field=exc.field),
                           request.remote_addr)
    address = request.remote_addr
    event = pixel_hit(params, current_app.config["TALLY_VISITOR_KEY"], address and address_key(address), now)
    result = admit([event], site.site_key)  # the pixel is signed: no Origin check
    if isinstance(result, Response):
        return result
    return Response(GIF, status=200, content_type="image/gif")


@bp.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"}, 200)


@bp.get("/readyz")
def readyz() -> Response:
    """Whether this process can do its job: the spool takes appends, and the sites registry is loaded."""
    problems = []
    spool_problem = current_app.extensions["tally_spool"].readiness()
    if spool_problem:
        problems.append(spool_problem)
    if current_app.extensions["tally_registry"].snapshot() is None:
        problems.append("the sites registry has never been loaded (PostgreSQL unreachable and no disk copy)")
    if problems:
        resp = error(503, "not_ready", "; ".join(problems), problems=problems)
        resp.headers["Retry-After"] = "30"
        return resp
    return json_response({"status": "ready"}, 200)


def create_app(settings: Settings, spool: SpoolWriter | None = None, *, start_sealer: bool = True,
               registry: SiteRegistry | None = None, workers: int = 1) -> Flask:
    """Build a collector app. `settings.secret` must be set (it keys the anonymised visitor hash).

    `registry`: the sites registry copy to check keys against; default one loaded from
    `settings.pg_dsn` (else its disk copy) and refreshed every `settings.registry_refresh_s`.
    `workers`: how many worker processes serve this collector; each enforces 1/workers of every
    site's rate limit. The refusal counts are in `app.extensions["tally_refusals"]`.
    """
    if not settings.secret:
        raise ValueError("TALLY_SECRET must be set for the collector")
    app = Flask(__name__)
    app.config["TALLY"] = settings
    app.config["TALLY_VISITOR_KEY"] = mac_key(settings.secret)
    app.config["TALLY_LIMITS"] = Limits(max_future_skew=timedelta(seconds=settings.max_future_skew_s),
                                        max_past_age=timedelta(seconds=settings.max_past_age_s))
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["tally_registry"] = registry or SiteRegistry.from_settings(settings).start()
    app.extensions["tally_limiter"] = SiteLimiter(settings.site_rate_per_s, settings.site_burst, workers=workers,
                                                  address_share=settings.site_address_share)
    app.extensions["tally_refusals"] = RefusalCounter()
    app.extensions["tally_tag"] = TagAsset.load()  # read and gzip-compressed once per worker
    spool = spool or SpoolWriter(settings.spool_dir, max_bytes=settings.spool_segment_bytes,
                                 max_age_s=settings.spool_segment_age_s, reserve_bytes=settings.spool_reserve_bytes)
    app.extensions["tally_spool"] = spool
    install_host_check(app, settings.allowed_hosts)
    app.register_blueprint(bp)
    app.wsgi_app = CollectFastPath(app, app.wsgi_app, admit)  # type: ignore[method-assign] # POST /collect, lean
    edge_metrics.install(app)  # GET /metrics (allowlisted networks) and requests by route and status
    install_json_errors(app)
    if start_sealer:
        _start_sealer(app, spool, settings.spool_segment_age_s)
    return app


REFUSALS_FLUSH_S = 5.0  # how often each collector process spools its refusal counts


def flush_refusals(app: Flask) -> int:
    """Spool this process's refusal counts as count records (core.event.refusal_count_json), for the
    registered domains only (a made-up domain is nobody's to see); returns how many were written.
    If the spool refuses them, they are kept for the next flush."""
    refusals: RefusalCounter = app.extensions["tally_refusals"]
    counts = refusals.take()
    sites = app.extensions["tally_registry"].snapshot()
    known = sites.by_domain if sites is not None else {}
    now = datetime.now(UTC)
    mine = {(d, r): n for (d, r), n in counts.items() if d is not None and d in known}
    if not mine:
        return 0
    try:
        app.extensions["tally_spool"].append(
            refusal_count_json(domain, reason, n, now) for (domain, reason), n in sorted(mine.items()))
    except OSError:
        for (domain, reason), n in mine.items():
            refusals.add(domain, reason, n)
        raise
    return len(mine)


def _start_sealer(app: Flask, spool: SpoolWriter, period_s: float) -> None:
    """Seal idle segments so they ship, and spool the refusal counts every REFUSALS_FLUSH_S."""
    def loop() -> None:
        last_flush = time.monotonic()
        while True:
            threading.Event().wait(min(period_s / 2, REFUSALS_FLUSH_S))
            try:
                if time.monotonic() - last_flush >= REFUSALS_FLUSH_S:
                    last_flush = time.monotonic()
                    flush_refusals(app)
                spool.seal_if_stale()
            except OSError:
                log.exception("spool: sealing or spooling refusal counts failed")

    threading.Thread(target=loop, name="spool-sealer", daemon=True).start()
