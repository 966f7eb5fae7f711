"""Restart dead child processes with a growing backoff; never take the healthy ones down.

`tally up` registers every process it runs here, the embedded broker and PostgreSQL
included. A child that exits (for any reason: a crash, `kill -9`, the OOM killer) is `down`
and started again after a backoff that doubles with each crash in a row (`backoff_s`, capped
at `max_backoff_s`); a child that stayed up `stable_s` before it died starts over at
`backoff_s`. A start that fails (any exception: StartupError, OSError, a timeout) counts as a crash. A crash-looping
child therefore costs at most one start per `max_backoff_s`, is reported `down` (`describe`,
`on_change`) and leaves every other child alone: nothing here ever stops the others
(docs/adr/0033-supervision-keeps-healthy-parts-up.md).

Call `check` from the thread that will live as long as the children: children get
PR_SET_PDEATHSIG (infra/processes.py), which Linux fires when the *thread* that forked
them exits.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.processes import StartupError, stop, tail

log = logging.getLogger(__name__)

UP, DOWN = "up", "down"


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]  # spawns (and waits until ready, if it wants); may raise
    log_path: Path | None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float | None = None  # clock time of the last successful start
    crashes: int = 0  # crashes in a row (a stable run resets it): the backoff's exponent
    restart_at: float | None = None  # clock time of the scheduled restart, while it is down
    backoff_s: float | None = None  # the wait before that restart
    restarts: int = 0
    recycles: int = 0  # restarts on purpose (`Supervisor.recycle`), not counted in `restarts`
    last_code: int | None = None

    @property
    def state(self) -> str:
        alive = self.restart_at is None and self.proc is not None and self.proc.poll() is None
        return UP if alive else DOWN

    def describe(self, now: float, stable_s: float) -> dict[str, Any]:
        """JSON-ready: state, pid, restarts, crashes in a row, last exit code, and a sentence when down
        (with the next start as a UTC time: it stays true while the file is read later)."""
        stable = self.state == UP and self.started_at is not None and now - self.started_at >= stable_s
        out: dict[str, Any] = {"state": self.state, "pid": self.proc.pid if self.proc is not None else None,
                               "restarts": self.restarts, "crashes_in_a_row": 0 if stable else self.crashes,
                               "last_exit_code": self.last_code, "detail": None}
        if out["state"] == DOWN and self.restart_at is None:  # died since the last supervision pass
            out["detail"] = "exited; restart pending"
        elif out["state"] == DOWN and self.restart_at is not None:
            code = "a failed start" if self.last_code is None else f"exit code {self.last_code}"
            at = time.strftime("%H:%M:%S", time.gmtime(time.time() + max(0.0, self.restart_at - now)))
            out["detail"] = (f"down: {self.crashes} crash(es) in a row, last {code}; "
                             f"next start at {at} UTC (backoff {self.backoff_s or 0:g}s)")
        return out


class Supervisor:
    def __init__(self, *, backoff_s: float = 0.5, max_backoff_s: float = 60.0, stable_s: float = 60.0,
                 on_change: Callable[[Child], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.on_change = on_change
        self.clock = clock
        self.children: dict[str, Child] = {}
        self.held: set[str] = set()  # children left alone (not restarted) until `release`

    def hold(self, name: str) -> None:
        """Leave `name` alone until `release(name)`: if it dies meanwhile, it is restarted only after that (a host
        taken down on purpose, then brought back). Unknown names raise KeyError."""
        if name not in self.children:
            raise KeyError(name)
        self.held.add(name)

    def release(self, name: str) -> None:
        """Supervise `name` again: dead, it is restarted at the next pass (after the usual backoff)."""
        self.held.discard(name)

    def remove(self, name: str) -> Child:
        """Stop supervising `name` for good (it is neither signalled nor restarted); returns it. KeyError if
        unknown."""
        self.held.discard(name)
        return self.children.pop(name)

    def add(self, name: str, start: Callable[[], subprocess.Popen[bytes]], log_path: Path | None, *,
            proc: subprocess.Popen[bytes] | None = None) -> Child:
        """Register a child; start it now unless `proc` (already started) is given. A failing first start
        raises: the caller is starting up and should say so."""
        child = Child(name, start, log_path, proc)
        self.children[name] = child
        if proc is None:
            child.proc = start()
        child.started_at = self.clock()
        return child

    def proc(self, name: str) -> subprocess.Popen[bytes] | None:
        child = self.children.get(name)
        return child.proc if child else None

    def describe(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {name: child.describe(now, self.stable_s) for name, child in self.children.items()}

    def check(self) -> None:
        """One supervision pass: notice deaths, restart what is due. Never raises for a child's sake."""
        for child in list(self.children.values()):
            if child.name in self.held:
                continue
            now = self.clock()
            if child.restart_at is None:
                if child.proc is not None and child.proc.poll() is not None:
                    self._crashed(child, child.proc.returncode, now)
            elif now >= child.restart_at:
                self._restart(child)

    def recycle(self, name: str, why: str, *, pid: int | None = None) -> bool:
        """Stop `name` and start it again now, on purpose (a restart that is not a crash: no backoff, `restarts`
        unchanged, `recycles` counted); only while it is up, not held, and (given `pid`) still that process: a
        child that died meanwhile is the crash path's. A failed start is a crash (backoff, reported down).
        Returns whether it was recycled. Unknown names raise KeyError."""
        child = self.children[name]
        if (name in self.held or child.restart_at is not None or child.proc is None or child.proc.poll() is not None
                or (pid is not None and child.proc.pid != pid)):
            log.info("not recycling %s: it is not the running process the decision was about", name)
            return False
        log.warning("recycling %s: %s", name, why)
        stop(child.proc, timeout=10)
        now = self.clock()
        if child.started_at is not None and now - child.started_at >= self.stable_s:
            child.crashes = 0  # it had been up a while: a failed start now is a new incident, not a loop
        if self._start(child):
            child.recycles += 1
            self._changed(child)
        return True

    def _restart(self, child: Child) -> None:
        log.warning("restarting %s (restart %d)", child.name, child.restarts + 1)
        if self._start(child):
            child.restart_at = None
            child.restarts += 1
            self._changed(child)

    def _start(self, child: Child) -> bool:
        """Start `child` again; whether it started. A failed start (StartupError, OSError, a timeout, a bug) is a
        crash, never the end of supervision."""
        try:
            child.proc = child.start()
        except Exception as exc:
            log.error("%s failed to start: %s", child.name, exc, exc_info=not isinstance(exc, (StartupError, OSError)))
            child.proc, child.started_at = None, None  # no uptime: the backoff keeps growing
            self._crashed(child, None, self.clock(), already_logged=True)
            return False
        child.started_at = self.clock()
        return True

    def _crashed(self, child: Child, code: int | None, now: float, *, already_logged: bool = False) -> None:
        if child.started_at is not None and now - child.started_at >= self.stable_s:
            child.crashes = 0  # it had been up a while: a new incident, not a loop
        child.crashes += 1
        child.last_code = code
        delay = min(self.backoff_s * 2 ** (child.crashes - 1), self.max_backoff_s)
        child.restart_at, child.backoff_s = now + delay, delay
        if not already_logged:
            log.error("%s exited with %s (%d in a row); restarting in %.1fs. Last lines of %s:\n%s", child.name,
                      code, child.crashes, delay, child.log_path or "its log", tail(child.log_path))
        self._changed(child)

    def _changed(self, child: Child) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(child)
        except Exception:
            log.exception("reporting %s's state failed", child.name)

    def run(self, stop: threading.Event, interval_s: float = 0.25) -> None:
        """Supervise until `stop` is set; only `stop` ends it."""
        while not stop.wait(interval_s):
            self.check()
