"""`tally up --demo` as a user runs it: a real subprocess tree, real HTTP, then a clean SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from infra.processes import free_port, tcp_open


def get_json(url: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
        return json.loads(resp.read())


def admin_token(home) -> str:
    """The admin token the first `tally up` wrote: readable by its owner only."""
    path = home / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path.read_text().strip()


def refused_without_token(url: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_json(url)
    assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.slow
def test_up_demo_shows_impressions_then_stops_cleanly(tmp_path):
    home = tmp_path / "home"
    collector_port, api_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(home), TALLY_COLLECTOR_PORT=str(collector_port), TALLY_API_PORT=str(api_port),
               TALLY_ANALYST_PORT=str(free_port()),
               TALLY_CLICKHOUSE_HTTP_PORT=str(free_port()))
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
        token = admin_token(home)  # first start: minted, printed once, saved 0600
        assert f"admin token {token}" in " ".join(text.split()) and str(home / "admin-token") in text, text

        url = f"http://127.0.0.1:{api_port}/api/v1/domains/demo.tally.test/impressions?granularity=1h"
        refused_without_token(url)
        deadline, total = time.monotonic() + 90, 0
        while time.monotonic() < deadline and total == 0:
            total = get_json(url, token)["total"]
            time.sleep(0.5)
        assert total > 0, "no impressions reached the API"

        # A second terminal with the same TALLY_HOME: a customer token for the demo domain only.
        made = subprocess.run([sys.executable, "-m", "tally.cli", "tokens", "create", "--role", "customer",
                               "--domain", "demo.tally.test"], env=env, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        customer = made.stdout.strip().splitlines()[-1]
        assert get_json(url, customer)["total"] > 0
        with pytest.raises(urllib.error.HTTPError) as other:
            get_json(url.replace("demo.tally.test", "other.example.com"), customer)
        assert other.value.code == 403

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

        # What an analyst asks of the demo: events by account (tally.sites, synced from PostgreSQL) and country
        sql = ("SELECT uniqExact(s.account), uniqExact(e.country) FROM tally.events AS e INNER JOIN tally.sites AS s "
               "ON e.domain = s.domain WHERE s.account != '' AND e.country IS NOT NULL")
        deadline, got = time.monotonic() + 60, (0, 0)
        while time.monotonic() < deadline and got < (2, 3):
            out = subprocess.run([sys.executable, "-m", "tally.cli", "sql", "--format", "csv", sql], env=env,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            got = tuple(int(v) for v in out.stdout.strip().splitlines()[-1].split(","))
            time.sleep(0.5)
        assert got[0] == 2 and got[1] >= 3, got
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


def start_up(env: dict[str, str], *extra: str) -> tuple[subprocess.Popen, str]:
    """A running `tally up` and the banner it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "up", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Press Ctrl-C" in line:
            return proc, "".join(seen)
    raise AssertionError(f"tally up exited with {proc.wait()}: {''.join(seen)}")


