"""Value percentiles from the DDSketch-style bins `value_bins_*` (spec of issue 17, ADR 48).

Bin k holds the values in (GAMMA^(k-1), GAMMA^k]; its estimate is 2*GAMMA^k/(GAMMA+1), within
ALPHA = 1 % of every value in it. Bin ZERO_BIN holds the zeros. Bins of any set of rows merge by adding
counts. The rank rule is DDSketch's: quantile q (0..1) of n values is the first bin, in value order,
whose cumulative count exceeds q*(n-1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

# The bins are written by the rollup sink's SQL (oltp/rollup_dims.py): one definition of their mapping.
from oltp.rollup_dims import ALPHA as ALPHA
from oltp.rollup_dims import GAMMA as GAMMA
from oltp.rollup_dims import ZERO_BIN as ZERO_BIN
from oltp.rollup_dims import bin_of as bin_of

MAX_PERCENTILES = 10


class PercentileError(ValueError):
    """A `percentiles` parameter the API refuses; the message says why."""


def bin_value(k: int) -> float:
    """The estimate of every value in bin k."""
    return 0.0 if k == ZERO_BIN else 2 * GAMMA ** k / (GAMMA + 1)


def parse_percentiles(text: str) -> tuple[float, ...]:
    """'50,95,99' -> (50.0, 95.0, 99.0): integers or decimals in (0, 100), at most MAX_PERCENTILES, no
    repeats, in the order given. Raises PercentileError naming the bad one.

    The count is checked on the raw comma-separated parts before any is converted (a repeat counts too), and
    repeats are found with a set: a 250 KB list of numbers is refused at once, not after parsing every one."""
    parts = text.split(",", MAX_PERCENTILES)  # at most MAX_PERCENTILES + 1 parts: the last holds any rest
    if len(parts) > MAX_PERCENTILES:
        raise PercentileError(f"at most {MAX_PERCENTILES} percentiles")
    out: list[float] = []
    seen: set[float] = set()
    for part in parts:
        part = part.strip()
        try:
            p = float(part)
        except ValueError:
            raise PercentileError(f"percentile {part[:20]!r} is not a number") from None
        if not (0 < p < 100) or not math.isfinite(p):
            raise PercentileError(f"percentile {part[:20]!r} must lie strictly between 0 and 100")
        if p not in seen:
            seen.add(p)
            out.append(p)
    return tuple(out)


def label(p: float) -> str:
    """The answer's key: 50 -> 'p50', 99.9 -> 'p99.9'."""
    return f"p{p:g}"


def quantiles(counts: Mapping[int, int] | Iterable[tuple[int, int]], ps: Iterable[float]) -> dict[str, float | None]:
    """{label: estimate} for percentiles `ps` of the bins `counts` (bin -> count); None for every one
    when no value was counted. Estimates are rounded to 6 decimal places."""
    merged: dict[int, int] = {}
    for k, c in (counts.items() if isinstance(counts, Mapping) else counts):
        merged[k] = merged.get(k, 0) + int(c)
    ordered = sorted((k, c) for k, c in merged.items() if c > 0)
    n = sum(c for _, c in ordered)
    out: dict[str, float | None] = {}
    for p in ps:
        if n == 0:
            out[label(p)] = None
            continue
        rank = p / 100 * (n - 1)
        seen = 0
        for k, c in ordered:
            seen += c
            if seen > rank:
                out[label(p)] = round(bin_value(k), 6)
                break
    return out
