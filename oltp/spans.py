"""One range read from several tiers at once: whole local days from the daily tier, whole UTC hours
from the hourly one, the ragged quarter hours at the edges from the 15-minute one (ADR 48).

A breakdown, a percentile or a filtered total is one number over a range, not a series: every tier
whose rows lie inside the range gives the same sums, so the range is cut where the coarser tiers align
and each piece is read from the coarsest tier that holds it. The combined-filter tables (`rollup_cube_*`)
have no 15-minute tier: with `hourly_only` the range is first widened to the UTC hours covering it (the
answer's `from`/`to` say so).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from oltp.queries import QUARTER_S, DailyZone, OutsideRetention, QueryError, Retention, boundaries

HOUR_S = 3600
DAY_S = 86400


@dataclass(frozen=True, slots=True)
class Span:
    tier: str  # 15m, 1h or 1d (1w: oltp/breakdown.py's pre-merged weeks)
    lo: datetime
    hi: datetime
    sign: int = 1  # -1: rows subtracted (a pre-merged week's days outside the range: oltp/breakdown.py)


def _ts(t: datetime) -> int:
    return int(t.timestamp())


def _dt(t: int) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def widen_to_hours(lo: datetime, hi: datetime) -> tuple[datetime, datetime]:
    """The UTC whole hours covering [lo, hi)."""
    a, b = _ts(lo), -(-_ts(hi) // HOUR_S) * HOUR_S
    return _dt(a - a % HOUR_S), _dt(b)


def _hourly(lo: int, hi: int, hourly_only: bool) -> list[Span]:
    """[lo, hi) as 15m edges around whole hours (whole hours only with `hourly_only`: lo, hi are hours)."""
    h_lo, h_hi = -(-lo // HOUR_S) * HOUR_S, hi - hi % HOUR_S
    if hourly_only or h_lo < h_hi:
        pieces = [("15m", lo, h_lo), ("1h", h_lo, h_hi), ("15m", h_hi, hi)]
    else:
        pieces = [("15m", lo, hi)]
    return [Span(tier, _dt(a), _dt(b)) for tier, a, b in pieces if a < b]


def _days(lo: int, hi: int, daily: DailyZone | None, hourly_only: bool) -> tuple[int, int] | None:
    """The whole local days of the daily tier inside [lo, hi), as (first start, last end), or None."""
    if daily is None or daily.written_tz != daily.registered_tz or daily.complete_from is None:
        return None
    first = max(lo, _ts(daily.complete_from))
    if hi - first < DAY_S - 2 * HOUR_S:  # no whole day can fit (the shortest is 23 h; Lord Howe 23.5 h)
        return None
    starts = [b for b in boundaries(ZoneInfo(daily.registered_tz), first, hi + 1, DAY_S)
              if b % QUARTER_S == 0 and (not hourly_only or b % HOUR_S == 0)]
    if len(starts) < 2:
        return None
    return starts[0], starts[-1]


def spans(lo: datetime, hi: datetime, daily: DailyZone | None, *, hourly_only: bool = False) -> list[Span]:
    """[lo, hi) (UTC quarter hours) cut into pieces, each from the coarsest tier that holds it whole.
    With `hourly_only` (the cube tables) the range is widened to whole hours first (widen_to_hours)."""
    if _ts(lo) % QUARTER_S or _ts(hi) % QUARTER_S or hi <= lo:
        raise QueryError("the range must start and end on UTC quarter hours, 'to' after 'from'")
    if hourly_only:
        lo, hi = widen_to_hours(lo, hi)
    a, b = _ts(lo), _ts(hi)
    days = _days(a, b, daily, hourly_only)
    if days is None:
        return _hourly(a, b, hourly_only)
    return [*_hourly(a, days[0], hourly_only), Span("1d", _dt(days[0]), _dt(days[1])),
            *_hourly(days[1], b, hourly_only)]


def tier_label(found: list[Span]) -> str:
    """The tiers that served, coarsest first, joined by '+' (e.g. '1d+1h+15m')."""
    used = {s.tier for s in found}
    return "+".join(t for t in ("1d", "1h", "15m") if t in used) or "15m"


def check_retention(found: list[Span], retention: Retention, now: datetime, counted_before: bool) -> None:
    """OutsideRetention when a piece's tier has dropped its start and the domain had rows before that
    tier's cutoff (`counted_before`, as the series routing decides: ADR 19)."""
    for s in found:
        if not retention.keeps(s.tier, s.lo, now) and counted_before:
            days = retention.days(s.tier)
            raise OutsideRetention(s.tier, days, now - timedelta(days=days), [])


def earliest_cutoff(found: list[Span], retention: Retention, now: datetime) -> datetime | None:
    """The cutoff of the first piece whose tier no longer keeps it (None: every piece is kept)."""
    for s in found:
        if not retention.keeps(s.tier, s.lo, now):
            return now - timedelta(days=retention.days(s.tier))
    return None
