"""Fixtures: one real embedded PostgreSQL, one real tansu broker and one chDB directory per test process.

Tests isolate themselves with a fresh topic, consumer groups and domain names,
so they share the servers without sharing state. Each server starts the first time a test needs it
(tests/stack.py); `make_settings` fills in the ones a test asks for with `@pytest.mark.servers(...)`.
Under pytest-xdist every worker has its own servers, ports and temporary directories (docs/adr/0042).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from core.config import Settings
from tests.stack import ClosedPort, PlatformLanes, Servers, layers_of, order_for_workers, private_basetemp
from tests.xdist_reports import pytest_report_to_serializable, pytest_warning_recorded  # noqa: F401  # hooks (xdist)

SECRET = "test-secret-0123456789abcdef"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Temporary directories out of /tmp/pytest-of-<user> (tests/stack.py private_basetemp); an explicit
    --basetemp wins, and pytest-xdist workers get theirs from the controller."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = private_basetemp()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (`make test`): the lanes first
        order_for_workers(items)  # plain runs keep pytest's order


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before pytest-xdist's own choice
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` (`make test`): one module per work unit, the whole-platform modules in two lanes."""
    return PlatformLanes(config, log) if config.getvalue("dist") == "loadfile" else None


def pytest_report_header(config: pytest.Config) -> str:
    return f"temporary directories: {config.option.basetemp or 'pytest default'}"


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """This process's PostgreSQL, tansu and chDB, each started when a test first reads its address."""
    started = Servers(tmp_path_factory.mktemp("servers"))
    try:
        yield started
    finally:
        from tally.roots import stop_sites_syncs  # the loaders' threads would log to pytest's closed streams

        stop_sites_syncs()
        started.close()


@pytest.fixture(scope="session")
def closed_port() -> Iterator[ClosedPort]:
    """A loopback port that refuses connections: the address of a server a test did not ask for."""
    port = ClosedPort()
    yield port
    port.close()


@pytest.fixture(scope="session")
def platform_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One `tally up` for the modules that ask (tests/platform_stack.py): started by the first, stopped when the
    last of this session's is done."""
    from tests.platform_stack import SharedPlatform, users

    shared = SharedPlatform(tmp_path_factory, users(request.session.items))
    try:
        yield shared
    finally:
        shared.close()


def serve_in_thread(app, port: int, threads: int = 6):
    """A real server for `app` on 127.0.0.1:`port`: tally.wsgi_server's, as `tally api` runs it, without a
    per-client bound (every test client, a browser's many connections included, is 127.0.0.1). Its loop runs in a
    daemon thread; returns the Server, whose close() stops it (5 s of grace for running requests) and waits for
    that thread to end."""
    import threading

    from tally.wsgi_server import ConnectionLimits, create_server

    server = create_server(app, "127.0.0.1", port, threads=threads, limits=ConnectionLimits(max_per_client=0))
    thread = threading.Thread(target=server.run, name=f"serve_in_thread:{port}", daemon=True)
    thread.start()
    stop = server.close

    def close(grace_s: float = 5.0) -> None:
        """Stop it and wait for its loop to end (within the grace and 1 s for its threads, as the Server stops)."""
        stop(grace_s)
        thread.join(grace_s + 15)
        if thread.is_alive():
            raise AssertionError(f"the server on port {port} did not stop within {grace_s + 15} s of close()")

    server.close = close
    return server


def start_analyst_server(servers: Servers, **env: str):
    """A real analyst server (its own ClickHouse clients, audit to PostgreSQL) on a free port: (url, server).

    In this process, so its watchdog's overrun exit (os._exit, ADR 32) would end the test run's process:
    the grace defaults to a test's whole timeout, and a query a loaded machine slows that much fails its
    test instead. tests/test_analyst_overrun.py runs the exit in a subprocess with a grace of its own.
    """
    from infra.processes import free_port, tcp_open, wait_until
    from tally.roots import build_analyst_server

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = Settings.from_env({"TALLY_PG_DSN": servers.pg_dsn, "TALLY_CLICKHOUSE_DSN": servers.chdb_dsn,
                                  "TALLY_SECRET": SECRET, "TALLY_ANALYST_URL": url,
                                  "TALLY_SQL_OVERRUN_GRACE_S": "300", **env})
    app = build_analyst_server(settings)
    server = serve_in_thread(app, port)
    close = server.close

    def close_with_pool() -> None:
        """Its audit pool too: one left to the garbage collector could be collected in one of its own threads,
        whose __del__ cannot join itself (PytestUnraisableExceptionWarning)."""
        close()
        app.extensions["tally_audit_pool"].close()

    server.close = close_with_pool
    wait_until(lambda: tcp_open("127.0.0.1", port), what="analyst server", timeout=10)
    return url, server


