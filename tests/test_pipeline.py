"""End to end against the real servers: HTTP -> spool -> tansu -> PostgreSQL + chDB -> API."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from kafka import KafkaProducer

from collector.app import create_app as create_collector
from olap.client import connect
from spool.segments import SpoolWriter, sealed_segments
from tally.roots import build_api, build_loader_loop, build_rollup_loop, build_shipper


class Pipeline:
    """Every stage of one test's pipeline, each built by the same composition roots as production."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.spool = SpoolWriter(settings.spool_dir, max_bytes=1 << 20, max_age_s=3600)
        self.collector = create_collector(settings, self.spool, start_sealer=False).test_client()
        self.shipper = build_shipper(settings)
        suffix = uuid.uuid4().hex[:8]
        self.rollups = build_rollup_loop(settings, group=f"rollups-{suffix}")
        self.loader = build_loader_loop(settings, group=f"loader-{suffix}")
        self.api_app = build_api(settings)
        self.api = self.api_app.test_client()
        from oltp.tokens import create as create_token

        with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
            _, self.admin_token = create_token(conn, "admin", name="test pipeline")
        self.api_headers: dict[str, str] = {"Authorization": f"Bearer {self.admin_token}"}

    def site_query(self, events) -> dict[str, str]:
        """Query parameters that authenticate `events` at the collector (site keys).

        Registers each domain of the batch once (in the real sites registry), makes the collector's
        copy reload, and returns `?site=` with the key; one `?site=` covers one domain per batch.
        """
        from oltp import sites

        domains = {e["domain"] for e in ([events] if isinstance(events, dict) else events)}
        keys = self.__dict__.setdefault("_site_keys", {})
        new = [d for d in domains if d not in keys]
        for d in new:
            site = sites.get(self.settings.pg_dsn, d) or sites.add(self.settings.pg_dsn, d)
            keys[d] = site.site_key
        if new:
            assert self.collector.application.extensions["tally_registry"].refresh()
        assert len(domains) == 1, "one ?site= authenticates one domain; put a 'site' field in each event instead"
        return {"site": keys[domains.pop()]}

    def post(self, events, **headers):
        resp = self.collector.post("/collect", json=events, headers=headers, query_string=self.site_query(events))
        assert resp.status_code == 202, resp.json
        return resp.json["hashes"]

    def ship(self) -> int:
        self.spool.close()  # seal the open segment
        return self.shipper.ship_once()

    def drain(self) -> None:
        self.rollups.drain()
        self.loader.drain()

    def impressions(self, domain, start, end, granularity="15m", tz="UTC", metric="impressions"):
        resp = self.api.get(f"/api/v1/domains/{domain}/{metric}", query_string={
            "from": start.isoformat(), "to": end.isoformat(), "granularity": granularity, "tz": tz},
            headers=self.api_headers)
        assert resp.status_code == 200, resp.json
        return resp.json

    def sql(self, query):
        resp = self.api.post("/api/v1/sql", json={"sql": query}, headers=self.api_headers)
        assert resp.status_code == 200, resp.json
        return resp.json["rows"]

    def close(self) -> None:
        self.rollups.consumer.close()
        self.loader.consumer.close()
        self.rollups.sink.close()
        self.shipper.close()
        self.collector.application.extensions["tally_registry"].stop()
        self.api_app.extensions["tally_backends"].rollups.pool.close()


@pytest.fixture()
def pipeline(settings):
    p = Pipeline(settings)
    yield p
    p.close()


def at(minutes_ago: int) -> datetime:
    now = datetime.now(UTC)
    return (now - timedelta(minutes=minutes_ago)).replace(second=0, microsecond=0)


def test_events_reach_both_stores_and_the_api(pipeline, domain):
    # 30 impressions in one quarter hour, 20 in another, 5 pageviews: the API must split them right.
    early, late = at(60), at(10)
    events = ([{"domain": domain, "url": f"https://{domain}/a", "type": "impression", "ts": early.isoformat()}] * 30
              + [{"domain": domain, "url": f"https://{domain}/b", "type": "impression", "ts": late.isoformat(),
                  "value": "0.25"}] * 20
              + [{"domain": domain, "url": f"https://{domain}/c", "type": "pageview", "ts": late.isoformat()}] * 5)
    pipeline.post(events[:20])
    pipeline.post(events[20:])
    assert pipeline.ship() == 55
    pipeline.drain()

    body = pipeline.impressions(domain, at(120), datetime.now(UTC))
    assert body["total"] == 50
    counts = {b["start"]: b["count"] for b in body["buckets"]}
    quarter = lambda t: t.replace(minute=t.minute - t.minute % 15).isoformat()  # noqa: E731
    assert counts[quarter(early)] == 30
    assert counts[quarter(late)] == 20
    assert sum(1 for c in counts.values() if c) == 2
    assert len(body["buckets"]) >= 8  # gaps are filled with zero buckets
    assert pipeline.impressions(domain, at(120), datetime.now(UTC), metric="pageviews")["total"] == 5

    rows = pipeline.sql(f"SELECT type, count(), sum(value) FROM tally.events WHERE domain = '{domain}' "
                        "GROUP BY type ORDER BY type")
    assert rows == [["impression", 50, "5.000000"], ["pageview", 5, None]]


