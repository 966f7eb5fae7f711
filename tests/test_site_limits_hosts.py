"""A site's rate limit means the same whatever the number of collector hosts and workers (issue 19 §3;
docs/adr/0060-site-limits-across-hosts-and-topic-grow.md).

Each worker of each host enforces 1/(TALLY_COLLECTOR_HOSTS x TALLY_COLLECTOR_WORKERS) of the limit: the limiter
on a fake clock (two hosts' limiters together admit the limit, not twice it); `tally sites show` / `list`
print the shares; then two real `tally collector` processes (own TALLY_HOME, spool and port, granian as
shipped) behind a client that alternates between them (a round-robin balancer) admit about the site's rate in
total. Before the setting each host enforced the whole limit: two hosts admitted twice it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest

from collector.site_limits import SiteLimiter, WindowLimit, worker_share
from core.config import ConfigError, Settings
from oltp import sites
from tests.cli_inproc import run_tally
from tests.conftest import SECRET
from tests.test_collector_shares import post

pytestmark = pytest.mark.servers("postgres")

A = "a.example.com"
ROOT = Path(__file__).resolve().parent.parent


def test_each_worker_of_each_host_enforces_its_share():
    assert worker_share(100, 100, hosts=2, workers=1) == WindowLimit(50, 1)
    assert worker_share(100, 100, hosts=2, workers=2) == WindowLimit(25, 1) == worker_share(100, 100, workers=4)
    assert worker_share(1000, 20_000, hosts=1, workers=1) == WindowLimit(20_000, 20)
    assert worker_share(3, 1, hosts=4, workers=1) == WindowLimit(1, 2)  # never below one event per window
    with pytest.raises(ValueError):
        worker_share(10, 10, hosts=0)
    with pytest.raises(ValueError):
        SiteLimiter(10, 10, hosts=0)


def test_two_hosts_limiters_admit_the_limit_in_total_not_twice_it():
    """Two hosts (one limiter each, as each host's worker has its own memory), a balancer alternating the
    site's requests between them, on a fake clock: 10 s of a flood admit ~rate x 10 + burst in total."""
    now = [1000.0]
    hosts = [SiteLimiter(100, 100, hosts=2, clock=lambda: now[0]) for _ in range(2)]
    admitted = [0, 0]
    for step in range(10 * 50):  # 50 rounds a second, 4 events to each host per round: 400 offered/s
        now[0] = 1000.0 + step / 50
        for i, host in enumerate(hosts):
            if host.hit({A: 4}, {}) is None:
                admitted[i] += 4
    assert 900 <= sum(admitted) <= 1100, admitted  # ~100/s x 10 s (+ the burst): the site's limit in total
    assert abs(admitted[0] - admitted[1]) <= 8, admitted  # each host its half
    one = SiteLimiter(100, 100, clock=lambda: now[0])  # one host, the same limit: the same total
    assert one.item_for(None, None).amount == 2 * hosts[0].item_for(None, None).amount


def test_the_setting_and_its_refusals():
    assert Settings.from_env({}).collector_hosts == 1
    assert Settings.from_env({"TALLY_COLLECTOR_HOSTS": "3"}).collector_hosts == 3
    for bad in ("0", "-1", "two", "1025"):
        with pytest.raises(ConfigError) as exc:
            Settings.from_env({"TALLY_COLLECTOR_HOSTS": bad})
        assert "TALLY_COLLECTOR_HOSTS" in str(exc.value)


def _cli(servers, tmp_path: Path, *args: str, process: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    """`tally *args` in this process (tests/cli_inproc.py), or as a real process with `process`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    base.update(TALLY_HOME=str(tmp_path / "cli-home"), TALLY_PG_DSN=servers.pg_dsn, **env)
    if not process:
        return run_tally(args, base)
    return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=base, capture_output=True, text=True,
                          timeout=60)


def test_sites_show_and_list_print_each_hosts_and_workers_share(servers, tmp_path, domain):
    sites.add(servers.pg_dsn, domain, rate_per_s=50, burst=60)
    out = _cli(servers, tmp_path, "sites", "show", domain, "--json", TALLY_COLLECTOR_HOSTS="2",
               TALLY_COLLECTOR_WORKERS="3", process=True)
    assert out.returncode == 0, out.stderr
    limit = json.loads(out.stdout)["limit"]
    assert "secret" not in json.loads(out.stdout)
    assert (limit["rate_per_s"], limit["burst"], limit["own"], limit["hosts"], limit["workers"]) == (50, 60, True, 2, 3)
    assert limit["per_host"] == {"rate_per_s": 25, "burst": 30}
    assert limit["per_worker"]["events"] == worker_share(50, 60, hosts=2, workers=3).amount
    text = _cli(servers, tmp_path, "sites", "show", domain, TALLY_COLLECTOR_HOSTS="2")
    assert text.returncode == 0 and "per host  25 events/s, burst 30" in text.stdout, text.stdout
    listed = _cli(servers, tmp_path, "sites", "list", TALLY_COLLECTOR_HOSTS="2")
    assert listed.returncode == 0 and "each of 2 collector host(s) enforces 1/2 of them" in listed.stdout
    assert any(line.startswith(domain + "\t") and "\t50\t60\t" in line for line in listed.stdout.splitlines())
    listed_json = json.loads(_cli(servers, tmp_path, "sites", "list", "--json", TALLY_COLLECTOR_HOSTS="2").stdout)
    assert [r["limit"]["per_host"] for r in listed_json if r["domain"] == domain] == [{"rate_per_s": 25, "burst": 30}]
    # the running `tally up`'s layout wins over this shell's settings (its run state)
    (tmp_path / "cli-home" / "run").mkdir(parents=True)
    (tmp_path / "cli-home" / "run" / "stack.json").write_text(json.dumps({"collector_hosts": 4}))
    up = _cli(servers, tmp_path, "sites", "show", domain, "--json", TALLY_COLLECTOR_WORKERS="1")
    assert json.loads(up.stdout)["limit"]["per_host"]["rate_per_s"] == 12.5
    missing = _cli(servers, tmp_path, "sites", "show", "nobody-" + domain)
    assert missing.returncode == 1 and "is not registered" in missing.stderr and "Traceback" not in missing.stderr


def _collector(servers, tmp_path: Path, name: str, hosts: int) -> tuple[subprocess.Popen[bytes], int]:
    """`tally collector` as one host: its own TALLY_HOME, spool and port, one worker, TALLY_COLLECTOR_HOSTS."""
    from infra.processes import free_port, tcp_open, wait_until

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(TALLY_HOME=str(tmp_path / f"{name}-home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_SPOOL_DIR=str(tmp_path / f"{name}-spool"), TALLY_COLLECTOR_PORT=str(port),
               TALLY_COLLECTOR_WORKERS="1", TALLY_COLLECTOR_HOSTS=str(hosts), TALLY_SITE_ADDRESS_SHARE="1",
               TALLY_ALLOWED_HOSTS="127.0.0.1", PYTHONPATH=str(ROOT))
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "collector"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: tcp_open("127.0.0.1", port) and post(port, "", b"[]", "127.0.0.1")[0] == 400,
                   what=f"collector {name}", timeout=60)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc, port


RATE = 40  # the site's limit: events/s, and its burst


def test_two_collector_hosts_admit_the_sites_rate_in_total(servers, tmp_path, domain):
    """Two `tally collector` hosts with TALLY_COLLECTOR_HOSTS=2, a client alternating batches of 5 events between
    them for ~4 s (far more than the limit): about RATE x seconds (+ the burst) admitted in all, each host about
    half, the rest `429 rate_limited`. Before the setting each host admitted RATE/s: twice the site's limit."""
    site = sites.add(servers.pg_dsn, domain, rate_per_s=RATE, burst=RATE)
    procs = []
    try:
        for name in ("host1", "host2"):
            procs.append(_collector(servers, tmp_path, name, hosts=2))
        ports = [port for _, port in procs]
        body = orjson.dumps([{"domain": domain, "url": f"https://{domain}/{uuid.uuid4().hex}"} for _ in range(5)])
        admitted, refused = [0, 0], 0
        start = time.monotonic()
        while time.monotonic() - start < 4.0:
            for i, port in enumerate(ports):
                status, answer = post(port, site.site_key, body, "127.0.0.1")
                if status == 202:
                    admitted[i] += 5
                else:
                    assert status == 429 and answer["body"]["error"]["code"] == "rate_limited", (status, answer)
                    refused += 5
            time.sleep(0.01)
        elapsed = time.monotonic() - start
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait(timeout=30)
    total = sum(admitted)
    # 4 s at RATE/s plus one burst, with a window's slack either side; two hosts each at RATE would be ~2x
    assert RATE * (elapsed - 1) <= total <= RATE * (elapsed + 2), (total, admitted, elapsed, refused)
    assert refused > total, (total, refused)  # the flood was far over the limit: the limit decided
    assert min(admitted) >= total / 4, admitted  # both hosts took part
