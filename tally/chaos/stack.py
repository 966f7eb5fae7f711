"""The platform under test: a real `tally up` in its own TALLY_HOME on free ports, its process tree, and
reading both stores (ADR 24).

`ChaosStack` starts `tally up` as a subprocess (the caller's TALLY_* settings are dropped), registers the
chaos site, finds processes by the pids `tally up` writes to `run/stack.json` and their children in /proc,
kills the whole tree at once (a power cut, minus the disk) and starts it again on the same home and ports.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from infra.processes import free_port

DOMAIN = "chaos.example.com"  # the one site the load sends to


class ChaosError(RuntimeError):
    """The harness could not do what it was asked (the platform did not start, a fault target is missing,
    `tally up` exited by itself); the message says what and where the logs are."""


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo.extend(children_of(p))
    return tree


def _stop_with_harness() -> None:
    # In the child, before exec: SIGTERM (an orderly stop) when the thread that started it dies, so a
    # harness killed by a test timeout leaves no platform running. Linux only; elsewhere nothing happens.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def signal_pid(pid: int, sig: int) -> bool:
    """Send `sig` to `pid`; False if there is no such process (any more)."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


class ChaosStack:
    """A running `tally up` in its own TALLY_HOME on free ports, and the signals a user (or a crash) sends it."""

    def __init__(self, home: Path, *, env: dict[str, str] | None = None,
                 settings: dict[str, str] | None = None, hosts: int = 1) -> None:
        self.home = home
        self.hosts = hosts  # > 1: `tally up --hosts N` (ADR 59)
        self.collector_port, self.api_port = free_port(), free_port()
        base = os.environ if env is None else env
        self.env = {k: v for k, v in base.items() if not k.startswith("TALLY_")}
        self.env.update(TALLY_HOME=str(home), TALLY_COLLECTOR_PORT=str(self.collector_port),
                        TALLY_API_PORT=str(self.api_port), TALLY_ANALYST_PORT=str(free_port()),
                        TALLY_CLICKHOUSE_HTTP_PORT=str(free_port()),
                        TALLY_API_RATE_LIMIT="100000/minute;2000/second")
        self.env.update(settings or {})  # TALLY_* settings of the run itself (e.g. a short segment age)
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.site_key = ""
        self.token = ""
        self._urls: list[str] = []  # the collector hosts' URLs (--hosts N > 1), from run/stack.json

    @property
    def spool_dir(self) -> Path:
        return Path(self.env.get("TALLY_SPOOL_DIR") or self.home / "spool")

    @property
    def spool_dirs(self) -> list[Path]:
        """Every collector host's spool (one with one host)."""
        if self.hosts == 1:
            return [self.spool_dir]
        return [Path(d) for d in self._state()["spool_dirs"]]

    @property
    def collect_url(self) -> str:
        return f"http://127.0.0.1:{self.collector_port}/collect?site={self.site_key}"

    def collect_url_for(self, n: int) -> str:
        """The n-th request's collector: clients alternate between the hosts (and so retry on the next one)."""
        if self.hosts == 1:
            return self.collect_url
        return f"{self._urls[n % len(self._urls)]}/collect?site={self.site_key}"

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.home / "run" / "stack.json").read_text())
        return state

    def up(self, timeout_s: float = 300) -> float:
        """Start `tally up`; returns the seconds until it said it is up. Raises ChaosError. Call it from a thread
        that outlives the stack: `tally up` gets SIGTERM when that thread ends (PR_SET_PDEATHSIG)."""
        t0 = time.monotonic()
        hosts = ["--hosts", str(self.hosts)] if self.hosts > 1 else []
        self.proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "up", *hosts], env=self.env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=_stop_with_harness)
        ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, ready), daemon=True).start()
        while not ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                self._kill_proc()
                raise ChaosError(f"tally up did not start (exit {self.proc.poll()}): "
                                 + "".join(self.output[-40:]) + self.log_tails())
        self.token = (self.home / "admin-token").read_text().strip()
        if self.hosts > 1:
            self._urls = self._state()["collector_urls"]
        return time.monotonic() - t0

    def _read(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line)
            if "Press Ctrl-C" in line:
                ready.set()

    def _kill_proc(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def add_site(self, domain: str) -> None:
        added = subprocess.run([sys.executable, "-m", "tally.cli", "sites", "add", domain, "--json",
                                "--rate", "100000", "--burst", "1000000"],
                               env=self.env, capture_output=True, text=True, timeout=120)
        if added.returncode != 0:
            raise ChaosError(f"tally sites add {domain} failed: {added.stderr.strip()}")
        self.site_key = json.loads(added.stdout)["site_key"]

    def pids(self) -> dict[str, int]:
        """The supervised children's pids, as `tally up` wrote them last (run/stack.json)."""
        pids: dict[str, int] = json.loads((self.home / "run" / "stack.json").read_text())["pids"]
        return pids

    def pg_dsn(self) -> str:
        return str(json.loads((self.home / "run" / "stack.json").read_text())["pg_dsn"])

    def down(self, timeout_s: float = 180) -> int | None:
        """SIGTERM `tally up` (it stops its children in pipeline order); kill -9 the tree if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            signal_pid(self.proc.pid, signal.SIGCONT)  # in case a fault left it stopped
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_all()
        return self.proc.returncode

    def kill_all(self) -> int:
        """kill -9 `tally up` and every process under it, all at once; returns how many were killed."""
        assert self.proc is not None
        pids = process_tree(self.proc.pid)
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        return len(pids)

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted([*(self.home / "logs").glob("*.log"), *(self.home / "hosts").glob("*/logs/*.log")]):
            name = log.name if log.parent == self.home / "logs" else str(log.relative_to(self.home))
            out.append(f"\n--- {name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "".join(out)

    # --- reading the stores ---

    def sql(self, query: str, timeout_s: float = 60) -> list[list[Any]]:
        """Analyst SQL through the API with the admin token; rows. Raises OSError-family errors if unreachable."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/api/v1/sql", method="POST",
            data=json.dumps({"sql": query}).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            rows: list[list[Any]] = json.loads(resp.read())["rows"]
            return rows

    def pg_query(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.pg_dsn(), connect_timeout=10) as conn:
            return list(conn.execute(query, params).fetchall())
