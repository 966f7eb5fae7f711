"""A real `tally up` (issue 15): the embedded stack is private to its user (item 6), and a crash-looping part
is restarted with backoff and reported down while the rest keeps serving (item 14).

Slow: one whole platform, shared with tests/test_status.py (tests/platform_stack.py). Item 6: nothing under
TALLY_HOME has group or other bits, every loopback port the stack listens on refuses a password-less PostgreSQL
login, and the PostgreSQL password is in no process's command line, no log, and not in `tally status`. Item 14:
the shipper killed right after each of its restarts (a crash loop) used to make `tally up` stop everything after
5 crashes in 60 s; now the collector keeps answering 202, `tally status`, the API's /readyz and /metrics say the
shipper is down, and it comes back.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from tally.chaos.stack import process_tree
from tests.test_broker_restart import Stack

DOMAIN = "private.example.com"


@pytest.fixture(scope="module")
def stack(platform_stack, request):
    """The session's shared `tally up` (TALLY_SPOOL_SEGMENT_AGE_S=0.2: segments sealed, shipped and retained soon;
    TALLY_SUPERVISOR_BACKOFF_S=0.1), with this module's site and 20 events in both stores."""
    try:
        s = platform_stack.acquire()
        s.add_site(DOMAIN)
        s.post(DOMAIN, range(0, 20))
        s.wait_for("PostgreSQL", lambda: s.pg_total(DOMAIN), 20)
        s.wait_for("ClickHouse", lambda: s.ch_count(DOMAIN), 20)
        yield s
    finally:
        platform_stack.release(request.node.nodeid)


def run_state(s: Stack) -> dict:
    return json.loads((s.home / "run" / "stack.json").read_text())


def pg_password(s: Stack) -> str:
    password = (s.home / "postgres" / "password").read_text().strip()
    assert len(password) >= 32
    return password


def listening_ports(pids: list[int]) -> set[int]:
    """TCP ports in LISTEN state held by `pids` (their sockets' inodes, matched in /proc/net/tcp{,6})."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.slow
def test_the_embedded_stack_is_private_to_its_user(stack):
    home = stack.home
    loose = []
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            path = Path(root) / name
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                loose.append(f"{path.relative_to(home)} {stat.filemode(mode)}")
    assert not loose, loose
    # tally made it: nobody else may list it (as root, PostgreSQL's own system user gets o+x, search only)
    assert stat.S_IMODE(home.stat().st_mode) == (0o701 if os.geteuid() == 0 else 0o700)
    for expected in ("spool", "chdb", "logs", "run/metrics", "postgres/password", "run/stack.json"):
        assert (home / expected).exists(), expected  # the walk saw what matters

    tree = process_tree(stack.proc.pid)
    state = run_state(stack)
    password = pg_password(stack)
    pg_port = int(state["pg_dsn"].rsplit(":", 1)[1].split("/")[0])
    ports = listening_ports(tree)
    assert pg_port in ports and stack.collector_port in ports and stack.api_port in ports
    for port in sorted(ports):  # as ../shared/checks/11-hardening tries every loopback port
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=3)
    with psycopg.connect(state["pg_dsn"], connect_timeout=5) as conn:  # the DSN children get works
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)

    # the password reaches children in their environment (0400 in /proc), never on a command line
    in_environ = 0
    for pid in tree:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        assert password.encode() not in cmdline, cmdline.replace(b"\0", b" ")[:300]
        in_environ += password.encode() in environ
    assert in_environ >= 5  # collector (master and workers), shipper, rollup worker, analyst, api

    status = subprocess.run([sys.executable, "-m", "tally.cli", "status", "--json"], env=stack.env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert password not in status.stdout + status.stderr
    assert json.loads(status.stdout)["processes"]["postgres"]["state"] == "up"

    keeps_it = {home / "postgres" / "password", home / "run" / "stack.json"}
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink() and path not in keeps_it:
            assert password.encode() not in path.read_bytes(), path


def kill_after_each_restart(stack: Stack, name: str, times: int) -> None:
    """kill -9 `name` as soon as the supervisor started it again, `times` times: a crash loop."""
    for _ in range(times):
        pid = stack.pids()[name]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while stack.pids().get(name) == pid:
            assert stack.proc.poll() is None, "tally up exited:\n" + "".join(stack.output[-20:])
            assert time.monotonic() < deadline, f"{name} was not restarted"
            time.sleep(0.05)


def uptime_s(pid: int) -> float:
    """How long process `pid` has been running (/proc: its start in clock ticks since boot)."""
    started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return float(Path("/proc/uptime").read_text().split()[0]) - started


def restarts_once_stable(stack: Stack, name: str) -> int:
    """`name`'s restarts so far, once a crash before (another module on the shared stack) is more than the
    supervisor's stable 60 s behind it, so that the next kill is the first of a row. Waits only in that case."""
    component = run_state(stack)["components"][name]
    if component["restarts"]:
        time.sleep(max(0.0, 65 - uptime_s(component["pid"])))
    return component["restarts"]


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


