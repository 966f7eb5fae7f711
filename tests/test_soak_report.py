"""The soak's statistics and report (bench/soak_report.py, bench/soak_markdown.py): pure, no servers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from bench import soak_report as rep
from bench.soak_markdown import render


@dataclass
class Tally:  # the shape of bench.soak_load.Tally the summaries read
    acked: dict[str, int] = field(default_factory=dict)
    maybe: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


def test_percentiles_nearest_rank_nan_when_empty_and_never_seen_is_infinite():
    assert rep.pct(range(1, 101), 50) == 51
    assert rep.pct(range(1, 101), 99) == 99
    assert math.isnan(rep.pct([], 99))
    assert rep.pct([1.0, math.inf], 99) == math.inf
    markers = [rep.Marker(10.0, 10.5, 11.0), rep.Marker(11.0, None, 11.2)]
    assert rep.freshness(markers, "pg")["p99"] == math.inf  # a marker PostgreSQL never showed
    assert rep.freshness(markers, "ch") == {"n": 2, "p50": pytest.approx(200.0), "p99": pytest.approx(1000.0),
                                            "max": pytest.approx(1000.0)}


def test_a_stores_marker_count_marks_the_first_markers_seen_once():
    acked = [1.0, 2.0, 3.0]
    seen: dict[int, float] = {}
    rep.assign_seen(acked, seen, 1, now=1.5)
    rep.assign_seen(acked, seen, 5, now=4.0)  # more than were acknowledged yet: only those known
    rep.assign_seen(acked, seen, 3, now=9.0)  # seen before: the first time stays
    assert seen == {1: 1.5, 2: 4.0, 3: 4.0}


def test_windows_group_points_from_zero():
    out = rep.windows([(0.5, 1.0), (9.9, 3.0), (20.0, 7.0)], 10.0)
    assert [(w["start"], w["n"], w["p99"]) for w in out] == [(0.0, 2, 3.0), (20.0, 1, 7.0)]


def test_slope_per_10_minutes_after_warmup():
    growing = [(t, 100 + t / 60) for t in range(0, 1800, 30)]  # 1 MiB a minute
    assert rep.slope_per_10min(growing, warmup_s=300) == pytest.approx(10.0)
    spike_then_flat = [(t, 500.0 if t < 300 else 100.0) for t in range(0, 1800, 30)]
    assert rep.slope_per_10min(spike_then_flat, warmup_s=300) == pytest.approx(0.0)
    assert rep.slope_per_10min([(0, 1), (400, 2)], warmup_s=0) is None  # too few points


def test_rss_table_flags_a_growing_process():
    samples = [(float(t), {"tally api 1": 200 * rep.MIB + t * rep.MIB, "tally shipper 2": 50 * rep.MIB})
               for t in range(0, 900, 10)]
    rows = {r["process"]: r for r in rep.rss_table(samples, 0.0, 900.0, warmup_s=300.0)}
    assert rows["tally api 1"]["ok"] is False and rows["tally api 1"]["slope_mib_per_10min"] == pytest.approx(600)
    assert rows["tally shipper 2"]["ok"] is True and rows["tally shipper 2"]["max_mib"] == pytest.approx(50)


def test_postgresql_tables_group_by_tier():
    assert [rep.tier_of(t) for t in ("rollup_15m", "rollup_dim_1h", "rollup_cube_1d", "rollup_1d_coverage",
                                     "visitors_dim_1d", "ingestion_15m", "seen_events", "sites", "dim_keys",
                                     "rollup_dim_1w")] == \
        ["15m", "1h", "1d", "1d", "1d", "15m", "dedup (seen_events)", "other", "other", "1w"]
    assert rep.by_tier({"rollup_15m": 10, "value_bins_15m": 5, "rollup_1h": 3}) == {"15m": 15, "1h": 3}


def test_growth_per_million_and_compression_ratio():
    assert rep.growth_per_million({"a": 100}, {"a": 600, "b": 50}, 500_000) == {"a": 1000.0, "b": 100.0}
    assert rep.growth_per_million({"a": 1}, {"a": 2}, 0) == {"a": None}
    assert rep.compression_ratio(1000, 125) == 8.0
    assert rep.compression_ratio(1000, 0) is None


def test_disk_summary_between_first_and_last_sample_of_the_phase():
    reports = [(t, Tally(acked={"d": 1000})) for t in range(1, 101)]  # 1,000 events a second
    disk = [(5.0, {"spool": 0, "pg": {"rollup_15m": (8192, 10)}, "ch": {}}),
            (10.0, {"spool": 4096, "pg": {"rollup_15m": (16384, 20), "seen_events": (0, 0)},
                    "ch": {"bytes_on_disk": 1_000, "rows": 10, "compressed": 100, "uncompressed": 700}}),
            (60.0, {"spool": 4096 + 50_000, "pg": {"rollup_15m": (16384 + 100_000, 100), "seen_events": (500_000, 1)},
                    "ch": {"bytes_on_disk": 51_000, "rows": 50_010, "compressed": 1_000, "uncompressed": 9_000},
                    "chdb_dir": 0})]
    d = rep.disk_summary(disk, reports, 10.0, 60.0)
    assert d["events"] == 50_000
    g = d["growth_per_million"]
    assert g["spool"] == pytest.approx(1_000_000) and g["postgresql 15m"] == pytest.approx(2_000_000)
    assert g["postgresql dedup (seen_events)"] == pytest.approx(10_000_000)
    assert g["clickhouse events (bytes on disk)"] == pytest.approx(1_000_000)
    assert d["compression_ratio"] == 9.0 and d["pg_bytes_per_row"]["rollup_15m"] == pytest.approx(1163.84)
    assert rep.disk_summary(disk[:1], reports, 0.0, 60.0)["events"] == 0


def test_load_summary_and_series():
    reports = [(1.0, Tally({"a": 100}, {}, 2, {}, [5.0, 7.0])), (2.0, Tally({"a": 50, "b": 50}, {"b": 50}, 3,
                                                                         {"http 503": 1}, [9.0, 100.0, 11.0]))]
    s = rep.load_summary(reports, 0.0, 2.0)
    assert s["accepted"] == 200 and s["accepted_per_s"] == 100.0 and s["requests"] == 5 and s["errors"] == 1
    assert s["collector_p99_ms"] == 100.0 and s["collector_p50_ms"] == 9.0
    assert [w["accepted_per_s"] for w in rep.load_series(reports, 0.0, 2.0, 1.0)] == [100.0, 100.0]


def test_lag_in_events_scales_records_by_events_per_record():
    reports = [(float(t), Tally(acked={"d": 500})) for t in range(1, 11)]  # 500 events/s
    status = [(0.0, {"tally-rollups": 2, "tally-loader": 0}, 1000), (10.0, {"tally-rollups": 4, "tally-loader": 1},
                                                                       1050)]  # 50 records for 5,000 events
    assert rep.lag_in_events(status, reports, 0.0, 10.0) == {"tally-rollups": [200.0, 400.0],
                                                             "tally-loader": [0.0, 100.0]}
    unbatched = [(0.0, {"g": 7}, None)]
    assert rep.lag_in_events(unbatched, reports, 0.0, 10.0) == {"g": [7.0]}


def _step(**kw):
    base = dict(rate=10_000.0, seconds=120.0, accepted=1_200_000, requests=24_000, errors=0,
                markers=[rep.Marker(t, t + 1.0, t + 2.0) for t in range(100)], lag_events={"tally-rollups": [0, 10]})
    base.update(kw)
    return rep.Step(**base)


def test_a_step_holds_only_when_every_condition_does():
    assert rep.step_verdict(_step()) == (True, [])
    slow_ch = [rep.Marker(t, t + 1.0, t + 6.0) for t in range(100)]
    cases = {"accepted": _step(accepted=1_000_000), "failed requests": _step(errors=100),
             "ClickHouse freshness p99": _step(markers=slow_ch),
             "PostgreSQL freshness p99 never": _step(markers=[rep.Marker(1.0, None, 2.0)]),
             "no markers": _step(markers=[]),
             "tally-rollups lag": _step(lag_events={"tally-rollups": [60_000, 70_000]})}
    for needle, step in cases.items():
        ok, why = rep.step_verdict(step)
        assert not ok and any(needle.split(" never")[0] in w for w in why), (needle, why)


def _search(limit: float, start: float, **opts) -> tuple[list[tuple[float, bool]], float | None]:
    tried: list[tuple[float, bool]] = []
    while (rate := rep.next_rate(tried, start, **opts)) is not None:
        tried.append((rate, rate <= limit))
        assert len(tried) < 30
    return tried, rep.capacity(tried)


def test_the_search_doubles_then_bisects_to_the_precision():
    tried, cap = _search(15_000, 4_000, precision=1.15, max_bisections=5)
    assert [r for r, _ in tried][:4] == [4_000, 8_000, 16_000, 12_000]
    assert cap is not None and 15_000 / 1.15 <= cap <= 15_000
    failed = min(r for r, ok in tried if not ok)
    assert failed / cap <= 1.15


def test_the_search_halves_when_the_first_step_fails_and_stops_at_the_floor():
    tried, cap = _search(1_500, 4_000, precision=1.3, max_bisections=1)
    assert [r for r, _ in tried][:3] == [4_000, 2_000, 1_000] and cap is not None and 1_000 <= cap <= 1_500
    tried, cap = _search(10, 4_000)
    assert cap is None and min(r for r, _ in tried) >= 250


def test_the_search_stops_after_its_bisections_and_at_the_ceiling():
    tried, _ = _search(15_000, 4_000, precision=1.01, max_bisections=1)
    assert [r for r, _ in tried] == [4_000, 8_000, 16_000, 12_000]
    tried, cap = _search(math.inf, 400_000, ceiling=1_000_000)
    assert [r for r, _ in tried] == [400_000, 800_000] and cap == 800_000


def test_capacity_ignores_a_lucky_step_above_a_failure():
    assert rep.capacity([(4000, True), (8000, False), (6000, True), (7000, False), (12000, True)]) == 6000
    assert rep.capacity([(4000, False)]) is None


def test_verdict_counts_lost_and_double_per_store_allowing_maybe():
    rows = rep.verdict({"a": 100, "b": 100}, {"b": 50}, {"a": 100, "b": 150}, {"a": 99, "b": 151})
    by = {r["domain"]: r for r in rows}
    assert (by["a"]["pg_lost"], by["a"]["ch_lost"], by["a"]["ch_double"]) == (0, 1, 0)
    assert (by["b"]["pg_double"], by["b"]["ch_double"]) == (0, 1)  # 150 could have arrived (100 + 50 maybe)
    assert not rep.verdict_ok(rows)
    assert rep.verdict_ok(rep.verdict({"a": 5}, {}, {"a": 5}, {"a": 5}))
    assert not rep.verdict_ok(rep.verdict({"a": 5}, {}, {"a": 5}, {}))  # a store that could not be read fails
    assert not rep.verdict_ok([])


def test_markdown_report_names_capacity_phase_figures_and_verdict():
    step = {"rate": 8000.0, "accepted_per_s": 7990.0, "collector_p50_ms": 3.0, "collector_p99_ms": 20.0,
            "fresh_pg_p50_ms": 800.0, "fresh_pg_p99_ms": 1500.0, "fresh_ch_p50_ms": 900.0, "fresh_ch_p99_ms": math.inf,
            "lag_end_events": {"tally-loader": 12.0}, "drain_s": 2.0, "holds": False, "why": ["ClickHouse freshness"]}
    series = [{"start": 0.0, "n": 3, "p50": 1.0, "p99": 2.0}]
    phase = {"phase": "soak", "rate": 4000.0, "seconds": 60.0, "warmup_s": 20.0, "drain_s": 1.5, "window_s": 15.0,
             "load": {"accepted": 240_000, "accepted_per_s": 4000.0, "requests": 4800, "errors": 0,
                      "collector_p50_ms": 2.0, "collector_p99_ms": 9.0},
             "load_series": [{"start": 0.0, "accepted_per_s": 4000.0, "collector_p99_ms": 9.0}],
             "freshness": {"pg": {"n": 3, "p50": 700.0, "p99": 900.0}, "ch": {"n": 3, "p50": 800.0, "p99": 990.0}},
             "freshness_series": {"pg": series, "ch": series}, "api": {"n": 5, "failed": 0, "p50_ms": 3, "p99_ms": 8},
             "api_series": series, "rss": rep.rss_table([(t, {"tally api 9": 100 * rep.MIB}) for t in range(0, 60, 5)],
                                                        0, 60, 20),
             "disk": {"events": 0}}
    text = render({"command": "python -m bench.soak --quick", "quick": True, "machine": {"cores": 2},
                   "steps": [step], "capacity": 4000.0, "soak": phase,
                   "verdict": rep.verdict({"a": 5}, {}, {"a": 5}, {"a": 5})}, "soak-quick.png")
    for needle in ("**Sustained capacity: 4,000 events/s**", "| 8,000 | 7,990 |", "never", "fails: ClickHouse",
                   "tally api 9", "**0 lost, 0 double**", "`soak-quick.png`", "customer API p50 / p99"):
        assert needle in text, needle


def test_cpu_per_event_by_role_from_per_process_cpu_samples():
    reports = [(float(t), Tally(acked={"d": 1000})) for t in range(1, 11)]  # 10,000 events over (0, 10]
    samples = [(0.0, {"tally collector 10": 1.0, "tally collector 11": 5.0, "postgres: walwriter  7": 0.5}),
               (10.0, {"tally collector 10": 1.5, "tally collector 11": 5.5, "postgres: walwriter  7": 0.6,
                       "postgres: postgres x 99": 0.2, "tansu-v0.6 broker 5": 0.0})]
    rows = {r["role"]: r for r in rep.cpu_per_event(samples, reports, 0.0, 10.0)}
    assert rows["tally collector"]["cpu_s"] == pytest.approx(1.0)
    assert rows["tally collector"]["us_per_event"] == pytest.approx(100.0)
    assert rows["tally collector"]["events_per_core_s"] == pytest.approx(10_000)
    assert rows["postgresql (all its processes)"]["cpu_s"] == pytest.approx(0.1)  # a process seen once: 0
    assert rows["broker (tansu)"]["events_per_core_s"] is None
    assert rep.cpu_per_event([], reports, 0.0, 10.0) == []


def test_cpu_series_shows_a_role_whose_cost_per_event_rises():
    from bench.soak_markdown import cpu_series_lines

    reports = [(float(t), Tally(acked={"d": 1000})) for t in range(1, 21)]  # 1,000 events a second
    samples = [(float(t), {"tansu-v0.6 broker 5": 0.01 * t * t, "tally shipper 6": 0.01 * t}) for t in range(21)]
    series = rep.cpu_series(samples, reports, 0.0, 20.0, 10.0)
    assert [w["start"] for w in series] == [0.0, 10.0]
    broker = [w["us_per_event"]["broker (tansu)"] for w in series]
    shipper = [w["us_per_event"]["tally shipper"] for w in series]
    assert broker[1] == pytest.approx(3 * broker[0])  # (4 - 1) vs (1 - 0) CPU s over the same events
    assert shipper[0] == pytest.approx(shipper[1])
    text = "\n".join(cpu_series_lines(series))
    assert "windows of 10 s" in text and "| 10 |" in text and "broker (tansu)" in text
    assert cpu_series_lines([]) == []


def test_the_banner_of_tally_up_gives_every_collector_and_the_api():
    from types import SimpleNamespace

    from bench.soak_stack import Stack

    banner = ("tally is up.\n  collector        http://127.0.0.1:9001/collect\n"
              "  collector        http://127.0.0.1:9011/collect   (host 2)\n"
              "  api              http://127.0.0.1:9002/api/v1/domains/x/impressions?granularity=15m\n")
    stack = SimpleNamespace(collector="http://127.0.0.1:1", api="http://127.0.0.1:2")
    Stack.read_banner(stack, banner)  # type: ignore[arg-type]
    assert stack.collectors == ["http://127.0.0.1:9001", "http://127.0.0.1:9011"]
    assert stack.api == "http://127.0.0.1:9002"
    Stack.read_banner(stack, "tally is up.\n")  # nothing printed: what the ports say
    assert stack.collectors == ["http://127.0.0.1:1"]


def test_the_api_summary_gives_each_endpoint_its_own_percentiles():
    """Which endpoint sets the API's p99 under load: the summary splits the answers by endpoint (failures are
    counted, not timed)."""
    samples = [(1.0, 5.0, 200, "summary"), (2.0, 7.0, 200, "summary"), (3.0, 90.0, 200, "breakdown"),
               (4.0, 1.0, 503, "breakdown"), (99.0, 500.0, 200, "summary"),  # the last one is outside [0, 10]
               (5.0, 2.0, 200, "floor")]  # the bare floor: listed, not one of the API's answers
    api = rep.api_summary(samples, 0.0, 10.0)
    assert (api["n"], api["failed"]) == (4, 1) and api["by_endpoint"]["floor"]["p99_ms"] == 2.0
    assert api["by_endpoint"]["breakdown"] == {"n": 1, "p50_ms": 90.0, "p99_ms": 90.0}
    assert api["by_endpoint"]["summary"]["n"] == 2 and api["by_endpoint"]["summary"]["p99_ms"] <= 7.0


def test_soak_settings_are_tally_settings_given_as_name_equals_value():
    from bench.soak import arguments

    args = arguments(["--rate", "100", "--set", "TALLY_BROKER_RECYCLE_RECORDS=600", "--set", "TALLY_X_Y=a=b"])
    assert dict(args.set) == {"TALLY_BROKER_RECYCLE_RECORDS": "600", "TALLY_X_Y": "a=b"}
    for bad in ("BROKER=1", "TALLY_BROKER", "tally_x=1", "TALLY_A B=1", "TALLY_=1"):
        with pytest.raises(SystemExit):
            arguments(["--set", bad])
