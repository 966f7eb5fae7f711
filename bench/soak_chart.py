"""The soak's chart (bench/soak.py): one PNG, four panels over the phase: accepted events/s and collector p99,
freshness p50/p99 to each store, customer API p99, RSS of the largest processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOP_PROCESSES = 10


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phase = report.get("soak")
    if not phase:
        return
    fig, axes = plt.subplots(4, 1, figsize=(11, 14), sharex=True)
    _load(axes[0], phase)
    _freshness(axes[1], phase)
    _api(axes[2], phase)
    _rss(axes[3], phase)
    axes[3].set_xlabel(f"seconds into the {phase['phase']}")
    fig.suptitle(f"tally soak: {phase['phase']} at {phase.get('rate') or 0:,.0f} events/s offered"
                 + (f" (capacity {report['capacity']:,.0f})" if report.get("capacity") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _xy(series: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    return [s["start"] for s in series], [s[key] for s in series]


def _load(ax: Any, p: dict[str, Any]) -> None:
    ax.plot(*_xy(p["load_series"], "accepted_per_s"), label="accepted events/s")
    ax.set_ylabel("events/s")
    twin = ax.twinx()
    twin.plot(*_xy(p["load_series"], "collector_p99_ms"), color="tab:red", linestyle=":", label="collector p99 ms")
    twin.set_ylabel("collector p99 ms")
    ax.legend(loc="upper left")
    twin.legend(loc="upper right")


def _freshness(ax: Any, p: dict[str, Any]) -> None:
    for store, name in (("pg", "PostgreSQL"), ("ch", "ClickHouse")):
        for q, style in (("p50", "--"), ("p99", "-")):
            ax.plot(*_xy(p["freshness_series"][store], q), style, label=f"{name} {q}")
    ax.axhline(1000, color="grey", linewidth=0.8)
    ax.set_ylabel("freshness ms")
    ax.legend(loc="upper left")


def _api(ax: Any, p: dict[str, Any]) -> None:
    ax.plot(*_xy(p["api_series"], "p99"), label="customer API p99")
    ax.plot(*_xy(p["api_series"], "p50"), "--", label="customer API p50")
    ax.axhline(20, color="grey", linewidth=0.8)
    ax.set_ylabel("ms")
    ax.legend(loc="upper left")


def _rss(ax: Any, p: dict[str, Any]) -> None:
    for row in [r for r in p["rss"] if r["slope_mib_per_10min"] is not None][:TOP_PROCESSES]:
        ax.plot([t for t, _ in row["points"]], [v for _, v in row["points"]], label=row["process"][:40])
    ax.set_ylabel("RSS MiB")
    ax.legend(loc="upper left", fontsize=7, ncol=2)