@pytest.mark.slow
def test_a_crash_looping_part_is_reported_down_and_the_rest_keeps_serving(stack):
    restarts = restarts_once_stable(stack, "shipper")
    kill_after_each_restart(stack, "shipper", 5)  # restarted after 0.2, 0.4, 0.8, 1.6 s, then 3.2 s
    os.kill(stack.pids()["shipper"], signal.SIGKILL)  # the 6th crash in a row: 6.4 s down
    deadline = time.monotonic() + 10
    while run_state(stack)["components"]["shipper"]["state"] != "down":
        assert time.monotonic() < deadline, run_state(stack)["components"]
        time.sleep(0.02)
    # `tally up` frozen while the down state is looked at (SIGSTOP: its supervisor cannot start the shipper
    # again meanwhile, however slow this machine is); the collector, the API and `tally status` go on without it
    os.kill(stack.proc.pid, signal.SIGSTOP)
    try:
        down = run_state(stack)["components"]["shipper"]
        assert down["state"] == "down", down
        assert down["crashes_in_a_row"] == 6 and down["last_exit_code"] == -9, down

        stack.post(DOMAIN, range(20, 30), deadline_s=10)  # the edge keeps accepting meanwhile
        status = subprocess.run([sys.executable, "-m", "tally.cli", "status", "--json", "--timeout", "4"],
                                env=stack.env, capture_output=True, text=True, timeout=60)
        report = json.loads(status.stdout)
        assert status.returncode == 1 and report["processes"]["shipper"]["state"] == "down", status.stdout
        assert "6 crash(es) in a row" in report["processes"]["shipper"]["detail"]
        assert report["processes"]["collector"]["state"] == "up" and report["processes"]["api"]["state"] == "up"
        code, body = get(f"http://127.0.0.1:{stack.api_port}/readyz")
        assert code == 200 and "shipper" in json.loads(body)["down"], body
        code, body = get(f"http://127.0.0.1:{stack.api_port}/metrics")
        assert b'tally_component_up{component="shipper"} 0.0' in body
        assert b'tally_component_up{component="collector"} 1.0' in body
        assert stack.proc.poll() is None
    finally:
        os.kill(stack.proc.pid, signal.SIGCONT)

    # it comes back by itself, and what was accepted while it was down is shipped and counted
    stack.wait_for("PostgreSQL", lambda: stack.pg_total(DOMAIN), 30, timeout_s=90)
    assert run_state(stack)["components"]["shipper"]["state"] == "up"
    code, body = get(f"http://127.0.0.1:{stack.api_port}/readyz")
    assert json.loads(body) == {"status": "ready"}
    code, body = get(f"http://127.0.0.1:{stack.api_port}/metrics")
    assert b'tally_component_up{component="shipper"} 1.0' in body
    assert f'tally_component_restarts_total{{component="shipper"}} {restarts + 6}.0'.encode() in body
    assert stack.proc.poll() is None
