"""ADR 14: one rule for a client id reused, the same in both stores, through the real pipeline.

collector test client -> spool -> shipper (and a raw producer, for other partitions) -> tansu ->
rollup worker -> PostgreSQL `rollup_15m`, loader worker -> chDB `tally.events FINAL`.
An exact resend is one event; the same id with any other difference is another event.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from kafka import KafkaProducer

from olap.client import connect
from spool.segments import read_record, sealed_segments, segment_records
from tests.test_pipeline import Pipeline

pytestmark = pytest.mark.servers("postgres", "broker", "chdb")


@pytest.fixture()
def pipeline(make_settings):
    # A 90-day acceptance window, so that one client id can be sent with times in two months.
    p = Pipeline(make_settings(TALLY_MAX_PAST_AGE_S=str(90 * 86_400)))
    yield p
    p.close()


def counts_in_both_stores(settings, domain) -> tuple[dict, dict]:
    """{type: (events, value sum)} per store."""
    with psycopg.connect(settings.pg_dsn) as conn:
        pg = {t: (int(n), s) for t, n, s in conn.execute(
            "SELECT event_type, sum(events), sum(value_sum) FROM rollup_15m WHERE domain = %s GROUP BY 1",
            (domain,))}
    ch = connect(settings.clickhouse_dsn).query(
        "SELECT type, count(), if(count(value) = 0, NULL, sum(value)) FROM tally.events FINAL"
        " WHERE domain = {d:String} GROUP BY type", parameters={"d": domain}).result_rows
    return pg, {t: (int(n), s) for t, n, s in ch}


def test_exact_resends_count_once_and_conflicting_reuses_count_apart_in_both_stores(pipeline, domain):
    now = datetime.now(UTC).replace(microsecond=0)
    old, recent = now - timedelta(days=40), now - timedelta(days=2)  # two different months
    assert (old.year, old.month) != (recent.year, recent.month)
    url = f"https://{domain}/x"
    base = {"domain": domain, "url": url, "type": "impression", "id": "a", "value": "1.5"}
    e1 = {**base, "ts": old.isoformat()}
    e2 = {**base, "ts": recent.isoformat()}                      # same id, other month: another event
    e3 = {**e2, "value": "2.5"}                                  # same id, other value
    e4 = {**e2, "type": "pageview", "value": None}               # same id, other type
    e5 = {"domain": domain, "url": f"https://{domain}/y", "id": "b", "ts": recent.isoformat(), "type": "impression"}
    e6 = {**e5, "url": f"https://{domain}/z"}                    # same id, other url
    e7 = {**e5, "id": "c", "referrer": "https://ref.example/"}
    e8 = {**e7, "referrer": "https://other-ref.example/"}       # same id, other referrer (as stored: ADR 30)
    e9 = {**e5, "id": "d", "ts": (recent + timedelta(milliseconds=1)).isoformat()}
    e10 = {**e9, "ts": (recent + timedelta(milliseconds=2)).isoformat()}  # one millisecond apart
    distinct = [e1, e2, e3, e4, e5, e6, e7, e8, e9, e10]

    # Round 1: every distinct event once, plus an exact resend inside the same request (same batch).
    hashes = pipeline.post(distinct + [e2])
    assert len(set(hashes)) == len(distinct) and hashes[-1] == hashes[1]
    pipeline.ship()
    pipeline.drain()

    # Round 2: exact resends in later batches (and in the older month), written differently.
    resend = [{**e1, "ts": old.astimezone(timezone(timedelta(hours=5, minutes=45))).isoformat()},
              {**e3, "value": "2.500"}, dict(reversed(e5.items()))]
    assert pipeline.post(resend) == [hashes[0], hashes[2], hashes[4]]
    pipeline.ship()
    pipeline.drain()

    # Round 3: exact resends that another collector host shipped to every partition of the topic
    # (a different partition from the first copy's, whatever that was).
    assert pipeline.post([e2, e4, e1]) == [hashes[1], hashes[3], hashes[0]]
    pipeline.spool.close()
    lines = [read_record(line) for seg in sealed_segments(pipeline.settings.spool_dir)
             for line in segment_records(seg.read_bytes())]
    assert len(lines) == 3
    producer = KafkaProducer(bootstrap_servers=list(pipeline.settings.kafka_bootstrap))
    for partition in range(pipeline.settings.partitions):
        for line in lines:
            producer.send(pipeline.settings.topic, key=domain.encode(), value=line, partition=partition)
    producer.flush()
    producer.close()
    for seg in sealed_segments(pipeline.settings.spool_dir):
        seg.unlink()
    pipeline.drain()
    assert pipeline.rollups.stored_rejects == 0 and pipeline.loader.stored_rejects == 0

    expected_counts = Counter(e["type"] for e in distinct)
    expected_sums = {"impression": Decimal("1.5") * 2 + Decimal("2.5"), "pageview": None}
    pg, ch = counts_in_both_stores(pipeline.settings, domain)
    assert {t: n for t, (n, _) in pg.items()} == dict(expected_counts) == {t: n for t, (n, _) in ch.items()}
    assert {t: s for t, (_, s) in pg.items()} == expected_sums == {t: s for t, (_, s) in ch.items()}
    # Each store holds each distinct event once, by the same hashes.
    stored = connect(pipeline.settings.clickhouse_dsn).query(
        "SELECT hash FROM tally.events FINAL WHERE domain = {d:String}", parameters={"d": domain}).result_rows
    assert sorted(h.decode() if isinstance(h, bytes) else h for (h,) in stored) == sorted(set(hashes))
    with psycopg.connect(pipeline.settings.pg_dsn) as conn:
        seen = conn.execute("SELECT count(*) FROM seen_events WHERE hash = ANY(%s::uuid[])",
                            (sorted(set(hashes)),)).fetchone()[0]
    assert seen == len(distinct)

