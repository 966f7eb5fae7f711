"""The API's `GET /metrics` (Prometheus text format) and its per-request counter.

Shows core/metrics.py API_FAMILIES: the API's requests by route and status; from the processes sharing
the multiprocess directory (`tally up`: the rollup worker, the analyst server with the loader) consumer
lag per group and partition, batch sizes and commit durations of both workers, analyst queries by
outcome; and `tally_reconcile_mismatches`.

Access: like the collector's, by client network (TALLY_METRICS_ALLOWED_NETS, default loopback), no
token; 403 `metrics_forbidden` otherwise. It is a probe in api/auth.py's terms (public, not rate limited),
so a Prometheus never spends a token or a rate-limit budget (docs/adr/0021-metrics.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from psycopg_pool import ConnectionPool

from api.auth import probe
from api.backends import backends
from api.names import public_name
from core import metrics
from core.config import Settings
from core.http import error
from oltp.reconcile import latest_mismatches

log = logging.getLogger(__name__)
bp = Blueprint("api_metrics", __name__)


def reconcile_family(pool: ConnectionPool) -> Callable[[], Iterator[Metric]]:
    """`tally_reconcile_mismatches` from the newest scheduled reconcile run in PostgreSQL (oltp/reconcile.py),
    read at scrape time (2 s at most); absent when no run completed yet or PostgreSQL does not answer."""

    def collect() -> Iterator[Metric]:
        try:
            with pool.connection(timeout=2) as conn:
                found = latest_mismatches(conn)
        except Exception as exc:
            log.warning("metrics: cannot read the latest reconcile run (%s)", type(exc).__name__)
            return
        if found is not None:
            yield GaugeMetricFamily("tally_reconcile_mismatches", "Buckets whose PostgreSQL and ClickHouse "
                                    "totals differed in the newest scheduled reconcile run", value=found)

    return collect


@bp.get("/metrics")
@probe
def metrics_endpoint() -> Response:
    """Prometheus metrics of the API side, for clients in TALLY_METRICS_ALLOWED_NETS.
    ---
    get:
      summary: Prometheus metrics (no token; client networks in TALLY_METRICS_ALLOWED_NETS only)
      description: >
        The Prometheus text format (0.0.4): API requests by route and status, consumer lag per group and
        partition, batch sizes and commit durations of the rollup worker and the loader, analyst queries
        by outcome, the latest reconcile mismatches. README "Metrics" lists every metric.
      tags: [operations]
      responses:
        200:
          description: the metrics
          content:
            text/plain: {schema: {type: string}}
        403:
          description: the client address is not in TALLY_METRICS_ALLOWED_NETS (`metrics_forbidden`)
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
    """
    settings: Settings = current_app.config["TALLY"]
    if not metrics.client_allowed(request.remote_addr, settings.metrics_allowed_nets):  # type: ignore[arg-type]
        return error(403, "metrics_forbidden", "/metrics answers only clients in TALLY_METRICS_ALLOWED_NETS; "
                     f"{(request.remote_addr or 'an unknown address')[:64]} is not in it")
    extra = [reconcile_family(backends().rollups.pool)]
    resp = Response(metrics.render(metrics.API_FAMILIES, extra), status=200, content_type=metrics.CONTENT_TYPE)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _count(resp: Response) -> Response:
    metrics.count_api_request(public_name(request.endpoint) if request.endpoint else None, resp.status_code)
    return resp


def install(app: Flask) -> None:
    """Serve /metrics and count every answer by route and status."""
    app.register_blueprint(bp)
    app.after_request(_count)
