"""The soak's load generators: separate processes, each with a few threads on kept-alive connections, sending
steady batches of 50 events to `POST /collect` at a rate the parent sets (bench/soak.py).

Each process reports once a second on a queue: per domain the events acknowledged (202, counting the answer's
`accepted`) and "maybe" (sent without a 202 after one retry on a new connection: the same ids, so the stores
dedup a retry), the failed requests by cause, and every request's latency in ms. Event ids are unique
(`<process tag>-<counter>`), so every acknowledged event must be in both stores exactly once.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from infra.processes import die_with_parent

BATCH = 50
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
PAGES = 200
REFERRERS = ["", "https://www.google.com/search", "https://news.ycombinator.com/item", "", "https://t.co/x"]


@dataclass
class Tally:
    """What one process did since its last report."""

    acked: dict[str, int] = field(default_factory=dict)
    maybe: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def add(self, domain: str, accepted: int | None, error: str | None, ms: float) -> None:
        self.requests += 1
        self.latencies.append(ms)
        if accepted is None:
            self.maybe[domain] = self.maybe.get(domain, 0) + BATCH
        else:
            self.acked[domain] = self.acked.get(domain, 0) + accepted
        if error:
            self.errors[error] = self.errors.get(error, 0) + 1

    def swap(self) -> Tally:
        """What was counted so far (returned) and a fresh start (this one)."""
        done = Tally(self.acked, self.maybe, self.requests, self.errors, self.latencies)
        self.acked, self.maybe, self.requests, self.errors, self.latencies = {}, {}, 0, {}, []
        return done


class Batches:
    """Bodies of BATCH events for one domain at a time, with unique ids, Zipf pages and a few sources."""

    def __init__(self, tag: str, seed: int) -> None:
        rng = random.Random(seed)
        self.tag, self.n = tag, 0
        self.pages = rng.choices(range(PAGES), [1 / (r + 1) for r in range(PAGES)], k=4096)

    def body(self, domain: str) -> bytes:
        ts, parts = int(time.time() * 1000), []
        for _ in range(BATCH):
            n = self.n = self.n + 1
            ref = REFERRERS[n % len(REFERRERS)]
            parts.append(f'{{"domain":"{domain}","url":"https://{domain}/p/{self.pages[n % 4096]}",'
                         f'"type":"{"pageview" if n % 2 else "impression"}","id":"{self.tag}-{n}","ts":{ts}'
                         + (f',"referrer":"{ref}"' if ref else "") + "}")
        return ("[" + ",".join(parts) + "]").encode()


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int | None, str | None]:
    """(accepted, error): accepted is None unless the collector answered 2xx."""
    conn.request("POST", path, body, {"Content-Type": "application/json", "User-Agent": UA})
    resp = conn.getresponse()
    data = resp.read()
    if 200 <= resp.status < 300:
        return int(orjson.loads(data).get("accepted", BATCH)), None
    return None, f"http {resp.status}"


class Sender(threading.Thread):
    """One connection, sending its share of the rate on a fixed schedule (late sends go at once; a debt of
    more than a second is forgiven, so a slow collector lowers the accepted rate instead of bursting)."""

    def __init__(self, host: str, port: int, sites: dict[str, str], share: Any, tally: Tally, lock: threading.Lock,
                 stop: threading.Event, tag: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.share, self.tally, self.lock, self.halt = host, port, share, tally, lock, stop
        self.paths = [(d, f"/collect?site={k}") for d, k in sorted(sites.items())]
        self.batches = Batches(tag, seed)
        self.conn: http.client.HTTPConnection | None = None
        self.turn = seed

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.halt.is_set():
            rate = self.share.value
            if rate <= 0:
                next_at = time.monotonic()
                self.halt.wait(0.05)
                continue
            next_at = max(next_at + BATCH / rate, time.monotonic() - 1.0)
            self.halt.wait(max(0.0, next_at - time.monotonic()))
            self.send_one()

    def send_one(self) -> None:
        self.turn += 1
        domain, path = self.paths[self.turn % len(self.paths)]
        body = self.batches.body(domain)
        t0 = time.perf_counter()
        accepted, error = self.attempt(path, body)
        if accepted is None and error and not error.startswith("http"):
            accepted, error = self.attempt(path, body)  # one retry on a new connection, same ids
        ms = (time.perf_counter() - t0) * 1000.0
        with self.lock:
            self.tally.add(domain, accepted, error, ms)

    def attempt(self, path: str, body: bytes) -> tuple[int | None, str | None]:
        try:
            conn = self.conn or http.client.HTTPConnection(self.host, self.port, timeout=30)
            self.conn = conn
            return post(conn, path, body)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None, type(exc).__name__


def generator(index: int, host: str, port: int, sites: dict[str, str], threads: int, rate: Any,
              reports: Any, stop: Any) -> None:
    """A generator process: `threads` senders sharing this process's `rate` (a shared double, events/s,
    already divided among the processes); a report on `reports` every second until `stop` is set."""
    die_with_parent()  # a bench killed outright leaves no generator sending behind it
    lock, halt = threading.Lock(), threading.Event()
    shared = _Share(rate, threads)
    tally = Tally()
    senders = [Sender(host, port, sites, shared, tally, lock, halt, f"g{index}t{i}r{random.getrandbits(24):06x}",
                      index * 100 + i) for i in range(threads)]
    for s in senders:
        s.start()
    while not stop.is_set():
        time.sleep(1.0)
        with lock:
            done = tally.swap()
        reports.put((index, time.time(), done))
    halt.set()
    for s in senders:
        s.join(35)
    with lock:
        reports.put((index, time.time(), tally.swap()))
    reports.put((index, None, None))


class _Share:
    """A sender's share of its process's rate, read live from the shared double."""

    def __init__(self, rate: Any, threads: int) -> None:
        self.rate, self.threads = rate, threads

    @property
    def value(self) -> float:
        return float(self.rate.value) / self.threads


class Fleet:
    """The parent's handle on the generator processes: set the total rate, take the reports, stop."""

    def __init__(self, collectors: list[str], sites: dict[str, str], processes: int, threads: int) -> None:
        """Process i sends to collectors[i % len(collectors)] (`tally up --hosts N` serves N)."""
        where = [(u.split("//", 1)[1].rsplit(":", 1)) for u in collectors]
        ctx = mp.get_context("spawn")
        self.reports: Any = ctx.Queue()
        self.stop_event = ctx.Event()
        self.rates = [ctx.Value("d", 0.0) for _ in range(processes)]
        self.procs = [ctx.Process(target=generator, args=(i, where[i % len(where)][0], int(where[i % len(where)][1]),
                                                          sites, threads, self.rates[i],
                                                          self.reports, self.stop_event), daemon=True)
                      for i in range(processes)]
        for p in self.procs:
            p.start()

    def set_rate(self, total: float) -> None:
        for r in self.rates:
            r.value = total / len(self.rates)

    def take(self) -> list[tuple[float, Tally]]:
        """The reports that arrived: (wall time, Tally)."""
        out: list[tuple[float, Tally]] = []
        while True:
            try:
                _, t, tally = self.reports.get_nowait()
            except queue.Empty:
                return out
            if t is not None:
                out.append((t, tally))

    def cpu_s(self) -> float:
        """CPU seconds the generator processes used so far (while they run)."""
        from bench.soak_stack import cpu_seconds

        return sum(cpu_seconds(p.pid) or 0.0 for p in self.procs if p.pid is not None)

    def close(self) -> list[tuple[float, Tally]]:
        """Stop every process; the reports not taken yet, the final ones included."""
        self.set_rate(0)
        self.stop_event.set()
        out: list[tuple[float, Tally]] = []
        ended, deadline = 0, time.monotonic() + 60
        while ended < len(self.procs) and time.monotonic() < deadline:
            try:
                _, t, tally = self.reports.get(timeout=1)
            except queue.Empty:
                continue
            if t is None:
                ended += 1
            else:
                out.append((t, tally))
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        return out
