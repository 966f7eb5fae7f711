"""`tally status` against a real `tally up` (one stack, shared with tests/test_platform_hardening.py:
tests/platform_stack.py), and the JSON logs of that run.

Order matters: the last tests stop processes (SIGSTOP/SIGKILL) and check that status says so, in
bounded time, then that the stack recovers.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.keys import internal_token
from infra.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("up", "collector", "shipper", "rollup-worker", "analyst-server", "api")
PROCESSES = {"up", "postgres", "broker", "collector", "shipper", "rollup-worker", "analyst", "api", "clickhouse-http"}
DOMAIN = "status.example.com"
EVENTS = 60


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    proc: subprocess.Popen
    token: str
    secret: str

    def state(self) -> dict:
        return json.loads((self.home / "run" / "stack.json").read_text())

    def secrets(self) -> list[str]:
        """What must never appear in a report or a log line."""
        # `tly_tok_<id>_<secret>`: the secret is base64url and may itself hold "_" (a CI run once split
        # off "g" as "the secret" and found it in every log), so split from the left.
        token_secret = self.token.split("_", 3)[3]
        assert len(token_secret) == 43, self.token
        return [self.token, token_secret, self.secret, internal_token(self.secret)]


def run_status(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tally.cli", "status", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def status_json(env: dict[str, str], *args: str) -> tuple[int, dict]:
    out = run_status(env, "--json", *args)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def wait_for_status(env: dict[str, str], what: str, predicate, timeout_s: float = 120) -> dict:
    deadline, report = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        _, report = status_json(env)
        if predicate(report):
            return report
        time.sleep(1)
    raise AssertionError(f"status never showed {what}: {json.dumps(report, indent=1)}")


def send_events(collector: str, site_key: str) -> None:
    body = json.dumps([{"domain": DOMAIN, "url": f"https://{DOMAIN}/{i}", "type": "impression"}
                       for i in range(EVENTS)]).encode()
    deadline = time.monotonic() + 30  # the collectors learn the new site within TALLY_REGISTRY_REFRESH_S
    while True:
        req = urllib.request.Request(f"{collector}/collect?site={site_key}", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 202
            return
        except urllib.error.HTTPError as exc:
            if exc.code != 401 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- without a stack: the pure parts and the time bound ---------------------------------------------


def test_lag_is_end_minus_stored_in_the_same_incarnation_only():
    from tally.cmd_status import lag_of

    broker = {"state": "up", "topic_id": "new", "end_offsets": {"0": 10, "1": 5, "2": 7}}
    probe = {"state": "up", "offsets": {0: {"next_offset": 4, "topic_id": "new"},   # behind by 6
                                        1: {"next_offset": 9, "topic_id": "old"},   # another incarnation: all 5
                                        2: {"next_offset": 8, "topic_id": "new"}}}  # past tansu's end: 0
    lag = lag_of("postgresql", probe, broker, "tally.events")
    assert lag["state"] == "ok" and lag["total"] == 11
    assert lag["partitions"] == {"0": {"end_offset": 10, "stored_offset": 4, "lag": 6},
                                 "1": {"end_offset": 5, "stored_offset": 0, "lag": 5},
                                 "2": {"end_offset": 7, "stored_offset": 8, "lag": 0}}
    assert lag_of("postgresql", probe, {"state": "down", "end_offsets": {}}, "t")["state"] == "unknown"
    assert lag_of("clickhouse", {"state": "unknown"}, broker, "t")["total"] is None


def test_spool_backlog_counts_sealed_open_retained_and_quarantined(tmp_path):
    from tally.cmd_status import probe_spool

    spool = tmp_path / "spool"
    (spool / "shipped").mkdir(parents=True)
    (spool / "quarantine").mkdir()
    (spool / "h-1-1-000001.seg").write_bytes(b"x" * 100)
    (spool / "h-1-1-000002.seg").write_bytes(b"x" * 50)
    (spool / "h-1-1-000003.open").write_bytes(b"x" * 7)
    (spool / "shipped" / "h-1-1-000000.seg").write_bytes(b"x" * 30)
    (spool / "shipped" / "h-1-1-000000.seg.ship").write_bytes(b"{}")
    (spool / "quarantine" / "h-1-1-000000.seg.bad").write_bytes(b"x" * 3)
    old = time.time() - 120
    os.utime(spool / "h-1-1-000001.seg", (old, old))
    got = probe_spool(spool)
    assert (got["state"], got["segments"], got["bytes"], got["open_segments"], got["open_bytes"]) == \
        ("ok", 2, 150, 1, 7)
    assert (got["retained_segments"], got["retained_bytes"], got["quarantined_bytes"]) == (1, 30, 3)
    assert 119 <= got["oldest_age_s"] < 3600
    assert probe_spool(tmp_path / "absent")["state"] == "missing"


def test_targets_come_from_a_live_stack_json_only_and_carry_no_credentials(tmp_path):
    from core.config import Settings
    from tally.cmd_status import targets

    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    state = {"pid": os.getpid(), "pg_dsn": "postgresql://u@127.0.0.1:5/db", "kafka_bootstrap": "127.0.0.1:9",
             "collector_url": "http://127.0.0.1:1", "api_url": "http://127.0.0.1:2",
             "analyst_url": "http://user:pw@127.0.0.1:3/", "pids": {"shipper": 42}}
    (home / "run" / "stack.json").write_text(json.dumps(state))
    settings = Settings.from_env({"TALLY_HOME": str(home)})
    t = targets(settings)
    assert t.source == "tally up" and t.up_pid == os.getpid() and t.pids == {"shipper": 42}
    assert t.urls == {"collector": "http://127.0.0.1:1", "api": "http://127.0.0.1:2", "analyst": "http://127.0.0.1:3",
                      "clickhouse-http": "http://127.0.0.1:8703"}
    assert t.bootstrap == ("127.0.0.1:9",) and t.pg_dsn == state["pg_dsn"] and t.internal_token is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (home / "run" / "stack.json").write_text(json.dumps({**state, "pid": dead.pid}))
    t = targets(settings)  # a stack.json left by a dead `tally up` is ignored
    assert t.source == "settings" and t.pids == {} and t.pg_dsn is None and t.bootstrap == ()
    assert t.urls["collector"] == "http://127.0.0.1:8700"


def test_a_part_the_supervisor_reports_down_is_down_with_its_reason(tmp_path):
    """Issue 15, item 14: a crash-looping child waits for its backoff; its pid may even be alive again by the
    time status reads it, so the supervisor's word (stack.json `components`) decides."""
    from core.config import Settings
    from tally.cmd_status import collect

    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    reason = "down: 4 crash(es) in a row, last exit code 3; next start in 3.9s"
    state = {"pid": os.getpid(), "collector_url": "http://127.0.0.1:1", "api_url": "http://127.0.0.1:2",
             "analyst_url": "http://127.0.0.1:3", "pids": {"shipper": os.getpid(), "rollup-worker": os.getpid()},
             "components": {"shipper": {"state": "down", "detail": reason},
                            "rollup-worker": {"state": "up", "detail": None}}}
    (home / "run" / "stack.json").write_text(json.dumps(state))
    report = collect(Settings.from_env({"TALLY_HOME": str(home)}), timeout_s=1)
    assert report["processes"]["shipper"] == {"state": "down", "pid": os.getpid(), "url": None, "detail": reason}
    assert report["processes"]["rollup-worker"]["state"] == "up" and report["ok"] is False


