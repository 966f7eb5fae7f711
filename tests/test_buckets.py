"""Bucket boundaries (pure logic): quarter hours, odd offsets, DST days, limits."""

from datetime import UTC as FIXED_UTC
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from oltp.queries import MAX_BUCKETS, QueryError, bucket_bounds

UTC = ZoneInfo("UTC")


def utc(*args):
    return datetime(*args, tzinfo=FIXED_UTC)


def test_quarter_hours_floor_the_start_and_cover_the_end():
    bounds = bucket_bounds(utc(2026, 1, 1, 10, 7), utc(2026, 1, 1, 10, 46), "15m", UTC)
    assert [b.strftime("%H:%M") for b in bounds] == ["10:00", "10:15", "10:30", "10:45", "11:00"]


def test_hours_in_a_quarter_offset_zone_start_at_local_hours():
    kathmandu = ZoneInfo("Asia/Kathmandu")  # +05:45
    bounds = bucket_bounds(utc(2026, 1, 1, 10, 0), utc(2026, 1, 1, 12, 0), "1h", kathmandu)
    assert [b.astimezone(kathmandu).strftime("%H:%M") for b in bounds] == ["15:00", "16:00", "17:00", "18:00"]
    assert bounds[0] == utc(2026, 1, 1, 9, 15)


def test_days_follow_dst_with_23_and_25_hour_days():
    berlin = ZoneInfo("Europe/Berlin")
    spring = bucket_bounds(utc(2026, 3, 28, 23, 0), utc(2026, 3, 30, 0, 0), "1d", berlin)
    assert (spring[1] - spring[0]).total_seconds() == 23 * 3600
    autumn = bucket_bounds(utc(2026, 10, 24, 22, 0), utc(2026, 10, 26, 0, 0), "1d", berlin)
    assert (autumn[1] - autumn[0]).total_seconds() == 25 * 3600
    assert all(b.astimezone(berlin).hour == 0 for b in spring + autumn)


@pytest.mark.parametrize("start, end, granularity, words", [
    (utc(2026, 1, 2), utc(2026, 1, 1), "15m", "after"),
    (utc(2026, 1, 1), utc(2026, 1, 1), "1h", "after"),
    (utc(2026, 1, 1), utc(2026, 1, 1, 1), "5m", "granularity"),
    (utc(2020, 1, 1), utc(2026, 1, 1), "1h", str(MAX_BUCKETS)),
])
def test_bad_ranges_are_refused(start, end, granularity, words):
    with pytest.raises(QueryError) as info:
        bucket_bounds(start, end, granularity, UTC)
    assert words in str(info.value)


# ---- the bucket rule (docs/adr/0012-bucket-rule.md) at clock changes ----------------------------

def local_labels(bounds, tz):
    """Each bucket as 'start(+offset)/minutes'."""
    return [f"{a.astimezone(tz).strftime('%d %H:%M%z')}/{int((b - a).total_seconds() // 60)}"
            for a, b in zip(bounds, bounds[1:], strict=False)]


def test_a_repeated_hour_is_two_buckets_each_with_its_own_offset():
    berlin = ZoneInfo("Europe/Berlin")
    bounds = bucket_bounds(utc(2026, 10, 24, 23, 0), utc(2026, 10, 25, 3, 0), "1h", berlin)
    assert local_labels(bounds, berlin) == ["25 01:00+0200/60", "25 02:00+0200/60", "25 02:00+0100/60",
                                            "25 03:00+0100/60"]


def test_a_skipped_hour_has_no_bucket():
    berlin = ZoneInfo("Europe/Berlin")
    bounds = bucket_bounds(utc(2026, 3, 29, 0, 0), utc(2026, 3, 29, 2, 0), "1h", berlin)
    assert local_labels(bounds, berlin) == ["29 01:00+0100/60", "29 03:00+0200/60"]


