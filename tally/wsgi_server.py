"""waitress for the API and the analyst server, bounded against idle and slow clients (ADR 35).

waitress reads requests on one event loop (no thread per connection) and runs the app on a thread
pool, so an open socket costs a file descriptor and a little memory, never a thread. Its defaults
do not survive idle clients: `connection_limit` (100) stops accepting when reached, so 100 idle
sockets take the server down; `channel_timeout` (120 s) counts from the last byte received, so a
slowloris that sends one byte every few seconds is never timed out. `BoundedServer` changes that:

- it polls (`poll(2)`, not `select(2)`, which stops at descriptor 1024) and never stops accepting
  because of idle sockets: above `max_connections` open, or `max_per_client` from one address (an
  IPv6 address counts by its /64), the least recently active connection that has no request running
  (idle, or still sending its request) is closed to make room. Only when every connection of that
  address (or every connection at all) has a request running is the new one closed at once;
  requests in progress are never cut;
- `idle_timeout_s`: a connection with no request in it is closed after that long without a byte;
- `request_timeout_s`: a request's headers and body must all arrive within that long of its first
  byte, however steadily they trickle in (slowloris, slow POST).

The client address is the TCP peer: behind a reverse proxy every connection comes from the proxy, so
set `max_per_client` to 0 there (the proxy bounds clients; see README, production).
"""

from __future__ import annotations

import ipaddress
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger(__name__)
ACCEPT_BATCH = 128  # connections accepted per loop turn at most


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = 2000  # open connections at once (all clients)
    max_per_client: int = 64  # open connections from one client address; 0 = no per-client bound
    idle_timeout_s: int = 15  # a connection without a request, silent this long, is closed
    request_timeout_s: int = 15  # a request must be fully received this long after its first byte


class _Channel(HTTPChannel):
    """A waitress channel that knows when its current request began, and tells the server it exists."""

    request_started = 0.0  # time.monotonic() of the first byte of the request being received

    def __init__(self, server: "BoundedServer", sock, addr, adj, map=None) -> None:  # noqa: ANN001
        super().__init__(server, sock, addr, adj, map=map)
        self.client = client_key(addr)
        server.admit(self)

    def received(self, data: bytes) -> bool:
        before = self.request
        done = super().received(data)
        if self.request is not None and self.request is not before:  # a request began in this data
            self.request_started = time.monotonic()
        return done

    def del_channel(self, map=None) -> None:  # noqa: ANN001
        super().del_channel(map)
        self.server.forget(self)  # type: ignore[attr-defined]

    @property
    def evictable(self) -> bool:
        """No request of it is running (or queued): closing it loses no answer."""
        return not self.requests and not self.will_close


def client_key(addr: object) -> str:
    """Whose connection this is: the peer's IPv4 address, or its IPv6 /64 (one subscriber's usual share)."""
    host = str(addr[0]) if isinstance(addr, tuple) and addr else ""
    if ":" not in host:
        return host
    try:
        return str(ipaddress.IPv6Network(f"{host.split('%')[0]}/64", strict=False))
    except ValueError:
        return host


class _Tracker:
    """Open channels by client address, shared by every listening socket of one server."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.by_client: dict[str, set[_Channel]] = {}
        self.open = 0
        self.closing: set[_Channel] = set()  # marked to close by us, not yet closed
        self.evicted = 0  # since the last log line
        self.next_log = 0.0

    def add(self, channel: _Channel) -> None:
        self.by_client.setdefault(channel.client, set()).add(channel)
        self.open += 1

    def remove(self, channel: _Channel) -> None:
        peers = self.by_client.get(channel.client)
        if peers is None or channel not in peers:
            return  # del_channel may run twice
        peers.discard(channel)
        if not peers:
            del self.by_client[channel.client]
        self.open -= 1
        self.closing.discard(channel)

    def close(self, channel: _Channel, why: str) -> None:
        channel.will_close = True  # waitress closes it on its next loop turn (it is writable now)
        self.closing.add(channel)
        self.evicted += 1
        now = time.monotonic()
        if now >= self.next_log:
            self.next_log = now + 10.0
            log.warning("closed %d connection(s) to stay within the limits (last: %s; %d open from %d addresses)",
                        self.evicted, why, self.open, len(self.by_client))
            self.evicted = 0


def _oldest_idle(channels, skip: _Channel) -> _Channel | None:  # noqa: ANN001 - iterable of _Channel
    candidates = [c for c in channels if c is not skip and c.evictable]
    return min(candidates, key=lambda c: c.last_activity) if candidates else None


class BoundedServer(TcpWSGIServer):
    """One listening socket of a bounded waitress server (see the module docstring)."""

    channel_class = _Channel

    def __init__(self, app: Callable, socket_map: dict, tracker: _Tracker, **kw: object) -> None:
        self.tracker = tracker
        super().__init__(app, socket_map, **kw)

    def admit(self, channel: _Channel) -> None:
        """Called for every accepted connection: make room for it within the limits, or close it."""
        tracker, limits = self.tracker, self.tracker.limits
        tracker.add(channel)
        peers = tracker.by_client[channel.client]
        if limits.max_per_client and len(peers) - len(peers & tracker.closing) > limits.max_per_client:
            victim = _oldest_idle(peers, channel) or channel
            tracker.close(victim, f"more than {limits.max_per_client} from one address")
            if victim is channel:
                return
        if tracker.open - len(tracker.closing) > limits.max_connections:
            everyone = (c for group in tracker.by_client.values() for c in group)
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

    def forget(self, channel: _Channel) -> None:
        self.tracker.remove(channel)

    def maintenance(self, now: float) -> None:
        """Every cleanup_interval: waitress closes idle connections (channel_timeout); this also closes
        those whose request has been arriving for longer than request_timeout_s."""
        super().maintenance(now)
        cutoff = time.monotonic() - self.tracker.limits.request_timeout_s
        for channel in list(self.active_channels.values()):
            if channel.request is not None and not channel.requests and channel.request_started < cutoff:
                channel.will_close = True


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (never above the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def create_server(app: Callable, host: str, port: int, *, threads: int,
                  limits: ConnectionLimits = ConnectionLimits()):  # -> BoundedServer | MultiSocketServer
    """A bounded waitress server for `app` on host:port (every address `host` resolves to); call
    `.run()`, and `.close()` from another thread to stop it."""
    descriptors = raise_fd_limit(limits.max_connections + 256)  # + the app's own files, pools, logs
    if descriptors < limits.max_connections + 64:
        log.warning("RLIMIT_NOFILE is %d, too low for %d connections; raise the hard limit (ulimit -n)",
                    descriptors, limits.max_connections)
    adj = Adjustments(
        host=host, port=port, threads=threads,
        connection_limit=limits.max_connections + 32,  # waitress's own stop: never reached while we evict
        channel_timeout=limits.idle_timeout_s, cleanup_interval=1, asyncore_use_poll=True, backlog=2048)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    tracker, socket_map = _Tracker(limits), {}  # type: ignore[var-annotated]
    servers = [BoundedServer(app, socket_map, tracker, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo)
               for sockinfo in adj.listen]
    if len(servers) == 1:
        return servers[0]
    return MultiSocketServer(socket_map, adj, [(s.effective_host, s.effective_port) for s in servers], dispatcher)
