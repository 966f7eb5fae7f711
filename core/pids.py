"""Whether a process runs: one answer for every layer (the spool's orphan recovery, `tally up`'s run state,
the embedded PostgreSQL's leftover postmaster)."""

from __future__ import annotations

import os


def pid_running(pid: object) -> bool:
    """True if `pid` is a running process. A zombie (dead, not reaped yet: a killed collector worker whose
    master has not waited for it, a child of a killed parent) counts as dead, although it still answers
    kill(pid, 0). Without /proc (not Linux), kill(pid, 0) decides."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[-1].split()[0]
    except FileNotFoundError:  # gone between the two looks
        return False
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def started_at(pid: int) -> float | None:
    """When `pid` started, in Unix seconds (to about a second: the boot time /proc gives is whole seconds);
    None when unknown (no /proc, no such process). Tells a process from a later one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            ticks = int(fh.read().rsplit(b")", 1)[-1].split()[19])  # field 22: starttime, clock ticks after boot
        with open("/proc/stat", "rb") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")
