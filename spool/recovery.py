"""Orphan recovery: seal the `.open` segments of writers that are gone, remove stale `.new` files.

The shipper calls `recover_orphans` on every pass (and several shippers may, at once). What it
may touch is fixed by the spool protocol (docs/adr/0028-spool-protocol.md):

- a `.open` file is sealed (renamed to `.seg`, a torn final line cut off first) only when this
  call holds its `flock` itself, the name still names the file it locked, and the writer whose pid
  is in the name is not a live process on this host. A writer takes its lock before the `.open`
  name exists (it locks a `.new` file and renames it), so a free lock on a `.open` file means its
  writer closed it; the pid check keeps recovery off it even if a lock were ever lost. An empty
  orphan is deleted: it never held a line.
- a `.new` file is deleted only when its lock is free and it is older than `new_grace_s`. A `.new`
  file never holds a line (the writer renames it before its first write), so even deleting one
  under a live writer loses nothing: that writer's rename fails and it tries another name.

Nothing else is ever deleted here; sealed segments belong to the shipper.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from core.pids import pid_running, started_at
from spool import watermark
from spool.segments import NEW, OPEN, SEALED, fsync_dir

log = logging.getLogger(__name__)

# A `.open` file untouched this long whose pid is alive is taken for pid reuse (its writer is long gone).
PID_TRUST_S = 600.0
# /proc's boot time is whole seconds: a process that started this much after the segment is another one.
PID_START_SLACK_S = 2.0


def recover_orphans(directory: Path, *, new_grace_s: float = 60.0, trust_pids: bool = True) -> int:
    """Seal (or delete, if empty) every `.open` segment whose writer is gone; drop stale `.new` files.
    Returns how many `.open` segments were recovered. A torn final line was never acknowledged
    (fdatasync happens before the 2xx), so cutting it off loses nothing that was accepted.
    `trust_pids=False` decides by the locks alone (the tests use it to prove the locks suffice)."""
    recovered = sum(_recover_open(path, trust_pids) for path in sorted(directory.glob(f"*{OPEN}")))
    removed = sum(_remove_stale_new(path, new_grace_s) for path in directory.glob(f"*{NEW}"))
    _remove_stray_watermarks(directory)
    if recovered or removed:
        fsync_dir(directory)
    return recovered


def _recover_open(path: Path, trust_pids: bool) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # sealed by its writer meanwhile
        return False
    try:
        if not _lock(fd) or not _still_named(path, fd) or (trust_pids and writer_may_live(path, fd)):
            return False
        data = _read_all(fd)
        keep = data.rfind(b"\n") + 1
        if keep:
            if keep != len(data):
                os.ftruncate(fd, keep)
                os.fsync(fd)
            os.rename(path, path.with_suffix(SEALED))
            log.info("spool: sealed the orphan segment %s (%d bytes)", path.name, keep)
        else:
            path.unlink()
        watermark.remove(path)  # a sealed segment ships by its size (ADR 56)
        return True
    finally:
        os.close(fd)


def _remove_stray_watermarks(directory: Path) -> None:
    """Remove the watermark files whose `.open` segment is gone (a writer died between its seal's rename
    and the unlink). A writer makes its watermark only after the `.open` name exists, so a missing `.open`
    means sealed or gone: the watermark is no longer read by anyone."""
    for mark in (directory / watermark.MARKS).glob(f"*{watermark.LEN}"):
        if not watermark.segment_of(mark, OPEN).exists():
            mark.unlink(missing_ok=True)


def _remove_stale_new(path: Path, grace_s: float) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # renamed to `.open` by its writer meanwhile
        return False
    try:
        if not _lock(fd) or not _still_named(path, fd) or time.time() - os.fstat(fd).st_mtime < grace_s:
            return False
        path.unlink()
        return True
    finally:
        os.close(fd)


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a live writer owns it
        return False
    return True


def _still_named(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (its writer may have renamed it before we locked)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def writer_may_live(path: Path, fd: int) -> bool:
    """Whether the writer named in `<host>-<pid>-<ns>-<n>.open` may still be running: it is on this host, its
    pid is a live (not zombie) process that started before the segment was created (a later one reused the
    pid: a restarted container keeps its host name and hands out the same small pids), and the file changed
    within PID_TRUST_S."""
    parts = path.name.rsplit("-", 3)
    if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[1].isdigit() or not parts[2].isdigit():
        return False
    if time.time() - os.fstat(fd).st_mtime > PID_TRUST_S:
        return False
    pid, created = int(parts[1]), int(parts[2]) / 1e9
    if not pid_running(pid):
        return False
    start = started_at(pid)
    return start is None or start <= created + PID_START_SLACK_S


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
