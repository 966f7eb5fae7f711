"""The collector: `POST /collect` validates hits, stamps them, and spools them before answering 202."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from functools import lru_cache
import orjson
from flask import Blueprint, Flask, Response, current_app, request

from collector.spool import SpoolFull, SpoolWriter
from core.config import Settings
from core.http import error, install_host_check, install_json_errors, json_response
from core.event import EventError, HitContext, Limits, event_from_hit, mac_key

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


@bp.post("/collect")
def collect() -> Response:
    cfg: Settings = current_app.config["TALLY"]
    if not request.is_json:
        return error(415, "unsupported_media_type", "send Content-Type: application/json")
    raw = request.get_data(cache=False)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return error(400, "malformed_json", f"body is not valid JSON: {exc}")
    items = body if isinstance(body, list) else [body]
    if not items:
        return error(400, "empty_batch", "the batch holds no events")
    if len(items) > cfg.max_batch_events:
        return error(413, "batch_too_large", f"at most {cfg.max_batch_events} events per request")
    ctx = HitContext(
        received_at=datetime.now(timezone.utc),
        user_agent=request.headers.get("User-Agent"),
        client_ip=request.remote_addr,
    )
    limits: Limits = current_app.config["TALLY_LIMITS"]
    visitor_key: bytes = current_app.config["TALLY_VISITOR_KEY"]
    events = []
    for index, item in enumerate(items):
        try:
            events.append(event_from_hit(item, ctx, limits, visitor_key, classify_user_agent))
        except EventError as exc:
            # All or nothing: one bad event rejects the whole request, nothing is spooled.
            return error(400, "invalid_event", f"event {index}: {exc}", index=index, **exc.as_dict())
    spool: SpoolWriter = current_app.extensions["tally_spool"]
    try:
        spool.append(e.to_json() for e in events)
    except SpoolFull:
        resp = error(503, "spool_full", "the collector's disk is full; retry later")
        resp.headers["Retry-After"] = "30"
        return resp
    return json_response({"accepted": len(events), "hashes": [e.hash for e in events]}, 202)


@bp.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"}, 200)


def create_app(settings: Settings, spool: SpoolWriter | None = None, *, start_sealer: bool = True) -> Flask:
    """Build a collector app. `settings.secret` must be set (it keys the anonymised visitor hash)."""
    if not settings.secret:
        raise ValueError("TALLY_SECRET must be set for the collector")
    app = Flask(__name__)
    app.config["TALLY"] = settings
    app.config["TALLY_VISITOR_KEY"] = mac_key(settings.secret)
    app.config["TALLY_LIMITS"] = Limits(max_future_skew=timedelta(seconds=settings.max_future_skew_s),
                                        max_past_age=timedelta(seconds=settings.max_past_age_s))
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
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
