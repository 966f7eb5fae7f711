"""waitress for the API and the analyst server, bounded against idle and slow clients (ADR 35).

waitress reads requests on one event loop (no thread per connection) and runs the app on a thread
pool, so an open socket costs a file descriptor and a little memory, never a thread. Its defaults
do not survive idle clients: `connection_limit` (100) stops accepting when reached, so 100 idle
sockets take the server down; `channel_timeout` (120 s) counts from the last byte received, so a
slowloris that sends one byte every few seconds is never timed out. `BoundedServer` changes that:

- it polls (`poll(2)`, not `select(2)`, which stops at descriptor 1024) and never stops accepting
  because of idle sockets: above `max_connections` open, or `max_per_client` from one address (an
  IPv6 address counts by its /56), the least recently active connection that has no request running
  (idle, or still sending its request) is closed to make room. Only when every connection of that
  address (or every connection at all) has a request running or waiting is the new one closed at once;
  requests in progress are never cut;
- `idle_timeout_s`: a connection with no request in it is closed after that long without a byte;
- `request_timeout_s`: a request's headers and body must all arrive within that long of its first
  byte, however steadily they trickle in (slowloris, slow POST);
- the same `request_timeout_s` as a send timeout: a connection with an answer pending that the socket
  has not taken a byte of for that long (the client does not read) is closed at once (RST), request
  running or not. waitress would otherwise keep it forever: its task thread waits with no deadline
  for the output buffer to drop below `outbuf_high_watermark` (16 MiB), and a close it schedules needs
  the socket to become writable. Closing wakes that thread: its next write raises ClientDisconnected,
  waitress closes the app's iterable (a relayed analyst query hands its connection and slot back) and
  the thread is free. Any connection we marked to close that is still open a sweep later (its socket
  never became writable) is closed the same way;
- at most a quarter of the threads (at least 1; no bound when `max_per_client` is 0) run requests of
  one address at once; its next ones wait, parsed, on their own connections (no thread, no refusal)
  and start as the address's running ones end, oldest first. So one address holds at most a quarter
  of the threads, whatever its requests do.

Stopping (`Server.close()`, on SIGTERM/SIGINT): new connections are refused at once (the listening sockets
close) and no connection reads another request; requests already received run to their end and are answered,
then their connections close; idle ones close at once. One whose client sent more meanwhile is shut on our side
and read (and dropped) until the client closes, at most 2 s: closed with unread input, the kernel would reset it
and drop the unsent tail of the last answer. Requests still running `grace_s` (10 s) after the stop began are
cut (their connections reset). Then the threads stop and `run()` returns. waitress's own close() of a
single listening socket closed it and its trigger but left the connections: a client asking every second on a
kept-alive connection kept the server running (and logged EBADF for every answer).

The client address is the TCP peer: behind a reverse proxy every connection comes from the proxy, so
set `max_per_client` to 0 there (the proxy bounds clients; see README, production).

Request sizes (ADR 35, "request sizes"): waitress reads a whole request (a body past 512 KiB into a temporary
file) before the app runs, so the app's own checks (token, `MAX_CONTENT_LENGTH`) come after the bytes are held.
`create_server` therefore bounds the body at the app's `MAX_CONTENT_LENGTH` plus `BODY_MARGIN` (a body just over
the app's limit still gets the app's own 413): a larger Content-Length is answered 413 as its headers end, none
of the body read; a chunked body is cut with a 413 once that much has arrived. The request line and headers are
bounded at the app's `TALLY_MAX_HEADER_BYTES` (a 431 beyond), by default waitress's 256 KiB.
"""

from __future__ import annotations

import logging
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

from core import net

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]  # PEP 3333's application

