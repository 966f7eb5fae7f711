"""The supervisor with fake child commands (real processes, no servers): restart with backoff, give up on a
crash loop with the child's log tail; and the die-with-parent rule for processes someone else forks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from infra.processes import pid_alive, spawn, stop
from infra.supervisor import CrashLoop, Supervisor


def python(tmp_path, name: str, code: str):
    log = tmp_path / f"{name}.log"
    return (lambda: spawn([sys.executable, "-c", code], log)), log


def test_a_dead_child_is_restarted_with_backoff(tmp_path):
    start, log = python(tmp_path, "sleeper", "import time; print('up', flush=True); time.sleep(60)")
    sup = Supervisor(backoff_s=0.2, max_backoff_s=1.0)
    restarted = []
    sup.on_restart = restarted.append
    child = sup.add("sleeper", start, log)
    first = child.proc.pid
    try:
        os.kill(first, signal.SIGKILL)
        child.proc.wait(5)
        sup.check()  # noticed: restart scheduled after the backoff, not at once
        assert child.restart_at is not None and child.proc.pid == first
        deadline = time.monotonic() + 5
        while child.proc.pid == first and time.monotonic() < deadline:
            time.sleep(0.05)
            sup.check()
        assert child.proc.pid != first and child.proc.poll() is None
        assert child.restarts == 1 and restarted == [child]
    finally:
        stop(child.proc)


def test_a_crash_looping_child_ends_supervision_with_its_log_tail(tmp_path):
    start, log = python(tmp_path, "worker", "import sys; print('boom: cannot connect to the store', flush=True); "
                                            "sys.exit(3)")
    steady, steady_log = python(tmp_path, "steady", "import time; time.sleep(60)")
    sup = Supervisor(max_crashes=5, window_s=60, backoff_s=0.05, max_backoff_s=0.2)
    sup.add("worker", start, log)
    other = sup.add("steady", steady, steady_log)
    t0 = time.monotonic()
    try:
        with pytest.raises(CrashLoop) as gave_up:
            sup.run(threading.Event(), interval_s=0.02)
        assert time.monotonic() - t0 < 10
        assert gave_up.value.name == "worker" and gave_up.value.returncode == 3
        assert "worker crashed 5 times within 60s" in str(gave_up.value)
        assert "boom: cannot connect to the store" in str(gave_up.value)
        assert other.proc.poll() is None and other.restarts == 0  # the healthy one was left alone
    finally:
        stop(other.proc)


def test_a_failing_start_counts_as_a_crash(tmp_path):
    from infra.processes import StartupError

    calls = []

    def start():
        calls.append(1)
        if len(calls) == 1:
            return subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        raise StartupError("PostgreSQL on 127.0.0.1:5 was not ready")

    sup = Supervisor(max_crashes=3, window_s=60, backoff_s=0.01, max_backoff_s=0.05)
    sup.add("postgres", start, None)
    with pytest.raises(CrashLoop) as gave_up:
        sup.run(threading.Event(), interval_s=0.01)
    assert gave_up.value.name == "postgres" and len(calls) == 3


def test_up_exits_non_zero_when_a_child_keeps_crashing(tmp_path, monkeypatch):
    """`Platform.supervise` turns a crash loop into exit status 1 with the message (log tail) on stderr."""
    from tally.platform import GaveUp, Platform
    from core.config import Settings

    platform = Platform(Settings.from_env({"TALLY_HOME": str(tmp_path / "home")}))
    start, log = python(tmp_path, "api", "print('api: address already in use'); raise SystemExit(1)")
    platform.supervisor = Supervisor(backoff_s=0.01, max_backoff_s=0.05)
    platform.supervisor.add("api", start, log)
    with pytest.raises(GaveUp) as exited:
        platform.supervise(threading.Event())
    assert exited.value.code.startswith("tally: api crashed 5 times") and "address already in use" in exited.value.code


def test_a_process_forked_by_a_third_party_dies_with_its_parent(tmp_path):
    """What granian's workers do (collector/wsgi.py): die_with_parent() in the grandchild; kill -9 the parent."""
    ready = tmp_path / "ready"
    (tmp_path / "grandchild.py").write_text(
        "import os, pathlib, sys, time\n"
        "from infra.processes import die_with_parent\n"
        "die_with_parent()\n"
        f"pathlib.Path({str(ready)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(60)\n")
    code = ("import subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, {str(tmp_path / 'grandchild.py')!r}])\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd(),
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() or not ready.read_text():
            assert time.monotonic() < deadline, "grandchild never started"
            time.sleep(0.05)
        grandchild = int(ready.read_text())
        assert pid_alive(grandchild)
        parent.kill()
        parent.wait(5)
        deadline = time.monotonic() + 5
        while pid_alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(grandchild), "the orphan lived on"
    finally:
        parent.kill()