def test_a_server_that_never_answers_does_not_hang_status(tmp_path):
    """A listening socket nobody accepts on (the kernel completes the handshake): every probe against it hangs."""
    import socket

    from core.config import Settings
    from tally.cmd_status import collect

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        settings = Settings.from_env({"TALLY_HOME": str(tmp_path / "home"), "TALLY_COLLECTOR_PORT": str(port),
                                      "TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
                                      "TALLY_PG_DSN": f"postgresql://u:pw-unit-4242@127.0.0.1:{port}/db"})
        t0 = time.monotonic()
        report = collect(settings, timeout_s=1.0)
        took = time.monotonic() - t0
    assert took < 30  # bounded (1 s plus thread start-up; generous for a loaded machine)
    assert report["ok"] is False
    assert report["processes"]["collector"]["state"] == "down"
    assert report["broker"]["state"] == "down" and report["stores"]["postgresql"]["state"] == "down"
    assert "pw-unit-4242" not in json.dumps(report)


@pytest.fixture(scope="module")
def stack(platform_stack, request) -> Stack:
    """The session's shared `tally up` (tests/platform_stack.py), with this module's site and events stored."""
    try:
        up = platform_stack.acquire()
        home, env, proc = up.home, up.env, up.proc
        stack = Stack(home, env, proc, (home / "admin-token").read_text().strip(),
                      (home / "secret").read_text().strip())
        added = subprocess.run([sys.executable, "-m", "tally.cli", "sites", "add", DOMAIN, "--json"], env=env,
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        send_events(stack.state()["collector_url"], json.loads(added.stdout)["site_key"])
        # both groups stored everything and both stores saw the events
        wait_for_status(env, "both groups caught up", lambda r: r["ok"] and all(
            g["state"] == "ok" and g["total"] == 0 for g in r["lag"].values())
            # offsets count Kafka records, each up to TALLY_KAFKA_RECORD_EVENTS events (ADR 55): the one POST of
            # EVENTS events is one record
            and sum(p["stored_offset"] for p in r["lag"]["tally-loader"]["partitions"].values()) >= 1
            and all(s["newest_event_at"] for s in r["stores"].values()))
        yield stack
    finally:
        for pid in _stopped:  # a failed test must not leave a frozen process behind
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        platform_stack.release(request.node.nodeid)


_stopped: list[int] = []


def freeze(pid: int) -> None:
    _stopped.append(pid)
    os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)
    _stopped.remove(pid)