log = logging.getLogger(__name__)
ACCEPT_BATCH = 128  # connections accepted per loop turn at most
STOP_GRACE_S = 10.0  # a stop lets running requests end for this long, then cuts them
DRAIN_S = 2.0  # a stopping connection that had unread input is read (and dropped) this long at most, then closed
BODY_MARGIN = 64 * 1024  # over the app's MAX_CONTENT_LENGTH: a body just over it still gets the app's own 413
DEFAULT_MAX_BODY = 1024 * 1024  # an app that declares no MAX_CONTENT_LENGTH (plus the margin)
# The request line and headers, unless the app's config names a bound (HEADER_BOUND_KEY): waitress's default,
# which the ClickHouse-compatible endpoint's URLs need (query parameters of up to 16 KiB each, ADR 53).
DEFAULT_MAX_HEADER = 256 * 1024
HEADER_BOUND_KEY = "TALLY_MAX_HEADER_BYTES"  # an app's config key (a string: api/ may not import tally/)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = 2000  # open connections at once (all clients)
    max_per_client: int = 64  # open connections from one client address; 0 = no per-client bound
    idle_timeout_s: int = 15  # a connection without a request, silent this long, is closed
    request_timeout_s: int = 15  # a request must be fully received this long after its first byte ...
    # ... and an answer must move: a connection whose socket took no byte of its pending answer this long is reset

    def running_cap(self, threads: int) -> int:
        """Requests of one address that may run at once: a quarter of the threads, at least 1; 0 (no
        bound) without a per-address bound (behind a proxy every request comes from one address)."""
        return max(1, threads // 4) if self.max_per_client else 0


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on with 0 s: close() sends RST and drops whatever is unsent


class _Channel(HTTPChannel):  # type: ignore[misc]  # waitress ships no type hints: HTTPChannel is Any
    """A waitress channel that knows when its current request began and when its answer last moved, tells
    the server it exists, and lets the server's gate start its requests (BoundedServer.add_task)."""

    request_started = 0.0  # time.monotonic() of the first byte of the request being received
    close_marked = False  # will_close was already set at the previous maintenance sweep
    slot = False  # holds one of its address's running slots (_TaskGate)
    pass_on = False  # its next request takes that slot over when the current one ends
    aborted = False  # closed by abort()
    draining = False  # stopping: our side is shut, what the client still sends is read and dropped (Server)
    drain_by = 0.0  # time.monotonic() when a draining connection is closed even if its client never closes

    def __init__(self, server: BoundedServer, sock: socket.socket, addr: Any, adj: Adjustments,
                 map: dict[int, Any] | None = None) -> None:
        # time.monotonic() when the socket last took bytes of our output, or when output became pending
        self.send_progress = time.monotonic()
        super().__init__(server, sock, addr, adj, map=map)
        self.client = client_key(addr)
        server.admit(self)

    def received(self, data: bytes) -> bool:
        if self.draining:
            return True  # dropped: the stop answers no new request
        before = self.request
        done: bool = super().received(data)
        if self.request is not None and self.request is not before:  # a request began in this data
            self.request_started = time.monotonic()
        return done

    def write_soon(self, data: bytes) -> int:
        if not self.total_outbufs_len:
            self.send_progress = time.monotonic()  # output becomes pending now: the send clock starts
        return int(super().write_soon(data))

    def _flush_some(self, do_close: bool = True) -> bool:
        sent: bool = super()._flush_some(do_close=do_close)
        if sent:
            self.send_progress = time.monotonic()
        return sent

    def service(self) -> None:
        """A task thread runs one request; then its address's slot goes to the next waiting request."""
        try:
            super().service()
        finally:
            self.server.task_done(self)

    def abort(self) -> None:
        """Close now, whatever the socket's state (waitress closes only once the socket is writable, which
        it never is while the client does not read), with a reset that frees the kernel's send buffer.
        handle_close() sets connected = False and notifies outbuf_lock: a task thread waiting for the
        output to drain wakes, its write raises ClientDisconnected, and waitress closes the app's iterable."""
        sock = self.socket  # read once: a task thread may close the channel meanwhile (it becomes None)
        if sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:  # (a socket closed since: nothing to reset)
            pass
        self.aborted = True
        self.handle_close()

    def close_gently(self, by: float) -> None:
        """Stopping, nothing running or unsent: close. A close() with unread input would make the kernel reset the
        connection and drop whatever of the last answer it had not sent yet: then shut our side instead (the
        client reads its answers, then end of file) and read and drop what it sends until it closes, or `by`."""
        sock = self.socket  # read once, as in abort()
        if sock is None:
            return
        if not self._has_input(sock):
            self.handle_close()
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the peer is gone already
            self.handle_close()
            return
        self.draining, self.drain_by = True, by

    @staticmethod
    def _has_input(sock: socket.socket) -> bool:
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))  # b"": end of file, none
        except OSError:  # BlockingIOError: nothing; anything else: nothing a close could lose
            return False

    # abort() runs in maintenance, from a listener's readable() while the loop registers the descriptors
    # of a snapshot of the map (listeners come first, so before any channel of that turn). A closed
    # channel must not be registered: poll would answer POLLNVAL for its number, and a connection
    # accepted in the same turn may get that number and be closed in its place.
    def readable(self) -> bool:
        if self.draining:
            return not self.aborted
        return not self.aborted and self.server.tracker.stop_by is None and bool(super().readable())

    def writable(self) -> bool:
        # draining: nothing is left to send, and waitress would close on a will_close set before the stop (a shut
        # socket always polls writable), with the unread input this drain is there to read first
        return not self.aborted and not self.draining and bool(super().writable())

    def del_channel(self, map: dict[int, Any] | None = None) -> None:
        super().del_channel(map)
        self.server.forget(self)

    @property
    def evictable(self) -> bool:
        """No request of it is running (or queued): closing it loses no answer."""
        return not self.requests and not self.will_close