@pytest.fixture(scope="session")
def analyst_url(servers: Servers) -> Iterator[str]:
    url, server = start_analyst_server(servers)
    yield url
    server.close()


@pytest.fixture()
def make_settings(request: pytest.FixtureRequest, servers: Servers, closed_port: ClosedPort, tmp_path: Path):
    """Settings for one test: a fresh topic and spool, and the session's servers the test asks for with
    `@pytest.mark.servers("postgres", "broker", "chdb", "analyst")` (all four without the marker).

    A server the test did not ask for is a port that refuses connections, so reaching for it fails at once
    instead of starting it; a server the test passes its own address for is not started either.
    """
    layers = layers_of(mark.args for mark in request.node.iter_markers("servers"))
    refused = closed_port.address
    # the session's analyst server: API tests relay SQL to it
    analyst = request.getfixturevalue("analyst_url") if "analyst" in layers else f"http://{refused}"
    addresses = {  # each read (and its server started) only when the test does not pass its own
        "TALLY_PG_DSN": lambda: servers.pg_dsn if "postgres" in layers else f"postgresql://postgres@{refused}/postgres",
        "TALLY_KAFKA_BOOTSTRAP": lambda: servers.bootstrap if "broker" in layers else refused,
        "TALLY_CLICKHOUSE_DSN": lambda: servers.chdb_dsn if "chdb" in layers else f"http://{refused}",
        "TALLY_ANALYST_URL": lambda: analyst,
    }

    def build(**env: str) -> Settings:
        base = {
            "TALLY_HOME": str(tmp_path / "home"),
            "TALLY_KAFKA_TOPIC": f"t-{uuid.uuid4().hex[:12]}",
            "TALLY_KAFKA_PARTITIONS": "3",
            "TALLY_SPOOL_DIR": str(tmp_path / "spool"),
            "TALLY_SECRET": SECRET,
            "TALLY_CONSUMER_SESSION_TIMEOUT_MS": "2000",
        }
        base.update({name: address() for name, address in addresses.items() if name not in env})
        base.update(env)
        return Settings.from_env(base)

    return build


@pytest.fixture()
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture()
def conn(servers: Servers) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the session's PostgreSQL."""
    with psycopg.connect(servers.pg_dsn, autocommit=True) as c:
        yield c


@pytest.fixture()
def domain() -> str:
    return f"d{uuid.uuid4().hex[:10]}.example.com"


# ---------------------------------------------------------------- the collector over Flask's test client
# A real spool on disk and the sites-registry copy loaded from the session's PostgreSQL (refreshed by
# hand, no thread). A module may override `settings` (e.g. a short TALLY_REGISTRY_REFRESH_S).


@pytest.fixture()
def spool(settings: Settings):
    from spool.segments import SpoolWriter

    writer = SpoolWriter(settings.spool_dir, max_bytes=1 << 20, max_age_s=3600)
    yield writer
    writer.close()


@pytest.fixture()
def registry(settings: Settings):
    """The sites registry copy from the session's PostgreSQL, refreshed by hand (no thread)."""
    from collector.registry import SiteRegistry

    reg = SiteRegistry.from_settings(settings).start(background=False)
    yield reg
    reg.stop()


@pytest.fixture()
def app(settings: Settings, spool, registry):
    from collector.app import create_app

    return create_app(settings, spool, start_sealer=False, registry=registry)


@pytest.fixture()
def client(app):
    return app.test_client()


def register(settings: Settings, registry, domain: str, **kwargs) -> str:
    """Register `domain` as a site (kwargs as oltp.sites.add) and refresh the collector's copy: its key."""
    from oltp import sites

    key = sites.add(settings.pg_dsn, domain, **kwargs).site_key
    assert registry.refresh()
    return key


def registered(dsn: str, domain: str) -> str:
    """`domain` as a registered site (added once, UTC): the API answers 404 `unknown_domain` for any other (ADR 48)."""
    from oltp import sites

    if sites.get(dsn, domain) is None:
        sites.add(dsn, domain)
    return domain


# ---------------------------------------------------------------- Debian's Chromium, driven by Playwright
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling hosts this closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium(*extra_args: str):
    """A headless Chromium (Debian's, as `make test` installs it) for one module or test."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*CHROMIUM_ARGS, *extra_args])
        try:
            yield browser
        finally:
            browser.close()


def until(page, what: str, predicate, timeout: float = 15.0):
    """Poll `predicate` until it is truthy, keeping Playwright's event loop turning while `page` is open."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if page is not None and not page.is_closed():
            page.wait_for_timeout(25)
        else:
            time.sleep(0.025)
