"""`tally topic show|grow N` and running clients following the topic's partitions (issue 19 §3;
docs/adr/0060-site-limits-across-hosts-and-topic-grow.md), against the session's real tansu broker.

tansu 0.6.0 does not implement CreatePartitions (its ApiVersions answer leaves it out; kafka-python says
IncompatibleBrokerVersion): `grow` refuses, naming the procedure, and changes nothing. The procedure (drain,
recreate the topic with more partitions) is tested with a running shipper and running rollup and loader
loops that are never rebuilt: they pick the new partitions up (the group rebalances over six partitions),
and both stores count every event once. The clients' metadata refresh (what makes them see a topic grown in
place on a broker that can) is checked on a running producer and consumer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from core.records import partition_for
from tally.roots import build_loader_loop, build_rollup_loop
from tests.cli_inproc import run_tally
from tests.test_pipeline import Pipeline
from workers.kafka_io import METADATA_MAX_AGE_MS, ensure_topic, make_consumer, make_producer
from workers.topic_admin import TopicAdminError, describe, grow

pytestmark = pytest.mark.servers("postgres", "broker", "chdb", "analyst")
ROOT = Path(__file__).resolve().parent.parent


def tally(settings, *args: str, process: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    """`tally topic *args` in this process (tests/cli_inproc.py), or as a real process with `process`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    base.update({"TALLY_HOME": str(settings.home), "TALLY_KAFKA_BOOTSTRAP": ",".join(settings.kafka_bootstrap),
                 "TALLY_KAFKA_TOPIC": settings.topic, "PYTHONPATH": str(ROOT), **env})
    if not process:
        return run_tally(["topic", *args], base)
    return subprocess.run([sys.executable, "-m", "tally.cli", "topic", *args], env=base, capture_output=True,
                          text=True, timeout=90)


@pytest.mark.servers("broker")
def test_show_prints_the_partitions_their_end_offsets_and_where_a_domain_goes(settings):
    ensure_topic(settings.kafka_bootstrap, settings.topic, 3)
    producer = make_producer(settings.kafka_bootstrap)
    for i in range(7):  # one record a batch: tansu's end offset is its last batch's base offset + 1
        producer.send(settings.topic, key=f"d{i}.example".encode(), value=b"x")
        producer.flush(10)
    producer.close(5)
    out = tally(settings, "show", "--json", "--domain", "a.example", "--domain", "b.example")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["partitions"] == 3 and sum(shown["end_offsets"].values()) == 7 and shown["topic_id"]
    assert shown["domains"] == {d: partition_for(d.encode(), 3) for d in ("a.example", "b.example")}
    text = tally(settings, "show")
    assert text.returncode == 0 and "3 partition(s)" in text.stdout and "end offset" in text.stdout, text.stdout


@pytest.mark.servers("broker")
def test_grow_refuses_what_it_cannot_do_and_changes_nothing(settings, closed_port):
    ensure_topic(settings.kafka_bootstrap, settings.topic, 3)
    for n, code, words in (("3", 2, "can only grow"), ("2", 2, "can only grow"), ("0", 2, "positive"),
                           ("20000", 2, "grow in steps")):
        out = tally(settings, "grow", n)
        assert out.returncode == code and words in out.stderr and "Traceback" not in out.stderr, (n, out.stderr)
    missing = tally(settings, "grow", "6", TALLY_KAFKA_TOPIC=f"nope-{uuid.uuid4().hex[:8]}")
    assert missing.returncode == 1 and "does not exist" in missing.stderr, missing.stderr
    down = tally(settings, "show", TALLY_KAFKA_BOOTSTRAP=closed_port.address)
    assert down.returncode == 1 and "cannot reach the broker" in down.stderr and "Traceback" not in down.stderr
    assert describe(settings.kafka_bootstrap, settings.topic).partitions == 3


@pytest.mark.servers("broker")
def test_grow_on_tansu_says_why_not_and_names_the_procedure(settings):
    """tansu 0.6.0 answers ApiVersions without CreatePartitions (key 37): the refusal says so."""
    ensure_topic(settings.kafka_bootstrap, settings.topic, 3)
    with pytest.raises(TopicAdminError) as exc:
        grow(settings.kafka_bootstrap, settings.topic, 6)
    assert exc.value.code == "unsupported"
    out = tally(settings, "grow", "6", process=True)  # the exit status the shell sees
    assert out.returncode == 1 and "does not implement CreatePartitions" in out.stderr, out.stderr
    assert "Growing the topic" in out.stderr
    assert describe(settings.kafka_bootstrap, settings.topic).partitions == 3


