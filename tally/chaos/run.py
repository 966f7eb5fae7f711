"""A chaos run: plan, schedule, faults under load, settle, compare, report (ADR 24).

`ChaosRun(plan, home).run()` starts the stack, starts the load, runs the faults at seeded random points
until the plan's load time is over, stops the load (letting the batch in flight get its 202), waits for
both stores to settle and compares them with the ledger. It returns a `ChaosReport`; a fault that went
wrong or a platform that died is in the report, never an exception.
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tally.chaos.api_probe import ApiProbe, ApiStats
from tally.chaos.churn import ChurnStats, CollectorChurn, CpuBurners
from tally.chaos.faults import FAULTS, Fault, FaultRecord
from tally.chaos.hosts import ONCE, TOPOLOGY_FAULTS
from tally.chaos.load import Ledger, LoadGenerator
from tally.chaos.spool_tap import SpoolTap
from tally.chaos.stack import DOMAIN, ChaosError, ChaosStack, process_tree
from tally.chaos.verdict import StoreCheck, check_spool, compare, settle


@dataclass(frozen=True)
class ChaosPlan:
    """What to run. `faults` are cycled through in a seeded order (each round shuffled) until the load has
    run `load_s` (or `fault_count` faults ran); the gap before each fault is uniform in `gap_s`."""

    seed: int
    load_s: float
    faults: tuple[str, ...] = tuple(FAULTS)
    gap_s: tuple[float, float] = (5.0, 25.0)
    outage_s: float = 60.0
    pause_s: float = 120.0
    rate: float = 8.0
    settle_timeout_s: float = 600.0
    restart_timeout_s: float = 120.0
    fault_count: int | None = None  # set: exactly this many faults (the load still runs at least load_s)
    # Under every fault, all run long (issue 15 §2): a collector worker kill -9'd every `churn_gap_s` (None: no
    # churn) and paused for 20 ms `pauses_per_s` times a second; single-event requests at `single_rate` per
    # second, with segments sealed every `segment_age_s`, so new segments open all the time; `burners`
    # busy-loop processes taking CPU away.
    churn_gap_s: tuple[float, float] | None = (3.0, 6.0)
    pauses_per_s: float = 20.0
    single_rate: float = 20.0
    segment_age_s: float = 0.05
    burners: int = 1
    # `tally chaos --hosts N` (ADR 59): `tally up --hosts N`, the faults of tally/chaos/hosts.py, a collector host
    # kept down `host_down_s`, the topic grown by `grow_by` partitions from `partitions`.
    hosts: int = 1
    host_down_s: float = 20.0
    grow_by: int = 2
    partitions: int = 4

    @classmethod
    def long_form(cls, minutes: float, seed: int, faults: Iterable[str] | None = None, hosts: int = 1) -> ChaosPlan:
        """`tally chaos --minutes N`: 60 s outages, the worker paused for a fifth of the run (1-3 minutes). With
        `hosts` > 1 the multi-host faults, no collector-worker churn and no busy loop (the topology's own
        processes already fill the two cores)."""
        if minutes <= 0:
            raise ValueError("--minutes must be more than 0")
        if hosts == 1:
            return cls(seed=seed, load_s=minutes * 60, faults=tuple(faults or FAULTS),
                       pause_s=min(180.0, max(60.0, minutes * 60 / 5)))
        from tally.topology import MAX_HOSTS

        if not 2 <= hosts <= MAX_HOSTS:
            raise ValueError(f"--hosts must be between 1 and {MAX_HOSTS}")
        return cls(seed=seed, load_s=minutes * 60, faults=tuple(faults or TOPOLOGY_FAULTS), hosts=hosts,
                   churn_gap_s=None, burners=0)

    @property
    def known(self) -> dict[str, Fault]:
        """The faults this plan's platform has: one host's, or the multi-host ones."""
        return FAULTS if self.hosts == 1 else TOPOLOGY_FAULTS

    def order(self) -> list[str]:
        """The first rounds of fault names in the order they will run (the schedule without times). With
        several hosts, the faults that change the number of rollup workers run in the first round only."""
        rng = random.Random(self.seed)
        out: list[str] = []
        while len(out) < 200:
            names = [n for n in self.faults if not (out and self.hosts > 1 and n in ONCE)]
            if not names:
                break
            rng.shuffle(names)
            out.extend(names)
        return out


@dataclass
class ChaosReport:
    """What a run did and found; `passed` only if both stores lost nothing and counted nothing twice, every
    fault ran and the load saw no answer it did not expect."""

    plan: ChaosPlan
    faults: list[FaultRecord]
    ledger: Ledger
    pg: StoreCheck | None = None
    ch: StoreCheck | None = None
    settle_s: float | None = None
    startup_s: float = 0.0
    error: str | None = None
    spool: StoreCheck | None = None  # the acknowledged events against what went through the spool
    churn: ChurnStats | None = None
    tap_max_gap_s: float | None = None
    api: ApiStats | None = None  # the API clients' requests (multi-host runs)
    collector_urls: list[str] = field(default_factory=list)  # what `tally up` printed (`http://.../collect`)
    rollup_workers: int = 0  # rollup-worker processes under `tally up` once it was up

    @property
    def passed(self) -> bool:
        return (self.error is None and self.pg is not None and self.ch is not None and self.pg.ok and self.ch.ok
                and (self.spool is None or self.spool.ok) and not self.ledger.errors
                and all(f.error is None for f in self.faults) and not (self.churn and self.churn.errors)
                and not (self.api and (self.api.failed or self.api.errors)))


class ChaosRun:
    """Runs a plan against a fresh stack under `home`; `run()` returns the report (it never raises for a
    fault that went wrong: that is in the report)."""

    def __init__(self, plan: ChaosPlan, home: Path, *, progress: Callable[[str], None] | None = None) -> None:
        self.plan = plan
        settings = {"TALLY_SPOOL_SEGMENT_AGE_S": f"{plan.segment_age_s:g}"}
        if plan.hosts > 1:
            settings["TALLY_KAFKA_PARTITIONS"] = str(plan.partitions)
        self.stack = ChaosStack(home, settings=settings, hosts=plan.hosts)
        self.host_down_s, self.grow_by, self.partitions = plan.host_down_s, plan.grow_by, plan.partitions
        self.api_stats: ApiStats | None = None
        self.rng = random.Random(plan.seed + 1)
        self.ledger = Ledger()
        self.progress = progress or (lambda line: None)
        self.outage_s = plan.outage_s
        self.pause_s = plan.pause_s
        self.restart_timeout_s = plan.restart_timeout_s
        self.t0 = 0.0

    def sleep(self, seconds: float) -> None:
        """Sleep, but fail early if `tally up` exited by itself (a crash loop)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.stack.proc is not None and self.stack.proc.poll() is not None:
                raise ChaosError(f"tally up exited with {self.stack.proc.returncode}:\n"
                                 + "".join(self.stack.output[-30:]))
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def acked_count(self) -> int:
        return self.ledger.acked_count()

    def _observe_topology(self, report: ChaosReport) -> None:
        """What `tally up` printed and runs, as a user would see it: its collector URLs, its rollup workers."""
        assert self.stack.proc is not None
        urls = re.findall(r"http://[^ ]+/collect", "".join(self.stack.output))
        report.collector_urls = sorted(set(urls))
        report.rollup_workers = sum("rollup-worker" in _cmdline(p) for p in process_tree(self.stack.proc.pid))

    def run(self) -> ChaosReport:
        report = ChaosReport(self.plan, [], self.ledger)
        loads: list[LoadGenerator] = []
        churn: CollectorChurn | None = None
        taps: list[SpoolTap] = []
        probe: ApiProbe | None = None
        burners = CpuBurners(self.plan.burners)
        try:
            report.startup_s = self.stack.up()
            self._observe_topology(report)
            self.stack.add_site(DOMAIN)
            dirs = self.stack.spool_dirs
            taps = [SpoolTap(d, self.stack.home / "chaos-spool-tap" / (str(i) if len(dirs) > 1 else ""))
                    for i, d in enumerate(dirs, 1)]
            for tap in taps:
                tap.start()
            if self.plan.hosts > 1:
                probe = ApiProbe(self.stack)
                self.api_stats = report.api = probe.stats
                probe.start()
            loads = self._loads()
            self.t0 = time.monotonic()
            for load in loads:
                load.start()
            burners.start()
            if self.plan.churn_gap_s is not None:
                churn = CollectorChurn(self.stack, seed=self.plan.seed + 2, kill_gap_s=self.plan.churn_gap_s,
                                       pauses_per_s=self.plan.pauses_per_s)
                report.churn = churn.stats
                churn.start()
            self.progress(f"tally up in {report.startup_s:.1f}s ({self.stack.home}); load started"
                          + (f"; collector-worker churn every {churn.kill_gap_s[0]:g}-"
                             f"{churn.kill_gap_s[1]:g}s" if churn else "")
                          + (f"; {self.plan.burners} busy CPU loop(s)" if self.plan.burners else ""))
            self._run_faults(report, loads)
            self.sleep(max(0.0, self.plan.load_s - (time.monotonic() - self.t0)))
            self._stop_loads(loads)
            _stop_thread(churn)
            burners.stop()
            self.progress(f"load stopped: {self.ledger.acked_count()} events acknowledged"
                          + (f"; churn: {churn.stats.kills} worker kills, {churn.stats.pauses} pauses" if churn else "")
                          + "; settling")
            report.settle_s = settle(self.stack, self.ledger, self.plan.settle_timeout_s)
            _stop_thread(probe)
            for tap in taps:
                _stop_thread(tap)
            spooled = {h for tap in taps for h in tap.hashes()}
            report.tap_max_gap_s = max(tap.max_gap_s for tap in taps)
            report.spool = check_spool(self.ledger, spooled, max_gap_s=report.tap_max_gap_s)
            report.pg, report.ch = compare(self.stack, self.ledger, spooled)
        except (ChaosError, OSError, subprocess.SubprocessError) as exc:
            report.error = f"{exc}"[:4000] + self.stack.log_tails(10)
            for load in loads:
                load.stop.set()
            if report.pg is None and self.stack.alive():
                try:  # what is there, as far as it can be read
                    report.pg, report.ch = compare(self.stack, self.ledger)
                except Exception:
                    pass
        finally:
            for load in loads:
                load.stop.set()
            _stop_thread(churn)
            burners.stop()
            _stop_thread(probe)
            for tap in taps:
                _stop_thread(tap)
            self.stack.down()
        return report

    def _loads(self) -> list[LoadGenerator]:
        """The batch load of ADR 24, and single-event requests (their own URLs and ids) when planned."""
        loads = [LoadGenerator(self.stack, self.ledger, seed=self.plan.seed, rate=self.plan.rate)]
        if self.plan.single_rate > 0:
            loads.append(LoadGenerator(self.stack, self.ledger, seed=self.plan.seed + 3, rate=self.plan.single_rate,
                                       batch_max=1, tag="s"))
        return loads

    def _run_faults(self, report: ChaosReport, loads: list[LoadGenerator]) -> None:
        order = iter(self.plan.order())
        while True:
            gap = self.rng.uniform(*self.plan.gap_s)
            if self.plan.fault_count is not None:  # exactly that many, however long they take
                if len(report.faults) >= self.plan.fault_count:
                    return
            elif time.monotonic() - self.t0 + gap >= self.plan.load_s:
                return
            self.sleep(gap)
            name = next(order, None)
            if name is None:  # only faults that run once, and they ran
                return
            rec = FaultRecord(name, at_s=time.monotonic() - self.t0, acked_before=self.ledger.acked_count())
            if name in ("broker-down", "postgres-down", "pause-then-kill-all", "collector-host"):  # these take long
                self.progress(f"[{rec.at_s:7.1f}s] {name}: {self.plan.known[name].description} ...")
            report.faults.append(rec)
            try:
                self.plan.known[name].run(self, rec)
            except Exception as exc:
                rec.error = f"{type(exc).__name__}: {exc}"
                if not self.stack.alive():
                    raise ChaosError(f"{name}: {rec.error}") from exc
            if rec.killed_at is not None:
                rec.next_ack_s = _wait_next_ack(self.ledger, rec.killed_at, self.plan.restart_timeout_s, self)
            self.progress(_describe(rec))
            failed = [load.failure for load in loads if load.failure is not None]
            if failed:
                raise ChaosError(f"the load generator failed: {failed[0]!r}")

    def _stop_loads(self, loads: list[LoadGenerator]) -> None:
        for load in loads:
            load.stop.set()
        for load in loads:
            load.join(self.plan.restart_timeout_s + 200)
            if load.failure is not None:
                raise ChaosError(f"the load generator failed: {load.failure!r}")


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_thread(thread: CollectorChurn | SpoolTap | ApiProbe | None) -> None:
    if thread is not None and thread.is_alive():
        thread.stop.set()
        thread.join(30)


def _wait_next_ack(ledger: Ledger, t: float, timeout_s: float, chaos: ChaosRun) -> float | None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = ledger.first_ack_after(t)
        if got is not None:
            return got
        chaos.sleep(0.2)
    return None


def _describe(rec: FaultRecord) -> str:
    restart = "not restarted" if rec.restart_s is None else f"restarted in {rec.restart_s:.1f}s"
    ack = "-" if rec.next_ack_s is None else f"{rec.next_ack_s:.1f}s"
    return (f"[{rec.at_s:7.1f}s] {rec.name}: {rec.target}; {restart}; next 202 after {ack}"
            + (f"; {rec.note}" if rec.note else "") + (f"; ERROR {rec.error[:300]}" if rec.error else ""))
