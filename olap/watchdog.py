"""The analyst server's watchdog: every analyst query is answered by the clock (ADR 32).

ClickHouse checks `max_execution_time` and `KILL QUERY` only between blocks. One block of an
expensive function runs to its end whatever either says (measured with chDB 26.9: a 2 s limit
and a KILL QUERY issued at 1 s both took effect after 13.8 s, when the block of three
65,000-byte `editDistance` rows was done). So a query cannot be stopped at its deadline; it
can only be left behind. Each query therefore runs on a thread of its own, and the request
thread waits for its output only until the deadline. At the deadline:

1. the query is told to stop: `KILL QUERY ... ASYNC` from the watchdog's own session, matched
   by the `log_comment` tag the query was started with; ClickHouse honours it at the end of
   the block it is computing (so does `max_execution_time`);
2. the caller gets the timeout at once (400 `query_timeout`, or a cut stream) and the audit row
   says the watchdog cancelled it;
3. its query slot is handed back at once with a fresh client, as long as fewer than
   `max_abandoned` cancelled queries are still computing; otherwise the slot comes back when
   this query's block ends. At most slots + max_abandoned queries ever run in ClickHouse.

What still runs after the deadline: the cancelled query's current block, on its
`max_threads` ClickHouse threads and one Python thread, until ClickHouse finishes that block;
then the query ends, its client is closed and the count of cancelled queries goes down.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_END = object()


class DeadlineReached(Exception):
    """The query ran past its deadline and was cancelled (it may still be finishing its block)."""


class Watchdog:
    """Runs queries on threads of their own and cancels them at their deadline.

    `kill(tag)` asks ClickHouse to stop the query started with `log_comment = tag` (must not block
    for long; errors are logged). `max_abandoned`: how many cancelled queries may still be
    computing while their slots serve other queries.
    """

    def __init__(self, kill: Callable[[str], None], max_abandoned: int) -> None:
        self._kill = kill
        self.max_abandoned = max_abandoned
        self._lock = threading.Lock()
        self._abandoned = 0

    @property
    def abandoned(self) -> int:
        """Queries cancelled at their deadline whose ClickHouse work has not ended yet."""
        with self._lock:
            return self._abandoned

    def start(self, work: Callable[[str], Iterator[bytes]], deadline_s: float,
              release: Callable[[bool], None], close_client: Callable[[], None]) -> "Run":
        """Start `work(tag)` (the chunks of one query) on its own thread; the query must be over by `deadline_s`.

        `release(fresh)` hands the query's slot back (fresh=True: with a new client, the old one
        still busy); `close_client()` closes the old client once an abandoned query ends.
        """
        run = Run(self, work, time.monotonic() + deadline_s, release, close_client)
        run.thread.start()
        run.timer.start()
        return run

    def _take_abandon_slot(self) -> bool:
        with self._lock:
            if self._abandoned >= self.max_abandoned:
                return False
            self._abandoned += 1
            return True

    def _abandoned_ended(self) -> None:
        with self._lock:
            self._abandoned -= 1


class Run:
    """One query on its own thread. `next_chunk()` until it returns None; `close()` when done (idempotent)."""

    def __init__(self, watchdog: Watchdog, work: Callable[[str], Iterator[bytes]], deadline: float,
                 release: Callable[[bool], None], close_client: Callable[[], None]) -> None:
        self.tag = f"tally-analyst-{uuid.uuid4().hex}"
        self.deadline = deadline
        self.overran_s: float | None = None  # how long ClickHouse went on after the deadline (set when it ends)
        self._watchdog = watchdog
        self._work = work
        self._release = release
        self._close_client = close_client
        self._chunks: queue.Queue[Any] = queue.Queue(maxsize=4)
        self._lock = threading.Lock()
        # running -> done (all handed over) | closed (the caller stopped reading) | abandoned (cut at the
        # deadline, slot freed) | overdue (cut at the deadline, slot kept until the block ends)
        self._state = "running"
        self._cut_at: float | None = None
        self.thread = threading.Thread(target=self._run, name=f"analyst-{self.tag[-8:]}", daemon=True)
        # The deadline holds even if nobody reads (a caller gone before the first byte): the timer cuts too.
        self.timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._cut)
        self.timer.daemon = True

    @property
    def slot_freed(self) -> bool:
        """Whether the deadline handed the slot back at once (the query's block may still be computing)."""
        return self._state == "abandoned"

    # the request thread

    def next_chunk(self) -> bytes | None:
        """The next chunk, None at the end. Raises what the query raised, or DeadlineReached at the deadline."""
        remaining = self.deadline - time.monotonic()
        try:
            item = self._chunks.get(timeout=max(0.0, remaining))
        except queue.Empty:
            self._cut()
            with self._lock:
                cut = self._state in ("abandoned", "overdue")
            if cut:
                raise DeadlineReached from None
            item = self._chunks.get()  # it ended just now: what is left is already on its way
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """The caller is done (all read, or it went away): stop the query if it still runs."""
        with self._lock:
            if self._state in ("running", "done"):
                self._state = "closed"

    def _cut(self) -> None:
        with self._lock:
            if self._state != "running":
                return
            self._cut_at = time.monotonic()
            freed = self._watchdog._take_abandon_slot()
            self._state = "abandoned" if freed else "overdue"
        try:
            self._watchdog._kill(self.tag)
        except Exception:  # noqa: BLE001 - the query still ends at its block's end (max_execution_time)
            log.exception("analyst watchdog: KILL QUERY failed")
        if freed:
            self._release(True)

    # the query's thread

    def _run(self) -> None:
        outcome: Any = _END
        chunks: Iterator[bytes] | None = None
        try:
            chunks = self._work(self.tag)
            for chunk in chunks:
                if not self._put(chunk):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the request thread, which re-raises it
            outcome = exc
        finally:
            if chunks is not None and hasattr(chunks, "close"):
                try:
                    chunks.close()  # closing the stream cancels the query in ClickHouse
                except Exception:  # noqa: BLE001
                    log.exception("analyst watchdog: closing a query's stream failed")
            self._finish()
        self._put(outcome)

    def _finish(self) -> None:
        self.timer.cancel()
        with self._lock:
            state = self._state
            if state == "running":
                self._state = "done"
        if state == "abandoned":
            self.overran_s = time.monotonic() - (self._cut_at or self.deadline)
            log.warning("analyst watchdog: a query cancelled at its deadline ended %.1f s later inside ClickHouse",
                        self.overran_s)
            try:
                self._close_client()
            finally:
                self._watchdog._abandoned_ended()
            return
        if state == "overdue":
            self.overran_s = time.monotonic() - (self._cut_at or self.deadline)
        self._release(False)

    def _put(self, item: Any) -> bool:
        """Hand `item` to the request thread; False once nobody will read it (cancelled, cut)."""
        while True:
            with self._lock:
                if self._state not in ("running", "done"):
                    return False
            try:
                self._chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
