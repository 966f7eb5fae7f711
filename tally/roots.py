"""Composition roots: each process is built here from one frozen Settings, and nowhere else."""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from core.config import LOADER_GROUP, ROLLUP_GROUP, ConfigError, Settings

if TYPE_CHECKING:
    import psycopg
    from flask import Flask
    from kafka import KafkaConsumer, KafkaProducer

    from olap.aggregates import ClickHouseAggregates, RemoteAggregates
    from workers.consumer import ConsumerLoop
    from workers.retention import OffsetReader
    from workers.shipper import Shipper

log = logging.getLogger(__name__)


class Loop(Protocol):
    """What run_loop_forever runs: a consumer loop or the shipper."""

    def run(self, stop: threading.Event) -> None: ...



def require_bootstrap(settings: Settings) -> tuple[str, ...]:
    if not settings.kafka_bootstrap:
        raise ConfigError("TALLY_KAFKA_BOOTSTRAP", "is required for this command (e.g. kafka1:9092,kafka2:9092)")
    return settings.kafka_bootstrap


from core.runstate import RUN_STATE  # noqa: E402 - under TALLY_HOME: where a running `tally up` says what it runs

METRICS_DIR = "run/metrics"  # under TALLY_HOME: `tally up`'s PROMETHEUS_MULTIPROC_DIR, wiped at each start
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # as core.metrics names it (not imported here: see below)


def reset_metrics_dir(path: Path) -> Path:
    """Empty (or create) a multiprocess metrics directory; done by whoever starts the processes that share
    it, before starting them. Returns `path`. (Here, not in core.metrics: importing that would make this
    process write metric files of its own, wherever its own environment says.)"""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path


def forget_metrics_of(pid: int, path: Path) -> None:
    """Drop a dead process's live gauges from a multiprocess directory (prometheus_client's
    `mark_process_dead`); its counters stay in the sums, as counters must."""
    from prometheus_client.multiprocess import mark_process_dead

    if path.is_dir():
        mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]  # prometheus_client is untyped here


def own_metrics_dir(settings: Settings, environ: MutableMapping[str, str]) -> str | None:
    """For `tally collector` run on its own with several granian workers and no PROMETHEUS_MULTIPROC_DIR:
    make a private one (`$TALLY_HOME/run/metrics-collector-<port>`, emptied) and set it in `environ`, so
    /metrics sums every worker instead of showing whichever answered. Returns the directory, or None when
    the variable was given (it is then never emptied here) or one worker needs none.

    Must run before anything in this process imports prometheus_client: granian forks its workers, and
    the library picks its value storage on import (docs/adr/0021-metrics.md)."""
    if environ.get(MULTIPROC_ENV) or settings.collector_workers < 2:
        return None
    path = reset_metrics_dir(settings.home / f"{METRICS_DIR}-collector-{settings.collector_port}")
    environ[MULTIPROC_ENV] = str(path)
    return str(path)


def require_pg(settings: Settings) -> str:
    """TALLY_PG_DSN, or the embedded PostgreSQL of a `tally up` running with the same TALLY_HOME."""
    if settings.pg_dsn:
        return settings.pg_dsn
    state = read_run_state(settings.home)
    if state.get("pg_dsn"):
        return str(state["pg_dsn"])
    raise ConfigError("TALLY_PG_DSN", "is required for this command (postgresql://user@host:5432/db), "
                      f"or start `tally up` with TALLY_HOME={settings.home} first")


def admin_bootstrap(settings: Settings) -> tuple[str, ...]:
    """For admin commands: TALLY_KAFKA_BOOTSTRAP, or the embedded broker of a `tally up` running with the same
    TALLY_HOME (services use `require_bootstrap`: the setting only)."""
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    state = read_run_state(settings.home)
    if state.get("kafka_bootstrap"):
        return tuple(str(state["kafka_bootstrap"]).split(","))
    raise ConfigError("TALLY_KAFKA_BOOTSTRAP", "is required for this command (host:port,...), "
                      f"or start `tally up` with TALLY_HOME={settings.home} first")