def test_lord_howe_hours_across_its_30_minute_changes():
    """Old behaviour was wrong here: hours after the change started at :30 local."""
    lord_howe = ZoneInfo("Australia/Lord_Howe")  # +10:30 standard, +11:00 summer
    spring = bucket_bounds(utc(2026, 10, 3, 13, 30), utc(2026, 10, 3, 17, 0), "1h", lord_howe)
    # 02:00 -> 02:30: local 02:00-02:29 never happens; the hour-2 bucket is the 30 minutes 02:30-03:00.
    assert local_labels(spring, lord_howe) == ["04 00:00+1030/60", "04 01:00+1030/60", "04 02:30+1100/30",
                                               "04 03:00+1100/60"]
    autumn = bucket_bounds(utc(2026, 4, 4, 13, 0), utc(2026, 4, 4, 17, 0), "1h", lord_howe)
    # 02:00 -> 01:30: local 01:30-01:59 happens twice; no hour boundary repeats, so hour 1 lasts 90 minutes.
    assert local_labels(autumn, lord_howe) == ["05 00:00+1100/60", "05 01:00+1100/90", "05 02:00+1030/60",
                                               "05 03:00+1030/60"]
    quarters = bucket_bounds(utc(2026, 4, 4, 14, 30), utc(2026, 4, 4, 15, 30), "15m", lord_howe)
    assert local_labels(quarters, lord_howe) == ["05 01:30+1100/15", "05 01:45+1100/15", "05 01:30+1030/15",
                                                 "05 01:45+1030/15"]
    assert all(b.astimezone(lord_howe).minute in (0, 30) for b in spring + autumn)


def test_a_day_whose_midnight_is_skipped_starts_at_the_first_local_time():
    sao_paulo = ZoneInfo("America/Sao_Paulo")  # 2018-11-04 00:00 -> 01:00
    bounds = bucket_bounds(utc(2018, 11, 3, 12), utc(2018, 11, 5, 12), "1d", sao_paulo)
    assert local_labels(bounds, sao_paulo) == ["03 00:00-0300/1440", "04 01:00-0200/1380", "05 00:00-0200/1440"]


def test_a_skipped_day_has_no_bucket():
    apia = ZoneInfo("Pacific/Apia")  # 2011-12-29 24:00 -10:00 -> 2011-12-31 00:00 +14:00
    bounds = bucket_bounds(utc(2011, 12, 29, 12), utc(2011, 12, 30, 12), "1d", apia)
    assert local_labels(bounds, apia) == ["29 00:00-1000/1440", "31 00:00+1400/1440"]


def test_hours_in_odd_offset_zones_start_at_local_hours_every_season():
    for key, minute in (("Asia/Kathmandu", 15), ("Pacific/Chatham", 15), ("Australia/Eucla", 15),
                        ("Asia/Kolkata", 30), ("America/St_Johns", 30)):
        tz = ZoneInfo(key)
        for month in (1, 7):
            bounds = bucket_bounds(utc(2026, month, 1), utc(2026, month, 2), "1h", tz)
            assert all(b.astimezone(tz).minute == 0 for b in bounds), key
            assert all(b.minute == minute for b in bounds), key  # ...which are :15 / :30 / :45 UTC


@pytest.mark.parametrize("key, start, end, granularity", [
    ("America/St_Johns", utc(2010, 3, 14, 2), utc(2010, 3, 14, 6), "1h"),  # changed at 00:01 local until 2011
    ("America/St_Johns", utc(2010, 11, 7, 2), utc(2010, 11, 7, 6), "15m"),
    ("Asia/Gaza", utc(2011, 3, 31, 20), utc(2011, 4, 1, 2), "1h"),
    ("Africa/Monrovia", utc(1971, 6, 1), utc(1971, 6, 2), "1d"),  # -00:44:30 until 1972
    ("Pacific/Kiritimati", utc(1975, 1, 1), utc(1975, 1, 2), "1h"),  # -10:40 until 1979
])
def test_boundaries_off_the_utc_quarter_hours_are_refused(key, start, end, granularity):
    with pytest.raises(QueryError, match="not on a UTC quarter hour"):
        bucket_bounds(start, end, granularity, ZoneInfo(key))


def test_days_in_newfoundland_are_fine_even_when_its_hours_are_not():
    st_johns = ZoneInfo("America/St_Johns")  # the 00:01 change moves no midnight
    bounds = bucket_bounds(utc(2010, 3, 13, 12), utc(2010, 3, 15, 12), "1d", st_johns)
    assert local_labels(bounds, st_johns) == ["13 00:00-0330/1440", "14 00:00-0330/1380", "15 00:00-0230/1440"]


