"""The query API: customer rollups from PostgreSQL, analyst SQL relayed to the analyst server, the dashboard.

This process holds no ClickHouse client: analyst SQL runs in `tally analyst-server` (ADR 10), so
nothing here ever waits on ClickHouse but the one thread relaying an analyst's own answer.

The routes live in blueprints (ADR 39): api/customers.py (the customers' JSON API and CSV),
api/sql.py (the analyst SQL relay), api/dashboard.py (the page, login, logout), api/ops.py (probes,
the OpenAPI document), api/auth.py (tokens) and api/metrics.py (/metrics). Error answers for what
routes raise are registered once, here, by api/errors.py.
"""

from __future__ import annotations

from flask import Flask, Response, request

from api import customers, dashboard, ops, sql
from api.auth import install_auth
from api.backends import EXTENSION, Backends
from api.errors import install_error_handlers
from api.metrics import install as install_metrics
from api.session import install_sessions
from core.config import Settings
from core.http import install_host_check, install_json_errors

__all__ = ["Backends", "create_app"]


def create_app(settings: Settings, backends: Backends) -> Flask:
    app = Flask(__name__)
    app.config["TALLY"] = settings
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024  # tally/wsgi_server.py refuses bodies past it (+ 64 KiB) unread
    # The request line and headers, bounded by tally/wsgi_server.py (431 beyond; ADR 35, "request sizes"). The
    # longest URL the dashboard builds carries its filters (a page is stored as at most 1,000 bytes of UTF-8: 3 KB
    # percent-encoded; the other dimensions 64 characters) and is sent again as the Referer: well under 32 KiB.
    app.config["TALLY_MAX_HEADER_BYTES"] = 32 * 1024
    app.extensions[EXTENSION] = backends
    if not settings.secret:
        raise ValueError("the API needs TALLY_SECRET (it keys the dashboard's session cookies)")
    install_sessions(app, settings.secret)
    install_host_check(app, settings.allowed_hosts)
    # Tokens live in PostgreSQL next to the rollups: the API reads them through the same pool.
    install_auth(app, lambda: backends.rollups.pool, settings.api_rate_limit)
    for blueprint in (customers.bp, sql.bp, dashboard.bp, ops.bp):
        app.register_blueprint(blueprint)
    install_metrics(app)  # GET /metrics (allowlisted networks) and requests by route and status
    install_json_errors(app)
    install_error_handlers(app)
    app.after_request(_api_headers)
    return app


def _api_headers(resp: Response) -> Response:
    """Answers under /api/ (JSON, CSV, relayed analyst results, errors included) are never stored by a cache
    and never content-sniffed; a Cache-Control a route set itself stands. The pages set their own (dashboard.py)."""
    if request.path.startswith("/api/"):
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    return resp
