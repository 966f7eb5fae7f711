"""Analyst query speed on realistic volume (issue 18, section 4; ADR 54).

Run: `python -m bench.analyst [--quick] [--n N] [--runs 5] [--keep DIR]`. It makes a chDB database in a
temporary directory with the schema as `tally loader-worker` migrates it (olap/schema.py), writes the events
DIRECTLY (one server-side INSERT ... SELECT FROM numbers() per chunk, not through the collector), lets the
background merges end, and times each of the design's questions (olap/questions.py, the queries the docs show)
through the analyst SQL path: `olap.analyst.prepare` then `stream` as json with the limits of a default
configuration (TALLY_SQL_MAX_THREADS, memory, rows, `final = 1`), i.e. what an analyst gets.

Data (10 M events; --quick 1 M): 2,000 domains over 300 accounts (tally.sites), 90 days written in time order
in chunks of 200,000 events (as the loader writes live traffic; 5% late by up to two days),
domains and pages (1,000 per domain) drawn with Zipf weights (rank r about 1/r), 20 countries and 6 browsers
with fixed skewed weights (5% without a country, 4% unrecognised agents), 70% impressions, a value on 10%.
After the background merges end, the months before the current one are merged into one part each, as ClickHouse
migration 5 has them merged 8 days after they end (ADR 54; skipped on a table without that migration).

Per question: cold = each run after `SYSTEM DROP MARK/UNCOMPRESSED/QUERY CACHE` (the OS page cache stays: chDB
cannot drop it), warm = runs after one untimed run; p50 and p95 of `--runs` each. Target: p50 warm <= 1 s.
Results also go to bench/results/analyst.json. Figures swing with the machine's load: see `uptime`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from bench.common import RESULTS_DIR, Bench, Result, print_table, say

DOMAINS, ACCOUNTS, DAYS, PAGES = 2000, 300, 90, 1000
TARGET_MS = 1000.0
# (code, weight): the share of events from each country; None = no country (a private or unknown address)
COUNTRIES = (("US", 28), ("DE", 10), ("GB", 8), ("IN", 8), ("FR", 6), ("BR", 5), ("JP", 5), ("CA", 4), ("NL", 3),
             ("ES", 3), ("IT", 3), ("PL", 2), ("AU", 2), ("SE", 2), ("MX", 2), ("KR", 1), ("CH", 1), ("ZA", 1),
             ("NG", 1), ("AR", 1), (None, 5))
# (browser, os, device, weight); None = an agent the classifier does not recognise
BROWSERS = (("Chrome", "Windows", "desktop", 35), ("Chrome", "Android", "mobile", 25),
            ("Mobile Safari", "iOS", "mobile", 18), ("Firefox", "Linux", "desktop", 7),
            ("Edge", "Windows", "desktop", 6), ("Safari", "Mac OS X", "desktop", 5), (None, None, None, 4))


def _weighted(pairs: list[tuple[str, int]], draw: str) -> str:
    """A ClickHouse expression picking one of `pairs`' SQL expressions by weight with the uniform `draw` in [0, 1)."""
    total = sum(w for _, w in pairs)
    bounds, acc = [], 0
    for _, w in pairs:
        acc += w
        bounds.append(f"{acc / total:.6f}")
    values = ", ".join(v for v, _ in pairs)
    return f"[{values}][arrayFirstIndex(b -> {draw} < b, [{', '.join(bounds)}])]"


def _lit(value: str | None) -> str:
    return "NULL" if value is None else f"'{value}'"