def test_ranges_before_1970_are_refused():
    with pytest.raises(QueryError, match="1970"):
        bucket_bounds(utc(1969, 12, 31, 23), utc(1970, 1, 1, 1), "1h", UTC)


def test_max_buckets_counts_real_buckets():
    start = utc(2026, 1, 1)
    ok = bucket_bounds(start, start + (utc(2026, 1, 2) - start) * MAX_BUCKETS / 96, "15m", UTC)
    assert len(ok) == MAX_BUCKETS + 1
    with pytest.raises(QueryError, match=str(MAX_BUCKETS)):
        bucket_bounds(start, ok[-1] + (ok[1] - ok[0]) / 2, "15m", UTC)


def test_offset_changes_are_further_apart_than_the_scan_step():
    """bucket_bounds finds clock changes by sampling every _SCAN_S seconds: check that assumption
    against every zone's transition table since 1970 (read from the pure-Python zoneinfo)."""
    import zoneinfo
    from zoneinfo import _zoneinfo

    from oltp.queries import _SCAN_S

    closest = None
    for key in zoneinfo.available_timezones():
        tz = ZoneInfo(key)
        real = [t for t in _zoneinfo.ZoneInfo.no_cache(key)._trans_utc
                if t > 0 and datetime.fromtimestamp(t - 1, tz).utcoffset() != datetime.fromtimestamp(t, tz).utcoffset()]
        for a, b in zip(real, real[1:], strict=False):
            closest = b - a if closest is None else min(closest, b - a)
    assert closest is not None and closest > 4 * _SCAN_S


@pytest.mark.parametrize("key", ["Europe/Berlin", "Australia/Lord_Howe", "America/St_Johns", "Asia/Kathmandu",
                                 "Pacific/Apia", "Africa/Casablanca", "UTC"])
