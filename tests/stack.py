"""The session's servers in layers, each started the first time a test needs it (docs/adr/0042-test-layout.md).

One `Servers` per test process (per pytest-xdist worker): PostgreSQL with the schema applied, a tansu
broker and a chDB directory, each under the process's own temporary directory and on free ports. A test
that reads only `servers.pg_dsn` starts PostgreSQL and nothing else; the analyst server is a fixture of
its own on top (tests/conftest.py). Which of them `make_settings` fills in is the test's `servers` marker.
"""

from __future__ import annotations

import atexit
import getpass
import os
import socket
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from _pytest.pathlib import make_numbered_dir_with_cleanup
from xdist.remote import Producer
from xdist.scheduler import LoadFileScheduling
from xdist.workermanage import WorkerController

from infra.broker import EmbeddedBroker
from infra.postgres import EmbeddedPostgres
from oltp.schema import ensure_schema

#: What a test may ask for with `@pytest.mark.servers(...)`; no marker means all of them.
LAYERS = ("postgres", "broker", "chdb", "analyst")


class Servers:
    """PostgreSQL, tansu and chDB under `home`, each started on first use and stopped by `close()`.

    Thread-safe: a test may read an address from any thread. chDB runs inside the test process, so its
    "start" is only the directory name; the first client that connects creates it.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self._lock = threading.Lock()
        self._postgres: EmbeddedPostgres | None = None
        self._broker: EmbeddedBroker | None = None

    @property
    def pg_dsn(self) -> str:
        """The superuser DSN of the session's PostgreSQL (password included: never print it)."""
        with self._lock:
            if self._postgres is None:
                postgres = EmbeddedPostgres(self.home / "pg" / "data", durable=False)
                postgres.start()
                try:
                    ensure_schema(postgres.dsn)
                except BaseException:
                    postgres.stop()
                    raise
                self._postgres = postgres
            return self._postgres.dsn

    @property
    def bootstrap(self) -> str:
        """host:port of the session's tansu broker (memory storage)."""
        with self._lock:
            if self._broker is None:
                self._broker = EmbeddedBroker(self.home / "tansu.log").start()
            return self._broker.bootstrap

    @property
    def chdb_dsn(self) -> str:
        return f"chdb://{self.home / 'chdb'}"

    def started(self) -> list[str]:
        """The layers running now (for a test of this module, and for the session's summary)."""
        return [name for name, up in (("postgres", self._postgres), ("broker", self._broker)) if up is not None]

    def close(self) -> None:
        with self._lock:
            postgres, broker, self._postgres, self._broker = self._postgres, self._broker, None, None
        try:
            if postgres is not None:
                postgres.stop()
        finally:
            if broker is not None:
                broker.stop()

    def __repr__(self) -> str:  # never the DSN: it carries the password
        return f"Servers(home={self.home}, started={self.started()})"


class ClosedPort:
    """A loopback port bound but never listening: connecting to it is refused at once, and no other
    process can take it while the session runs. Stands in for a server a test did not ask for."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()


def layers_of(marks: Iterable[tuple[str, ...]]) -> frozenset[str]:
    """The layers named by a test's `servers` markers (the closest one wins); every layer without one."""
    for args in marks:
        unknown = [a for a in args if a not in LAYERS]
        if unknown or not args:
            raise ValueError(f"@pytest.mark.servers takes some of {', '.join(LAYERS)}; got {args!r}")
        return frozenset(args)
    return frozenset(LAYERS)


def private_basetemp() -> Path | None:
    """A fresh temporary root for this run under /tmp/tally-tests-of-<user>, the last 3 runs kept as pytest does.

    Not pytest's /tmp/pytest-of-<user>: every pytest session that starts chmods that directory back to 0700,
    which takes the search permission the embedded PostgreSQL (run as its own system user when the tests
    run as root) needs on its data directory's parents, and kills the servers of any other session running
    at the time. Nothing resets this root. None (pytest's default) if the root is not ours to use.
    """
    root = Path(tempfile.gettempdir()) / f"tally-tests-of-{getpass.getuser()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        if root.is_symlink() or root.stat().st_uid != os.getuid():
            return None
        run = make_numbered_dir_with_cleanup(root=root, prefix="run-", mode=0o700, keep=3,
                                             lock_timeout=3 * 86_400, register=atexit.register)
    except OSError:
        return None
    return run / "tmp"  # pytest empties the directory it is given: the run's lock file stays one level up


