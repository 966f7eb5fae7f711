"""Requests to a running `tally up --hosts N`: add a rollup worker, take processes out of supervision (ADR 59).

A request is a JSON file dropped in `$TALLY_HOME/run/control/` (the run directory is the user's only, 0700);
the supervision loop applies it within a quarter of a second and answers in `<same name>.done`:
`{"ok": true, "name": ...}` or `{"ok": false, "error": "..."}`. Operations (an allowlist; anything else is
refused, naming the problem):

- `{"op": "add", "role": "rollup-worker"}`: start one more rollup worker (`rollup-worker-3`, ...), supervised
  like the others (a third consumer-group member: the group's partitions are shared again);
- `{"op": "hold", "names": [...]}` / `{"op": "release", "names": [...]}`: leave processes alone while they are
  taken down on purpose (a whole collector host), then supervise them again (dead ones are restarted);
- `{"op": "retire", "name": "rollup-worker-1"}`: stop supervising one process for good (it is not signalled:
  the caller kills or stops it; `tally up` still stops it at the end if it runs);
- `{"op": "partitions", "count": N}`: the partition count the topic is created with from now on (more than
  before): when the embedded broker (memory storage) is restarted, the topic comes back with N partitions.
  That is how a topic grows on tansu 0.6.0, which has no CreatePartitions (`tally topic grow` says so):
  recreated, with the shipper shipping its retained segments to the new incarnation (ADR 16).

`tally chaos --hosts N` uses them; an operator may too (`request(home, {...})`).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

from core.config import Settings
from infra.supervisor import Supervisor
from tally import topology


class Platform(Protocol):
    """What a control request needs of the running `tally up` (tally/platform.py's Platform; a protocol, so
    this module does not import the platform that calls it)."""

    base: Settings
    settings: Settings | None
    topology: topology.Topology
    supervisor: Supervisor
    retired: list[subprocess.Popen[bytes]]

    def _log(self, name: str) -> Path: ...

    def _spawn(self, name: str) -> subprocess.Popen[bytes]: ...

    def _write_run_state(self) -> None: ...

CONTROL_DIR = "run/control"  # under TALLY_HOME
OPS = ("add", "hold", "release", "retire", "partitions")
MAX_PARTITIONS = 1024  # as TALLY_KAFKA_PARTITIONS allows


class ControlError(ValueError):
    """A request that cannot be applied; the message names the problem."""


def _names(req: dict[str, Any], platform: Platform) -> list[str]:
    names = req.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ControlError("`names` must be a non-empty list of process names")
    unknown = [n for n in names if n not in platform.supervisor.children or n not in platform.topology.children]
    if unknown:
        raise ControlError(f"unknown process(es) {', '.join(unknown)[:200]}")
    return list(names)


def _add(req: dict[str, Any], platform: Platform) -> str:
    if req.get("role") != "rollup-worker":
        raise ControlError("`role` must be rollup-worker (the only role that can be added)")
    assert platform.settings is not None
    name, i = next((f"rollup-worker-{i}", i) for i in itertools.count(1)
                   if f"rollup-worker-{i}" not in platform.topology.children)
    platform.topology.children[name] = topology.rollup_worker(platform.base, i)
    platform.supervisor.add(name, functools.partial(platform._spawn, name), platform._log(name))
    return name


def _retire(req: dict[str, Any], platform: Platform) -> str:
    name = req.get("name")
    if not isinstance(name, str) or name not in platform.supervisor.children or name not in platform.topology.children:
        raise ControlError(f"unknown process {str(name)[:100]!r}")
    child = platform.supervisor.remove(name)
    if child.proc is not None:
        platform.retired.append(child.proc)
    return name


def _partitions(req: dict[str, Any], platform: Platform) -> str:
    assert platform.settings is not None
    count, now = req.get("count"), platform.settings.partitions
    if not isinstance(count, int) or isinstance(count, bool) or not now < count <= MAX_PARTITIONS:
        raise ControlError(f"`count` must be a number of partitions above {now} and at most {MAX_PARTITIONS}")
    platform.settings = platform.settings.with_overrides(partitions=count)
    return str(count)


def apply(req: object, platform: Platform) -> str:
    """Apply one request; returns what it names. Raises ControlError."""
    if not isinstance(req, dict) or req.get("op") not in OPS:
        raise ControlError(f"`op` must be one of {', '.join(OPS)}")
    if req["op"] == "add":
        return _add(req, platform)
    if req["op"] == "retire":
        return _retire(req, platform)
    if req["op"] == "partitions":
        return _partitions(req, platform)
    names = _names(req, platform)
    for name in names:
        (platform.supervisor.hold if req["op"] == "hold" else platform.supervisor.release)(name)
    return ",".join(names)


def apply_requests(platform: Platform) -> int:
    """Apply every waiting request in name order, answering each; returns how many."""
    directory = platform.base.home / CONTROL_DIR
    try:
        waiting = sorted(p for p in directory.iterdir() if p.suffix == ".json")
    except FileNotFoundError:
        return 0
    for path in waiting:
        try:
            answer: dict[str, Any] = {"ok": True, "name": apply(json.loads(path.read_bytes()), platform)}
        except Exception as exc:  # a bad request or a failed start: answered, never the end of supervision
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        _write(path.with_suffix(".done"), answer)
        path.unlink(missing_ok=True)
    if waiting:
        platform._write_run_state()
    return len(waiting)


def _write(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(value, fh)
    tmp.replace(path)


def request(home: Path, req: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
    """Drop a request for the `tally up` running on `home` and wait for its answer (TimeoutError if none)."""
    directory = home / CONTROL_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stem = f"{time.time_ns()}-{os.getpid()}"
    _write(directory / f"{stem}.part", req)
    (directory / f"{stem}.part").replace(directory / f"{stem}.json")
    done = directory / f"{stem}.done"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer: dict[str, Any] = json.loads(done.read_bytes())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
            continue
        done.unlink(missing_ok=True)
        return answer
    raise TimeoutError(f"no answer to {req} from the tally up on {home} within {timeout_s:.0f}s")
