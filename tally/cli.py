"""`tally`: one entry point for every process and tool. Settings come from TALLY_* variables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
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
    cmd_sqllog,
    cmd_stats,
    cmd_status,
    cmd_tokens,
)

if TYPE_CHECKING:
    from tally.wsgi_server import ConnectionLimits

log = logging.getLogger("tally")


# Command groups that live in their own modules; each has `register(sub)` adding its subparsers with
# `set_defaults(func=handler)`, handler(settings, args) -> exit code.
COMMAND_MODULES = (cmd_tokens, cmd_sites, cmd_sqllog, cmd_stats, cmd_chaos, cmd_status, cmd_migrate, cmd_retention,
                   cmd_reconcile, cmd_rebuild, cmd_replay, cmd_backfill)
ANALYST_NICE = 10  # the analyst server's CPU priority offset (see cmd_analyst_server)


def _analyst_limits() -> ConnectionLimits:
    # Only the API calls the analyst server (on loopback): one client address, keep-alive connections kept
    # open as long as waitress's default; the request timeout still holds.
    from tally.wsgi_server import ConnectionLimits

    return ConnectionLimits(max_connections=256, max_per_client=0, idle_timeout_s=120, request_timeout_s=30)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description="Dual-store web analytics. "
                                     "Configure with TALLY_* environment variables (see README.md).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="run the whole platform on the embedded stack (PostgreSQL, tansu, chDB)")
    up.add_argument("--demo", action="store_true", help="also send synthetic traffic so numbers move")
    up.set_defaults(func=cmd_up)
    sub.add_parser("collector", help="serve POST /collect (granian)").set_defaults(func=cmd_collector)
    sub.add_parser("shipper", help="forward sealed spool segments to Kafka").set_defaults(func=cmd_shipper)
    sub.add_parser("rollup-worker", help="Kafka -> PostgreSQL rollups").set_defaults(func=cmd_rollup_worker)
    sub.add_parser("loader-worker", help="Kafka -> ClickHouse raw events").set_defaults(func=cmd_loader_worker)
    sub.add_parser("api", help="serve the query API and dashboard").set_defaults(func=cmd_api)
    analyst = sub.add_parser("analyst-server", help="run analyst SQL on ClickHouse for the API (internal port)")
    analyst.add_argument("--with-loader", action="store_true",
                         help="also run the loader worker in this process (required with an embedded chdb:// DSN)")
    analyst.set_defaults(func=cmd_analyst_server)
    sub.add_parser("init", help="create the topic and both schemas on the configured servers").set_defaults(
        func=cmd_init)
    sql = sub.add_parser("sql", help="run analyst SQL through the API (read-only, limited)")
    sql.add_argument("query")
    sql.add_argument("--api-url", default=None, help="default: http://TALLY_BIND_HOST:TALLY_API_PORT")
    sql.set_defaults(func=cmd_sql)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        settings = Settings.from_env(os.environ)
        if args.command in SERVICES:
            _setup_service_logging(settings, args)
        return args.func(settings, args)
    except ConfigError as exc:
        print(f"tally: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# Long-running processes: they log JSON lines to $TALLY_LOG_DIR/<command>.log (core/logs.py); one-shot
# commands keep logging text to stderr.
SERVICES = ("up", "collector", "shipper", "rollup-worker", "loader-worker", "api", "analyst-server")


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


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from infra.processes import StartupError
    from infra.stack import check_ports
    from tally.demo import DEMO_DOMAINS, register_demo_sites, run_demo
    from tally.platform import Platform
    from tally.roots import ADMIN_TOKEN_FILE, stop_on_signals

    stop = stop_on_signals()
    try:
        check_ports(settings)
        platform = Platform(settings)
        print(f"tally: starting the embedded stack in {settings.home} ...", flush=True)
        platform.start()
    except StartupError as exc:
        print(f"tally: start-up failed: {exc}", file=sys.stderr)
        return 1
    try:
        domain = DEMO_DOMAINS[0] if args.demo else "example.com"
        token_file = settings.home / ADMIN_TOKEN_FILE
        if platform.admin_token_created:  # shown once; later starts name the file only
            admin = f"  admin token {platform.admin_token}\n              (saved in {token_file}, mode 0600)"
        else:
            admin = f"  admin token in {token_file}"
        print(f"""