#: The modules of the whole-platform tests (marked `slow`: `tally up` or the chaos stack, a dozen processes
#: each). Under `make test` (pytest-xdist, `--dist loadfile`) each lane's modules run one after another on one
#: worker, so at most two such stacks share the machine at a time, and both lanes start first: they are the
#: longest units. A new module with slow tests belongs in one of them (tests/test_test_layout.py checks).
PLATFORM_LANES = {
    # balanced by the fresh-clone durations (lane 2 had ~270 s, lane 1 ~150 s). A lane's modules run in this
    # order: test_platform_hardening and test_status share one `tally up` (tests/platform_stack.py), the crash
    # loop first, and it stops before test_topology starts its own.
    "tests/test_chaos.py": "platform-1", "tests/test_up.py": "platform-1", "tests/test_broker_restart.py": "platform-1",
    "tests/test_broker_recycle.py": "platform-1",
    "tests/test_platform_hardening.py": "platform-2", "tests/test_status.py": "platform-2",
    "tests/test_topology.py": "platform-2",
}


def work_unit(nodeid: str) -> str:
    """What one worker runs from start to end: a platform lane, or one test module (as `--dist loadfile`)."""
    module = nodeid.split("::", 1)[0]
    return PLATFORM_LANES.get(module, module)


class PlatformLanes(LoadFileScheduling):  # type: ignore[misc]  # pytest-xdist is untyped here (Any)
    """`--dist loadfile` with the platform lanes as units, in the order the workers collected them.

    The order is set by `order_for_workers` on every worker (the same on each): the lanes, then the other
    modules, most tests first, as pytest-xdist's own reordering would.
    """

    def __init__(self, config: pytest.Config, log: Producer | None = None) -> None:
        super().__init__(config, log)
        config.option.loadscopereorder = False  # keep the workers' order: the lanes first

    def _split_scope(self, nodeid: str) -> str:
        return work_unit(nodeid)

    def remove_node(self, node: WorkerController) -> str | None:
        """A crashed worker's unfinished modules go back to the queue without its crashed test, which the
        caller reports failed once. (pytest-xdist 3.8's loadfile put back every module the worker had been
        given, finished ones too, and the crashed test with them: the next worker crashed again, or was
        sent an empty module and never asked for more, and the run hung.)"""
        workload = self.assigned_work.pop(node)
        unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
        if not unfinished:
            return None
        crashed = next(nodeid for unit in unfinished.values() for nodeid, done in unit.items() if not done)
        unfinished[self._split_scope(crashed)][crashed] = True
        self.workqueue.update((scope, unit) for scope, unit in unfinished.items() if not all(unit.values()))
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed


#: The longest modules outside the lanes, longest first (seconds summed over their tests in a parallel
#: run, ADR 42): they start right after the lanes, so that no long module begins near the end and keeps
#: one worker busy while the others idle (the browser modules, few tests each, used to start last and
#: end the run). Only an order: a module missing here, or listed and gone, is fine.
LONG_MODULES = tuple(f"tests/test_{name}.py" for name in (
    "api_server", "reconcile", "pixel", "clickhouse_http", "sites", "pipeline", "tag", "analyst_watchdog",
    "series_query", "openapi", "dashboard", "dashboard_panels", "dashboard_setup", "rebuild", "shipper",
    "analyst_server", "backfill", "replay", "analyst", "collector_shares", "browser_e2e"))


def order_for_workers(items: list[pytest.Item]) -> None:
    """Lanes first (their modules in PLATFORM_LANES's order), then the known long modules (longest first), then
    the others by their number of tests (most first); a module's tests keep their order."""
    per_module = Counter(item.nodeid.split("::", 1)[0] for item in items)
    lane_rank = {module: i for i, module in enumerate(PLATFORM_LANES)}
    long_rank = {module: i for i, module in enumerate(LONG_MODULES)}

    def rank(item: pytest.Item) -> tuple[bool, int, int]:
        module = item.nodeid.split("::", 1)[0]
        if module in PLATFORM_LANES:
            return False, lane_rank[module], 0
        return True, long_rank.get(module, len(LONG_MODULES)), -per_module[module]

    items.sort(key=rank)  # stable
