"""Collector-worker churn never takes the collector's master down (issue 15, item 14).

granian 2.8.7 exits ("Worker crash loop detected, exiting") when a worker it respawned dies again
within 5.5 s, whatever killed it. Killing a worker every few seconds while workers are briefly paused
(SIGSTOP/SIGCONT, as VM steal or GC pauses do) made the master exit, and `tally up` then gave up on
the whole platform. Here the collector runs as `tally collector` runs it, and the newest worker (the
one granian respawned last) is killed right after each respawn, the deterministic form of that churn.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from infra.processes import free_port, pid_alive
from oltp import sites
from tally.chaos.stack import children_of
from tests.conftest import SECRET


def post(port: int, key: str, domain: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        body = json.dumps({"domain": domain, "url": f"https://{domain}/", "type": "impression"})
        conn.request("POST", f"/collect?site={key}", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def serves_within(port: int, key: str, domain: str, timeout_s: float) -> bool:
    """Whether a POST is accepted within `timeout_s`: right after a kill, on a loaded machine, the connection can
    be refused for a moment while granian respawns (one fresh-clone run); the master must serve again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if post(port, key, domain) == 202:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def wait_for_workers(master: subprocess.Popen, count: int, deadline: float, exclude: set[int]) -> list[int]:
    """The master's live workers once there are `count` of them, none of them in `exclude`."""
    while True:
        workers = [w for w in children_of(master.pid) if w not in exclude and pid_alive(w)]
        if len(workers) >= count or master.poll() is not None or time.monotonic() > deadline:
            return workers
        time.sleep(0.05)


def pause_all(workers: list[int], pause_s: float = 0.02) -> None:
    """SIGSTOP then SIGCONT each worker, as a scheduler stall would."""
    for pid in workers:
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(pause_s)
        except ProcessLookupError:
            continue
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("interface", ["rsgi"])
def test_worker_kills_with_pauses_leave_the_master_serving(servers, tmp_path, domain, interface):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TALLY_", "PROMETHEUS_"))}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_SPOOL_DIR=str(tmp_path / "spool"), TALLY_COLLECTOR_PORT=str(port),
               TALLY_COLLECTOR_WORKERS="2", TALLY_REGISTRY_REFRESH_S="0.5", TALLY_COLLECTOR_INTERFACE=interface)
    key = sites.add(servers.pg_dsn, domain).site_key
    out = tmp_path / "collector.out"
    with open(out, "wb") as sink:
        master = subprocess.Popen([sys.executable, "-m", "tally.cli", "collector"], env=env, stdout=sink,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert master.poll() is None and time.monotonic() < deadline, out.read_text()
            try:
                if post(port, key, domain) == 202:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        killed: set[int] = set()
        workers = wait_for_workers(master, 2, time.monotonic() + 30, killed)
        for _ in range(6):
            pause_all(workers)
            newest = max(workers)  # pids grow: the worker granian respawned last
            os.kill(newest, signal.SIGKILL)
            killed.add(newest)
            workers = wait_for_workers(master, 2, time.monotonic() + 20, killed)
            assert master.poll() is None, f"the collector's master exited:\n{out.read_text()[-3000:]}"
            assert len(workers) == 2, f"granian did not respawn the worker:\n{out.read_text()[-3000:]}"
            assert serves_within(port, key, domain, 10.0), "nothing answered 202 between kills"
        assert master.poll() is None
        assert "crash loop" not in out.read_text()
        answered = [post(port, key, domain) for _ in range(10)]
        assert answered == [202] * 10
    finally:
        stop_master(master)


def stop_master(master: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the collector has not stopped within 30 s."""
    master.send_signal(signal.SIGTERM)
    try:
        master.wait(30)
    except subprocess.TimeoutExpired:
        master.kill()
        master.wait(5)


def test_a_worker_that_cannot_start_still_ends_the_master(servers, tmp_path):
    """The refusal: a worker exiting by itself with an error right after its spawn (here: its spool directory
    is a file) is a real crash loop; the master exits with status 1 instead of respawning it forever, and
    its supervisor (`tally up`) restarts it with backoff."""
    spool = tmp_path / "spool"
    spool.write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TALLY_", "PROMETHEUS_"))}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_SPOOL_DIR=str(spool), TALLY_COLLECTOR_PORT=str(free_port()), TALLY_COLLECTOR_WORKERS="2")
    master = subprocess.run([sys.executable, "-m", "tally.cli", "collector"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert master.returncode == 1
    assert "crash loop, exiting" in master.stdout + master.stderr
