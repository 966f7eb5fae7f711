"""A site's limit cannot be taken by one address, nor its refusal counts inflated by one (issue 15 items 5
and 8, the review's findings 8 and 9; docs/adr/0029-per-address-shares.md).

The limiter's per-address shares on a fake clock; the collector app in-process (the review's
reproduction: a forged Origin, two IPv6 /64s of one /56); then `tally collector` (real granian, RSGI as
shipped, one and two workers) flooded from 127.0.0.2 while browsers send from 127.0.0.3 and others
(Linux routes all of 127.0.0.0/8 to loopback, so a client can bind any of them as its source address).
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import orjson
import pytest

from collector.site_limits import SiteLimiter, address_key
from oltp import sites
from tests.conftest import SECRET
from tests.test_collector_fast_path import spooled

pytestmark = pytest.mark.servers("postgres")

A, B = "a.example.com", "b.example.com"


def tracked(lim: SiteLimiter) -> int:
    """How many (domain, address) entries `lim` holds now (at most its `max_addresses`)."""
    return len(lim._addresses)


def limiter(now: list[float], **kwargs) -> SiteLimiter:
    """10 events per 1 s window per site; one address a fifth of it (2 events)."""
    return SiteLimiter(10, 10, address_share=0.2, clock=lambda: now[0], **kwargs)


def test_one_address_gets_its_share_and_the_rest_is_left_to_others():
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 2}, {}, "10.0.0.1") is None
    over = lim.hit({A: 1}, {}, "10.0.0.1")
    assert over is not None and over.address and not over.too_big and over.domain == A and over.limit == 2
    for address in ("10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"):  # other addresses: each its own share
        assert lim.hit({A: 2}, {}, address) is None
    site_full = lim.hit({A: 1}, {}, "10.0.0.6")  # the site's 10 are used
    assert site_full is not None and not site_full.address
    big = lim.hit({B: 3}, {}, "10.0.0.1")
    assert big is not None and big.address and big.too_big  # never fits one address


def test_the_shares_bound_one_address_not_a_distributed_sender():
    """What the shares promise, and what they do not (ADR 29): one address (or one IPv6 /56) never takes
    more than its share, but 1/share addresses together take the whole site limit, which still bounds
    the total: a sender with many addresses is held by the site limit only."""
    now = [100.0]
    lim = SiteLimiter(100, 100, address_share=0.1, clock=lambda: now[0])  # 100 per 1 s window, 10 per address
    assert lim.hit({A: 10}, {}, "198.51.100.1") is None
    assert lim.hit({A: 1}, {}, "198.51.100.1").address
    for i in range(2, 11):  # nine more addresses
        assert lim.hit({A: 10}, {}, f"198.51.100.{i}") is None
    browser = lim.hit({A: 1}, {}, "192.0.2.7")
    assert browser is not None and not browser.address  # the site limit: the distributed sender took it all


def test_refused_requests_charge_neither_the_site_nor_the_address():
    """Before issue 15 the flood's events were charged to the site until it was full; now a refused
    request is charged nothing, and what one address was admitted is all it ever took."""
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 2}, {}, "10.0.0.1") is None
    for _ in range(1000):  # a flood: every request refused
        assert lim.hit({A: 2}, {}, "10.0.0.1") is not None
    for i in range(2, 6):
        assert lim.hit({A: 2}, {}, f"10.0.0.{i}") is None  # 2 + 4 * 2: the whole site budget
    assert lim.hit({A: 1}, {}, "10.0.0.9") is not None
    # a mixed request over one site's address share charges none of its sites
    assert lim.hit({B: 1, A: 1}, {}, "10.0.0.7") is not None
    assert lim.hit({B: 2}, {}, "10.0.0.7") is None


def test_shares_slide_with_the_window():
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 2}, {}, "10.0.0.1") is None
    refused = lim.hit({A: 1}, {}, "10.0.0.1")
    assert refused is not None and refused.retry_after == 1
    now[0] = 101.5  # half of the previous window still counts: 1 of the 2
    assert lim.hit({A: 1}, {}, "10.0.0.1") is None
    assert lim.hit({A: 1}, {}, "10.0.0.1") is not None
    now[0] = 103.0
    assert lim.hit({A: 2}, {}, "10.0.0.1") is None


def test_no_address_or_whole_shares_keep_no_per_address_state():
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 10}, {}, None) is None  # no address known: the site limit only
    whole = SiteLimiter(10, 10, clock=lambda: now[0])  # a share of 1: the site limit only
    assert whole.hit({A: 10}, {}, "10.0.0.1") is None
    assert tracked(whole) == 0 and tracked(lim) == 0
    for bad in (0, 1.5):
        with pytest.raises(ValueError):
            SiteLimiter(10, 10, address_share=bad)


def test_ipv6_addresses_count_by_their_56_and_mapped_ipv4_is_ipv4():
    """A home's ISP delegates a /56 (some a /48): 256 /64s. Before, each /64 had its own share, so one
    subscriber had hundreds of shares (the review: two /64s of one host each got half the site)."""
    assert address_key("2001:db8:0:1::1") == address_key("2001:db8:0:2::1") == "2001:db8::/56"
    assert address_key("2001:db8:0:ff:aaaa::1") == "2001:db8::/56"
    assert address_key("2001:db8:0:100::1") == "2001:db8:0:100::/56" != address_key("2001:db8::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7" and address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/56" and address_key("not an address") == "not an address"
    now = [100.0]
    lim = limiter(now)
    assert lim.hit({A: 2}, {}, "2001:db8:0:1::1") is None
    assert lim.hit({A: 1}, {}, "2001:db8:0:2::2") is not None  # another /64 of the same /56: the same share
    assert lim.hit({A: 1}, {}, "2001:db8:0:100::1") is None  # the next /56: another subscriber


def test_one_server_keeps_a_meaningful_part_of_the_default_budget():
    """A single server-side sender at the default limits (1,000 events/s, burst 20,000, two workers):
    its share of each worker is 10 %, so it keeps ~100 events/s sustained after a burst of 2,000, far
    more than the 11-noloss check's senders need (~250/s offered, retried on 429)."""
    from core.config import Settings

    s = Settings.from_env({"TALLY_HOME": "/nonexistent"})
    now = [1000.0]
    workers = [SiteLimiter(s.site_rate_per_s, s.site_burst, workers=2, address_share=s.site_address_share,
                           clock=lambda: now[0]) for _ in range(2)]
    admitted = 0
    for tick in range(250 * 120):  # 250 single events/s for 120 s, alternating between the workers
        now[0] = 1000.0 + tick / 250
        admitted += workers[tick % 2].hit({A: 1}, {}, "203.0.113.9") is None
    assert 2_000 + 100 * 100 <= admitted <= 2_000 + 100 * 120 + 2, admitted  # the burst, then ~100/s


