"""Fixtures: one real embedded PostgreSQL, one real tansu broker and one chDB directory per test session.

Tests isolate themselves with a fresh topic, consumer groups and domain names,
so they share the servers without sharing state.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.config import Settings
from infra.broker import EmbeddedBroker
from infra.postgres import EmbeddedPostgres

SECRET = "test-secret-0123456789abcdef"


@dataclass(frozen=True)
class Servers:
    bootstrap: str
    pg_dsn: str = field(repr=False)  # carries the embedded PostgreSQL's password
    chdb_dsn: str


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    home = tmp_path_factory.mktemp("servers")
    broker = EmbeddedBroker(home / "tansu.log").start()
    postgres = EmbeddedPostgres(home / "pg" / "data", durable=False)
    try:
        postgres.start()
        from oltp.schema import ensure_schema

        ensure_schema(postgres.dsn)
        yield Servers(broker.bootstrap, postgres.dsn, f"chdb://{home / 'chdb'}")
    finally:
        postgres.stop()
        broker.stop()


def serve_in_thread(app, port: int, threads: int = 6):
    """A real waitress server for `app` on 127.0.0.1:`port`, in a daemon thread; returns it (call .close())."""
    import threading

    import waitress

    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=threads)
    threading.Thread(target=server.run, daemon=True).start()
    return server


def start_analyst_server(servers: Servers, **env: str):
    """A real analyst server (its own ClickHouse clients, audit to PostgreSQL) on a free port: (url, server)."""
    from infra.processes import free_port, tcp_open, wait_until
    from tally.roots import build_analyst_server

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = Settings.from_env({"TALLY_PG_DSN": servers.pg_dsn, "TALLY_CLICKHOUSE_DSN": servers.chdb_dsn,
                                  "TALLY_SECRET": SECRET, "TALLY_ANALYST_URL": url, **env})
    server = serve_in_thread(build_analyst_server(settings), port)
    wait_until(lambda: tcp_open("127.0.0.1", port), what="analyst server", timeout=10)
    return url, server


@pytest.fixture(scope="session")
def analyst_url(servers: Servers) -> Iterator[str]:
    url, server = start_analyst_server(servers)
    yield url
    server.close()


@pytest.fixture()
def make_settings(servers: Servers, analyst_url: str, tmp_path: Path):
    """Settings for one test: a fresh topic and spool, the session's servers."""

    def build(**env: str) -> Settings:
        base = {
            "TALLY_HOME": str(tmp_path / "home"),
            "TALLY_KAFKA_BOOTSTRAP": servers.bootstrap,
            "TALLY_KAFKA_TOPIC": f"t-{uuid.uuid4().hex[:12]}",
            "TALLY_KAFKA_PARTITIONS": "3",
            "TALLY_PG_DSN": servers.pg_dsn,
            "TALLY_CLICKHOUSE_DSN": servers.chdb_dsn,
            "TALLY_SPOOL_DIR": str(tmp_path / "spool"),
            "TALLY_SECRET": SECRET,
            "TALLY_CONSUMER_SESSION_TIMEOUT_MS": "2000",
            "TALLY_ANALYST_URL": analyst_url,  # the session's analyst server (API tests relay SQL to it)
        }
        base.update(env)
        return Settings.from_env(base)

    return build


@pytest.fixture()
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture()
def conn(servers: Servers) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the session's PostgreSQL."""
    import psycopg

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
