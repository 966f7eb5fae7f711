"""The spool: local append-only segment files, one framed record per line.

A record is `<payload>\t<crc32c of payload, 8 hex digits>\n`; the payload is one event's JSON
(which never holds a raw tab or newline). `read_record` checks the frame, so a torn or
corrupted record is detected on read and set aside with its reason, without blocking the
records behind it. Lines without a frame (written before framing existed) are read as bare
JSON objects.

Writers (one per collector process) append to `<host>-<pid>-<time>-<n>.open`
and seal a segment by renaming it to `.seg` once it is big or old enough. The
shipper only reads sealed segments and deletes one after Kafka acknowledged
every record in it. File names sort by creation order within a writer.

A writer holds an exclusive `flock` on its open segment for as long as it
owns it; the kernel drops the lock when the process dies however it dies. So
"is the writer gone?" never depends on host names or pids (which differ or
repeat across containers and pid namespaces sharing one spool volume).

Contract of `SpoolWriter.append`: when it returns, the lines are on disk
(written and fdatasync'd). If it raises, none of the lines are in the segment
(a partial write is truncated away). Concurrent appends in one process share
one write and one fdatasync (group commit), without weakening that contract.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import crc32c

log = logging.getLogger(__name__)

OPEN, SEALED = ".open", ".seg"


class CorruptRecord(ValueError):
    """A spool line that is not an intact record; `reason` is a short counter label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def frame(payload: bytes) -> bytes:
    """One spool line for `payload` (no newline in it): payload, tab, CRC32C in hex, newline."""
    return b"%s\t%08x\n" % (payload, crc32c.crc32c(payload))


def read_record(line: bytes) -> bytes:
    """The payload of one spool line (without its newline); raises CorruptRecord naming the problem."""
    payload, tab, check = line.rpartition(b"\t")
    if not tab:  # unframed: only whole JSON objects written before framing existed
        if line.startswith(b"{") and line.endswith(b"}"):
            return line
        raise CorruptRecord("unframed", "no checksum and not a JSON object")
    if len(check) != 8:
        raise CorruptRecord("torn", f"checksum field is {len(check)} bytes, not 8")
    try:
        expected = int(check, 16)
    except ValueError:
        raise CorruptRecord("torn", "checksum field is not hex") from None
    if crc32c.crc32c(payload) != expected:
        raise CorruptRecord("checksum", "CRC32C does not match the record")
    return payload


def segment_records(data: bytes) -> Iterator[bytes]:
    """Every line of a segment's bytes (without newlines), empty lines skipped; a torn tail included."""
    for line in data.split(b"\n"):
        if line:
            yield line