def test_per_address_memory_is_bounded():
    """At most `max_addresses` (domain, address) entries: the least recently used goes; measured per entry."""
    now = [100.0]

    def roomy(slots: int) -> SiteLimiter:  # a site limit that never refuses: only the address entries count
        return SiteLimiter(1e6, 1_000_000, address_share=0.5, max_addresses=slots, clock=lambda: now[0])

    def address(i: int) -> str:
        return f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"

    lim = roomy(1000)
    for i in range(5000):
        assert lim.hit({A: 1}, {}, address(i)) is None
    assert tracked(lim) == 1000
    assert lim.hit({A: 500_000}, {}, address(4999)) is not None  # kept: the most recent one
    assert lim.hit({A: 500_000}, {}, address(0)) is None  # evicted: it starts afresh
    tracemalloc.start()
    big = roomy(20_000)
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20_000):
        big.hit({A: 1}, {}, address(i))
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    tracemalloc.stop()
    assert per_entry < 600, per_entry  # bytes; ADR 29 gives the figure for the default 65,536 entries


def test_refusals_count_for_a_site_up_to_the_addresss_share_per_window():
    now = [100.0]
    lim = limiter(now)  # 2 per address per 1 s window
    assert lim.countable(A, 500, (None, None), "10.0.0.1") == 2
    assert lim.countable(A, 500, (None, None), "10.0.0.1") == 0
    assert lim.countable(B, 3, (None, None), "10.0.0.1") == 2  # per site
    assert lim.countable(A, 1, (None, None), "10.0.0.2") == 1  # per address
    assert lim.hit({A: 2}, {}, "10.0.0.1") is None  # the refusals did not use the address's share
    now[0] = 101.5
    assert lim.countable(A, 500, (None, None), "10.0.0.1") == 1  # the window slides
    assert lim.countable(A, 7, (None, None), None) == 7  # no address known: nothing to bound it by
    whole = SiteLimiter(10, 10, clock=lambda: now[0])  # a share of 1: a window's worth of the site limit
    assert whole.countable(A, 500, (None, None), "10.0.0.1") == 10


