"""Background pressure during a chaos run: collector-worker churn and busy CPUs (issue 15 §2, ADR 24).

`CollectorChurn` kill -9s one granian worker of the collector every few seconds (seeded gaps) for the whole
run, and in between pauses a random worker for a few milliseconds at random points (SIGSTOP/SIGCONT, as a
VM steal or a long GC pause would), so segments are created, sealed and recovered while workers die at any
instant. `CpuBurners` are busy-loop processes that take cores away from the platform. Neither raises: what
they did is counted, and a churn that could not find a worker is noted, not fatal (the master may be
restarting).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from tally.chaos.stack import ChaosStack, children_of, signal_pid


@dataclass
class ChurnStats:
    kills: int = 0
    pauses: int = 0
    misses: int = 0  # moments with no collector worker to kill (its master restarting)
    errors: list[str] = field(default_factory=list)


class CollectorChurn(threading.Thread):
    """kill -9 of a collector worker every `kill_gap_s` (uniform, seeded); `pauses_per_s` short pauses."""

    def __init__(self, stack: ChaosStack, *, seed: int, kill_gap_s: tuple[float, float] = (3.0, 6.0),
                 pauses_per_s: float = 20.0, pause_s: float = 0.02) -> None:
        super().__init__(name="chaos-churn", daemon=True)
        self.stack, self.kill_gap_s, self.pause_s = stack, kill_gap_s, pause_s
        self.pause_every_s = 1.0 / pauses_per_s if pauses_per_s > 0 else 0.0
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.stats = ChurnStats()
        self._known: tuple[float, list[int]] = (0.0, [])

    def _workers(self, fresh: bool = False) -> list[int]:
        """The collector's workers, from /proc at most every 0.5 s (a kill always looks afresh)."""
        at, workers = self._known
        if fresh or time.monotonic() - at > 0.5:
            try:
                workers = sorted(children_of(self.stack.pids()["collector"]))
            except (OSError, ValueError, KeyError):
                workers = []
            self._known = (time.monotonic(), workers)
        return workers

    def run(self) -> None:
        next_kill = time.monotonic() + self.rng.uniform(*self.kill_gap_s)
        while not self.stop.is_set():
            try:
                if time.monotonic() >= next_kill:
                    self._kill()
                    next_kill = time.monotonic() + self.rng.uniform(*self.kill_gap_s)
                elif self.pause_every_s:
                    self._pause()
                self.stop.wait(self.pause_every_s or 0.1)
            except Exception as exc:
                self.stats.errors.append(f"{type(exc).__name__}: {exc}")

    def _kill(self) -> None:
        workers = self._workers(fresh=True)
        if not workers:
            self.stats.misses += 1
            return
        if signal_pid(self.rng.choice(workers), signal.SIGKILL):
            self.stats.kills += 1

    def _pause(self) -> None:
        workers = self._workers()
        if not workers:
            return
        victim = self.rng.choice(workers)
        if not signal_pid(victim, signal.SIGSTOP):
            return
        try:
            time.sleep(self.pause_s)
        finally:
            signal_pid(victim, signal.SIGCONT)
        self.stats.pauses += 1


class CpuBurners:
    """`count` processes spinning in a busy loop until `stop()` (a context manager)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> CpuBurners:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        return self

    def __enter__(self) -> CpuBurners:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)
        self.procs = []