def _insert_sql(db: str, first: int, count: int, n: int, now_s: int) -> str:
    """INSERT ... SELECT of `count` events numbered from `first` of `n` (deterministic: numbers seed every draw).

    Times follow the numbers, as the loader writes them (live traffic in arrival order): event i of n is at
    i/n of the 90 days, less up to 10 minutes, or for 5% (late events) up to two days."""
    u = lambda k: f"(sipHash64(number, {k}) % 1000000007) / 1000000007"  # noqa: E731  a uniform draw per row
    country = _weighted([(_lit(c), w) for c, w in COUNTRIES], u(3))
    agent = _weighted([(f"tuple({_lit(b)}, {_lit(o)}, {_lit(d)})", w) for b, o, d, w in BROWSERS], u(4))
    return f"""
    INSERT INTO {db}.events (hash, domain, url, ts, received_at, type, value, referrer, user_agent, browser, os,
                             device, country, visitor, page, source, utm_medium, utm_campaign)
    SELECT lower(hex(sipHash128(number, 'bench'))) AS hash,
           concat('d', leftPad(toString(toUInt32(floor(exp({u(1)} * log({DOMAINS + 1})))) - 1), 4, '0'),
                  '.bench.test') AS domain,
           concat('https://', domain, page) AS url,
           toDateTime64({now_s} - {DAYS * 86400} * (1 - number / {n})
                         - if({u(11)} < 0.05, 172800, 600) * {u(2)}, 3, 'UTC') AS ts,
           ts AS received_at,
           if({u(5)} < 0.7, 'impression', 'pageview') AS type,
           if({u(6)} < 0.1, toDecimal64(round(0.01 + 500 * pow({u(7)}, 3), 2), 6), NULL) AS value,
           if({u(8)} < 0.5, NULL, 'https://www.google.com/') AS referrer,
           'Mozilla/5.0 (bench)' AS user_agent,
           agent.1 AS browser, agent.2 AS os, agent.3 AS device,
           {country} AS country,
           lower(hex(sipHash64(domain, toDate(ts), toUInt32(floor(exp({u(9)} * log(50001))))))) AS visitor,
           if(p = 0, '/', concat('/p/', toString(p))) AS page,
           if(referrer IS NULL, NULL, 'google') AS source, NULL AS utm_medium, NULL AS utm_campaign
    FROM (SELECT number, toUInt32(floor(exp({u(10)} * log({PAGES + 1})))) - 1 AS p, {agent} AS agent
          FROM numbers({first}, {count}))
    SETTINGS max_insert_threads = 2"""


def _dimensions(client, db: str) -> None:
    """tally.sites rows for the bench's domains (2,000 over 300 accounts, a few large); countries come
    with the schema (ClickHouse migration 3)."""
    client.command(f"""
        INSERT INTO {db}.sites (domain, account, tz, registered_at)
        SELECT concat('d', leftPad(toString(number), 4, '0'), '.bench.test'),
               concat('Account ', toString(toUInt32(floor(exp((sipHash64(number, 11) % 1000003) / 1000003
                                                                * log({ACCOUNTS + 1})))) - 1)),
               'UTC', now64(3) - INTERVAL 400 DAY
        FROM numbers({DOMAINS})""")


def load(client, db: str, n: int) -> float:
    """Write `n` events in chunks of 200,000 (about 2 days at 10 M), then wait for the merges; seconds taken."""
    t0, now_s = time.monotonic(), int(time.time())
    chunk = 200_000
    for first in range(0, n, chunk):
        client.command(_insert_sql(db, first, min(chunk, n - first), n, now_s))
        if (first + chunk) % 1_000_000 == 0 or first + chunk >= n:
            say(f"[bench] {min(first + chunk, n):,} / {n:,} events written")
    _dimensions(client, db)
    settle(client)
    merged = merge_closed_months(client, db)
    say(f"[bench] merged closed months as migration 5 leaves them: {', '.join(merged) or 'none (no migration 5)'}")
    return time.monotonic() - t0


def merge_closed_months(client, db: str) -> list[str]:
    """What ClickHouse migration 5 makes of a month's partition 8 days after it ends (ADR 54: one part), done now
    with OPTIMIZE, since the bench cannot wait; only where the table has that migration's setting. The partitions
    merged (the current month stays as written)."""
    engine = str(client.command(f"SELECT engine_full FROM system.tables WHERE database = '{db}' AND name = 'events'"))
    if "min_age_to_force_merge_seconds" not in engine:
        return []
    current = datetime.now(UTC).strftime("%Y%m")
    closed = [str(r[0]) for r in client.query(
        f"SELECT DISTINCT partition_id FROM system.parts WHERE database = '{db}' AND table = 'events' AND active "
        f"AND partition_id < '{current}' ORDER BY 1").result_rows]
    for partition in closed:
        client.command(f"OPTIMIZE TABLE {db}.events PARTITION ID '{partition}' FINAL")
    return closed


def settle(client, limit_s: float = 600) -> None:
    """Until chDB's background merges end (a table that has had time to merge, as a live one has)."""
    deadline = time.monotonic() + limit_s
    while int(client.command("SELECT count() FROM system.merges")) and time.monotonic() < deadline:
        time.sleep(0.5)