ADMIN_TOKEN_FILE = "admin-token"  # under TALLY_HOME, mode 0600, written by the first `tally up`


def cli_token(settings: Settings) -> str | None:
    """The API token CLI commands send: TALLY_TOKEN, else the admin token `tally up` wrote under TALLY_HOME."""
    if settings.cli_token:
        return settings.cli_token
    try:
        return (settings.home / ADMIN_TOKEN_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def read_run_state(home: Path) -> dict[str, object]:
    """What a running `tally up` wrote about its embedded servers ({} when none is running)."""
    import orjson

    try:
        return dict(orjson.loads((home / RUN_STATE).read_bytes()))
    except (FileNotFoundError, orjson.JSONDecodeError, TypeError, ValueError):
        return {}


def ensure_configured_topic(settings: Settings) -> tuple[str, ...]:
    """Create the configured topic if missing (idempotent); returns the bootstrap servers."""
    from workers.kafka_io import ensure_topic

    bootstrap = require_bootstrap(settings)
    ensure_topic(bootstrap, settings.topic, settings.partitions, settings.replication_factor)
    return bootstrap


def stop_on_signals() -> threading.Event:
    """An Event set by SIGTERM or SIGINT, for loops that must finish their current batch first."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("received signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def build_shipper(settings: Settings) -> Shipper:
    from workers.kafka_io import make_producer
    from workers.shipper import Shipper

    require_bootstrap(settings)  # a missing setting fails now, not on the first segment

    def producer() -> KafkaProducer:  # called again after any failure; Kafka may be down when we start
        return make_producer(ensure_configured_topic(settings))

    # Shipped segments are kept until both groups stored them: the rollup group's offsets in PostgreSQL,
    # the loader's in ClickHouse (asked of the analyst server when it is chDB). A group that cannot be
    # asked is covered by TALLY_SPOOL_RETAIN_S after the last ship instead (ADR 16, ADR 28).
    from workers.retention import postgres_offsets

    readers = {ROLLUP_GROUP: postgres_offsets(settings.pg_dsn, ROLLUP_GROUP)} if settings.pg_dsn else {}
    loader = loader_offsets_reader(settings)
    if loader is not None:
        readers[LOADER_GROUP] = loader
    return Shipper(settings.spool_dir, producer, settings.topic, retain_s=settings.spool_retain_s,
                   retain_bytes=settings.spool_retain_bytes, offset_readers=readers,
                   unchecked_groups=set(readers) != {ROLLUP_GROUP, LOADER_GROUP},
                   record_events=settings.record_events, record_bytes=settings.record_bytes)


def cli_secret(settings: Settings) -> str:
    """TALLY_SECRET, else the secret `tally up` keeps in $TALLY_HOME/secret."""
    if settings.secret:
        return settings.secret
    try:
        value = (settings.home / "secret").read_text().strip()
    except OSError:
        value = ""
    if not value:
        raise ConfigError("TALLY_SECRET", "is required to ask the analyst server for ClickHouse aggregates "
                          f"(or start `tally up` with TALLY_HOME={settings.home} first)")
    return value


def clickhouse_source(settings: Settings, *, in_process: bool = False,
                      timeout_s: float = 300.0) -> ClickHouseAggregates | RemoteAggregates:
    """Direct with a ClickHouse server (or inside the process that owns chDB), else via the analyst server
    (answers within `timeout_s`)."""
    from olap.aggregates import ClickHouseAggregates, RemoteAggregates

    if in_process or not settings.clickhouse_dsn.startswith("chdb://"):
        from olap.client import new_client

        return ClickHouseAggregates(new_client(settings.clickhouse_dsn), settings.clickhouse_database)
    from core.keys import internal_token

    return RemoteAggregates(settings.analyst_url, internal_token(cli_secret(settings)), timeout_s=timeout_s)


def loader_offsets_reader(settings: Settings, timeout_s: float = 3.0) -> OffsetReader | None:
    """The loader group's stored offsets for the shipper: from ClickHouse directly, or (chDB: one process per
    directory) from the analyst server's internal route. None when neither can be asked (no secret)."""

    if settings.clickhouse_dsn.startswith("chdb://") and not settings.secret:
        return None
    state: dict[str, ClickHouseAggregates | RemoteAggregates] = {}

    def read(topic: str, topic_id: str) -> dict[int, int]:
        if "source" not in state:  # made on first use: ClickHouse may be down when the shipper starts
            state["source"] = clickhouse_source(settings, timeout_s=timeout_s)
        source = state["source"]
        try:
            stored = source.loader_offsets(LOADER_GROUP, topic)
        except Exception:
            state.pop("source", None)  # a new client (connection) next time
            raise
        return {p: offset for p, (tid, offset) in stored.items() if tid == topic_id}

    return read