@pytest.mark.servers("broker")
def test_running_clients_refresh_their_topic_metadata_within_seconds(settings):
    """How a running shipper and the consumer group's leader see a topic grown in place (no error tells them):
    their periodic metadata refresh, every METADATA_MAX_AGE_MS (kafka-python's default was 5 minutes)."""
    ensure_topic(settings.kafka_bootstrap, settings.topic, 3)
    producer = make_producer(settings.kafka_bootstrap)
    consumer = make_consumer(settings.kafka_bootstrap, f"g-{uuid.uuid4().hex[:8]}", session_timeout_ms=6000)
    try:
        assert producer.partitions_for(settings.topic) == {0, 1, 2}
        consumer.subscribe([settings.topic])
        consumer.poll(timeout_ms=500)
        first = (producer._metadata._last_successful_refresh_ms, consumer._client.cluster._last_successful_refresh_ms)
        deadline = time.monotonic() + 3 * METADATA_MAX_AGE_MS / 1000 + 10  # generous: a loaded machine
        while time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
            now = (producer._metadata._last_successful_refresh_ms, consumer._client.cluster._last_successful_refresh_ms)
            if now[0] > first[0] and now[1] > first[1]:
                break
        assert now[0] > first[0] and now[1] > first[1], (first, now)  # both refreshed, unasked
    finally:
        consumer.close()
        producer.close(5)


def _post_many(pipeline: Pipeline, domains: list[str], per_domain: int) -> int:
    for domain in domains:
        pipeline.post([{"domain": domain, "url": f"https://{domain}/{i}"} for i in range(per_domain)])
    return len(domains) * per_domain


def test_the_tansu_procedure_more_partitions_under_a_running_shipper_nothing_lost_or_doubled(settings):
    """The README's procedure on tansu (no CreatePartitions): drain, stop the workers, recreate the topic with 6
    partitions instead of 3, start the workers again. The shipper keeps running throughout (never rebuilt): it
    sends to all six partitions. The workers' groups spread over all six, and each event is counted once in
    PostgreSQL and in ClickHouse, those of the domains whose partition changed included."""
    pipeline = Pipeline(settings)
    try:
        domains = [f"g{i}-{uuid.uuid4().hex[:6]}.example" for i in range(12)]
        sent = _post_many(pipeline, domains, 3)
        pipeline.ship()
        pipeline.drain()
        assert {tp.partition for tp in pipeline.rollups.consumer.assignment()} == {0, 1, 2}
        groups = pipeline.rollups.sink.group, pipeline.loader.sink.group
        pipeline.rollups.consumer.close()  # the workers stop (drained)
        pipeline.loader.consumer.close()
        admin = KafkaAdminClient(bootstrap_servers=list(settings.kafka_bootstrap))
        admin.delete_topics([settings.topic])
        admin.close()
        ensure_topic(settings.kafka_bootstrap, settings.topic, 6)
        sent += _post_many(pipeline, domains, 2)
        pipeline.ship()  # the same shipper: it follows the new topic and its six partitions
        state = describe(settings.kafka_bootstrap, settings.topic)
        assert state.partitions == 6 and {p for p, end in state.end_offsets.items() if end > 0} & {3, 4, 5}, state
        pipeline.rollups = build_rollup_loop(settings, group=groups[0])  # the workers start again
        pipeline.loader = build_loader_loop(settings, group=groups[1])
        pipeline.drain()
        for loop in (pipeline.rollups, pipeline.loader):
            assert {tp.partition for tp in loop.consumer.assignment()} == set(range(6))
        moved = [d for d in domains if partition_for(d.encode(), 6) != partition_for(d.encode(), 3)]
        assert moved, "some domain changes partition with the count"
        since, until = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
        for domain in domains:
            assert pipeline.impressions(domain, since, until, metric="pageviews")["total"] == 5, domain
        names = ", ".join(f"'{d}'" for d in domains)
        assert pipeline.sql(f"SELECT count(), uniqExact(hash) FROM tally.events FINAL WHERE domain IN ({names})") \
            == [[sent, sent]]
    finally:
        pipeline.close()
