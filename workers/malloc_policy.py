"""glibc malloc's policy for a streaming process (the shipper, the rollup worker, the analyst server's loader;
ADR 58's addendum on the soak's memory slopes).

A streaming process allocates large buffers of varying sizes all the time: a sealed segment read whole, Kafka
fetch responses, the JSON lines of a ClickHouse insert. glibc serves a block of 128 KiB or more with mmap and gives
it back on free, but by default it then raises that threshold (up to 32 MiB) to the size of the block just freed,
so the next ones come from the heap, where the small long-lived objects allocated between them pin the holes they
leave: the heap grows with the largest buffers seen and keeps their space as free memory. In a 14-minute soak
(2,500 events/s) the analyst server's heap (the loader's insert bodies) reached 88.8 MiB, 42 MiB of it free, with
the threshold left dynamic, and 57.3 MiB (12.5 free) with it pinned. Pinning it (which also pins the trim
threshold) keeps every large buffer in its own mapping, returned on free. Blocks under the threshold are not
concerned: the rollup worker's ~15 MiB of free heap, reached within minutes and then flat, stays.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own initial value: setting it at all stops the dynamic raise


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve blocks of `threshold` bytes or more with mmap for good (glibc `mallopt(M_MMAP_THRESHOLD)`).
    Returns False where there is no glibc mallopt (another libc): nothing is changed then."""
    try:  # the C library already loaded into this process (no `ldconfig` subprocess, as find_library would run)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("malloc policy: no glibc mallopt here; the mmap threshold is left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, threshold):
        log.info("malloc policy: mallopt refused the mmap threshold; it is left as it is")
        return False
    return True