@pytest.mark.slow
def test_status_json_reports_a_healthy_stack(stack):
    t0 = time.monotonic()
    out = run_status(stack.env, "--json")
    print(f"tally status --json on a healthy stack: {time.monotonic() - t0:.1f}s")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert set(report) == {"version", "as_of", "ok", "source", "timeout_s", "processes", "spool", "broker", "lag",
                           "stores"}
    assert report["version"] == 1 and report["ok"] is True and report["source"] == "tally up"
    pids = stack.state()["pids"]
    assert set(report["processes"]) == PROCESSES
    for name, process in report["processes"].items():
        assert process["state"] == "up", (name, process)
        assert process["pid"] == (stack.proc.pid if name == "up" else pids[name])
    assert report["processes"]["collector"]["url"] == stack.state()["collector_url"]
    broker = report["broker"]
    assert broker["state"] == "up" and broker["topic"] == "tally.events" and broker["topic_id"]
    # tansu 0.6 answers ListOffsets(latest) with the last batch's base offset + 1, so the end offsets may
    # understate (a lower bound; exact on Kafka); the stored offsets are exact.
    assert set(broker["end_offsets"]) == {"0", "1", "2", "3"} and sum(broker["end_offsets"].values()) > 0
    for group, store in (("tally-rollups", "postgresql"), ("tally-loader", "clickhouse")):
        lag = report["lag"][group]
        assert lag["store"] == store and lag["state"] == "ok" and lag["total"] == 0
        assert set(lag["partitions"]) == set(broker["end_offsets"])
        assert sum(part["stored_offset"] for part in lag["partitions"].values()) >= 1  # records (ADR 55)
        for part in lag["partitions"].values():
            assert part["lag"] == max(0, part["end_offset"] - part["stored_offset"])
        stored = report["stores"][store]
        assert stored["state"] == "up" and stored["last_write_at"] and stored["newest_event_at"]
        assert stored["last_write_age_s"] >= 0 and stored["newest_event_age_s"] >= 0
    spool = report["spool"]
    assert spool["state"] == "ok" and spool["dir"] == str(stack.home / "spool")
    # Shipped segments are kept until both groups stored them, then dropped within seconds (ADR 16, 28): with
    # every lag 0 here, what is left depends on when the shipper's last retention pass ran.
    assert isinstance(spool["retained_segments"], int)
    assert (spool["retained_segments"] == 0) == (spool["retained_bytes"] == 0)
    assert report["stores"]["postgresql"]["where"].startswith("127.0.0.1:")
    for secret in stack.secrets():
        assert secret not in out.stdout + out.stderr
    assert "postgresql://" not in out.stdout  # no DSN, only host:port/db