def worker_consumer_factory(settings: Settings, bootstrap: tuple[str, ...],
                            group: str) -> Callable[[], KafkaConsumer]:
    """Makes the workers' group consumers: the loop's first, and a new one for a member kafka-python cannot bring
    back (workers/coordinator_stall.py). A poll returns at most the loop's batch of events (`records_per_poll`)."""
    from workers.kafka_io import make_consumer, records_per_poll

    return functools.partial(make_consumer, bootstrap, group, session_timeout_ms=settings.consumer_session_timeout_ms,
                             max_poll_records=records_per_poll(settings.record_events))


def build_rollup_loop(settings: Settings, group: str = ROLLUP_GROUP, *,
                      maintenance: bool = True) -> ConsumerLoop:
    from oltp.rollup_sink import RollupSink
    from oltp.schema import ensure_schema
    from workers.consumer import ConsumerLoop

    bootstrap, dsn = ensure_configured_topic(settings), require_pg(settings)
    ensure_schema(dsn)
    if maintenance:
        start_partition_maintenance(settings, dsn)  # hourly: partitions ahead, retention (ADR 18)
    new_consumer = worker_consumer_factory(settings, bootstrap, group)
    # Re-read events older than the dedup window (less a day of margin) are not counted again (ADR 23).
    return with_rewinds(ConsumerLoop(new_consumer(), RollupSink(dsn, group, dimension_cap=settings.dimension_cap),
                                     settings.topic, consumer_factory=new_consumer,
                                     min_write_interval_s=settings.consumer_write_interval_ms / 1000), dsn, group,
                        reread_floor_days=max(1, settings.dedup_window_days - 1))


def build_rollup_loops(settings: Settings, group: str = ROLLUP_GROUP) -> list[ConsumerLoop]:
    """The rollup worker's `TALLY_ROLLUP_CONSUMERS` loops: members of one consumer group, each with its
    own Kafka consumer and PostgreSQL connection, so the group's partitions are written by that many
    transactions at once (ADR 27). One partition maintenance thread for all of them."""
    return [build_rollup_loop(settings, group, maintenance=i == 0) for i in range(settings.rollup_consumers)]


PARTITION_MAINTENANCE_S = 3600.0  # how often the rollup worker creates partitions ahead and drops expired ones


