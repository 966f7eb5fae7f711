"""The embedded servers: PostgreSQL and tansu under TALLY_HOME (chDB lives in-process), and their start-up checks."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from infra.broker import EmbeddedBroker
from infra.postgres import EmbeddedPostgres
from infra.processes import StartupError
from core.config import Settings

log = logging.getLogger(__name__)


class EmbeddedStack:
    """Starts the servers the platform needs on this machine (the roots create the topic and schemas)."""

    def __init__(self, home: Path, *, durable: bool = True) -> None:
        self.home = home
        self.postgres = EmbeddedPostgres(home / "postgres" / "data", durable=durable)
        self.broker = EmbeddedBroker(home / "logs" / "tansu.log")

    def start(self) -> "EmbeddedStack":
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self.broker.start()
            self.postgres.start()
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


def check_ports(settings: Settings, wait_s: float = 15.0) -> None:
    """Fail with a clear message if a fixed port is taken. A port still held while the processes of a
    crashed run exit (children get SIGTERM when `tally up` dies) is waited for, up to `wait_s`."""
    import socket
    import time

    deadline = time.monotonic() + wait_s
    for var, port in (("TALLY_COLLECTOR_PORT", settings.collector_port), ("TALLY_API_PORT", settings.api_port),
                      ("TALLY_ANALYST_PORT", settings.analyst_port)):
        while True:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is fine
                try:
                    sock.bind((settings.bind_host, port))
                    break
                except OSError as exc:
                    if time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    raise StartupError(f"{var}={port}: cannot listen on {settings.bind_host}:{port} "
                                       f"({exc.strerror}); set {var} to a free port") from None
