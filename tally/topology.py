"""`tally up --hosts N`: which processes a simulated multi-host deployment runs, where, with what (ADR 59).

Pure planning, no processes: `plan(settings, hosts)` returns a `Topology` whose `children` name every
supervised process with its `tally` command, the environment it gets on top of the stack's and where its
raw output goes. `--hosts 1` is today's platform, one process per component under the names `tally status`
and `tally chaos` know (`collector`, `shipper`, `rollup-worker`, `api`, ...). With N > 1:

- N collector hosts `c1`..`cN`: a collector and a shipper each, with their own TALLY_HOME
  (`$TALLY_HOME/hosts/cI`), spool, logs and address;
- 2 rollup workers and 2 API processes, each with its own log directory (`$TALLY_HOME/hosts/<name>`);
- `api-front`: a round-robin TCP front on the configured API address (tally/front.py);
- one analyst server (with the loader) and one ClickHouse-compatible endpoint, as with one host.

Each host gets its own loopback address (`127.0.0.11`, `127.0.0.12`, ... for collectors; `127.0.0.21`, ...
for API processes) and keeps the configured port, as separate machines would: Linux routes all of
127.0.0.0/8 to the loopback interface, so nothing leaves the machine. That needs the default bind address
(127.0.0.1); with any other TALLY_BIND_HOST every process binds that address on a port of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.config import KNOWN_VARIABLES, Settings

MAX_HOSTS = 8  # collector hosts: 127.0.0.11 .. 127.0.0.18 (the API processes use 127.0.0.2x)
ROLLUP_WORKERS = 2
API_PROCESSES = 2
LOOPBACK = "127.0.0.1"
HOSTS_DIR = "hosts"  # under TALLY_HOME: one directory per simulated host
FRONT = "api-front"

# The processes every platform runs, single-host names and commands (tally/platform.py COMPONENTS).
SINGLE = {
    "collector": ("collector",),
    "shipper": ("shipper",),
    "rollup-worker": ("rollup-worker",),
    # chDB allows one engine per directory per process: the loader runs inside the analyst server,
    # which the API reaches over loopback, so no analyst query ever waits in the API process.
    "analyst": ("analyst-server", "--with-loader"),
    "api": ("api",),
    "clickhouse-http": ("clickhouse-http",),  # analyst SQL for ClickHouse tools, relayed like the API's
}


@dataclass(frozen=True)
class ChildSpec:
    """One supervised process: `argv` after `python -m`, `env` on top of the stack's, its raw output file."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    out: Path
    role: str  # collector, shipper, rollup-worker, api, api-front, analyst, clickhouse-http


@dataclass(frozen=True)
class CollectorHost:
    name: str  # c1, c2, ...
    address: str
    port: int
    home: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"


@dataclass(frozen=True)
class Topology:
    hosts: int
    children: dict[str, ChildSpec]
    collectors: tuple[CollectorHost, ...]
    api_backends: tuple[str, ...] = ()  # host:port of each API process behind the front (none: one API)
    front: str | None = None  # host:port the front listens on
    extra: dict[str, int] = field(default_factory=dict)  # role -> how many were added later (rollup workers)

    def spool_dirs(self) -> list[Path]:
        return [h.home / "spool" for h in self.collectors]


def _log_dir(settings: Settings, home: Path) -> Path | None:
    """A host's log directory (None: the stack logs to stderr, TALLY_LOG_DIR=-)."""
    return None if settings.log_dir is None else home / "logs"


def _out(settings: Settings, home: Path | None, command: str) -> Path:
    logs = (settings.log_dir or settings.home / "logs") if home is None else (_log_dir(settings, home)
                                                                                 or settings.home / "logs")
    return logs / f"{command}.out"


def _host_env(settings: Settings, home: Path, address: str) -> dict[str, str]:
    """What a process on a host of its own gets: its TALLY_HOME, logs, spool and address."""
    env = {"TALLY_HOME": str(home), "TALLY_SPOOL_DIR": str(home / "spool"), "TALLY_BIND_HOST": address}
    logs = _log_dir(settings, home)
    if logs is not None:
        env["TALLY_LOG_DIR"] = str(logs)
    if "TALLY_ALLOWED_HOSTS" in settings.raw:  # an explicit list: the host's own address answers too
        env["TALLY_ALLOWED_HOSTS"] = f"{settings.raw['TALLY_ALLOWED_HOSTS']},{address}"
    return env