def client_key(addr: object) -> str:
    """Whose connection this is: the peer's IPv4 address, or its IPv6 /56, as the collector counts clients
    (core/net.py)."""
    host = str(addr[0]) if isinstance(addr, tuple) and addr else ""
    return net.client_key(host)


class _TaskGate:
    """At most `cap` requests of one client address run at once (0: no bound); the others wait, oldest
    first, without a thread. Called from the event loop (enter) and from task threads (leave)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.waiting: dict[str, dict[_Channel, None]] = {}  # an insertion-ordered set per address

    def enter(self, channel: _Channel) -> bool:
        """A request of `channel` is ready: True to start it now, False if it waits for a slot."""
        if not self.cap:
            return True
        with self.lock:
            if channel.slot:  # its running request is ending (waitress queues the next one first): inherit
                channel.pass_on = True
                return True
            if self.running.get(channel.client, 0) < self.cap:
                self.running[channel.client] = self.running.get(channel.client, 0) + 1
                channel.slot = True
                return True
            self.waiting.setdefault(channel.client, {})[channel] = None
            return False

    def leave(self, channel: _Channel) -> _Channel | None:
        """A request of `channel` ended: the waiting channel that takes its slot over (start it), if any."""
        if not self.cap:
            return None
        with self.lock:
            if not channel.slot:
                return None
            if channel.pass_on:
                channel.pass_on = False
                return None
            channel.slot = False
            queue = self.waiting.get(channel.client)
            if queue:
                successor = next(iter(queue))
                del queue[successor]
                if not queue:
                    del self.waiting[channel.client]
                successor.slot = True
                return successor
            left = self.running[channel.client] - 1
            if left:
                self.running[channel.client] = left
            else:
                del self.running[channel.client]
            return None

    def drop(self, channel: _Channel) -> None:
        """`channel` closed: its request waits no more (one running keeps its slot until it ends)."""
        if not self.cap:
            return
        with self.lock:
            queue = self.waiting.get(channel.client)
            if queue is not None and channel in queue:
                del queue[channel]
                if not queue:
                    del self.waiting[channel.client]


class _Tracker:
    """Open channels by client address, shared by every listening socket of one server."""

    def __init__(self, limits: ConnectionLimits, running_cap: int) -> None:
        self.limits = limits
        self.gate = _TaskGate(running_cap)
        self.lock = threading.RLock()  # channels close on task threads too (waitress's send errors)
        self.by_client: dict[str, set[_Channel]] = {}
        self.open = 0
        self.closing: set[_Channel] = set()  # marked to close by us, not yet closed
        self.closed = 0  # since the last log line
        self.next_log = 0.0
        self.stop_by: float | None = None  # time.monotonic() past which a stopping server cuts running requests
        self.stopped = False  # the loop has ended: its triggers are closed (set under trigger_lock)
        self.trigger_lock = threading.Lock()

    def channels(self) -> list[_Channel]:
        with self.lock:
            return [c for group in self.by_client.values() for c in group]

    def add(self, channel: _Channel) -> None:
        with self.lock:
            self.by_client.setdefault(channel.client, set()).add(channel)
            self.open += 1

    def remove(self, channel: _Channel) -> None:
        self.gate.drop(channel)
        with self.lock:
            peers = self.by_client.get(channel.client)
            if peers is None or channel not in peers:
                return  # del_channel may run twice
            peers.discard(channel)
            if not peers:
                del self.by_client[channel.client]
            self.open -= 1
            self.closing.discard(channel)

    def close(self, channel: _Channel, why: str) -> None:
        channel.will_close = True  # waitress closes it on its next loop turn (once its socket is writable)
        self.closing.add(channel)
        self.note(why)

    def note(self, why: str) -> None:
        """Count one connection we closed; log the count at most every 10 s."""
        self.closed += 1
        now = time.monotonic()
        if now >= self.next_log:
            self.next_log = now + 10.0
            log.warning("closed %d connection(s) to stay within the limits (last: %s; %d open from %d addresses)",
                        self.closed, why, self.open, len(self.by_client))
            self.closed = 0


def _oldest_idle(channels: Iterable[_Channel], skip: _Channel) -> _Channel | None:
    candidates = [c for c in channels if c is not skip and c.evictable]
    return min(candidates, key=lambda c: c.last_activity) if candidates else None


class BoundedServer(TcpWSGIServer):  # type: ignore[misc]  # waitress ships no type hints: its server is Any
    """One listening socket of a bounded waitress server (see the module docstring)."""

    channel_class = _Channel

    def __init__(self, app: WSGIApp, socket_map: dict[int, Any], tracker: _Tracker, **kw: object) -> None:
        self.tracker = tracker
        super().__init__(app, socket_map, **kw)

    def admit(self, channel: _Channel) -> None:
        """Called for every accepted connection: make room for it within the limits, or close it."""
        tracker, limits = self.tracker, self.tracker.limits
        with tracker.lock:
            tracker.add(channel)
            peers = tracker.by_client[channel.client]
            if limits.max_per_client and len(peers) - len(peers & tracker.closing) > limits.max_per_client:
                victim = _oldest_idle(peers, channel) or channel
                tracker.close(victim, f"more than {limits.max_per_client} from one address")
                if victim is channel:
                    return
            if tracker.open - len(tracker.closing) > limits.max_connections:
                everyone = [c for group in tracker.by_client.values() for c in group]
                tracker.close(_oldest_idle(everyone, channel) or channel, f"more than {limits.max_connections} open")

    def handle_accept(self) -> None:
        """Accept every pending connection (up to ACCEPT_BATCH), not one per loop turn as waitress does:
        each turn polls every open socket, so a burst of N connects would cost N turns."""
        for _ in range(ACCEPT_BATCH):
            try:
                accepted = self.accept()  # None: nothing pending
            except OSError as exc:  # e.g. EMFILE: try again on the next turn
                now = time.monotonic()
                if now >= self.tracker.next_log:
                    self.tracker.next_log = now + 10.0
                    log.warning("accept() failed: %s", exc)
                return
            if accepted is None:
                return
            conn, addr = accepted
            try:
                self.set_socket_options(conn)
            except OSError:  # the peer left before we got to it (as waitress: ignore it)
                conn.close()
                continue
            self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)

    def readable(self) -> bool:
        return self.tracker.stop_by is None and bool(super().readable())

    def pull_trigger(self) -> None:
        """Wake the loop (task threads do, after writing). Once the loop has ended, its trigger is closed and its
        descriptor number may belong to another file: nothing is written then."""
        with self.tracker.trigger_lock:
            if not self.tracker.stopped:
                super().pull_trigger()

    def forget(self, channel: _Channel) -> None:
        self.tracker.remove(channel)

    def add_task(self, channel: _Channel) -> None:
        """waitress hands over a channel whose next request is ready: start it, or let it wait its turn."""
        if self.tracker.gate.enter(channel):
            self.task_dispatcher.add_task(channel)

    def task_done(self, channel: _Channel) -> None:
        successor = self.tracker.gate.leave(channel)
        if successor is not None:
            self.task_dispatcher.add_task(successor)

    def maintenance(self, now: float) -> None:
        """Every cleanup_interval (1 s), on the event loop: waitress marks idle connections to close
        (channel_timeout); this also marks those whose request has been arriving for longer than
        request_timeout_s, and closes at once those whose answer the socket took no byte of for as
        long, and those marked at the previous sweep that are still open."""
        limits, mono = self.tracker.limits, time.monotonic()
        for channel in list(self.active_channels.values()):
            if channel.will_close and channel.close_marked:
                self._abort(channel, "marked to close, but its client reads nothing")
        super().maintenance(now)
        read_cutoff, send_cutoff = mono - limits.request_timeout_s, mono - limits.request_timeout_s
        for channel in list(self.active_channels.values()):
            if channel.total_outbufs_len and channel.send_progress < send_cutoff:
                self._abort(channel, f"its client read none of its answer for {limits.request_timeout_s} s")
                continue
            if channel.request is not None and not channel.requests and channel.request_started < read_cutoff:
                channel.will_close = True
            channel.close_marked = bool(channel.will_close)

    def _abort(self, channel: _Channel, why: str) -> None:
        # On the event loop, before it polls: the closed descriptor is either not polled or, polled from
        # the loop's snapshot, answers POLLNVAL for a descriptor no longer in the map, which it skips.
        with self.tracker.lock:
            self.tracker.note(why)
        channel.abort()


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (never above the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def request_bounds(app: WSGIApp) -> tuple[int, int]:
    """(body, request line and headers) bounds in bytes for `app`'s requests, from its config when it is a Flask
    app: its MAX_CONTENT_LENGTH (DEFAULT_MAX_BODY if it declares none) plus BODY_MARGIN, and its
    TALLY_MAX_HEADER_BYTES (DEFAULT_MAX_HEADER if none)."""
    config = getattr(app, "config", None) or {}
    declared = config.get("MAX_CONTENT_LENGTH")
    body = (DEFAULT_MAX_BODY if declared is None else int(declared)) + BODY_MARGIN
    return body, int(config.get(HEADER_BOUND_KEY) or DEFAULT_MAX_HEADER)


def create_server(app: WSGIApp, host: str, port: int, *, threads: int,
                  limits: ConnectionLimits = ConnectionLimits(), max_body: int | None = None,
                  max_header: int | None = None) -> Server:
    """A bounded waitress server for `app` on host:port (every address `host` resolves to); call
    `.run()`, and `.close()` from another thread to stop it. `max_body` and `max_header` (bytes) default to
    `request_bounds(app)`: a request over either is answered 413 or 431 before the app sees it."""
    body_bound, header_bound = request_bounds(app)
    descriptors = raise_fd_limit(limits.max_connections + 256)  # + the app's own files, pools, logs
    if descriptors < limits.max_connections + 64:
        log.warning("RLIMIT_NOFILE is %d, too low for %d connections; raise the hard limit (ulimit -n)",
                    descriptors, limits.max_connections)
    adj = Adjustments(
        host=host, port=port, threads=threads,
        connection_limit=limits.max_connections + 32,  # waitress's own stop: never reached while we evict
        channel_timeout=limits.idle_timeout_s, cleanup_interval=1, asyncore_use_poll=True, backlog=2048,
        # waitress refuses a Content-Length >= this before reading any of the body (default: 1 GiB, spooled to /tmp)
        max_request_body_size=body_bound if max_body is None else max_body,
        max_request_header_size=header_bound if max_header is None else max_header)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    tracker = _Tracker(limits, limits.running_cap(threads))
    socket_map: dict[int, Any] = {}
    listeners = [BoundedServer(app, socket_map, tracker, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo)
                 for sockinfo in adj.listen]
    return Server(listeners, socket_map, dispatcher, tracker, adj.asyncore_loop_timeout)


class Server:
    """The listening sockets of one host:port (one per address it resolves to), their connections, one event loop
    and one thread pool. `run()` serves until a `close()` from another thread has stopped it (module doc)."""

    def __init__(self, listeners: list[BoundedServer], socket_map: dict[int, Any], dispatcher: ThreadedTaskDispatcher,
                 tracker: _Tracker, poll_s: float) -> None:
        self.listeners, self.map, self.dispatcher, self.tracker = listeners, socket_map, dispatcher, tracker
        self.poll_s = poll_s
        self.effective_port = listeners[0].effective_port
        self._done = False  # the stop is complete: every connection closed, the threads stopped

    def run(self) -> None:
        try:
            while not self._done:
                wasyncore.poll2(self.poll_s, self.map)
                if self.tracker.stop_by is not None:
                    self._stop_step()
        finally:
            if not self._done:  # left by an error: the threads are stopped all the same
                self.dispatcher.shutdown(cancel_pending=True, timeout=0)
            with self.tracker.trigger_lock:
                self.tracker.stopped = True
            wasyncore.close_all(self.map, ignore_all=True)  # the triggers, and anything an error left open

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop, from any thread: see the module doc. Returns at once; `run()` returns once stopped. A second
        call may shorten the grace, never lengthen it."""
        with self.tracker.lock:
            by = time.monotonic() + grace_s
            self.tracker.stop_by = by if self.tracker.stop_by is None else min(self.tracker.stop_by, by)
        self.listeners[0].pull_trigger()  # the loop takes the first step now, not after its poll's timeout

    def _stop_step(self) -> None:
        """One loop turn of a stop (after the poll, so nothing closed here is in the turn's snapshot): no more
        listening; connections with nothing running or unsent close (`close_gently`); past the grace, or when the
        client has read nothing of its answer for request_timeout_s, they are reset; once none is left, the threads stop
        and the loop ends."""
        assert self.tracker.stop_by is not None
        for listener in self.listeners:
            if listener.accepting:
                wasyncore.dispatcher.close(listener)  # the socket only: its trigger is still needed
        now = time.monotonic()
        late, stuck = now >= self.tracker.stop_by, now - self.tracker.limits.request_timeout_s
        cut = 0
        for channel in self.tracker.channels():
            try:
                if late:
                    cut += bool(channel.requests)
                    channel.abort()
                elif channel.draining:
                    if now >= channel.drain_by:
                        channel.handle_close()
                elif channel.total_outbufs_len and channel.send_progress < stuck:
                    channel.abort()  # its client reads nothing of its answer (as the maintenance sweep would)
                elif not channel.requests and not channel.total_outbufs_len:
                    channel.close_gently(min(now + DRAIN_S, self.tracker.stop_by))
            except Exception:  # one connection's failure must not keep the others (or the threads) from stopping
                log.exception("stopping: closing a connection failed")
        if cut:
            log.warning("stopping: cut %d request(s) still running after the stop's grace", cut)
        if not self.tracker.channels():
            self.dispatcher.shutdown(cancel_pending=True, timeout=1.0)
            self._done = True
