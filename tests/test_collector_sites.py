"""Who may send: site keys, per-site rate limits and the registry copy at the collector.

Real PostgreSQL (the session's, plus a private one this module stops and restarts for the outage
tests), a real spool on disk, Flask's test client; one test runs `tally collector` under granian.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC

import pytest

from collector.app import create_app
from collector.registry import SiteRegistry
from collector.site_limits import SiteLimiter
from infra.postgres import EmbeddedPostgres
from infra.processes import free_port
from oltp import sites
from oltp.schema import ensure_schema
from tests.conftest import SECRET, register
from tests.eventlib import event_to_dict
from tests.test_collector import spooled

pytestmark = pytest.mark.servers("postgres")


def new_domain() -> str:
    return f"d{uuid.uuid4().hex[:10]}.example.com"


@pytest.fixture()
def settings(make_settings):
    # The site limits alone: the per-address shares of them are tests/test_collector_shares.py's.
    return make_settings(TALLY_REGISTRY_REFRESH_S="0.2", TALLY_SITE_ADDRESS_SHARE="1")


def hit(domain: str, **extra) -> dict:
    return {"domain": domain, "url": f"https://{domain}/", "type": "impression", **extra}


def refusals(app) -> dict:
    return app.extensions["tally_refusals"].snapshot()


# --- keys -------------------------------------------------------------------------------------------

def test_key_in_the_url_or_in_the_event(client, settings, registry, domain):
    key = register(settings, registry, domain)
    assert client.post("/collect", json=hit(domain), query_string={"site": key}).status_code == 202
    assert client.post("/collect", json=[hit(domain, site=key)] * 3).status_code == 202
    events = spooled(settings)
    assert len(events) == 4
    assert all("site" not in event_to_dict(e) and key not in e.to_json().decode() for e in events)  # not stored


def test_unknown_key_is_401_and_writes_nothing(app, client, settings, registry, domain):
    register(settings, registry, domain)
    for kwargs in ({"query_string": {"site": "pk_" + "x" * 22}}, {}):
        batch = [hit(domain, site="pk_nope")] if not kwargs else [hit(domain)] * 2
        resp = client.post("/collect", json=batch, **kwargs)
        assert resp.status_code == 401, resp.json
        assert resp.json["error"]["code"] == "unknown_site_key" and resp.json["error"]["index"] == 0
    missing = client.post("/collect", json=[hit(domain)])
    assert missing.status_code == 401 and missing.json["error"]["code"] == "missing_site_key"
    assert spooled(settings) == []
    # Counted globally, never for the domain the events name: anyone can write any domain into an event,
    # so without that site's registered key a refusal is not the site's (issue 15 item 8).
    assert refusals(app) == {(None, "unknown_site_key"): 3, (None, "missing_site_key"): 1}


def test_key_of_another_domain_is_403_naming_the_event(app, client, settings, registry):
    a, b = new_domain(), new_domain()
    key_a, key_b = register(settings, registry, a), register(settings, registry, b)
    batch = [hit(a), hit(a), hit(b), hit(a)]
    resp = client.post("/collect", json=batch, query_string={"site": key_a})
    assert resp.status_code == 403, resp.json
    err = resp.json["error"]
    assert err["code"] == "site_mismatch" and err["index"] == 2 and err["domain"] == b
    assert spooled(settings) == []
    assert refusals(app) == {(a, "site_mismatch"): 4}  # the site whose key the request carried
    # www. is another site: its events need their own registration
    www = client.post("/collect", json=hit("www." + a), query_string={"site": key_a})
    assert www.status_code == 403 and www.json["error"]["code"] == "site_mismatch"
    # a mixed-domain batch works when each event names its site; the event's field beats ?site=
    ok = client.post("/collect", json=[hit(a), hit(b, site=key_b), hit(a)], query_string={"site": key_a})
    assert ok.status_code == 202, ok.json
    assert sorted(e.domain for e in spooled(settings)) == sorted([a, a, b])


def test_invalid_event_is_counted_and_a_bad_site_field_is_named(app, client, settings, registry, domain):
    key = register(settings, registry, domain)
    resp = client.post("/collect", json=[hit(domain), hit(domain, site=7)], query_string={"site": key})
    assert resp.status_code == 400 and resp.json["error"]["field"] == "site" and resp.json["error"]["index"] == 1
    resp = client.post("/collect", json=[hit(domain), {"domain": "bad domain", "url": "x"}], query_string={"site": key})
    assert resp.status_code == 400 and resp.json["error"]["code"] == "invalid_event"
    client.post("/collect", data=b"{nope", content_type="application/json")
    assert spooled(settings) == []
    assert refusals(app) == {(domain, "invalid_event"): 3, (None, "invalid_event"): 1, (None, "malformed_json"): 1}


def test_removed_site_is_refused_after_a_refresh(client, settings, registry, domain):
    key = register(settings, registry, domain)
    assert client.post("/collect", json=hit(domain, site=key)).status_code == 202
    sites.remove(settings.pg_dsn, domain)
    assert registry.refresh()
    assert client.post("/collect", json=hit(domain, site=key)).status_code == 401


def test_a_new_site_is_accepted_within_seconds(settings, spool, domain):
    registry = SiteRegistry.from_settings(settings).start()  # with its background thread (0.2 s)
    try:
        client = create_app(settings, spool, start_sealer=False, registry=registry).test_client()
        key = "pk_" + "a" * 22
        assert client.post("/collect", json=hit(domain, site=key)).status_code == 401
        key = sites.add(settings.pg_dsn, domain).site_key
        started, status = time.monotonic(), 401
        while status == 401 and time.monotonic() - started < 5:
            time.sleep(0.05)
            status = client.post("/collect", json=hit(domain, site=key)).status_code
        assert status == 202
        assert time.monotonic() - started < 3
    finally:
        registry.stop()


# --- rate limits ------------------------------------------------------------------------------------

def test_over_the_site_limit_is_429_and_writes_nothing(app, client, settings, registry, domain):
    key = register(settings, registry, domain, rate_per_s=1, burst=5)
    assert client.post("/collect", json=[hit(domain)] * 5, query_string={"site": key}).status_code == 202
    resp = client.post("/collect", json=[hit(domain)] * 2, query_string={"site": key})
    assert resp.status_code == 429, resp.json
    assert resp.json["error"]["code"] == "rate_limited" and resp.json["error"]["domain"] == domain
    assert 1 <= int(resp.headers["Retry-After"]) <= 5
    too_big = client.post("/collect", json=[hit(domain)] * 6, query_string={"site": key},
                          environ_base={"REMOTE_ADDR": "127.0.0.2"})
    assert too_big.status_code == 429 and "smaller batches" in too_big.json["error"]["message"]
    assert len(spooled(settings)) == 5
    # every refused event counts, up to what one address may count for the site per window (its share of
    # the site's limit, here all 5: ADR 29): 2 from 127.0.0.1, 5 of the 6 from 127.0.0.2
    assert refusals(app) == {(domain, "rate_limited"): 7}


def test_defaults_come_from_settings(make_settings, spool, domain):
    settings = make_settings(TALLY_SITE_RATE_PER_S="1", TALLY_SITE_BURST="3", TALLY_SITE_ADDRESS_SHARE="1")
    registry = SiteRegistry.from_settings(settings).start(background=False)
    client = create_app(settings, spool, start_sealer=False, registry=registry).test_client()
    key = register(settings, registry, domain)
    assert [client.post("/collect", json=hit(domain, site=key)).status_code for _ in range(4)] == [202] * 3 + [429]


def test_a_refused_mixed_batch_charges_no_site(client, settings, registry):
    a, b = new_domain(), new_domain()
    key_a = register(settings, registry, a, rate_per_s=1, burst=4)
    key_b = register(settings, registry, b, rate_per_s=1, burst=4)
    assert client.post("/collect", json=[hit(b)] * 4, query_string={"site": key_b}).status_code == 202
    resp = client.post("/collect", json=[hit(a, site=key_a)] * 3 + [hit(b, site=key_b)])
    assert resp.status_code == 429 and resp.json["error"]["domain"] == b
    assert client.post("/collect", json=[hit(a)] * 4, query_string={"site": key_a}).status_code == 202


def test_limits_are_shared_out_between_worker_processes():
    one, four = SiteLimiter(1000, 20000), SiteLimiter(1000, 20000, workers=4)
    assert (one.item_for(None, None).amount, one.item_for(None, None).window) == (20000, 20)
    assert (four.item_for(None, None).amount, four.item_for(None, None).window) == (5000, 20)
    # a burst smaller than a second's worth still lets the full rate through
    assert (one.item_for(100, 10).amount, one.item_for(100, 10).window) == (100, 1)
    assert four.hit({"x.example.com": 5000}, {}) is None
    refused = four.hit({"x.example.com": 1}, {})
    assert refused is not None and refused.domain == "x.example.com" and refused.retry_after >= 1


def test_the_sliding_window_weights_the_window_before_and_a_refusal_charges_nothing():
    now = [1000.0]
    limiter = SiteLimiter(10, 10, clock=lambda: now[0])  # 10 events per 1 s window
    assert limiter.hit({"a.example.com": 10}, {}) is None
    over = limiter.hit({"a.example.com": 1}, {})
    assert over is not None and over.domain == "a.example.com" and over.retry_after == 1 and not over.too_big
    now[0] = 1001.5  # half the previous window still counts: 10 * 0.5 = 5 events
    assert limiter.hit({"a.example.com": 6}, {}) is not None
    assert limiter.hit({"a.example.com": 5}, {}) is None  # the refused 6 were not charged
    assert limiter.hit({"a.example.com": 1}, {}) is not None
    now[0] = 1003.0  # two windows on: nothing left of either
    assert limiter.hit({"a.example.com": 10}, {}) is None
    too_big = limiter.hit({"b.example.com": 11}, {})
    assert too_big is not None and too_big.too_big and too_big.domain == "b.example.com"


def test_a_request_over_one_sites_limit_charges_none_of_its_sites():
    now = [50.0]
    limiter = SiteLimiter(10, 10, clock=lambda: now[0])
    assert limiter.hit({"b.example.com": 8}, {}) is None
    refused = limiter.hit({"a.example.com": 4, "b.example.com": 4}, {})
    assert refused is not None and refused.domain == "b.example.com"
    assert limiter.hit({"a.example.com": 10}, {}) is None  # a's 4 were not charged
    # a site whose limit changed starts a fresh window under its new limit
    assert limiter.hit({"b.example.com": 20}, {"b.example.com": (20, 20)}) is None


# --- the registry copy: PostgreSQL outages, the disk copy -------------------------------------------

@pytest.fixture(scope="module")
def own_pg(tmp_path_factory):
    """A PostgreSQL of this module's own, so that stopping it does not disturb other tests."""
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("own-pg") / "data", durable=False)
    pg.start()
    ensure_schema(pg.dsn)
    yield pg
    pg.stop()


