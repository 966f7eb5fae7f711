"""The collector: `POST /collect` validates hits, checks their site keys, page origins and rate limits,
stamps them, and spools them before answering 202; `GET /i.gif` does the same for one signed pixel;
`GET /tag.js` serves the JS tag (docs/adr/0011-sites-registry.md, 0015-browser-edge.md). Both admissions
run the one pipeline of collector/admission.py (ADR 37); a server's `POST /collect` is answered in front
of Flask by the lean path (collector/fast_path.py, collector/rsgi.py)."""

from __future__ import annotations

import time
from datetime import timedelta

from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from collector import metrics as edge_metrics
from collector.admission import CHECKS, Admission, Intake, Refusal, registry_unavailable
from collector.body import ACCEPTED_TEXT, ACCEPTED_TYPES, content_type_ok
from collector.client_ip import client_address
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
from collector.geo import country_lookup
from collector.refusals import Blame, RefusalLedger
from collector.registry import SiteRegistry, Snapshot
from collector.sealer import Sealer
from collector.site_limits import RefusalCounter, SiteLimiter, address_key
from core.config import Settings
from core.event import Limits, mac_key
from core.http import error, install_host_check, install_json_errors, json_response
from core.pixel import pixel_hit
from oltp.sites import Site
from spool.segments import SpoolWriter

bp = Blueprint("collector", __name__)


def _admission() -> Admission:
    admission: Admission = current_app.extensions["tally_admission"]
    return admission


def refused(refusal: Refusal) -> Response:
    """The Flask answer of a refusal (the pipeline counted it)."""
    resp = error(refusal.status, refusal.code, refusal.message, **refusal.extra)
    if refusal.retry_after is not None:
        resp.headers["Retry-After"] = str(refusal.retry_after)
    return resp


def _client_ip(admission: Admission) -> str | None:
    """The request's client address: the peer, or what a trusted proxy forwarded (collector/client_ip.py)."""
    return client_address(request.remote_addr, request.headers.get("X-Forwarded-For"),
                          admission.settings.trusted_proxies)


def _url_site(sites: Snapshot | None, key: str | None) -> Site | None:
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
    admission = _admission()
    if origin is not None:
        # Until the events are checked, an answer is readable by the page only if the ?site= site
        # registered its origin (so the tag can read a 400's index or a 429's Retry-After).
        site = _url_site(admission.registry.snapshot_knowing([url_key]), url_key)
        g.tally_cors = cors_origin if site is not None and origin_allowed(cors_origin, site) else None
    if not content_type_ok(request.mimetype, request.mimetype_params):
        return refused(admission.refuse(Refusal(415, "unsupported_media_type", f"send Content-Type: {ACCEPTED_TEXT}",
                                                {"accepted": list(ACCEPTED_TYPES)})))
    body = request.get_data(cache=False)
    if request.content_length is None and _cut_at_the_limit(body):
        raise RequestEntityTooLarge()  # the 413 a Content-Length beyond the limit gets
    intake = Intake(body, url_key, user_agent=request.headers.get("User-Agent"), client_ip=_client_ip(admission),
                    origin=origin, cors_origin=cors_origin, cors=g.get("tally_cors"))
    result = admission.admit(intake)
    if origin is not None:
        g.tally_cors = intake.cors
    if isinstance(result, Refusal):
        return refused(result)
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
        return refused(registry_unavailable(registry))  # not counted: a preflight sends no event
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
    admission = _admission()
    address = _client_ip(admission)
    intake = Intake(None, None, user_agent=request.headers.get("User-Agent"), client_ip=address)
    sites = admission.registry.snapshot_knowing(request.args.getlist("site")[:1])
    if sites is None:
        return refused(admission.refuse(registry_unavailable(admission.registry), intake))
    now, max_ttl_s = time.time(), admission.settings.pixel_max_ttl_s
    try:
        site, params = pixel_params(request.query_string, sites.by_key, now, max_ttl_s)
    except PixelRefusal as exc:
        return refused(admission.refuse(Refusal(exc.status, exc.code, exc.message, {"field": exc.field},
                                                blame=Blame.request(exc.domain)), intake))
    intake.items = [pixel_hit(params, admission.visitor_key, address and address_key(address), now)]
    intake.url_key = site.site_key  # the pixel is signed: no Origin check
    result = admission.admit(intake, CHECKS)
    if isinstance(result, Refusal):
        return refused(result)
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
    `workers`: how many worker processes serve this collector; each enforces 1/(workers x
    TALLY_COLLECTOR_HOSTS) of every site's rate limit. The refusal counts are in
    `app.extensions["tally_refusals"]`; the admission pipeline (collector/admission.py) in
    `"tally_admission"`; the sealer thread (collector/sealer.py, None without `start_sealer`) in
    `"tally_sealer"`.
    """
    if not settings.secret:
        raise ValueError("TALLY_SECRET must be set for the collector")
    app = Flask(__name__)
    app.config["TALLY"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    registry = registry or SiteRegistry.from_settings(settings).start()
    limiter = SiteLimiter(settings.site_rate_per_s, settings.site_burst, workers=workers,
                          hosts=settings.collector_hosts, address_share=settings.site_address_share)
    refusals = RefusalCounter()
    spool = spool or SpoolWriter(settings.spool_dir, max_bytes=settings.spool_segment_bytes,
                                 max_age_s=settings.spool_segment_age_s, reserve_bytes=settings.spool_reserve_bytes)
    limits = Limits(max_future_skew=timedelta(seconds=settings.max_future_skew_s),
                    max_past_age=timedelta(seconds=settings.max_past_age_s))
    admission = Admission(settings, registry, limiter, RefusalLedger(registry, limiter, refusals), spool,
                          mac_key(settings.secret), limits, country_lookup(settings.geoip_db))
    app.extensions.update(tally_registry=registry, tally_limiter=limiter, tally_refusals=refusals, tally_spool=spool,
                          tally_admission=admission, tally_tag=TagAsset.load())  # the tag: read and gzipped once
    install_host_check(app, settings.allowed_hosts)
    app.register_blueprint(bp)
    app.wsgi_app = CollectFastPath(settings, app.wsgi_app, admission)  # type: ignore[method-assign]  # lean path
    edge_metrics.install(app)  # GET /metrics (allowlisted networks) and requests by route and status
    install_json_errors(app)
    app.extensions["tally_sealer"] = Sealer(app, spool, settings.spool_segment_age_s).start() if start_sealer else None
    return app