def single(settings: Settings) -> Topology:
    """Today's platform: one process per component, their outputs in the stack's log directory."""
    children = {name: ChildSpec(("tally.cli", *argv), {}, _out(settings, None, argv[0]), name)
                for name, argv in SINGLE.items()}
    host = CollectorHost("c1", settings.bind_host, settings.collector_port, settings.home)
    return Topology(1, children, (host,))


def plan(settings: Settings, hosts: int, *, port_for: Callable[[str], int] | None = None) -> Topology:
    """The processes of `tally up --hosts <hosts>`. `port_for(address)` picks a free port when the bind
    address is not the loopback default (each process then needs a port of its own). Raises ValueError for a
    host count out of range."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise ValueError(f"--hosts must be between 1 and {MAX_HOSTS}")
    if hosts == 1:
        return single(settings)
    own = settings.bind_host == LOOPBACK

    def where(prefix: int, i: int, port: int) -> tuple[str, int]:
        if own:
            return f"127.0.0.{prefix + i}", port
        assert port_for is not None, "a bind address other than 127.0.0.1 needs port_for"
        return settings.bind_host, port_for(settings.bind_host)

    children: dict[str, ChildSpec] = {}
    collectors = []
    shared = {"TALLY_COLLECTOR_HOSTS": str(hosts)} if "TALLY_COLLECTOR_HOSTS" in KNOWN_VARIABLES else {}
    for i in range(1, hosts + 1):
        home = settings.home / HOSTS_DIR / f"c{i}"
        address, port = where(10, i, settings.collector_port)
        collectors.append(CollectorHost(f"c{i}", address, port, home))
        env = {**_host_env(settings, home, address), "TALLY_COLLECTOR_PORT": str(port), **shared}
        for role in ("collector", "shipper"):
            children[f"c{i}-{role}"] = ChildSpec(("tally.cli", role), env, _out(settings, home, role), role)
    for i in range(1, ROLLUP_WORKERS + 1):
        children[f"rollup-worker-{i}"] = rollup_worker(settings, i)
    backends = []
    for i in range(1, API_PROCESSES + 1):
        home = settings.home / HOSTS_DIR / f"api-{i}"
        address, port = where(20, i, settings.api_port)
        backends.append(f"{address}:{port}")
        env = {**_host_env(settings, home, address), "TALLY_API_PORT": str(port)}
        children[f"api-{i}"] = ChildSpec(("tally.cli", "api"), env, _out(settings, home, "api"), "api")
    front = f"{settings.bind_host}:{settings.api_port}"
    front_argv = ("tally.front", "--listen", front, *(a for b in backends for a in ("--backend", b)))
    children[FRONT] = ChildSpec(front_argv, {}, _out(settings, None, FRONT), FRONT)
    for name in ("analyst", "clickhouse-http"):
        children[name] = ChildSpec(("tally.cli", *SINGLE[name]), {}, _out(settings, None, SINGLE[name][0]), name)
    return Topology(hosts, children, tuple(collectors), tuple(backends), front)


def rollup_worker(settings: Settings, i: int) -> ChildSpec:
    """The i-th rollup worker of a multi-host platform: its own log directory (`hosts/rollup-worker-<i>`)."""
    home = settings.home / HOSTS_DIR / f"rollup-worker-{i}"
    env = {"TALLY_HOME": str(settings.home)}
    logs = _log_dir(settings, home)
    if logs is not None:
        env["TALLY_LOG_DIR"] = str(logs)
    return ChildSpec(("tally.cli", "rollup-worker"), env, _out(settings, home, "rollup-worker"), "rollup-worker")


# Stop in pipeline order, so that what was accepted is spooled, shipped and consumed before the (memory-only)
# embedded broker goes away: collectors, then shippers (final ship), then workers and servers, the front last.
STOP_ROLES = (("collector",), ("shipper",), ("rollup-worker", "analyst", "api", "clickhouse-http"), (FRONT,))
