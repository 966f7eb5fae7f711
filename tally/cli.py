"""`tally`: one entry point for every process and tool. Settings come from TALLY_* variables.

Every subcommand parses with `CommandParser` (tally/cli_support.py, ADR 40): a usage error prints that
subcommand's usage and exits 2; times use one syntax (tally/timespec.py); exit codes are EXIT_CODES.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from core.config import ConfigError, Settings
from tally import (
    cmd_backfill,
    cmd_chaos,
    cmd_migrate,
    cmd_rebuild,
    cmd_reconcile,
    cmd_replay,
    cmd_retention,
    cmd_sites,
    cmd_sql,
    cmd_sqllog,
    cmd_stats,
    cmd_status,
    cmd_tokens,
    cmd_topic,
    cmd_up,
)
from tally.cli_support import (
    BROKEN_PIPE,
    EXIT_CODES,
    FINDING,
    INTERRUPTED,
    USAGE,
    CommandParser,
    expected_failure,
    quiet_stdout,
    stdout_reader_gone,
)

if TYPE_CHECKING:
    from tally.cli_support import SubParsers
    from tally.wsgi_server import ConnectionLimits, WSGIApp

log = logging.getLogger("tally")


# Command groups that live in their own modules; each has `register(sub)` adding its subparsers with
# `set_defaults(func=handler)`, handler(settings, args) -> exit code.
COMMAND_MODULES = (cmd_sql, cmd_tokens, cmd_sites, cmd_sqllog, cmd_stats, cmd_chaos, cmd_status, cmd_migrate,
                   cmd_retention, cmd_reconcile, cmd_rebuild, cmd_replay, cmd_backfill, cmd_topic)
ANALYST_NICE = 10  # the analyst server's CPU priority offset (see cmd_analyst_server)


def _analyst_limits() -> ConnectionLimits:
    # Only the API calls the analyst server (on loopback): one client address, keep-alive connections kept
    # open as long as waitress's default; the request timeout still holds.
    from tally.wsgi_server import ConnectionLimits

    return ConnectionLimits(max_connections=256, max_per_client=0, idle_timeout_s=120, request_timeout_s=30)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description="Dual-store web analytics. "
                                     "Configure with TALLY_* environment variables (see README.md). "
                                     "Times: 10m, 24h, 7d (that long ago) or ISO-8601 with offset.",
                                     epilog=EXIT_CODES)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    cmd_up.register(sub)
    _register_services(sub)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def _register_services(sub: SubParsers) -> None:
    sub.add_parser("collector", help="serve POST /collect (granian)").set_defaults(func=cmd_collector)
    sub.add_parser("shipper", help="forward sealed spool segments to Kafka").set_defaults(func=cmd_shipper)
    sub.add_parser("rollup-worker", help="Kafka -> PostgreSQL rollups").set_defaults(func=cmd_rollup_worker)
    sub.add_parser("loader-worker", help="Kafka -> ClickHouse raw events").set_defaults(func=cmd_loader_worker)
    sub.add_parser("api", help="serve the query API and dashboard").set_defaults(func=cmd_api)
    sub.add_parser("clickhouse-http", help="serve analyst SQL over ClickHouse's HTTP interface "
                   "(TALLY_CLICKHOUSE_HTTP_PORT)").set_defaults(func=cmd_clickhouse_http)
    analyst = sub.add_parser("analyst-server", help="run analyst SQL on ClickHouse for the API (internal port)")
    analyst.add_argument("--with-loader", action="store_true",
                         help="also run the loader worker in this process (required with an embedded chdb:// DSN)")
    analyst.set_defaults(func=cmd_analyst_server)
    init = sub.add_parser("init", help="create the topic and both schemas on the configured servers")
    init.add_argument("--json", action="store_true", help="print one JSON object")
    init.set_defaults(func=cmd_init)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code (EXIT_CODES). Expected failures end with a message, not a traceback.

    A closed pipe ends a one-shot command quietly (141). A long-running service (SERVICES) ends so only when
    the pipe is its stdout and the reader left (`tally up | head`); any other closed pipe is a crash that
    goes on to the uncaught-exception hook, which logs it (core/logs.py)."""
    args: argparse.Namespace | None = None
    try:
        args = _parser().parse_args(argv)
        code = _run(args)
        sys.stdout.flush()  # here, not at interpreter exit: a closed pipe is caught below
        return code
    except BrokenPipeError:
        if args is not None and args.command in SERVICES and not stdout_reader_gone():
            raise
        quiet_stdout()
        return BROKEN_PIPE
    except KeyboardInterrupt:
        print("tally: interrupted", file=sys.stderr)
        return INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A one-shot command says itself what failed; kafka-python's retry lines would only repeat it.
    logging.getLogger("kafka").setLevel(logging.WARNING if args.command in SERVICES else logging.CRITICAL)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at every start
    try:
        settings = Settings.from_env(os.environ)
        if args.command in SERVICES:
            _setup_service_logging(settings, args)
        return int(args.func(settings, args))
    except ConfigError as exc:
        print(f"tally: configuration error: {exc}", file=sys.stderr)
        return USAGE
    except Exception as exc:
        # A service's crash is logged whole (core/logs.py) for its supervisor; a one-shot command says one line.
        message = None if args.command in SERVICES else expected_failure(exc)
        if message is None:
            raise
        print(f"tally {args.command}: {message}", file=sys.stderr)
        return FINDING


