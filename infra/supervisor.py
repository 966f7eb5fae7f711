"""Restart dead child processes with backoff; give up, loudly, on a crash loop.

`tally up` registers every process it runs here, the embedded broker and PostgreSQL
included. A child that exits (for any reason: a crash, `kill -9`, the OOM killer) is
started again after a backoff that doubles with each recent crash (`backoff_s` up to
`max_backoff_s`); a start that fails (StartupError) counts as a crash. When one child
crashed `max_crashes` times within `window_s`, `check` raises CrashLoop naming it, with
its exit code and the tail of its log: the caller stops everything and exits non-zero
rather than spin forever.

Call `check` from the thread that will live as long as the children: children get
PR_SET_PDEATHSIG (infra/processes.py), which Linux fires when the *thread* that forked
them exits.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra.processes import StartupError, tail

log = logging.getLogger(__name__)


class CrashLoop(RuntimeError):
    """A child kept crashing; the message names it and carries its log tail."""

    def __init__(self, name: str, crashes: int, window_s: float, returncode: int | None, log_tail: str,
                 log_path: Path | None) -> None:
        super().__init__(f"{name} crashed {crashes} times within {window_s:.0f}s (last exit code {returncode}); "
                         f"giving up. Last lines of {log_path or 'its log'}:\n{log_tail}")
        self.name = name
        self.returncode = returncode
        self.log_tail = log_tail


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]  # spawns (and waits until ready, if it wants); may raise
    log_path: Path | None
    proc: subprocess.Popen[bytes] | None = None
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # monotonic time of the scheduled restart, while it is down
    restarts: int = 0
    last_code: int | None = None


class Supervisor:
    def __init__(self, *, max_crashes: int = 5, window_s: float = 60.0, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, on_restart: Callable[[Child], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_crashes = max_crashes
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.on_restart = on_restart
        self.clock = clock
        self.children: dict[str, Child] = {}

    def add(self, name: str, start: Callable[[], subprocess.Popen[bytes]], log_path: Path | None, *,
            proc: subprocess.Popen[bytes] | None = None) -> Child:
        """Register a child; start it now unless `proc` (already started) is given."""
        child = Child(name, start, log_path, proc)
        self.children[name] = child
        if proc is None:
            child.proc = start()
        return child

    def proc(self, name: str) -> subprocess.Popen[bytes] | None:
        child = self.children.get(name)
        return child.proc if child else None

    def check(self) -> None:
        """One supervision pass: notice deaths, restart what is due. Raises CrashLoop."""
        for child in list(self.children.values()):
            now = self.clock()
            if child.restart_at is None:
                if child.proc is None or child.proc.poll() is None:
                    continue
                self._crashed(child, child.proc.returncode, now)
                continue
            if now < child.restart_at:
                continue
            log.warning("restarting %s (restart %d)", child.name, child.restarts + 1)
            try:
                child.proc = child.start()
            except (StartupError, OSError) as exc:
                log.error("%s failed to start: %s", child.name, exc)
                child.proc = None
                self._crashed(child, child.last_code, self.clock(), already_logged=True)
                continue
            child.restart_at = None
            child.restarts += 1
            if self.on_restart is not None:
                self.on_restart(child)

    def _crashed(self, child: Child, code: int | None, now: float, *, already_logged: bool = False) -> None:
        child.last_code = code
        child.crashes.append(now)
        while child.crashes and now - child.crashes[0] > self.window_s:
            child.crashes.popleft()
        recent = len(child.crashes)
        log_tail = tail(child.log_path)
        if recent >= self.max_crashes:
            raise CrashLoop(child.name, recent, self.window_s, code, log_tail, child.log_path)
        delay = min(self.backoff_s * 2 ** (recent - 1), self.max_backoff_s)
        if not already_logged:
            log.error("%s exited with %s; restarting in %.1fs. Last log lines:\n%s", child.name, code, delay,
                      log_tail)
        child.restart_at = now + delay

    def run(self, stop: threading.Event, interval_s: float = 0.25) -> None:
        """Supervise until `stop` is set. Raises CrashLoop."""
        while not stop.wait(interval_s):
            self.check()
