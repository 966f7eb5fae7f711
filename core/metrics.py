"""Prometheus metrics of every tally process (names prefixed `tally_`), and rendering them for /metrics.

Multiprocess (docs/adr/0021-metrics.md): prometheus_client picks where values live when it is FIRST
IMPORTED. With PROMETHEUS_MULTIPROC_DIR set in the environment by then, each process writes its values
into mmap files of that directory (a few microseconds per update) and a scrape merges every process's
files (`MultiProcessCollector`). `tally up` makes one such directory per stack (`$TALLY_HOME/run/metrics`,
wiped at each start) and sets the variable for every child; granian's collector workers inherit it. A
process started on its own without the variable keeps its own values in memory (one process's view).

Which endpoint shows what: both endpoints read the same directory, so each shows only its own families
(`COLLECTOR_FAMILIES`, `API_FAMILIES`): a Prometheus scraping both never counts a value twice.

Label values are bounded: endpoints and statuses come from the code, `site` is a registered domain or
"unknown", `partition` from the topic's partition count, `group` from the two consumer groups.

This module imports nothing of ours (the kernel). Updates never raise into the caller's request path for
a metrics reason other than a programming error (wrong label count), which tests catch.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
if os.environ.get(MULTIPROC_ENV) and not getattr(values.ValueClass, "_multiprocess", False):
    # prometheus_client was imported before the variable was set (by a library, in this process): pick
    # the mmap values now, before the metrics below exist (metrics read values.ValueClass when created).
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
# The classic text format: every Prometheus version and prometheus_client.parser read it.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
UNKNOWN_SITE = "unknown"

# No `_created` series: multiprocess mode has none, so both modes show the same families.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
# Our own registry: the default one carries process_* / python_* collectors of whichever process renders.
REGISTRY = CollectorRegistry(auto_describe=False)

# ---------------------------------------------------------------------------------- the collector (edge)
COLLECTOR_REQUESTS = Counter("tally_collector_requests", "HTTP requests answered by the collector, by route "
                             "(Flask endpoint) and status code", ["endpoint", "status"], registry=REGISTRY)
EVENTS_ACCEPTED = Counter("tally_events_accepted", "Events accepted (fsync'd to the spool), by site (domain)",
                          ["site"], registry=REGISTRY)
EVENTS_REFUSED = Counter("tally_events_refused", "Events refused, by reason (the error code) and site "
                         "(a registered domain, else 'unknown'); a request refused before its events are "
                         "read counts 1", ["reason", "site"], registry=REGISTRY)
SHIPPED = Counter("tally_shipper_shipped_records", "Records the shipper sent to Kafka and Kafka acknowledged "
                  "(acks=all), first ships only", registry=REGISTRY)
RESHIPPED = Counter("tally_shipper_reshipped_records", "Retained records shipped again to a new topic "
                    "incarnation (ADR 16)", registry=REGISTRY)
SHIP_RETRIES = Counter("tally_shipper_retries", "Ship attempts that failed (Kafka unreachable, no ack, spool "
                       "disk error) and were retried after a backoff", registry=REGISTRY)
QUARANTINED = Counter("tally_shipper_quarantined_records", "Spool lines set aside as corrupt, by reason "
                      "(torn, checksum, unframed, not_an_event)", ["reason"], registry=REGISTRY)

# ---------------------------------------------------------------------------------- the API side
API_REQUESTS = Counter("tally_api_requests", "HTTP requests answered by the API, by route (Flask endpoint) "
                       "and status code", ["endpoint", "status"], registry=REGISTRY)
CONSUMER_LAG = Gauge("tally_consumer_lag_records", "Records on the topic not yet polled by the consumer group "
                     "(highwater minus position), per partition, as its owner last saw it",
                     ["group", "partition"], registry=REGISTRY, multiprocess_mode="livemostrecent")
BATCH_SIZE = Histogram("tally_consumer_batch_records", "Records per store write (events, count records and "
                       "rejects, stored with their offsets in one commit)", ["group"], registry=REGISTRY,
                       buckets=(1, 10, 100, 500, 1000, 5000, 10_000, 25_000, 50_000))
COMMIT_DURATION = Histogram("tally_consumer_commit_seconds", "Duration of one successful store write with its "
                            "offsets (PostgreSQL transaction, or ClickHouse inserts)",
                            ["group"], registry=REGISTRY,
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
ANALYST_QUERIES = Counter("tally_analyst_queries", "Analyst SQL queries by outcome (ok, refused, failed, "
                          "timeout, too_large, busy, cancelled)", ["status"], registry=REGISTRY)
ANALYST_QUERY_SECONDS = Histogram("tally_analyst_query_seconds", "Duration of analyst SQL queries, any outcome",
                                  registry=REGISTRY, buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60))
# tally_reconcile_mismatches is read from PostgreSQL at scrape time (api/metrics.py): runs may happen anywhere.

# ---------------------------------------------------------------------------------- `tally up`'s supervisor
COMPONENT_UP = Gauge("tally_component_up", "1 while `tally up`'s supervisor has the component running, 0 while "
                     "it is down (exited, waiting for its restart backoff)", ["component"], registry=REGISTRY,
                     multiprocess_mode="livemostrecent")
COMPONENT_RESTARTS = Counter("tally_component_restarts", "Restarts of a component by `tally up`'s supervisor",
                             ["component"], registry=REGISTRY)

# What each endpoint shows (family name prefixes). Everything defined above is in exactly one of them.
COLLECTOR_FAMILIES = ("tally_collector_", "tally_events_", "tally_spool_", "tally_shipper_")
API_FAMILIES = ("tally_api_", "tally_consumer_", "tally_analyst_", "tally_reconcile_", "tally_component_")


class Children:
    """A metric's labelled children, cached: `labels()` takes a lock and builds a key on every call."""

    __slots__ = ("_cache", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._cache.get(labels)
        if child is None:
            child = self._cache[labels] = self.metric.labels(*labels)
        return child


_collector_requests = Children(COLLECTOR_REQUESTS)
_api_requests = Children(API_REQUESTS)
_accepted = Children(EVENTS_ACCEPTED)
_refused = Children(EVENTS_REFUSED)
_quarantined = Children(QUARANTINED)
_analyst = Children(ANALYST_QUERIES)
_lag = Children(CONSUMER_LAG)
_batch = Children(BATCH_SIZE)
_commit = Children(COMMIT_DURATION)


def count_collector_request(endpoint: str | None, status: int) -> None:
    _collector_requests(endpoint or "unmatched", str(status)).inc()


def count_api_request(endpoint: str | None, status: int) -> None:
    _api_requests(endpoint or "unmatched", str(status)).inc()


def count_accepted(per_domain: Mapping[str, int]) -> None:
    """`per_domain`: events accepted per (registered) domain in one request: one update per domain."""
    for domain, n in per_domain.items():
        _accepted(domain).inc(n)


def count_refused(domain: str | None, reason: str, events: int, registered: Collection[str]) -> None:
    """Refused events of one request; `domain` becomes the `site` label only if it is in `registered`
    (anyone can make up domains: they all go to 'unknown')."""
    _refused(reason, domain if domain is not None and domain in registered else UNKNOWN_SITE).inc(events)


def count_quarantined(reasons: Iterable[str]) -> None:
    for reason in reasons:
        _quarantined(reason).inc()


def count_analyst_query(status: str, seconds: float) -> None:
    _analyst(status).inc()
    ANALYST_QUERY_SECONDS.observe(max(0.0, seconds))


def observe_write(group: str, records: int, seconds: float) -> None:
    """One store write of a consumer group: its size and how long it took."""
    _batch(group).observe(records)
    _commit(group).observe(max(0.0, seconds))


def set_lag(group: str, partition: int, lag: int) -> None:
    _lag(group, str(partition)).set(max(0, lag))


def set_component_up(component: str, up: bool) -> None:
    """`component`: one of the names `tally up` supervises (a fixed set)."""
    COMPONENT_UP.labels(component).set(1 if up else 0)


def count_component_restart(component: str) -> None:
    COMPONENT_RESTARTS.labels(component).inc()


# ---------------------------------------------------------------------------------- the multiprocess dir

def multiprocess_dir() -> Path | None:
    """The directory this process writes its values to, or None in single-process mode (also when the
    variable was set only after prometheus_client was imported: then this process cannot use it)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path or not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return Path(path)


# ---------------------------------------------------------------------------------- rendering

class _Only:
    """The families of `source` whose names start with one of `prefixes`."""

    def __init__(self, source: Any, prefixes: tuple[str, ...]) -> None:
        self.source, self.prefixes = source, prefixes

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            if family.name.startswith(self.prefixes):
                yield family


class _Extra:
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.collect = collect


def render(prefixes: tuple[str, ...], extra: Iterable[Callable[[], Iterable[Metric]]] = ()) -> bytes:
    """The text exposition of this endpoint's families: from every process sharing the multiprocess
    directory if there is one, else from this process; plus `extra` families computed now (each a
    callable yielding prometheus_client Metric families, e.g. the spool backlog)."""
    path = multiprocess_dir()
    if path is not None:
        source: Any = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(source, path=str(path))  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    else:
        source = REGISTRY
    out = CollectorRegistry(auto_describe=False)
    out.register(_Only(source, prefixes))
    for collect in extra:
        out.register(_Extra(collect))
    return generate_latest(out)


# ---------------------------------------------------------------------------------- who may scrape

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_allowed(remote_addr: str | None, networks: Iterable[Network]) -> bool:
    """Whether a client address (WSGI REMOTE_ADDR) is in one of `networks`. IPv4-mapped IPv6 addresses
    (::ffff:127.0.0.1) count as their IPv4 address; a missing or unparsable address is refused."""
    if not remote_addr:
        return False
    try:
        addr = ipaddress.ip_address(remote_addr.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)
