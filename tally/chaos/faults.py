"""What is done to the platform: kill -9 of one process, an outage, a pause then a whole-stack kill (ADR 24).

Each fault fills in its `FaultRecord` (what was killed, when, how long it was held down, how long until
its replacement ran) and raises on a target that is missing or not restarted in time. Outages kill the
process while `tally up` itself is stopped (SIGSTOP), so its supervisor restarts it only after SIGCONT.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random
from typing import Protocol

from tally.chaos.stack import ChaosError, ChaosStack, children_of, signal_pid


class ChaosRun(Protocol):
    """What a fault needs from the run (tally.chaos.run.ChaosRun provides it)."""

    stack: ChaosStack
    rng: Random
    outage_s: float
    pause_s: float
    restart_timeout_s: float

    def sleep(self, seconds: float) -> None:
        """Sleep; raise ChaosError if `tally up` exited by itself meanwhile."""


@dataclass
class FaultRecord:
    """One fault as it happened: `at_s` from the start of the load, `held_s` how long the process was kept
    down or paused, `restart_s` from the kill until its replacement ran (None: not restarted),
    `next_ack_s` from the kill until the load's next 202."""

    name: str
    target: str = ""
    at_s: float = 0.0
    held_s: float = 0.0
    restart_s: float | None = None
    next_ack_s: float | None = None
    acked_before: int = 0
    error: str | None = None
    note: str = ""  # what else the fault measured (multi-host faults, ADR 59)
    killed_at: float | None = field(default=None, repr=False)  # monotonic time of the kill


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    run: Callable[[ChaosRun, FaultRecord], None]


def _wait(what: str, probe: Callable[[], object], timeout_s: float) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise ChaosError(f"{what}: not within {timeout_s:.0f}s")


def _kill_child(name: str) -> Callable[[ChaosRun, FaultRecord], None]:
    def run(chaos: ChaosRun, rec: FaultRecord) -> None:
        stack = chaos.stack
        old = stack.pids()[name]
        rec.target = f"{name} pid {old}"
        t0 = rec.killed_at = time.monotonic()
        signal_pid(old, signal.SIGKILL)
        _wait(f"{name} restarted", lambda: stack.pids().get(name) not in (None, old), chaos.restart_timeout_s)
        rec.restart_s = time.monotonic() - t0
    return run


def _kill_collector_worker(chaos: ChaosRun, rec: FaultRecord) -> None:
    stack = chaos.stack
    master = stack.pids()["collector"]
    workers = children_of(master)
    if not workers:
        raise ChaosError("the collector master has no worker processes")
    victim = chaos.rng.choice(sorted(workers))
    rec.target = f"collector worker pid {victim} (of {len(workers)})"
    t0 = rec.killed_at = time.monotonic()
    signal_pid(victim, signal.SIGKILL)

    def respawned() -> bool:
        now = children_of(stack.pids()["collector"])
        return victim not in now and len(now) >= len(workers)
    _wait("a collector worker respawned", respawned, chaos.restart_timeout_s)
    rec.restart_s = time.monotonic() - t0


def _kill_and_hold(name: str) -> Callable[[ChaosRun, FaultRecord], None]:
    """kill -9 with `tally up` itself stopped (SIGSTOP) for the outage, so nobody restarts it before."""
    def run(chaos: ChaosRun, rec: FaultRecord) -> None:
        stack = chaos.stack
        assert stack.proc is not None
        old = stack.pids()[name]
        rec.target = f"{name} pid {old}, down {chaos.outage_s:.0f}s"
        signal_pid(stack.proc.pid, signal.SIGSTOP)
        try:
            t0 = rec.killed_at = time.monotonic()
            signal_pid(old, signal.SIGKILL)
            chaos.sleep(chaos.outage_s)
        finally:
            signal_pid(stack.proc.pid, signal.SIGCONT)
        rec.held_s = time.monotonic() - t0
        t1 = time.monotonic()
        _wait(f"{name} restarted", lambda: stack.pids().get(name) not in (None, old), chaos.restart_timeout_s)
        rec.restart_s = time.monotonic() - t1
    return run


def _pause_then_kill_all(chaos: ChaosRun, rec: FaultRecord) -> None:
    """SIGSTOP one worker (seeded choice: the rollup worker, or the analyst server that runs the loader) for
    `pause_s` while the load goes on, then kill -9 the whole process tree (the paused worker included) and
    start `tally up` again on the same TALLY_HOME and ports."""
    stack = chaos.stack
    name = chaos.rng.choice(("rollup-worker", "analyst"))
    worker = stack.pids()[name]
    signal_pid(worker, signal.SIGSTOP)
    t0 = time.monotonic()
    chaos.sleep(chaos.pause_s)
    rec.held_s = time.monotonic() - t0
    killed = stack.kill_all()
    rec.killed_at = time.monotonic()  # every process is gone: the next 202 comes from the new stack
    rec.target = f"{name} pid {worker} paused {rec.held_s:.0f}s, then {killed} processes"
    t1 = time.monotonic()
    stack.output.clear()
    stack.up(timeout_s=chaos.restart_timeout_s + 120)
    rec.restart_s = time.monotonic() - t1


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("collector-master", "kill -9 the collector's master (its granian workers die with it)",
          _kill_child("collector")),
    Fault("collector-worker", "kill -9 one granian worker of the collector (the master respawns it)",
          _kill_collector_worker),
    Fault("shipper", "kill -9 the shipper", _kill_child("shipper")),
    Fault("broker", "kill -9 the broker (memory storage: its topic is gone)", _kill_child("broker")),
    Fault("rollup-worker", "kill -9 the rollup worker (Kafka -> PostgreSQL)", _kill_child("rollup-worker")),
    Fault("loader", "kill -9 the analyst server, which runs the loader (Kafka -> ClickHouse)",
          _kill_child("analyst")),
    Fault("api", "kill -9 the API", _kill_child("api")),
    Fault("postgres", "kill -9 PostgreSQL's postmaster", _kill_child("postgres")),
    Fault("broker-down", "kill -9 the broker and keep it down (the outage; 60 s in the long form)",
          _kill_and_hold("broker")),
    Fault("postgres-down", "kill -9 PostgreSQL and keep it down (the outage; 60 s in the long form)",
          _kill_and_hold("postgres")),
    Fault("pause-then-kill-all", "pause the rollup worker or the loader (minutes in the long form), then kill -9 "
          "the whole stack and start it again", _pause_then_kill_all),
)}


def parse_faults(text: str, known: dict[str, Fault] | None = None) -> list[str]:
    """A comma-separated list of fault names (`known`, by default FAULTS). Raises ValueError naming the unknown
    ones."""
    known = FAULTS if known is None else known
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no fault named")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names
