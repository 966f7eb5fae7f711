"""Capacity and soak (issue 19 §2): the sustained rate this machine holds end to end, then a long run at half.

Run: `python -m bench.soak [--minutes N] [--rate R] [--quick] [--find-capacity-only] [--out DIR]` (`make soak`).

It starts its own `tally up` (fresh TALLY_HOME, free ports, per-site limits lifted; `--tree DIR` runs the stack
from another checkout, e.g. `git archive` of an older commit, for a before/after with the same bench), then:

- phase 1, capacity: steady load in batches of 50 events (`--generators` processes sharing `--connections`
  kept-alive connections) at a rate that doubles while a step holds and is then bisected; a step (2 minutes; 20 s with
  --quick) holds when the collector accepted >= 95 % of the rate, failed < 0.1 % of requests, freshness p99
  < 5 s to both stores, and each consumer group's lag ended within 5 s of the rate. Between steps the load
  stops until the step's markers are visible and the lag is back to 0.
- phase 2, soak: N minutes (default 30; 2 with --quick) at half the capacity (or at `--rate`).

Throughout, beside the load: a marker event every 0.5 s polled through the customer API (PostgreSQL) and
analyst SQL (ClickHouse) for freshness; the customer API at 5 requests/s (series, summary, breakdown) for its
latency; the API's and collectors' /metrics for lag (records) and records shipped; /proc for the RSS and CPU
of every process of the stack; disk use of the spool, of each PostgreSQL table (by tier) and of ClickHouse. At
the end, with the load stopped and drained, every domain's acknowledged events against both stores: 0 lost,
0 double.

Writes bench/results/soak.md, soak.json and soak.png (or under --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import soak_report as rep
from bench.soak_load import Fleet
from bench.soak_probes import MARK, Http, Record, ch_counts, pg_count, since_iso, start_probes
from bench.soak_stack import Stack, cpu_busy_s, tree_cpu_s

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOMAINS = [f"s{i:02d}.soak.test" for i in range(16)]
SETTLED_LAG = 5  # records per group: the markers (one every 0.5 s) keep flowing while the load is stopped


def say(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("TALLY_") or not name[6:].replace("_", "").isalnum() or not name.isupper():
        raise argparse.ArgumentTypeError(f"{text!r}: expected TALLY_NAME=VALUE")
    return name, value


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=None, help="soak length (default 30; 2 with --quick)")
    p.add_argument("--rate", type=float, default=None, help="soak at this many events/s; skips the capacity search")
    p.add_argument("--quick", action="store_true", help="20 s capacity steps, a coarse search, a 2-minute soak")
    p.add_argument("--find-capacity-only", action="store_true", help="phase 1 only")
    p.add_argument("--start-rate", type=float, default=None, help="first step's rate (default 4000 events/s)")
    p.add_argument("--generators", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument("--connections", type=int, default=64,
                   help="kept-alive connections in all (default 64, as bench.collector's wrk): each sends its next "
                        "batch after the previous answer, so rate <= connections x 50 / collector latency")
    p.add_argument("--poll-s", type=float, default=0.1,
                   help="how often each store is asked for the markers (default 0.1 s: the freshness resolution)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where soak.md, soak.json, soak.png go")
    p.add_argument("--tree", type=Path, default=ROOT, help="source tree the stack runs from (default this one)")
    p.add_argument("--up-args", default="", help="extra arguments for `tally up`, e.g. '--hosts 2'")
    p.add_argument("--set", action="append", default=[], metavar="TALLY_NAME=VALUE", type=_setting,
                   help="a setting for the stack (repeatable), e.g. TALLY_BROKER_RECYCLE_RECORDS=2000; the shell's "
                        "own TALLY_* variables are never passed on")
    args = p.parse_args(argv)
    if args.minutes is None:
        args.minutes = 2.0 if args.quick else 30.0
    if args.rate is not None and args.find_capacity_only:
        p.error("--rate and --find-capacity-only exclude each other")
    return args


def register(stack: Stack) -> tuple[dict[str, str], str]:
    """Register the load domains and the marker domain (in parallel: one CLI process each)."""
    def add(domain: str) -> tuple[str, str]:
        out = stack.cli_json("sites", "add", domain, "--rate", "10000000", "--burst", "100000000")
        return domain, out["site_key"]

    with ThreadPoolExecutor(4) as pool:
        keys = dict(pool.map(add, [*DOMAINS, MARK]))
    mark = keys.pop(MARK)
    return keys, mark


def pump(rec: Record, fleet: Fleet, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        got = fleet.take()
        with rec.lock:
            rec.load += [(t - rec.t0, tally) for t, tally in got]


def settle(rec: Record, end: float, timeout: float, grace: float = 20.0) -> float:
    """Wait (load stopped) until every marker acknowledged by `end` is visible in both stores and a status
    sample taken after that shows (almost) no lag (or, when the lag cannot be read, `grace` seconds more);
    seconds from `end` until the markers were visible."""
    deadline = time.monotonic() + timeout
    seen_at = None
    while time.monotonic() < deadline:
        with rec.lock:
            n = sum(1 for t in rec.acked_at if t <= end)
            visible = all(k in rec.seen[s] for s in ("pg", "ch") for k in range(1, n + 1))
            last = rec.status[-1] if rec.status else None
        if visible and seen_at is None:
            seen_at = rec.now()
        if seen_at is not None and last and last[0] > seen_at and max(last[1].values(), default=0) <= SETTLED_LAG:
            break
        if seen_at is not None and rec.now() - seen_at > grace:
            break
        time.sleep(0.5)
    return (seen_at if seen_at is not None else rec.now()) - end


def run_step(rec: Record, fleet: Fleet, rate: float, seconds: float) -> tuple[rep.Step, float]:
    a = rec.now()
    fleet.set_rate(rate)
    time.sleep(seconds)
    b = rec.now()
    fleet.set_rate(0)
    drain = settle(rec, b, timeout=90 if seconds < 60 else 300)  # the next step starts from an empty pipeline
    with rec.lock:
        load = rep.load_summary(rec.load, a, b + 1.0)  # reports come once a second
        step = rep.Step(rate, b - a, int(load["accepted"]), int(load["requests"]), int(load["errors"]),
                        [ms for t, r in rec.load if a < t <= b + 1.0 for ms in r.latencies],
                        rep.markers_between(rec.acked_at, rec.seen, a, b),
                        rep.lag_in_events(rec.status, rec.load, a, b))
    return step, drain


def warm_up(rec: Record, fleet: Fleet, rate: float, seconds: float) -> None:
    """Load that no step counts: connections, caches, the first partitions and parts."""
    say(f"warm-up: {rate:,.0f} events/s for {seconds:.0f} s")
    fleet.set_rate(rate)
    time.sleep(seconds)
    fleet.set_rate(0)
    settle(rec, rec.now(), timeout=60)


def find_capacity(rec: Record, fleet: Fleet, args: argparse.Namespace) -> list[dict[str, Any]]:
    seconds = 20.0 if args.quick else 120.0
    start = args.start_rate or 4000.0
    precision, bisections = (1.3, 1) if args.quick else (1.15, 3)
    tried: list[tuple[float, bool]] = []
    steps = []
    most = 5 if args.quick else 12
    while len(tried) < most and (rate := rep.next_rate(tried, start, precision=precision,
                                                       max_bisections=bisections)) is not None:
        say(f"capacity step {len(tried) + 1}: {rate:,.0f} events/s for {seconds:.0f} s")
        step, drain = run_step(rec, fleet, rate, seconds)
        ok, why = rep.step_verdict(step)
        tried.append((rate, ok))
        steps.append(step_row(step, ok, why, drain))
        say(f"  {'holds' if ok else 'fails'}: accepted {step.accepted_per_s():,.0f}/s, freshness p99 "
            f"pg {steps[-1]['fresh_pg_p99_ms']:,.0f} / ch {steps[-1]['fresh_ch_p99_ms']:,.0f} ms, drain {drain:.1f} s"
            + (f" ({'; '.join(why)})" if why else ""))
    return steps


def step_row(step: rep.Step, ok: bool, why: list[str], drain: float) -> dict[str, Any]:
    pg, ch = rep.freshness(step.markers, "pg"), rep.freshness(step.markers, "ch")
    return {"rate": step.rate, "seconds": round(step.seconds, 1), "accepted_per_s": step.accepted_per_s(),
            "collector_p50_ms": rep.pct(step.latencies_ms, 50), "collector_p99_ms": rep.pct(step.latencies_ms, 99),
            "fresh_pg_p50_ms": pg["p50"], "fresh_pg_p99_ms": pg["p99"], "fresh_ch_p50_ms": ch["p50"],
            "fresh_ch_p99_ms": ch["p99"], "markers": pg["n"], "errors": step.errors, "requests": step.requests,
            "lag_end_events": {g: (v[-1] if v else None) for g, v in step.lag_events.items()},
            "drain_s": drain, "holds": ok, "why": why}


def run_soak(rec: Record, fleet: Fleet, stack: Stack, rate: float, minutes: float) -> tuple[float, float, float]:
    """The soak phase: (start, end, drain seconds)."""
    say(f"soak: {rate:,.0f} events/s for {minutes:g} min")
    a = rec.now()
    fleet.set_rate(rate)
    deadline = time.monotonic() + minutes * 60
    while time.monotonic() < deadline:
        if stack.proc.poll() is not None:
            raise RuntimeError(f"tally up exited during the soak; see {stack.log_path}")
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
    b = rec.now()
    fleet.set_rate(0)
    return a, b, settle(rec, b, timeout=180)


def final_counts(stack: Stack, acked: dict[str, int], timeout: float = 180) -> tuple[dict[str, int], dict[str, int]]:
    """Each store's events per load domain once they stopped changing (or equal what was acknowledged)."""
    api = Http(stack.api, stack.token)
    since, last, stable = since_iso(-3), None, 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pg = {d: pg_count(api, d, since) for d in DOMAINS}
        ch = ch_counts(api, DOMAINS)
        if (pg == acked and ch == acked) or stable >= 3:
            return pg, ch
        stable = stable + 1 if (pg, ch) == last else 0
        last = (pg, ch)
        time.sleep(5)
    return last or ({}, {})