def start_partition_maintenance(settings: Settings, dsn: str,
                                interval_s: float = PARTITION_MAINTENANCE_S) -> threading.Event:
    """A daemon thread running `partition_maintenance_pass` now and every `interval_s`; set the returned Event to
    stop it. A failed pass is logged and retried at the next one (nothing half-dropped)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                partition_maintenance_pass(settings, dsn)
            except Exception as exc:
                log.warning("partition maintenance failed (retrying in %.0f s): %s", interval_s, exc)
            stop.wait(interval_s)

    threading.Thread(target=run, name="partition-maintenance", daemon=True).start()
    return stop


def partition_maintenance_pass(settings: Settings, dsn: str) -> None:
    """One pass of the rollup worker's maintenance: `oltp.partitions.maintain` (partitions ahead, expired ones
    dropped), `oltp.prune.prune_status`, the compaction of closed weeks (`oltp.weekly.compact_closed_weeks`,
    ADR 61), then a VACUUM of the tables read by index-only scans (`oltp.visibility`, ADR 62)."""
    from datetime import UTC, datetime

    import psycopg

    from oltp import partitions, prune, visibility, weekly

    keep = partitions.keep_days_from(settings)
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        now = datetime.now(UTC)
        plans = partitions.maintain(conn, keep, now)
        status = prune.prune_status(conn, settings.retention_15m_days, now)
    dropped = [p.name for plan in plans for p in plan.expired]
    if dropped:
        log.info("retention dropped %d partitions: %s", len(dropped), ", ".join(dropped))
    for r in status:
        if r.expired_rows:
            log.info("retention deleted %d rows of %s before %s", r.expired_rows, r.table, r.cutoff)
    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
        weeks = weekly.compact_closed_weeks(conn, now, keep_days=int(settings.retention_1d_days))
        if weeks.compacted:
            log.info("compacted %d closed weeks (%d domains looked at)", weeks.compacted, weeks.domains)
        visibility.vacuum_for_index_only_scans(conn)  # last: what it skips or fails to do, the next pass does


def build_loader_loop(settings: Settings, group: str = LOADER_GROUP) -> ConsumerLoop:
    from olap.client import connect
    from olap.loader_sink import LoaderSink
    from olap.schema import ensure_schema
    from workers.consumer import ConsumerLoop

    bootstrap = ensure_configured_topic(settings)
    client = connect(settings.clickhouse_dsn)
    ensure_schema(client, settings.clickhouse_database, settings.raw_retention_days, settings.clickhouse_cluster)
    new_consumer = worker_consumer_factory(settings, bootstrap, group)
    sink = LoaderSink(client, settings.clickhouse_database, group, distributed=settings.clickhouse_cluster is not None)
    loop = ConsumerLoop(new_consumer(), sink, settings.topic, consumer_factory=new_consumer,
                        min_write_interval_s=settings.consumer_write_interval_ms / 1000)
    try:
        dsn = require_pg(settings)
    except ConfigError:
        log.warning("loader: no TALLY_PG_DSN, so `tally replay` rewind requests are not seen by this worker "
                    "and tally.sites is not kept in sync")
        return loop
    start_sites_sync(settings, dsn)  # the loader's process writes ClickHouse (with chDB: the analyst server's)
    return with_rewinds(loop, dsn, group)


_SITES_SYNCS: dict[tuple[str, str, str], threading.Event] = {}
_SITES_SYNCS_LOCK = threading.Lock()


def start_sites_sync(settings: Settings, dsn: str) -> threading.Event:
    """A daemon thread copying the sites registry (PostgreSQL `dsn`) to `<db>.sites` in ClickHouse now and every
    TALLY_REGISTRY_REFRESH_S (olap/sites_sync.py, ADR 52); one per process and store pair. Set the returned
    Event to stop it."""
    from olap.client import new_client
    from olap.sites_sync import SiteRow, SitesSync
    from oltp import sites

    key = (dsn, settings.clickhouse_dsn, settings.clickhouse_database)
    with _SITES_SYNCS_LOCK:
        if key in _SITES_SYNCS and not _SITES_SYNCS[key].is_set():
            return _SITES_SYNCS[key]
        stop = _SITES_SYNCS[key] = threading.Event()

    def read() -> list[SiteRow]:
        return [SiteRow(r["domain"], r["account"], r["tz"], tuple(r["keep_query"] or ()), bool(r["raw_urls"]),
                        r["created_at"], r["updated_at"]) for r in sites.load_public(dsn)]

    sync = SitesSync(read, new_client(settings.clickhouse_dsn), settings.clickhouse_database)
    threading.Thread(target=sync.run, args=(stop, settings.registry_refresh_s), name="sites-sync",
                     daemon=True).start()
    return stop


def stop_sites_syncs() -> None:
    """Ask every sites-sync thread this process started to stop (each ends after the pass it may be in)."""
    with _SITES_SYNCS_LOCK:
        for stop in _SITES_SYNCS.values():
            stop.set()


def with_rewinds(loop: ConsumerLoop, dsn: str, group: str, *, reread_floor_days: float | None = None) -> ConsumerLoop:
    """Give `loop` a Rewinder reading `tally replay`'s requests from PostgreSQL (workers/rewind.py)."""
    from oltp.rewinds import PostgresRewinds
    from workers.rewind import Rewinder

    loop.rewinder = Rewinder(PostgresRewinds(dsn), group, reread_floor_days=reread_floor_days)
    return loop


