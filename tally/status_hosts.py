"""`tally status` next to `tally up --hosts N` (N > 1, ADR 59): which processes, URLs and spools to report.

Pure functions over what a live `run/stack.json` says (no probes here; tally/cmd_status.py runs them):
`read` finds the collector hosts (`collector_urls`, `spool_dirs`, in host order c1..cN) and the API
processes behind the front (`api_backends`); `process_names` lists every supervised process under the
names tally/topology.py gives them (`c1-collector`, `c1-shipper`, `rollup-worker-2`, `api-1`, `api-front`, ...)
in pipeline order; `total_spool` and `host_rows` assemble the report's `spool` (every host's backlog summed)
and `hosts` (one entry per collector host) sections.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tally.topology import FRONT

# The states a process or server is reported in (tally/cmd_status.py reads them from here: it imports this module).
UP, DOWN, UNREADY, UNKNOWN = "up", "down", "unready", "unknown"
# Pipeline order of the report's rows; a collector host's two processes sit together, host by host.
_RANK = {"up": 0, "postgres": 1, "broker": 2, "collector": 3, "shipper": 3, "rollup-worker": 4, "analyst": 5,
         "api": 6, FRONT: 7, "clickhouse-http": 8}
_HOST_PROCESS = re.compile(r"c(\d+)-(collector|shipper)")
_NUMBERED = re.compile(r"(.+)-(\d+)")
_SUMMED = ("segments", "bytes", "open_segments", "open_bytes", "retained_segments", "retained_bytes",
           "quarantined_bytes")


@dataclass(frozen=True)
class Host:
    """One simulated collector host: `c1`, its collector's base URL, its own spool directory."""

    name: str
    url: str
    spool_dir: Path

    @property
    def processes(self) -> tuple[str, str]:
        return f"{self.name}-collector", f"{self.name}-shipper"


@dataclass(frozen=True)
class Hosts:
    collectors: tuple[Host, ...]
    api_backends: tuple[str, ...]  # base URLs of api-1, api-2, ... (behind the front)


def read(state: Mapping[str, object]) -> Hosts | None:
    """The multi-host part of a live stack.json; None when it describes one host (the report of old)."""
    hosts, urls, dirs = state.get("hosts"), state.get("collector_urls"), state.get("spool_dirs")
    if not (isinstance(hosts, int) and hosts > 1 and isinstance(urls, list) and isinstance(dirs, list)
            and len(urls) == len(dirs) > 1):
        return None
    backends = state.get("api_backends")
    collectors = (Host(f"c{i}", str(url), Path(str(d))) for i, (url, d) in enumerate(zip(urls, dirs, strict=True), 1))
    return Hosts(tuple(collectors), tuple(str(b) for b in backends) if isinstance(backends, list) else ())


def process_urls(hosts: Hosts, api_url: str) -> dict[str, str]:
    """The processes that answer /healthz and /readyz besides the analyst server: each collector, each API
    process, and the front (its /healthz is an API process's, relayed)."""
    urls = {f"{h.name}-collector": h.url for h in hosts.collectors}
    urls.update({f"api-{i}": b for i, b in enumerate(hosts.api_backends, 1)})
    urls[FRONT] = api_url
    return urls


def _order(name: str) -> tuple[int, int, int]:
    if m := _HOST_PROCESS.fullmatch(name):
        return _RANK["collector"], int(m[1]), 0 if m[2] == "collector" else 1
    if (m := _NUMBERED.fullmatch(name)) and m[1] in _RANK:
        return _RANK[m[1]], int(m[2]), 0
    return _RANK.get(name, len(_RANK)), 0, 0


def process_names(hosts: Hosts, supervised: Iterable[str]) -> list[str]:
    """`up`, then every process the supervisor names (stack.json `pids`, `components`: added rollup workers
    too, retired ones no longer) and every one the topology must run, in pipeline order."""
    expected = ["postgres", "broker", *(p for h in hosts.collectors for p in h.processes),
                *(f"api-{i}" for i in range(1, len(hosts.api_backends) + 1)), FRONT, "analyst", "clickhouse-http"]
    return ["up", *sorted(set(expected) | set(supervised) - {"up"}, key=_order)]


def total_spool(spools: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Every host's backlog summed (the oldest sealed segment is the oldest of all); down when a host's is."""
    out: dict[str, Any] = {key: sum(int(s.get(key) or 0) for s in spools.values()) for key in _SUMMED}
    ages = [s["oldest_age_s"] for s in spools.values() if s.get("oldest_age_s") is not None]
    states = {name: s.get("state") for name, s in spools.items()}
    state = (DOWN if DOWN in states.values() else "missing" if set(states.values()) == {"missing"} else "ok")
    bad = [f"{name}: {spools[name].get('detail') or s}" for name, s in states.items() if s != "ok"]
    return {"state": state, "dir": None, **out, "oldest_age_s": max(ages, default=None),
            "detail": "; ".join(bad) or None}


def host_rows(hosts: Hosts, processes: Mapping[str, dict[str, Any]],
              spools: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per collector host: its state (down when its collector, its shipper or its spool is),
    its collector's URL, its two processes' states (their rows are in `processes`) and its spool."""
    rows = {}
    for host in hosts.collectors:
        states = [processes.get(p, {}).get("state") for p in host.processes]
        spool = spools[host.name]
        state = (DOWN if DOWN in states or spool.get("state") == DOWN else UNREADY if UNREADY in states else UP)
        rows[host.name] = {"state": state, "collector_url": host.url, "collector": states[0], "shipper": states[1],
                           "spool": spool}
    return rows
