"""Freshness: from an event's 2xx to "visible to its user", in each store (issue 19 §1, ADR 56).

Run: `python -m bench.freshness [--quick] [--rate R] [--compare DIR]`.

It starts `tally up` on a fresh TALLY_HOME and free ports in its own process group, adds two sites and,
from THIS process, the way ../shared/checks/12-scale does:
- steady load: R events/s (default 300) to `load.fresh.test`, in POSTs of 50 events;
- markers: one event every 0.5 s to `fresh.fresh.test`; its time is taken when the collector answered 2xx;
- two pollers, each as fast as it gets its answer (plus 20 ms): the customer API
  (`/api/v1/domains/<d>/impressions?granularity=15m`, PostgreSQL) and analyst SQL (`/api/v1/sql`,
  `SELECT count() FROM tally.events WHERE domain = ...`, ClickHouse). The k-th marker is visible when
  the count reaches k; freshness = first poll that saw it - its 2xx.
It prints p50/p95/p99/max per store (ms) and writes bench/results/freshness.json.

`--compare DIR` runs the same measurement first with the code in DIR (e.g. `git archive HEAD | tar -x
-C DIR`: the code before a change, run with this virtualenv), then with this checkout, and prints both.
`--quick`: 30 s of markers (60) instead of 120 s (240). Target (issue 19): p99 <= 1 s to both stores
at 300 events/s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import pct, say
from infra.processes import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "freshness.json"
HERE = Path(__file__).resolve().parent.parent
FRESH, LOAD = "fresh.fresh.test", "load.fresh.test"
BATCH = 50


class Stack:
    """`tally up` from the code in `code` (a checkout), in a child process group, and its CLI."""

    def __init__(self, work: Path, code: Path) -> None:
        self.code = code
        ports = {name: free_port() for name in ("COLLECTOR", "API", "ANALYST", "CLICKHOUSE_HTTP")}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_") and k != "PYTHONPATH"}
        self.env.update({f"TALLY_{name}_PORT": str(port) for name, port in ports.items()})
        self.env.update(TALLY_HOME=str(work / "home"), PYTHONPATH=str(code), TALLY_API_RATE_LIMIT="1000000/minute",
                        TALLY_SITE_RATE_PER_S="1000000", TALLY_SITE_BURST="1000000", TALLY_SITE_ADDRESS_SHARE="1")
        self.log = open(work / "up.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "up"], env=self.env, cwd=code,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.api = f"http://127.0.0.1:{ports['API']}"
        self.collector = f"http://127.0.0.1:{ports['COLLECTOR']}"

    def wait_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tally up exited with {self.proc.returncode}; see {self.log.name}")
            if "tally is up" in Path(self.log.name).read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"tally up was not up after {timeout:.0f}s; see {self.log.name}")

    def cli_json(self, *args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "tally.cli", *args, "--json"], env=self.env, cwd=self.code,
                             capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def post(url: str, events: list[dict]) -> bool:
    req = urllib.request.Request(url, json.dumps(events).encode(), {"Content-Type": "application/json"})
    for _ in range(20):
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                if 200 <= resp.status < 300:
                    return True
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.25)
    return False


def get_json(url: str, token: str, body: dict | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=10) as resp:
        return json.loads(resp.read())


class Run:
    """One measurement against one stack: load, markers, the two pollers."""

    def __init__(self, stack: Stack, keys: dict[str, str], customer: str, analyst: str, rate: float) -> None:
        self.stack, self.keys, self.customer, self.analyst, self.rate = stack, keys, customer, analyst, rate
        self.stop = threading.Event()
        self.acked_at: list[float] = []
        self.seen: dict[str, dict[int, float]] = {"pg": {}, "ch": {}}
        self.load_events = 0
        self.load_s = 0.0  # how long the load ran
        self.errors: list[str] = []

    def load(self) -> None:
        url, period, i = f"{self.stack.collector}/collect?site={self.keys[LOAD]}", BATCH / self.rate, 0
        started = next_at = time.monotonic()
        while not self.stop.is_set():
            self.load_s = time.monotonic() - started
            ts = int(time.time() * 1000)
            events = [{"domain": LOAD, "url": f"https://{LOAD}/p{j % 7}", "id": f"L{i}-{j}", "ts": ts,
                       "type": "impression"} for j in range(BATCH)]
            if post(url, events):
                self.load_events += BATCH
            i += 1
            next_at += period
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def pg_count(self) -> int:
        url = f"{self.stack.api}/api/v1/domains/{FRESH}/impressions?granularity=15m"
        return int(get_json(url, self.customer).get("total", 0))

    def ch_count(self) -> int:
        body = {"sql": f"SELECT count() FROM tally.events WHERE domain = '{FRESH}'"}
        return int(get_json(f"{self.stack.api}/api/v1/sql", self.analyst, body)["rows"][0][0])

    def poll(self, kind: str, count) -> None:
        seen, deadline = self.seen[kind], None
        while True:
            if self.stop.is_set():
                deadline = deadline or time.monotonic() + 30
                if len(seen) >= len(self.acked_at) or time.monotonic() > deadline:
                    return
            try:
                n = count()
            except Exception as exc:
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:200])
                time.sleep(0.1)
                continue
            now = time.time()
            for k in range(1, n + 1):
                seen.setdefault(k, now)
            time.sleep(0.02)

    def measure(self, markers: int, warmup_s: float = 5.0) -> dict:
        threads = [threading.Thread(target=self.load, daemon=True)]
        threads[0].start()
        time.sleep(warmup_s)
        pollers = [threading.Thread(target=self.poll, args=(kind, fn), daemon=True)
                   for kind, fn in (("pg", self.pg_count), ("ch", self.ch_count))]
        for t in pollers:
            t.start()
        url = f"{self.stack.collector}/collect?site={self.keys[FRESH]}"
        for k in range(markers):
            t0 = time.monotonic()
            event = {"domain": FRESH, "url": f"https://{FRESH}/m", "id": f"M{k}", "ts": int(time.time() * 1000),
                     "type": "impression"}
            if post(url, [event]):
                self.acked_at.append(time.time())
            time.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))
        self.stop.set()
        for t in [*threads, *pollers]:
            t.join(60)
        return self.summary()

    def summary(self) -> dict:
        out: dict[str, object] = {"rate": self.rate, "markers": len(self.acked_at), "load_events": self.load_events,
                                  "load_rate": round(self.load_events / self.load_s, 1) if self.load_s else 0.0,
                                  "errors": len(self.errors), "first_errors": self.errors[:3]}
        for kind in ("pg", "ch"):
            lat = [(self.seen[kind].get(k + 1, float("inf")) - sent) * 1000 for k, sent in enumerate(self.acked_at)]
            out[kind] = {q: round(pct(lat, p), 1) for q, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}
            out[kind]["unseen"] = sum(1 for x in lat if x == float("inf"))
        return out


def measure(code: Path, rate: float, markers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tally-fresh-") as tmp:
        stack = Stack(Path(tmp), code)
        try:
            stack.wait_up()
            keys = {d: stack.cli_json("sites", "add", d)["site_key"] for d in (FRESH, LOAD)}
            customer = stack.cli_json("tokens", "create", "--role", "customer", "--domain", FRESH)["token"]
            analyst = stack.cli_json("tokens", "create", "--role", "analyst")["token"]
            time.sleep(4)  # the collector's registry refresh
            return {"code": str(code), **Run(stack, keys, customer, analyst, rate).measure(markers)}
        finally:
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 s of markers instead of 120 s")
    parser.add_argument("--rate", type=float, default=300.0, help="steady load, events/s (default 300)")
    parser.add_argument("--compare", type=Path, help="a checkout of the code before: measured first, then this one")
    args = parser.parse_args(argv)
    markers = 60 if args.quick else 240
    runs = []
    for code in ([args.compare.resolve()] if args.compare else []) + [HERE]:
        say(f"[freshness] {code}: {args.rate:g} events/s, {markers} markers")
        runs.append(measure(code, args.rate, markers))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(runs, indent=2))
    print(f"\n{'code':<28} {'load/s':>6} {'PostgreSQL p50/p95/p99/max ms':>32} {'ClickHouse p50/p95/p99/max ms':>32}"
          f" {'unseen':>7} {'errors':>6}")
    for r in runs:
        pg, ch = r["pg"], r["ch"]
        cells = [" / ".join(f"{d[q]:.0f}" for q in ("p50", "p95", "p99", "max")) for d in (pg, ch)]
        print(f"{str(r['code'])[-28:]:<28} {r['load_rate']:>6.0f} {cells[0]:>32} {cells[1]:>32} "
              f"{pg['unseen'] + ch['unseen']:>7} {r['errors']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
