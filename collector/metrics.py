"""The collector's `GET /metrics` (Prometheus text format) and its per-request counter.

Shows the edge (core/metrics.py COLLECTOR_FAMILIES): requests by route and status, events accepted and
refused by reason and site, the shipper's counters (from the same multiprocess directory: `tally up`,
or an operator who gives the collector and its shipper one PROMETHEUS_MULTIPROC_DIR), and the spool
backlog, computed from the spool directory at scrape time.

The port faces the internet: only clients in TALLY_METRICS_ALLOWED_NETS (default loopback) may read it,
by their address as the WSGI server sees it; others get 403 `metrics_forbidden` (docs/adr/0021-metrics.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from core import metrics
from core.config import Settings
from core.http import error

bp = Blueprint("collector_metrics", __name__)

OPEN, SEALED = ".open", ".seg"  # as spool/segments.py names segments
SHIPPED_DIR = "shipped"  # where the shipper keeps acknowledged segments (workers/retention.py)


def _segments(directory: Path, suffixes: tuple[str, ...]) -> list[os.stat_result]:
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.endswith(suffixes):
            try:
                found.append(entry.stat())
            except FileNotFoundError:  # shipped or sealed (renamed) meanwhile
                continue
    return found


def spool_families(spool_dir: Path, now: float | None = None) -> Iterator[Metric]:
    """The spool backlog as the directory is now: segments not yet shipped (open ones being written and
    sealed ones waiting for the shipper), their bytes, the age of the oldest; and the shipped segments
    retained until every consumer group stored them (ADR 16)."""
    now = time.time() if now is None else now
    backlog = GaugeMetricFamily("tally_spool_backlog_segments", "Spool segments not yet shipped to Kafka, "
                                "by state (open: being written; sealed: waiting for the shipper)",
                                labels=["state"])
    size = GaugeMetricFamily("tally_spool_backlog_bytes", "Bytes of spool segments not yet shipped, by state",
                             labels=["state"])
    oldest = None
    for state, suffix in (("open", OPEN), ("sealed", SEALED)):
        stats = _segments(spool_dir, (suffix,))
        backlog.add_metric([state], len(stats))
        size.add_metric([state], sum(s.st_size for s in stats))
        if state == "sealed" and stats:
            oldest = min(s.st_mtime for s in stats)
    yield backlog
    yield size
    yield GaugeMetricFamily("tally_spool_oldest_segment_age_seconds", "Age of the oldest sealed segment not "
                            "yet shipped (since its last write; 0 when none waits)",
                            value=max(0.0, now - oldest) if oldest is not None else 0.0)
    retained = _segments(spool_dir / SHIPPED_DIR, (SEALED,))
    yield GaugeMetricFamily("tally_spool_retained_segments", "Shipped segments kept until every consumer "
                            "group stored them", value=len(retained))
    yield GaugeMetricFamily("tally_spool_retained_bytes", "Bytes of shipped segments kept",
                            value=sum(s.st_size for s in retained))


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    """Prometheus text format, for clients in TALLY_METRICS_ALLOWED_NETS only (403 otherwise)."""
    settings: Settings = current_app.config["TALLY"]
    if not metrics.client_allowed(request.remote_addr, settings.metrics_allowed_nets):  # type: ignore[arg-type]
        return error(403, "metrics_forbidden", "/metrics answers only clients in TALLY_METRICS_ALLOWED_NETS; "
                     f"{(request.remote_addr or 'an unknown address')[:64]} is not in it")
    body = metrics.render(metrics.COLLECTOR_FAMILIES, [lambda: spool_families(settings.spool_dir)])
    resp = Response(body, status=200, content_type=metrics.CONTENT_TYPE)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _count(resp: Response) -> Response:
    metrics.count_collector_request(request.endpoint, resp.status_code)
    return resp


def install(app: Flask) -> None:
    """Serve /metrics and count every answer by route and status (one cached-counter update each)."""
    app.register_blueprint(bp)
    app.after_request(_count)
