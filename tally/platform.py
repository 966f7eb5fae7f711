"""`tally up`: the embedded stack plus one supervised child process per component (a composition root).

Every process is supervised (infra/supervisor.py), the embedded broker and PostgreSQL
included: a dead one is restarted with backoff, on the same port (children got the DSN and
bootstrap address at spawn); a restarted broker (memory storage) gets its topic back at once,
and the shipper ships the segments it retained to that new incarnation (ADR 16). A child that
keeps crashing is restarted with a growing backoff (0.5 s doubling to 60 s) and reported down
(run/stack.json `components`, so `tally status` and the API's /readyz; the metric
`tally_component_up`); the others keep serving. Only SIGTERM/SIGINT stop the platform (ADR 33).

Everything `tally up` and its children create is private to the user (umask 077, ADR 34); the
PostgreSQL DSN carries a password and reaches children in their environment only.

`tally up --hosts N` (N > 1) runs the simulated multi-host deployment tally/topology.py plans (ADR 59):
N collector hosts, two rollup workers, two API processes behind a round-robin front; a running one takes
requests to add a rollup worker or to take processes out of supervision (tally/control.py).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import orjson

from core.config import Settings
from core.runstate import RUN_STATE
from infra.processes import StartupError, free_port, spawn, stop, stop_all, wait_until
from infra.stack import EmbeddedStack, load_or_create_secret
from infra.supervisor import UP, Child, Supervisor
from tally import topology
from tally.broker_recycle import BrokerRecycler, status_probe
from tally.roots import METRICS_DIR, MULTIPROC_ENV, forget_metrics_of, reset_metrics_dir

log = logging.getLogger(__name__)


def _child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(settings.raw)
    env.update({
        "TALLY_HOME": str(settings.home),
        "TALLY_KAFKA_BOOTSTRAP": ",".join(settings.kafka_bootstrap or ()),
        "TALLY_PG_DSN": settings.pg_dsn or "",
        "TALLY_SECRET": settings.secret or "",
        "TALLY_CLICKHOUSE_DSN": settings.clickhouse_dsn,
        "TALLY_SPOOL_DIR": str(settings.spool_dir),
        "TALLY_COLLECTOR_PORT": str(settings.collector_port),
        "TALLY_API_PORT": str(settings.api_port),
        "TALLY_CLICKHOUSE_HTTP_PORT": str(settings.clickhouse_http_port),
        "TALLY_ANALYST_PORT": str(settings.analyst_port),
        "TALLY_ANALYST_URL": settings.analyst_url,
        # One multiprocess metrics directory for the stack: /metrics sums every process (ADR 21).
        MULTIPROC_ENV: str(settings.home / METRICS_DIR),
    })
    return env


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return bool(resp.status == 200)


class Platform:
    """`tally up`: the embedded stack plus one child process per component, restarted if it dies."""

    COMPONENTS = {name: list(argv) for name, argv in topology.SINGLE.items()}  # one host's processes

    def __init__(self, settings: Settings, *, durable: bool = True, hosts: int = 1) -> None:
        self.base = settings
        self.topology = topology.plan(settings, hosts, port_for=free_port)
        self.retired: list[subprocess.Popen[bytes]] = []  # taken out of supervision while running (control)
        self.stack = EmbeddedStack(settings.home, durable=durable)
        self.supervisor = Supervisor(backoff_s=settings.supervisor_backoff_s, on_change=self._changed)
        self.settings: Settings | None = None
        self.recycler: BrokerRecycler | None = None  # the embedded broker's (ADR 64), once started
        self._stopping = threading.Event()
        # The admin token in $TALLY_HOME/admin-token (0600); True when this start minted it.
        self.admin_token: str | None = None
        self.admin_token_created = False

    @property
    def children(self) -> dict[str, subprocess.Popen[bytes]]:
        """The component processes now running (the embedded servers not included)."""
        return {name: child.proc for name, child in self.supervisor.children.items()
                if name in self.topology.children and child.proc is not None}

    @property
    def collector_url(self) -> str:
        return self.topology.collectors[0].url

    @property
    def collector_urls(self) -> list[str]:
        """Every collector host's URL (one with one host)."""
        return [h.url for h in self.topology.collectors]

    @property
    def api_url(self) -> str:
        return f"http://{self.base.bind_host}:{self.base.api_port}"

    @property
    def clickhouse_http_url(self) -> str:
        return f"http://{self.base.bind_host}:{self.base.clickhouse_http_port}"

    def start(self, timeout: float = 90.0) -> None:
        from oltp.schema import ensure_schema
        from workers.kafka_io import ensure_topic

        os.umask(0o077)  # inherited by every child: spool, chDB data, logs, metrics are 0700/0600 (ADR 34)
        self.stack.start()
        secret = self.base.secret or load_or_create_secret(self.base.home)
        self.settings = self.stack.settings_for(self.base).with_overrides(secret=secret)
        try:
            ensure_topic(self.settings.kafka_bootstrap or (), self.settings.topic, self.settings.partitions)
            ensure_schema(self.settings.pg_dsn or "")
            from tally.cmd_tokens import ensure_admin_token_file

            self.admin_token, self.admin_token_created = ensure_admin_token_file(self.settings.pg_dsn or "",
                                                                                 self.base.home)
            # The servers are up already: register them as they are, to be restarted if they die.
            self.supervisor.add("postgres", self._restart_postgres, self.stack.postgres.log_path,
                                proc=self.stack.postgres.proc)
            self.supervisor.add("broker", self._restart_broker, self.stack.broker.log_path,
                                proc=self.stack.broker.proc)
            reset_metrics_dir(self.base.home / METRICS_DIR)  # no values of an earlier start's processes
            # This process reports its children's state there too (tally_component_up): before core.metrics
            # is imported, which picks the multiprocess storage from the environment.
            os.environ[MULTIPROC_ENV] = str(self.base.home / METRICS_DIR)
            for name in self.topology.children:
                self.supervisor.add(name, functools.partial(self._spawn, name), self._log(name))
            for child in self.supervisor.children.values():
                self._report(child)
            self._write_run_state()
            for name, url in self._ready_urls():
                what = "analyst server" if name == "analyst" else name
                wait_until(functools.partial(_http_ok, url), what=what, timeout=timeout, log_path=self._log(name),
                           proc=self.children[name])
            self.recycler = BrokerRecycler(self.settings.broker_recycle_records, status_probe(self.settings),
                                           retain_bytes=self.settings.spool_retain_bytes)
        except BaseException:
            self.stop()
            raise

    def _ready_urls(self) -> list[tuple[str, str]]:
        """(child, URL answering 200 once it serves), in the order start-up waits for them."""
        assert self.settings is not None
        if self.topology.hosts == 1:
            collectors = [("collector", self.collector_url + "/healthz")]
            apis = [("api", self.api_url + "/healthz")]
        else:
            collectors = [(f"{h.name}-collector", h.url + "/healthz") for h in self.topology.collectors]
            apis = [(f"api-{i}", f"http://{b}/healthz") for i, b in enumerate(self.topology.api_backends, 1)]
            apis.append((topology.FRONT, self.api_url + "/healthz"))
        return [*collectors, *apis, ("clickhouse-http", self.clickhouse_http_url + "/ping"),
                ("analyst", self.settings.analyst_url + "/healthz")]

    def _changed(self, child: Child) -> None:
        """The supervisor saw `child` die or come back: the metric and the run state say so."""
        self._report(child)
        if self.settings is not None:
            self._write_run_state()

    @staticmethod
    def _report(child: Child) -> None:
        from core import metrics

        metrics.set_component_up(child.name, child.state == UP)
        if child.state == UP and child.restarts:
            metrics.count_component_restart(child.name)

    def _write_run_state(self) -> None:
        """Tell admin commands in another terminal (same TALLY_HOME) where the embedded servers are and what
        the supervisor knows of each child (`components`). 0600 in a 0700 directory: it holds the DSN."""
        assert self.settings is not None
        path = self.base.home / RUN_STATE
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        state: dict[str, object] = {"pid": os.getpid(), "pg_dsn": self.settings.pg_dsn,
                 "kafka_bootstrap": ",".join(self.settings.kafka_bootstrap or ()),
                 "collector_url": self.collector_url, "api_url": self.api_url,
                 "clickhouse_http_url": self.clickhouse_http_url,
                 "analyst_url": self.settings.analyst_url, "spool_dir": str(self.settings.spool_dir),
                 "log_dir": str(self.base.log_dir) if self.base.log_dir else None,
                 "pids": {name: child.proc.pid for name, child in self.supervisor.children.items()
                          if child.proc is not None},
                 "components": self.supervisor.describe()}
        if self.topology.hosts > 1:
            state.update(hosts=self.topology.hosts, collector_urls=self.collector_urls,
                         spool_dirs=[str(d) for d in self.topology.spool_dirs()],
                         api_backends=[f"http://{b}" for b in self.topology.api_backends])
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(state))
        tmp.replace(path)

    def _log(self, name: str) -> Path:
        """A child's raw stdout/stderr (tracebacks, granian's own lines): the tail shown when it crashes.
        Its log proper is `<TALLY_LOG_DIR>/<command>.log`, JSON lines it writes and rotates itself."""
        return self.topology.children[name].out

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        assert self.settings is not None
        old = self.supervisor.proc(name)
        if old is not None and old.poll() is not None:  # a restart: drop the dead one's live gauges
            forget_metrics_of(old.pid, self.base.home / METRICS_DIR)
        spec = self.topology.children[name]
        argv = [sys.executable, "-m", *spec.argv]
        out = self._log(name)
        try:  # rotated once per start: it only grows with what bypasses logging
            if out.stat().st_size > self.base.log_max_bytes:
                out.replace(out.with_name(out.name + ".1"))
        except FileNotFoundError:
            pass
        env = {**_child_env(self.settings), **spec.env}
        if self.topology.hosts > 1:  # the topic's partitions as they are now (tally/control.py may raise them)
            env["TALLY_KAFKA_PARTITIONS"] = str(self.settings.partitions)
        return spawn(argv, out, env=env)

    def _restart_postgres(self) -> subprocess.Popen[bytes]:
        """Same data directory, same port: the children's TALLY_PG_DSN stays valid."""
        pg = self.stack.postgres
        try:
            pg.start()
        except BaseException:
            stop(pg.proc, timeout=10)
            pg.proc = None
            raise
        assert pg.proc is not None
        return pg.proc

    def _restart_broker(self) -> subprocess.Popen[bytes]:
        """Same port; memory storage, so the topic is created again at once, with the configured partitions,
        before a client's metadata request can auto-create it with the broker's default."""
        from workers.kafka_io import ensure_topic

        assert self.settings is not None
        broker = self.stack.broker
        try:
            broker.start()
            ensure_topic(self.settings.kafka_bootstrap or (), self.settings.topic, self.settings.partitions)
        except BaseException as exc:
            stop(broker.proc, timeout=10)
            broker.proc = None
            if isinstance(exc, Exception) and not isinstance(exc, StartupError):
                raise StartupError(f"broker restarted but the topic could not be created: {exc}") from exc
            raise
        assert broker.proc is not None
        return broker.proc

    def supervise(self, stop_event: threading.Event) -> None:
        """Restart any child that dies, the broker and PostgreSQL included, until `stop_event` is set (and only
        then: a crash-looping child is restarted with backoff and reported down, never a reason to stop).

        Runs on the main thread (children die with the thread that forked them, PR_SET_PDEATHSIG).
        """
        from tally.control import apply_requests

        while not stop_event.wait(0.25):
            self.supervisor.check()
            self._recycle_broker_if_due()
            if self.topology.hosts > 1:
                apply_requests(self)

    def _recycle_broker_if_due(self) -> None:
        """Restart the embedded broker when its check said so (tally/broker_recycle.py), on this thread."""
        if self.recycler is None or self._stopping.is_set():
            return
        broker = self.supervisor.proc("broker")
        self.recycler.maybe_check(broker.pid if broker is not None else None)
        due = self.recycler.take_due()
        if due is not None:
            self.supervisor.recycle("broker", due[1], pid=due[0])

    def stop(self) -> None:
        """Stop in pipeline order (topology.STOP_ROLES): what was accepted is spooled, shipped and consumed
        before the (memory-only) embedded broker goes away; workers may spend up to 20 s draining."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        children = self.children
        for roles in topology.STOP_ROLES:
            group = [proc for name, proc in children.items() if self.topology.children[name].role in roles]
            stop_all(group + (self.retired if "rollup-worker" in roles else []), timeout=40)
        self.stack.stop()
        (self.base.home / RUN_STATE).unlink(missing_ok=True)
