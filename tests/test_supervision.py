"""The supervisor with fake child commands (real processes, no servers): restart with a growing, capped backoff,
a crash loop reported down while the others are left alone (never a reason to stop them); and the
die-with-parent rule for processes someone else forks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from infra.processes import pid_alive, spawn, stop
from infra.supervisor import Supervisor


def python(tmp_path, name: str, code: str):
    log = tmp_path / f"{name}.log"
    return (lambda: spawn([sys.executable, "-c", code], log)), log


def test_a_dead_child_is_restarted_with_backoff(tmp_path):
    start, log = python(tmp_path, "sleeper", "import time; print('up', flush=True); time.sleep(60)")
    sup = Supervisor(backoff_s=0.2, max_backoff_s=1.0)
    changes = []
    sup.on_change = lambda child: changes.append(child.state)
    child = sup.add("sleeper", start, log)
    first = child.proc.pid
    try:
        os.kill(first, signal.SIGKILL)
        child.proc.wait(5)
        sup.check()  # noticed: restart scheduled after the backoff, not at once
        assert child.restart_at is not None and child.proc.pid == first
        assert changes == ["down"] and sup.describe()["sleeper"]["state"] == "down"
        deadline = time.monotonic() + 5
        while child.proc.pid == first and time.monotonic() < deadline:
            time.sleep(0.05)
            sup.check()
        assert child.proc.pid != first and child.proc.poll() is None
        assert child.restarts == 1 and changes == ["down", "up"]
        assert sup.describe()["sleeper"] == {"state": "up", "pid": child.proc.pid, "restarts": 1,
                                             "crashes_in_a_row": 1, "last_exit_code": -9, "detail": None}
    finally:
        stop(child.proc)


def test_a_crash_looping_child_backs_off_is_reported_down_and_leaves_the_others_alone(tmp_path):
    """Issue 15, item 14: it used to raise CrashLoop after 5 crashes in 60 s, and `tally up` stopped everything."""
    start, log = python(tmp_path, "worker", "import sys; print('boom: cannot connect to the store', flush=True); "
                                            "sys.exit(3)")
    steady, steady_log = python(tmp_path, "steady", "import time; time.sleep(60)")
    sup = Supervisor(backoff_s=0.05, max_backoff_s=0.4, stable_s=60)
    delays: list[float] = []
    reports: list[dict] = []

    def changed(child):
        if child.name == "worker" and child.state == "down" and child.restart_at is not None:
            delays.append(child.backoff_s)
            reports.append(sup.describe()["worker"])

    sup.on_change = changed
    looping = sup.add("worker", start, log)
    other = sup.add("steady", steady, steady_log)
    steady_pid = other.proc.pid
    stop_event = threading.Event()
    runner = threading.Thread(target=sup.run, args=(stop_event,), kwargs={"interval_s": 0.01})
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while len(delays) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.is_alive(), "supervision ended by itself"
    finally:
        stop_event.set()
        runner.join(10)
    try:
        # the backoff doubles with each crash in a row, up to its cap; the looping child is started again each time
        assert delays[:7] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4], delays
        assert looping.restarts >= 6 and looping.last_code == 3
        report = reports[6]
        assert report["state"] == "down" and report["last_exit_code"] == 3 and report["crashes_in_a_row"] == 7
        assert "7 crash(es) in a row, last exit code 3; next start at " in report["detail"]
        assert report["detail"].endswith(" UTC (backoff 0.4s)")
        # the healthy one was left alone: same process, never restarted, up
        assert other.proc.pid == steady_pid and other.proc.poll() is None and other.restarts == 0
        assert sup.describe()["steady"]["state"] == "up"
    finally:
        stop(other.proc)
        stop(looping.proc)


def test_a_failing_start_counts_as_a_crash_and_is_retried(tmp_path):
    from infra.processes import StartupError

    calls = []

    def start():
        calls.append(1)
        if len(calls) == 1:
            return subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        raise StartupError("PostgreSQL on 127.0.0.1:5 was not ready")

    sup = Supervisor(backoff_s=0.01, max_backoff_s=0.05)
    child = sup.add("postgres", start, None)
    deadline = time.monotonic() + 20
    while len(calls) < 5 and time.monotonic() < deadline:
        sup.check()  # never raises
        time.sleep(0.005)
    assert len(calls) == 5 and child.proc is None and child.state == "down"
    assert child.crashes >= 4 and child.restarts == 0
    assert "last a failed start" in sup.describe()["postgres"]["detail"]


def test_an_unexpected_exception_in_a_restart_is_a_failed_start_not_the_end_of_supervision(tmp_path):
    """A restart that raises something else (subprocess.TimeoutExpired from initdb, a bug) is a failed start
    like any other: retried with backoff; the healthy children are never touched."""
    healthy = Supervisor(backoff_s=0.01, max_backoff_s=0.05)
    calls = []

    def start():
        calls.append(1)
        if len(calls) == 1:
            return subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        raise subprocess.TimeoutExpired(["initdb"], 120)

    steady = healthy.add("api", lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]), None)
    pid = steady.proc.pid
    child = healthy.add("postgres", start, None)
    deadline = time.monotonic() + 20
    try:
        while len(calls) < 4 and time.monotonic() < deadline:
            healthy.check()  # never raises
            time.sleep(0.005)
        assert len(calls) == 4 and child.state == "down" and child.crashes >= 3
        assert steady.state == "up" and steady.proc.pid == pid and steady.restarts == 0
    finally:
        steady.proc.kill()
        steady.proc.wait()


def test_a_child_that_stayed_up_a_while_starts_over_at_the_first_backoff(tmp_path):
    now = [1000.0]
    start, log = python(tmp_path, "sleeper", "import time; time.sleep(60)")
    sup = Supervisor(backoff_s=0.5, max_backoff_s=60, stable_s=30, clock=lambda: now[0])
    child = sup.add("sleeper", start, log)
    try:
        for expected in (0.5, 1.0, 2.0):  # killed right after each start: the backoff grows
            child.proc.kill()
            child.proc.wait(5)
            sup.check()
            assert child.restart_at - now[0] == expected
            now[0] = child.restart_at
            sup.check()
            assert child.state == "up"
        now[0] += 31  # then it stays up longer than stable_s
        child.proc.kill()
        child.proc.wait(5)
        sup.check()
        assert child.restart_at - now[0] == 0.5 and child.crashes == 1
    finally:
        stop(child.proc)


def test_platform_reports_a_crash_looping_child_down_and_keeps_supervising(tmp_path):
    """`Platform.supervise` used to turn a crash loop into exit status 1 (GaveUp) and stop everything; now the
    run state says which part is down and why, for `tally status` and the API's /readyz, and supervision goes
    on until it is asked to stop."""
    from core import metrics
    from core.config import Settings
    from core.runstate import down_components
    from tally.platform import Platform
    from tally.roots import read_run_state

    settings = Settings.from_env({"TALLY_HOME": str(tmp_path / "home")})
    platform = Platform(settings)
    platform.settings = settings  # what start() sets; no servers here
    start, log = python(tmp_path, "api", "print('api: address already in use'); raise SystemExit(1)")
    steady, steady_log = python(tmp_path, "shipper", "import time; time.sleep(60)")
    platform.supervisor = Supervisor(backoff_s=0.01, max_backoff_s=0.05, on_change=platform._changed)
    platform.supervisor.add("api", start, log)
    shipper = platform.supervisor.add("shipper", steady, steady_log)
    for child in platform.supervisor.children.values():  # as start() does once every child runs
        platform._report(child)
    stop_event = threading.Event()
    runner = threading.Thread(target=platform.supervise, args=(stop_event,))
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while platform.supervisor.children["api"].crashes < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.is_alive(), "supervision ended by itself"
        state = read_run_state(settings.home)
        assert state["components"]["api"]["state"] == "down"
        assert state["components"]["shipper"]["state"] == "up"
        assert "api" in down_components(settings.home) and "shipper" not in down_components(settings.home)
        scraped = metrics.render(metrics.API_FAMILIES).decode()  # the API's /metrics families
        assert 'tally_component_up{component="api"} 0.0' in scraped
        assert 'tally_component_up{component="shipper"} 1.0' in scraped
    finally:
        stop_event.set()
        runner.join(10)
        stop(shipper.proc)
    assert not runner.is_alive()
    assert shipper.restarts == 0


def test_the_first_restart_wait_is_a_setting_and_defaults_to_half_a_second(tmp_path):
    """TALLY_SUPERVISOR_BACKOFF_S (the crash-loop test of tests/test_platform_hardening.py runs a whole stack with a
    short one): the first wait of `tally up`'s supervisor, doubled per crash in a row, capped at 60 s as before."""
    from core.config import Settings
    from tally.platform import Platform

    default = Platform(Settings.from_env({"TALLY_HOME": str(tmp_path / "a")})).supervisor
    assert (default.backoff_s, default.max_backoff_s, default.stable_s) == (0.5, 60.0, 60.0)
    short = Platform(Settings.from_env({"TALLY_HOME": str(tmp_path / "b"),
                                        "TALLY_SUPERVISOR_BACKOFF_S": "0.1"})).supervisor
    assert (short.backoff_s, short.max_backoff_s, short.stable_s) == (0.1, 60.0, 60.0)
    child = short.add("x", lambda: None, None, proc=subprocess.Popen([sys.executable, "-c", "pass"]))
    child.proc.wait(10)
    short.check()
    assert child.backoff_s == 0.1 and child.restart_at is not None


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


def test_the_apis_readyz_names_the_parts_reported_down_and_stays_ready(make_settings, tmp_path):
    """Under `tally up` the API's /readyz lists what the supervisor reports down (stack.json `components`),
    200 all the same: the API serves without a shipper. A stack.json of a dead `tally up` says nothing."""
    import json

    from tally.roots import build_api

    settings = make_settings(TALLY_HOME=str(tmp_path / "up-home"))
    (settings.home / "run").mkdir(parents=True)
    reason = "down: 5 crash(es) in a row, last exit code 3; next start in 7.2s"
    state = {"pid": os.getpid(), "components": {"shipper": {"state": "down", "detail": reason},
                                                "collector": {"state": "up", "detail": None}}}
    (settings.home / "run" / "stack.json").write_text(json.dumps(state))
    app = build_api(settings)
    try:
        ready = app.test_client().get("/readyz")
        assert ready.status_code == 200 and ready.json == {"status": "ready", "down": {"shipper": reason}}
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (settings.home / "run" / "stack.json").write_text(json.dumps({**state, "pid": dead.pid}))
        assert app.test_client().get("/readyz").json == {"status": "ready"}
    finally:
        app.extensions["tally_backends"].rollups.pool.close()
