"""The soak's statistics and its markdown report (bench/soak.py), pure: no I/O, no clock, no servers.

Inputs are plain samples the bench collected: (t, value) pairs with t in seconds since the run started,
markers as (acknowledged_at, seen_in_postgresql_at, seen_in_clickhouse_at) with None for never seen,
sizes as {name: bytes}. tests/test_soak_report.py holds these to their contracts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import pct

FRESHNESS_LIMIT_MS = 5_000.0  # a step holds only with freshness p99 under this, to each store (issue 19 §2)
LAG_LIMIT_S = 5.0  # ... and each store's lag, in events, at most this many seconds of the offered rate
ACCEPT_SHARE = 0.95  # ... and the collector accepted at least this share of the offered rate
ERROR_SHARE = 0.001  # ... and at most this share of requests failed
RSS_SLOPE_TARGET = 1.0  # MiB per 10 minutes after warm-up, every process (issue 19 §2)
MIB = 1024 * 1024




@dataclass(frozen=True)
class Marker:
    """One marker event: when its 202 came, and when each store first showed it (None: never)."""

    acked: float
    pg: float | None
    ch: float | None

    def latency_ms(self, store: str) -> float:
        seen = self.pg if store == "pg" else self.ch
        return math.inf if seen is None else max(0.0, (seen - self.acked) * 1000.0)


def freshness(markers: Sequence[Marker], store: str) -> dict[str, float]:
    """n, p50, p99 and max freshness (ms) to one store ('pg' or 'ch'); a marker never seen counts as inf."""
    lat = [m.latency_ms(store) for m in markers]
    return {"n": len(lat), "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat, default=math.nan)}


def assign_seen(acked: Sequence[float], seen: dict[int, float], count: int, now: float) -> None:
    """A store shows `count` markers at `now`: markers 1..count not seen before are seen now.

    Markers go to one domain, one after the other (each sent after the previous 202), so a store's count of
    them says how many arrived; `seen` maps a marker's 1-based index to when its store first showed it."""
    for k in range(1, min(count, len(acked)) + 1):
        seen.setdefault(k, now)


