"""The spool: local append-only segment files, one framed record per line.

A record is `<payload>\t<crc32c of payload, 8 hex digits>\n`; the payload is one event's JSON
(which never holds a raw tab or newline). `read_record` checks the frame, so a torn or
corrupted record is detected on read and set aside with its reason, without blocking the
records behind it. Lines without a frame (written before framing existed) are read as bare
JSON objects.

The file protocol (who creates, locks, seals, ships, recovers and deletes what, and why no
interleaving loses an acknowledged line) is docs/adr/0028-spool-protocol.md. In short: a writer
(one per collector process) creates `<host>-<pid>-<time>-<n>.new`, takes an exclusive `flock` on
it, and only then renames it to `.open`, so a `.open` name never exists without its writer's lock
while the writer lives; it appends (write + fdatasync, and checks the file still has a name) before
anything is acknowledged, and seals by renaming to `.seg` while still holding the lock. Orphan
recovery (spool/recovery.py) seals only `.open` files whose lock it holds itself and
whose writer process is gone, and deletes only `.new` files (which never hold a line).

Contract of `SpoolWriter.append`: when it returns, the lines are on disk (written and
fdatasync'd) in a file that has a name in the spool directory, and the segment's published durable
length (spool/watermark.py: what the shipper may read of an open segment, ADR 56) covers them.
If it raises, none of the lines are in the segment (a partial write is truncated away). Concurrent
appends in one process share one write and one fdatasync (group commit), without weakening that
contract. An append is refused (SpoolFull, before anything is written) when it would leave less than
`reserve_bytes` free on the spool's filesystem: that room belongs to the shipper, whose bookkeeping must
go on on a full disk.
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

from spool import watermark

log = logging.getLogger(__name__)

NEW, OPEN, SEALED = ".new", ".open", ".seg"


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


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on `directory`'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def effective_reserve(directory: Path, configured: int) -> int:
    """The free space the collector leaves on the spool's filesystem for the shipper: `configured`
    (TALLY_SPOOL_RESERVE_BYTES), but at most an eighth of the filesystem, so a small disk still takes
    events (a 3 MiB tmpfs keeps 384 KiB)."""
    st = os.statvfs(directory)
    return max(0, min(configured, st.f_blocks * st.f_frsize // 8))


class SpoolWriter:
    def __init__(self, directory: Path, *, max_bytes: int, max_age_s: float, reserve_bytes: int = 0) -> None:
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
        self._mark: int | None = None  # the open segment's watermark file (spool/watermark.py), if made
        self._opened_at = 0.0
        self._seq = 0
        self._pid = os.getpid()
        self._prefix = f"{socket.gethostname()}-{self._pid}"
        directory.mkdir(parents=True, exist_ok=True)
        self.reserve_bytes = effective_reserve(directory, reserve_bytes)

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
        is in the segment. The group commits (`append`, spool.async_writer) call it once per group."""
        with self._lock:
            self._check_fork()
            try:
                self._check_room(len(data))
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
            self._check_named()
            self._publish()
        self.flushes += 1

    def _check_room(self, size: int) -> None:
        """Refuse (SpoolFull) an append that would leave less than the shipper's reserve free."""
        if self.reserve_bytes and free_bytes(self.directory) - size < self.reserve_bytes:
            raise SpoolFull(errno.ENOSPC, f"spool disk is down to its reserve of {self.reserve_bytes} bytes")

    def _check_named(self) -> None:
        """After a flush: the segment must still have a name, or the shipper would never see these lines.
        The protocol keeps every other process off a locked `.open` file (ADR 28); this check turns a
        breach of it into an error (no 2xx) instead of a silent loss."""
        assert self._fd is not None
        if os.fstat(self._fd).st_nlink == 0:
            path = self._path
            os.close(self._fd)
            self._fd, self._path, self._size = None, None, 0
            self._drop_mark(path)
            log.error("spool: the open segment %s lost its name while this writer held it; its lines are "
                      "not acknowledged", path)
            raise OSError(errno.ESTALE, f"spool segment {path} was removed while open")

    def _publish(self) -> None:
        """Publish the segment's acknowledged-durable length for the shipper (ADR 56): after the fdatasync and
        the name check, before the caller answers. Advice only: if it cannot be written, the segment ships
        when sealed, as before open segments were shipped."""
        if self._mark is None:
            return
        try:
            watermark.publish(self._mark, self._size)
        except OSError as exc:
            log.warning("spool: cannot publish the durable length of %s (%s); the rest ships when sealed",
                        self._path, exc)
            self._drop_mark(None)  # what it says stays true: a lower bound of the durable length

    def _drop_mark(self, segment: Path | None) -> None:
        """Close the watermark file; remove it too when `segment` (its segment) is given."""
        if self._mark is not None:
            os.close(self._mark)
            self._mark = None
        if segment is not None:
            watermark.remove(segment)

    def readiness(self, *, recent_full_s: float = 30.0) -> str | None:
        """None if appends can be expected to succeed; else why not (for /readyz): the disk refused an
        append in the last `recent_full_s`, or it has room for at most one more segment above the
        shipper's reserve (a segment counted at most as large as the reserve, so a small disk can be ready)."""
        if time.monotonic() - self.full_at < recent_full_s:
            return "the spool disk refused an append for lack of space in the last 30 s"
        try:
            free = free_bytes(self.directory)
        except OSError as exc:
            return f"the spool directory cannot be read ({exc.strerror})"
        if free < self.reserve_bytes + min(self.max_bytes, self.reserve_bytes or self.max_bytes):
            return "the spool disk is nearly full (at most one segment above the shipper's reserve)"
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
            self._drop_mark(None)  # the parent's: it keeps publishing through its own descriptor
            self._pid = os.getpid()
            self._prefix = f"{socket.gethostname()}-{self._pid}"

    def _open(self, attempts: int = 3) -> None:
        """Create the next segment: `.new`, locked, then renamed to `.open` (ADR 28). Orphan recovery may
        delete a `.new` it finds unlocked; then the rename fails and another name is tried."""
        for _ in range(attempts):
            self._seq += 1
            stem = f"{self._prefix}-{time.time_ns():020d}-{self._seq:06d}"
            new, path = self.directory / (stem + NEW), self.directory / (stem + OPEN)
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(new, path)
                fsync_dir(self.directory)
            except (BlockingIOError, FileNotFoundError):  # recovery held or removed the `.new`: next name
                os.close(fd)
                _unlink_quietly(new)
                continue
            except OSError:
                os.close(fd)
                _unlink_quietly(new)
                _unlink_quietly(path)
                raise
            self._fd, self._path, self._size = fd, path, 0
            self._opened_at = time.monotonic()
            try:  # after the `.open` name exists (recovery removes a watermark whose `.open` is gone)
                self._mark = watermark.create(path)
            except OSError as exc:
                log.warning("spool: no watermark for %s (%s); it ships when sealed", path.name, exc)
            return
        raise OSError(errno.EAGAIN, f"could not create a spool segment in {attempts} attempts")

    def _seal(self) -> None:
        assert self._fd is not None and self._path is not None
        fd, path, size = self._fd, self._path, self._size
        self._fd, self._path, self._size = None, None, 0  # whatever happens next, this segment is done
        try:
            if size:
                os.rename(path, path.with_suffix(SEALED))  # renamed while still locked: recovery never races us
            else:
                path.unlink(missing_ok=True)
            fsync_dir(self.directory)
        finally:
            os.close(fd)
            self._drop_mark(path)  # after the rename: a sealed segment ships by its size

    def _undo(self, size: int) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, size)
        except OSError:  # cannot even truncate: abandon the segment; recovery trims the torn tail
            log.exception("spool: could not truncate %s after a failed write", self._path)
            os.close(self._fd)
            self._fd, self._path, self._size = None, None, 0
            self._drop_mark(None)  # the published length stays below the torn write; recovery seals it later


def disk_full(exc: OSError) -> bool:
    """Whether `exc` says the disk (or the user's quota) has no room left."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _classify(exc: OSError) -> OSError:
    if isinstance(exc, SpoolFull):
        return exc
    if disk_full(exc):
        return SpoolFull(exc.errno, "spool disk is full")
    return exc


def sealed_segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SEALED}"))


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