# Long-running processes: they log JSON lines to $TALLY_LOG_DIR/<command>.log (core/logs.py); one-shot
# commands keep logging text to stderr.
SERVICES = ("up", "collector", "shipper", "rollup-worker", "loader-worker", "api", "analyst-server",
            "clickhouse-http")


def _setup_service_logging(settings: Settings, args: argparse.Namespace) -> None:
    from core.logs import setup_logging

    if args.command == "up":  # before the first file or directory (TALLY_HOME, its logs) is made (ADR 34)
        os.umask(0o077)
    # `tally up` keeps its terminal short: warnings only (the banner is printed, not logged).
    try:
        setup_logging(settings, args.command, level=logging.DEBUG if args.verbose else logging.INFO,
                      terminal_level=logging.WARNING if args.command == "up" else logging.INFO,
                      stream=sys.stderr if args.command == "up" else None)
    except OSError as exc:
        raise ConfigError("TALLY_LOG_DIR", f"cannot write logs in {settings.log_dir} ({exc.strerror or exc}); "
                          "set TALLY_LOG_DIR to a writable directory, or - for stderr") from None
    logging.getLogger("kafka").setLevel(logging.WARNING)
    log.info("tally %s starting", args.command, extra={"command": args.command})


def cmd_collector(settings: Settings, args: argparse.Namespace) -> int:
    from collector.server import serve

    if not settings.secret:
        raise ConfigError("TALLY_SECRET", "is required for the collector (16+ random characters)")
    if not settings.pg_dsn:
        raise ConfigError("TALLY_PG_DSN", "is required for the collector (it reads the sites registry)")
    from tally.roots import own_metrics_dir

    own_metrics_dir(settings, os.environ)  # before granian forks its workers (they inherit it)
    serve(settings, settings.bind_host, settings.collector_port, settings.collector_workers)
    return 0


def cmd_shipper(settings: Settings, args: argparse.Namespace) -> int:
    from tally.roots import build_shipper, run_loop_forever

    run_loop_forever(build_shipper, settings)
    return 0


def cmd_rollup_worker(settings: Settings, args: argparse.Namespace) -> int:
    from tally.roots import build_rollup_loops, run_loops_forever

    run_loops_forever(build_rollup_loops, settings)
    return 0


def cmd_loader_worker(settings: Settings, args: argparse.Namespace) -> int:
    from tally.roots import build_loader_loop, run_loop_forever

    run_loop_forever(build_loader_loop, settings)
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from tally.roots import build_api
    from tally.wsgi_server import ConnectionLimits

    limits = ConnectionLimits(settings.api_max_connections, settings.api_max_connections_per_client,
                              settings.api_idle_timeout_s, settings.api_request_timeout_s)
    _serve(build_api(settings), settings.bind_host, settings.api_port, threads=16, limits=limits)
    return 0