def windows(points: Sequence[tuple[float, float]], width_s: float) -> list[dict[str, float]]:
    """Points (t, value) in windows of `width_s` from t = 0: start, n, p50, p99 of each non-empty window."""
    buckets: dict[int, list[float]] = {}
    for t, value in points:
        buckets.setdefault(int(t // width_s), []).append(value)
    return [{"start": k * width_s, "n": len(v), "p50": pct(v, 50), "p99": pct(v, 99)}
            for k, v in sorted(buckets.items())]


def slope_per_10min(points: Sequence[tuple[float, float]], warmup_s: float) -> float | None:
    """Least-squares slope of (t seconds, value) after `warmup_s`, in value units per 10 minutes;
    None with fewer than 3 points or no spread in time."""
    kept = [(t, v) for t, v in points if t >= warmup_s]
    if len(kept) < 3:
        return None
    mt = sum(t for t, _ in kept) / len(kept)
    mv = sum(v for _, v in kept) / len(kept)
    var = sum((t - mt) ** 2 for t, _ in kept)
    if var == 0:
        return None
    cov = sum((t - mt) * (v - mv) for t, v in kept)
    return cov / var * 600.0


def tier_of(table: str) -> str:
    """The group a PostgreSQL table's size is reported under: its rollup tier, the dedup window, or other."""
    if table == "seen_events":
        return "dedup (seen_events)"
    for tier in ("15m", "1h", "1d", "1w"):
        if table.endswith("_" + tier) or f"_{tier}_" in table:
            return tier
    return "other"


def by_tier(tables: Mapping[str, int]) -> dict[str, int]:
    """Bytes per table -> bytes per tier_of group."""
    out: dict[str, int] = {}
    for name, size in tables.items():
        out[tier_of(name)] = out.get(tier_of(name), 0) + size
    return out


def growth_per_million(before: Mapping[str, int], after: Mapping[str, int], events: int) -> dict[str, float | None]:
    """Bytes each item grew per million events accepted between two samples (None without events)."""
    names = sorted(set(before) | set(after))
    if events <= 0:
        return {n: None for n in names}
    return {n: (after.get(n, 0) - before.get(n, 0)) * 1_000_000 / events for n in names}


def compression_ratio(uncompressed: int, compressed: int) -> float | None:
    return uncompressed / compressed if compressed > 0 else None


@dataclass
class Step:
    """One step of the capacity search: the offered rate and what was measured while it ran."""

    rate: float
    seconds: float
    accepted: int = 0
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    lag_events: dict[str, list[float]] = field(default_factory=dict)  # group -> samples over the step

    def accepted_per_s(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0


def step_verdict(step: Step) -> tuple[bool, list[str]]:
    """Does the step hold, and if not, why (each failed condition named)."""
    why = []
    if step.accepted_per_s() < ACCEPT_SHARE * step.rate:
        why.append(f"accepted {step.accepted_per_s():,.0f}/s < {ACCEPT_SHARE:.0%} of {step.rate:,.0f}")
    if step.requests and step.errors > ERROR_SHARE * step.requests:
        why.append(f"{step.errors} failed requests of {step.requests}")
    for store, name in (("pg", "PostgreSQL"), ("ch", "ClickHouse")):
        p99 = freshness(step.markers, store)["p99"]
        if not step.markers or not p99 < FRESHNESS_LIMIT_MS:
            why.append(f"{name} freshness p99 {p99:,.0f} ms" if step.markers else "no markers")
    for group, samples in sorted(step.lag_events.items()):
        tail = samples[-2:]
        if tail and min(tail) > LAG_LIMIT_S * step.rate:
            why.append(f"{group} lag {min(tail):,.0f} events > {LAG_LIMIT_S:.0f} s of load")
    return not why, why


def next_rate(tried: Sequence[tuple[float, bool]], start: float, *, precision: float = 1.15,
              max_bisections: int = 3, floor: float = 250.0, ceiling: float = 1_000_000.0) -> float | None:
    """The next rate to try, or None when the search is done: double from `start` while steps hold,
    halve while they fail before any held, then bisect between the best held and the lowest failed rate
    until they are within `precision` of each other or after `max_bisections` bisections."""
    if not tried:
        return start
    held = [r for r, ok in tried if ok]
    failed = [r for r, ok in tried if not ok]
    if not failed:
        nxt = max(held) * 2
        return nxt if nxt <= ceiling else None
    hi = min(failed)
    if not held:
        nxt = hi / 2
        return nxt if nxt >= floor else None
    lo = max((r for r in held if r < hi), default=0.0)
    if lo <= 0 or hi / lo <= precision or _bisections(tried) >= max_bisections:
        return None
    mid = _round_rate((lo + hi) / 2)
    return mid if lo < mid < hi else None


def _bracketed(tried: Sequence[tuple[float, bool]]) -> bool:
    failed = [r for r, ok in tried if not ok]
    return bool(failed) and any(ok and r < min(failed) for r, ok in tried)


def _bisections(tried: Sequence[tuple[float, bool]]) -> int:
    """Steps tried after the first one that put a held rate below a failed one."""
    for i in range(len(tried)):
        if _bracketed(tried[:i + 1]):
            return len(tried) - 1 - i
    return 0


def _round_rate(rate: float) -> float:
    return float(max(50, round(rate / 50) * 50))


def capacity(tried: Sequence[tuple[float, bool]]) -> float | None:
    """The highest rate that held below every rate that failed (None if none held)."""
    failed = [r for r, ok in tried if not ok]
    held = [r for r, ok in tried if ok and (not failed or r < min(failed))]
    return max(held) if held else None


def verdict(acked: Mapping[str, int], maybe: Mapping[str, int], pg: Mapping[str, int | None],
            ch: Mapping[str, int | None]) -> list[dict[str, object]]:
    """Per domain: acknowledged vs each store. lost = acked - store when the store has fewer; double =
    store - (acked + maybe) when it has more than could have arrived (ADR 24's "maybe": sent, no 202)."""
    rows = []
    for domain in sorted(set(acked) | set(pg) | set(ch)):
        a, m = acked.get(domain, 0), maybe.get(domain, 0)
        row: dict[str, object] = {"domain": domain, "acked": a, "maybe": m}
        for store, counts in (("pg", pg), ("ch", ch)):
            n = counts.get(domain)
            row[store] = n
            row[f"{store}_lost"] = None if n is None else max(0, a - n)
            row[f"{store}_double"] = None if n is None else max(0, n - a - m)
        rows.append(row)
    return rows


def verdict_ok(rows: Sequence[Mapping[str, object]]) -> bool:
    """0 lost and 0 double in both stores for every domain (a store that could not be read fails)."""
    keys = ("pg_lost", "pg_double", "ch_lost", "ch_double")
    return bool(rows) and all(row[k] == 0 for row in rows for k in keys)


# --- summaries of a phase (the soak, or a step) from the bench's samples ---------------------------------


def load_summary(reports: Sequence[tuple[float, Any]], a: float, b: float) -> dict[str, float]:
    """Load generator reports (t, tally with .acked .requests .errors .latencies) over (a, b]: accepted
    events/s, requests, failed requests and the collector's p50/p99 in ms as the clients saw it."""
    kept = [r for t, r in reports if a < t <= b]
    lat = [ms for r in kept for ms in r.latencies]
    accepted = sum(sum(r.acked.values()) for r in kept)
    return {"accepted": accepted, "accepted_per_s": accepted / (b - a) if b > a else 0.0,
            "requests": sum(r.requests for r in kept), "errors": sum(sum(r.errors.values()) for r in kept),
            "collector_p50_ms": pct(lat, 50), "collector_p99_ms": pct(lat, 99)}


def load_series(reports: Sequence[tuple[float, Any]], a: float, b: float, width_s: float) -> list[dict[str, float]]:
    """Accepted events/s and collector p99 per window of the phase (times relative to a)."""
    out = []
    t = a
    while t + width_s / 2 < b:  # no last sliver of a window
        s = load_summary(reports, t, min(b, t + width_s))
        out.append({"start": t - a, "accepted_per_s": s["accepted_per_s"], "collector_p99_ms": s["collector_p99_ms"]})
        t += width_s
    return out


def markers_between(acked_at: Sequence[float], seen: Mapping[str, Mapping[int, float]], a: float,
                    b: float) -> list[Marker]:
    """The markers acknowledged in [a, b], with when each store showed them."""
    return [Marker(t, seen["pg"].get(k), seen["ch"].get(k))
            for k, t in enumerate(acked_at, start=1) if a <= t <= b]


def freshness_series(markers: Sequence[Marker], a: float, width_s: float) -> dict[str, list[dict[str, float]]]:
    return {store: windows([(m.acked - a, m.latency_ms(store)) for m in markers], width_s) for store in ("pg", "ch")}


def api_summary(samples: Sequence[tuple[float, float, int, str]], a: float, b: float) -> dict[str, Any]:
    """The customer API's answers in [a, b]: count, failures, p50/p99, and p50/p99 per endpoint, the bare floor's
    (endpoint "floor": an idle WSGI server timed by the same probe) among the endpoints only."""
    span = [(ms, status, endpoint) for t, ms, status, endpoint in samples if a <= t <= b]
    kept = [(ms, status, endpoint) for ms, status, endpoint in span if endpoint != "floor"]
    ok = [ms for ms, status, _ in kept if status == 200]
    by: dict[str, list[float]] = {}
    for ms, status, endpoint in span:
        if status == 200:
            by.setdefault(endpoint, []).append(ms)
    return {"n": len(kept), "failed": len(kept) - len(ok), "p50_ms": pct(ok, 50), "p99_ms": pct(ok, 99),
            "by_endpoint": {e: {"n": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)}
                            for e, v in sorted(by.items())}}


def rss_table(samples: Sequence[tuple[float, Mapping[str, int]]], a: float, b: float,
              warmup_s: float) -> list[dict[str, Any]]:
    """Per process (label) over [a, b]: first, last and max RSS (MiB) and the slope after warm-up (MiB/10 min),
    and whether the slope meets RSS_SLOPE_TARGET."""
    series: dict[str, list[tuple[float, float]]] = {}
    for t, sample in samples:
        if a <= t <= b:
            for name, rss in sample.items():
                series.setdefault(name, []).append((t - a, rss / MIB))
    rows = []
    for name, pts in sorted(series.items(), key=lambda kv: -max(v for _, v in kv[1])):
        slope = slope_per_10min(pts, warmup_s)
        rows.append({"process": name, "first_mib": pts[0][1], "last_mib": pts[-1][1],
                     "max_mib": max(v for _, v in pts), "slope_mib_per_10min": slope,
                     "ok": None if slope is None else slope < RSS_SLOPE_TARGET, "points": pts})
    return rows


def flat_sizes(sample: Mapping[str, Any]) -> dict[str, int]:
    """One disk sample as name -> bytes: spool, PostgreSQL per tier group, ClickHouse events and chDB's dir."""
    out = {"spool": int(sample.get("spool", 0))}
    out.update({f"postgresql {k}": v for k, v in by_tier({t: s for t, (s, _) in sample.get("pg", {}).items()}).items()})
    out["clickhouse events (bytes on disk)"] = int(sample.get("ch", {}).get("bytes_on_disk", 0))
    out["chdb directory"] = int(sample.get("chdb_dir", 0))
    return out


def disk_summary(disk: Sequence[tuple[float, Mapping[str, Any]]], reports: Sequence[tuple[float, Any]], a: float,
                 b: float) -> dict[str, Any]:
    """Growth per million accepted events between the first disk sample at or after a and the last at or
    before b, the ClickHouse compression ratio and PostgreSQL bytes per row at the end."""
    inside = [(t, s) for t, s in disk if a <= t <= b]
    if len(inside) < 2:
        return {"events": 0, "growth_per_million": {}, "compression_ratio": None, "pg_bytes_per_row": {}}
    (t1, first), (t2, last) = inside[0], inside[-1]
    events = int(load_summary(reports, t1, t2)["accepted"])
    ch = last.get("ch", {})
    return {"events": events, "from_s": t1 - a, "to_s": t2 - a,
            "growth_per_million": growth_per_million(flat_sizes(first), flat_sizes(last), events),
            "end_bytes": flat_sizes(last),
            "compression_ratio": compression_ratio(int(ch.get("uncompressed", 0)), int(ch.get("compressed", 0))),
            "clickhouse_bytes_per_row": (ch.get("bytes_on_disk", 0) / ch["rows"]) if ch.get("rows") else None,
            "pg_bytes_per_row": {t: size / rows for t, (size, rows) in sorted(last.get("pg", {}).items()) if rows > 0}}


def lag_in_events(status: Sequence[tuple[float, Mapping[str, int], int | None]], reports: Sequence[tuple[float, Any]],
                  a: float, b: float) -> dict[str, list[float]]:
    """Each consumer group's lag samples in [a, b] in events: records times events per record, as the records
    shipped grew against the events accepted meanwhile (1 event per record without that)."""
    inside = [s for s in status if a <= s[0] <= b]
    ends = [(t, e) for t, _, e in inside if e is not None]
    per_record = 1.0
    if len(ends) >= 2 and ends[-1][1] > ends[0][1]:
        per_record = max(1.0, load_summary(reports, ends[0][0], ends[-1][0])["accepted"] / (ends[-1][1] - ends[0][1]))
    out: dict[str, list[float]] = {}
    for _, lag, _ in inside:
        for group, records in lag.items():
            out.setdefault(group, []).append(records * per_record)
    return out


def role(process: str) -> str:
    """A process label without its pid, PostgreSQL's processes as one role, the broker named."""
    name = process.rsplit(" ", 1)[0] if process.rsplit(" ", 1)[-1].isdigit() else process
    if name.startswith("postgres"):
        return "postgresql (all its processes)"
    if name.startswith("tansu"):
        return "broker (tansu)"
    return name


def cpu_per_event(samples: Sequence[tuple[float, Mapping[str, float]]], reports: Sequence[tuple[float, Any]],
                  a: float, b: float) -> list[dict[str, Any]]:
    """CPU each role of the stack spent per accepted event over [a, b] (per process: its last sample's CPU minus
    its first's), most first: CPU seconds, microseconds per event, events per core-second, share of the stack."""
    first: dict[str, float] = {}
    last: dict[str, tuple[float, float]] = {}
    for t, sample in samples:
        if a <= t <= b:
            for name, cpu in sample.items():
                first.setdefault(name, cpu)
                last[name] = (t, cpu)
    if not last:
        return []
    t1 = min(t for t, _ in samples if a <= t <= b)
    t2 = max(t for t, _ in last.values())
    events = load_summary(reports, t1, t2)["accepted"]
    used: dict[str, float] = {}
    for name, (_, cpu) in last.items():
        used[role(name)] = used.get(role(name), 0.0) + cpu - first[name]
    total = sum(used.values()) or 1.0
    return [{"role": r, "cpu_s": s, "us_per_event": s / events * 1e6 if events else None,
             "events_per_core_s": events / s if s > 0 else None, "share": s / total, "events": events}
            for r, s in sorted(used.items(), key=lambda kv: -kv[1])]


def cpu_series(samples: Sequence[tuple[float, Mapping[str, float]]], reports: Sequence[tuple[float, Any]],
               a: float, b: float, width: float) -> list[dict[str, Any]]:
    """CPU per accepted event of each role in consecutive windows of `width` seconds over [a, b]: a role whose
    cost per event rises over the run is what a latency drift at a steady rate points to."""
    out = []
    t = a
    while t + width / 2 <= b:
        rows = cpu_per_event(samples, reports, t, min(t + width, b))
        if rows and rows[0]["events"]:
            out.append({"start": t - a, "us_per_event": {r["role"]: r["us_per_event"] for r in rows}})
        t += width
    return out
