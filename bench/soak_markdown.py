"""The soak's report as markdown (bench/soak.py), from its JSON-shaped report dict; pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.soak_report import MIB, RSS_SLOPE_TARGET, verdict_ok


def num(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "never"
    return f"{value:,.{digits}f}{unit}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def render(report: dict[str, Any], chart: str) -> str:
    lines = [f"# Soak{' (--quick)' if report.get('quick') else ''}", "", f"Command: `{report.get('command')}`", ""]
    lines += machine_lines(report.get("machine", {}))
    lines += capacity_lines(report.get("steps", []), report.get("capacity"))
    phase = report.get("soak")
    if phase:
        lines += phase_lines(phase)
        lines += cpu_lines(phase.get("cpu", []))
        lines += cpu_series_lines(phase.get("cpu_series", []))
        lines += rss_lines(phase)
        lines += disk_lines(phase.get("disk", {}))
    lines += verdict_lines(report.get("verdict", []))
    errors = report.get("probe_errors") or []
    if errors:
        lines += ["", f"Probe errors ({len(errors)} shown):", "", *(f"- `{e}`" for e in errors[:10])]
    lines += ["", f"Chart: `{chart}`", ""]
    return "\n".join(lines)


def machine_lines(m: dict[str, Any]) -> list[str]:
    return [f"Machine: {m.get('cores')} cores, commit {m.get('commit')}; load average "
            f"{' '.join(m.get('loadavg_start') or [])} at the start, {' '.join(m.get('loadavg_end') or [])} at the "
            f"end; busy {num((m.get('busy_share') or 0) * 100)} % of all cores over {num(m.get('wall_s'))} s, of "
            f"which the stack {num(m.get('stack_cpu_s'))} CPU s, this bench {num(m.get('bench_self_cpu_s'))} CPU s "
            f"(probes), its load generators {num(m.get('generators_cpu_s'))} CPU s and its CLI calls (`tally sites "
            f"add`) {num(m.get('cli_cpu_s'))} CPU s, "
            f"other processes on the machine {num(m.get('others_cpu_s'))} "
            "CPU s.", ""]


def capacity_lines(steps: list[dict[str, Any]], capacity: float | None) -> list[str]:
    if not steps:
        return []
    rows = [(num(s["rate"]), num(s["accepted_per_s"]),
             f"{num(s['collector_p50_ms'], 1)} / {num(s['collector_p99_ms'], 1)}",
             f"{num(s['fresh_pg_p50_ms'])} / {num(s['fresh_pg_p99_ms'])}",
             f"{num(s['fresh_ch_p50_ms'])} / {num(s['fresh_ch_p99_ms'])}",
             ", ".join(f"{g} {num(v)}" for g, v in sorted(s["lag_end_events"].items())) or "-",
             num(s["drain_s"], 1), "holds" if s["holds"] else "fails: " + "; ".join(s["why"])) for s in steps]
    return ["## Capacity search", "",
            *table(("offered ev/s", "accepted ev/s", "collector p50 / p99 ms", "fresh PG p50 / p99 ms",
                    "fresh CH p50 / p99 ms", "lag at end (events)", "drain s", "verdict"), rows),
            "", f"**Sustained capacity: {num(capacity)} events/s** (the highest step that held below every "
                f"step that failed).", ""]


def phase_lines(p: dict[str, Any]) -> list[str]:
    load, f, api = p["load"], p["freshness"], p["api"]
    rows = [("offered rate", num(p.get("rate"), 0, " ev/s")),
            ("length", num(p["seconds"], 0, " s") + f" (warm-up {num(p['warmup_s'])} s)"),
            ("accepted", num(load["accepted_per_s"], 0, " ev/s") + f" ({num(load['accepted'])} events)"),
            ("collector p50 / p99", f"{num(load['collector_p50_ms'], 1)} / {num(load['collector_p99_ms'], 1)} ms"),
            ("failed requests", f"{num(load['errors'])} of {num(load['requests'])}"),
            ("freshness PostgreSQL p50 / p99",
             f"{num(f['pg']['p50'])} / {num(f['pg']['p99'])} ms ({f['pg']['n']} markers)"),
            ("freshness ClickHouse p50 / p99", f"{num(f['ch']['p50'])} / {num(f['ch']['p99'])} ms"),
            ("customer API p50 / p99", f"{num(api['p50_ms'], 1)} / {num(api['p99_ms'], 1)} ms ({api['n']} requests,"
                                       f" {api['failed']} failed)"),
            *((f"customer API p50 / p99: {e}" if e != "floor" else "bare floor p50 / p99 (an idle WSGI server, same "
               "probe)", f"{num(v['p50_ms'], 1)} / {num(v['p99_ms'], 1)} ms ({v['n']})")
              for e, v in api.get("by_endpoint", {}).items()),
            ("drain after the load stopped", num(p["drain_s"], 1, " s")),
            ("marker poll p99 (freshness resolution)", f"PostgreSQL {num(p.get('poll_ms', {}).get('pg'))} ms, "
                                                       f"ClickHouse {num(p.get('poll_ms', {}).get('ch'))} ms")]
    lines = [f"## Phase: {p['phase']}", "", *table(("figure", "value"), rows), ""]
    fp, fc, ap, bare = (_lookup(p["freshness_series"]["pg"]), _lookup(p["freshness_series"]["ch"]),
                        _lookup(p["api_series"]), _lookup(p.get("floor_series", [])))
    rows2 = [(num(t), num(ls["accepted_per_s"]), num(ls["collector_p99_ms"], 1), num(fp(t, "p50")), num(fp(t, "p99")),
              num(fc(t, "p50")), num(fc(t, "p99")), num(ap(t, "p99"), 1), num(bare(t, "p99"), 1))
             for t, ls in ((s["start"], s) for s in p["load_series"])]
    return lines + [f"Over time ({num(p['window_s'])} s windows; floor: an idle WSGI server timed by the same "
                    "probe, what this load costs any HTTP answer):", "",
                    *table(("from s", "accepted ev/s", "collector p99 ms", "PG p50 ms", "PG p99 ms", "CH p50 ms",
                            "CH p99 ms", "API p99 ms", "floor p99 ms"), rows2), ""]


def _lookup(series: list[dict[str, float]]) -> Any:
    index = {round(s["start"], 3): s for s in series}
    return lambda t, key: index.get(round(t, 3), {}).get(key)


def cpu_lines(rows: list[dict[str, Any]]) -> list[str]:
    """CPU per accepted event of each role of the stack: what docs/capacity.md scales from."""
    if not rows:
        return []
    cells = [(r["role"], num(r["cpu_s"], 1), num(r["us_per_event"], 1), num(r["events_per_core_s"]),
              num(r["share"] * 100, 0, " %")) for r in rows]
    return [f"CPU per accepted event by role ({num(rows[0]['events'])} events; from /proc):", "",
            *table(("role", "CPU s", "µs per event", "events per core-second", "share of the stack"), cells), ""]


def cpu_series_lines(series: list[dict[str, Any]]) -> list[str]:
    """CPU per accepted event of each role, window by window: which role's cost rises over the run."""
    if not series:
        return []
    roles = list(series[0]["us_per_event"])
    rows = [(num(w["start"]), *(num(w["us_per_event"].get(r), 1) for r in roles)) for w in series]
    return ["CPU per accepted event by role over time (µs per event; windows of "
            f"{num(series[1]['start'] - series[0]['start']) if len(series) > 1 else '-'} s):", "",
            *table(("from s", *roles), rows), ""]


