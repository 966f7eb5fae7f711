"""Breakdown, visitors and filtered-series latency (issue 17 §3): `python -m bench.queries --breakdowns [--quick]`.

Like bench.queries: an embedded PostgreSQL with two databases (1,000 and 4,000 domains x 90 days), rows put
DIRECTLY into the issue-17 tables (server-side INSERT ... SELECT FROM generate_series; visitor sketches are
real Apache DataSketches HLL sketches, a few templates reused), `tally api` in its own process per database,
and one request at a time over a kept-alive connection with customer tokens, both databases side by side.

Data (sites registered in Asia/Kathmandu, whose days start at hh:15 UTC: the harder case for the tiers):
- HEAVY domains (20 per database; the ones measured): 1,000 pages every day for 90 days (plus 10 sources,
  10 countries, 3 devices, 5 browsers, 5 OS) in rollup_dim_1d and visitors_dim_1d; 100 pages an hour for
  8 days in rollup_dim_1h and rollup_cube_1h; 30 pages a quarter hour for 2 days in rollup_dim_15m; value
  bins in every tier; visitors_1h/1d sketches of ~2,000 visitors a day;
- every other domain: a few values a day (so the tables and their indexes have the size of 1,000 / 4,000
  domains; a full 1,000-page fill for every domain is 90 M rows per table per 1,000 domains, beyond this
  machine's budget: say so when quoting the figures).

Then the closed weeks are compacted (rollup_dim_1w, visitors_dim_1w: ADR 61), as the rollup worker's hourly
background pass would have done; `--no-weeks` leaves them out, to compare. visitors_dim_1d rows carry their `n` as
the sink writes it (ADR 62) and the table is vacuumed (all-visible, as autovacuum leaves closed days). Note the
pages' visitors: the same 3, 12 or 40 people every day (~55 a page over any week, ~25 events a day), so no bound
summed over days can stop the visitors breakdown's search early: it merges MAX_VISITOR_KEYS values (ADR 62).
`--skewed` gives the heavy domains' pages visitors as a real site has them instead: page p ~300 / p^0.8 new people
a day (a few pages take most visitors), so the bound settles the ranking after the first fetch.

Shapes (target p99 <= 20 ms each): breakdown of pages by page views and by visitors over last=7d and
last=90d; visitors series 7 days hourly and 90 days daily, and 90 days daily under a page filter; filtered
series (one filter) 7 days hourly and 90 days daily, and two filters 7 days hourly; the summary of the last 24 h
with visitors and percentiles.
"""

from __future__ import annotations

import random
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench.query_kit import ZONE, Api, customer_tokens, day_starts, domain_name, pct, say

HEAVY = 20
TARGET_MS = 20.0
OTHER_KEYS = {"source": 10, "country": 10, "device": 3, "browser": 5, "os": 5}
TABLES = ("rollup_dim_15m", "rollup_dim_1h", "rollup_dim_1d", "rollup_cube_1h", "value_bins_15m", "value_bins_1h",
          "value_bins_1d", "visitors_1h", "visitors_1d", "visitors_dim_1d", "rollup_15m", "rollup_1h", "rollup_1d")


# Proposed to the owner of migration 0010 (ADR 48): covering indexes, so a domain's rows of a range are read from
# the index alone (index-only scan) instead of one heap page per row (rows of a domain are spread over as many pages
# as there are days, batches and other domains). `--covering` creates them before measuring.
COVERING = (
    "CREATE INDEX IF NOT EXISTS rollup_dim_1d_cover ON rollup_dim_1d (domain, tz, dimension, bucket_start)"
    " INCLUDE (event_type, key, events, value_sum)",
    "CREATE INDEX IF NOT EXISTS rollup_dim_1h_cover ON rollup_dim_1h (domain, dimension, bucket_start)"
    " INCLUDE (event_type, key, events, value_sum)",
    "CREATE INDEX IF NOT EXISTS rollup_dim_15m_cover ON rollup_dim_15m (domain, dimension, bucket_start)"
    " INCLUDE (event_type, key, events, value_sum)",
)


