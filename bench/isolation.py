"""Does a slow analyst query slow anything else? (security issue, section 4)

Run: `python -m bench.isolation [--quick]` (about 2 minutes with --quick, 4 without).

It starts `tally up` on a fresh TALLY_HOME in its own process group (the process
under test) with room for 4 slow analyst queries plus one freshness probe, then
measures two phases of the same length from THIS process:

- idle:   no analyst load;
- loaded: 4 analyst queries, each CPU-bound until the analyst time limit cuts it
          (TALLY_SQL_MAX_EXECUTION_S = the phase length: 30 s, 10 s with --quick).

In both phases three probes run side by side at a fixed pace:
- customer API: GET /api/v1/domains/<d>/impressions?granularity=1h (last 24 h), 20/s;
- /healthz of the API, 20/s;
- loader freshness: one event with a unique id sent to the collector every 0.5 s,
  then polled with analyst SQL until ClickHouse shows it; freshness = visible - acknowledged.

Targets (issue 6): customer API and health p99 <= 50 ms and unchanged by the analyst
load; loader freshness p99 <= 5 s. Results also go to bench/results/isolation.json.
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
import uuid
from pathlib import Path

from bench.common import pct, say
from infra.processes import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "isolation.json"
DOMAIN = "iso.bench.test"
SLOW_SQL = "SELECT count() FROM numbers(100000000000000) WHERE sipHash64(number) % 7 = 3"


class Stack:
    """`tally up` in a child process group, and the CLI against the same TALLY_HOME."""

    def __init__(self, work: Path, phase_s: int) -> None:
        self.home = work / "home"
        self.collector_port, self.api_port, self.analyst_port = free_port(), free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        self.env.update(TALLY_HOME=str(self.home), TALLY_COLLECTOR_PORT=str(self.collector_port),
                        TALLY_API_PORT=str(self.api_port), TALLY_ANALYST_PORT=str(self.analyst_port),
                        TALLY_CLICKHOUSE_HTTP_PORT=str(free_port()),
                        TALLY_SQL_MAX_CONCURRENT="5", TALLY_SQL_MAX_EXECUTION_S=str(phase_s),
                        TALLY_API_RATE_LIMIT="100000/minute")
        self.log = open(work / "up.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "up"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.collector = f"http://127.0.0.1:{self.collector_port}"

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tally up exited with {self.proc.returncode}; see {self.log.name}")
            if "tally is up" in Path(self.log.name).read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"tally up was not up after {timeout:.0f}s; see {self.log.name}")

    def cli_json(self, *args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "tally.cli", *args, "--json"], env=self.env,
                             capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def timed_get(url: str, token: str | None) -> float:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status}")
    return (time.perf_counter() - t0) * 1000.0


def paced(fn, per_s: float, stop: threading.Event, out: list[float], errors: list[str]) -> None:
    period, next_at = 1.0 / per_s, time.monotonic()
    while not stop.is_set():
        try:
            out.append(fn())
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
        next_at += period
        stop.wait(max(0.0, next_at - time.monotonic()))


def sql(stack: Stack, token: str, query: str) -> tuple[int, dict]:
    req = urllib.request.Request(stack.api + "/api/v1/sql", data=json.dumps({"sql": query}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def freshness_probe(stack: Stack, site_key: str, token: str, stop: threading.Event, out: list[float],
                    errors: list[str]) -> None:
    while not stop.is_set():
        ident = uuid.uuid4().hex
        event = {"domain": DOMAIN, "url": f"https://{DOMAIN}/{ident}", "type": "impression", "id": ident,
                 "ts": int(time.time() * 1000)}
        req = urllib.request.Request(f"{stack.collector}/collect?site={site_key}", data=json.dumps(event).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
            acked = time.monotonic()
            while True:
                status, body = sql(stack, token, f"SELECT count() FROM tally.events WHERE url = "
                                                 f"'https://{DOMAIN}/{ident}'")
                if status == 200 and body["rows"] == [[1]]:
                    out.append((time.monotonic() - acked) * 1000.0)
                    break
                if status != 200:
                    errors.append(f"probe query {status}: {body}"[:200])
                if time.monotonic() - acked > 60:
                    errors.append("an event was not visible after 60 s")
                    break
                time.sleep(0.1)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
        stop.wait(0.5)


def phase(stack: Stack, name: str, seconds: int, customer: str, analyst: str, site_key: str,
          slow_queries: int) -> dict:
    say(f"[isolation] phase {name}: {seconds}s, {slow_queries} slow analyst queries")
    stop = threading.Event()
    api_ms: list[float] = []
    health_ms: list[float] = []
    fresh_ms: list[float] = []
    errors: list[str] = []
    series = f"{stack.api}/api/v1/domains/{DOMAIN}/impressions?granularity=1h"
    slow_results: list[tuple[int, str]] = []

    def slow() -> None:
        status, body = sql(stack, analyst, SLOW_SQL)
        slow_results.append((status, (body.get("error") or {}).get("code", "ok")))

    slow_threads = [threading.Thread(target=slow) for _ in range(slow_queries)]
    for t in slow_threads:
        t.start()
    time.sleep(1.0 if slow_queries else 0)  # let them get going
    probes = [
        threading.Thread(target=paced, args=(lambda: timed_get(series, customer), 20, stop, api_ms, errors)),
        threading.Thread(target=paced, args=(lambda: timed_get(stack.api + "/healthz", None), 20, stop, health_ms,
                                             errors)),
        threading.Thread(target=freshness_probe, args=(stack, site_key, analyst, stop, fresh_ms, errors)),
    ]
    t_cpu0 = os.times()
    for t in probes:
        t.start()
    time.sleep(seconds - (1.0 if slow_queries else 0) - 1.0)
    stop.set()
    for t in probes:
        t.join(90)
    for t in slow_threads:
        t.join(120)
    t_cpu1 = os.times()
    return {
        "phase": name, "slow_queries": slow_queries, "slow_query_results": slow_results,
        "customer_api_ms": {"n": len(api_ms), "p50": pct(api_ms, 50), "p99": pct(api_ms, 99)},
        "healthz_ms": {"n": len(health_ms), "p50": pct(health_ms, 50), "p99": pct(health_ms, 99)},
        "freshness_ms": {"n": len(fresh_ms), "p50": pct(fresh_ms, 50), "p99": pct(fresh_ms, 99),
                         "max": max(fresh_ms, default=float("nan"))},
        "errors": errors[:10], "error_count": len(errors),
        "load_generator_cpu_s": round((t_cpu1.user - t_cpu0.user) + (t_cpu1.system - t_cpu0.system), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s phases instead of 30 s")
    args = parser.parse_args(argv)
    seconds = 10 if args.quick else 30
    with tempfile.TemporaryDirectory(prefix="tally-iso-") as tmp:
        stack = Stack(Path(tmp), seconds)
        try:
            stack.wait_up()
            site = stack.cli_json("sites", "add", DOMAIN)
            customer = stack.cli_json("tokens", "create", "--role", "customer", "--domain", DOMAIN)["token"]
            analyst = stack.cli_json("tokens", "create", "--role", "analyst")["token"]
            time.sleep(3)  # the collector's registry refresh
            phases = [phase(stack, "idle", seconds, customer, analyst, site["site_key"], 0),
                      phase(stack, "loaded", seconds, customer, analyst, site["site_key"], 4)]
        finally:
            stack.stop()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(phases, indent=2))
    print(f"\n{'phase':<8} {'customer API p50/p99 ms':>24} {'/healthz p50/p99 ms':>22} "
          f"{'freshness p50/p99 ms':>22} {'errors':>7}  slow queries")
    for p in phases:
        c, h, f = p["customer_api_ms"], p["healthz_ms"], p["freshness_ms"]
        print(f"{p['phase']:<8} {c['p50']:>11.1f} / {c['p99']:<10.1f} {h['p50']:>9.1f} / {h['p99']:<10.1f} "
              f"{f['p50']:>9.0f} / {f['p99']:<10.0f} {p['error_count']:>7}  "
              f"{', '.join(f'{s} {c}' for s, c in p['slow_query_results']) or '-'}")
    idle, loaded = phases
    api_ratio = loaded['customer_api_ms']['p99'] / idle['customer_api_ms']['p99']
    print(f"\nratio loaded/idle p99: customer API {api_ratio:.2f}, "
          f"/healthz {loaded['healthz_ms']['p99'] / idle['healthz_ms']['p99']:.2f}; "
          f"load generator CPU: {idle['load_generator_cpu_s']} s idle, {loaded['load_generator_cpu_s']} s loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