def rss_lines(p: dict[str, Any]) -> list[str]:
    """RSS per process with its slope, and the private part's (RssAnon) slope, which the target judges: a
    PostgreSQL backend's RSS grows as it touches shared buffers, which is not a leak."""
    private = {r["process"]: r for r in p.get("rss_private", [])}
    lasting = [r for r in p["rss"] if r["slope_mib_per_10min"] is not None]
    rows = []
    for r in lasting:
        q = private.get(r["process"], {})
        rows.append((r["process"], num(r["first_mib"], 1), num(r["last_mib"], 1), num(r["max_mib"], 1),
                     num(r["slope_mib_per_10min"], 2), num(q.get("last_mib"), 1), num(q.get("slope_mib_per_10min"), 2),
                     {True: "ok", False: "OVER", None: "-"}[q.get("ok")]))
    short = len(p["rss"]) - len(lasting)
    return [f"RSS of every process of the stack (slopes after {num(p['warmup_s'])} s of warm-up; target: private "
            f"memory (RssAnon) < {RSS_SLOPE_TARGET:g} MiB per 10 min):", "",
            *table(("process", "RSS first MiB", "RSS last MiB", "RSS max MiB", "RSS slope MiB/10 min",
                    "private last MiB", "private slope MiB/10 min", "target"), rows), "",
            f"({short} short-lived processes, e.g. PostgreSQL backends of CLI calls, not shown.)" if short else "", ""]


def disk_lines(d: dict[str, Any]) -> list[str]:
    if not d.get("events"):
        return ["Disk: fewer than two samples in the phase.", ""]
    growth, end = d["growth_per_million"], d.get("end_bytes", {})
    rows = [(name, num(end.get(name, 0) / MIB, 1), num(g / MIB if g is not None else None, 2))
            for name, g in growth.items()]
    per_row = ", ".join(f"{t} {num(b)}" for t, b in d.get("pg_bytes_per_row", {}).items())
    return [f"Disk over {num(d['events'])} events accepted between {num(d['from_s'])} s and {num(d['to_s'])} s:",
            "", *table(("what", "at the end MiB", "growth MiB per million events"), rows), "",
            f"ClickHouse compression ratio (data_uncompressed_bytes / data_compressed_bytes of `events`' columns): "
            f"**{num(d.get('compression_ratio'), 2)}**; bytes on disk per row "
            f"{num(d.get('clickhouse_bytes_per_row'), 1)}.",
            "", f"PostgreSQL bytes per row at the end (size with indexes / estimated rows): {per_row or '-'}", ""]


def verdict_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["## Verdict", "", "No verdict (the run did not finish).", ""]
    cells = [(r["domain"], num(r["acked"]), num(r["maybe"]), num(r["pg"]), num(r["ch"]),
              f"{num(r['pg_lost'])} / {num(r['pg_double'])}", f"{num(r['ch_lost'])} / {num(r['ch_double'])}")
             for r in rows]
    acked = sum(r["acked"] for r in rows)
    return ["## Verdict: acknowledged events against both stores", "",
            f"**{'0 lost, 0 double' if verdict_ok(rows) else 'FAILED'}** over {num(acked)} acknowledged events.", "",
            *table(("domain", "acked", "maybe", "PostgreSQL", "ClickHouse", "PG lost / double", "CH lost / double"),
                   cells), ""]
