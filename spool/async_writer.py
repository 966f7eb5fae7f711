"""Group commit for an asyncio event loop: many requests' lines, one write + fdatasync, one loop wakeup.

`AsyncSpool.append` is `SpoolWriter.append` for coroutines: when it returns, the lines are written
and fdatasync'd; if it raises OSError (SpoolFull for a full disk), none of them are in the segment.
While one group is being flushed (by one dedicated thread: the loop never blocks on the disk),
later appends join the next group; when the flush ends, the flusher wakes the loop once and the loop
resolves every member's future. No thread blocks per request, so a request costs the worker's GIL
no hand-off of its own (docs/adr/0025-collector-speed.md, "async /collect").

All methods but the flush itself run on the loop's thread; the SpoolWriter's own lock keeps the
flush atomic against its other users (the sealer thread, sync appends from the Flask routes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from spool.segments import SpoolFull, SpoolWriter, frame

log = logging.getLogger(__name__)


class _AsyncGroup:
    __slots__ = ("parts", "waiters")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.waiters: list[asyncio.Future[None]] = []


class AsyncSpool:
    """Appends from coroutines of one event loop to `spool`, group-committed."""

    def __init__(self, spool: SpoolWriter) -> None:
        self.spool = spool
        self._group: _AsyncGroup | None = None  # the group arriving appends join (None: none yet)
        self._flushing = False  # a flush task is running; it takes `_group` when its flush is done
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-flush")
        self._tasks: set[asyncio.Task[None]] = set()  # strong references while they run

    async def append(self, lines: Iterable[bytes]) -> None:
        """Append `lines` (payloads, framed here) durably: returns once written and fdatasync'd.
        Raises OSError (SpoolFull: disk full) if they could not be, and then none of them are in the
        segment. Cancelling the caller does not cancel the flush of the group it joined."""
        data = b"".join([frame(line) for line in lines])
        if not data:
            return
        loop = asyncio.get_running_loop()
        group = self._group
        if group is None:
            group = self._group = _AsyncGroup()
        waiter: asyncio.Future[None] = loop.create_future()
        group.parts.append(data)
        group.waiters.append(waiter)
        if not self._flushing:
            self._flushing = True
            task = loop.create_task(self._flush_groups())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await waiter

    async def _flush_groups(self) -> None:
        """Flush the waiting group, then the one that gathered meanwhile, until none is left."""
        loop = asyncio.get_running_loop()
        try:
            while self._group is not None:
                group, self._group = self._group, None  # closed: later appends start the next group
                failure: OSError | None = None
                try:
                    await loop.run_in_executor(self._executor, self.spool.write_durably, b"".join(group.parts))
                except OSError as exc:
                    failure = exc
                except Exception as exc:  # a bug: the members must not take it for success
                    log.exception("spool: the flush failed")
                    failure = OSError(f"the spool flush failed: {exc!r}")
                except BaseException as exc:  # cancelled, interrupted: fail everyone waiting, then stop
                    failure = OSError(f"the spool flush failed: {exc!r}")
                    _settle(group, failure)
                    if self._group is not None:  # those waiting behind it are not flushed by us either
                        _settle(self._group, failure)
                        self._group = None
                    raise
                if isinstance(failure, SpoolFull):
                    self.spool.full_at = time.monotonic()
                _settle(group, failure)
        finally:
            self._flushing = False

    def close(self) -> None:
        """Stop the flusher thread (after the flush under way, if any)."""
        self._executor.shutdown(wait=True)


def _settle(group: _AsyncGroup, failure: OSError | None) -> None:
    for waiter in group.waiters:
        if not waiter.done():  # a cancelled member's future stays cancelled
            if failure is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(failure)
