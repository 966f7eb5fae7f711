"""The embedded stack: PostgreSQL + tansu + a chDB directory, and `tally up` supervising every process."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from infra.broker import EmbeddedBroker
from infra.postgres import EmbeddedPostgres
from infra.processes import StartupError, spawn, stop_all, tail, wait_until
from tally.config import Settings

log = logging.getLogger(__name__)


class EmbeddedStack:
    """Starts the servers the platform needs on this machine and creates the topic and schemas."""

    def __init__(self, home: Path, *, partitions: int, topic: str, durable: bool = True) -> None:
        self.home = home
        self.partitions = partitions
        self.topic = topic
        self.postgres = EmbeddedPostgres(home / "postgres" / "data", durable=durable)
        self.broker = EmbeddedBroker(home / "logs" / "tansu.log")

    def start(self) -> "EmbeddedStack":
        from oltp.schema import ensure_schema
        from workers.kafka_io import ensure_topic

        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self.broker.start()
            self.postgres.start()
            ensure_topic([self.broker.bootstrap], self.topic, self.partitions)
            ensure_schema(self.postgres.dsn)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.postgres.stop()
        self.broker.stop()

    def settings_for(self, settings: Settings) -> Settings:
        return settings.with_overrides(kafka_bootstrap=(self.broker.bootstrap,), pg_dsn=self.postgres.dsn)


def load_or_create_secret(home: Path) -> str:
    path = home / "secret"
    if path.exists():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return value


def _child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(settings.raw)
    env.update({
        "TALLY_HOME": str(settings.home),
        "TALLY_KAFKA_BOOTSTRAP": ",".join(settings.kafka_bootstrap or ()),
        "TALLY_PG_DSN": settings.pg_dsn or "",
        "TALLY_SECRET": settings.secret or "",
        "TALLY_CLICKHOUSE_DSN": settings.clickhouse_dsn,
        "TALLY_SPOOL_DIR": str(settings.spool_dir),
        "TALLY_COLLECTOR_PORT": str(settings.collector_port),
        "TALLY_API_PORT": str(settings.api_port),
    })
    return env


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return resp.status == 200


class Platform:
    """`tally up`: the embedded stack plus one child process per component, restarted if it dies."""

    COMPONENTS = {
        "collector": ["collector"],
        "shipper": ["shipper"],
        "rollup-worker": ["rollup-worker"],
        # chDB allows one engine per directory per process: the loader runs inside the API process.
        "api": ["api", "--with-loader"],
    }

    def __init__(self, settings: Settings, *, durable: bool = True) -> None:
        self.base = settings
        self.stack = EmbeddedStack(settings.home, partitions=settings.partitions, topic=settings.topic,
                                   durable=durable)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.settings: Settings | None = None
        self._stopping = threading.Event()

    @property
    def collector_url(self) -> str:
        return f"http://{self.base.bind_host}:{self.base.collector_port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.base.bind_host}:{self.base.api_port}"

    def start(self, timeout: float = 90.0) -> None:
        self.stack.start()
        secret = self.base.secret or load_or_create_secret(self.base.home)
        self.settings = self.stack.settings_for(self.base).with_overrides(secret=secret)
        try:
            for name in self.COMPONENTS:
                self._spawn(name)
            wait_until(lambda: _http_ok(self.collector_url + "/healthz"), what="collector", timeout=timeout,
                       log_path=self._log(name="collector"), proc=self.children["collector"])
            wait_until(lambda: _http_ok(self.api_url + "/healthz"), what="api", timeout=timeout,
                       log_path=self._log(name="api"), proc=self.children["api"])
        except BaseException:
            self.stop()
            raise

    def _log(self, name: str) -> Path:
        return self.base.home / "logs" / f"{name}.log"

    def _spawn(self, name: str) -> None:
        assert self.settings is not None
        argv = [sys.executable, "-m", "tally.cli", *self.COMPONENTS[name]]
        self.children[name] = spawn(argv, self._log(name), env=_child_env(self.settings))

    def supervise(self, stop_event: threading.Event) -> None:
        """Restart any child that dies, until `stop_event` is set."""
        restarts: dict[str, float] = {}
        while not stop_event.wait(0.5):
            for name, proc in list(self.children.items()):
                if proc.poll() is None:
                    continue
                log.error("%s exited with %s; last log lines:\n%s", name, proc.returncode, tail(self._log(name)))
                if time.monotonic() - restarts.get(name, 0.0) < 5.0:
                    stop_event.wait(5.0)
                restarts[name] = time.monotonic()
                self._spawn(name)

    # Stop in pipeline order, so that what was accepted is spooled, shipped and consumed before the
    # (memory-only) embedded broker goes away: collector, then shipper (final ship), then both workers
    # (they drain until a poll comes back empty), then the servers.
    STOP_ORDER = (("collector",), ("shipper",), ("rollup-worker", "api"))

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        for group in self.STOP_ORDER:
            # workers may spend up to 20 s draining
            stop_all([self.children[name] for name in group if name in self.children], timeout=40)
        self.stack.stop()


def check_ports(settings: Settings) -> None:
    import socket

    for var, port in (("TALLY_COLLECTOR_PORT", settings.collector_port), ("TALLY_API_PORT", settings.api_port)):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is fine
            try:
                sock.bind((settings.bind_host, port))
            except OSError as exc:
                raise StartupError(f"{var}={port}: cannot listen on {settings.bind_host}:{port} ({exc.strerror}); "
                                   f"set {var} to a free port") from None
