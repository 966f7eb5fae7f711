"""`tally status` next to `tally up --hosts N` (issue 19 §3, ADR 59): every collector host, its collector, its
shipper and its own spool, both rollup workers, both API processes and the front, and a verdict that fails when
one host is down.

No stack is started: the tests write the `run/stack.json` a `tally up --hosts 2` writes (tally/platform.py) by
hand, with pids of live and dead processes, a tiny HTTP server answering /healthz, /readyz and /ping, a port that
refuses connections, and the session's real PostgreSQL and broker (tests/conftest.py `servers`).
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Settings
from tally import status_hosts
from tally.cli import main
from tally.cmd_status import collect, render


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"Ok.\n" if self.path == "/ping" else b"{}"
        self.send_response(200 if self.path in ("/healthz", "/readyz", "/ping") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def healthy() -> Iterator[str]:
    """A base URL answering 200 to /healthz, /readyz and /ping: stands in for every HTTP process."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _spools(home: Path) -> list[Path]:
    """c1: two sealed segments (150 bytes, the oldest 120 s old); c2: one open segment (7 bytes)."""
    c1, c2 = home / "hosts" / "c1" / "spool", home / "hosts" / "c2" / "spool"
    c1.mkdir(parents=True, exist_ok=True)
    c2.mkdir(parents=True, exist_ok=True)
    (c1 / "h-1-1-000001.seg").write_bytes(b"x" * 100)
    (c1 / "h-1-1-000002.seg").write_bytes(b"x" * 50)
    old = time.time() - 120
    os.utime(c1 / "h-1-1-000001.seg", (old, old))
    (c2 / "h-2-1-000001.open").write_bytes(b"x" * 7)
    return [c1, c2]


def _write_stack_json(home: Path, servers, url: str, c2_url: str, c2_shipper: int) -> None:
    """What `tally up --hosts 2` writes (tally/platform.py _write_run_state); every other pid is this one's."""
    me = os.getpid()
    names = ["postgres", "broker", "c1-collector", "c1-shipper", "c2-collector", "c2-shipper", "rollup-worker-2",
             "rollup-worker-3", "api-1", "api-2", "api-front", "analyst", "clickhouse-http"]  # rollup-worker-1 retired
    pids = {name: me for name in names} | {"c2-shipper": c2_shipper}
    state = {"pid": me, "pg_dsn": servers.pg_dsn, "kafka_bootstrap": servers.bootstrap, "collector_url": url,
             "api_url": url, "clickhouse_http_url": url, "analyst_url": url, "spool_dir": str(home / "spool"),
             "pids": pids,
             "components": {name: {"state": "up", "pid": pid, "detail": None} for name, pid in pids.items()},
             "hosts": 2, "collector_urls": [url, c2_url], "spool_dirs": [str(d) for d in _spools(home)],
             "api_backends": [url, url]}
    (home / "run").mkdir(parents=True, exist_ok=True)
    (home / "run" / "stack.json").write_text(json.dumps(state))


def _text(report: dict) -> str:
    from rich.console import Console

    out = io.StringIO()
    render(report, Console(file=out, width=200, no_color=True))
    return out.getvalue()


