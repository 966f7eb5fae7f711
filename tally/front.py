"""A small round-robin TCP front for the API processes of `tally up --hosts N` (ADR 59).

`python -m tally.front --listen HOST:PORT --backend HOST:PORT [--backend ...]` accepts connections and
hands each to the next backend in turn; a backend that refuses or does not answer the connect within
`CONNECT_TIMEOUT_S` is skipped for that connection (the next one is tried, each at most once), so a killed API
process costs clients nothing but the requests that were in flight on it (those get a reset and are retried
by the client, on the other process). Bytes are relayed unchanged (the Host header included, so the API's
allowlist sees what the client sent); the API sees the front's address as the client's.

Connection-level round robin: a client keeping one connection alive talks to one process; clients that
open a connection per request (urllib, curl) alternate. Not a production load balancer: no health checks
beyond the connect, no PROXY protocol, no TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
import sys
from collections.abc import Sequence

log = logging.getLogger("tally.front")

CONNECT_TIMEOUT_S = 1.0
CHUNK = 64 * 1024


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` -> (host, port); ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port)


class Front:
    """Round-robin relay from `listen` to `backends`; `connections` counts what each backend got."""

    def __init__(self, listen: tuple[str, int], backends: Sequence[tuple[str, int]]) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.listen, self.backends = listen, list(backends)
        self._next = itertools.cycle(range(len(self.backends)))
        self.connections = [0] * len(self.backends)
        self.skipped = 0  # connects that failed and went to the next backend
        self.server: asyncio.Server | None = None

    async def start(self) -> asyncio.Server:
        self.server = await asyncio.start_server(self._handle, *self.listen, reuse_address=True)
        return self.server

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        first = next(self._next)
        for k in range(len(self.backends)):
            i = (first + k) % len(self.backends)
            try:
                pair = await asyncio.wait_for(asyncio.open_connection(*self.backends[i]), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                self.skipped += 1
                continue
            self.connections[i] += 1
            return pair
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:  # every backend is down: the client sees the connection close and retries
            writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        for w in (writer, up_writer):
            w.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close `dst`; a reset on either side ends it quietly."""
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        with contextlib.suppress(Exception):
            dst.close()


async def serve(front: Front) -> None:
    """Run until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await front.start()
    log.info("front on %s:%d -> %s", *front.listen, ", ".join(f"{h}:{p}" for h, p in front.backends))
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tally.front", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--backend", action="append", required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    try:
        front = Front(parse_address(args.listen), [parse_address(b) for b in args.backend])
    except ValueError as exc:
        print(f"tally.front: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(front))
    return 0


if __name__ == "__main__":
    sys.exit(main())