def _without_parallel_workers(conn: psycopg.Connection[Any]) -> None:
    """A customer query reads one domain's rows: no parallel workers for it (ADR 63). A session setting, committed,
    so it outlives every later transaction of the connection, rolled back or not."""
    conn.execute("SET max_parallel_workers_per_gather = 0")
    conn.commit()


def build_api(settings: Settings) -> Flask:
    """The API: PostgreSQL for rollups and tokens; analyst SQL relayed to the analyst server (no ClickHouse here)."""
    from psycopg_pool import ConnectionPool

    from api.analyst_proxy import AnalystService
    from api.app import Backends, create_app
    from core.keys import internal_token
    from oltp.queries import Retention, RollupReader
    from oltp.schema import ensure_schema as ensure_pg

    secret = require_secret(settings, "the API (it authenticates to the analyst server)")
    dsn = require_pg(settings)
    ensure_pg(dsn)
    # prepare_threshold=None: no server-side prepared statements, so PostgreSQL plans every customer
    # query for its own range instead of switching to a generic plan after a few executions.
    pool = ConnectionPool(dsn, min_size=1, max_size=8, open=True, configure=_without_parallel_workers,
                          kwargs={"connect_timeout": 5, "prepare_threshold": None})
    # the relay's timeout and the analyst server's deadline come from the same setting (ADR 32)
    analyst = AnalystService(settings.analyst_url, internal_token(secret), timeout_s=settings.sql_relay_timeout_s)
    return create_app(settings, Backends(RollupReader(pool, Retention.from_settings(settings)), analyst))


def build_clickhouse_http(settings: Settings) -> Flask:
    """The ClickHouse-compatible endpoint (ADR 50): tokens from PostgreSQL; analyst SQL relayed to the analyst
    server like the API's (no ClickHouse here either)."""
    from psycopg_pool import ConnectionPool

    from api.analyst_proxy import AnalystService
    from api.clickhouse_http import create_clickhouse_app
    from core.keys import internal_token
    from oltp.schema import ensure_schema as ensure_pg

    secret = require_secret(settings, "the ClickHouse-compatible endpoint (it authenticates to the analyst server)")
    dsn = require_pg(settings)
    ensure_pg(dsn)
    pool = ConnectionPool(dsn, min_size=1, max_size=4, open=True, kwargs={"connect_timeout": 5})
    analyst = AnalystService(settings.analyst_url, internal_token(secret), timeout_s=settings.sql_relay_timeout_s)
    return create_clickhouse_app(settings, pool, analyst)


def _learn_table_functions(client: Any) -> None:
    """The server's table function names join the allowlist's (a call so named runs as one inside a table function's
    arguments: olap/allowlist.py); the built-in list stands if the server cannot say."""
    from olap.allowlist import learn_table_functions

    try:
        new = learn_table_functions(client)
    except Exception as exc:  # a server without system.table_functions access: the list stands
        log.warning("analyst-server: cannot read system.table_functions (%s); using the built-in list",
                    type(exc).__name__)
        return
    if new:
        log.info("analyst-server: %d table function names of this ClickHouse server refused in table function "
                 "arguments besides the built-in list", new)


