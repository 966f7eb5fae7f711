"""The embedded servers: PostgreSQL and tansu under TALLY_HOME (chDB lives in-process), and their start-up checks.

Private to the user who runs them (docs/adr/0034-embedded-stack-private.md): `make_private` takes group and
other bits off what tally keeps under TALLY_HOME (homes made by older versions had 0755/0644), `tally up`
runs with umask 077 so everything made later is 0700/0600, and PostgreSQL wants its password
(infra/postgres.py). The broker (tansu 0.6) has no usable authentication: any local process can talk to it
on its loopback port; see the ADR.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
import time
from pathlib import Path

from core.config import Settings
from infra.broker import EmbeddedBroker
from infra.postgres import EmbeddedPostgres
from infra.processes import StartupError

log = logging.getLogger(__name__)


class EmbeddedStack:
    """Starts the servers the platform needs on this machine (the roots create the topic and schemas)."""

    def __init__(self, home: Path, *, durable: bool = True) -> None:
        self.home = home
        self.postgres = EmbeddedPostgres(home / "postgres" / "data", durable=durable)
        self.broker = EmbeddedBroker(home / "logs" / "tansu.log")

    def start(self) -> EmbeddedStack:
        make_private(self.home)
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


# What tally keeps under TALLY_HOME (the directory itself may be the user's, holding other things: those are
# left alone). Everything in these is the user's only.
HOME_ENTRIES = ("postgres", "logs", "run", "spool", "chdb", "collector", "backfill", "secret", "admin-token")


def make_private(home: Path) -> None:
    """Create TALLY_HOME (0700) if missing, and take the group and other bits off tally's entries in it and
    everything below them. Symlinks are left as they are (and not followed)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in HOME_ENTRIES:
        top = home / name
        if not top.exists() or top.is_symlink():
            continue
        _tighten(top)
        for root, dirs, files in os.walk(top):
            for entry in dirs + files:
                _tighten(Path(root) / entry)


def _tighten(path: Path) -> None:
    try:
        st = path.lstat()
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
            path.chmod(stat.S_IMODE(st.st_mode) & 0o700)
    except FileNotFoundError:  # gone meanwhile
        pass


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
    deadline = time.monotonic() + wait_s
    for var, port in (("TALLY_COLLECTOR_PORT", settings.collector_port), ("TALLY_API_PORT", settings.api_port),
                      ("TALLY_ANALYST_PORT", settings.analyst_port),
                      ("TALLY_CLICKHOUSE_HTTP_PORT", settings.clickhouse_http_port)):
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
