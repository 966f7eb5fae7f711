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
then the query ends, its client is closed and the count of cancelled queries goes down. One block
can be made to run for hours (quadratic array work on arrays built without `range`), so that is
bounded too: a query cut at its deadline, or left behind by a caller that went away, that is still
computing `overrun_grace_s` after its deadline makes the watchdog log it at CRITICAL (tag, audit
id) and end the whole process with EXIT_OVERRUN; only a process exit stops a ClickHouse block in
chDB, and the supervisor (`tally up`, a service manager) starts the analyst server again.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_END = object()

# The analyst server's exit code when an abandoned query overran its grace (EX_TEMPFAIL: start it again).
EXIT_OVERRUN = 75


class DeadlineReached(Exception):
    """The query ran past its deadline and was cancelled (it may still be finishing its block)."""


class Watchdog:
    """Runs queries on threads of their own and cancels them at their deadline.

    `kill(tag)` asks ClickHouse to stop the query started with `log_comment = tag` (must not block
    for long; errors are logged). `max_abandoned`: how many cancelled queries may still be
    computing while their slots serve other queries. `overrun_grace_s`: how long after its deadline
    a cancelled (or left behind) query may still be computing before `exit(EXIT_OVERRUN)` is called
    (os._exit: the process ends at once, whatever its other threads are doing).
    """

    def __init__(self, kill: Callable[[str], None], max_abandoned: int, overrun_grace_s: float = 30.0,
                 exit: Callable[[int], None] = os._exit) -> None:
        self._kill = kill
        self.max_abandoned = max_abandoned
        self.overrun_grace_s = overrun_grace_s
        self.exit = exit
        self._lock = threading.Lock()
        self._abandoned = 0
        self._exiting = False

    @property
    def abandoned(self) -> int:
        """Queries cancelled at their deadline whose ClickHouse work has not ended yet."""
        with self._lock:
            return self._abandoned

    def start(self, work: Callable[[str], Iterator[bytes]], deadline_s: float,
              release: Callable[[bool], None], close_client: Callable[[], None]) -> Run:
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

    def _overran(self, run: Run) -> None:
        """`run` is still computing `overrun_grace_s` after its deadline: say so loudly and end the process."""
        with self._lock:
            if self._exiting:
                return
            self._exiting = True
        log.critical("analyst watchdog: query %s (audit id %s) is still computing inside ClickHouse %.1f s after "
                     "its deadline (grace %g s); exiting with code %d so that the supervisor restarts the analyst "
                     "server (only a process exit stops a ClickHouse block)", run.tag, run.audit_id,
                     time.monotonic() - run.deadline, self.overrun_grace_s, EXIT_OVERRUN)
        for handler in logging.getLogger().handlers:  # os._exit skips the interpreter's own flushing
            try:
                handler.flush()
            except Exception:
                pass
        self.exit(EXIT_OVERRUN)


class Run:
    """One query on its own thread. `next_chunk()` until it returns None; `close()` when done (idempotent)."""

    def __init__(self, watchdog: Watchdog, work: Callable[[str], Iterator[bytes]], deadline: float,
                 release: Callable[[bool], None], close_client: Callable[[], None]) -> None:
        self.tag = f"tally-analyst-{uuid.uuid4().hex}"
        self.deadline = deadline
        self.audit_id: int | None = None  # the audit row of a query cut at its deadline, for the overrun log
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
        self._ended = False  # the query's thread is done with ClickHouse
        self._handed_end = False  # next_chunk() returned None: the end is handed over only once, then remembered
        self._cut_at: float | None = None
        self._overrun_timer: threading.Timer | None = None
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
        """The next chunk, None at the end (and at every call after it: the end is read from the queue once, so a
        caller asking again must not wait on an empty queue). Raises what the query raised, or DeadlineReached
        at the deadline."""
        if self._handed_end:
            return None
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
            self._handed_end = True
            return None
        if isinstance(item, BaseException):
            raise item
        chunk: bytes = item
        return chunk

    def close(self) -> None:
        """The caller is done (all read, or it went away): stop the query if it still runs.

        A query left behind while still running is killed now, and its slot comes back when it ends;
        like a cut query, it must end within the grace after its deadline or the process exits."""
        with self._lock:
            left_behind = self._state == "running"
            if self._state in ("running", "done"):
                self._state = "closed"
            if left_behind:
                self._arm_overrun()
        if left_behind:
            self._kill_quietly()

    def _cut(self) -> None:
        with self._lock:
            if self._state != "running":
                return
            self._cut_at = time.monotonic()
            freed = self._watchdog._take_abandon_slot()
            self._state = "abandoned" if freed else "overdue"
            self._arm_overrun()
        self._kill_quietly()
        if freed:
            self._release(True)

    def _kill_quietly(self) -> None:
        try:
            self._watchdog._kill(self.tag)
        except Exception:
            log.exception("analyst watchdog: KILL QUERY failed")

    def _arm_overrun(self) -> None:
        """(under self._lock) Exit the process if the query is still computing the grace after its deadline."""
        if self._ended or self._overrun_timer is not None:
            return
        delay = self.deadline + self._watchdog.overrun_grace_s - time.monotonic()
        self._overrun_timer = threading.Timer(max(0.0, delay), self._overran)
        self._overrun_timer.daemon = True
        self._overrun_timer.start()

    def _overran(self) -> None:
        with self._lock:
            if self._ended:
                return
        self._watchdog._overran(self)

    # the query's thread

    def _run(self) -> None:
        outcome: Any = _END
        chunks: Iterator[bytes] | None = None
        try:
            chunks = self._work(self.tag)
            for chunk in chunks:
                if not self._put(chunk):
                    break
        except BaseException as exc:
            outcome = exc
        finally:
            if chunks is not None and hasattr(chunks, "close"):
                try:
                    chunks.close()  # closing the stream cancels the query in ClickHouse
                except Exception:
                    log.exception("analyst watchdog: closing a query's stream failed")
            self._finish()
        self._put(outcome)

    def _finish(self) -> None:
        self.timer.cancel()
        with self._lock:
            self._ended = True
            if self._overrun_timer is not None:
                self._overrun_timer.cancel()
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