@pytest.mark.slow
def test_status_table_is_readable_and_exits_0(stack):
    out = run_status(stack.env)
    assert out.returncode == 0, out.stdout + out.stderr
    for word in (*PROCESSES, "tally-rollups", "tally-loader", "postgresql", "clickhouse", "spool backlog", "all up"):
        assert word in out.stdout, word
    for secret in stack.secrets():
        assert secret not in out.stdout + out.stderr


@pytest.mark.slow
def test_status_from_settings_alone(stack, tmp_path):
    """Production: no stack.json, only TALLY_* settings pointing at the servers."""
    state = stack.state()
    env = {**stack.env, "TALLY_HOME": str(tmp_path / "elsewhere"), "TALLY_PG_DSN": state["pg_dsn"],
           "TALLY_KAFKA_BOOTSTRAP": state["kafka_bootstrap"], "TALLY_SECRET": stack.secret,
           "TALLY_SPOOL_DIR": state["spool_dir"]}
    code, report = status_json(env)
    assert code == 0 and report["ok"] and report["source"] == "settings"
    procs = report["processes"]
    assert {procs[n]["state"] for n in ("collector", "api", "analyst", "broker", "postgres")} == {"up"}
    assert procs["shipper"]["state"] == procs["rollup-worker"]["state"] == procs["loader-worker"]["state"] == "unknown"
    assert all(p["pid"] is None for p in procs.values())
    assert report["lag"]["tally-loader"]["state"] == "ok" and report["lag"]["tally-rollups"]["state"] == "ok"
    assert not (tmp_path / "elsewhere").exists()  # status writes nothing


@pytest.mark.slow
def test_status_refuses_a_bad_timeout(stack):
    out = run_status(stack.env, "--timeout", "0")
    assert out.returncode == 2 and "--timeout" in out.stderr and out.stdout == ""


@pytest.mark.slow
def test_every_process_of_the_run_logs_json_lines_privately(stack):
    logs = stack.home / "logs"
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    for path in logs.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for service in SERVICES:
        lines = (logs / f"{service}.log").read_text().splitlines()
        assert lines, service
        for line in lines:
            doc = json.loads(line)
            assert {"ts", "level", "logger", "msg", "process", "pid"} <= set(doc), line
            assert doc["process"] == service
    # one line per committed batch, per group, with what was committed
    for service, group in (("rollup-worker", "tally-rollups"), ("analyst-server", "tally-loader")):
        docs = [json.loads(line) for line in (logs / f"{service}.log").read_text().splitlines()]
        batches = [doc for doc in docs if doc["msg"].endswith("committed batch")]
        mine = [b for b in batches if b.get("group") == group]
        assert mine, f"no committed-batch line in {service}.log"
        assert sum(b["events"] for b in mine) >= EVENTS
        for b in mine:
            assert b["rejected"] == 0 and b["duration_ms"] >= 0 and b["topic"] == "tally.events"
            assert all(first < nxt for first, nxt in b["offsets"].values())
    # one INFO line per sealed segment, with the events of all its parts (open parts ship earlier, at DEBUG: ADR 56)
    shipped = [doc for doc in map(json.loads, (logs / "shipper.log").read_text().splitlines())
               if doc["msg"].startswith("shipper: shipped ") and "segment_records" in doc]
    assert shipped and all(s["segment"].endswith(".seg") for s in shipped)
    assert sum(s["segment_records"] for s in shipped) >= EVENTS
    # the collector's granian workers and their master share collector.log
    assert len({json.loads(line)["pid"] for line in (logs / "collector.log").read_text().splitlines()}) >= 2