@pytest.mark.slow
def test_events_accepted_just_before_a_stop_are_counted_after_a_restart(tmp_path):
    """Stop right after the 202s: the ordered shutdown must spool, ship and consume them before the
    memory-only broker goes away, and a restart (new, empty topic) must neither lose nor recount them."""
    collector_port, api_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_COLLECTOR_PORT=str(collector_port),
               TALLY_API_PORT=str(api_port), TALLY_ANALYST_PORT=str(free_port()),
               TALLY_CLICKHOUSE_HTTP_PORT=str(free_port()),
               # as the suite's other pipelines (conftest): the stop comes while the rollup worker's consumers
               # may still be forming their group; one that stops mid-join is dropped after 2 s, not 6 s, and
               # only then does the other get its partitions to drain (8 s stops seen with the default)
               TALLY_CONSUMER_SESSION_TIMEOUT_MS="2000")
    domain = "restart.example.com"
    proc, first_banner = start_up(env)
    try:  # every check inside: a failed one still stops the platform (one left a whole stack running)
        token = admin_token(tmp_path / "home")
        assert token in first_banner
        # No site yet: the banner says how to register one, and shows no dashboard of a domain not registered.
        assert "tally sites add" in first_banner and "?domain=" not in first_banner, first_banner
        assert "RuntimeDirWarning" not in first_banner, first_banner
        added = subprocess.run([sys.executable, "-m", "tally.cli", "sites", "add", domain, "--json"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        site_key = json.loads(added.stdout)["site_key"]
        deadline = time.monotonic() + 30  # collectors reload the registry every TALLY_REGISTRY_REFRESH_S
        for i in range(20):
            body = json.dumps([{"domain": domain, "url": f"https://{domain}/{i}", "type": "impression"}] * 10)
            while True:  # a refused batch writes nothing: retry it until the collector knows the new key
                req = urllib.request.Request(f"http://127.0.0.1:{collector_port}/collect?site={site_key}",
                                             data=body.encode(), headers={"Content-Type": "application/json"},
                                             method="POST")
                try:
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        assert resp.status == 202
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code != 401 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)  # at once: nothing has had time to ship or load
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out

    proc, banner = start_up(env)
    try:
        assert f"/?domain={domain}" in banner and "tally sites add" not in banner, banner  # the registered site
        # Later starts reuse the token and print only where it is.
        assert admin_token(tmp_path / "home") == token
        assert token not in banner
        assert f"admin token in {tmp_path / 'home' / 'admin-token'}" in " ".join(banner.split())
        url = f"http://127.0.0.1:{api_port}/api/v1/domains/{domain}/impressions?granularity=1h"
        refused_without_token(url)
        deadline, total = time.monotonic() + 30, None
        while time.monotonic() < deadline and total != 200:
            total = get_json(url, token)["total"]
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


@pytest.mark.slow
def test_a_closed_stdout_still_stops_the_platform(tmp_path):
    """`tally up | head`: the reader is gone when Ctrl-C comes. "tally: stopping ..." cannot be printed;
    that print used to raise before `platform.stop()`, so nothing was stopped in order (PostgreSQL was
    left running) and the run state stayed behind."""
    from core.runstate import RUN_STATE

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(home), TALLY_COLLECTOR_PORT=str(free_port()), TALLY_API_PORT=str(free_port()),
               TALLY_ANALYST_PORT=str(free_port()),
               TALLY_CLICKHOUSE_HTTP_PORT=str(free_port()))
    with (tmp_path / "stderr").open("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "up"], env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "Press Ctrl-C" in line:
                    break
            assert (home / RUN_STATE).exists()
            proc.stdout.close()  # the reader goes away
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        err.seek(0)
        stderr = err.read()
    assert proc.returncode in (0, 141) and "Traceback" not in stderr, (proc.returncode, stderr)
    assert not (home / "postgres" / "data" / "postmaster.pid").exists(), "PostgreSQL was left running"
    assert not (home / RUN_STATE).exists()


def test_sites_that_cannot_be_listed_leave_the_banner_without_them(servers, tmp_path):
    """The banner's query failing used to end `tally up` (the platform just started was stopped, exit 1)."""
    from tally.cmd_up import Banner, registered_domains

    assert registered_domains(f"postgresql://nobody@127.0.0.1:{free_port()}/none?connect_timeout=5") is None
    assert registered_domains(servers.pg_dsn) is not None
    banner = Banner("http://127.0.0.1:1", "http://127.0.0.1:2", "logs", tmp_path / "admin-token", None, None)
    text = banner.text()
    assert "sites            could not be listed" in text and "tally sites add" not in text, text
    assert "http://127.0.0.1:2/api/v1/domains\n" in text and "Press Ctrl-C to stop." in text
    assert banner.as_json()["sites"] is None


def test_the_banner_shows_registered_sites_only(tmp_path):
    from tally.cmd_up import Banner

    none = Banner("http://127.0.0.1:1", "http://127.0.0.1:2", "logs", tmp_path / "admin-token", None, ()).text()
    assert "?domain=" not in none and "none registered yet" in none  # no dashboard of a site not registered
    assert "tally sites add example.com --tz Europe/Berlin --origin https://example.com" in none  # as README's
    assert "http://127.0.0.1:2/api/v1/domains\n" in none
    assert f"admin token in {tmp_path / 'admin-token'}" in " ".join(none.split())
    many = tuple(f"s{i}.example.net" for i in range(7))
    text = Banner("http://127.0.0.1:1", "http://127.0.0.1:2", "logs", tmp_path / "admin-token", "tly_x", many).text()
    assert "http://127.0.0.1:2/?domain=s0.example.net" in text and "s4.example.net and 2 more" in text
    assert "s5.example.net" not in text and "tally sites add" not in text
    assert "admin token tly_x" in " ".join(text.split())
    banner = Banner("c", "a", "logs", tmp_path / "t", None, ("x.example.net",))
    assert banner.as_json()["sites"] == ["x.example.net"] and banner.as_json()["admin_token"] is None


def test_registered_domains_reads_the_registry(servers, domain):
    from oltp import sites
    from tally.cmd_up import registered_domains

    sites.add(servers.pg_dsn, domain)
    assert domain in registered_domains(servers.pg_dsn)


# --- what `tally up --demo` gives an analyst (walkthrough item 12): accounts and countries, cheaply -----------------

def test_the_demo_addresses_lie_in_the_countries_it_names_several_in_europe():
    from collector.geo import country_of
    from olap.countries import countries
    from tally.demo import DEMO_ADDRESSES

    assert {ip: country_of(ip) for ip in DEMO_ADDRESSES} == DEMO_ADDRESSES
    continent = {c.code: c.continent for c in countries()}
    assert sum(continent[code] == "Europe" for code in DEMO_ADDRESSES.values()) >= 3
    assert sum(continent[code] != "Europe" for code in DEMO_ADDRESSES.values()) >= 3


def test_only_the_demo_believes_its_loopback_sender():
    from core.config import Settings
    from tally.demo import demo_settings

    default = Settings.from_env({})
    assert default.trusted_proxies == () and "TALLY_TRUSTED_PROXIES" not in default.raw  # not weakened
    demo = demo_settings(default)
    assert [str(n) for n in demo.trusted_proxies] == ["127.0.0.1/32", "::1/128"]
    assert demo.raw["TALLY_TRUSTED_PROXIES"] == "127.0.0.1/32,::1/128"  # what the children's environment gets
    assert Settings.from_env(dict(demo.raw)).trusted_proxies == demo.trusted_proxies
    own = demo_settings(Settings.from_env({"TALLY_TRUSTED_PROXIES": "10.0.0.0/8,127.0.0.1"}))
    assert own.raw["TALLY_TRUSTED_PROXIES"] == "10.0.0.0/8,127.0.0.1/32,::1/128"  # the operator's kept, once each


@pytest.mark.servers("postgres")
def test_demo_sites_have_two_accounts_and_demo_events_get_countries(make_settings, registry, tmp_path):
    """The demo's own sender (real HTTP) against a collector with the demo's settings: every event gets the
    country of the address it was forwarded for; the same batch to a default collector gets none. (waitress here,
    told to keep X-Forwarded-For, which it strips by default: `tally up` serves the collector with granian.)"""
    import random
    import threading
    from datetime import UTC, datetime

    import waitress

    from collector.app import create_app
    from oltp import sites
    from spool.segments import SpoolWriter
    from tally import demo
    from tests.test_collector_fast_path import spooled

    settings = make_settings()
    keys = demo.register_demo_sites(settings.pg_dsn)
    assert {d: sites.get(settings.pg_dsn, d).account for d in demo.DEMO_DOMAINS} == demo.DEMO_ACCOUNTS
    assert len(set(demo.DEMO_ACCOUNTS.values())) == 2 and registry.refresh()
    for name, trusted in (("demo", demo.demo_settings(settings)), ("default", settings)):
        directory = tmp_path / name
        spool = SpoolWriter(directory, max_bytes=1 << 20, max_age_s=3600)
        app = create_app(trusted.with_overrides(spool_dir=directory), spool, start_sealer=False, registry=registry)
        port = free_port()
        server = waitress.create_server(app, host="127.0.0.1", port=port, clear_untrusted_proxy_headers=False)
        threading.Thread(target=server.run, daemon=True).start()
        try:
            rng = random.Random(3)
            for address in demo.DEMO_ADDRESSES:
                batch = demo.demo_batch(rng, 3, datetime.now(UTC), keys)
                assert demo.send(f"http://127.0.0.1:{port}", batch, "curl/8", address) == 3
        finally:
            server.close()
            spool.close()
        got = [e.get("country") for e in spooled(directory)]
        want = [c for c in demo.DEMO_ADDRESSES.values() for _ in range(3)] if name == "demo" else [None] * len(got)
        assert sorted(got, key=str) == sorted(want, key=str) and len(got) == 3 * len(demo.DEMO_ADDRESSES), name


def test_demo_times_reach_yesterday_and_stay_within_the_accepted_past():
    import random
    from datetime import UTC, datetime, timedelta

    from tally.demo import demo_batch

    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)  # the old demo reached back 6 hours: never yesterday
    times = [datetime.fromisoformat(e["ts"]) for e in demo_batch(random.Random(5), 2000, now)]
    assert any(t.date() == now.date() - timedelta(days=1) for t in times)  # "yesterday" has an answer
    assert min(times) >= now - timedelta(hours=48) and sum(t >= now - timedelta(minutes=1) for t in times) > 800
