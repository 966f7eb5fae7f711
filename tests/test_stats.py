"""`tally stats` as a subprocess, against a real API server (waitress in a thread) and real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from infra.processes import free_port, tcp_open, wait_until
from oltp import sites, tokens
from tally.roots import build_api
from tests.conftest import serve_in_thread

TALLY = str(Path(sys.executable).parent / "tally")


@pytest.fixture()
def live(make_settings, servers):
    app = build_api(make_settings())
    port = free_port()
    server = serve_in_thread(app, port)
    wait_until(lambda: tcp_open("127.0.0.1", port), what="api", timeout=10)
    yield f"http://127.0.0.1:{port}"
    server.close()
    app.extensions["tally_backends"].rollups.pool.close()


def run_stats(home: Path, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "TALLY_HOME": str(home), "TALLY_TOKEN": token,
           "COLUMNS": "160", "NO_COLOR": "1"}
    return subprocess.run([TALLY, "stats", *args], capture_output=True, text=True, env=env, timeout=60)


def test_tally_stats_prints_the_summary_and_the_buckets(live, servers, domain, tmp_path):
    now = datetime.now(UTC)
    partial = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    sites.add(servers.pg_dsn, domain, tz="Asia/Kathmandu")
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        rows = [(partial, 4, 2, "5.000000"), (partial - timedelta(minutes=45), 3, 0, None),
                (partial - timedelta(minutes=75), 2, 0, None)]
        for start, events, valued, value_sum in rows:
            conn.execute("INSERT INTO rollup_15m (domain, event_type, bucket_start, events, valued, value_sum)"
                         " VALUES (%s, 'impression', %s, %s, %s, %s)", (domain, start, events, valued, value_sum))
        _, token = tokens.create(conn, "customer", [domain])
    # The API URL comes from the run state a `tally up` writes under TALLY_HOME.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stack.json").write_text(json.dumps({"api_url": live}))

    as_json = run_stats(tmp_path, token, domain, "--last", "1h", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    summary, imp = data["summary"], data["series"]["impressions"]
    if partial.isoformat() != summary["partial_bucket_start"]:
        pytest.skip("a quarter hour went by during the test")  # rare; the numbers below assume one quarter
    assert summary["metrics"]["impressions"]["total"] == 7 and summary["metrics"]["impressions"]["previous_total"] == 2
    assert imp["tz"] == "Asia/Kathmandu" and imp["granularity"] == "15m"  # the site's zone, 15 minutes for 1h
    assert imp["total"] == 7 and [b["count"] for b in imp["buckets"]] == [3, 0, 0, 4]

    table = run_stats(tmp_path, token, domain, "--last", "1h")
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert f"{domain}, last 1h" in out and "per 15m bucket, Asia/Kathmandu" in out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") >= 5}
    assert rows["impressions"] == ["7", "2", "+250.00%", "2", "5.000000", "2.500000"]
    assert rows["pageviews"] == ["0", "0", "–", "0", "0.000000", "–"]
    local = partial.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Kathmandu"))
    assert rows[local.strftime("%Y-%m-%d %H:%M%z")] == ["4", "0", "5.000000"]
    assert rows["total"] == ["7", "0", "5.000000"]


def test_tally_stats_reports_refusals(live, servers, domain, tmp_path):
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "customer", [domain])
    resp = run_stats(tmp_path, token, "other.example.com", "--api-url", live)
    assert resp.returncode == 1 and "403" in resp.stderr and "may not read other.example.com" in resp.stderr
    gone = run_stats(tmp_path, token, domain, "--api-url", f"http://127.0.0.1:{free_port()}")
    assert gone.returncode == 1 and "cannot reach the API" in gone.stderr


@pytest.mark.parametrize("last, granularity", [("30d", "1d"), ("90d", "1d"), ("2h", "15m")])
def test_tally_stats_takes_any_duration(live, servers, domain, tmp_path, last, granularity):
    """The dashboard offers 30d and 90d: so does `--last`; the totals come from the series (no previous
    period, which the API's summary computes for 1h, 24h and 7d only)."""
    sites.add(servers.pg_dsn, domain)
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "customer", [domain])
    as_json = run_stats(tmp_path, token, domain, "--last", last, "--json", "--api-url", live)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    imp = data["series"]["impressions"]
    assert data["summary"] is None and data["last"] == last and imp["granularity"] == granularity
    span = datetime.fromisoformat(imp["to"]) - datetime.fromisoformat(imp["from"])
    assert span.total_seconds() == {"30d": 30 * 86400, "90d": 90 * 86400, "2h": 7200}[last]
    table = run_stats(tmp_path, token, domain, "--last", last, "--api-url", live)
    assert table.returncode == 0, table.stderr
    assert f"{domain}, last {last}" in table.stdout and "no previous period" in table.stdout


def test_tally_stats_refuses_what_is_not_a_duration(tmp_path):
    bad = run_stats(tmp_path, "x" * 40, "example.net", "--last", "month")
    assert bad.returncode == 2 and "usage: tally stats" in bad.stderr
    assert "--last 'month' is not a duration like 10m, 24h or 7d" in bad.stderr
