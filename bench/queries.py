"""Customer-API query latency at scale (issue 8, section 5).

Run: `python -m bench.queries [--quick]` (a few minutes with --quick on 2 cores). With `--breakdowns`, the
issue-17 routes instead (breakdowns, visitors, filtered series: bench/breakdowns.py, ADR 48).

It starts an embedded PostgreSQL, loads synthetic rollups DIRECTLY into every tier (server-side
INSERT ... SELECT FROM generate_series, no pipeline), then starts `tally api` in its own process
(the process under test) and measures from THIS process, one request at a time over a kept-alive
connection, with customer tokens:

- last hour at 15m (UTC)                       -> served by rollup_15m
- last 7 days at 1h in America/New_York        -> served by rollup_1h
- last 90 days at 1d in Asia/Kathmandu         -> served by rollup_1d (the sites' registered zone)

for random domains of two databases on the same server, 1,000 and 4,000 domains x 90 days (one API
process each), and for one domain with 2 years of history among the 4,000 (1h and 1d tiers; 15m
kept as retention would). The three series are measured side by side, one request each in turn,
so the machine's noise falls on all alike and the ratios mean something. Then a drift check:
thousands of mixed queries in the 4,000-domain API process, then that process and a fresh one side
by side. Every answer's `tier` is checked.

Targets: last hour p99 <= 10 ms; 7-day hourly and 90-day daily p99 <= 20 ms; within 1.5x from 1,000 to
4,000 domains and from 90 days to 2 years of history; no slow-down after the mixed queries.
Results also go to bench/results/queries.json. The figures depend on the machine's load: run it on
a quiet machine before comparing.

Data per domain: hourly and daily rows for 90 days; 15-minute rows for the last 30 days (--quick: 3
days, what "last hour" touches plus a margin: the size per day is what matters for the daily
partitions and their index); both event types (--quick: impressions only, half the load time).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import urllib.parse
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from bench.query_kit import ZONE, Api, create_database, customer_tokens, day_starts, domain_name, pct, say

RESULTS = Path(__file__).resolve().parent / "results" / "queries.json"
LONG_DOMAIN = "long-history.bench.test"
SHAPES = {  # name -> (granularity, tz, span, expected tier, p99 target ms)
    "last hour 15m UTC": ("15m", "UTC", timedelta(hours=1), "15m", 10.0),
    "7 days 1h New York": ("1h", "America/New_York", timedelta(days=7), "1h", 20.0),
    "90 days 1d Kathmandu": ("1d", ZONE, timedelta(days=90), "1d", 20.0),
}


# ---- loading -----------------------------------------------------------------------------------------

def ensure_all_partitions(conn: psycopg.Connection, lo: datetime, hi: datetime) -> None:
    from oltp.partitions import ensure_partitions

    for table in ("rollup_15m", "rollup_1h", "rollup_1d"):
        ensure_partitions(conn, table, lo, hi)


def load_domains(dsn: str, first: int, count: int, now: datetime, days_15m: int, days: int,
                 types: tuple[str, ...] = ("impression", "pageview")) -> float:
    """Sites, tokens' domains and rows in every tier for domains [first, first + count); seconds taken."""
    t0 = time.monotonic()
    names = [domain_name(i) for i in range(first, first + count)]
    hour = now.replace(minute=0, second=0, microsecond=0)
    quarter = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_all_partitions(conn, hour - timedelta(days=days + 2), now + timedelta(days=2))
        with conn.cursor().copy("COPY sites (domain, tz, site_key, secret) FROM STDIN") as copy:
            for i, name in enumerate(names):
                copy.write_row((name, ZONE, f"pk_bench{first + i:020d}", "sk_" + "b" * 40 + f"{first + i:05d}"))
        conn.execute("INSERT INTO rollup_1d_coverage (domain, tz, complete_from)"
                     " SELECT d, %s, '1970-01-01Z' FROM unnest(%s::text[]) d", (ZONE, names))
        for table, step, start, end in (
                ("rollup_15m", "15 minutes", quarter - timedelta(days=days_15m), quarter),
                ("rollup_1h", "1 hour", hour - timedelta(days=days), hour)):
            say(f"[bench] loading {table}: {count} domains x {(end - start).days} days ...")
            conn.execute(f"""
                INSERT INTO {table} (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
                SELECT d, t, g, 1 + abs(hashtext(d) + extract(epoch FROM g)::bigint) %% 5, 1, 0.5, 0.5, 0.5
                FROM unnest(%s::text[]) d CROSS JOIN unnest(%s::text[]) t
                CROSS JOIN generate_series(%s::timestamptz, %s::timestamptz, %s::interval) g""",
                         (names, list(types), start, end, step))
        starts = day_starts(now - timedelta(days=days), now)
        say(f"[bench] loading rollup_1d: {count} domains x {len(starts)} days ...")
        conn.execute("""
            INSERT INTO rollup_1d (domain, tz, event_type, bucket_start,
                                   events, valued, value_sum, value_min, value_max)
            SELECT d, %s, t, g, 96, 1, 0.5, 0.5, 0.5
            FROM unnest(%s::text[]) d CROSS JOIN unnest(%s::text[]) t
            CROSS JOIN unnest(%s::timestamptz[]) g""", (ZONE, names, list(types), starts))
        conn.execute("ANALYZE")
    return time.monotonic() - t0