def build_analyst_server(settings: Settings) -> Flask:
    """The analyst server: parses, checks and runs analyst SQL on its own ClickHouse clients, audits to PG."""
    from psycopg_pool import ConnectionPool

    from core.config import SQL_SLOT_WAIT_S
    from core.keys import internal_token
    from olap.analyst import SqlLimits
    from olap.client import connect, new_client
    from olap.schema import ensure_schema as ensure_ch
    from olap.server import AnalystConfig, AuditEntry, QuerySlots, create_analyst_app
    from oltp import audit
    from oltp.schema import ensure_schema as ensure_pg

    secret = require_secret(settings, "the analyst server")
    dsn = require_pg(settings)
    ensure_pg(dsn)
    client = connect(settings.clickhouse_dsn)
    ensure_ch(client, settings.clickhouse_database, settings.raw_retention_days, settings.clickhouse_cluster)
    _learn_table_functions(client)
    pool = ConnectionPool(dsn, min_size=1, max_size=2, open=True, kwargs={"connect_timeout": 5})

    def record(entry: AuditEntry) -> int:
        with pool.connection() as conn:
            return audit.record(conn, entry)  # the row's id: the watchdog names it if the query overruns

    limits = SqlLimits(settings.sql_max_execution_s, settings.sql_max_memory_bytes, settings.sql_max_result_rows,
                       settings.sql_max_result_bytes, settings.sql_max_threads)
    config = AnalystConfig(settings.clickhouse_database, limits, internal_token(secret), wait_s=SQL_SLOT_WAIT_S,
                           deadline_s=settings.sql_deadline_s, overrun_grace_s=settings.sql_overrun_grace_s)
    slots = QuerySlots(lambda: new_client(settings.clickhouse_dsn), settings.sql_max_concurrent)
    own_host = (urlsplit(settings.analyst_url).hostname or "127.0.0.1").lower()
    app = create_analyst_app(config, slots, record, (*settings.allowed_hosts, own_host))
    app.extensions["tally_audit_pool"] = pool  # for an embedding process to close (the tests' servers do)
    return app


def require_secret(settings: Settings, who: str) -> str:
    if not settings.secret:
        raise ConfigError("TALLY_SECRET", f"is required for {who} (16+ random characters, the same on every host)")
    return settings.secret


def run_loop_forever(build: Callable[[Settings], Loop], settings: Settings) -> None:
    from workers.gc_policy import tune_for_streaming

    loop = build(settings)
    tune_for_streaming()  # after start-up: the built clients are frozen, not rescanned (ADR 27)
    loop.run(stop_on_signals())


def run_loops_forever(build: Callable[[Settings], list[ConsumerLoop]], settings: Settings) -> None:
    """Run several consumer loops of one process, each in its own thread, until SIGTERM/SIGINT; if one
    of them ends otherwise (it should not: a loop pauses on store failures), all stop and the process
    exits non-zero, for its supervisor to start it again."""
    from workers.gc_policy import tune_for_streaming

    loops = build(settings)
    tune_for_streaming()
    stop = stop_on_signals()
    ended = threading.Event()

    def run(loop: ConsumerLoop) -> None:
        try:
            loop.run(stop)
        finally:
            ended.set()

    threads = [threading.Thread(target=run, args=(loop,), name=f"consumer-{i}") for i, loop in enumerate(loops)]
    for t in threads:
        t.start()
    while not (stop.is_set() or ended.is_set()):
        ended.wait(1.0)
    unexpected = ended.is_set() and not stop.is_set()
    stop.set()
    for t in threads:
        t.join()
    if unexpected:
        raise RuntimeError("a consumer loop ended without being asked to stop")
