"""What a shared site rate budget in PostgreSQL would cost per collector request, against the in-memory limiter
(ADR 60: why each collector host enforces a share instead).

Run: `python -m bench.site_budget [--quick]`. Starts its own embedded PostgreSQL (non-durable, then durable) in
a temporary directory; times `SiteLimiter.hit` in process, `SELECT 1`, and the budget statement a shared
counter needs (one row per site: `UPDATE ... RETURNING` of the window's count), from one client and from four
clients on one site's row (four collector workers). Prints p50 / p99 in microseconds, and the updates/s the
four reached in all (a ceiling on one site's requests across every host).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from collector.site_limits import SiteLimiter
from infra.postgres import EmbeddedPostgres

BUDGET = ("UPDATE budget SET used = CASE WHEN win = %(w)s THEN used + 50 ELSE 50 END, win = %(w)s "
          "WHERE domain = 'a.example' RETURNING used")


def us(p: tuple[float, ...]) -> str:
    return f"p50 {p[0]:.1f} us, p99 {p[1]:.1f} us"


def timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(p50, p99) of `n` calls of `fn`, in microseconds."""
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
    xs.sort()
    return statistics.median(xs) * 1e6, xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e6


def _budget(conn: psycopg.Connection) -> object:
    return conn.execute(BUDGET, {"w": int(time.time())}).fetchone()


def _four_clients(dsn: str, n: int) -> tuple[float, float, float]:
    results: list[tuple[float, float]] = []

    def client() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            results.append(timed(lambda: _budget(conn), n))

    threads = [threading.Thread(target=client) for _ in range(4)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (statistics.median(r[0] for r in results), max(r[1] for r in results),
            4 * n / (time.perf_counter() - start))


def postgres(durable: bool, n: int) -> None:
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="site-budget-")) / "data", durable=durable)
    pg.start()
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE budget (domain text PRIMARY KEY, win bigint, used bigint)")
            conn.execute("INSERT INTO budget VALUES ('a.example', 0, 0)")
            print(f"durable={durable}: SELECT 1 {us(timed(lambda: conn.execute('SELECT 1').fetchone(), n))}")
            print(f"durable={durable}: budget UPDATE, one client: {us(timed(lambda: _budget(conn), n))}")
        four = _four_clients(pg.dsn, n // 2)
        print(f"durable={durable}: budget UPDATE, four clients on one row: {us(four)}, {four[2]:.0f} updates/s in all")
    finally:
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a few seconds)")
    n = 500 if parser.parse_args().quick else 3000
    limiter = SiteLimiter(1e7, 10**8, workers=2, hosts=2, address_share=0.1)
    print(f"in-memory SiteLimiter.hit: {us(timed(lambda: limiter.hit({'a.example': 50}, {}, '10.0.0.1'), n * 10))}")
    for durable in (False, True):
        postgres(durable, n)


if __name__ == "__main__":
    main()
