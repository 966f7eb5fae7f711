"""Idle sockets do not take the collector off the air (attack review: ~2,100 sockets that never send a byte made a
2-worker collector answer nothing, /tag.js and /i.gif included; collector/server.py MAX_CONNECTIONS_PER_WORKER)."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

import pytest

from infra.processes import free_port
from oltp import sites
from tests.conftest import SECRET
from tests.test_collector_churn import post, serves_within, stop_master

IDLE = 2600  # above granian's default of BACKLOG // workers connections per worker, for 1 worker or 2


def _room_for(sockets: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < sockets + 200:
        pytest.fail(f"this test opens {sockets} sockets; the hard limit of open files is {hard}")
    if soft != resource.RLIM_INFINITY and soft < sockets + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (sockets + 200 if hard == resource.RLIM_INFINITY
                                                     else min(hard, sockets + 200), hard))


def test_thousands_of_idle_sockets_leave_the_collector_serving(servers, tmp_path, domain):
    _room_for(IDLE)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TALLY_", "PROMETHEUS_"))}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_SPOOL_DIR=str(tmp_path / "spool"), TALLY_COLLECTOR_PORT=str(port),
               TALLY_COLLECTOR_WORKERS="2", TALLY_REGISTRY_REFRESH_S="0.5")
    key = sites.add(servers.pg_dsn, domain).site_key
    out = tmp_path / "collector.out"
    idle: list[socket.socket] = []
    with open(out, "wb") as sink:
        master = subprocess.Popen([sys.executable, "-m", "tally.cli", "collector"], env=env, stdout=sink,
                                  stderr=subprocess.STDOUT)
    try:
        assert serves_within(port, key, domain, 60.0), out.read_text()[-3000:]
        for _ in range(IDLE):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(1)  # the workers accept them
        assert [post(port, key, domain) for _ in range(5)] == [202] * 5
        tag = socket.create_connection(("127.0.0.1", port), timeout=5)
        tag.sendall(b"GET /tag.js HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert tag.recv(12) == b"HTTP/1.1 200"
        tag.close()
    finally:
        for s in idle:
            s.close()
        stop_master(master)