# --- the collector app (Flask's test client: the lean path and Flask) -------------------------------

ORIGIN = "https://hard.example.org"


@pytest.fixture()
def hardened(make_settings, spool):
    """A collector app with the 11-hardening check's limits (200 events/s, burst 2000: a 10 s window),
    and a site that registered ORIGIN; yields (app, client, site)."""
    from collector.app import create_app
    from collector.registry import SiteRegistry

    settings = make_settings(TALLY_SITE_RATE_PER_S="200", TALLY_SITE_BURST="2000")
    registry = SiteRegistry.from_settings(settings).start(background=False)
    site = sites.add(settings.pg_dsn, f"d{uuid.uuid4().hex[:10]}.example.com", origins=[ORIGIN])
    assert registry.refresh()
    app = create_app(settings, spool, start_sealer=False, registry=registry)
    yield app, app.test_client(), site
    registry.stop()


def fresh_window(seconds: int = 10, margin: float = 3.0) -> None:
    """Wait for a fresh limit window if less than `margin` seconds of this one are left."""
    left = seconds - time.time() % seconds
    if left < margin:
        time.sleep(left + 0.05)


def test_a_forged_origin_earns_no_bigger_share_and_a_56_is_one_address(hardened):
    """The review's reproduction (rate 200/s, burst 2,000): with a forged Origin, 203.0.113.5 and
    2001:db8:0:1::1 were admitted 1,000 events each (half the burst each), 2001:db8:0:2::1 none, and a
    real browser from 198.51.100.7 then got 429 rate_limited. Now each address (the two IPv6 ones are
    one /56) gets a tenth, Origin or not, and the browser gets 202."""
    app, client, site = hardened
    batch = orjson.dumps([{"domain": site.domain, "url": f"https://{site.domain}/forged"}] * 50)
    fresh_window()
    admitted = {}
    for address in ("203.0.113.5", "2001:db8:0:1::1", "2001:db8:0:2::1"):
        admitted[address] = 0
        for _ in range(40):
            resp = client.post(f"/collect?site={site.site_key}", data=batch, content_type="text/plain",
                               headers={"Origin": ORIGIN}, environ_base={"REMOTE_ADDR": address})
            if resp.status_code != 202:
                assert resp.status_code == 429 and resp.json["error"]["code"] == "address_rate_limited"
                break
            admitted[address] += 50
    assert admitted == {"203.0.113.5": 200, "2001:db8:0:1::1": 200, "2001:db8:0:2::1": 0}
    for origin in ({"Origin": ORIGIN}, {}):  # no Origin: the same share, no smaller one
        resp = client.post(f"/collect?site={site.site_key}", data=batch, content_type="text/plain",
                           headers=origin, environ_base={"REMOTE_ADDR": "192.0.2.44" if origin else "192.0.2.45"})
        assert resp.status_code == 202, resp.json
    browser = client.post(f"/collect?site={site.site_key}",
                          data=orjson.dumps({"domain": site.domain, "url": f"https://{site.domain}/real"}),
                          content_type="text/plain", headers={"Origin": ORIGIN},
                          environ_base={"REMOTE_ADDR": "198.51.100.7"})
    assert browser.status_code == 202, browser.json


def test_a_batch_over_the_limit_counts_one_refusal(hardened):
    """The review: `[0,0,...]` (2 bytes per item, within the 256 KiB body cap) with the site's public key
    counted ~120,000 `batch_too_large` refusals for the site per request. A refusal of the whole request
    counts once, for the site its first event's key names."""
    app, client, site = hardened
    body = b"[" + b",".join([b"0"] * 120_000) + b"]"
    assert len(body) < 256 * 1024
    for _ in range(3):
        resp = client.post(f"/collect?site={site.site_key}", data=body, content_type="text/plain")
        assert resp.status_code == 413 and resp.json["error"]["code"] == "batch_too_large"
    nobody = client.post("/collect?site=pk_not_a_registered_key_00", data=body, content_type="text/plain")
    assert nobody.status_code == 413
    assert app.extensions["tally_refusals"].snapshot() == {(site.domain, "batch_too_large"): 3,
                                                           (None, "batch_too_large"): 1}