def totals(rec: Record, field: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, tally in rec.load:
        for d, n in getattr(tally, field).items():
            out[d] = out.get(d, 0) + n
    return out


def machine() -> dict[str, Any]:
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"cores": os.cpu_count(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
            "commit": rev.stdout.strip() or None, "busy_s_start": cpu_busy_s(), "wall_start": time.time()}


def phase_summary(rec: Record, name: str, a: float, b: float, drain: float, rate: float | None,
                  quick: bool) -> dict[str, Any]:
    """Everything the report shows of one phase [a, b] (times since the run started)."""
    width = 15.0 if quick else 60.0
    warmup = min(300.0, (b - a) / 3)
    with rec.lock:
        markers = rep.markers_between(rec.acked_at, rec.seen, a, b)
        ok_api = [(t - a, ms) for t, ms, status, e in rec.api if a <= t <= b and status == 200 and e != "floor"]
        floor = [(t - a, ms) for t, ms, status, e in rec.api if a <= t <= b and status == 200 and e == "floor"]
        return {"phase": name, "rate": rate, "start_s": a, "seconds": b - a, "drain_s": drain, "window_s": width,
                "warmup_s": warmup, "load": rep.load_summary(rec.load, a, b + 1.0),
                "load_series": rep.load_series(rec.load, a, b, width),
                "freshness": {s: rep.freshness(markers, s) for s in ("pg", "ch")},
                "freshness_series": rep.freshness_series(markers, a, width),
                "api": rep.api_summary(rec.api, a, b), "api_series": rep.windows(ok_api, width),
                "floor_series": rep.windows(floor, width),
                "poll_ms": {s: rep.pct([ms for t, ms in rec.polls[s] if a <= t <= b], 99) for s in ("pg", "ch")},
                "rss": rep.rss_table(rec.rss, a, b, warmup), "rss_private": rep.rss_table(rec.private, a, b, warmup),
                "cpu": rep.cpu_per_event(rec.cpu, rec.load, a, b),
                "cpu_series": rep.cpu_series(rec.cpu, rec.load, a, b, 5 * width),
                "disk": rep.disk_summary(rec.disk, rec.load, a, b + drain + 30)}


def run_phases(rec: Record, fleet: Fleet, stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    from bench.soak_probes import disk_sample

    out: dict[str, Any] = {"steps": [], "capacity": None, "soak": None}
    a = rec.now()
    disk_sample(rec, stack)
    if args.rate is None:
        warm_up(rec, fleet, (args.start_rate or 4000.0) / 2, 10.0 if args.quick else 30.0)
        out["steps"] = find_capacity(rec, fleet, args)
        out["capacity"] = rep.capacity([(s["rate"], s["holds"]) for s in out["steps"]])
        say(f"capacity: {out['capacity'] or 0:,.0f} events/s")
    rate = args.rate if args.rate is not None else (out["capacity"] or 0) / 2
    if args.find_capacity_only or not rate:
        disk_sample(rec, stack)
        out["soak"] = phase_summary(rec, "capacity search", a, rec.now(), 0.0, None, args.quick)
        return out
    disk_sample(rec, stack)
    s_a, s_b, drain = run_soak(rec, fleet, stack, rate, args.minutes)
    disk_sample(rec, stack)
    out["soak"] = phase_summary(rec, "soak", s_a, s_b, drain, rate, args.quick)
    return out


def run(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> None:
    stack = Stack(work, args.tree.resolve(), args.up_args.split(), dict(args.set))
    stop, fleet = threading.Event(), None
    try:
        stack.wait_up()
        sites, mark_key = register(stack)
        say(f"tally up: collectors {' '.join(stack.collectors)}, API {stack.api} (home {stack.home}); "
            f"{len(sites)} load domains registered")
        time.sleep(3)  # the collector's copy of the sites registry
        rec = Record()
        procs = max(args.generators, len(stack.collectors))
        fleet = Fleet(stack.collectors, sites, procs, threads=max(1, args.connections // procs))
        pumper = threading.Thread(target=pump, args=(rec, fleet, stop), daemon=True)
        pumper.start()
        start_probes(rec, stack, mark_key, DOMAINS[0], args.quick, stop, args.poll_s)
        time.sleep(3)
        report.update(run_phases(rec, fleet, stack, args))
        report["stack_cpu_s"] = tree_cpu_s(stack.proc.pid)
        report["machine"]["generators_cpu_s"] = fleet.cpu_s()
        stop.set()
        pumper.join(5)
        rec.load += [(t - rec.t0, tally) for t, tally in fleet.close()]
        fleet = None
        report["machine"]["children_cpu_s"] = children_cpu_s()  # generators and CLI calls; `tally up` not reaped yet
        acked, maybe = totals(rec, "acked"), totals(rec, "maybe")
        say("final counts: waiting for both stores")
        pg, ch = final_counts(stack, acked)
        report["verdict"] = rep.verdict(acked, maybe, pg, ch)
        report["probe_errors"] = rec.errors[:50]
    finally:
        stop.set()
        if fleet is not None:
            fleet.close()
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    # SIGTERM ends the run as Ctrl-C does: the stack is stopped and the load processes end with it (the default
    # action killed this process alone and left them sending to a dead stack, skewing whatever ran next)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    given = argv if argv is not None else sys.argv[1:]
    report: dict[str, Any] = {"command": " ".join(["python -m bench.soak", *given]),
                              "quick": args.quick, "machine": machine(), "tree": str(args.tree)}
    work = Path(tempfile.mkdtemp(prefix="tally-soak-"))
    try:
        run(args, work, report)
    except BaseException:
        say(f"failed; the stack's home and up.log are kept in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    finish_machine(report["machine"], report.get("stack_cpu_s"))
    write(report, args.out, "soak-quick" if args.quick else "soak")
    ok = rep.verdict_ok(report.get("verdict", []))
    return 0 if ok else 1


def _exit_on_sigterm(*_: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short (the stack's stop)
    sys.exit(143)


def children_cpu_s() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def finish_machine(info: dict[str, Any], stack_cpu_s: float | None) -> None:
    """How loaded the machine was: its busy share over the run, and how much of that was not this bench."""
    wall = time.time() - info["wall_start"]
    busy = cpu_busy_s() - info["busy_s_start"]
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = info.get("children_cpu_s", 0.0)  # taken before `tally up` was stopped (and its CPU reaped into ours)
    bench_s = own.ru_utime + own.ru_stime + kids
    info.update(wall_s=wall, busy_share=busy / (wall * (info["cores"] or 1)), bench_cpu_s=bench_s,
                cli_cpu_s=max(0.0, kids - info.get("generators_cpu_s", 0.0)),
                bench_self_cpu_s=own.ru_utime + own.ru_stime, bench_children_cpu_s=kids,
                stack_cpu_s=stack_cpu_s, loadavg_end=Path("/proc/loadavg").read_text().split()[:3],
                others_cpu_s=max(0.0, busy - bench_s - (stack_cpu_s or 0.0)))


def write(report: dict[str, Any], out: Path, stem: str) -> None:
    from bench.soak_chart import draw
    from bench.soak_markdown import render

    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    try:
        draw(report, png)
    except Exception as exc:  # a chart that cannot be drawn must not lose the figures
        say(f"chart not drawn: {type(exc).__name__}: {exc}")
    (out / f"{stem}.json").write_text(json.dumps(_finite(report), indent=1, default=str))
    (out / f"{stem}.md").write_text(render(report, png.name))
    say(f"wrote {out / (stem + '.md')}, {stem}.json, {stem}.png")
    print(render(report, png.name))


def _finite(value: Any) -> Any:
    """The report with NaN and infinity as null (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