def shapes(now: datetime) -> dict[str, str]:
    """name -> path after /api/v1/domains/<d>/ (the query string included)."""
    def q(**kw: str) -> str:
        return urllib.parse.urlencode(kw)

    week, season = (now - timedelta(days=7)).isoformat(), (now - timedelta(days=90)).isoformat()
    to = now.isoformat()
    return {
        "breakdown pages 7d": "breakdown?" + q(dimension="page", last="7d"),
        "breakdown pages 90d": "breakdown?" + q(dimension="page", last="90d"),
        "breakdown page visitors 7d": "breakdown?" + q(dimension="page", metric="visitors", last="7d"),
        "breakdown page visitors 90d": "breakdown?" + q(dimension="page", metric="visitors", last="90d"),
        "visitors 7d 1h": "visitors?" + q(granularity="1h", **{"from": week, "to": to}),
        "visitors 90d 1d": "visitors?" + q(granularity="1d", tz=ZONE, **{"from": season, "to": to}),
        "visitors filtered 90d 1d": "visitors?" + q(granularity="1d", tz=ZONE, filter="page:/p1",
                                                    **{"from": season, "to": to}),
        "filtered 7d 1h": "pageviews?" + q(granularity="1h", filter="page:/p1", **{"from": week, "to": to}),
        "filtered 90d 1d": "pageviews?" + q(granularity="1d", tz=ZONE, filter="country:C1",
                                            **{"from": season, "to": to}),
        "two filters 7d 1h": "pageviews?" + q(granularity="1h", filter="page:/p1,country:C1",
                                              **{"from": week, "to": to}),
        "summary 24h visitors p": "summary?" + q(last="24h", percentiles="50,95,99"),
    }


# ---- loading -----------------------------------------------------------------------------------------

def _sketch(n: int, lg_k: int, seed: int) -> bytes:
    from datasketches import hll_sketch, tgt_hll_type

    s = hll_sketch(lg_k, tgt_hll_type.HLL_4)
    for i in range(n):
        s.update(f"{seed}-{i}")
    return bytes(s.serialize_compact())


def _keys_sql(heavy_pages: int, light_pages: int) -> str:
    """A VALUES-free set of (dimension, key) per domain: `heavy` decides the page count."""
    others = " UNION ALL ".join(f"SELECT '{d}', '{d[0].upper()}' || k FROM generate_series(1, {n}) k"
                                for d, n in OTHER_KEYS.items())
    return (f"SELECT 'page' AS dimension, '/p' || k AS key, true AS heavy FROM generate_series(1, {heavy_pages}) k "
            f"UNION ALL SELECT 'page', '/p' || k, false FROM generate_series(1, {light_pages}) k "
            f"UNION ALL SELECT x.*, h FROM ({others}) x CROSS JOIN (VALUES (true), (false)) v(h)")


def load(dsn: str, count: int, now: datetime, quick: bool, covering: bool = False, weeks: bool = True,
         skewed: bool = False) -> float:
    """Sites and every issue-17 table for `count` domains (the first HEAVY are heavy), then (`weeks`) the closed
    weeks compacted as the rollup worker's background pass does (ADR 61); seconds taken."""
    from oltp.partitions import ensure_partitions

    t0 = time.monotonic()
    names = [domain_name(i) for i in range(count)]
    heavy = names[:HEAVY]
    hour = now.replace(minute=0, second=0, microsecond=0)
    days = day_starts(now - timedelta(days=92), now + timedelta(days=1))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in TABLES:
            ensure_partitions(conn, table, hour - timedelta(days=94), now + timedelta(days=2))
        with conn.cursor().copy("COPY sites (domain, tz, site_key, secret) FROM STDIN") as copy:
            for i, name in enumerate(names):
                copy.write_row((name, ZONE, f"pk_bench{i:020d}", "sk_" + "b" * 40 + f"{i:05d}"))
        conn.execute("INSERT INTO rollup_1d_coverage (domain, tz, complete_from)"
                     " SELECT d, %s, '1970-01-01Z' FROM unnest(%s::text[]) d", (ZONE, names))
        _load_dims(conn, names, heavy, now, days, quick)
        _load_rest(conn, names, heavy, now, days)
        _load_sketches(conn, names, heavy, hour, days, quick, skewed)
        for ddl in COVERING if covering else ():
            conn.execute(ddl)
        if weeks:
            _compact(conn, now)
        conn.execute("VACUUM ANALYZE" if covering else "ANALYZE")  # VACUUM: the visibility map index-only scans need
        # closed days' sketch rows are all-visible, as autovacuum leaves insert-only partitions: the bounds (ADR 62)
        # are read from visitors_dim_1d_key alone
        conn.execute("VACUUM visitors_dim_1d")
    return time.monotonic() - t0