def test_the_per_year_cached_changes_of_any_window_are_the_zones_own_transitions(key):
    """`_changes` answers a window from per-year scans cached for the process: its slice of them is exactly the
    transitions in the zone's own table (pure-Python zoneinfo) inside (lo, hi], for windows that start and end
    anywhere, on a transition, on a year boundary, within one year or across many (up to the table's last entry:
    later changes come from the zone's rule, not its table)."""
    import random
    from zoneinfo import _zoneinfo

    from oltp.queries import _changes

    tz = ZoneInfo(key)
    table = _zoneinfo.ZoneInfo.no_cache(key)._trans_utc
    end = max(table[-1] if table else 0, 2_000_000_000)  # UTC has no table: any window
    real = [t for t in table
            if t > 0 and datetime.fromtimestamp(t - 1, tz).utcoffset() != datetime.fromtimestamp(t, tz).utcoffset()]
    years = [int(datetime(y, 1, 1, tzinfo=FIXED_UTC).timestamp()) for y in (1971, 1990, 2024, 2025, 2026)]
    rng = random.Random(key)
    points = [*years, *real[:: max(1, len(real) // 20)], *(rng.randrange(1, end) for _ in range(40))]
    for _ in range(300):
        lo = rng.choice(points) + rng.choice((-1, 0, 0, 1, 3600))
        hi = min(end, lo + rng.choice((1, 3600, 86_400 * 3, 86_400 * 95, 86_400 * 800, 86_400 * 4000)))
        found = _changes(tz, lo, hi)
        assert [b for b, _, _ in found] == [t for t in real if lo < t <= hi], (key, lo, hi)
        for b, before, after in found:
            assert before == datetime.fromtimestamp(b - 1, tz).utcoffset().total_seconds()
            assert after == datetime.fromtimestamp(b, tz).utcoffset().total_seconds()


# ---- refusing a range too long for MAX_BUCKETS before any bucket is computed (attack review) ----------------

def _counting_boundaries(monkeypatch):
    """Replace oltp.queries._boundaries (the zone scan and bucket rule) with a counting pass-through."""
    from oltp import queries

    calls = []
    real = queries._boundaries

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(queries, "_boundaries", counting)
    return calls


@pytest.mark.parametrize("key, granularity, start, end", [
    # The review's request: 27 years of days at year 6543 (a fresh year every time: no cache helps) - it used to
    # scan the zone for every one of those years before counting the buckets.
    ("America/Santiago", "1d", utc(6543, 1, 1), utc(6570, 4, 1)),
    ("America/Santiago", "1d", utc(2026, 1, 1), utc(2026, 1, 1) + timedelta(days=MAX_BUCKETS + 2, seconds=1)),
    ("Europe/Berlin", "1h", utc(2026, 1, 1), utc(2026, 1, 1) + timedelta(hours=MAX_BUCKETS + 48, seconds=1)),
    ("Australia/Lord_Howe", "15m", utc(2026, 1, 1),
     utc(2026, 1, 1) + timedelta(minutes=15 * MAX_BUCKETS + 48 * 60, seconds=1)),
    ("UTC", "1d", utc(1970, 1, 1), utc(9001, 1, 1)),
])
def test_a_range_too_long_for_max_buckets_is_refused_before_any_bucket_is_computed(monkeypatch, key, granularity,
                                                                                   start, end):
    calls = _counting_boundaries(monkeypatch)
    with pytest.raises(QueryError, match=f"the range spans more than {MAX_BUCKETS} buckets"):
        bucket_bounds(start, end, granularity, ZoneInfo(key))
    assert calls == []


def _longest_window(tz, granularity, lo, hi):
    """The MAX_BUCKETS consecutive buckets of `granularity` in `tz` between lo and hi that last longest:
    (first bound, last bound)."""
    from oltp.queries import NOMINAL_S, boundaries

    found = boundaries(tz, int(lo.timestamp()), int(hi.timestamp()), NOMINAL_S[granularity])
    i = max(range(len(found) - MAX_BUCKETS), key=lambda i: found[i + MAX_BUCKETS] - found[i])
    return (datetime.fromtimestamp(found[i], FIXED_UTC), datetime.fromtimestamp(found[i + MAX_BUCKETS], FIXED_UTC))


@pytest.mark.parametrize("key, granularity, lo, hi", [
    ("America/Santiago", "1d", utc(2000, 1, 1), utc(2030, 1, 1)),  # DST days: 23 and 25 h
    ("Europe/Berlin", "1d", utc(2000, 1, 1), utc(2030, 1, 1)),
    ("Antarctica/Vostok", "1d", utc(1975, 1, 1), utc(2000, 1, 1)),  # a 31-hour day in 1994 (+07 -> -00)
    ("Antarctica/Rothera", "1d", utc(1970, 1, 1), utc(1995, 1, 1)),  # -00 -> -03 in 1976
    ("Australia/Lord_Howe", "1h", utc(2026, 1, 1), utc(2027, 1, 1)),  # a 90-minute hour every April
    ("America/Caracas", "1h", utc(2007, 6, 1), utc(2008, 6, 1)),  # -04 -> -04:30 in 2007
    ("Europe/Berlin", "15m", utc(2026, 10, 1), utc(2026, 12, 1)),  # a repeated hour: 4 more quarters
])
def test_exactly_max_buckets_are_kept_where_the_clock_moves_back(monkeypatch, key, granularity, lo, hi):
    """The cheap length check refuses nothing the bucket count keeps: the longest MAX_BUCKETS buckets of zones
    whose clock moved back (longer than MAX_BUCKETS nominal steps) are answered, one second more is not."""
    from oltp.queries import _RANGE_SLACK_S, NOMINAL_S

    tz = ZoneInfo(key)
    start, end = _longest_window(tz, granularity, lo, hi)
    nominal = timedelta(seconds=NOMINAL_S[granularity] * MAX_BUCKETS)
    if granularity != "15m":  # no quarter hour is ever longer than 15 minutes: the window is exactly nominal
        assert end - start > nominal, (key, end - start - nominal)
    assert end - start <= nominal + timedelta(seconds=_RANGE_SLACK_S)
    bounds = bucket_bounds(start, end, granularity, tz)
    assert len(bounds) == MAX_BUCKETS + 1 and (bounds[0], bounds[-1]) == (start, end)
    assert len(bucket_bounds(start + timedelta(seconds=1), end, granularity, tz)) == MAX_BUCKETS + 1
    with pytest.raises(QueryError, match=f"more than {MAX_BUCKETS} buckets"):
        bucket_bounds(start, end + timedelta(seconds=1), granularity, tz)
