"""`tally up --hosts N` and `tally chaos --hosts N` (issue 19 §3, ADR 59): a simulated multi-host deployment.

The plan (tally/topology.py), the round-robin front (tally/front.py), the supervisor's hold/release/remove and
the control requests (tally/control.py) are tested as units; one short `tally chaos --hosts 2` (marked
`slow`, a real `tally up --hosts 2`) kills a whole collector host and brings it back, kills a rollup worker
for good, adds one, grows the topic and kills an API process under load, and requires every acknowledged
event in both stores exactly once; the same run shows what `tally up --hosts 2` printed (two collector URLs)
and runs (two rollup workers).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest

from core.config import Settings
from infra.processes import spawn, stop
from infra.supervisor import Supervisor
from tally import control, topology
from tally.chaos import ChaosPlan, ChaosRun
from tally.chaos.hosts import ONCE, TOPOLOGY_FAULTS
from tally.cli import main
from tally.cmd_up import Banner, HostsLines
from tally.front import Front, parse_address


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"TALLY_HOME": str(tmp_path / "home"), **env})


# --- the plan ---

def test_one_host_is_todays_platform(tmp_path):
    s = _settings(tmp_path)
    t = topology.plan(s, 1)
    assert list(t.children) == ["collector", "shipper", "rollup-worker", "analyst", "api", "clickhouse-http"]
    assert t.children["analyst"].argv == ("tally.cli", "analyst-server", "--with-loader")
    assert all(c.env == {} for c in t.children.values())  # the stack's environment, nothing else
    assert t.children["collector"].out == s.home / "logs" / "collector.out"
    assert [h.url for h in t.collectors] == ["http://127.0.0.1:8700"] and t.front is None


def test_two_hosts_have_their_own_home_spool_logs_and_address(tmp_path):
    s = _settings(tmp_path, TALLY_COLLECTOR_PORT="18700", TALLY_API_PORT="18701")
    t = topology.plan(s, 2)
    assert sorted(t.children) == sorted([
        "c1-collector", "c1-shipper", "c2-collector", "c2-shipper", "rollup-worker-1", "rollup-worker-2",
        "api-1", "api-2", "api-front", "analyst", "clickhouse-http"])
    assert [h.url for h in t.collectors] == ["http://127.0.0.11:18700", "http://127.0.0.12:18700"]
    c2 = t.children["c2-shipper"].env
    assert c2["TALLY_HOME"] == str(s.home / "hosts" / "c2") and c2["TALLY_SPOOL_DIR"] == str(s.home / "hosts/c2/spool")
    assert c2["TALLY_LOG_DIR"] == str(s.home / "hosts/c2/logs") and c2["TALLY_BIND_HOST"] == "127.0.0.12"
    assert c2["TALLY_COLLECTOR_HOSTS"] == "2"  # the site limits' shared budget (ADR 60)
    assert t.spool_dirs() == [s.home / "hosts/c1/spool", s.home / "hosts/c2/spool"]
    assert t.api_backends == ("127.0.0.21:18701", "127.0.0.22:18701")
    assert t.children["api-front"].argv == ("tally.front", "--listen", "127.0.0.1:18701", "--backend",
                                            "127.0.0.21:18701", "--backend", "127.0.0.22:18701")
    workers = [c for c in t.children.values() if c.role == "rollup-worker"]
    assert len(workers) == 2 and all("rollup-worker" in c.argv for c in workers)
    assert t.children["rollup-worker-2"].out == s.home / "hosts/rollup-worker-2/logs/rollup-worker.out"


def test_an_explicit_host_allowlist_gets_each_hosts_address_and_other_bind_addresses_get_own_ports(tmp_path):
    s = _settings(tmp_path, TALLY_ALLOWED_HOSTS="tally.example.org")
    assert topology.plan(s, 2).children["c1-collector"].env["TALLY_ALLOWED_HOSTS"] == "tally.example.org,127.0.0.11"
    ports = iter(range(20000, 20010))
    t = topology.plan(_settings(tmp_path, TALLY_BIND_HOST="0.0.0.0"), 2, port_for=lambda host: next(ports))
    assert [h.url for h in t.collectors] == ["http://0.0.0.0:20000", "http://0.0.0.0:20001"]
    assert t.api_backends == ("0.0.0.0:20002", "0.0.0.0:20003")


@pytest.mark.parametrize("hosts", [0, -1, topology.MAX_HOSTS + 1])
def test_a_host_count_out_of_range_is_refused(tmp_path, hosts):
    with pytest.raises(ValueError, match="--hosts must be between 1 and 8"):
        topology.plan(_settings(tmp_path), hosts)


@pytest.mark.parametrize("argv, message", [
    (["up", "--hosts", "0"], "tally up: --hosts must be between 1 and 8"),
    (["up", "--hosts", "2", "--demo"], "--demo runs with one host only"),
    (["chaos", "--hosts", "9"], "--hosts must be between 1 and 8"),
    (["chaos", "--hosts", "2", "--faults", "broker"], "unknown fault(s) broker; known: collector-host"),
    (["chaos", "--faults", "topic-grow"], "unknown fault(s) topic-grow; known: collector-master"),
])
def test_bad_host_arguments_are_refused_before_anything_starts(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TALLY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TALLY_COLLECTOR_PORT", "0")  # never a real start: the refusal comes first
    home = tmp_path / "chaos"
    assert main([*argv, *(["--home", str(home)] if argv[0] == "chaos" else [])]) == 2
    assert message in capsys.readouterr().err
    assert not home.exists() and not (tmp_path / "home" / "postgres").exists()


def test_the_banner_prints_every_collector_and_api_process(tmp_path):
    lines = HostsLines(("http://127.0.0.11:8700", "http://127.0.0.12:8700"),
                       ("http://127.0.0.21:8701", "http://127.0.0.22:8701"), ("rollup-worker-1", "rollup-worker-2"))
    banner = Banner("http://127.0.0.11:8700", "http://127.0.0.1:8701", "/l", tmp_path / "t", None, (), None, lines)
    text = banner.text()
    # what ../shared/checks/lib/stack.sh and 12-scale read from `tally up`'s output
    assert sorted(set(re.findall(r"http://[^ ]+/collect", text))) == [
        "http://127.0.0.11:8700/collect", "http://127.0.0.12:8700/collect"]
    assert re.findall(r"http://[^ ]+/api/v1/", text)[0] == "http://127.0.0.1:8701/api/v1/"
    assert "rollup workers   2: rollup-worker-1, rollup-worker-2" in text and "127.0.0.22:8701" in text
    data = banner.as_json()
    assert data["collector_urls"] == list(lines.collector_urls) and data["rollup_workers"] == list(lines.rollup_workers)
    single = Banner("http://127.0.0.1:8700", "http://127.0.0.1:8701", "/l", tmp_path / "t", None, ()).as_json()
    assert "collector_urls" not in single  # one host: the banner of old


# --- the front ---

async def _backend(tag: bytes) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(tag + b":" + data)
        await writer.drain()
        writer.close()
    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def _ask(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hi")
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


def test_the_front_alternates_and_skips_a_backend_that_is_down():
    async def scenario() -> tuple[list[bytes], list[bytes], Front]:
        a, b = await _backend(b"a"), await _backend(b"b")
        ports = [s.sockets[0].getsockname()[1] for s in (a, b)]
        front = Front(("127.0.0.1", 0), [("127.0.0.1", p) for p in ports])
        server = await front.start()
        port = server.sockets[0].getsockname()[1]
        both = [await _ask(port) for _ in range(4)]
        b.close()
        await b.wait_closed()
        one = [await _ask(port) for _ in range(4)]
        server.close()
        a.close()
        return both, one, front

    both, one, front = asyncio.run(scenario())
    assert both == [b"a:hi", b"b:hi", b"a:hi", b"b:hi"]
    assert one == [b"a:hi"] * 4 and front.skipped == 2  # b refused twice: those went to a
    assert front.connections == [6, 2]


def test_front_addresses_are_checked():
    assert parse_address("127.0.0.21:8701") == ("127.0.0.21", 8701)
    for bad in ("8701", "host:", "host:x", "host:70000"):
        with pytest.raises(ValueError, match="is not host:port"):
            parse_address(bad)
    with pytest.raises(ValueError, match="at least one backend"):
        Front(("127.0.0.1", 1), [])


# --- supervision: hold, release, remove; control requests ---

def _sleeper(tmp_path: Path, name: str):
    return lambda: spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / f"{name}.log")


def test_a_held_child_is_not_restarted_until_released_and_a_removed_one_never(tmp_path):
    sup = Supervisor(backoff_s=0.01, max_backoff_s=0.05)
    held, gone = sup.add("held", _sleeper(tmp_path, "held"), None), sup.add("gone", _sleeper(tmp_path, "gone"), None)
    first, removed = held.proc, gone.proc
    try:
        sup.hold("held")
        assert sup.remove("gone") is gone and "gone" not in sup.children
        for proc in (first, removed):
            proc.kill()
            proc.wait(10)
        for _ in range(20):
            sup.check()
            time.sleep(0.02)
        assert held.proc is first and held.restarts == 0  # left alone while held
        sup.release("held")
        deadline = time.monotonic() + 10
        while held.restarts == 0 and time.monotonic() < deadline:
            sup.check()
            time.sleep(0.02)
        assert held.restarts == 1 and held.proc is not first and held.proc.poll() is None
        with pytest.raises(KeyError):
            sup.hold("nobody")
    finally:
        stop(held.proc)


class _Platform:
    """What tally/control.py touches of a Platform: the supervisor, the topology, the settings."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = self.settings = _settings(tmp_path)
        self.topology = topology.plan(self.base, 2)
        self.supervisor = Supervisor()
        self.retired: list = []
        self.states = 0
        self.tmp_path = tmp_path

    def _spawn(self, name: str):
        return _sleeper(self.tmp_path, name)()

    def _log(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def _write_run_state(self) -> None:
        self.states += 1


def test_control_requests_add_a_rollup_worker_retire_one_and_raise_the_partitions(tmp_path):
    p = _Platform(tmp_path)
    for name in ("rollup-worker-1", "rollup-worker-2"):
        p.supervisor.add(name, _sleeper(tmp_path, name), None)
    try:
        assert control.apply({"op": "add", "role": "rollup-worker"}, p) == "rollup-worker-3"  # type: ignore[arg-type]
        assert p.topology.children["rollup-worker-3"].role == "rollup-worker"
        assert p.supervisor.children["rollup-worker-3"].proc.poll() is None
        assert control.apply({"op": "retire", "name": "rollup-worker-1"}, p) == "rollup-worker-1"  # type: ignore[arg-type]
        assert "rollup-worker-1" not in p.supervisor.children and len(p.retired) == 1
        assert control.apply({"op": "partitions", "count": 6}, p) == "6"  # type: ignore[arg-type]
        assert p.settings.partitions == 6
    finally:
        for child in p.supervisor.children.values():
            stop(child.proc)
        for proc in p.retired:
            stop(proc)


@pytest.mark.parametrize("req, message", [
    ({"op": "reboot"}, "`op` must be one of add, hold, release, retire, partitions"),
    (["add"], "`op` must be one of"),
    ({"op": "add", "role": "api"}, "`role` must be rollup-worker"),
    ({"op": "retire", "name": "postgres"}, "unknown process 'postgres'"),
    ({"op": "hold", "names": []}, "`names` must be a non-empty list"),
    ({"op": "hold", "names": ["c9-collector"]}, "unknown process(es) c9-collector"),
    ({"op": "partitions", "count": 4}, "`count` must be a number of partitions above 4"),
    ({"op": "partitions", "count": "8"}, "`count` must be a number of partitions above 4"),
])
def test_bad_control_requests_are_refused_and_answered(tmp_path, req, message):
    p = _Platform(tmp_path)
    with pytest.raises(control.ControlError, match=re.escape(message)):
        control.apply(req, p)  # type: ignore[arg-type]
    (p.base.home / control.CONTROL_DIR).mkdir(parents=True)
    (p.base.home / control.CONTROL_DIR / "1-1.json").write_text(json.dumps(req))
    assert control.apply_requests(p) == 1  # type: ignore[arg-type]
    answer = json.loads((p.base.home / control.CONTROL_DIR / "1-1.done").read_text())
    assert answer["ok"] is False and message in answer["error"] and p.states == 1


def test_the_multi_host_schedule_changes_the_rollup_workers_once():
    plan = ChaosPlan.long_form(3, seed=5, hosts=2)
    assert plan.faults == tuple(TOPOLOGY_FAULTS) and plan.churn_gap_s is None and plan.burners == 0
    order = plan.order()
    assert sorted(order[:5]) == sorted(TOPOLOGY_FAULTS)
    assert not set(order[5:]) & set(ONCE) and set(order[5:]) == set(TOPOLOGY_FAULTS) - set(ONCE)
    assert ChaosPlan.long_form(3, seed=5).faults != plan.faults  # one host: the faults of old


# --- the whole thing ---

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_multi_host_chaos_run_loses_nothing_and_counts_nothing_twice(tmp_path):
    """`tally up --hosts 2` under load: each multi-host fault once at seeded points 2-4 s apart (a collector
    host down 5 s), then both stores against every acknowledged event. About 90 s on a quiet machine."""
    from rich.console import Console

    from tally.cmd_chaos import render

    plan = ChaosPlan(seed=20261206, load_s=20, faults=tuple(TOPOLOGY_FAULTS), gap_s=(2.0, 4.0), fault_count=5,
                     settle_timeout_s=300, restart_timeout_s=120, hosts=2, host_down_s=5.0, churn_gap_s=None,
                     burners=0)
    report = ChaosRun(plan, tmp_path / "home", progress=lambda line: None).run()
    out = io.StringIO()
    Console(file=out, width=220).print(*render(report))
    table = out.getvalue()
    print(table)
    # what `tally up --hosts 2` printed and runs
    assert len(report.collector_urls) == 2 and all(u.startswith("http://127.0.0.1") for u in report.collector_urls)
    assert report.rollup_workers == 2, table
    assert report.passed and report.error is None, table
    assert sorted(f.name for f in report.faults) == sorted(TOPOLOGY_FAULTS), table
    assert all(f.error is None for f in report.faults), table
    faults = {f.name: f for f in report.faults}
    assert "its partitions moved" in faults["rollup-worker-for-good"].note
    assert "6 partitions" in faults["topic-grow"].target
    assert report.api is not None and report.api.requests > 0 and report.api.failed == 0
    assert report.spool is not None and report.spool.ok
    assert report.pg is not None and report.ch is not None
    assert report.pg.stored >= len(report.ledger.acked) > 0 and report.ch.stored >= len(report.ledger.acked)
    assert "PASS" in table