def _compact(conn: psycopg.Connection, now: datetime) -> None:
    """The closed weeks pre-merged (ADR 61), as the rollup worker's hourly background pass would have them."""
    from oltp.weekly import compact_closed_weeks

    t0 = time.monotonic()
    done = compact_closed_weeks(conn, now)
    say(f"[bench] closed weeks compacted: {done.compacted} weeks of {done.domains} domains, {done.dim_rows} "
        f"rollup_dim_1w rows, {done.sketches} sketches in {time.monotonic() - t0:.1f} s")


def _load_dims(conn: psycopg.Connection, names: list[str], heavy: list[str], now: datetime, days: list[datetime],
               quick: bool) -> None:
    """rollup_dim_1d (90 days), rollup_dim_1h (8 days) and rollup_dim_15m (2 days)."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    quarter = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    light_pages = 1 if quick else 5
    keys = _keys_sql(1000, light_pages)
    say(f"[bench] rollup_dim_1d: {len(names)} domains x {len(days)} days ...")
    conn.execute(f"""
        INSERT INTO rollup_dim_1d (domain, tz, event_type, bucket_start, dimension, key, events, valued,
                                   value_sum)
        SELECT d, %(zone)s, 'pageview', g, k.dimension, k.key,
               1 + abs(hashtext(d || k.key || g::text)) %% 50, 1, 0.5
        FROM unnest(%(names)s::text[]) d CROSS JOIN unnest(%(days)s::timestamptz[]) g
        JOIN ({keys}) k ON k.heavy = (d = ANY(%(heavy)s)) AND (k.dimension = 'page' OR k.heavy OR NOT %(quick)s)
        """, {"zone": ZONE, "names": names, "days": days, "heavy": heavy, "quick": quick})
    for table, step, start, per, light in (("rollup_dim_1h", "1 hour", hour - timedelta(days=8), 100, 1),
                                           ("rollup_dim_15m", "15 minutes", quarter - timedelta(days=2), 30, 1)):
        say(f"[bench] {table} ...")
        conn.execute(f"""
            INSERT INTO {table} (domain, event_type, bucket_start, dimension, key, events, valued, value_sum)
            SELECT d, 'pageview', g, 'page', '/p' || (1 + (k + extract(epoch FROM g)::bigint / 900) %% 1000),
                   1 + abs(hashtext(d || k::text)) %% 9, 1, 0.5
            FROM unnest(%(names)s::text[]) d
            CROSS JOIN generate_series(%(lo)s::timestamptz, %(hi)s, %(step)s::interval) g
            CROSS JOIN generate_series(0, %(per)s - 1) k
            WHERE k < CASE WHEN d = ANY(%(heavy)s) THEN %(per)s ELSE %(light)s END
            ON CONFLICT DO NOTHING""", {"names": names, "lo": start, "hi": now, "step": step, "per": per,
                                        "heavy": heavy, "light": light})
        conn.execute(f"""
            INSERT INTO {table} (domain, event_type, bucket_start, dimension, key, events, valued, value_sum)
            SELECT d, 'pageview', g, 'country', 'C' || k, 3, 1, 0.5
            FROM unnest(%(heavy)s::text[]) d
            CROSS JOIN generate_series(%(lo)s::timestamptz, %(hi)s, %(step)s::interval) g
            CROSS JOIN generate_series(1, 10) k""", {"heavy": heavy, "lo": start, "hi": now, "step": step})


def _load_rest(conn: psycopg.Connection, names: list[str], heavy: list[str], now: datetime,
               days: list[datetime]) -> None:
    """rollup_cube_1h (8 days), value bins of every tier, rollup_15m / rollup_1h (the summary's totals)."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    quarter = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    say("[bench] rollup_cube_1h, value bins, rollup tiers ...")
    conn.execute("""
        INSERT INTO rollup_cube_1h (domain, event_type, bucket_start, page, source, country, device, browser, os,
                                    events, valued, value_sum)
        SELECT d, 'pageview', g, '/p' || (1 + k %% 1000), 'S' || (1 + k %% 10), 'C' || (1 + k %% 10),
               'D' || (1 + k %% 3), 'B' || (1 + k %% 5), 'O' || (1 + k %% 5), 2, 1, 0.5
        FROM unnest(%(heavy)s::text[]) d CROSS JOIN generate_series(%(lo)s::timestamptz, %(hi)s, '1 hour') g
        CROSS JOIN generate_series(0, 99) k""", {"heavy": heavy, "lo": hour - timedelta(days=8), "hi": now})
    for tier, lo, step in (("15m", quarter - timedelta(days=2), "15 minutes"), ("1h", hour - timedelta(days=8),
                                                                                 "1 hour")):
        conn.execute(f"""
            INSERT INTO value_bins_{tier} (domain, event_type, bucket_start, bin, count)
            SELECT d, 'pageview', g, 40 + b * 7, 1 + b FROM unnest(%(heavy)s::text[]) d
            CROSS JOIN generate_series(%(lo)s::timestamptz, %(hi)s, %(step)s::interval) g
            CROSS JOIN generate_series(0, 29) b""", {"heavy": heavy, "lo": lo, "hi": now, "step": step})
        conn.execute(f"""
            INSERT INTO rollup_{tier} (domain, event_type, bucket_start, events, valued, value_sum, value_min,
                                       value_max)
            SELECT d, 'pageview', g, 5, 1, 0.5, 0.5, 0.5 FROM unnest(%(names)s::text[]) d
            CROSS JOIN generate_series(%(lo)s::timestamptz, %(hi)s, %(step)s::interval) g""",
                     {"names": names, "lo": lo, "hi": now, "step": step})
    conn.execute("""
        INSERT INTO value_bins_1d (domain, tz, event_type, bucket_start, bin, count)
        SELECT d, %(zone)s, 'pageview', g, 40 + b * 7, 10 + b FROM unnest(%(heavy)s::text[]) d
        CROSS JOIN unnest(%(days)s::timestamptz[]) g CROSS JOIN generate_series(0, 29) b""",
                 {"zone": ZONE, "heavy": heavy, "days": days})


def _skewed_pages(days: int) -> tuple[list[list[bytes]], list[int]]:
    """`--skewed`: page p's visitors of a day are new people, ~300 / p^0.8 of them (a few pages take most visitors,
    as on a real site): [page][day] sketches (the same for every heavy domain) and each page's daily count."""
    sizes = [max(1, round(300 / p ** 0.8)) for p in range(1, 1001)]
    return [[_sketch(n, 12, p * 1000 + i) for i in range(days)] for p, n in enumerate(sizes, 1)], sizes


def _load_sketches(conn: psycopg.Connection, names: list[str], heavy: list[str], hour: datetime,
                   days: list[datetime], quick: bool, skewed: bool = False) -> None:
    """visitors_1h (8 days), visitors_1d (90 days) and visitors_dim_1d (every page and country a day)."""
    big_day = [_sketch(2000, 14, s) for s in range(3)]
    big_hour = [_sketch(150, 14, s) for s in range(3)]
    small = [_sketch(8, 14, s) for s in range(3)]
    sizes = (3, 12, 40)  # visitors of a page's day (the same ones every day: a page has ~55 over any week)
    page = [_sketch(n, 12, s) for s, n in enumerate(sizes)]
    country = [_sketch(400, 12, s) for s in range(3)]
    hours = [hour - timedelta(hours=h) for h in range(8 * 24)]
    say(f"[bench] visitor sketches: {len(names)} domains ...")
    with conn.cursor().copy("COPY visitors_1h (domain, bucket_start, sketch) FROM STDIN") as copy:
        for d in names:
            for i, h in enumerate(hours):
                copy.write_row((d, h, (big_hour if d in heavy else small)[i % 3]))
    with conn.cursor().copy("COPY visitors_1d (domain, tz, bucket_start, sketch) FROM STDIN") as copy:
        for d in names:
            for i, g in enumerate(days):
                copy.write_row((d, ZONE, g, (big_day if d in heavy else small)[i % 3]))
    zipf, zipf_sizes = _skewed_pages(len(days)) if skewed else ([], [])
    # n: the visitors put in the sketch, as the rollup sink writes it (ADR 62)
    dim_copy = "COPY visitors_dim_1d (domain, tz, dimension, bucket_start, key, sketch, n) FROM STDIN"
    with conn.cursor().copy(dim_copy) as copy:
        for d in names:
            is_heavy = d in heavy
            for i, g in enumerate(days):
                for p in range(1, 1001 if is_heavy else (2 if quick else 6)):
                    if is_heavy and skewed:
                        copy.write_row((d, ZONE, "page", g, f"/p{p}", zipf[p - 1][i], zipf_sizes[p - 1]))
                    else:
                        copy.write_row((d, ZONE, "page", g, f"/p{p}", page[(p + i) % 3], sizes[(p + i) % 3]))
                if is_heavy:
                    for c in range(1, 11):
                        copy.write_row((d, ZONE, "country", g, f"C{c}", country[c % 3], 400))


# ---- measuring -------------------------------------------------------------------------------------------

def measure(apis: dict[str, Api], tokens: dict[str, dict[str, str]], n: int, rng: random.Random
            ) -> dict[str, dict[str, Any]]:
    """Each shape n times per database (after a warm-up), the databases in turn: {db: {shape: p50/p99}}."""
    out: dict[str, dict[str, Any]] = {db: {} for db in apis}
    for shape in shapes(datetime.now(UTC)):
        times: dict[str, list[float]] = {db: [] for db in apis}
        warm = max(10, n // 10)
        for i in range(n + warm):
            for db, api in apis.items():
                d = rng.choice(sorted(tokens[db]))
                path = f"/api/v1/domains/{d}/" + shapes(datetime.now(UTC))[shape]
                t0 = time.perf_counter()
                status, body = api.get(path, tokens[db][d])
                elapsed = (time.perf_counter() - t0) * 1000
                if status != 200:
                    raise RuntimeError(f"{db} {shape}: {status} {body[:300]!r}")
                if i >= warm:
                    times[db].append(elapsed)
        for db in apis:
            out[db][shape] = {"p50_ms": round(pct(times[db], 50), 2), "p99_ms": round(pct(times[db], 99), 2),
                              "n": len(times[db])}
            r = out[db][shape]
            say(f"  {db:<4} {shape:<28} p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms")
    return out


def run(work: Path, postgres_dsn: str, create_database: Any, quick: bool, covering: bool = False,
        weeks: bool = True, skewed: bool = False) -> dict[str, Any]:
    """Load both databases, start an API on each, measure; the results (also printed)."""
    from oltp.schema import ensure_schema

    now = datetime.now(UTC)
    rng = random.Random(17)
    results: dict[str, Any] = {"quick": quick, "covering_indexes": covering, "weeks": weeks, "skewed": skewed,
                               "heavy_domains": HEAVY,
                               "started_at": now.isoformat()}
    apis, tokens = {}, {}
    for db, count in (("1k", 1000), ("4k", 4000)):
        dsn = create_database(postgres_dsn, f"bench17_{db}")
        ensure_schema(dsn)
        results[f"load_{db}_s"] = round(load(dsn, count, now, quick, covering, weeks, skewed), 1)
        tokens[db] = customer_tokens(dsn, [domain_name(i) for i in range(HEAVY)])
        apis[db] = Api(work / f"api17-{db}", dsn)
    try:
        for api in apis.values():
            api.wait_ready()
        results["latency"] = measure(apis, tokens, 60 if quick else 300, rng)
    finally:
        for api in apis.values():
            api.stop()
    print(f"{'shape':<28} {'1k p50':>8} {'1k p99':>8} {'4k p50':>8} {'4k p99':>8} {'4k/1k p99':>9}  target p99 20 ms")
    for shape in results["latency"]["1k"]:
        a, b = results["latency"]["1k"][shape], results["latency"]["4k"][shape]
        flag = "" if max(a["p99_ms"], b["p99_ms"]) <= TARGET_MS else "  over target"
        print(f"{shape:<28} {a['p50_ms']:8.2f} {a['p99_ms']:8.2f} {b['p50_ms']:8.2f} {b['p99_ms']:8.2f} "
              f"{b['p99_ms'] / a['p99_ms']:9.2f}{flag}")
    return results
