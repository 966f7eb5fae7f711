"""Enrichment at the edge (issue 17 item 1, collector side; docs/adr/0044-enrichment-at-the-edge.md).

- collector/client_ip.py: `X-Forwarded-For` believed only from a peer in TALLY_TRUSTED_PROXIES, the
  rightmost untrusted hop (all trusted: the leftmost), malformed -> the peer; the one rule in all three
  server paths (Flask, the WSGI fast path, RSGI), and everything per-address uses the client it gives
  (visitor key, country, per-address shares, the pixel's address key).
- collector/geo.py: the country (iptocc by default, a MaxMind DB file with TALLY_GEOIP_DB), None for
  addresses not on the public internet; a bad TALLY_GEOIP_DB stops the collector at startup, named.
- collector/ua.py: headless / automated browsers are device `bot`; HTTP client libraries are not.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import maxminddb
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet
from werkzeug.test import Client, EnvironBuilder

from collector import geo
from collector.app import create_app
from collector.client_ip import _forwarded, client_address
from collector.geo import GeoipFile, country_lookup, country_of
from collector.rsgi import CollectorRSGI
from collector.ua import classify_user_agent
from core.config import ConfigError, Settings
from core.event import mac_key, visitor_key
from core.pixel import signed_query
from oltp import sites
from spool.segments import SpoolWriter
from tests.conftest import SECRET, register
from tests.test_collector_fast_path import hit, spooled
from tests.test_collector_rsgi import FakeHeaders, FakeProto, FakeScope

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
HEADLESS = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 "
            "Safari/537.36")


def nets(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# --- the client address ----------------------------------------------------------------------------

LOCAL = nets("127.0.0.1/32", "10.0.0.0/8", "::1/128")


@pytest.mark.parametrize("peer, forwarded, trusted, client", [
    ("127.0.0.1", "8.8.8.8", (), "127.0.0.1"),  # default: nobody is trusted, the header is ignored
    ("203.0.113.9", "8.8.8.8", LOCAL, "203.0.113.9"),  # an untrusted peer cannot choose its address
    ("127.0.0.1", None, LOCAL, "127.0.0.1"),  # no header: the peer
    ("127.0.0.1", "8.8.8.8", LOCAL, "8.8.8.8"),
    ("127.0.0.1", " 8.8.8.8 ", LOCAL, "8.8.8.8"),
    ("127.0.0.1", "1.1.1.1, 8.8.8.8, 10.0.0.2", LOCAL, "8.8.8.8"),  # the rightmost untrusted hop
    ("127.0.0.1", "10.0.0.5, 10.0.0.2", LOCAL, "10.0.0.5"),  # every hop trusted: the leftmost
    ("::1", "2001:db8::1", LOCAL, "2001:db8::1"),
    ("::1", "[2001:4860:4860::8888]", LOCAL, "2001:4860:4860::8888"),
    ("::ffff:127.0.0.1", "8.8.4.4", LOCAL, "8.8.4.4"),  # an IPv4-mapped peer is its IPv4 address
    ("127.0.0.1", "::ffff:8.8.8.8", LOCAL, "8.8.8.8"),
    # hops with ports, as some load balancers write them
    ("127.0.0.1", "8.8.8.8:443", LOCAL, "8.8.8.8"),
    ("127.0.0.1", "[2001:db8::1]:443", LOCAL, "2001:db8::1"),
    # what the client wrote left of the rightmost untrusted hop is never read: it cannot make the client its proxy
    ("127.0.0.1", "junk, 81.2.69.142", LOCAL, "81.2.69.142"),
    ("127.0.0.1", ",".join(["8.8.8.8"] * 40) + ", 81.2.69.142", LOCAL, "81.2.69.142"),
    ("127.0.0.1", "x" * 5000 + ", 81.2.69.142", LOCAL, "81.2.69.142"),
    ("127.0.0.1", "unknown, 10.0.0.5", LOCAL, "10.0.0.5"),  # the last trusted hop read
    # where a trusted proxy wrote junk: the peer, never an error
    ("127.0.0.1", "8.8.8.8, nonsense", LOCAL, "127.0.0.1"),
    ("127.0.0.1", "8.8.8.8,,", LOCAL, "127.0.0.1"),
    ("127.0.0.1", "unknown", LOCAL, "127.0.0.1"),
    ("127.0.0.1", "8.8.8.8:http", LOCAL, "127.0.0.1"),
    ("127.0.0.1", "8.8.8.8 " * 300, LOCAL, "127.0.0.1"),
    ("127.0.0.1", "\x00\xff", LOCAL, "127.0.0.1"),
    ("not-an-address", "8.8.8.8", LOCAL, "not-an-address"),
    (None, "8.8.8.8", LOCAL, None),
])
def test_client_address(peer, forwarded, trusted, client):
    assert client_address(peer, forwarded, trusted) == client


def test_only_a_trusted_peers_header_is_cached():
    _forwarded.cache_clear()
    for i in range(50):
        assert client_address("203.0.113.9", f"8.8.8.{i}", LOCAL) == "203.0.113.9"
    assert _forwarded.cache_info().currsize == 0
    assert client_address("10.0.0.1", "8.8.8.8", LOCAL) == "8.8.8.8" and _forwarded.cache_info().currsize == 1


def test_trusted_proxies_setting_parses_and_names_a_bad_value():
    assert Settings.from_env({}).trusted_proxies == ()
    assert Settings.from_env({"TALLY_TRUSTED_PROXIES": "127.0.0.1/32, 10.0.0.0/8,::1"}).trusted_proxies == \
        nets("127.0.0.1/32", "10.0.0.0/8", "::1/128")
    with pytest.raises(ConfigError, match=r"TALLY_TRUSTED_PROXIES: 'proxy\.example' is not an IP network"):
        Settings.from_env({"TALLY_TRUSTED_PROXIES": "10.0.0.0/8,proxy.example"})


# --- countries ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ip, country", [
    ("8.8.8.8", "US"), ("1.0.16.1", "JP"), ("2001:4860:4860::8888", "US"), ("::ffff:8.8.8.8", "US"),
    ("10.1.2.3", None), ("192.168.1.1", None), ("172.16.0.1", None), ("127.0.0.1", None), ("::1", None),
    ("169.254.1.1", None), ("fe80::1", None), ("fc00::1", None), ("100.64.0.1", None), ("192.0.2.1", None),
    ("240.0.0.1", None), ("224.0.0.1", None), ("0.0.0.0", None), ("::", None),
    ("", None), ("garbage", None), ("8.8.8.8.8", None),
])
def test_country_of_by_the_embedded_data(ip, country):
    assert country_of(ip) == country


def test_public_addresses_agree_with_ipaddress():
    """collector/geo.py's table of addresses that have no country (integer ranges, parsed by the C library)
    says what Python's `ipaddress` says: global, not multicast, not reserved, not unspecified."""
    rng = random.Random(17)
    special = [net for net in (*geo._NOT_PUBLIC_V4, *geo._NOT_PUBLIC_V6, *geo._GLOBAL_UNICAST_V6)]
    numbers = [(v, n) for v, first, last in special for n in (first - 1, first, (first + last) // 2, last, last + 1)]
    numbers += [(4, rng.getrandbits(32)) for _ in range(5000)] + [(6, rng.getrandbits(128)) for _ in range(2000)]
    numbers += [(6, (0x2000 << 112) + rng.getrandbits(125)) for _ in range(2000)]
    for version, number in numbers:
        ip = ipaddress.ip_address(number) if version == 6 else ipaddress.IPv4Address(number % (1 << 32))
        if ip in ipaddress.ip_network("192.0.0.0/24") and not ip.is_private:
            continue  # 192.0.0.9 and .10 are anycast services: Python 3.11 says global, the table none
        site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local  # fec0::/10: Python says global
        expected = ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or site_local)
        assert (geo.public_address(str(ip)) is not None) == expected, ip
        if expected:
            assert geo.public_address(str(ip)) == str(ip)
    assert geo.public_address("::FFFF:8.8.8.8") == "8.8.8.8" and geo.public_address("[2001:4860::1]") == "2001:4860::1"
    assert geo.public_address("fe80::1%eth0") is None and geo.public_address("08.8.8.8") is None


def test_country_of_is_cached_per_address():
    country_of("8.8.4.4")
    hits = country_of.cache_info().hits
    assert country_of("8.8.4.4") == "US" and country_of.cache_info().hits == hits + 1
    assert country_lookup(None) is country_of


def write_mmdb(path: Path, ip_version: int = 6) -> Path:
    """A tiny MaxMind DB: country, registered_country only, a bad code, a record without a country."""
    writer = MMDBWriter(ip_version=ip_version, database_type="GeoIP2-Country", ipv4_compatible=ip_version == 6)
    writer.insert_network(IPSet(["8.8.8.0/24"]), {"country": {"iso_code": "DE"},
                                                  "registered_country": {"iso_code": "US"}})
    writer.insert_network(IPSet(["9.9.9.0/24"]), {"registered_country": {"iso_code": "CH"}})
    writer.insert_network(IPSet(["5.5.5.0/24"]), {"country": {"iso_code": "de"}})
    writer.insert_network(IPSet(["6.6.6.0/24"]), {"continent": {"code": "EU"}})
    if ip_version == 6:
        writer.insert_network(IPSet(["2a00:1450::/32"]), {"country": {"iso_code": "FR"}})
    writer.to_db_file(str(path))
    return path


def test_a_maxmind_file_gives_its_countries(tmp_path):
    lookup = country_lookup(write_mmdb(tmp_path / "c.mmdb"))
    assert lookup is not country_of
    assert [lookup(ip) for ip in ("8.8.8.8", "9.9.9.9", "2a00:1450::1", "::ffff:8.8.8.8")] == ["DE", "CH", "FR", "DE"]
    assert [lookup(ip) for ip in ("5.5.5.5", "6.6.6.6", "1.1.1.1", "10.0.0.1", "::1", "garbage")] == [None] * 6
    v4_only = country_lookup(write_mmdb(tmp_path / "v4.mmdb", ip_version=4))
    assert v4_only("8.8.8.8") == "DE" and v4_only("2a00:1450::1") is None  # an IPv6 address in an IPv4 file


def test_a_bad_geoip_db_is_refused_naming_the_path(tmp_path):
    missing = tmp_path / "nope.mmdb"
    with pytest.raises(ConfigError, match=f"TALLY_GEOIP_DB: cannot read {missing} "):
        Settings.from_env({"TALLY_GEOIP_DB": str(missing)})
    text = tmp_path / "countries.csv"
    text.write_text("8.8.8.0/24,US\n")
    with pytest.raises(ConfigError, match=f"TALLY_GEOIP_DB: {text} is not a MaxMind DB"):
        Settings.from_env({"TALLY_GEOIP_DB": str(text)})
    unreadable = write_mmdb(tmp_path / "private.mmdb")
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads it anyway
        with pytest.raises(ConfigError, match=f"cannot read {unreadable}"):
            Settings.from_env({"TALLY_GEOIP_DB": str(unreadable)})
    unreadable.chmod(0o600)
    assert Settings.from_env({"TALLY_GEOIP_DB": str(unreadable)}).geoip_db == unreadable
    damaged = tmp_path / "damaged.mmdb"  # the metadata marker, then nothing a reader can use
    damaged.write_bytes(b"\x00" * 64 + b"\xab\xcd\xefMaxMind.com" + b"\xff" * 8)
    settings = Settings.from_env({"TALLY_GEOIP_DB": str(damaged)})
    with pytest.raises(ConfigError, match=f"TALLY_GEOIP_DB: cannot open {damaged} as a MaxMind DB file"):
        GeoipFile(settings.geoip_db)
    with pytest.raises(maxminddb.InvalidDatabaseError):  # what the collector would have met
        maxminddb.open_database(str(damaged))


def test_the_collector_does_not_start_with_a_missing_geoip_db(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TALLY_HOME": str(tmp_path), "TALLY_SECRET": SECRET,
           "TALLY_PG_DSN": "postgresql://postgres@127.0.0.1:1/postgres", "TALLY_GEOIP_DB": str(tmp_path / "x.mmdb")}
    proc = subprocess.run([sys.executable, "-m", "tally.cli", "collector"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert f"TALLY_GEOIP_DB: cannot read {tmp_path / 'x.mmdb'}" in proc.stderr


# --- bots --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ua", [
    HEADLESS,
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.28 "
    "Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0 Headless",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 "
    "Playwright/1.49.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Puppeteer Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko; Google Page Speed Insights) "
    "Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) PhantomJS/2.1.1 Safari/538.1",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36 Selenium",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Cypress/13.6.0 Chrome/118.0 "
    "Electron/27.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36 GTmetrix",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Mozilla/5.0 (compatible; Yahoo! Slurp; http://help.yahoo.com/help/us/ysearch/slurp)",
])
def test_automated_browsers_and_crawlers_are_bots(ua):
    assert classify_user_agent(ua)[2] == "bot"


@pytest.mark.parametrize("ua, device", [
    (FIREFOX, "desktop"),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.5 Mobile/15E148 Safari/604.1", "mobile"),
    ("Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 "
     "Mobile/15E148 Safari/604.1", "tablet"),
    # HTTP client libraries are not bots: a site fed from its own servers sends with them (ADR 44)
    ("curl/8.5.0", "desktop"), ("python-requests/2.32.3", "desktop"), ("Go-http-client/1.1", "desktop"),
    ("Wget/1.21.4", "desktop"), ("Python-urllib/3.11", "desktop"),
])
def test_people_and_http_clients_are_not_bots(ua, device):
    assert classify_user_agent(ua)[2] == device


# --- the three server paths -------------------------------------------------------------------------

@pytest.fixture()
def trusting(make_settings, registry, tmp_path):
    """A collector app trusting 127.0.0.1 as its proxy, with a small per-address share; its spool dir."""
    settings = make_settings(TALLY_TRUSTED_PROXIES="127.0.0.1/32", TALLY_SITE_ADDRESS_SHARE="0.01")
    directory = tmp_path / "spool-trusting"
    app = create_app(settings.with_overrides(spool_dir=directory),
                     SpoolWriter(directory, max_bytes=1 << 20, max_age_s=3600), start_sealer=False, registry=registry)
    yield app, directory
    app.extensions["tally_spool"].close()


def post(app, domain, key, peer, forwarded=None, ua=FIREFOX, **kwargs):
    headers = {"User-Agent": ua, **({"X-Forwarded-For": forwarded} if forwarded else {}), **kwargs}
    return Client(app).post("/collect", json=hit(domain, type="pageview"), query_string={"site": key},
                            headers=headers, environ_base={"REMOTE_ADDR": peer})


def visitor_of(event: dict, ip: str, ua: str = FIREFOX) -> str | None:
    day = date.fromisoformat(event["received_at"][:10]).isoformat()
    return visitor_key(mac_key(SECRET), day, event["domain"], ip, ua)


@pytest.mark.servers("postgres")
def test_the_lean_and_flask_paths_take_the_forwarded_client(trusting, settings, registry, domain):
    key = register(settings, registry, domain, origins=["https://shop.example"])
    app, directory = trusting
    assert post(app, domain, key, "127.0.0.1", "8.8.8.8").status_code == 202  # the lean WSGI path
    assert post(app, domain, key, "127.0.0.1", "9.9.9.9, 8.8.4.4", Origin="https://shop.example").status_code == 202
    assert post(app, domain, key, "203.0.113.9", "8.8.8.8").status_code == 202  # not a trusted peer
    assert post(app, domain, key, "127.0.0.1", "8.8.8.8", ua=HEADLESS).status_code == 202
    lean, flask, untrusted, headless = spooled(directory)
    assert (lean["country"], flask["country"], untrusted["country"], headless["country"]) == ("US", "US", None, "US")
    assert lean["visitor"] == visitor_of(lean, "8.8.8.8") and flask["visitor"] == visitor_of(flask, "8.8.4.4")
    assert untrusted["visitor"] == visitor_of(untrusted, "203.0.113.9")
    assert (lean["device"], headless["device"], headless["browser"]) == ("desktop", "bot", "HeadlessChrome")
    raw = b"".join(p.read_bytes() for p in directory.glob("*") if p.is_file())
    assert b"8.8.8.8" not in raw and b"8.8.4.4" not in raw and b"203.0.113.9" not in raw  # never stored


@pytest.mark.servers("postgres")
def test_per_address_shares_are_the_forwarded_clients(trusting, settings, registry, domain):
    key = register(settings, registry, domain, rate_per_s=1.0, burst=100)  # a share of 1 event per window
    app, directory = trusting
    assert post(app, domain, key, "127.0.0.1", "8.8.8.8").status_code == 202
    refused = post(app, domain, key, "127.0.0.1", "8.8.8.8")
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "address_rate_limited"
    assert post(app, domain, key, "127.0.0.1", "8.8.4.4").status_code == 202  # another client, its own share
    assert len(spooled(directory)) == 2


@pytest.mark.servers("postgres")
def test_the_pixel_counts_by_the_forwarded_client(trusting, settings, registry, domain):
    site = sites.add(settings.pg_dsn, domain)
    assert registry.refresh()
    app, directory = trusting
    query = signed_query(site.secret, {"site": site.site_key, "domain": domain, "url": f"https://{domain}/mail",
                                       "exp": str(int(time.time()) + 600)})
    for forwarded in ("8.8.8.8", "8.8.8.8", "8.8.4.4"):
        resp = Client(app).get(f"/i.gif?{query}", headers={"X-Forwarded-For": forwarded},
                               environ_base={"REMOTE_ADDR": "127.0.0.1"})
        assert resp.status_code == 200
    first, again, other = spooled(directory)
    assert first["country"] == other["country"] == "US"
    assert first["hash"] == again["hash"] != other["hash"]  # one event per client address and quarter hour


class ProxiedHeaders(FakeHeaders):
    """granian's RSGIHeaders with `get_all`: one header line repeated keeps every value."""

    def __init__(self, headers: dict, repeated: dict[str, list[str]]) -> None:
        super().__init__(headers)
        self.repeated = repeated

    def get_all(self, name: str) -> list[str]:
        return self.repeated.get(name, [self[name]] if name in self else [])


@pytest.mark.servers("postgres")
def test_the_rsgi_path_takes_the_forwarded_client(trusting, settings, registry, domain):
    key = register(settings, registry, domain, origins=["https://shop.example"])
    app, directory = trusting
    rsgi = CollectorRSGI(app, bridge_threads=1)
    cases = [(["8.8.8.8"], {}),
             (["6.6.6.6", "8.8.4.4"], {}),  # a second line appended by the proxy
             (["1.0.16.1"], {"Origin": "https://shop.example"})]  # through the WSGI bridge to Flask
    try:
        for lines, extra in cases:
            environ = EnvironBuilder(path="/collect", method="POST", json=hit(domain), query_string={"site": key},
                                     headers={"User-Agent": HEADLESS, **extra},
                                     environ_base={"REMOTE_ADDR": "127.0.0.1"}).get_environ()
            scope = FakeScope(environ)
            scope.headers = ProxiedHeaders({**scope.headers, "x-forwarded-for": ",".join(lines)},
                                           {"x-forwarded-for": lines})
            proto = FakeProto(environ["wsgi.input"].read())
            asyncio.run(rsgi.__rsgi__(scope, proto))
            assert proto.answer is not None and proto.answer[0] == 202, proto.answer
    finally:
        rsgi.__rsgi_del__(None)
    first, second, bridged = spooled(directory)
    assert (first["country"], first["device"], bridged["country"]) == ("US", "bot", "JP")
    assert second["visitor"] == visitor_of(second, "8.8.4.4", HEADLESS)


@pytest.mark.servers("postgres")
def test_the_collector_takes_countries_from_its_geoip_db(make_settings, registry, domain, tmp_path):
    settings = make_settings(TALLY_GEOIP_DB=str(write_mmdb(tmp_path / "c.mmdb")))
    key = register(settings, registry, domain)
    app = create_app(settings, SpoolWriter(settings.spool_dir, max_bytes=1 << 20, max_age_s=3600),
                     start_sealer=False, registry=registry)
    try:
        for peer in ("8.8.8.8", "9.9.9.9", "1.1.1.1"):
            assert post(app, domain, key, peer).status_code == 202
    finally:
        app.extensions["tally_spool"].close()
    assert [e["country"] for e in spooled(settings.spool_dir)] == ["DE", "CH", None]
