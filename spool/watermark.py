"""The writer's published durable length of an open segment: `marks/<stem>.len` in the spool (ADR 56).

A writer acknowledges a line only after write + fdatasync + a check that the segment still has a name
(spool/segments.py). Right after that check, and before the caller answers 2xx, it overwrites the
companion's 16 bytes in place with the segment's new durable length: so every byte below the published
length is an acknowledged-durable, whole line, and the shipper may ship that prefix of a segment that
is still open (workers/open_prefix.py). Nothing above it is ever read from an open segment: the tail
may be a write whose fdatasync has not returned, or failed and is about to be truncated away.

Format: the length as 8 bytes little endian, then its bitwise complement (8 bytes). A reader that finds
the two halves disagreeing (it raced an overwrite and saw parts of two values) takes the value as
unknown for now, never as a number. The file is created (with length 0) right after the `.open` name
exists, so later writes are in-place overwrites of one block that need no new disk space; it is never
fsync'd, because it is advice for freshness only: after a crash the segment is sealed by recovery and
shipped by its size like any sealed segment. It is removed when its segment is sealed, by the writer
or by recovery, and by recovery when it finds one whose `.open` name is gone.

One `pwrite` per group commit is its whole cost on the collector's path.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

MARKS = "marks"  # the spool's subdirectory of watermark files (the spool itself holds only segments)
LEN = ".len"
_FORMAT = struct.Struct("<QQ")
_MASK = (1 << 64) - 1


def companion(segment: Path) -> Path:
    """The watermark file of `segment` (any of its names: `.new`, `.open`, `.seg`)."""
    return segment.parent / MARKS / (segment.with_suffix("").name + LEN)


def segment_of(mark: Path, suffix: str) -> Path:
    """The segment named by watermark file `mark`, with `suffix` (`.open`, `.seg`)."""
    return mark.parent.parent / (mark.name[: -len(LEN)] + suffix)


def encode(length: int) -> bytes:
    return _FORMAT.pack(length, ~length & _MASK)


def decode(data: bytes) -> int | None:
    """The length in `data`, or None when it is not one whole, consistent value."""
    if len(data) != _FORMAT.size:
        return None
    length, check = _FORMAT.unpack(data)
    return length if check == ~length & _MASK else None


def create(segment: Path) -> int:
    """Create `segment`'s watermark file (length 0, mode 0600); returns its descriptor (the writer keeps it)."""
    path = companion(segment)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, encode(0), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def publish(fd: int, length: int) -> None:
    """Overwrite the published durable length (one pwrite; the caller has made `length` bytes durable)."""
    os.pwrite(fd, encode(length), 0)


def read(segment: Path, attempts: int = 3) -> int | None:
    """The durable length published for `segment`, or None (no watermark file, or no consistent value)."""
    try:
        fd = os.open(companion(segment), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        for _ in range(attempts):
            value = decode(os.pread(fd, _FORMAT.size, 0))
            if value is not None:
                return value
        return None
    finally:
        os.close(fd)


def remove(segment: Path) -> None:
    """Delete `segment`'s watermark file, if any."""
    try:
        os.unlink(companion(segment))
    except FileNotFoundError:
        pass
