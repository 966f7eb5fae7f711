"""Prometheus /metrics on the collector and the API (docs/adr/0021-metrics.md).

Scrapes are parsed with prometheus_client.parser and compared with exactly what was sent. The in-process
tests (Flask's test client, the real shipper, workers and analyst server of the session) share this
process's registry; one test runs `tally collector` under granian with 2 workers, whose values are summed
through the multiprocess directory.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from collector.metrics import spool_families
from core import metrics
from core.config import ConfigError, Settings
from infra.processes import free_port
from oltp import sites
from spool.segments import SpoolWriter, frame
from tests.conftest import SECRET, register
from tests.test_pipeline import Pipeline

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset(labels)): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def scrape(client) -> dict:
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.data[:300]
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(resp.get_data(as_text=True))


def hit(domain: str, **extra) -> dict:
    return {"domain": domain, "url": f"https://{domain}/", "type": "impression", **extra}


# ------------------------------------------------------------------------------------ who may scrape

@pytest.mark.parametrize("addr, allowed", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True), ("[::1]", True),
    ("10.0.0.1", False), ("203.0.113.7", False), ("::ffff:203.0.113.7", False), ("2001:db8::1", False),
    ("", False), (None, False), ("not an address", False), ("127.0.0.1:8080", False),
])
def test_client_allowed_by_network(addr, allowed):
    assert metrics.client_allowed(addr, LOOPBACK) is allowed


def test_allowed_nets_setting_default_custom_and_bad_values():
    assert Settings.from_env({}).metrics_allowed_nets == LOOPBACK
    nets = Settings.from_env({"TALLY_METRICS_ALLOWED_NETS": "10.1.2.3, 192.168.0.0/16"}).metrics_allowed_nets
    assert metrics.client_allowed("10.1.2.3", nets) and metrics.client_allowed("192.168.7.7", nets)
    assert not metrics.client_allowed("10.1.2.4", nets) and not metrics.client_allowed("127.0.0.1", nets)
    for bad, words in (("10.0.0.0/33", "'10.0.0.0/33' is not an IP network"), ("localhost", "'localhost' is not"),
                       (" , ", "lists no network")):
        with pytest.raises(ConfigError, match="TALLY_METRICS_ALLOWED_NETS") as err:
            Settings.from_env({"TALLY_METRICS_ALLOWED_NETS": bad})
        assert words in str(err.value)


def test_collector_metrics_refuses_other_networks(app, client, make_settings, spool, registry):
    resp = client.get("/metrics", environ_base={"REMOTE_ADDR": "203.0.113.7"})
    assert resp.status_code == 403
    assert resp.json["error"]["code"] == "metrics_forbidden"
    assert "TALLY_METRICS_ALLOWED_NETS" in resp.json["error"]["message"]
    assert "203.0.113.7" in resp.json["error"]["message"] and b"tally_" not in resp.data.split(b'"message"')[0]
    assert client.get("/metrics").status_code == 200  # the test client's 127.0.0.1
    # Another allowlist: that network only, loopback refused.
    from collector.app import create_app

    other = create_app(make_settings(TALLY_METRICS_ALLOWED_NETS="203.0.113.0/24"), spool, start_sealer=False,
                       registry=registry).test_client()
    assert other.get("/metrics", environ_base={"REMOTE_ADDR": "203.0.113.7"}).status_code == 200
    assert other.get("/metrics").status_code == 403


# ------------------------------------------------------------------------------------ the collector

def test_collector_counts_accepted_and_refused_events_by_reason_and_site(client, settings, registry, domain):
    key = register(settings, registry, domain)
    stranger = f"x{domain}"  # never registered: its refusals go to site="unknown"
    before = scrape(client)
    assert client.post("/collect", json=[hit(domain)] * 3, query_string={"site": key}).status_code == 202
    assert client.post("/collect", json=[hit(domain)] * 2, query_string={"site": key}).status_code == 202
    bad = [hit(domain), hit(domain, type="click")]  # invalid_event: the whole batch of 2 is refused
    assert client.post("/collect", json=bad, query_string={"site": key}).status_code == 400
    assert client.post("/collect", json=[hit(stranger)] * 4, query_string={"site": key}).status_code == 403
    assert client.post("/collect", json=hit(stranger), query_string={"site": "pk_" + "z" * 22}).status_code == 401
    assert client.post("/collect", data=b"{nope", content_type="application/json").status_code == 400
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("tally_events_accepted_total", site=domain) == 5
    assert delta("tally_events_refused_total", reason="invalid_event", site=domain) == 2
    assert delta("tally_events_refused_total", reason="site_mismatch", site=domain) == 4  # the key's site (ADR 29)
    assert delta("tally_events_refused_total", reason="unknown_site_key", site="unknown") == 1
    assert delta("tally_events_refused_total", reason="malformed_json", site="unknown") == 1
    assert not any(dict(labels).get("site") == stranger for _name, labels in after)  # no made-up label values
    assert delta("tally_collector_requests_total", endpoint="collector.collect", status="202") == 2
    assert delta("tally_collector_requests_total", endpoint="collector.collect", status="400") == 2
    assert delta("tally_collector_requests_total", endpoint="collector.collect", status="403") == 1
    assert delta("tally_collector_requests_total", endpoint="collector.collect", status="401") == 1
    # the scrape before this one was counted too
    assert delta("tally_collector_requests_total", endpoint="collector_metrics.metrics_endpoint", status="200") == 1
    # the edge's families only: the API's are on the API's /metrics
    assert not any(name.startswith(("tally_api_", "tally_consumer_", "tally_analyst_")) for name, _ in after)


def test_refusals_a_site_does_not_count_are_still_in_the_metrics(app, client, settings, registry, domain):
    """A site counts one address's refusals up to its share per window (ADR 29, here 1 event per 3 s);
    the metrics count every refused event, and a batch over the limit once (not per item)."""
    key = register(settings, registry, domain, rate_per_s=1, burst=3)
    before = scrape(client)
    bad = [hit(domain, type="click")] * 4
    assert [client.post("/collect", json=bad, query_string={"site": key}).status_code for _ in range(3)] == [400] * 3
    huge = b"[" + b",".join([b"0"] * (settings.max_batch_events + 1)) + b"]"
    assert client.post("/collect", data=huge, content_type="text/plain", query_string={"site": key}).status_code == 413
    after = scrape(client)
    assert value(after, "tally_events_refused_total", reason="invalid_event", site=domain) - value(
        before, "tally_events_refused_total", reason="invalid_event", site=domain) == 12
    assert value(after, "tally_events_refused_total", reason="batch_too_large", site=domain) - value(
        before, "tally_events_refused_total", reason="batch_too_large", site=domain) == 1
    counted = app.extensions["tally_refusals"].snapshot()
    assert counted[(domain, "invalid_event")] in (1, 2) and counted.get((domain, "batch_too_large"), 0) in (0, 1)


def test_spool_backlog_is_read_from_the_directory(tmp_path):
    spool = tmp_path / "spool"
    (spool / "shipped").mkdir(parents=True)
    (spool / "a.open").write_bytes(b"x" * 10)
    (spool / "b.seg").write_bytes(b"y" * 100)
    (spool / "c.seg").write_bytes(b"z" * 1000)
    (spool / "shipped" / "d.seg").write_bytes(b"w" * 7)
    (spool / "shipped" / "d.seg.json").write_bytes(b"{}")  # a sidecar, not a segment
    (spool / "quarantine").mkdir()
    os.utime(spool / "b.seg", (1000.0, 1000.0))
    os.utime(spool / "c.seg", (1500.0, 1500.0))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in spool_families(spool, now=1600.0) for s in family.samples}
    assert got == {
        ("tally_spool_backlog_segments", (("state", "open"),)): 1,
        ("tally_spool_backlog_segments", (("state", "sealed"),)): 2,
        ("tally_spool_backlog_bytes", (("state", "open"),)): 10,
        ("tally_spool_backlog_bytes", (("state", "sealed"),)): 1100,
        ("tally_spool_oldest_segment_age_seconds", ()): 600.0,
        ("tally_spool_retained_segments", ()): 1,
        ("tally_spool_retained_bytes", ()): 7,
    }
    empty = {s.name: s.value for family in spool_families(tmp_path / "missing") for s in family.samples}
    assert empty["tally_spool_oldest_segment_age_seconds"] == 0 and empty["tally_spool_retained_segments"] == 0


def test_shipper_counters_show_on_the_collectors_metrics(client, settings, caplog):
    from tally.roots import build_shipper
    from workers.shipper import Shipper

    before = scrape(client)
    writer = SpoolWriter(settings.spool_dir, max_bytes=1 << 20, max_age_s=3600)
    writer.append(json.dumps(hit("shipped.example.com", hash=f"h{i}")).encode() for i in range(3))
    writer.close()
    segment = next(settings.spool_dir.glob("*.seg"))
    with open(segment, "ab") as fh:  # one record whose checksum does not match, one that is no event
        fh.write(frame(b'{"domain": "a.example.com"}').replace(b'"a.', b'"b.'))
        fh.write(frame(b"[1, 2]"))
    shipper = build_shipper(settings)
    try:
        assert shipper.ship_once() == 3
    finally:
        shipper.close()
    # Retries: a shipper that cannot name the topic incarnation (Kafka unreachable) backs off and retries.
    writer.append([json.dumps(hit("retried.example.com")).encode()])
    writer.close()
    stuck = Shipper(settings.spool_dir, lambda: None, settings.topic, topic_id_probe=lambda: None)
    stop = threading.Event()
    with caplog.at_level(logging.ERROR, logger="workers.shipper"):
        runner = threading.Thread(target=stuck.run, args=(stop,), kwargs={"idle_wait_s": 0.05})
        runner.start()
        time.sleep(1.0)
        stop.set()
        runner.join(timeout=30)
    retried = sum("retrying in" in r.getMessage() for r in caplog.records)
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("tally_shipper_shipped_records_total") == 3
    assert delta("tally_shipper_quarantined_records_total", reason="checksum") == 1
    assert delta("tally_shipper_quarantined_records_total", reason="not_an_event") == 1
    assert retried >= 1 and delta("tally_shipper_retries_total") == retried


# ------------------------------------------------------------------------------------ the API

@pytest.fixture()
def pipeline(settings):
    p = Pipeline(settings)
    yield p
    p.close()


def test_api_metrics_requests_refused_elsewhere_and_only_its_families(make_settings):
    from tally.roots import build_api

    app = build_api(make_settings())
    try:
        api = app.test_client()
        before = scrape(api)
        assert api.get("/healthz").status_code == 200 and api.get("/healthz").status_code == 200
        assert api.get("/api/v1/domains").status_code == 401
        refused = api.get("/metrics", environ_base={"REMOTE_ADDR": "198.51.100.4"})
        assert refused.status_code == 403 and refused.json["error"]["code"] == "metrics_forbidden"
        assert "TALLY_METRICS_ALLOWED_NETS" in refused.json["error"]["message"]
        # a token does not open it from elsewhere either: the rule is the client network
        assert api.get("/metrics", environ_base={"REMOTE_ADDR": "198.51.100.4"},
                       headers={"Authorization": "Bearer tly_x_y"}).status_code == 403
        after = scrape(api)
    finally:
        app.extensions["tally_backends"].rollups.pool.close()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("tally_api_requests_total", endpoint="api.healthz", status="200") == 2
    assert delta("tally_api_requests_total", endpoint="api.list_domains", status="401") == 1
    assert delta("tally_api_requests_total", endpoint="api_metrics.metrics_endpoint", status="403") == 2
    assert delta("tally_api_requests_total", endpoint="api_metrics.metrics_endpoint", status="200") == 1
    assert not any(name.startswith(("tally_collector_", "tally_events_", "tally_spool_", "tally_shipper_"))
                   for name, _ in after)


def test_reconcile_mismatches_are_read_from_the_newest_scheduled_run(make_settings, servers):
    from oltp.schema import ensure_schema
    from tally.roots import build_api

    app = build_api(make_settings())
    try:
        with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
            ensure_schema(servers.pg_dsn)  # reconcile_runs: migration 0005
            ids = [conn.execute(
                "INSERT INTO reconcile_runs (ran_at, source, range_from, range_to, buckets, mismatches, status)"
                " VALUES (%s, %s, now(), now(), 10, %s, %s) RETURNING id", row).fetchone()[0] for row in (
                ("2100-01-01T00:00:00Z", "schedule", 3, "differences"),  # the newest scheduled: shown
                ("2100-01-01T00:00:01Z", "schedule", 0, "failed"),  # failed runs found nothing
                ("2100-01-01T00:00:02Z", "cli", 9, "differences"),  # someone's ad hoc check
            )]
        try:
            got = scrape(app.test_client())
        finally:
            with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM reconcile_runs WHERE id = ANY(%s)", (ids,))
        assert value(got, "tally_reconcile_mismatches") == 3
    finally:
        app.extensions["tally_backends"].rollups.pool.close()
    # PostgreSQL unreachable: the family is left out, the scrape still answers
    from psycopg_pool import ConnectionPool

    from api.metrics import reconcile_family

    dead = ConnectionPool(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", min_size=0, max_size=1,
                          open=True, kwargs={"connect_timeout": 1})
    try:
        assert list(reconcile_family(dead)()) == []
    finally:
        dead.close()


def test_consumer_lag_batches_commits_and_analyst_queries(pipeline, domain):
    api = pipeline.api
    for loop in (pipeline.rollups, pipeline.loader):
        loop.lag.every_s = 0.0  # every poll, so the last one is seen
    pipeline.post([hit(domain)] * 25)
    pipeline.post([hit(domain)] * 15)
    assert pipeline.ship() == 40
    before = scrape(api)
    pipeline.drain()
    assert pipeline.sql("SELECT 1") == [[1]]
    refused = api.post("/api/v1/sql", json={"sql": "SELECT * FROM system.tables"}, headers=pipeline.api_headers)
    assert refused.status_code == 400
    after = scrape(api)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    for loop in (pipeline.rollups, pipeline.loader):
        group = loop.sink.group
        lags = {dict(labels)["partition"]: v for (name, labels), v in after.items()
                if name == "tally_consumer_lag_records" and dict(labels)["group"] == group}
        assert lags == {"0": 0.0, "1": 0.0, "2": 0.0}, (group, lags)  # every partition, drained
        assert value(after, "tally_consumer_batch_records_sum", group=group) == 40  # every record, once
        writes = value(after, "tally_consumer_batch_records_count", group=group)
        assert writes >= 1 and value(after, "tally_consumer_commit_seconds_count", group=group) == writes
        assert value(after, "tally_consumer_commit_seconds_sum", group=group) > 0
    assert delta("tally_analyst_queries_total", status="ok") == 1
    assert delta("tally_analyst_queries_total", status="refused") == 1
    assert delta("tally_analyst_query_seconds_count") == 2
    assert delta("tally_api_requests_total", endpoint="api.analyst_sql", status="400") == 1


def test_lag_shows_what_is_left_to_poll(pipeline, domain):
    """A consumer that polled only part of the topic reports the rest as lag on its partition."""
    from workers.kafka_io import make_consumer

    pipeline.post([hit(domain)] * 30)
    pipeline.shipper.record_events = 1  # the gauge counts Kafka records: one event each here (ADR 55)
    assert pipeline.ship() == 30
    loop = pipeline.rollups
    loop.consumer.close()
    loop.consumer = make_consumer(pipeline.settings.kafka_bootstrap, loop.sink.group, session_timeout_ms=2000,
                                  max_poll_records=10)
    loop.lag.every_s = 0.0
    loop.writer.pipelined = False
    loop.subscribe()
    deadline = time.monotonic() + 30
    while loop.stored_events < 10 and time.monotonic() < deadline:
        loop.step(timeout_ms=300)
    lag = {dict(labels)["partition"]: v for (name, labels), v in scrape(pipeline.api).items()
           if name == "tally_consumer_lag_records" and dict(labels)["group"] == loop.sink.group}
    assert loop.stored_events < 30 and sum(lag.values()) == 30 - loop.stored_events, (lag, loop.stored_events)


# ------------------------------------------------------------------------------------ multiprocess

def test_forget_process_drops_only_its_live_gauges(tmp_path):
    from tally.roots import forget_metrics_of, reset_metrics_dir

    path = reset_metrics_dir(tmp_path / "mp")
    for name in ("counter_111.db", "histogram_111.db", "gauge_livemostrecent_111.db", "gauge_mostrecent_111.db",
                 "gauge_livemostrecent_222.db"):
        (path / name).write_bytes(b"")
    forget_metrics_of(111, path)
    assert sorted(p.name for p in path.iterdir()) == ["counter_111.db", "gauge_livemostrecent_222.db",
                                                      "gauge_mostrecent_111.db", "histogram_111.db"]
    assert list(reset_metrics_dir(path).iterdir()) == []  # emptied for the next start
    forget_metrics_of(1, tmp_path / "absent")  # nothing to do, no error


def test_up_gives_every_child_the_stacks_metrics_dir(tmp_path):
    from tally.platform import _child_env
    from tally.roots import own_metrics_dir

    settings = Settings.from_env({"TALLY_HOME": str(tmp_path / "home"), "TALLY_SECRET": SECRET})
    assert _child_env(settings)["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "home" / "run" / "metrics")
    # `tally collector` on its own: a private directory for its workers, unless one is given
    env: dict[str, str] = {}
    made = own_metrics_dir(settings, env)
    assert made == env["PROMETHEUS_MULTIPROC_DIR"] and Path(made).is_dir() and Path(made).name.endswith("-8700")
    given = {"PROMETHEUS_MULTIPROC_DIR": "/somewhere/else"}
    assert own_metrics_dir(settings, given) is None and given == {"PROMETHEUS_MULTIPROC_DIR": "/somewhere/else"}
    one = settings.with_overrides(collector_workers=1)
    assert own_metrics_dir(one, {}) is None


def _post(url: str, body: object) -> int:
    req = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:
        return 0


def _scrape_url(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def test_tally_collector_sums_both_granian_workers(servers, tmp_path, domain):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TALLY_", "PROMETHEUS_"))}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_SPOOL_DIR=str(tmp_path / "spool"), TALLY_COLLECTOR_PORT=str(port),
               TALLY_COLLECTOR_WORKERS="2", TALLY_REGISTRY_REFRESH_S="0.5", TALLY_SPOOL_SEGMENT_AGE_S="0.2")
    key = sites.add(servers.pg_dsn, domain).site_key
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "collector"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    mp_dir = tmp_path / "home" / "run" / f"metrics-collector-{port}"
    try:
        deadline = time.monotonic() + 60
        # up, and every worker knows the site (several accepted in a row)
        statuses: list[int] = []
        while statuses[-6:] != [202] * 6:
            assert time.monotonic() < deadline and proc.poll() is None, ("collector did not start", statuses[-6:])
            statuses.append(_post(f"{base}/collect?site={key}", hit(domain)))
            if statuses[-1] != 202:
                time.sleep(0.2)
        warmup = statuses.count(202)
        first = _scrape_url(base)
        for _ in range(30):  # a new connection each: both workers take some
            assert _post(f"{base}/collect?site={key}", [hit(domain)] * 2) == 202
        for _ in range(5):
            assert _post(f"{base}/collect?site={key}", [hit(domain, type="click")]) == 400
        time.sleep(1.0)  # every open segment sealed (0.2 s) and the directory still
        scrapes = [_scrape_url(base) for _ in range(4)]  # whichever worker answers, the same sums
        spool_files = [p for p in (tmp_path / "spool").iterdir() if p.suffix in (".seg", ".open")]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    for got in scrapes:
        assert value(got, "tally_events_accepted_total", site=domain) == warmup + 60
        assert value(got, "tally_events_refused_total", reason="invalid_event", site=domain) == 5
        assert (value(got, "tally_collector_requests_total", endpoint="collector.collect", status="202")
                - value(first, "tally_collector_requests_total", endpoint="collector.collect", status="202")) == 30
    # both workers served and both are in the sums: each pid's own file holds part of the accepted events
    per_pid = {}
    for db in mp_dir.glob("counter_*.db"):
        for family in MultiProcessCollector.merge([str(db)]):
            for s in family.samples:
                if s.name == "tally_events_accepted_total" and s.labels.get("site") == domain:
                    per_pid[db.name] = s.value
    assert len(per_pid) == 2 and all(v > 0 for v in per_pid.values()), per_pid
    assert sum(per_pid.values()) == warmup + 60
    # the spool backlog, as the directory holds it (no shipper runs here)
    last = scrapes[-1]
    assert value(last, "tally_spool_backlog_segments", state="sealed") == len(
        [p for p in spool_files if p.suffix == ".seg"])
    assert value(last, "tally_spool_backlog_segments", state="open") == 0
    assert value(last, "tally_spool_backlog_bytes", state="sealed") == sum(p.stat().st_size for p in spool_files)
    assert value(last, "tally_spool_backlog_bytes", state="sealed") > 0
    assert value(last, "tally_spool_oldest_segment_age_seconds") >= 1.0