def test_same_batch_shipped_twice_is_counted_once(pipeline, domain):
    pipeline.post([{"domain": domain, "url": f"https://{domain}/{i}"} for i in range(40)])
    pipeline.spool.close()
    (segment,) = sealed_segments(pipeline.settings.spool_dir)
    backup = segment.with_suffix(".bak")
    shutil.copy(segment, backup)
    assert pipeline.shipper.ship_once() == 40
    backup.rename(segment)  # as if the shipper crashed after Kafka acked but before deleting
    assert pipeline.shipper.ship_once() == 40
    pipeline.drain()
    assert pipeline.rollups.stored_events == 80  # both copies reached the worker ...
    body = pipeline.impressions(domain, at(60), datetime.now(UTC), metric="pageviews")
    assert body["total"] == 40  # ... and were counted once
    assert pipeline.sql(f"SELECT count() FROM tally.events WHERE domain = '{domain}'") == [[40]]


def test_client_retries_with_the_same_id_are_counted_once(pipeline, domain):
    event = {"domain": domain, "url": f"https://{domain}/", "id": "client-evt-1", "ts": at(5).isoformat()}
    first = pipeline.post(event)
    second = pipeline.post(event)
    assert first == second
    pipeline.ship()
    pipeline.drain()
    assert pipeline.impressions(domain, at(60), datetime.now(UTC), metric="pageviews")["total"] == 1
    assert pipeline.sql(f"SELECT count() FROM tally.events WHERE domain = '{domain}'") == [[1]]


def test_broken_records_on_the_topic_are_set_aside_and_the_rest_counted(pipeline, domain, settings):
    producer = KafkaProducer(bootstrap_servers=list(settings.kafka_bootstrap))
    for value in (b"\xff\xfe garbage", b'{"v": 1, "hash": "nothex"}', b"[]"):
        producer.send(settings.topic, key=domain.encode(), value=value)
    producer.send(settings.topic, key=domain.encode(), value=None)
    producer.flush()
    producer.close()
    pipeline.post([{"domain": domain, "url": f"https://{domain}/"}] * 7)
    pipeline.ship()
    pipeline.drain()
    assert pipeline.impressions(domain, at(60), datetime.now(UTC), metric="pageviews")["total"] == 7
    assert pipeline.rollups.stored_rejects == 4 and pipeline.loader.stored_rejects == 4
    with psycopg.connect(settings.pg_dsn) as conn:
        errors = [r[0] for r in conn.execute(
            "SELECT error FROM rejected_records WHERE topic = %s ORDER BY \"offset\"", (settings.topic,))]
    assert len(errors) == 4 and any("hash" in e for e in errors) and any("JSON" in e for e in errors)
    ch = connect(settings.clickhouse_dsn)
    assert ch.query("SELECT count() FROM tally.rejected_records WHERE topic = {t:String}",
                    parameters={"t": settings.topic}).result_rows == [(4,)]


def test_restarted_workers_resume_from_stored_offsets(pipeline, domain, settings):
    pipeline.post([{"domain": domain, "url": f"https://{domain}/"}] * 10)
    pipeline.ship()
    pipeline.drain()
    group_r, group_l = pipeline.rollups.sink.group, pipeline.loader.sink.group
    pipeline.rollups.consumer.close()
    pipeline.loader.consumer.close()
    pipeline.post([{"domain": domain, "url": f"https://{domain}/"}] * 5)
    pipeline.ship()
    # New worker instances in the same groups: they must start at the stored offsets, not at 0.
    pipeline.rollups = build_rollup_loop(settings, group=group_r)
    pipeline.loader = build_loader_loop(settings, group=group_l)
    pipeline.drain()
    assert pipeline.rollups.stored_events == 5 and pipeline.loader.stored_events == 5
    assert pipeline.impressions(domain, at(60), datetime.now(UTC), metric="pageviews")["total"] == 15
    assert pipeline.sql(f"SELECT count() FROM tally.events WHERE domain = '{domain}'") == [[15]]


