"""Micro-benchmark of the collector's per-event work: `python -m bench.event_validation [--rounds N]`.

What the admission pipeline (collector/admission.py) + the spool do per event, in-process:
`event_from_hit` (validation, normalisation, hash, visitor key, user-agent fields) and
`Event.to_json()` (the spooled bytes), with a fresh `HitContext` per request as the collector builds
one. Bodies of 1 and 50 events, two shapes:
the bench's hit (`bench.common.HIT`: domain, url, type) and the tag's (id, epoch-ms ts, url,
referrer, value). Prints microseconds per event for `core/event.py` as committed (git HEAD, loaded
as a separate module) and as in the work tree, each the best of alternating runs. Never part of
the tests; figures depend on the machine's other load.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.common import HIT, UA
from collector.ua import classify_user_agent

ROOT = Path(__file__).resolve().parent.parent


def load_module(name: str, path: Path) -> ModuleType:
    """Import the file at `path` as module `name` (not registered under `core.event`)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # msgspec / dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def head_event_module(tmp: Path, rev: str = "HEAD") -> ModuleType:
    """`core/event.py` as of `rev`, loaded from a copy in `tmp`."""
    text = subprocess.run(["git", "show", f"{rev}:core/event.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = tmp / "event_head.py"
    path.write_text(text)
    return load_module("bench_event_head", path)


def bodies(n: int) -> dict[str, list[dict[str, Any]]]:
    now_ms = int(time.time() * 1000)
    bench = [{**HIT, "url": f"{HIT['url']}/{i}"} for i in range(n)]
    tag = [{"id": uuid.uuid4().hex, "ts": now_ms - 1000 + i, "domain": HIT["domain"],
            "url": f"{HIT['url']}/{i}?q={i}", "type": "pageview" if i % 5 else "impression",
            "referrer": "https://www.example.org/search?q=x", "value": 1.5 * (i % 3)} for i in range(n)]
    return {"bench hit": bench, "tag hit": tag}


def runner(module: ModuleType, body: list[dict[str, Any]], rounds: int) -> Callable[[], float]:
    """A run of `rounds` requests of `body`: us per event for validation + encoding."""
    limits, key = module.Limits(), module.mac_key("bench-secret-" * 3)
    event_from_hit, context = module.event_from_hit, module.HitContext

    def run() -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            ctx = context(received_at=datetime.now(UTC), user_agent=UA, client_ip="203.0.113.7")
            for item in body:
                event_from_hit(item, ctx, limits, key, classify_user_agent).to_json()
        return (time.perf_counter() - start) / (rounds * len(body)) * 1e6

    return run


def best_of_alternating(runs: list[Callable[[], float]], repeats: int) -> list[float]:
    """Each run's best time over `repeats` rounds that alternate them (the machine's load is shared)."""
    for run in runs:
        run()  # warm the caches every version has
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            best[i] = min(best[i], run())
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="requests per run for 1-event bodies "
                        "(50-event bodies: rounds / 50, at least 20)")
    parser.add_argument("--repeats", type=int, default=7, help="alternating runs; the best of each is shown")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old = head_event_module(Path(tmp))
        new = load_module("bench_event_tree", ROOT / "core" / "event.py")
        print(f"{'body':<22} {'HEAD us/event':>14} {'tree us/event':>14} {'ratio':>6}")
        for n in (1, 50):
            rounds = args.rounds if n == 1 else max(20, args.rounds // 50)
            for shape, body in bodies(n).items():
                before, after = best_of_alternating([runner(old, body, rounds), runner(new, body, rounds)],
                                                    args.repeats)
                print(f"{shape + f', {n} ev':<22} {before:>14.2f} {after:>14.2f} {after / before:>6.2f}")


if __name__ == "__main__":
    main()
