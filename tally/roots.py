"""Composition roots: each process is built here from one frozen Settings, and nowhere else."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from core.config import LOADER_GROUP, ROLLUP_GROUP, ConfigError, Settings

log = logging.getLogger(__name__)



def require_bootstrap(settings: Settings) -> tuple[str, ...]:
    if not settings.kafka_bootstrap:
        raise ConfigError("TALLY_KAFKA_BOOTSTRAP", "is required for this command (e.g. kafka1:9092,kafka2:9092)")
    return settings.kafka_bootstrap


RUN_STATE = "run/stack.json"  # under TALLY_HOME: where a running `tally up` says its embedded servers are


def require_pg(settings: Settings) -> str:
    """TALLY_PG_DSN, or the embedded PostgreSQL of a `tally up` running with the same TALLY_HOME."""
    if settings.pg_dsn:
        return settings.pg_dsn
    state = read_run_state(settings.home)
    if state.get("pg_dsn"):
        return str(state["pg_dsn"])
    raise ConfigError("TALLY_PG_DSN", "is required for this command (postgresql://user@host:5432/db), "
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


def build_shipper(settings: Settings):  # -> workers.shipper.Shipper
    from workers.kafka_io import make_producer
    from workers.shipper import Shipper

    require_bootstrap(settings)  # a missing setting fails now, not on the first segment

    def producer():  # called again after any failure; Kafka may be down when we start
        return make_producer(ensure_configured_topic(settings))

    # Shipped segments are kept until the rollup group stored them (checked in PostgreSQL when the
    # shipper can reach it) and, for the loader (offsets in ClickHouse), for TALLY_SPOOL_RETAIN_S (ADR 16).
    from workers.retention import postgres_offsets

    readers = {ROLLUP_GROUP: postgres_offsets(settings.pg_dsn, ROLLUP_GROUP)} if settings.pg_dsn else {}
    return Shipper(settings.spool_dir, producer, settings.topic, retain_s=settings.spool_retain_s,
                   retain_bytes=settings.spool_retain_bytes, offset_readers=readers, unchecked_groups=True)


def build_rollup_loop(settings: Settings, group: str = ROLLUP_GROUP):  # -> workers.consumer.ConsumerLoop
    from oltp.rollup_sink import RollupSink
    from oltp.schema import ensure_schema
    from workers.consumer import ConsumerLoop
    from workers.kafka_io import make_consumer

    bootstrap, dsn = ensure_configured_topic(settings), require_pg(settings)
    ensure_schema(dsn)
    consumer = make_consumer(bootstrap, group, session_timeout_ms=settings.consumer_session_timeout_ms)
    return ConsumerLoop(consumer, RollupSink(dsn, group), settings.topic)


def build_loader_loop(settings: Settings, group: str = LOADER_GROUP):  # -> workers.consumer.ConsumerLoop
    from olap.client import connect
    from olap.loader_sink import LoaderSink
    from olap.schema import ensure_schema
    from workers.consumer import ConsumerLoop
    from workers.kafka_io import make_consumer

    bootstrap = ensure_configured_topic(settings)
    client = connect(settings.clickhouse_dsn)
    ensure_schema(client, settings.clickhouse_database)
    consumer = make_consumer(bootstrap, group, session_timeout_ms=settings.consumer_session_timeout_ms)
    return ConsumerLoop(consumer, LoaderSink(client, settings.clickhouse_database, group), settings.topic)


def build_api(settings: Settings):  # -> flask.Flask
    """The API: PostgreSQL for rollups and tokens; analyst SQL relayed to the analyst server (no ClickHouse here)."""
    from psycopg_pool import ConnectionPool

    from api.analyst_proxy import AnalystService
    from api.app import Backends, create_app
    from core.keys import internal_token
    from oltp.queries import RollupReader
    from oltp.schema import ensure_schema as ensure_pg

    secret = require_secret(settings, "the API (it authenticates to the analyst server)")
    dsn = require_pg(settings)
    ensure_pg(dsn)
    # prepare_threshold=None: no server-side prepared statements, so PostgreSQL plans every customer
    # query for its own range instead of switching to a generic plan after a few executions.
    pool = ConnectionPool(dsn, min_size=1, max_size=8, open=True,
                          kwargs={"connect_timeout": 5, "prepare_threshold": None})
    analyst = AnalystService(settings.analyst_url, internal_token(secret), timeout_s=settings.sql_max_execution_s + 15)
    return create_app(settings, Backends(RollupReader(pool), analyst))


def build_analyst_server(settings: Settings):  # -> flask.Flask
    """The analyst server: parses, checks and runs analyst SQL on its own ClickHouse clients, audits to PG."""
    from psycopg_pool import ConnectionPool

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
    ensure_ch(connect(settings.clickhouse_dsn), settings.clickhouse_database)
    pool = ConnectionPool(dsn, min_size=1, max_size=2, open=True, kwargs={"connect_timeout": 5})

    def record(entry: AuditEntry) -> None:
        with pool.connection() as conn:
            audit.record(conn, entry)

    limits = SqlLimits(settings.sql_max_execution_s, settings.sql_max_memory_bytes, settings.sql_max_result_rows,
                       settings.sql_max_result_bytes, settings.sql_max_threads)
    config = AnalystConfig(settings.clickhouse_database, limits, internal_token(secret))
    slots = QuerySlots(lambda: new_client(settings.clickhouse_dsn), settings.sql_max_concurrent)
    own_host = (urlsplit(settings.analyst_url).hostname or "127.0.0.1").lower()
    return create_analyst_app(config, slots, record, (*settings.allowed_hosts, own_host))


def require_secret(settings: Settings, who: str) -> str:
    if not settings.secret:
        raise ConfigError("TALLY_SECRET", f"is required for {who} (16+ random characters, the same on every host)")
    return settings.secret


def run_loop_forever(build: Callable[[Settings], object], settings: Settings) -> None:
    loop = build(settings)
    loop.run(stop_on_signals())  # type: ignore[attr-defined]
