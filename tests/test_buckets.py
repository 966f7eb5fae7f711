"""Bucket boundaries (pure logic): quarter hours, odd offsets, DST days, limits."""

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from oltp.queries import MAX_BUCKETS, QueryError, bucket_bounds

UTC = ZoneInfo("UTC")


def utc(*args):
    return datetime(*args, tzinfo=timezone.utc)


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