class SpoolFull(OSError):
    """The spool disk is full (or over quota); the caller should answer 503 + Retry-After."""


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed, deleted files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Group:
    """One group commit: the framed lines of its members, set `done` once they are durable or failed."""

    __slots__ = ("done", "failure", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done = threading.Event()
        self.failure: OSError | None = None


class SpoolWriter:
    def __init__(self, directory: Path, *, max_bytes: int, max_age_s: float) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()  # owns the file: open, write + fdatasync, seal
        # Group commit: `_batch` is the group arriving appends join; its first member leads it, waiting
        # on `_flush_lock` for the group before to be durable, then closing and flushing it.
        self._batch_lock = threading.Lock()
        self._batch = _Group()
        self._flush_lock = threading.Lock()
        self.flushes = 0  # write + fdatasync calls so far (how well group commit groups)
        self.full_at = float("-inf")  # time.monotonic() of the last append refused for a full disk
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._opened_at = 0.0
        self._seq = 0
        self._pid = os.getpid()
        self._prefix = f"{socket.gethostname()}-{self._pid}"
        directory.mkdir(parents=True, exist_ok=True)

    def append(self, lines: Iterable[bytes]) -> None:
        """Append `lines` (payloads, each framed with its checksum) durably; returns once they are written
        and fdatasync'd. Raises OSError (SpoolFull for a full disk) if they could not be, and then none
        of them are in the segment.

        Group commit (leader/follower): the first caller to join a group leads it; while the group
        before is being flushed, later callers join this group; the leader then closes the group and
        writes all of its lines with one write and one fdatasync, and wakes its members once (each
        group has its own Event, so nobody is woken for another group's flush). If the flush fails,
        every caller in the group gets the error and none of its lines stay in the segment."""
        data = b"".join([frame(line) for line in lines])
        if not data:
            return
        with self._batch_lock:
            group = self._batch
            group.parts.append(data)
            leader = len(group.parts) == 1
        if leader:
            with self._flush_lock:  # the group before is durable (or failed) when we get it
                with self._batch_lock:
                    self._batch = _Group()  # close ours: later appends join the next group
                try:
                    self.write_durably(b"".join(group.parts))
                except OSError as exc:
                    group.failure = exc
                except BaseException as exc:  # a bug, an interrupt: the members must not take it for success
                    group.failure = OSError(f"the spool flush failed: {exc!r}")
                    raise
                finally:
                    group.done.set()
        else:
            group.done.wait()
        if group.failure is not None:
            if isinstance(group.failure, SpoolFull):
                self.full_at = time.monotonic()
            raise group.failure

    def write_durably(self, data: bytes) -> None:
        """One write + fdatasync of `data` (framed lines) at the end of the open segment (sealing it first
        if due); blocks until durable. Raises OSError (SpoolFull for a full disk) and then none of `data`
        is in the segment. The group commits (`append`, collector.async_spool) call it once per group."""
        with self._lock:
            self._check_fork()
            try:
                if self._fd is not None and (self._size >= self.max_bytes
                                             or time.monotonic() - self._opened_at >= self.max_age_s):
                    self._seal()
                if self._fd is None:
                    self._open()
            except OSError as exc:
                raise _classify(exc) from exc
            assert self._fd is not None
            start = self._size
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                os.fdatasync(self._fd)
            except OSError as exc:
                self._undo(start)
                raise _classify(exc) from exc
            self._size = start + len(data)
        self.flushes += 1

    def readiness(self, *, recent_full_s: float = 30.0) -> str | None:
        """None if appends can be expected to succeed; else why not (for /readyz): the disk refused an
        append in the last `recent_full_s`, or it has less free space than two segments."""
        if time.monotonic() - self.full_at < recent_full_s:
            return "the spool disk refused an append for lack of space in the last 30 s"
        try:
            st = os.statvfs(self.directory)
        except OSError as exc:
            return f"the spool directory cannot be read ({exc.strerror})"
        if st.f_bavail * st.f_frsize < 2 * self.max_bytes:
            return "the spool disk has less free space than two segments"
        if not os.access(self.directory, os.W_OK):
            return "the spool directory is not writable"
        return None

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
        # A forked worker must not share its parent's segment (nor keep its lock alive).
        if os.getpid() != self._pid:
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._path, self._size = None, None, 0
            self._pid = os.getpid()
            self._prefix = f"{socket.gethostname()}-{self._pid}"

    def _open(self) -> None:
        self._seq += 1
        path = self.directory / f"{self._prefix}-{time.time_ns():020d}-{self._seq:06d}{OPEN}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new file: nobody else can hold it
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd, self._path, self._size = fd, path, 0
        self._opened_at = time.monotonic()

    def _seal(self) -> None:
        assert self._fd is not None and self._path is not None
        fd, path, size = self._fd, self._path, self._size
        self._fd, self._path, self._size = None, None, 0  # whatever happens next, this segment is done
        try:
            if size:
                path.rename(path.with_suffix(SEALED))  # renamed while still locked: recovery never races us
            else:
                path.unlink(missing_ok=True)
            fsync_dir(self.directory)
        finally:
            os.close(fd)

    def _undo(self, size: int) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, size)
        except OSError:  # cannot even truncate: abandon the segment; recovery trims the torn tail
            log.exception("spool: could not truncate %s after a failed write", self._path)
            os.close(self._fd)
            self._fd, self._path, self._size = None, None, 0


def _classify(exc: OSError) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(exc.errno, "spool disk is full")
    return exc


def sealed_segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SEALED}"))


def recover_orphans(directory: Path) -> int:
    """Seal `.open` segments whose writer is gone (nobody holds their lock), dropping a torn final line.

    A torn line was never acknowledged (fdatasync happens before the 2xx), so
    dropping it loses nothing that was accepted.
    """
    recovered = 0
    for path in sorted(directory.glob(f"*{OPEN}")):
        try:
            fh = open(path, "r+b")
        except FileNotFoundError:  # sealed by its writer meanwhile
            continue
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer owns it
            if not path.exists():  # sealed between our open and our lock
                continue
            data = fh.read()
            keep = len(data[: data.rfind(b"\n") + 1])
            if keep:
                if keep != len(data):
                    fh.truncate(keep)
                    os.fsync(fh.fileno())
                path.rename(path.with_suffix(SEALED))
            else:
                path.unlink()
        recovered += 1
    if recovered:
        fsync_dir(directory)
    return recovered