def test_one_address_cannot_inflate_a_sites_refusal_counts(make_settings, spool, domain):
    """The refusals one address makes count for a site up to its share per window (here 10 per 100 s
    window); the metrics count every one. Before, 5 refused batches of 500 counted 2,500 for the site."""
    from collector.app import create_app
    from collector.registry import SiteRegistry

    settings = make_settings()
    registry = SiteRegistry.from_settings(settings).start(background=False)
    try:
        site = sites.add(settings.pg_dsn, domain, rate_per_s=1, burst=100)  # A = 100 per 100 s: 10 per address
        assert registry.refresh()
        app = create_app(settings, spool, start_sealer=False, registry=registry)
        client = app.test_client()
        bad = orjson.dumps([{"domain": domain, "url": f"https://{domain}/", "type": "click"}] * 500)
        for address in ["10.1.0.1"] * 5 + ["10.1.0.2"]:
            resp = client.post(f"/collect?site={site.site_key}", data=bad, content_type="text/plain",
                               environ_base={"REMOTE_ADDR": address})
            assert resp.status_code == 400 and resp.json["error"]["code"] == "invalid_event"
        counted = app.extensions["tally_refusals"].snapshot()[(domain, "invalid_event")]
        assert 20 <= counted <= 22, counted  # 10 + 10 (+1 each if the window turned meanwhile)
    finally:
        registry.stop()


# --- the real thing: `tally collector` under granian -----------------------------------------------


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
    (two per worker with two workers) took the whole burst and every browser event got 429; before the
    review's finding 8, one batch per window (one worker) was admitted."""
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
        # An address: a tenth of each worker's 1/N of the burst per window, 200 (one worker) or 100 (two) of
        # 2000: a 500-event batch never fits, Origin or not.
        assert statuses == [429] * 30, statuses
        refusal = flooded[0][1]
        assert refusal["body"]["error"]["code"] == "address_rate_limited" and int(refusal["retry-after"]) >= 1
        assert "smaller batches" in refusal["body"]["error"]["message"]
        assert [e for e in spooled(spool) if e.get("url") == f"https://{domain}/flood"] == []
        if workers == 1 and windows == 1:  # (always, unless this machine took seconds per request)
            # The refused batches charged nothing: nine other addresses may each send their 200 (with or
            # without an Origin), 1,800 events, which with the browsers' 6 fit the site's 2,000.
            def batch(n: int) -> bytes:
                return orjson.dumps([{"domain": domain, "url": f"https://{domain}/other"}] * n)

            others = [post(port, site.site_key, batch(200), f"127.0.0.{10 + i}", ORIGIN if i % 2 else None)[0]
                      for i in range(9)]
            assert others == [202] * 9
            over = post(port, site.site_key, batch(1), "127.0.0.10", ORIGIN)
            assert over[0] == 429 and over[1]["body"]["error"]["code"] == "address_rate_limited"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_the_share_is_a_setting_and_an_origin_earns_no_other(tmp_path):
    from core.config import ConfigError, Settings

    s = Settings.from_env({"TALLY_HOME": str(tmp_path)})
    assert s.site_address_share == 0.1
    s = Settings.from_env({"TALLY_HOME": str(tmp_path), "TALLY_SITE_ADDRESS_SHARE": "1"})
    assert s.site_address_share == 1.0  # no share: the site limit only
    for env, variable in (({"TALLY_SITE_NO_ORIGIN_SHARE": "0.25"}, "TALLY_SITE_NO_ORIGIN_SHARE"),  # gone
                          ({"TALLY_SITE_ADDRESS_SHARE": "0"}, "TALLY_SITE_ADDRESS_SHARE"),
                          ({"TALLY_SITE_ADDRESS_SHARE": "1.5"}, "TALLY_SITE_ADDRESS_SHARE")):
        with pytest.raises(ConfigError) as exc:
            Settings.from_env({"TALLY_HOME": str(tmp_path), **env})
        assert exc.value.variable == variable
