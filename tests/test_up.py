"""`tally up --demo` as a user runs it: a real subprocess tree, real HTTP, then a clean SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from infra.processes import free_port, tcp_open


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_up_demo_shows_impressions_then_stops_cleanly(tmp_path):
    home = tmp_path / "home"
    collector_port, api_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(home), TALLY_COLLECTOR_PORT=str(collector_port), TALLY_API_PORT=str(api_port))
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "up", "--demo"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = []
        for line in proc.stdout:  # the URLs are printed once everything answers
            banner.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(banner)
        assert f"http://127.0.0.1:{collector_port}/collect" in text, text
        assert f"http://127.0.0.1:{api_port}/?domain=demo.tally.test" in text, text

        url = f"http://127.0.0.1:{api_port}/api/v1/domains/demo.tally.test/impressions?granularity=1h"
        deadline, total = time.monotonic() + 90, 0
        while time.monotonic() < deadline and total == 0:
            total = get_json(url)["total"]
            time.sleep(0.5)
        assert total > 0, "no impressions reached the API"

        # The loader fills ClickHouse independently of the rollups: poll until it caught up too.
        deadline, count = time.monotonic() + 60, 0
        while time.monotonic() < deadline and count == 0:
            sql = subprocess.run([sys.executable, "-m", "tally.cli", "sql",
                                  "SELECT count() FROM tally.events WHERE domain = 'demo.tally.test'"],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert sql.returncode == 0, sql.stderr
            header, value = sql.stdout.strip().splitlines()
            assert header == "count()"
            count = int(value)
        assert count > 0, "no events reached ClickHouse"
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopping" in rest
    # every server it started is gone: PostgreSQL, the broker, the collector's and the API's listeners
    assert not (home / "postgres" / "data" / "postmaster.pid").exists()
    broker_port = int(re.search(r"listening on: tcp://127\.0\.0\.1:(\d+)",
                                (home / "logs" / "tansu.log").read_text()).group(1))
    assert not tcp_open("127.0.0.1", broker_port)
    assert not tcp_open("127.0.0.1", collector_port) and not tcp_open("127.0.0.1", api_port)


def start_up(env: dict[str, str], *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "up", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Press Ctrl-C" in line:
            return proc
    raise AssertionError(f"tally up exited with {proc.wait()}: {''.join(seen)}")


@pytest.mark.slow
def test_events_accepted_just_before_a_stop_are_counted_after_a_restart(tmp_path):
    """Stop right after the 202s: the ordered shutdown must spool, ship and consume them before the
    memory-only broker goes away, and a restart (new, empty topic) must neither lose nor recount them."""
    collector_port, api_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_COLLECTOR_PORT=str(collector_port),
               TALLY_API_PORT=str(api_port))
    domain = "restart.example.com"
    proc = start_up(env)
    try:
        for i in range(20):
            body = json.dumps([{"domain": domain, "url": f"https://{domain}/{i}", "type": "impression"}] * 10)
            req = urllib.request.Request(f"http://127.0.0.1:{collector_port}/collect", data=body.encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert resp.status == 202
    finally:
        proc.send_signal(signal.SIGTERM)  # at once: nothing has had time to ship or load
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out

    proc = start_up(env)
    try:
        url = f"http://127.0.0.1:{api_port}/api/v1/domains/{domain}/impressions?granularity=1h"
        deadline, total = time.monotonic() + 30, None
        while time.monotonic() < deadline and total != 200:
            total = get_json(url)["total"]
            time.sleep(0.5)
        assert total == 200
        sql = subprocess.run([sys.executable, "-m", "tally.cli", "sql",
                              f"SELECT count() FROM tally.events WHERE domain = '{domain}'"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert sql.stdout.strip().splitlines()[1] == "200", sql.stdout + sql.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 0
