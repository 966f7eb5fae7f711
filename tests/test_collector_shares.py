"""A site's limit cannot be taken by one sender (issue 15 item 5, docs/adr/0029-per-address-shares.md).

The limiter's per-address shares on a fake clock; then `tally collector` (real granian, RSGI as shipped,
one and two workers) flooded from 127.0.0.2 while browsers send from 127.0.0.3 and others (Linux routes
all of 127.0.0.0/8 to loopback, so a client can bind any of them as its source address).
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import orjson
import pytest

from collector.site_limits import SiteLimiter, address_key
from oltp import sites
from tests.conftest import SECRET
from tests.test_collector_fast_path import spooled

A, B = "a.example.com", "b.example.com"


def limiter(now: list[float], **kwargs) -> SiteLimiter:
    """10 events per 1 s window per site; an address half of it, without an Origin a quarter (2 events)."""
    return SiteLimiter(10, 10, address_share=0.5, no_origin_share=0.25, clock=lambda: now[0], **kwargs)


def test_one_address_gets_its_share_and_the_rest_is_left_to_others():
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 2}, {}, "10.0.0.1", origin=False) is None
    over = lim.hit({A: 1}, {}, "10.0.0.1", origin=False)  # without an Origin: 2 of 10
    assert over is not None and over.address and not over.too_big and over.domain == A and over.limit == 2
    assert lim.hit({A: 3}, {}, "10.0.0.1", origin=True) is None  # with one: 5 of 10 (2 + 3)
    assert lim.hit({A: 1}, {}, "10.0.0.1", origin=True).address
    assert lim.hit({A: 5}, {}, "10.0.0.2", origin=True) is None  # another address: its own share
    site_full = lim.hit({A: 1}, {}, "10.0.0.3", origin=True)  # the site's 10 are used
    assert site_full is not None and not site_full.address
    big = lim.hit({B: 3}, {}, "10.0.0.1", origin=False)
    assert big is not None and big.address and big.too_big  # never fits one address without an Origin


def test_refused_requests_charge_neither_the_site_nor_the_address():
    """Before issue 15 the flood's events were charged to the site until it was full; now a refused
    request is charged nothing, and what one address was admitted is all it ever took."""
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 2}, {}, "10.0.0.1", origin=False) is None
    for _ in range(1000):  # a flood: every request refused
        assert lim.hit({A: 2}, {}, "10.0.0.1", origin=False) is not None
    assert lim.hit({A: 5}, {}, "10.0.0.2", origin=True) is None
    assert lim.hit({A: 3}, {}, "10.0.0.3", origin=True) is None  # 2 + 5 + 3: the whole site budget
    assert lim.hit({A: 1}, {}, "10.0.0.4", origin=True) is not None
    # a mixed request over one site's address share charges none of its sites
    assert lim.hit({B: 1, A: 1}, {}, "10.0.0.5", origin=True) is not None
    assert lim.hit({B: 5}, {}, "10.0.0.5", origin=True) is None


def test_shares_slide_with_the_window():
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 2}, {}, "10.0.0.1", origin=False) is None
    refused = lim.hit({A: 1}, {}, "10.0.0.1", origin=False)
    assert refused is not None and refused.retry_after == 1
    now[0] = 101.5  # half of the previous window still counts: 1 of the 2
    assert lim.hit({A: 1}, {}, "10.0.0.1", origin=False) is None
    assert lim.hit({A: 1}, {}, "10.0.0.1", origin=False) is not None
    now[0] = 103.0
    assert lim.hit({A: 2}, {}, "10.0.0.1", origin=False) is None


def test_no_address_or_whole_shares_keep_no_per_address_state():
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 10}, {}, None, origin=False) is None  # no address known: the site limit only
    whole = SiteLimiter(10, 10, clock=lambda: now[0])  # shares of 1: the site limit only
    assert whole.hit({A: 10}, {}, "10.0.0.1", origin=False) is None
    assert whole.tracked_addresses() == 0 and lim.tracked_addresses() == 0
    with pytest.raises(ValueError):
        SiteLimiter(10, 10, address_share=0.2, no_origin_share=0.5)


def test_ipv6_addresses_share_their_64_and_mapped_ipv4_is_ipv4():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb:cc::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7" and address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64" and address_key("not an address") == "not an address"
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 2}, {}, "2001:db8::1", origin=False) is None
    assert lim.hit({A: 1}, {}, "2001:db8::2", origin=False) is not None  # one subscriber's /64: one share


def test_per_address_memory_is_bounded():
    """At most `max_addresses` (domain, address) entries: the least recently used goes; measured per entry."""
    now = [100.0]

    def roomy(slots: int) -> SiteLimiter:  # a site limit that never refuses: only the address entries count
        return SiteLimiter(1e6, 1_000_000, address_share=0.5, no_origin_share=0.25, max_addresses=slots,
                           clock=lambda: now[0])

    def address(i: int) -> str:
        return f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"

    lim = roomy(1000)
    for i in range(5000):
        assert lim.hit({A: 1}, {}, address(i), origin=True) is None
    assert lim.tracked_addresses() == 1000
    assert lim.hit({A: 500_000}, {}, address(4999), origin=True) is not None  # kept: the most recent one
    assert lim.hit({A: 500_000}, {}, address(0), origin=True) is None  # evicted: it starts afresh
    tracemalloc.start()
    big = roomy(20_000)
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20_000):
        big.hit({A: 1}, {}, address(i), origin=False)
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    tracemalloc.stop()
    assert per_entry < 600, per_entry  # bytes; ADR 29 gives the figure for the default 65,536 entries


# --- the real thing: `tally collector` under granian -----------------------------------------------

ORIGIN = "https://hard.example.org"


def start_collector(servers, tmp_path: Path, workers: int) -> tuple[subprocess.Popen, int, Path]:
    """`tally collector` (RSGI, as shipped) with the 11-hardening check's limits: 200 events/s, burst 2000."""
    from infra.processes import free_port, tcp_open, wait_until

    port = free_port()
    spool = tmp_path / "spool"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_SPOOL_DIR=str(spool), TALLY_COLLECTOR_PORT=str(port), TALLY_COLLECTOR_WORKERS=str(workers),
               TALLY_SITE_RATE_PER_S="200", TALLY_SITE_BURST="2000", TALLY_ALLOWED_HOSTS="127.0.0.1",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    log = tmp_path / "collector.log"
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "collector"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: tcp_open("127.0.0.1", port) and post(port, "", b"[]", "127.0.0.1")[0] == 400,
                   what="the collector", timeout=60)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc, port, spool


