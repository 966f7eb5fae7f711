"""The collector against a bare Flask endpoint under the same server, measured in one run.

Run: `python -m bench.collector [--quick]` (needs `wrk` on PATH: `make bench` installs it).

FLOOR: `bench.apps:bare_app` (a Flask POST endpoint that reads the body and answers 202,
no project code) under granian with the same worker count as the collector.
STAGE: `tally collector` (granian, TALLY_COLLECTOR_WORKERS=2; the "collector" rows with
TALLY_COLLECTOR_INTERFACE=wsgi, the "rsgi" rows of `--rsgi` with the default, rsgi), exactly what ships: site key
check against the registry (embedded PostgreSQL), validation, stamping, the spool with group
commit (one write + fdatasync per group of concurrent requests) before every 202.
LOAD: wrk, a separate process written in C (2 threads, 64 connections); its own CPU time is
reported, since it shares the machine's 2 cores with the server under test, and so is the CPU
the server's processes (granian master and workers) used per request, and the CPU that other
processes on the machine took during the row (on a shared machine: how noisy the row was).
DISK: a write + fdatasync loop in the spool's directory, run before and after the collector rows:
a collector that must fdatasync before its 202 cannot beat what the disk gives (with every one of
the 64 connections waiting in one group commit per worker, at most 64 / fdatasync-latency req/s).
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


def fdatasync_latency(directory: Path, seconds: float = 2.0) -> dict[str, float]:
    """p50 / p99 ms of one 200-byte append + fdatasync in `directory` (as one event's spool write)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fdatasync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lat: list[float] = []
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            os.write(fd, b"x" * 199 + b"\n")
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    lat.sort()
    return {"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3, "n": len(lat)}


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` and its direct children (granian workers)."""
    def cpu(p: str) -> tuple[int, float]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid, seconds = cpu(entry)
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            if int(entry) == pid or ppid == pid:
                total += seconds
    return total


@contextmanager
def http_server(argv: list[str], port: int, env: dict[str, str], log_path: Path) -> Iterator[tuple[str, int]]:
    """The server's /collect URL and its pid, while it runs."""
    proc = spawn(argv, log_path, env=env)
    try:
        wait_until(lambda: tcp_open("127.0.0.1", port), what=" ".join(argv[:3]), timeout=60,
                   log_path=log_path, proc=proc)
        yield f"http://127.0.0.1:{port}/collect", proc.pid
    finally:
        stop(proc, timeout=20)


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy so far (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, url: str, body: bytes, seconds: int, script: Path) -> dict[str, float]:
    """wrk's figures plus the server's CPU microseconds per request, and the CPU seconds that other
    processes (neither the server nor wrk) took meanwhile: on a shared machine, the noise."""
    before, busy = tree_cpu_s(pid), machine_busy_s()
    row = wrk(url, body, seconds, script)
    server_s = tree_cpu_s(pid) - before
    row["server_cpu_us"] = round(server_s / row["requests"] * 1e6, 1)
    row["others_cpu_s"] = round(max(0.0, machine_busy_s() - busy - server_s - row["wrk_cpu_s"]), 1)
    return row


def check_post(url: str, body: bytes) -> None:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": UA})
    with urllib.request.urlopen(req, timeout=10) as resp:
        if resp.status != 202:
            raise RuntimeError(f"POST {url} answered {resp.status}")


def wait_accepting(url: str, body: bytes, timeout: float = 30.0) -> None:
    """Until the collector at `url` answers 202 (its workers load the registry as they start)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_post(url, body)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.collector", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s runs instead of 15 s")
    parser.add_argument("--rsgi", action="store_true",
                        help="also measure `tally collector` as it ships by default: granian's RSGI interface "
                             "(async /collect); the plain rows are its WSGI interface")
    parser.add_argument("--pairs", type=int, default=0, metavar="N",
                        help="with --rsgi: then N alternating 5 s runs of the bare endpoint and the RSGI collector "
                             "(1 ev/req), both servers up, for ratios less skewed by other load on the machine")
    parser.add_argument("--serve-rsgi", action="store_true", help=argparse.SUPPRESS)  # the --rsgi rows' server
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.serve_rsgi:
        return serve_rsgi()
    seconds = 5 if args.quick else 15
    one = orjson.dumps(HIT)
    fifty = orjson.dumps([{**HIT, "url": f"{HIT['url']}/{i}"} for i in range(50)])
    rows: dict[str, dict[str, float]] = {}
    pairs: dict[str, list[dict[str, float]]] = {}  # --pairs: alternating bare / RSGI runs, 1 ev/req
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
        site_key = sites.add(postgres.dsn, HIT["domain"]).site_key
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                          env.get("PYTHONPATH")]))
        granian = shutil.which("granian", path=str(Path(sys.executable).parent)) or "granian"
        bare = [granian, "--interface", "wsgi", "--workers", str(WORKERS), "--host", "127.0.0.1", "--port",
                str(free_port()), "--no-access-log", "bench.apps:bare_app"]
        spool = work / "spool"
        cenv = {**env, "TALLY_HOME": str(work / "home"), "TALLY_SPOOL_DIR": str(spool), "TALLY_SECRET": SECRET,
                "TALLY_PG_DSN": postgres.dsn, "TALLY_COLLECTOR_WORKERS": str(WORKERS),
                "TALLY_SITE_RATE_PER_S": "10000000", "TALLY_SITE_BURST": "100000000"}
        # `tally collector` as it ships, in each interface (TALLY_COLLECTOR_INTERFACE; rsgi is the default).
        rsgi_argv = ([sys.executable, "-m", "bench.collector", "--serve-rsgi"]
                     if os.environ.get("BENCH_GRANIAN_OPTIONS") else [sys.executable, "-m", "tally.cli", "collector"])
        rows.update(_bare_rows(bare, env, work, one, fifty, seconds))
        say("[collector] fdatasync latency in the spool directory ...")
        disk = {"before": fdatasync_latency(spool)}
        servers = [("collector", "wsgi", [sys.executable, "-m", "tally.cli", "collector"])]
        if args.rsgi:
            servers.append(("rsgi", "rsgi", rsgi_argv))
        for name, interface, server_argv in servers:
            rows.update(_collector_rows(name, server_argv, {**cenv, "TALLY_COLLECTOR_INTERFACE": interface}, work,
                                        site_key, one, fifty, seconds))
        if args.rsgi and args.pairs:
            pairs = _pairs(args.pairs, bare, env, rsgi_argv, cenv, work, site_key, one)
        lines = sum(p.read_bytes().count(b"\n") for p in spool.glob("*.*") if p.is_file())
        disk["after"] = fdatasync_latency(spool)
    _report(rows, disk, pairs, lines, seconds, rsgi=args.rsgi)
    return 0


def _bare_rows(bare: list[str], env: dict[str, str], work: Path, one: bytes, fifty: bytes,
               seconds: int) -> dict[str, dict[str, float]]:
    """The floor: the bare Flask endpoint under granian, 1 and 50 events per request."""
    port = int(bare[bare.index("--port") + 1])
    with http_server(bare, port, env, work / "bare.log") as (url, pid):
        check_post(url, one)
        wrk(url, one, 1, work / "warm.lua")
        say("[collector] bare Flask / granian ...")
        return {"bare, 1 ev/req": measured(pid, url, one, seconds, work / "one.lua"),
                "bare, 50 ev/req": measured(pid, url, fifty, seconds, work / "fifty.lua")}


def _collector_rows(name: str, argv: list[str], env: dict[str, str], work: Path, site_key: str, one: bytes,
                    fifty: bytes, seconds: int) -> dict[str, dict[str, float]]:
    """`tally collector` (as `argv` starts it, in `env`'s interface), 1 and 50 events per request."""
    port = free_port()
    with http_server(argv, port, {**env, "TALLY_COLLECTOR_PORT": str(port)}, work / f"{name}.log") as (url, pid):
        url = f"{url}?site={site_key}"
        wait_accepting(url, one)
        wrk(url, one, 1, work / "warm.lua")
        say(f"[collector] tally collector ({name}) ...")
        return {f"{name}, 1 ev/req": measured(pid, url, one, seconds, work / "one.lua"),
                f"{name}, 50 ev/req": measured(pid, url, fifty, seconds, work / "fifty.lua")}


def _pairs(count: int, bare: list[str], env: dict[str, str], rsgi_argv: list[str], cenv: dict[str, str],
           work: Path, site_key: str, one: bytes) -> dict[str, list[dict[str, float]]]:
    """`count` alternating 5 s runs of the bare endpoint and the RSGI collector (1 ev/req), both servers up."""
    say(f"[collector] bare and RSGI, {count} alternating pairs of 5 s runs ...")
    bare_port, rsgi_port = free_port(), free_port()
    bare = [*bare]
    bare[bare.index("--port") + 1] = str(bare_port)
    pairs: dict[str, list[dict[str, float]]] = {}
    rsgi_env = {**cenv, "TALLY_COLLECTOR_PORT": str(rsgi_port), "TALLY_COLLECTOR_INTERFACE": "rsgi"}
    with http_server(bare, bare_port, env, work / "bare-paired.log") as (bare_url, bare_pid), \
            http_server(rsgi_argv, rsgi_port, rsgi_env, work / "rsgi-paired.log") as (rsgi_url, rsgi_pid):
        rsgi_url = f"{rsgi_url}?site={site_key}"
        wait_accepting(rsgi_url, one)
        check_post(bare_url, one)
        wrk(bare_url, one, 1, work / "warm.lua")
        wrk(rsgi_url, one, 1, work / "warm.lua")
        order = [("bare", bare_url, bare_pid), ("rsgi", rsgi_url, rsgi_pid)]
        for i in range(count):
            for name, url, pid in (order if i % 2 == 0 else order[::-1]):
                pairs.setdefault(name, []).append(measured(pid, url, one, 5, work / "one.lua"))
    return pairs


def _report(rows: dict[str, dict[str, float]], disk: dict[str, dict[str, float]],
            pairs: dict[str, list[dict[str, float]]], lines: int, seconds: int, *, rsgi: bool) -> None:
    """Print the table and the ratios; write bench/results/collector.json."""
    ratio1 = rows["collector, 1 ev/req"]["rps"] / rows["bare, 1 ev/req"]["rps"]
    ratio50 = rows["collector, 50 ev/req"]["rps"] / rows["bare, 50 ev/req"]["rps"]
    print(f"\n{'row':<22} {'req/s':>9} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'wrk CPU s':>10} "
          f"{'server CPU us/req':>18} {'others CPU s':>13}")
    for name, r in rows.items():
        per = 50 if "50 ev" in name else 1
        print(f"{name:<22} {r['rps']:>9,.0f} {r['rps'] * per:>10,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['wrk_cpu_s']:>10} {r['server_cpu_us']:>18,.0f} {r['others_cpu_s']:>13}")
    for when, d in disk.items():
        print(f"fdatasync {when} the collector rows: p50 {d['p50_ms']:.3f} ms, p99 {d['p99_ms']:.3f} ms "
              f"(at most {CONNECTIONS / (d['p50_ms'] / 1e3):,.0f} req/s with all {CONNECTIONS} connections "
              "in one group commit per flush)")
    print(f"\nratio to the bare endpoint: 1 ev/req {ratio1:.2f}, 50 ev/req {ratio50:.2f}; "
          f"{rows['collector, 50 ev/req']['rps'] * 50:,.0f} events/s batched; {lines:,} lines spooled "
          f"({CONNECTIONS} connections, {WORKERS} granian workers each, {seconds} s runs)")
    if rsgi:
        print(f"RSGI (async /collect): 1 ev/req {rows['rsgi, 1 ev/req']['rps'] / rows['bare, 1 ev/req']['rps']:.2f} "
              f"of the bare endpoint, p99 {rows['rsgi, 1 ev/req']['p99_ms']:.1f} ms; "
              f"{rows['rsgi, 50 ev/req']['rps'] * 50:,.0f} events/s batched")
    if pairs:
        paired = list(zip(pairs["bare"], pairs["rsgi"], strict=True))
        ratios = sorted(r["rps"] / b["rps"] for b, r in paired)
        print("RSGI / bare, alternating 5 s pairs (1 ev/req): ratios " + ", ".join(f"{x:.2f}" for x in ratios)
              + f"; median {ratios[len(ratios) // 2]:.2f}; RSGI p99 ms "
              + ", ".join(f"{r['p99_ms']:.1f}" for r in pairs["rsgi"]) + "; others CPU s (bare / RSGI) "
              + ", ".join(f"{b['others_cpu_s']}/{r['others_cpu_s']}" for b, r in paired))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "collector.json").write_text(json.dumps({"rows": rows, "ratio_1": ratio1, "ratio_50": ratio50,
                                                            "fdatasync": disk, "pairs": pairs}, indent=2))


def serve_rsgi() -> int:
    """What `tally collector` does (RSGI), plus the Granian arguments in BENCH_GRANIAN_OPTIONS (JSON): the
    --rsgi rows' server when that is set, otherwise they run `tally collector` itself."""
    from collector.server import serve
    from core.config import Settings
    from tally.roots import own_metrics_dir

    settings = Settings.from_env(os.environ)
    own_metrics_dir(settings, os.environ)
    options = json.loads(os.environ.get("BENCH_GRANIAN_OPTIONS", "{}"))  # e.g. {"task_impl": "rust"}
    serve(settings, settings.bind_host, settings.collector_port, settings.collector_workers, interface="rsgi",
          **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