def test_status_shows_every_collector_host_and_a_down_host_fails_the_verdict(servers, closed_port, healthy,
                                                                             tmp_path, monkeypatch, capsys):
    home = tmp_path / "up"
    _write_stack_json(home, servers, healthy, healthy, os.getpid())
    settings = Settings.from_env({"TALLY_HOME": str(home)})
    report = collect(settings, timeout_s=10)
    assert report["ok"] is True, json.dumps(report, indent=1)
    assert list(report["processes"]) == [
        "up", "postgres", "broker", "c1-collector", "c1-shipper", "c2-collector", "c2-shipper", "rollup-worker-2",
        "rollup-worker-3", "analyst", "api-1", "api-2", "api-front", "clickhouse-http"]
    assert all(p["state"] == "up" for p in report["processes"].values()), report["processes"]
    assert report["processes"]["c2-collector"]["url"] == healthy and report["processes"]["api-front"]["url"] == healthy
    c1, c2 = report["hosts"]["c1"], report["hosts"]["c2"]
    assert (c1["state"], c1["collector"], c1["shipper"], c1["collector_url"]) == ("up", "up", "up", healthy)
    one, two = c1["spool"], c2["spool"]
    assert (one["dir"], one["segments"], one["bytes"]) == (str(home / "hosts/c1/spool"), 2, 150)
    assert 119 <= one["oldest_age_s"] < 3600
    assert (two["dir"], two["segments"], two["open_bytes"]) == (str(home / "hosts/c2/spool"), 0, 7)
    total = report["spool"]  # every host's backlog, summed
    assert (total["state"], total["dir"], total["segments"], total["bytes"], total["open_segments"]) == \
        ("ok", None, 2, 150, 1)
    assert total["oldest_age_s"] == c1["spool"]["oldest_age_s"]

    # host c2 goes down: its collector refuses connections, its shipper's pid is gone
    shipper = _dead_pid()
    _write_stack_json(home, servers, healthy, f"http://{closed_port.address}", shipper)
    report = collect(settings, timeout_s=10)
    assert report["ok"] is False
    down = {name: p for name, p in report["processes"].items() if p["state"] != "up"}
    assert set(down) == {"c2-collector", "c2-shipper"}, down
    assert "/healthz: connection refused" in down["c2-collector"]["detail"]
    assert f"pid {shipper} is not running" in down["c2-shipper"]["detail"]
    assert report["hosts"]["c1"]["state"] == "up"
    assert (report["hosts"]["c2"]["state"], report["hosts"]["c2"]["collector"]) == ("down", "down")
    text = _text(report)
    for line in ("c1-collector", "c2-shipper", "spool backlog c1", "spool backlog c2",
                 "collector hosts: c1 up, c2 down", "not healthy: c2-collector, c2-shipper"):
        assert line in text, text

    monkeypatch.setenv("TALLY_HOME", str(home))  # `tally status --json`: exit 1
    kafka = logging.getLogger("kafka")
    level = kafka.level
    try:
        assert main(["status", "--json", "--timeout", "10"]) == 1
    finally:
        kafka.setLevel(level)
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] is False and printed["hosts"]["c2"]["state"] == "down"


def test_the_multi_host_part_of_stack_json_and_the_summed_spool():
    assert status_hosts.read({"hosts": 1, "collector_urls": ["http://a"], "spool_dirs": ["/s"]}) is None
    assert status_hosts.read({"collector_url": "http://a", "spool_dir": "/s"}) is None  # one host: as of old
    hosts = status_hosts.read({"hosts": 2, "collector_urls": ["http://a:1", "http://b:1"], "spool_dirs": ["/a", "/b"],
                               "api_backends": ["http://c:2", "http://d:2"]})
    assert hosts is not None and [(h.name, h.url, h.spool_dir) for h in hosts.collectors] == [
        ("c1", "http://a:1", Path("/a")), ("c2", "http://b:1", Path("/b"))]
    assert status_hosts.process_urls(hosts, "http://front:2") == {
        "c1-collector": "http://a:1", "c2-collector": "http://b:1", "api-1": "http://c:2", "api-2": "http://d:2",
        "api-front": "http://front:2"}
    spools = {"c1": {"state": "ok", "segments": 1, "bytes": 10, "oldest_age_s": 3.0},
              "c2": {"state": "down", "segments": 0, "bytes": 0, "oldest_age_s": None, "detail": "no answer within 1s"}}
    total = status_hosts.total_spool(spools)
    assert (total["state"], total["segments"], total["bytes"], total["oldest_age_s"]) == ("down", 1, 10, 3.0)
    assert total["detail"] == "c2: no answer within 1s"