def parts(client, db: str) -> str:
    rows = client.query(f"SELECT partition, count() FROM system.parts WHERE database = '{db}' AND table = 'events' "
                        "AND active GROUP BY partition ORDER BY partition").result_rows
    return " ".join(f"{p}:{c}" for p, c in rows)


def drop_caches(client) -> None:
    for cache in ("MARK", "UNCOMPRESSED", "QUERY"):
        client.command(f"SYSTEM DROP {cache} CACHE")


def timed(client, sql: str, db: str, limits) -> tuple[float, int]:
    """One question as the analyst server runs it (prepare, then stream as json): (ms, rows)."""
    from olap.analyst import QueryStats, prepare, stream

    t0 = time.perf_counter()
    stats = QueryStats()
    text = prepare(client, sql, db)
    for _ in stream(client, text, limits, "json", stats):
        pass
    return (time.perf_counter() - t0) * 1000, stats.rows


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(b: Bench, client, db: str, runs: int) -> dict[str, dict[str, object]]:
    from core.config import Settings
    from olap.analyst import SqlLimits
    from olap.questions import QUESTIONS, sql_for

    s = Settings.from_env({})
    limits = SqlLimits(s.sql_max_execution_s, s.sql_max_memory_bytes, s.sql_max_result_rows, s.sql_max_result_bytes,
                       s.sql_max_threads)
    figures: dict[str, dict[str, object]] = {}
    for q in QUESTIONS:
        sql = sql_for(q, db)
        cold = []
        for _ in range(runs):
            drop_caches(client)
            cold.append(timed(client, sql, db, limits)[0])
        timed(client, sql, db, limits)
        warm, rows = [], 0
        for _ in range(runs):
            ms, rows = timed(client, sql, db, limits)
            warm.append(ms)
        figures[q.name] = {"cold_ms": cold, "warm_ms": warm, "rows": rows}
        p50 = statistics.median(warm)
        verdict = "ok" if p50 <= TARGET_MS else "OVER TARGET"
        b.results.append(Result(f"{q.name} warm p50", p50, "ms", note=f"p95 {pct(warm, 95):,.0f} ms; {rows} rows; "
                                f"target <= {TARGET_MS:,.0f} ms: {verdict}"))
        b.results.append(Result(f"{q.name} cold p50", statistics.median(cold), "ms",
                                note=f"p95 {pct(cold, 95):,.0f} ms"))
        say(f"  {q.name}: warm p50 {p50:,.0f} ms, cold p50 {statistics.median(cold):,.0f} ms")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analyst", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 M events instead of 10 M")
    parser.add_argument("--n", type=int, default=None, help="events to write (default 10,000,000; --quick 1,000,000)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per question, cold and warm")
    parser.add_argument("--keep", type=Path, default=None,
                        help="chDB directory to use and keep (a second run with the same one reuses its events)")
    args = parser.parse_args(argv)
    n = args.n or (1_000_000 if args.quick else 10_000_000)
    started, t0 = datetime.now(UTC), time.monotonic()
    b = Bench(args.quick)
    with tempfile.TemporaryDirectory(prefix="tally-bench-analyst-") as tmp:
        from olap.client import connect
        from olap.schema import ensure_schema

        client = connect(f"chdb://{args.keep or Path(tmp) / 'chdb'}")
        db = "tally"
        ensure_schema(client, db)
        have = int(client.command(f"SELECT count() FROM {db}.events"))
        if have != n:
            client.command(f"TRUNCATE TABLE {db}.events")
            client.command(f"TRUNCATE TABLE {db}.sites")
            b.add("load (INSERT ... SELECT, merges)", load(client, db, n), "s")
        say(f"[bench] parts per partition: {parts(client, db)}; load average {os.getloadavg()[0]:.2f}")
        figures = measure(b, client, db, args.runs)
    print_table(b.results)
    report = {"mode": "quick" if args.quick else "full", "events": n,
              "started_at": started.isoformat(timespec="seconds"), "wall_s": round(time.monotonic() - t0, 1),
              "load_average": os.getloadavg(), "figures": figures, "results": [asdict(r) for r in b.results]}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "analyst.json").write_text(json.dumps(report, indent=2) + "\n")
    over = [r.name for r in b.results if r.name.endswith("warm p50") and (r.value or 0) > TARGET_MS]
    say(f"[bench] done in {report['wall_s']}s; over the target: {', '.join(over) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