def cmd_clickhouse_http(settings: Settings, args: argparse.Namespace) -> int:
    """The ClickHouse-compatible endpoint on TALLY_BIND_HOST:TALLY_CLICKHOUSE_HTTP_PORT, bounded like the API."""
    from tally.roots import build_clickhouse_http
    from tally.wsgi_server import ConnectionLimits

    limits = ConnectionLimits(settings.api_max_connections, settings.api_max_connections_per_client,
                              settings.api_idle_timeout_s, settings.api_request_timeout_s)
    _serve(build_clickhouse_http(settings), settings.bind_host, settings.clickhouse_http_port, threads=16,
           limits=limits)
    return 0


def cmd_analyst_server(settings: Settings, args: argparse.Namespace) -> int:
    from tally.roots import build_analyst_server, build_loader_loop

    app = build_analyst_server(settings)
    loader_thread, stop = None, threading.Event()
    if args.with_loader:
        from workers.gc_policy import tune_for_streaming

        loop = build_loader_loop(settings)
        tune_for_streaming()  # the loader's per-record allocations, not the analyst app, set this process's GC
        loader_thread = threading.Thread(target=loop.run, args=(stop,), name="loader", daemon=True)
        loader_thread.start()
    elif settings.clickhouse_dsn.startswith("chdb://"):
        log.warning("analyst-server: embedded chDB DSN without --with-loader; run the loader in this process, "
                    "chDB allows one engine per directory")
    # Below everything else on the machine: an analyst query (chDB runs it in this process) yields the CPU
    # to the collector, the API and the workers whenever they need it (ADR 10). Only from here on: on Linux
    # the nice value is per thread and inherited by the threads a thread starts, so the loader started above
    # (its writer, its chDB inserts, the engine's merges) keeps the other workers' priority, while this thread
    # and what it starts next (the request and query threads) run below it (ADR 56 "ClickHouse freshness").
    os.nice(ANALYST_NICE)
    cmd_reconcile.start_schedule(settings, stop)  # TALLY_RECONCILE_INTERVAL_S; results in reconcile_runs (ADR 20)
    # It listens where TALLY_ANALYST_URL points (loopback by default), not on TALLY_BIND_HOST: only the API calls it.
    url = urlsplit(settings.analyst_url)
    # the loader starts draining as the signal arrives, beside the requests' grace, not after it: both within
    # the 40 s `tally up` gives a process to stop
    _serve(app, url.hostname or "127.0.0.1", url.port or settings.analyst_port,
           threads=settings.sql_max_concurrent + 4, limits=_analyst_limits(), on_signal=stop.set)
    if loader_thread is not None:
        stop.set()
        loader_thread.join(timeout=30)  # it drains what is left on the topic first
    return 0


def _serve(app: WSGIApp, host: str, port: int, *, threads: int, limits: ConnectionLimits,
           on_signal: Callable[[], None] | None = None) -> None:
    """Serve a WSGI app under waitress, bounded against idle and slow clients (tally/wsgi_server.py,
    ADR 35), until SIGTERM/SIGINT. `on_signal` runs as the signal arrives, while running requests end."""
    from tally.roots import stop_on_signals
    from tally.wsgi_server import create_server

    server = create_server(app, host, port, threads=threads, limits=limits)
    signals = stop_on_signals()

    def stop_when_signalled() -> None:
        signals.wait()
        if on_signal is not None:
            on_signal()
        server.close()  # running requests end (up to its grace), then run() returns

    threading.Thread(target=stop_when_signalled, daemon=True).start()
    try:
        server.run()
    except (OSError, ValueError):
        if not signals.is_set():
            raise


def cmd_init(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from olap.client import connect
    from olap.schema import ensure_schema as ensure_ch
    from oltp.schema import ensure_schema as ensure_pg
    from tally.roots import ensure_configured_topic, require_pg

    ensure_configured_topic(settings)
    ensure_pg(require_pg(settings))
    ensure_ch(connect(settings.clickhouse_dsn), settings.clickhouse_database, settings.raw_retention_days,
              settings.clickhouse_cluster)
    if args.json:
        print(json.dumps({"topic": settings.topic, "postgresql": "ok", "clickhouse": "ok"}))
    else:
        print("tally: topic and schemas are in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
