"""A worker's memory against the size of the backlog it drains (`python -m bench.workers --memory`).

Each drain runs in a fresh child process, built as `tally rollup-worker` / the loader build it
(tally.roots, then the workers' GC policy), so the figure is the worker's own resident memory: not
the bench's heap of events, nor what an earlier drain in the same process left allocated.

Child: `python -m bench.worker_memory rollup|loader N`, settings from the TALLY_* environment; it
drains the topic, requires exactly N events stored and none refused, and prints one JSON line:
peak RSS (VmHWM), RSS after start-up and at the end, and RSS at tenths of the drain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from bench.common import drain_loops, proc_status_kib

SAMPLE_S = 0.25


def _status_mib(key: str) -> float:
    return proc_status_kib(key) / 1024


def drain_and_report(which: str, n: int) -> dict[str, object]:
    """Drain the topic in this process as the worker would; returns the memory figures."""
    from core.config import Settings
    from tally.roots import build_loader_loop, build_rollup_loops
    from workers.gc_policy import tune_for_streaming

    settings = Settings.from_env(dict(os.environ))
    group = f"mem-{which}-{uuid.uuid4().hex[:8]}"
    loops = (build_rollup_loops(settings, group=group) if which == "rollup"
             else [build_loader_loop(settings, group=group)])
    tune_for_streaming()  # as tally.roots.run_loops_forever / the analyst server's loader do
    started_mib = _status_mib("VmRSS")
    samples: list[tuple[int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((sum(lp.stored_events for lp in loops), _status_mib("VmRSS")))
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        drain_loops(loops)
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        end_mib = _status_mib("VmRSS")
        for loop in loops:
            loop.close()
    stored, rejects = sum(lp.stored_events for lp in loops), sum(lp.stored_rejects for lp in loops)
    if stored != n or rejects:
        raise RuntimeError(f"{which}: stored {stored} events and {rejects} rejects, expected {n}")
    tenths = []
    for k in range(1, 11):  # RSS at the first sample that had stored k/10 of the backlog
        tenths.append(round(next((mib for got, mib in samples if got >= n * k / 10), end_mib)))
    return {"which": which, "events": n, "loops": len(loops), "drain_s": round(seconds, 1),
            "started_mib": round(started_mib), "peak_mib": round(_status_mib("VmHWM")), "end_mib": round(end_mib),
            "rss_at_tenths_mib": tenths}


def measure_in_child(which: str, n: int, env: dict[str, str], timeout_s: float = 1200) -> dict[str, object]:
    """Run one drain in a fresh process with `env` (TALLY_* settings); its report, or RuntimeError."""
    root = Path(__file__).resolve().parents[1]
    # Only the bench's settings: a TALLY_* variable of the calling shell would measure another worker.
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")} | env
    out = subprocess.run([sys.executable, "-m", "bench.worker_memory", which, str(n)], check=False, cwd=root,
                         env=child_env, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{which} drain of {n} events failed (exit {out.returncode}): {out.stderr[-1500:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    import logging

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("rollup", "loader") or not args[1].isdigit():
        print("usage: python -m bench.worker_memory rollup|loader N (TALLY_* settings in the environment)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    print(json.dumps(drain_and_report(args[0], int(args[1]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