@pytest.mark.slow
def test_no_token_secret_or_dsn_password_in_any_log(stack, tmp_path):
    """A real run's logs hold no token or secret; a process given a DSN with a password (that fails, and so
    logs the DSN's neighbourhood and a traceback) does not write the password either."""
    password = "pw-Status-9f8e7d6c"
    logdir = tmp_path / "logs"
    env = {**stack.env, "TALLY_LOG_DIR": str(logdir), "TALLY_KAFKA_BOOTSTRAP": stack.state()["kafka_bootstrap"],
           "TALLY_PG_DSN": f"postgresql://tally:{password}@127.0.0.1:{free_port()}/tally?connect_timeout=2"}
    out = subprocess.run([sys.executable, "-m", "tally.cli", "rollup-worker"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0  # PostgreSQL is not there: it stops, after logging why
    crash = [json.loads(line) for line in (logdir / "rollup-worker.log").read_text().splitlines()]
    assert any(doc["level"] == "CRITICAL" and "exc" in doc for doc in crash), crash
    assert password not in (logdir / "rollup-worker.log").read_text()
    for path in [*(stack.home / "logs").iterdir(), logdir / "rollup-worker.log"]:
        text = path.read_text(errors="replace")
        for secret in (*stack.secrets(), password):
            assert secret not in text, f"{secret[:6]}... in {path}"


@pytest.mark.slow
def test_a_dead_process_is_reported_down(stack):
    """kill -9 the shipper while `tally up` is frozen (so it is not restarted yet): status says down, exit 1."""
    shipper = stack.state()["pids"]["shipper"]
    freeze(stack.proc.pid)
    try:
        os.kill(shipper, signal.SIGKILL)
        out = run_status(stack.env, "--json")
        assert out.returncode == 1, out.stdout + out.stderr
        report = json.loads(out.stdout)
        assert report["ok"] is False
        assert report["processes"]["shipper"]["state"] == "down"
        assert f"pid {shipper} is not running" in report["processes"]["shipper"]["detail"]
        assert {n for n, p in report["processes"].items() if p["state"] != "up"} == {"shipper"}
        table = run_status(stack.env)
        assert table.returncode == 1 and "not healthy: shipper" in table.stdout
    finally:
        thaw(stack.proc.pid)
    # `tally up` restarts it and writes its new pid: status is green again
    report = wait_for_status(stack.env, "the shipper restarted", lambda r: r["ok"])
    assert report["processes"]["shipper"]["pid"] != shipper


@pytest.mark.slow
def test_a_hung_broker_does_not_hang_status(stack):
    """SIGSTOP the broker: connections open but nothing answers. Status still answers, within its bound."""
    broker = stack.state()["pids"]["broker"]
    freeze(broker)
    try:
        t0 = time.monotonic()
        out = run_status(stack.env, "--json", "--timeout", "3", timeout=60)
        took = time.monotonic() - t0
        assert out.returncode == 1, out.stdout + out.stderr
        report = json.loads(out.stdout)
        assert report["broker"]["state"] == "down" and report["processes"]["broker"]["state"] == "down"
        assert report["broker"]["detail"]
        assert "ERROR" not in out.stderr  # the report says it; the Kafka client's lines are not repeated
        assert report["lag"]["tally-rollups"]["state"] == "unknown"
        assert report["processes"]["collector"]["state"] == "up"  # the spool keeps accepting
        print(f"status with a hung broker answered in {took:.1f}s (timeout 3s)")
    finally:
        thaw(broker)
    wait_for_status(stack.env, "the broker answering again", lambda r: r["broker"]["state"] == "up")
