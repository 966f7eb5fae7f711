"""The collector: `POST /collect` validates hits, checks their site keys and rate limits, stamps them,
and spools them before answering 202."""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, request

from collector.registry import SiteRegistry
from collector.site_limits import RefusalCounter, SiteLimiter
from collector.spool import SpoolFull, SpoolWriter
from core.config import Settings
from core.http import error, install_host_check, install_json_errors, json_response
from core.event import EventError, HitContext, Limits, event_from_hit, mac_key, normalize_domain

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


def _refuse(items: list[Any] | None, reason: str, resp: Response) -> Response:
    """Count every event of a refused request under (its domain, reason), and answer `resp`."""
    refusals: RefusalCounter = current_app.extensions["tally_refusals"]
    if items is None:
        refusals.add(None, reason)
    else:
        for domain, n in Counter(_domains(items)).items():
            refusals.add(domain, reason, n)
    return resp


@bp.post("/collect")
def collect() -> Response:
    """Accept a batch only if every event is valid, carries a registered site key for its own domain
    (`site` field, else `?site=`) and every site is within its rate limit; then spool it (fsync) and 202.

    Refusals (nothing of the request is written): 400 invalid_event / malformed_json / empty_batch,
    401 missing_site_key / unknown_site_key, 403 site_mismatch, 413, 415, 429 rate_limited,
    503 registry_unavailable / spool_full (with Retry-After).
    """
    cfg: Settings = current_app.config["TALLY"]
    if not request.is_json:
        return _refuse(None, "unsupported_media_type",
                       error(415, "unsupported_media_type", "send Content-Type: application/json"))
    raw = request.get_data(cache=False)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _refuse(None, "malformed_json", error(400, "malformed_json", f"body is not valid JSON: {exc}"))
    items = body if isinstance(body, list) else [body]
    if not items:
        return _refuse(None, "empty_batch", error(400, "empty_batch", "the batch holds no events"))
    if len(items) > cfg.max_batch_events:
        return _refuse(items, "batch_too_large",
                       error(413, "batch_too_large", f"at most {cfg.max_batch_events} events per request"))
    registry: SiteRegistry = current_app.extensions["tally_registry"]
    sites = registry.snapshot()  # one consistent copy for the whole request
    if sites is None:
        resp = error(503, "registry_unavailable", "the collector cannot read the sites registry yet; retry later")
        resp.headers["Retry-After"] = str(max(1, math.ceil(registry.refresh_s)))
        return _refuse(items, "registry_unavailable", resp)
    ctx = HitContext(
        received_at=datetime.now(timezone.utc),
        user_agent=request.headers.get("User-Agent"),
        client_ip=request.remote_addr,
    )
    limits: Limits = current_app.config["TALLY_LIMITS"]
    visitor_key: bytes = current_app.config["TALLY_VISITOR_KEY"]
    url_key = request.args.get("site")
    events = []
    for index, item in enumerate(items):
        try:
            event = event_from_hit(item, ctx, limits, visitor_key, classify_user_agent)
        except EventError as exc:
            # All or nothing: one bad event rejects the whole request, nothing is spooled.
            return _refuse(items, "invalid_event", error(400, "invalid_event", f"event {index}: {exc}",
                                                         index=index, **exc.as_dict()))
        key = item.get("site") or url_key
        if not key:
            return _refuse(items, "missing_site_key", error(
                401, "missing_site_key", f"event {index}: no site key; send ?site=<key> or a 'site' field "
                "(`tally sites add DOMAIN` prints the key)", index=index, field="site"))
        site = sites.by_key.get(key)
        if site is None:
            return _refuse(items, "unknown_site_key", error(
                401, "unknown_site_key", f"event {index}: the site key is not registered", index=index,
                field="site"))
        if site.domain != event.domain:
            return _refuse(items, "site_mismatch", error(
                403, "site_mismatch", f"event {index}: the site key is not for domain {event.domain} "
                "(domains match exactly; register www. names separately)", index=index, field="site",
                domain=event.domain))
        events.append(event)
    costs = Counter(e.domain for e in events)
    limiter: SiteLimiter = current_app.extensions["tally_limiter"]
    over = limiter.hit(costs, {d: (sites.by_domain[d].rate_per_s, sites.by_domain[d].burst) for d in costs})
    if over is not None:
        message = (f"this batch is larger than what {over.domain} may send at once; send smaller batches"
                   if over.too_big else f"{over.domain} is over its event rate limit; retry later")
        resp = error(429, "rate_limited", message, domain=over.domain)
        resp.headers["Retry-After"] = str(over.retry_after)
        return _refuse(items, "rate_limited", resp)
    spool: SpoolWriter = current_app.extensions["tally_spool"]
    try:
        spool.append(e.to_json() for e in events)
    except SpoolFull:
        resp = error(503, "spool_full", "the collector's disk is full; retry later")
        resp.headers["Retry-After"] = "30"
        return _refuse(items, "spool_full", resp)
    return json_response({"accepted": len(events), "hashes": [e.hash for e in events]}, 202)


@bp.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"}, 200)


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
    app.extensions["tally_limiter"] = SiteLimiter(settings.site_rate_per_s, settings.site_burst, workers=workers)
    app.extensions["tally_refusals"] = RefusalCounter()
    spool = spool or SpoolWriter(settings.spool_dir, max_bytes=settings.spool_segment_bytes,
                                 max_age_s=settings.spool_segment_age_s)
    app.extensions["tally_spool"] = spool
    install_host_check(app, settings.allowed_hosts)
    app.register_blueprint(bp)
    install_json_errors(app)
    if start_sealer:
        _start_sealer(spool, settings.spool_segment_age_s)
    return app


def _start_sealer(spool: SpoolWriter, period_s: float) -> None:
    def loop() -> None:
        while True:
            threading.Event().wait(period_s / 2)
            try:
                spool.seal_if_stale()
            except OSError:
                log.exception("spool: sealing failed")

    threading.Thread(target=loop, name="spool-sealer", daemon=True).start()