tally is up.
  collector   {platform.collector_url}/collect
  api         {platform.api_url}/api/v1/domains/{domain}/impressions?granularity=15m
  analyst SQL {platform.api_url}/api/v1/sql      (or: tally sql "SELECT count() FROM tally.events")
  dashboard   {platform.api_url}/?domain={domain}
  logs        {settings.log_dir or 'stderr (TALLY_LOG_DIR=-)'}
{admin}
Press Ctrl-C to stop.""", flush=True)
        if args.demo:
            keys = register_demo_sites(platform.settings.pg_dsn or "")  # the collector needs their site keys
            threading.Thread(target=run_demo, args=(platform.collector_url, stop), kwargs={"keys": keys},
                             daemon=True).start()
        platform.supervise(stop)
    finally:
        print("tally: stopping ...", flush=True)
        platform.stop()
    return 0


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


def cmd_analyst_server(settings: Settings, args: argparse.Namespace) -> int:
    from tally.roots import build_analyst_server, build_loader_loop

    # Below everything else on the machine: an analyst query (chDB runs it in this process) yields the CPU
    # to the collector, the API and the workers whenever they need it (ADR 10).
    os.nice(ANALYST_NICE)
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
    cmd_reconcile.start_schedule(settings, stop)  # TALLY_RECONCILE_INTERVAL_S; results in reconcile_runs (ADR 20)
    # It listens where TALLY_ANALYST_URL points (loopback by default), not on TALLY_BIND_HOST: only the API calls it.
    url = urlsplit(settings.analyst_url)
    _serve(app, url.hostname or "127.0.0.1", url.port or settings.analyst_port,
           threads=settings.sql_max_concurrent + 4, limits=_analyst_limits())
    if loader_thread is not None:
        stop.set()
        loader_thread.join(timeout=30)  # it drains what is left on the topic first
    return 0


def _serve(app, host: str, port: int, *, threads: int, limits: ConnectionLimits) -> None:
    """Serve a WSGI app under waitress, bounded against idle and slow clients (tally/wsgi_server.py,
    ADR 35), until SIGTERM/SIGINT."""
    from tally.roots import stop_on_signals
    from tally.wsgi_server import create_server

    server = create_server(app, host, port, threads=threads, limits=limits)
    signals = stop_on_signals()
    threading.Thread(target=lambda: (signals.wait(), server.close()), daemon=True).start()
    try:
        server.run()
    except (OSError, ValueError):
        if not signals.is_set():
            raise


def cmd_init(settings: Settings, args: argparse.Namespace) -> int:
    from olap.client import connect
    from olap.schema import ensure_schema as ensure_ch
    from oltp.schema import ensure_schema as ensure_pg
    from tally.roots import ensure_configured_topic, require_pg

    ensure_configured_topic(settings)
    ensure_pg(require_pg(settings))
    ensure_ch(connect(settings.clickhouse_dsn), settings.clickhouse_database, settings.raw_retention_days)
    print("tally: topic and schemas are in place")
    return 0


def cmd_sql(settings: Settings, args: argparse.Namespace) -> int:
    url = (args.api_url or f"http://{settings.bind_host}:{settings.api_port}").rstrip("/") + "/api/v1/sql"
    from tally.roots import cli_token

    headers = {"Content-Type": "application/json"}
    token = cli_token(settings)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps({"sql": args.query}).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=settings.sql_max_execution_s + 10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"tally sql: {json.loads(exc.read()).get('error', {}).get('message', exc)}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"tally sql: cannot reach the API at {url} ({exc.reason}); is `tally up` running?", file=sys.stderr)
        return 1
    print("\t".join(body["columns"]))
    for row in body["rows"]:
        print("\t".join("" if v is None else str(v) for v in row))
    return 0

if __name__ == "__main__":
    sys.exit(main())
