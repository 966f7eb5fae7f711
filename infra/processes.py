"""Child-process helpers shared by the embedded servers and `tally up`."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pwd
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.pids import pid_running


class StartupError(RuntimeError):
    """A server did not become ready; the message says which and where its log is."""


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10_000  # free_port's ports: from here up to the kernel's ephemeral range


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, for a server about to bind it. Chosen at random below the kernel's
    ephemeral range: a port found free *in* that range (what `bind(0)` gives) can be taken by any outgoing
    connection's local port before the server binds it, which a busy machine (a test run's hundreds of
    connections) did, failing a start-up with "Address already in use". `bind(0)` where the range leaves
    no room below it."""
    low = _ephemeral_low()
    if low - LOWEST_PORT >= 1000:
        choose = random.SystemRandom().randrange
        for _ in range(64):
            port = choose(LOWEST_PORT, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        found: int = sock.getsockname()[1]
        return found


def _ephemeral_low() -> int:
    """The lowest local port the kernel gives outgoing connections (Linux; 0 where unknown: no room)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if the process that started it dies (even by SIGKILL),
    # so a killed `tally up` leaves no orphan broker or database behind.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def die_with_parent(sig: int = signal.SIGTERM, watch_s: float = 0.5) -> None:
    """Call early in a process someone else forks (granian's workers): get `sig` when the parent dies,
    even by SIGKILL, instead of living on as an orphan that keeps the port. If the parent is already
    gone (it died before this call), exit now. Linux only; elsewhere nothing happens.

    Two mechanisms: PR_SET_PDEATHSIG, and a daemon thread that checks every `watch_s` seconds whether we
    were reparented. The watch is needed because a worker granian *respawned* was seen living on after
    `kill -9` of its master despite PR_SET_PDEATHSIG (why is not pinned down), holding its open spool
    segment's lock, so the shipper never shipped what it had acknowledged (the chaos test found it;
    tests/test_collector_orphans.py reproduces it)."""
    # The process that forked us, as multiprocessing knows it (granian's workers): getppid() here would
    # already name init if the master died before this call, and nothing would ever fire.
    known = multiprocessing.parent_process()
    parent = known.pid if known is not None and known.pid is not None else os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # reparented already: the signal will never come
        os.kill(os.getpid(), sig)

    def watch() -> None:
        while True:
            time.sleep(watch_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), sig)
                return

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def spawn(argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
          user: str | None = None) -> subprocess.Popen[bytes]:
    """Start a child whose stdout/stderr go to `log_path`, tied to our lifetime."""
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")  # owner only
    try:
        # Own session: a terminal's Ctrl-C reaches only `tally up`, which then stops children in order.
        return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, **as_user(user), preexec_fn=_die_with_parent, start_new_session=True)
    finally:
        log.close()


def as_user(user: str | None) -> dict[str, Any]:
    """subprocess arguments to run a child as `user` with that user's own group and no supplementary groups
    (`user=` alone keeps ours: root's group would then open what is meant for root only)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal a child, wait for it, and kill it if it does not exit in time."""
    stop_all([proc] if proc is not None else [], sig, timeout)


def stop_all(procs: Sequence[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal every child once (so they stop in parallel), then wait for each; kill the ones that hang."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
    for proc in running:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_until(check: Callable[[], bool], *, what: str, timeout: float, log_path: Path | None = None,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `check` until it is true; raise StartupError naming `what` on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise StartupError(f"{what} exited with code {proc.returncode} during start-up"
                               + (f"; see {log_path}:\n{tail(log_path)}" if log_path else ""))
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise StartupError(f"{what} was not ready after {timeout:.0f}s"
                               + (f"; see {log_path}:\n{tail(log_path)}" if log_path else ""))
        time.sleep(0.05)


def tcp_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """True if `pid` runs; a zombie counts as dead (core.pids)."""
    return pid_running(pid)
