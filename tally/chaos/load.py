"""The seeded load and its ledger of what was acknowledged (ADR 24).

`LoadGenerator` (a thread) sends batches to `/collect` and records in a `Ledger` every event that was
acknowledged (a 202 names one hash per event) and every attempt that was not. Events with a client `id`
are retried until acknowledged, and deliberately re-sent after their 202 (a retry: counted once). Events
without an `id` are retried on failure and deliberately sent twice (an exact duplicate): each 202 is a
separate event (the collector gives each a new random hash). Every logical event has its own URL
(`ID_PATH` or `NOID_PATH` and a sequence number), so a stored event is traced back to what was sent.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tally.chaos.stack import DOMAIN, ChaosError, ChaosStack

ID_PATH, NOID_PATH = "/e/", "/n/"  # URL paths of events sent with a client id / without one


@dataclass
class Ledger:
    """What the load sent and what was acknowledged; thread-safe. Keyed by each logical event's URL."""

    types: dict[str, str] = field(default_factory=dict)  # url -> event type
    acked: dict[str, str] = field(default_factory=dict)  # hash -> url, from the 202 answers
    unacked: Counter[str] = field(default_factory=Counter)  # url -> attempts without a 202 (reset, 5xx, timeout)
    requests: int = 0
    accepted_requests: int = 0
    failed_requests: int = 0
    retries: int = 0  # re-sends after a failure, and deliberate re-sends of acknowledged id batches
    duplicates: int = 0  # deliberate exact duplicates of acknowledged id-less batches
    errors: list[str] = field(default_factory=list)  # answers the load did not expect (a 400: a harness bug)
    ack_times: list[float] = field(default_factory=list)  # monotonic times of the 202s
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def attempt_failed(self, urls: Iterable[str]) -> None:
        with self.lock:
            self.failed_requests += 1
            self.unacked.update(urls)

    def acknowledged(self, urls: list[str], hashes: list[str]) -> None:
        if len(urls) != len(hashes):
            raise ChaosError(f"a 202 named {len(hashes)} hashes for {len(urls)} events")
        with self.lock:
            self.accepted_requests += 1
            self.ack_times.append(time.monotonic())
            for url, h in zip(urls, hashes, strict=False):
                previous = self.acked.setdefault(h, url)
                if previous != url:
                    self.errors.append(f"hash {h} acknowledged for {previous} and {url}")

    def first_ack_after(self, t: float) -> float | None:
        with self.lock:
            later = [a for a in self.ack_times if a >= t]
        return min(later) - t if later else None

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)


class LoadGenerator(threading.Thread):
    """Seeded batches to the collector at about `rate` requests per second until `stop` is set; a batch
    in flight when it is set is still retried until acknowledged (or `drain_s` passed). `batch_max` caps
    the events per request (1: single-event requests, which make the collector's segments rotate often);
    `tag` keeps the URLs and ids of several generators sharing one ledger apart."""

    def __init__(self, stack: ChaosStack, ledger: Ledger, *, seed: int, rate: float = 8.0,
                 drain_s: float = 180.0, batch_max: int | None = None, tag: str = "") -> None:
        super().__init__(name=f"chaos-load{tag}", daemon=True)
        self.stack, self.ledger, self.rate, self.drain_s = stack, ledger, rate, drain_s
        self.batch_max, self.tag = batch_max, tag
        self.rng = random.Random(seed)
        self.seed = seed
        self.stop = threading.Event()
        self.sequence = 0
        self.attempts = 0
        self.sent_id_batches: list[tuple[bytes, list[str]]] = []
        self.sent_noid_batches: list[tuple[bytes, list[str]]] = []
        self.failure: BaseException | None = None

    def _next_url(self, path: str, event_type: str) -> str:
        self.sequence += 1
        url = f"https://{DOMAIN}{path}{self.tag}{self.sequence}"
        with self.ledger.lock:
            self.ledger.types[url] = event_type
        return url

    def _batch(self, with_ids: bool) -> tuple[bytes, list[str]]:
        ts = datetime.now(UTC).isoformat(timespec="milliseconds")
        events, urls = [], []
        most = 10 if with_ids else 5
        for _ in range(self.rng.randint(1, min(most, self.batch_max or most))):
            event_type = self.rng.choice(("impression", "pageview"))
            url = self._next_url(ID_PATH if with_ids else NOID_PATH, event_type)
            event = {"domain": DOMAIN, "url": url, "type": event_type}
            if with_ids:
                event.update(id=f"s{self.seed}{self.tag}-{self.sequence}", ts=ts)
            if self.rng.random() < 0.3:
                event["value"] = f"{self.rng.randint(0, 9999) / 100:.2f}"
            events.append(event)
            urls.append(url)
        return json.dumps(events).encode(), urls

    def _send(self, body: bytes, urls: list[str], deadline: float | None = None) -> bool:
        """POST until a 202 (True), or `stop`+`drain_s` / `deadline` passed (False). Every failure is
        recorded as an unacknowledged attempt of each event in the batch."""
        first = True
        while True:
            if not first:
                with self.ledger.lock:
                    self.ledger.retries += 1
            first = False
            with self.ledger.lock:
                self.ledger.requests += 1
            self.attempts += 1  # with several collector hosts, each attempt goes to the next one
            req = urllib.request.Request(self.stack.collect_url_for(self.attempts), data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=15) as resp:
                    answer = json.loads(resp.read())
                if resp.status != 202:
                    raise ChaosError(f"collector answered {resp.status}: {answer}")
                self.ledger.acknowledged(urls, answer["hashes"])
                return True
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300]
                self.ledger.attempt_failed(urls)
                # 401 until the collector has read the registry; 429/5xx while something restarts.
                if exc.code not in (401, 429, 500, 502, 503, 504):
                    with self.ledger.lock:
                        self.ledger.errors.append(f"{exc.code} {detail!r}")
                    return False
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
                self.ledger.attempt_failed(urls)  # refused, reset, timed out, cut short: maybe spooled, maybe not
            if deadline is not None and time.monotonic() > deadline:
                return False
            if self.stop.is_set() and deadline is None:
                deadline = time.monotonic() + self.drain_s
            time.sleep(0.2 + self.rng.random() * 0.5)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                roll = self.rng.random()
                if roll < 0.12 and self.sent_id_batches:  # deliberate retry of an acknowledged id batch
                    body, urls = self.rng.choice(self.sent_id_batches[-50:])
                    with self.ledger.lock:
                        self.ledger.retries += 1
                    self._send(body, urls)
                elif roll < 0.20 and self.sent_noid_batches:  # exact duplicate of an id-less batch
                    body, urls = self.rng.choice(self.sent_noid_batches[-50:])
                    with self.ledger.lock:
                        self.ledger.duplicates += 1
                    self._send(body, urls)
                elif roll < 0.35:
                    body, urls = self._batch(with_ids=False)
                    if self._send(body, urls):
                        self.sent_noid_batches.append((body, urls))
                else:
                    body, urls = self._batch(with_ids=True)
                    if self._send(body, urls):
                        self.sent_id_batches.append((body, urls))
                self.stop.wait(max(0.0, 1.0 / self.rate - (time.monotonic() - t0)))
        except BaseException as exc:
            self.failure = exc
