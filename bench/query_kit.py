"""What the query benches share (bench/queries.py, bench/breakdowns.py): the API under test in its own process,
customer tokens, the bench's zone and day starts, percentiles, databases."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

import psycopg

from infra.processes import free_port

ZONE = "Asia/Kathmandu"  # every bench site is registered here: its days are rollup_1d's


SECRET = "bench-secret-0123456789abcdef"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def domain_name(i: int) -> str:
    return f"d{i:05d}.bench.test"


def day_starts(lo: datetime, hi: datetime) -> list[datetime]:
    from oltp.tiers import DayStarts

    return DayStarts().span(ZONE, lo, hi)


def customer_tokens(dsn: str, domains: list[str]) -> dict[str, str]:
    from oltp import tokens

    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for d in domains:
            _, out[d] = tokens.create(conn, "customer", [d], name="bench")
    return out


class Api:
    """`tally api` in its own process group, and one kept-alive HTTP connection to it."""

    def __init__(self, work: Path, dsn: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        env.update(TALLY_HOME=str(work / "home"), TALLY_PG_DSN=dsn, TALLY_SECRET=SECRET,
                   TALLY_API_PORT=str(self.port), TALLY_ANALYST_URL=f"http://127.0.0.1:{free_port()}",
                   TALLY_API_RATE_LIMIT="10000000/minute;1000000/second")
        self.log = open(work / "api.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "api"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.conn: http.client.HTTPConnection | None = None

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tally api exited with {self.proc.returncode}; see {self.log.name}")
            try:
                status, _ = self.get("/healthz", None)
                if status == 200:
                    return
            except OSError:
                self.conn = None
                time.sleep(0.2)
        raise TimeoutError("tally api did not answer /healthz")

    def get(self, path: str, token: str | None) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self.conn.request("GET", path, headers=headers)
            resp = self.conn.getresponse()
            return resp.status, resp.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = None
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def create_database(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
