"""The test layout of docs/adr/0042-test-layout.md: servers in layers started on first use, the `servers`
marker, the work units of `make test` (pytest-xdist) and a temporary root no other session resets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from infra.processes import tcp_open
from tests.stack import PLATFORM_LANES, ClosedPort, Servers, order_for_workers, work_unit


def refuses(address: str) -> bool:
    """True if nothing accepts a TCP connection at host:port."""
    host, port = address.rsplit(":", 1)
    return not tcp_open(host, int(port))


@pytest.mark.servers("postgres")
def test_a_test_asking_for_postgres_only_gets_refusing_addresses_for_the_rest(make_settings, servers):
    settings = make_settings()
    assert settings.pg_dsn == servers.pg_dsn
    (bootstrap,) = settings.kafka_bootstrap
    assert refuses(bootstrap)
    assert refuses(settings.analyst_url.removeprefix("http://"))
    assert settings.clickhouse_dsn.startswith("http://") and refuses(settings.clickhouse_dsn.removeprefix("http://"))


def test_a_test_without_the_marker_gets_every_server(make_settings, servers, analyst_url):
    settings = make_settings()
    assert settings.kafka_bootstrap == (servers.bootstrap,) and not refuses(servers.bootstrap)
    assert settings.analyst_url == analyst_url and settings.clickhouse_dsn == servers.chdb_dsn


@pytest.mark.servers("postgres", "warehouse")
def test_an_unknown_layer_is_named(request):
    with pytest.raises(ValueError, match="warehouse"):
        request.getfixturevalue("make_settings")


def test_servers_start_on_first_use_and_only_what_is_read(tmp_path):
    own = Servers(tmp_path / "servers")
    try:
        assert own.started() == [] and own.chdb_dsn.startswith("chdb://")
        assert own.started() == []  # chDB runs in the test process: nothing to start
        with psycopg.connect(own.pg_dsn) as conn:
            assert conn.execute("SELECT to_regclass('seen_events') IS NOT NULL").fetchone() == (True,)
        assert own.started() == ["postgres"]
        assert "postgres:" not in repr(own)  # the DSN carries the password
    finally:
        own.close()
    assert own.started() == []


def test_a_closed_port_refuses_and_stays_ours():
    port = ClosedPort()
    try:
        assert refuses(port.address)
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port.port))
    finally:
        port.close()


def test_another_pytest_session_starting_leaves_the_session_postgres_running(servers, tmp_path):
    """Every pytest session without --basetemp chmods /tmp/pytest-of-<user> back to 0700 when it starts;
    the session's PostgreSQL (its own system user when the tests run as root) must not lose its data
    directory to that: the checkpoint below opens global/pg_control."""
    dsn = servers.pg_dsn
    other = tmp_path / "other"
    other.mkdir()
    (other / "test_other.py").write_text("def test_other(tmp_path):\n    assert tmp_path.is_dir()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TALLY_"))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_other.py"],
                          cwd=other, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_whole_platform_modules_share_two_lanes_and_the_rest_are_units_of_their_own(request):
    assert work_unit("tests/test_chaos.py::test_x") == work_unit("tests/test_up.py::test_y") == "platform-1"
    assert work_unit("tests/test_status.py::test_z[a]") == "platform-2"
    assert work_unit("tests/test_api.py::test_a") == work_unit("tests/test_api.py::test_b") == "tests/test_api.py"
    assert set(PLATFORM_LANES.values()) == {"platform-1", "platform-2"}
    stray = {item.nodeid.split("::", 1)[0] for item in request.session.items
             if item.get_closest_marker("slow") and item.nodeid.split("::", 1)[0] not in PLATFORM_LANES}
    assert not stray, f"slow tests outside the platform lanes: add them to tests/stack.py PLATFORM_LANES: {stray}"


def test_workers_get_the_lanes_first_then_the_long_then_the_largest_modules_each_in_its_own_order():
    def item(nodeid: str, slow: bool = False) -> SimpleNamespace:
        return SimpleNamespace(nodeid=nodeid, get_closest_marker=lambda name: object() if slow else None)

    items = [item("tests/test_a.py::one"), item("tests/test_b.py::one"), item("tests/test_b.py::two"),
             item("tests/test_up.py::fast"), item("tests/test_up.py::slow", slow=True), item("tests/test_a.py::two"),
             item("tests/test_b.py::three"), item("tests/test_reconcile.py::one"),
             item("tests/test_api_server.py::one")]
    order_for_workers(items)  # duck-typed pytest.Item: nodeid and get_closest_marker are all it reads
    assert [i.nodeid for i in items] == [
        "tests/test_up.py::fast", "tests/test_up.py::slow", "tests/test_api_server.py::one",
        "tests/test_reconcile.py::one", "tests/test_b.py::one", "tests/test_b.py::two",
        "tests/test_b.py::three", "tests/test_a.py::one", "tests/test_a.py::two"]


def test_a_lanes_modules_run_in_the_lanes_order_the_shared_stacks_crash_loop_first():
    def item(nodeid: str) -> SimpleNamespace:
        return SimpleNamespace(nodeid=nodeid, get_closest_marker=lambda name: None)

    items = [item("tests/test_api.py::a"), item("tests/test_platform_hardening.py::crash"),
             *(item(f"tests/test_status.py::t{i}") for i in range(9)),
             *(item(f"tests/test_topology.py::t{i}") for i in range(20))]
    order_for_workers(items)
    modules = list(dict.fromkeys(i.nodeid.split("::", 1)[0] for i in items))
    assert modules == ["tests/test_platform_hardening.py", "tests/test_status.py", "tests/test_topology.py",
                       "tests/test_api.py"]


def test_the_shared_stack_stops_when_the_last_module_of_the_session_using_it_is_done():
    from tests.platform_stack import SharedPlatform, users

    def item(nodeid: str, *fixtures: str) -> SimpleNamespace:
        return SimpleNamespace(nodeid=nodeid, fixturenames=["request", *fixtures])

    items = [item("tests/test_status.py::unit"), item("tests/test_status.py::t", "stack", "platform_stack"),
             item("tests/test_platform_hardening.py::t", "platform_stack"), item("tests/test_api.py::t", "servers")]
    assert users(items) == {"tests/test_status.py", "tests/test_platform_hardening.py"}
    shared = SharedPlatform(None, users(items))  # nothing is started here
    running = SimpleNamespace(proc=None)
    shared.stack = running  # as acquire() leaves it
    shared.release("tests/test_platform_hardening.py")
    assert shared.stack is running  # test_status still to come
    shared.release("tests/test_status.py")
    assert shared.stack is None


def test_a_crashed_worker_fails_its_test_once_and_the_rest_of_its_module_still_runs(tmp_path):
    """pytest-xdist's loadfile gives the crashed worker's whole module, crashed test included, to the next
    worker: it crashed again, and the run hung. `PlatformLanes` reports the crash once and goes on."""
    (tmp_path / "conftest.py").write_text(
        "import pytest\n"
        "from tests.stack import PlatformLanes\n\n\n"
        "@pytest.hookimpl(tryfirst=True)\n"
        "def pytest_xdist_make_scheduler(config, log):\n"
        "    return PlatformLanes(config, log)\n")
    (tmp_path / "test_crash.py").write_text(
        "import os\nimport time\n\n\ndef test_first():\n    time.sleep(1)\n\n\n"
        "def test_crash():\n    os._exit(3)\n\n\ndef test_after():\n    pass\n")
    for name in "bcd":
        (tmp_path / f"test_{name}.py").write_text(f"def test_{name}_one():\n    pass\n\n\ndef test_{name}_two():\n"
                                                   "    pass\n")
    root = Path(__file__).resolve().parent.parent
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                           "-q", "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    summary = done.stdout.strip().splitlines()[-1]
    assert "1 failed, 8 passed" in summary, done.stdout + done.stderr
    assert "FAILED test_crash.py::test_crash" in done.stdout and done.stdout.count("node down") == 1  # not run again


def test_browser_waits_are_functions_not_strings_the_pages_csp_would_eval():
    """Playwright evaluates a bare-expression `wait_for_function` again with eval() on each later poll, which the
    dashboard's `script-src 'self'` refuses (EvalError) whenever the condition is not true at the first check: a
    flake that shows only when a panel is slow. Every wait is an arrow function (evaluated once)."""
    import re

    bare = [f"{p.name}:{i}" for p in sorted(Path(__file__).parent.glob("test_*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"wait_for_function\(\s*f?[\"'](?!\(\) =>|\(\w*\) =>)", line)]
    assert bare == []
