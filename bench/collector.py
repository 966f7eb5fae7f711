"""The collector against a bare Flask endpoint under the same server, measured in one run.

Run: `python -m bench.collector [--quick]` (needs `wrk` on PATH: `make bench` installs it).

FLOOR: `bench.apps:bare_app` (a Flask POST endpoint that reads the body and answers 202,
no project code) under granian with the same worker count as the collector.
STAGE: `tally collector` (granian, TALLY_COLLECTOR_WORKERS=2), exactly what ships: site key
check against the registry (embedded PostgreSQL), validation, stamping, the spool with group
commit (one write + fdatasync per group of concurrent requests) before every 202.
LOAD: wrk, a separate process written in C (2 threads, 64 connections); its own CPU time is
reported, since it shares the machine's 2 cores with the server under test.
Rows: 1 event per request (req/s and p99) and 50 events per request (events/s and p99).
Targets (issue 7): 1 event/request >= 0.8 of the floor with p99 <= 20 ms; 50 events/request
>= 150,000 events/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import orjson

from bench.common import HIT, RESULTS_DIR, SECRET, UA, say
from infra.processes import free_port, spawn, stop, tcp_open, wait_until

CONNECTIONS, THREADS, WORKERS = 64, 2, 2
WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["User-Agent"] = "%s"
wrk.body = [==[%s]==]
"""


def wrk(url: str, body: bytes, seconds: int, script: Path) -> dict[str, float]:
    """Run wrk; return req/s, p50/p99 in ms, its CPU seconds. Raises if >1% of answers are not 2xx."""
    script.write_text(WRK_LUA % (UA, body.decode()))
    argv = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    total = int(re.search(r"(\d+) requests in", out.stdout).group(1))
    bad = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)) else 0
    if total == 0 or bad > total * 0.01:
        raise RuntimeError(f"{bad} of {total} responses were not 2xx:\n{out.stdout}")

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out.stdout, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1)), "p50_ms": ms("50%"),
            "p99_ms": ms("99%"), "requests": total,
            "wrk_cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1)}


@contextmanager
def http_server(argv: list[str], port: int, env: dict[str, str], log_path: Path) -> Iterator[str]:
    proc = spawn(argv, log_path, env=env)
    try:
        wait_until(lambda: tcp_open("127.0.0.1", port), what=" ".join(argv[:3]), timeout=60,
                   log_path=log_path, proc=proc)
        yield f"http://127.0.0.1:{port}/collect"
    finally:
        stop(proc, timeout=20)


def check_post(url: str, body: bytes) -> None:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": UA})
    with urllib.request.urlopen(req, timeout=10) as resp:
        if resp.status != 202:
            raise RuntimeError(f"POST {url} answered {resp.status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collector", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s runs instead of 15 s")
    args = parser.parse_args(argv)
    seconds = 5 if args.quick else 15
    one = orjson.dumps(HIT)
    fifty = orjson.dumps([{**HIT, "url": f"{HIT['url']}/{i}"} for i in range(50)])
    rows: dict[str, dict[str, float]] = {}
    with ExitStack() as cleanup:
        from infra.postgres import EmbeddedPostgres
        from oltp import sites
        from oltp.schema import ensure_schema

        work = Path(tempfile.mkdtemp(prefix="tally-bench-collector-"))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        say("[collector] starting PostgreSQL and registering the bench site ...")
        postgres = EmbeddedPostgres(work / "pg" / "data", durable=True)
        cleanup.callback(postgres.stop)
        postgres.start()
        ensure_schema(postgres.dsn)
        site = sites.add(postgres.dsn, HIT["domain"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                          env.get("PYTHONPATH")]))
        granian = shutil.which("granian", path=str(Path(sys.executable).parent)) or "granian"

        port = free_port()
        bare = [granian, "--interface", "wsgi", "--workers", str(WORKERS), "--host", "127.0.0.1", "--port",
                str(port), "--no-access-log", "bench.apps:bare_app"]
        with http_server(bare, port, env, work / "bare.log") as url:
            check_post(url, one)
            wrk(url, one, 1, work / "warm.lua")
            say("[collector] bare Flask / granian ...")
            rows["bare, 1 ev/req"] = wrk(url, one, seconds, work / "one.lua")
            rows["bare, 50 ev/req"] = wrk(url, fifty, seconds, work / "fifty.lua")

        port = free_port()
        spool = work / "spool"
        cenv = {**env, "TALLY_HOME": str(work / "home"), "TALLY_SPOOL_DIR": str(spool), "TALLY_SECRET": SECRET,
                "TALLY_PG_DSN": postgres.dsn, "TALLY_COLLECTOR_PORT": str(port),
                "TALLY_COLLECTOR_WORKERS": str(WORKERS), "TALLY_SITE_RATE_PER_S": "10000000",
                "TALLY_SITE_BURST": "100000000"}
        with http_server([sys.executable, "-m", "tally.cli", "collector"], port, cenv, work / "collector.log") as url:
            url = f"{url}?site={site.site_key}"
            deadline = time.monotonic() + 30
            while True:  # the workers load the registry as they start
                try:
                    check_post(url, one)
                    break
                except Exception:  # noqa: BLE001
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            wrk(url, one, 1, work / "warm.lua")
            say("[collector] tally collector ...")
            rows["collector, 1 ev/req"] = wrk(url, one, seconds, work / "one.lua")
            rows["collector, 50 ev/req"] = wrk(url, fifty, seconds, work / "fifty.lua")
        lines = sum(p.read_bytes().count(b"\n") for p in spool.glob("*.*") if p.is_file())

    ratio1 = rows["collector, 1 ev/req"]["rps"] / rows["bare, 1 ev/req"]["rps"]
    ratio50 = rows["collector, 50 ev/req"]["rps"] / rows["bare, 50 ev/req"]["rps"]
    print(f"\n{'row':<22} {'req/s':>9} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'wrk CPU s':>10}")
    for name, r in rows.items():
        per = 50 if "50 ev" in name else 1
        print(f"{name:<22} {r['rps']:>9,.0f} {r['rps'] * per:>10,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['wrk_cpu_s']:>10}")
    print(f"\nratio to the bare endpoint: 1 ev/req {ratio1:.2f}, 50 ev/req {ratio50:.2f}; "
          f"{rows['collector, 50 ev/req']['rps'] * 50:,.0f} events/s batched; {lines:,} lines spooled "
          f"({CONNECTIONS} connections, {WORKERS} granian workers each, {seconds} s runs)")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "collector.json").write_text(json.dumps({"rows": rows, "ratio_1": ratio1, "ratio_50": ratio50},
                                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