def test_postgres_outage_keeps_accepting_with_the_copy_and_the_disk_copy(own_pg, make_settings, spool, domain,
                                                                        tmp_path):
    settings = make_settings(TALLY_PG_DSN=own_pg.dsn, TALLY_REGISTRY_REFRESH_S="0.2")
    key = sites.add(own_pg.dsn, domain).site_key
    first = SiteRegistry.from_settings(settings).start()
    cache = settings.home / "collector" / "sites.json"
    try:
        assert first.snapshot().source == "postgres"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600  # it holds the secrets
        assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
        assert sites.get(own_pg.dsn, domain).secret in cache.read_text()
        app = create_app(settings, spool, start_sealer=False, registry=first)
        client = app.test_client()
        assert client.post("/collect", json=hit(domain, site=key)).status_code == 202

        own_pg.stop()
        time.sleep(0.6)  # a few failed refreshes
        assert client.post("/collect", json=hit(domain, site=key)).status_code == 202
        assert client.post("/collect", json=hit(domain, site="pk_unknown")).status_code == 401

        # a collector (re)started during the outage: the disk copy
        restarted = SiteRegistry.from_settings(settings).start()
        try:
            assert restarted.snapshot().source == "disk"
            client2 = create_app(settings, spool, start_sealer=False, registry=restarted).test_client()
            assert client2.post("/collect", json=hit(domain, site=key)).status_code == 202
            assert client2.post("/collect", json=hit(domain, site="pk_unknown")).status_code == 401

            # neither PostgreSQL nor a disk copy: 503 with Retry-After, never 401
            bare = make_settings(TALLY_PG_DSN=own_pg.dsn, TALLY_REGISTRY_REFRESH_S="0.2",
                                 TALLY_HOME=str(tmp_path / "other-home"))
            blind = SiteRegistry.from_settings(bare).start()
            try:
                assert blind.snapshot() is None
                app3 = create_app(bare, spool, start_sealer=False, registry=blind)
                before = len(spooled(settings))
                resp = app3.test_client().post("/collect", json=[hit(domain, site=key)] * 2)
                assert resp.status_code == 503 and resp.json["error"]["code"] == "registry_unavailable"
                assert int(resp.headers["Retry-After"]) >= 1
                assert len(spooled(settings)) == before
                # no registry, so no key could be checked: nobody's refusal (counted globally)
                assert app3.extensions["tally_refusals"].snapshot() == {(None, "registry_unavailable"): 2}

                # PostgreSQL is back: every copy catches up by itself, new sites included
                own_pg.start()
                other = new_domain()
                other_key = sites.add(own_pg.dsn, other).site_key
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not all(
                        r.snapshot() is not None and r.snapshot().source == "postgres"
                        and other in r.snapshot().by_domain
                        for r in (first, restarted, blind)):
                    time.sleep(0.1)
                assert client2.post("/collect", json=hit(other, site=other_key)).status_code == 202
                assert app3.test_client().post("/collect", json=hit(other, site=other_key)).status_code == 202
            finally:
                blind.stop()
        finally:
            restarted.stop()
    finally:
        first.stop()
        if own_pg.proc is None or own_pg.proc.poll() is not None:
            own_pg.start()


