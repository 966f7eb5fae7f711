"""The spool: local append-only segment files, one event JSON per line.

Writers (one per collector process) append to `<host>-<pid>-<n>.open` and seal
a segment by renaming it to `.seg` once it is big or old enough. The shipper
only reads sealed segments and deletes one after Kafka acknowledged every
record in it. File names sort by creation order within a writer.

Contract of `SpoolWriter.append`: when it returns, the lines are on disk
(written and fdatasync'd). If it raises, none of the lines are in the segment
(a partial write is truncated away).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from infra.processes import pid_alive

log = logging.getLogger(__name__)

OPEN, SEALED = ".open", ".seg"


class SpoolFull(OSError):
    """The spool disk is full (or over quota); the caller should answer 503 + Retry-After."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolWriter:
    def __init__(self, directory: Path, *, max_bytes: int, max_age_s: float) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._opened_at = 0.0
        self._seq = 0
        self._pid = os.getpid()
        self._prefix = f"{socket.gethostname()}-{self._pid}"
        directory.mkdir(parents=True, exist_ok=True)

    def append(self, lines: Iterable[bytes]) -> None:
        data = b"".join(line + b"\n" for line in lines)
        if not data:
            return
        with self._lock:
            self._check_fork()
            if self._fd is not None and (self._size >= self.max_bytes
                                         or time.monotonic() - self._opened_at >= self.max_age_s):
                self._seal()
            if self._fd is None:
                self._open()
            assert self._fd is not None
            start = self._size
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                os.fdatasync(self._fd)
            except OSError as exc:
                self._undo(start)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpoolFull(exc.errno, "spool disk is full") from exc
                raise
            self._size = start + len(data)

    def seal_if_stale(self) -> None:
        """Seal the open segment if it is old enough; called by a timer so idle spools still ship."""
        with self._lock:
            self._check_fork()
            if self._fd is not None and time.monotonic() - self._opened_at >= self.max_age_s:
                self._seal()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and os.getpid() == self._pid:
                self._seal()

    def _check_fork(self) -> None:
        # A forked worker must not share its parent's segment.
        if os.getpid() != self._pid:
            self._fd, self._path, self._size = None, None, 0
            self._pid = os.getpid()
            self._prefix = f"{socket.gethostname()}-{self._pid}"

    def _open(self) -> None:
        self._seq += 1
        self._path = self.directory / f"{self._prefix}-{time.time_ns():020d}-{self._seq:06d}{OPEN}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        _fsync_dir(self.directory)
        self._size = 0
        self._opened_at = time.monotonic()

    def _seal(self) -> None:
        assert self._fd is not None and self._path is not None
        os.close(self._fd)
        if self._size:
            self._path.rename(self._path.with_suffix(SEALED))
        else:
            self._path.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        self._fd, self._path, self._size = None, None, 0

    def _undo(self, size: int) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, size)
        except OSError:  # cannot even truncate: abandon the segment; recovery trims the torn tail
            log.exception("spool: could not truncate %s after a failed write", self._path)
            os.close(self._fd)
            self._fd, self._path, self._size = None, None, 0


def sealed_segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SEALED}"))


def recover_orphans(directory: Path, host: str | None = None) -> int:
    """Seal `.open` segments of dead writers on this host, dropping a torn final line.

    A torn line was never acknowledged (fdatasync happens before the 2xx), so
    dropping it loses nothing that was accepted.
    """
    host = host or socket.gethostname()
    recovered = 0
    for path in sorted(directory.glob(f"{host}-*{OPEN}")):
        try:
            pid = int(path.name[len(host) + 1:].split("-", 1)[0])
        except ValueError:
            continue
        if pid_alive(pid):
            continue
        data = path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        if keep:
            if len(keep) != len(data):
                with open(path, "r+b") as fh:
                    fh.truncate(len(keep))
                    os.fsync(fh.fileno())
            path.rename(path.with_suffix(SEALED))
        else:
            path.unlink()
        recovered += 1
    if recovered:
        _fsync_dir(directory)
    return recovered