def load_long_history(dsn: str, now: datetime, days_15m: int) -> None:
    """One more domain with two years of hourly and daily rows (15-minute rows: `days_15m`, as retention keeps)."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    quarter = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_all_partitions(conn, hour - timedelta(days=733), now + timedelta(days=2))
        conn.execute("INSERT INTO sites (domain, tz, site_key, secret) VALUES (%s, %s, %s, %s)",
                     (LONG_DOMAIN, ZONE, "pk_bench_long_history_0000", "sk_" + "c" * 45))
        conn.execute("INSERT INTO rollup_1d_coverage (domain, tz, complete_from) VALUES (%s, %s, '1970-01-01Z')",
                     (LONG_DOMAIN, ZONE))
        for table, step, start, end in (("rollup_15m", "15 minutes", quarter - timedelta(days=days_15m), quarter),
                                        ("rollup_1h", "1 hour", hour - timedelta(days=730), hour)):
            conn.execute(f"""
                INSERT INTO {table} (domain, event_type, bucket_start, events, valued, value_sum, value_min, value_max)
                SELECT %s, t, g, 3, 1, 0.5, 0.5, 0.5
                FROM unnest(ARRAY['impression', 'pageview']) t
                CROSS JOIN generate_series(%s::timestamptz, %s::timestamptz, %s::interval) g""",
                         (LONG_DOMAIN, start, end, step))
        conn.execute("""
            INSERT INTO rollup_1d (domain, tz, event_type, bucket_start,
                                   events, valued, value_sum, value_min, value_max)
            SELECT %s, %s, t, g, 288, 1, 0.5, 0.5, 0.5
            FROM unnest(ARRAY['impression', 'pageview']) t CROSS JOIN unnest(%s::timestamptz[]) g""",
                     (LONG_DOMAIN, ZONE, day_starts(now - timedelta(days=730), now)))
        conn.execute("ANALYZE")


# ---- the API under test --------------------------------------------------------------------------------

def shape_path(domain: str, shape: str, now: datetime) -> str:
    granularity, tz, span, _, _ = SHAPES[shape]
    q = urllib.parse.urlencode({"from": (now - span).isoformat(), "to": now.isoformat(),
                                "granularity": granularity, "tz": tz})
    return f"/api/v1/domains/{domain}/impressions?{q}"


class Target:
    """One series of measurements: an API process and the customer tokens of the domains it asks for."""

    def __init__(self, name: str, api: Api, tokens: dict[str, str]) -> None:
        self.name, self.api, self.tokens = name, api, tokens
        self.domains = sorted(tokens)
        self.times: dict[str, list[float]] = {}

    def ask(self, shape: str, rng: random.Random, record: bool) -> None:
        d = rng.choice(self.domains)
        path = shape_path(d, shape, datetime.now(UTC))
        t0 = time.perf_counter()
        status, body = self.api.get(path, self.tokens[d])
        elapsed = (time.perf_counter() - t0) * 1000
        if status != 200:
            raise RuntimeError(f"{self.name} {shape}: {status} {body[:200]!r}")
        doc = json.loads(body)
        want_tier = SHAPES[shape][3]
        if doc["tier"] != want_tier or doc["total"] <= 0:
            raise RuntimeError(f"{self.name} {shape}: served by {doc['tier']} (want {want_tier}), total {doc['total']}")
        if record:
            self.times.setdefault(shape, []).append(elapsed)

    def summary(self, shape: str) -> dict[str, float]:
        times = self.times[shape]
        return {"p50_ms": round(pct(times, 50), 2), "p99_ms": round(pct(times, 99), 2), "n": len(times)}


def interleaved(targets: list[Target], n: int, rng: random.Random) -> None:
    """For each shape, n rounds; each round asks every target once, in turn, so that the machine's
    noise (other processes, CPU frequency) falls on every target alike and their ratios mean something."""
    for shape in SHAPES:
        for i in range(n + max(20, n // 10)):  # the first rounds warm connections and caches up
            for t in targets:
                t.ask(shape, rng, record=i >= max(20, n // 10))
        for t in targets:
            r = t.summary(shape)
            say(f"  {t.name:<26} {shape:<22} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms")


def mixed(api: Api, tokens: dict[str, str], n: int, rng: random.Random) -> dict[str, int]:
    """n requests mixing shapes, zones, ranges and granularities (every tier, all three routes);
    returns how many each tier served (and how many were refused as outside retention: a long daily
    range in a zone only the 15-minute tier aligns with, for a domain with older history)."""
    served: dict[str, int] = {}
    domains = sorted(tokens)
    zones = ["UTC", "America/New_York", ZONE, "Australia/Lord_Howe", "Europe/Berlin"]
    for i in range(n):
        d = rng.choice(domains)
        now = datetime.now(UTC) - timedelta(minutes=rng.randint(0, 600))
        granularity = rng.choice(["15m", "1h", "1d"])
        span = {"15m": timedelta(hours=rng.randint(1, 24)), "1h": timedelta(days=rng.randint(1, 14)),
                "1d": timedelta(days=rng.randint(7, 90))}[granularity]
        q = urllib.parse.urlencode({"from": (now - span).isoformat(), "to": now.isoformat(),
                                    "granularity": granularity, "tz": rng.choice(zones)})
        metric = rng.choice(["impressions", "pageviews"])
        status, body = api.get(f"/api/v1/domains/{d}/{metric}?{q}", tokens[d])
        doc = json.loads(body)
        if status == 200:
            served[doc["tier"]] = served.get(doc["tier"], 0) + 1
        elif status == 400 and doc["error"]["code"] == "outside_retention":
            served["outside_retention"] = served.get("outside_retention", 0) + 1
        else:
            raise RuntimeError(f"mixed query {i}: {status} {body[:200]!r}")
    return served


# ---- the run -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queries", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer requests (a few minutes)")
    parser.add_argument("--breakdowns", action="store_true",
                        help="measure the issue-17 routes instead: breakdowns, visitors, filters (bench/breakdowns.py)")
    parser.add_argument("--covering", action="store_true",
                        help="with --breakdowns: add the covering indexes proposed in ADR 48 first")
    parser.add_argument("--skewed", action="store_true",
                        help="with --breakdowns: the heavy domains' pages get Zipf-like daily visitors (new people "
                             "each day) instead of the same few every day, the case no visitor bound can prune")
    parser.add_argument("--no-weeks", action="store_true",
                        help="with --breakdowns: leave the closed weeks uncompacted (ADR 61), to compare")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.breakdowns:
        return breakdowns_main(quick, args.covering, not args.no_weeks, args.skewed)
    days_15m = 3 if quick else 30
    n = 300 if quick else 1000
    n_mixed = 3000 if quick else 10000
    rng = random.Random(8)
    now = datetime.now(UTC)
    results: dict[str, object] = {"quick": quick, "started_at": now.isoformat(), "days_15m": days_15m,
                                  "requests_per_shape": n, "mixed_queries": n_mixed}
    with ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="tally-bench-queries-") as tmp:
        from infra.postgres import EmbeddedPostgres
        from oltp.schema import ensure_schema

        work = Path(tmp)
        postgres = EmbeddedPostgres(work / "pg" / "data", durable=False)
        cleanup.callback(postgres.stop)
        postgres.start()
        # Two databases on one server: 1,000 and 4,000 domains, measured side by side.
        dsn_1k, dsn_4k = create_database(postgres.dsn, "bench_1k"), create_database(postgres.dsn, "bench_4k")
        for dsn in (dsn_1k, dsn_4k):
            ensure_schema(dsn)
        types = ("impression",) if quick else ("impression", "pageview")
        results["event_types"] = list(types)
        results["load_1k_s"] = round(load_domains(dsn_1k, 0, 1000, now, days_15m, 90, types), 1)
        results["load_4k_s"] = round(load_domains(dsn_4k, 0, 4000, now, days_15m, 90, types), 1)
        load_long_history(dsn_4k, now, days_15m)
        tokens_1k = customer_tokens(dsn_1k, [domain_name(i) for i in rng.sample(range(1000), 50)])
        tokens_4k = customer_tokens(dsn_4k, [domain_name(i) for i in rng.sample(range(4000), 50)])
        tokens_long = customer_tokens(dsn_4k, [LONG_DOMAIN])

        api_1k, api_4k = Api(work / "api1k", dsn_1k), Api(work / "api4k", dsn_4k)
        for api in (api_1k, api_4k):
            cleanup.callback(api.stop)
            api.wait_ready()
        say("[bench] measuring side by side: 1,000 domains, 4,000 domains, the 2-year domain (among the 4,000)")
        first = [Target("1k domains x 90 days", api_1k, tokens_1k), Target("4k domains x 90 days", api_4k, tokens_4k),
                 Target("2-year domain (4k)", api_4k, tokens_long)]
        interleaved(first, n, rng)
        for key, t in zip(("1k", "4k", "2y"), first, strict=True):
            results[key] = {shape: t.summary(shape) for shape in SHAPES}

        say(f"[bench] drift: {n_mixed} mixed queries in the 4k API process, then side by side with a fresh one")
        t0 = time.monotonic()
        results["mixed_served"] = mixed(api_4k, {**tokens_4k, **tokens_long}, n_mixed, rng)
        results["mixed_s"] = round(time.monotonic() - t0, 1)
        say(f"  served: {results['mixed_served']} in {results['mixed_s']} s")
        fresh = Api(work / "api4k-fresh", dsn_4k)
        cleanup.callback(fresh.stop)
        fresh.wait_ready()
        second = [Target("4k, after the mixed queries", api_4k, tokens_4k),
                  Target("4k, fresh API process", fresh, tokens_4k)]
        interleaved(second, n, rng)
        results["4k_after_mixed"] = {shape: second[0].summary(shape) for shape in SHAPES}
        results["4k_fresh"] = {shape: second[1].summary(shape) for shape in SHAPES}

    ratios = {}
    for shape in SHAPES:
        p = {k: results[k][shape] for k in ("1k", "4k", "2y", "4k_after_mixed", "4k_fresh")}  # type: ignore[index]
        ratios[shape] = {f"{name}_{q}": round(p[top][f"{q}_ms"] / p[bottom][f"{q}_ms"], 2)
                         for name, top, bottom in (("4k_over_1k", "4k", "1k"), ("2y_over_90d", "2y", "4k"),
                                                   ("after_mixed_over_fresh", "4k_after_mixed", "4k_fresh"))
                         for q in ("p99", "p50")}
    results["ratios"] = ratios
    print_table(results)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    say(f"[bench] results in {RESULTS}")
    return 0


def breakdowns_main(quick: bool, covering: bool = False, weeks: bool = True, skewed: bool = False) -> int:
    """`--breakdowns`: bench/breakdowns.py on its own embedded PostgreSQL; results in bench/results/breakdowns.json."""
    from bench import breakdowns
    from infra.postgres import EmbeddedPostgres

    with ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="tally-bench-breakdowns-") as tmp:
        work = Path(tmp)
        postgres = EmbeddedPostgres(work / "pg" / "data", durable=False)
        cleanup.callback(postgres.stop)
        postgres.start()
        results = breakdowns.run(work, postgres.dsn, create_database, quick, covering, weeks, skewed)
    out = RESULTS.parent / ("breakdowns-skewed.json" if skewed else "breakdowns.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    say(f"[bench] results in {out}")
    return 0


def print_table(results: dict) -> None:
    header = f"{'shape':<22} {'series':<16} {'p50 ms':>8} {'p99 ms':>8} {'target p99':>10}"
    print(header)
    print("-" * len(header))
    for shape, (_, _, _, _, target) in SHAPES.items():
        for phase in ("1k", "4k", "2y", "4k_after_mixed", "4k_fresh"):
            r = results[phase][shape]
            flag = "" if r["p99_ms"] <= target else "  over target"
            print(f"{shape:<22} {phase:<16} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {target:10.0f}{flag}")
    print()
    print(f"{'shape':<22} {'4k/1k p50':>9} {'p99':>6} {'2y/90d p50':>10} {'p99':>6} {'mixed/fresh p50':>15} {'p99':>6}"
          "  (target <= 1.5)")
    for shape, r in results["ratios"].items():
        print(f"{shape:<22} {r['4k_over_1k_p50']:9.2f} {r['4k_over_1k_p99']:6.2f} {r['2y_over_90d_p50']:10.2f} "
              f"{r['2y_over_90d_p99']:6.2f} {r['after_mixed_over_fresh_p50']:15.2f} "
              f"{r['after_mixed_over_fresh_p99']:6.2f}")
    print(f"\nloaded 1k domains in {results['load_1k_s']} s, 4k in {results['load_4k_s']} s; "
          f"{results['mixed_queries']} mixed queries in {results['mixed_s']} s, answered by {results['mixed_served']} "
          f"(15-minute rows: {results['days_15m']} days)")


if __name__ == "__main__":
    sys.exit(main())
