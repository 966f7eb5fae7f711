"""Nothing acknowledged is lost when a process dies (ADR 16), against a real `tally up` process tree.

Slow: each test runs the whole platform. What they prove:
- kill -9 of the (memory-only) broker under load: `tally up` restarts it, the shipper ships the retained
  segments to the new topic, the consumers notice the new incarnation; every accepted event is in
  PostgreSQL and in ClickHouse exactly once. Then kill -9 of PostgreSQL (restarted on the same port, an
  event accepted during the outage counted), then kill -9 of the collector's master process (its granian
  workers die with it, the port is free for its restart).
- the rollup worker paused, then the whole stack kill -9'd: the next `tally up` on the same ports and
  TALLY_HOME starts, and PostgreSQL gets every event the lost broker held (ClickHouse has them once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from infra.processes import free_port, pid_alive, tcp_open
from tally.chaos.stack import children_of


class Stack:
    """A running `tally up` in its own TALLY_HOME, and what a user would do to it."""

    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.collector_port, self.api_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        self.env.update(TALLY_HOME=str(self.home), TALLY_COLLECTOR_PORT=str(self.collector_port),
                        TALLY_API_PORT=str(self.api_port), TALLY_ANALYST_PORT=str(free_port()),
                        TALLY_CLICKHOUSE_HTTP_PORT=str(free_port()))
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []
        self.site_key = ""
        self.token = ""

    def up(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "up"], env=self.env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in self.proc.stdout:
            self.output.append(line)
            if "Press Ctrl-C" in line:
                threading.Thread(target=self._read_rest, daemon=True).start()
                self.token = (self.home / "admin-token").read_text().strip()
                return
        raise AssertionError(f"tally up exited with {self.proc.wait()}: {''.join(self.output)}")

    def _read_rest(self) -> None:
        assert self.proc is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def add_site(self, domain: str) -> None:
        added = subprocess.run([sys.executable, "-m", "tally.cli", "sites", "add", domain, "--json"], env=self.env,
                               capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        self.site_key = json.loads(added.stdout)["site_key"]

    def pids(self) -> dict[str, int]:
        return json.loads((self.home / "run" / "stack.json").read_text())["pids"]

    def post(self, domain: str, ids: range, deadline_s: float = 60) -> None:
        """POST events with client ids (a retried batch dedups) until every one got its 202."""
        ts = datetime.now(UTC).replace(microsecond=0).isoformat()
        body = json.dumps([{"domain": domain, "url": f"https://{domain}/{i}", "type": "impression",
                            "id": f"ev-{i}", "ts": ts} for i in ids]).encode()
        deadline = time.monotonic() + deadline_s
        while True:
            req = urllib.request.Request(f"http://127.0.0.1:{self.collector_port}/collect?site={self.site_key}",
                                         data=body, headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    assert resp.status == 202
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                # 401 until the collector reloaded the registry; refused while it restarts; never a 202 lost
                if isinstance(exc, urllib.error.HTTPError) and exc.code not in (401, 503):
                    raise
                assert time.monotonic() < deadline, f"the collector did not accept events: {exc}"
                time.sleep(0.2)

    def pg_total(self, domain: str) -> int:
        url = f"http://127.0.0.1:{self.api_port}/api/v1/domains/{domain}/impressions?granularity=1h"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())["total"]

    def ch_count(self, domain: str) -> int:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/api/v1/sql", method="POST",
            data=json.dumps({"sql": f"SELECT count() AS n FROM tally.events WHERE domain = '{domain}'"}).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(json.loads(resp.read())["rows"][0][0])

    def wait_for(self, what, probe, expected: int, timeout_s: float = 120) -> float:
        """Seconds until probe() == expected; fails on timeout or on overshoot (a double count)."""
        t0 = deadline = time.monotonic()
        deadline += timeout_s
        value = None
        while time.monotonic() < deadline:
            try:
                value = probe()
            except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError):
                value = None
            assert value is None or value <= expected, f"{what}: {value} > {expected} (counted twice)"
            if value == expected:
                return time.monotonic() - t0
            time.sleep(0.5)
        raise AssertionError(f"{what}: {value} after {timeout_s}s, expected {expected}\n"
                             + "".join(self.output[-30:]) + self.log_tails())

    def log_tails(self) -> str:
        out = []
        for log in sorted((self.home / "logs").glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def down(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)

    def kill_all(self) -> None:
        """kill -9 `tally up` and every process it started, all at once (a power cut, minus the disk)."""
        assert self.proc is not None
        pids = [self.proc.pid, *self.pids().values()]
        pids += [p for pid in pids for p in children_of(pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def wait_gone(pids: list[int], timeout_s: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def wait_pid_change(stack: Stack, name: str, old: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = stack.pids().get(name)
        if new and new != old:
            return new
        time.sleep(0.2)
    raise AssertionError(f"{name} was not restarted\n" + stack.log_tails())


@pytest.fixture()
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    if s.proc is not None and s.proc.poll() is None:
        try:
            s.down()
        except subprocess.TimeoutExpired:
            s.kill_all()


@pytest.mark.slow
def test_broker_postgres_and_collector_master_killed_under_load_lose_nothing(stack):
    domain = "crash.example.com"
    stack.up()
    stack.add_site(domain)

    # 1. kill -9 the broker while events flow: 150 before, 150 after.
    sent = threading.Event()

    def load(ids: range) -> None:
        for start in range(ids.start, ids.stop, 10):
            stack.post(domain, range(start, min(start + 10, ids.stop)))
            time.sleep(0.02)

    load(range(0, 100))
    # these went through the first incarnation to both stores: the broker's copy is all the stores'
    # offsets refer to when it dies
    stack.wait_for("PostgreSQL before the broker kill", lambda: stack.pg_total(domain), 100)
    load(range(100, 150))  # and these are probably still in flight
    broker = stack.pids()["broker"]
    sender = threading.Thread(target=lambda: (load(range(150, 300)), sent.set()))
    sender.start()
    os.kill(broker, signal.SIGKILL)
    sender.join(120)
    assert sent.is_set()
    new_broker = wait_pid_change(stack, "broker", broker)
    assert pid_alive(new_broker) and not pid_alive(broker)
    took = stack.wait_for("PostgreSQL after a broker kill", lambda: stack.pg_total(domain), 300)
    print(f"broker kill: all 300 in PostgreSQL {took:.1f}s after the last 202")
    stack.wait_for("ClickHouse after a broker kill", lambda: stack.ch_count(domain), 300)

    # 2. kill -9 PostgreSQL; events accepted during the outage are counted once it is back.
    postgres = stack.pids()["postgres"]
    os.kill(postgres, signal.SIGKILL)
    stack.post(domain, range(300, 340))
    wait_pid_change(stack, "postgres", postgres)
    stack.post(domain, range(340, 350))
    took = stack.wait_for("PostgreSQL after a PostgreSQL kill", lambda: stack.pg_total(domain), 350)
    print(f"postgres kill: all 350 in PostgreSQL {took:.1f}s after the last 202")

    # 3. kill -9 the collector's master: its granian workers die with it, its restart gets the port.
    master = stack.pids()["collector"]
    workers = children_of(master)
    assert workers, "granian workers expected"
    os.kill(master, signal.SIGKILL)
    assert wait_gone(workers) == [], "granian workers outlived their master"
    wait_pid_change(stack, "collector", master)
    stack.post(domain, range(350, 400))
    stack.wait_for("PostgreSQL after a collector kill", lambda: stack.pg_total(domain), 400)
    stack.wait_for("ClickHouse at the end", lambda: stack.ch_count(domain), 400)
    assert stack.down() == 0


@pytest.mark.slow
def test_whole_stack_killed_with_the_rollup_worker_paused_loses_nothing_on_the_next_start(stack):
    domain = "paused.example.com"
    stack.up()
    stack.add_site(domain)
    stack.post(domain, range(0, 10))
    stack.wait_for("PostgreSQL before the pause", lambda: stack.pg_total(domain), 10)
    rollup = stack.pids()["rollup-worker"]
    os.kill(rollup, signal.SIGSTOP)
    for start in range(10, 200, 10):
        stack.post(domain, range(start, start + 10))
    # The loader stored them all, so they were shipped and acknowledged by the broker, which holds the
    # only copy the rollup worker could read.
    stack.wait_for("ClickHouse while the rollup worker is paused", lambda: stack.ch_count(domain), 200)
    assert stack.pg_total(domain) == 10
    stack.kill_all()
    assert (stack.home / "run" / "stack.json").exists()  # stale run state, stale postmaster.pid

    stack.output.clear()
    stack.up()  # same ports, same TALLY_HOME
    took = stack.wait_for("PostgreSQL after the restart", lambda: stack.pg_total(domain), 200)
    print(f"whole-stack kill: all 200 in PostgreSQL {took:.1f}s after the restart")
    assert stack.ch_count(domain) == 200
    assert stack.down() == 0
    assert not tcp_open("127.0.0.1", stack.collector_port)


class MemorySink:
    """Offsets and events kept per topic incarnation, like the real sinks (unit level: the point is the loop)."""

    name = group = "memory"

    def __init__(self) -> None:
        self.offsets: dict[str, dict[int, int]] = {}
        self.hashes: list[str] = []

    def committed(self, topic: str, topic_id: str, partitions: list[int]) -> dict[int, int]:
        return {p: o for p, o in self.offsets.get(topic_id, {}).items() if p in partitions}

    def write(self, batch) -> None:
        self.hashes.extend(e.hash for e in batch.events)
        self.offsets.setdefault(batch.topic_id, {}).update(batch.next_offsets)

    def is_permanent(self, exc: BaseException) -> bool:
        return False

    def store_rewound_offsets(self, topic: str, topic_id: str, offsets: dict[int, int]) -> None:
        self.offsets.setdefault(topic_id, {}).update(offsets)

    def close(self) -> None:
        pass


def stored_event(i: int, tag: str) -> bytes:
    import uuid

    now = datetime.now(UTC).isoformat()
    return json.dumps({"v": 1, "hash": uuid.uuid5(uuid.NAMESPACE_URL, f"{tag}-{i}").hex, "domain": "a.example",
                       "url": "https://a.example/", "ts": now, "received_at": now, "type": "impression"}).encode()


def test_a_running_consumer_rereads_a_recreated_topic_from_its_start(tmp_path):
    """No rebalance (manual assignment): the broker restarts under a running consumer, and the new topic
    gets more records than the old position before the consumer fetches again. Stale positions would
    skip the new incarnation's first records; the loop notices the new topic id and starts it over."""
    from kafka import TopicPartition

    from infra.broker import EmbeddedBroker
    from workers.consumer import ConsumerLoop
    from workers.kafka_io import ensure_topic, make_consumer, make_producer

    broker = EmbeddedBroker(tmp_path / "tansu.log").start()
    port = broker.port
    try:
        ensure_topic([broker.bootstrap], "ev", 1)
        producer = make_producer([broker.bootstrap])
        for i in range(10):
            producer.send("ev", key=b"a", value=stored_event(i, "first"))
        producer.flush(10)
        producer.close(5)
        sink = MemorySink()
        consumer = make_consumer([broker.bootstrap], None, session_timeout_ms=6000)
        loop = ConsumerLoop(consumer, sink, "ev", pipelined=False)
        tp = TopicPartition("ev", 0)
        consumer.assign([tp])
        loop.seek_to_stored([tp])
        deadline = time.monotonic() + 60  # generous: a loaded CI machine, not a speed claim
        while len(sink.hashes) < 10 and time.monotonic() < deadline:
            loop.step(timeout_ms=200)
        assert len(sink.hashes) == 10
        first_id = loop.topic_id

        broker.stop()
        broker = EmbeddedBroker(tmp_path / "tansu2.log", port=port).start()
        ensure_topic([broker.bootstrap], "ev", 1)
        producer = make_producer([broker.bootstrap])
        for i in range(50):
            producer.send("ev", key=b"a", value=stored_event(i, "second"))
        producer.flush(10)
        producer.close(5)
        deadline = time.monotonic() + 90
        # Records fetched at the stale position before the new topic id was seen may be stored too (under
        # the old id; the real stores count each hash once): what matters is that none is missing.
        while len(set(sink.hashes)) < 60 and time.monotonic() < deadline:
            try:
                loop.step(timeout_ms=200)
            except Exception:
                loop.needs_seek = True
        assert loop.topic_id and loop.topic_id != first_id
        second = {json.loads(stored_event(i, "second"))["hash"] for i in range(50)}
        missing = second - set(sink.hashes)
        assert not missing, f"{len(missing)} records of the new incarnation skipped"
        assert len(set(sink.hashes)) == 60
        assert sink.offsets[loop.topic_id] == {0: 50} and len(second) == 50
        consumer.close()
    finally:
        broker.stop()
