"""Faults of a multi-host chaos run (`tally chaos --hosts N`, ADR 59), against `tally up --hosts N`.

- `collector-host`: a whole collector host (its collector, the collector's workers and its shipper) killed
  with -9 at once and kept down `host_down_s` (`tally up` is asked to leave them alone meanwhile), then
  brought back; its spool ships what it had acknowledged when it returns.
- `rollup-worker-for-good`: one rollup worker taken out of supervision and killed with -9, never restarted;
  the others take over its partitions (the note says how long until PostgreSQL held every event acknowledged
  before the kill).
- `rollup-worker-added`: one more rollup worker started while the load runs (the group shares again).
- `topic-grow`: the topic's partition count raised by `grow_by` with `tally topic grow N`, or, where the broker
  cannot (tansu 0.6.0), by recreating the topic with the new count (`_recreate`).
- `api-process`: one API process killed with -9 (restarted by `tally up`); the API probe's clients retry on
  the other one through the front (the note counts their requests meanwhile).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from random import Random
from typing import Protocol, cast

from tally.chaos.api_probe import ApiStats
from tally.chaos.faults import ChaosRun, Fault, FaultRecord, _wait
from tally.chaos.stack import DOMAIN, ChaosError, ChaosStack, process_tree, signal_pid
from tally.control import request


class HostsRun(Protocol):
    """What these faults need from the run (tally.chaos.run.ChaosRun provides it)."""

    stack: ChaosStack
    rng: Random
    restart_timeout_s: float
    host_down_s: float
    grow_by: int
    partitions: int
    api_stats: ApiStats | None

    def sleep(self, seconds: float) -> None:
        """Sleep; raise ChaosError if `tally up` exited by itself meanwhile."""

    def acked_count(self) -> int:
        """Events acknowledged so far."""


def _control(stack: ChaosStack, req: dict[str, object]) -> str:
    answer = request(stack.home, req)
    if not answer.get("ok"):
        raise ChaosError(f"tally up refused {req}: {answer.get('error')}")
    return str(answer["name"])


def _restarted(stack: ChaosStack, names: dict[str, int]) -> Callable[[], bool]:
    return lambda: all(stack.pids().get(n) not in (None, old) for n, old in names.items())


def _collector_host(chaos: HostsRun, rec: FaultRecord) -> None:
    stack = chaos.stack
    host = chaos.rng.randint(1, stack.hosts)
    names = {f"c{host}-collector": 0, f"c{host}-shipper": 0}
    pids = stack.pids()
    names = {n: pids[n] for n in names}
    _control(stack, {"op": "hold", "names": list(names)})
    victims = [p for pid in names.values() for p in process_tree(pid)]
    t0 = rec.killed_at = time.monotonic()
    for pid in victims:
        signal_pid(pid, signal.SIGKILL)
    rec.target = (f"host c{host}: {len(victims)} processes (collector, its workers, shipper), "
                  f"down {chaos.host_down_s:.0f}s")
    try:
        chaos.sleep(chaos.host_down_s)
    finally:
        _control(stack, {"op": "release", "names": list(names)})
    rec.held_s = time.monotonic() - t0
    t1 = time.monotonic()
    _wait(f"host c{host} back", _restarted(stack, names), chaos.restart_timeout_s)
    rec.restart_s = time.monotonic() - t1


def _rollup_workers(stack: ChaosStack) -> dict[str, int]:
    return {n: p for n, p in stack.pids().items() if n.startswith("rollup-worker-")}


def _pg_events(stack: ChaosStack) -> int:
    rows = stack.pg_query("SELECT coalesce(sum(events), 0) FROM rollup_15m WHERE domain = %s", (DOMAIN,))
    return int(rows[0][0])


def _rollup_worker_for_good(chaos: HostsRun, rec: FaultRecord) -> None:
    stack = chaos.stack
    workers = _rollup_workers(stack)
    if len(workers) < 2:
        raise ChaosError(f"only {len(workers)} rollup worker(s) left: none can be killed for good")
    name = chaos.rng.choice(sorted(workers))
    _control(stack, {"op": "retire", "name": name})
    before = chaos.acked_count()
    t0 = rec.killed_at = time.monotonic()
    signal_pid(workers[name], signal.SIGKILL)
    rec.target = f"{name} pid {workers[name]}, for good ({len(workers) - 1} left)"
    _wait("PostgreSQL holding what was acknowledged before the kill", lambda: _pg_events(stack) >= before,
          chaos.restart_timeout_s)
    rec.note = f"its partitions moved: PostgreSQL held all {before} earlier events " \
               f"{time.monotonic() - t0:.1f}s after the kill"


def _rollup_worker_added(chaos: HostsRun, rec: FaultRecord) -> None:
    stack = chaos.stack
    t0 = time.monotonic()
    name = _control(stack, {"op": "add", "role": "rollup-worker"})
    _wait(f"{name} running", lambda: name in stack.pids(), chaos.restart_timeout_s)
    rec.restart_s = time.monotonic() - t0
    rec.target = f"{name} pid {stack.pids()[name]} ({len(_rollup_workers(stack))} rollup workers now)"


def _topic(stack: ChaosStack, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tally.cli", "topic", *args], env=stack.env, capture_output=True,
                          text=True, timeout=timeout_s)


def _partitions(stack: ChaosStack) -> int:
    shown = _topic(stack, "show", "--json", timeout_s=60)
    return int(json.loads(shown.stdout)["partitions"]) if shown.returncode == 0 else -1


def _recreate(chaos: HostsRun, partitions: int) -> None:
    """The embedded broker's procedure (memory storage) with the workers left running: the shippers and the
    consumers (rollup workers, the analyst server with the loader) paused (SIGSTOP), so none of them asks the
    broker for the topic (and auto-creates it with another count) before `tally up` has made it; `tally up` told
    the new count; the broker killed -9 and restarted, creating the topic with `partitions`; then every paused
    process resumes. The consumers live through it: their members are gone with the broker's memory, so they
    rejoin, and the new partitions regroup them (workers/regroup.py, ADR 60); a member that never finds
    its coordinator again gets a new consumer (workers/coordinator_stall.py). The shippers ship their retained
    segments to the new incarnation (ADR 16)."""
    stack = chaos.stack
    pids = stack.pids()
    paused = [p for n, p in pids.items() if n.endswith("-shipper") or n.startswith("rollup-worker-")
              or n == "analyst"]
    try:
        for pid in paused:  # inside: an interrupt mid-way still resumes them (SIGCONT to a running one is harmless)
            signal_pid(pid, signal.SIGSTOP)
        _control(stack, {"op": "partitions", "count": partitions})
        old = pids["broker"]
        signal_pid(old, signal.SIGKILL)
        _wait("broker restarted", _restarted(stack, {"broker": old}), chaos.restart_timeout_s)
        _wait(f"the topic made with {partitions} partitions", lambda: _partitions(stack) == partitions,
              chaos.restart_timeout_s)
    finally:
        for pid in paused:
            signal_pid(pid, signal.SIGCONT)


def _topic_grow(chaos: HostsRun, rec: FaultRecord) -> None:
    """`tally topic grow N`; where the broker cannot (tansu 0.6.0: no CreatePartitions), the documented
    procedure for the embedded broker: the topic is recreated with N partitions (`tally up` told the new count,
    the broker restarted; the shippers ship their retained segments again, ADR 16)."""
    stack = chaos.stack
    want = chaos.partitions + chaos.grow_by
    t0 = rec.killed_at = time.monotonic()
    done = _topic(stack, "grow", str(want), timeout_s=chaos.restart_timeout_s)
    how = f"tally topic grow {want}"
    if done.returncode != 0 and "CreatePartitions" in done.stderr:
        _recreate(chaos, want)
        how = "recreated (tansu 0.6.0: no CreatePartitions); shippers and consumers paused, not restarted"
    elif done.returncode != 0:
        raise ChaosError(f"tally topic grow {want} exited {done.returncode}: "
                         f"{(done.stderr or done.stdout).strip()[-300:]}")
    _wait(f"the topic showing {want} partitions", lambda: _partitions(stack) == want, chaos.restart_timeout_s)
    rec.restart_s = time.monotonic() - t0
    rec.target = f"topic {chaos.partitions} -> {want} partitions"
    rec.note = how
    chaos.partitions = want


def _api_process(chaos: HostsRun, rec: FaultRecord) -> None:
    stack = chaos.stack
    apis = {n: p for n, p in stack.pids().items() if n.startswith("api-") and n[4:].isdigit()}
    if not apis:
        raise ChaosError("no API process behind the front")
    name = chaos.rng.choice(sorted(apis))
    before = chaos.api_stats.snapshot() if chaos.api_stats else (0, 0, 0)
    t0 = rec.killed_at = time.monotonic()
    signal_pid(apis[name], signal.SIGKILL)
    rec.target = f"{name} pid {apis[name]} (of {len(apis)})"
    _wait(f"{name} restarted", _restarted(stack, {name: apis[name]}), chaos.restart_timeout_s)
    rec.restart_s = time.monotonic() - t0
    chaos.sleep(1.0)
    if chaos.api_stats is not None:
        after = chaos.api_stats.snapshot()
        n, retried, failed = (a - b for a, b in zip(after, before, strict=True))
        rec.note = f"API clients meanwhile: {n} requests, {retried} answered after a retry, {failed} failed"
        if failed:
            raise ChaosError(f"{failed} API requests failed every attempt while {name} was down")


def _hosts(fault: Callable[[HostsRun, FaultRecord], None]) -> Callable[[ChaosRun, FaultRecord], None]:
    """A multi-host fault as a Fault's `run` (the run that calls it is a multi-host ChaosRun)."""
    return lambda chaos, rec: fault(cast(HostsRun, chaos), rec)


TOPOLOGY_FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("collector-host", "kill -9 a whole collector host (collector, its workers, shipper), keep it down, "
          "bring it back", _hosts(_collector_host)),
    Fault("rollup-worker-for-good", "kill -9 one rollup worker and never restart it (its partitions move)",
          _hosts(_rollup_worker_for_good)),
    Fault("rollup-worker-added", "start one more rollup worker while the load runs", _hosts(_rollup_worker_added)),
    Fault("topic-grow", "raise the topic's partition count (tally topic grow N)", _hosts(_topic_grow)),
    Fault("api-process", "kill -9 one API process behind the front (clients retry on the other)",
          _hosts(_api_process)),
)}
ONCE = ("rollup-worker-for-good", "rollup-worker-added")  # the first round only; the others repeat
