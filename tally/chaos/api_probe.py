"""Customer API traffic during a multi-host chaos run: clients that retry on the other API process (ADR 59).

`ApiProbe` (a thread) asks the API front for the chaos site's series a few times a second, as a dashboard
would, and retries a request that failed (a reset, a refused connection, a 5xx) up to `attempts` times: the
front hands the retry to the next API process. It counts requests, the ones that needed a retry, and the ones
that failed every attempt (those fail the run: a client could not get an answer while one API process was
still up). A 4xx is a harness bug and recorded as an error.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from tally.chaos.stack import DOMAIN, ChaosStack


@dataclass
class ApiStats:
    requests: int = 0
    retried: int = 0  # answered, but only after one or more failed attempts
    failed: int = 0  # no answer after every attempt
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.requests, self.retried, self.failed


class ApiProbe(threading.Thread):
    def __init__(self, stack: ChaosStack, *, rate: float = 5.0, attempts: int = 5) -> None:
        super().__init__(name="chaos-api-probe", daemon=True)
        self.stack, self.every_s, self.attempts = stack, 1.0 / rate, attempts
        self.stop = threading.Event()
        self.stats = ApiStats()

    def _once(self) -> None:
        url = f"http://127.0.0.1:{self.stack.api_port}/api/v1/domains/{DOMAIN}/impressions?granularity=15m"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.stack.token}"})
        for attempt in range(self.attempts):
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
                with self.stats.lock:
                    self.stats.requests += 1
                    self.stats.retried += attempt > 0
                return
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    with self.stats.lock:
                        self.stats.errors.append(f"API answered {exc.code} {exc.read()[:200]!r}")
                    return
            except (urllib.error.URLError, http.client.HTTPException, OSError):
                pass
            time.sleep(0.2)
        with self.stats.lock:
            self.stats.requests += 1
            self.stats.failed += 1

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self._once()
            except Exception as exc:  # never the end of the probe; recorded
                with self.stats.lock:
                    self.stats.errors.append(f"{type(exc).__name__}: {exc}")
            self.stop.wait(max(0.0, self.every_s - (time.monotonic() - t0)))