def test_day_buckets_follow_the_customer_time_zone(pipeline, domain):
    # Kathmandu is UTC+05:45: local midnight is 18:15Z, so 18:00Z and 18:14Z fall on one local day and
    # 18:15Z and 18:20Z on the next; the quarter-hour tier must split exactly there.
    base = (datetime.now(UTC) - timedelta(days=2)).replace(hour=18, minute=0, second=0, microsecond=0)
    pipeline.post([{"domain": domain, "url": f"https://{domain}/", "type": "impression",
                    "ts": (base + timedelta(minutes=m)).isoformat()} for m in (0, 14, 15, 20)])
    pipeline.ship()
    pipeline.drain()
    body = pipeline.impressions(domain, base - timedelta(days=1), base + timedelta(days=1), granularity="1d",
                                tz="Asia/Kathmandu")
    nonzero = {b["start"]: b["count"] for b in body["buckets"] if b["count"]}
    local = base.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Kathmandu"))
    day0 = local.replace(hour=0, minute=0).isoformat()
    day1 = (local.replace(hour=0, minute=0) + timedelta(days=1)).isoformat()
    assert nonzero == {day0: 2, day1: 2}
    assert all(b["start"].endswith("+05:45") for b in body["buckets"])


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_rollup_worker_pauses_while_postgres_is_down_then_resumes_exactly(pipeline, domain):
    pipeline.post([{"domain": domain, "url": f"https://{domain}/"}] * 12)
    pipeline.ship()
    loop, sink = pipeline.rollups, pipeline.rollups.sink
    real_dsn = sink.dsn
    sink.dsn = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens there: PostgreSQL is "down"
    stop = threading.Event()
    worker = threading.Thread(target=loop.run, args=(stop,))
    worker.start()
    try:
        wait_for(lambda: loop.failures >= 2)
        assert loop.stored_events == 0
        sink.dsn = real_dsn  # PostgreSQL is back
        wait_for(lambda: loop.stored_events >= 12)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert loop.stored_events == 12
    assert pipeline.impressions(domain, at(60), datetime.now(UTC), metric="pageviews")["total"] == 12


def test_a_recreated_topic_is_read_from_its_start_not_from_old_offsets(pipeline, domain, settings):
    """tansu keeps topics in memory, so every `tally up` restart recreates the topic; the stores still
    hold the old incarnation's offsets, which must not be used to skip records of the new one."""
    from kafka import KafkaAdminClient

    from workers.kafka_io import ensure_topic

    pipeline.post([{"domain": domain, "url": f"https://{domain}/"}] * 4)
    pipeline.ship()
    pipeline.drain()
    old_topic_id = pipeline.rollups.topic_id
    assert old_topic_id
    group_r, group_l = pipeline.rollups.sink.group, pipeline.loader.sink.group
    pipeline.rollups.consumer.close()
    pipeline.loader.consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=list(settings.kafka_bootstrap))
    admin.delete_topics([settings.topic])
    admin.close()
    ensure_topic(settings.kafka_bootstrap, settings.topic, settings.partitions)
    pipeline.shipper.close()

    # First the same span as before (offsets 0..3): ClickHouse's insert-dedup token must not mistake
    # it for the old incarnation's batch. Then more, so old offsets would also skip records.
    pipeline.post([{"domain": domain, "url": f"https://{domain}/"}] * 4)
    pipeline.ship()
    pipeline.rollups = build_rollup_loop(settings, group=group_r)
    pipeline.loader = build_loader_loop(settings, group=group_l)
    pipeline.drain()
    pipeline.post([{"domain": domain, "url": f"https://{domain}/"}] * 6)
    pipeline.ship()
    pipeline.drain()
    assert pipeline.rollups.topic_id not in ("", old_topic_id)
    assert pipeline.impressions(domain, at(60), datetime.now(UTC), metric="pageviews")["total"] == 14
    assert pipeline.sql(f"SELECT count() FROM tally.events WHERE domain = '{domain}'") == [[14]]


@pytest.mark.servers("postgres", "broker", "chdb")
def test_the_write_interval_setting_reaches_both_workers_loops(make_settings):
    """TALLY_CONSUMER_WRITE_INTERVAL_MS (ADR 65) is what the composition roots give each loop's writer; 0 by
    default (a write as soon as the last one is done)."""
    for value, seconds in (("750", 0.75), (None, 0.0)):
        settings = make_settings(**({"TALLY_CONSUMER_WRITE_INTERVAL_MS": value} if value else {}))
        loops = [build_rollup_loop(settings, group=f"r-{uuid.uuid4().hex[:8]}", maintenance=False),
                 build_loader_loop(settings, group=f"l-{uuid.uuid4().hex[:8]}")]
        try:
            assert [loop.writer.min_interval_s for loop in loops] == [seconds, seconds]
        finally:
            for loop in loops:
                loop.close()