def test_an_unreadable_disk_copy_counts_as_none(own_pg, make_settings):
    settings = make_settings(TALLY_PG_DSN="postgresql://postgres@127.0.0.1:1/postgres")
    cache = settings.home / "collector" / "sites.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{torn")
    assert SiteRegistry.from_settings(settings).start(background=False).snapshot() is None


# --- the real thing: `tally sites add` while `tally collector` runs under granian --------------------

def test_tally_collector_accepts_a_site_added_from_the_cli(servers, tmp_path, domain):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_SPOOL_DIR=str(tmp_path / "spool"), TALLY_COLLECTOR_PORT=str(port),
               TALLY_COLLECTOR_WORKERS="2", TALLY_REGISTRY_REFRESH_S="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "collector"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(key: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/collect?site={key}", method="POST",
                                     data=json.dumps(hit(domain)).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except urllib.error.URLError:
            return 0

    try:
        deadline = time.monotonic() + 30
        while post("pk_" + "b" * 22) != 401:  # up, and refusing unknown keys
            assert time.monotonic() < deadline and proc.poll() is None, "collector did not start"
            time.sleep(0.2)
        added = subprocess.run([sys.executable, "-m", "tally.cli", "sites", "add", domain, "--json"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        key = json.loads(added.stdout)["site_key"]
        started = time.monotonic()
        # every worker process must know it: several accepted hits in a row
        statuses: list[int] = []
        while statuses[-6:] != [202] * 6 and time.monotonic() - started < 10:
            statuses.append(post(key))
        assert statuses[-6:] == [202] * 6, statuses
        assert time.monotonic() - started < 5
        cache = tmp_path / "home" / "collector" / "sites.json"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_demo_traffic_carries_the_demo_sites_keys(client, settings, registry):
    """`tally up --demo` registers its sites (idempotently) and every demo batch is accepted."""
    import random
    from datetime import datetime

    from tally.demo import DEMO_DOMAINS, demo_batch, register_demo_sites

    keys = register_demo_sites(settings.pg_dsn)
    assert register_demo_sites(settings.pg_dsn) == keys and set(keys) == set(DEMO_DOMAINS)
    assert registry.refresh()
    rng = random.Random(1)
    for _ in range(5):
        resp = client.post("/collect", json=demo_batch(rng, 30, datetime.now(UTC), keys))
        assert resp.status_code == 202, resp.json


def test_a_site_added_a_moment_ago_is_accepted_on_its_first_hit(client, settings, registry):
    """The copy lacks the new key: the collector reloads it once, there and then, instead of refusing."""
    domain = new_domain()
    key = sites.add(settings.pg_dsn, domain).site_key  # no registry.refresh(): the copy does not know it yet
    assert key not in registry.snapshot().by_key
    registry._last_miss_refresh = float("-inf")
    resp = client.post("/collect", json=hit(domain), query_string={"site": key})
    assert resp.status_code == 202, resp.json
    assert key in registry.snapshot().by_key


def test_unknown_keys_reload_the_registry_at_most_once_a_second(settings):
    calls = []
    site = sites.add(settings.pg_dsn, new_domain())

    def loader():
        calls.append(time.monotonic())
        return sites.load_all(settings.pg_dsn)

    reg = SiteRegistry(loader, None, refresh_s=3600).start(background=False)
    assert len(calls) == 1 and site.site_key in reg.snapshot().by_key
    for i in range(50):  # a flood of made-up keys
        assert reg.snapshot_knowing([f"pk_made_up_{i}"]) is not None
    assert len(calls) == 2  # one reload for the whole flood
    assert reg.snapshot_knowing([site.site_key, None, 7]) is reg.snapshot()  # known keys never reload
    assert len(calls) == 2


def test_an_origin_change_reaches_a_running_collector_within_its_refresh(settings, spool, domain):
    """`tally sites update --add-origin / --remove-origin` (issue 17 item 5) needs no collector restart: the
    running collector (waitress, its registry's background thread at TALLY_REGISTRY_REFRESH_S=0.2) allows a
    new origin and refuses a withdrawn one within its refresh; the key stays the same throughout."""
    from tests.conftest import serve_in_thread

    old, new = "https://old.example", "http://localhost:8000"
    key = sites.add(settings.pg_dsn, domain, origins=[old]).site_key
    registry = SiteRegistry.from_settings(settings).start()
    port = free_port()
    server = serve_in_thread(create_app(settings, spool, start_sealer=False, registry=registry), port)

    def status(origin: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/collect?site={key}", json.dumps(hit(domain)).encode(),
                                     {"Content-Type": "text/plain", "Origin": origin})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def within_refresh(origin: str, want: int) -> float:
        started = time.monotonic()
        while status(origin) != want:
            assert time.monotonic() - started < 10, f"{origin} never answered {want}"
            time.sleep(0.05)
        return time.monotonic() - started

    try:
        assert (status(old), status(new)) == (202, 403)
        sites.update(settings.pg_dsn, domain, sites.Change(add_origins=(new,), remove_origins=(old,)))
        within_refresh(new, 202)
        within_refresh(old, 403)
        assert sites.get(settings.pg_dsn, domain).site_key == key
    finally:
        server.close()
        registry.stop()