def post(port: int, key: str, body: bytes, source: str, origin: str | None = None) -> tuple[int, dict]:
    """POST /collect?site=key as text/plain (what the tag sends) from `source`, on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15, source_address=(source, 0))
    try:
        headers = {"Content-Type": "text/plain", **({"Origin": origin} if origin else {})}
        conn.request("POST", f"/collect?site={key}", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {"retry-after": resp.getheader("Retry-After"), "body": orjson.loads(resp.read())}
    except (ConnectionError, OSError):
        return 0, {}
    finally:
        conn.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_flood_from_one_address_leaves_the_site_to_its_browsers(servers, tmp_path, domain, workers):
    """The 11-hardening scenario: 30 batches of 500 events from 127.0.0.2 as text/plain without an Origin;
    browsers on 127.0.0.3 sending meanwhile and afterwards get 202. Before issue 15 the first four batches
    (two per worker with two workers) took the whole burst and every browser event got 429."""
    site = sites.add(servers.pg_dsn, domain, origins=[ORIGIN])
    proc, port, spool = start_collector(servers, tmp_path, workers)
    try:
        flood = orjson.dumps([{"domain": domain, "url": f"https://{domain}/flood"}] * 500)
        browser = orjson.dumps({"domain": domain, "url": f"https://{domain}/real"})
        flooded, browsers = [], []
        time.sleep(10.05 - time.time() % 10)  # start in a fresh 10 s window of the limit (burst 2000 / 200 per s)
        started = time.time()
        for i in range(30):
            flooded.append(post(port, site.site_key, flood, "127.0.0.2"))
            if i % 6 == 5:  # a browser while the flood goes on
                browsers.append(post(port, site.site_key, browser, "127.0.0.3", ORIGIN)[0])
        browsers.append(post(port, site.site_key, browser, "127.0.0.3", ORIGIN)[0])
        windows = int(time.time() // 10) - int(started // 10) + 1  # the limit's 10 s windows the flood spanned
        assert browsers == [202] * 6
        statuses = [s for s, _ in flooded]
        accepted = statuses.count(202) * 500
        # An address without an Origin: a quarter of each worker's 1/N of the burst per window, so one 500-event
        # batch per window with one worker (500 of 2000), none with two (250 of 1000 each: it never fits).
        bound = 500 * windows if workers == 1 else 0
        assert accepted <= bound and statuses.count(429) >= 30 - windows, statuses
        refusal = next(a for s, a in flooded if s == 429)
        assert refusal["body"]["error"]["code"] == "address_rate_limited" and int(refusal["retry-after"]) >= 1
        if workers == 2:
            assert "smaller batches" in refusal["body"]["error"]["message"]
        flood_events = [e for e in spooled(spool) if e.get("url") == f"https://{domain}/flood"]
        assert len(flood_events) == accepted  # no refused event reached the spool
        if workers == 1 and windows == 1:  # (always, unless this machine took seconds per request)
            # The refused batches charged nothing: the rest of the burst is there for other addresses (each
            # with an Origin may use half of it): with the flood's 500 and the browsers' 6, all 2000 events.
            def batch(n: int) -> bytes:
                return orjson.dumps([{"domain": domain, "url": f"https://{domain}/other"}] * n)

            rest = 2000 - accepted - len(browsers)
            others = [post(port, site.site_key, batch(n), source, ORIGIN)[0]
                      for n, source in ((500, "127.0.0.4"), (500, "127.0.0.4"), (rest - 1000, "127.0.0.5"))]
            assert others == [202, 202, 202]
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_the_shares_are_settings(tmp_path):
    from core.config import ConfigError, Settings

    s = Settings.from_env({"TALLY_HOME": str(tmp_path)})
    assert (s.site_address_share, s.site_no_origin_share) == (0.5, 0.25)
    s = Settings.from_env({"TALLY_HOME": str(tmp_path), "TALLY_SITE_ADDRESS_SHARE": "1",
                           "TALLY_SITE_NO_ORIGIN_SHARE": "1"})
    assert (s.site_address_share, s.site_no_origin_share) == (1.0, 1.0)  # no shares: the site limit only
    for env, variable in (({"TALLY_SITE_NO_ORIGIN_SHARE": "0.6"}, "TALLY_SITE_NO_ORIGIN_SHARE"),
                          ({"TALLY_SITE_ADDRESS_SHARE": "0"}, "TALLY_SITE_ADDRESS_SHARE"),
                          ({"TALLY_SITE_ADDRESS_SHARE": "1.5"}, "TALLY_SITE_ADDRESS_SHARE")):
        with pytest.raises(ConfigError) as exc:
            Settings.from_env({"TALLY_HOME": str(tmp_path), **env})
        assert exc.value.variable == variable
