"""Signed pixels: `GET /i.gif` (admitted like /collect, answered with a GIF) and `tally sites sign-pixel`.

Real PostgreSQL for the registry, a real spool on disk; the CLI runs as a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest

from collector.edge import GIF
from core.event import decode_stored
from core.pixel import signed_query
from oltp import sites
from tests.test_collector import spooled

pytestmark = pytest.mark.servers("postgres")

UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"


@pytest.fixture()
def site(settings, registry, domain):
    s = sites.add(settings.pg_dsn, domain, rate_per_s=1, burst=3)
    assert registry.refresh()
    return s


def params(s, **extra) -> dict[str, str]:
    return {"site": s.site_key, "domain": s.domain, "url": f"https://{s.domain}/newsletter",
            "exp": str(int(time.time()) + 3600), **extra}


def get(client, query: str, address: str = "127.0.0.1", **headers):
    return client.get(f"/i.gif?{query}", headers={"User-Agent": UA, **headers}, environ_base={"REMOTE_ADDR": address})


def quarter(t) -> int:
    """The UTC quarter hour (epoch seconds of its start) that datetime `t` falls in."""
    return int(t.timestamp()) // 900 * 900


def test_a_signed_pixel_is_spooled_then_answered_with_a_gif(client, settings, site):
    resp = get(client, signed_query(site.secret, params(site, type="impression", value="2.5",
                                                        referrer="https://mail.example.net/")))
    assert resp.status_code == 200, resp.data
    assert resp.data == GIF and resp.data.startswith(b"GIF89a") and len(resp.data) == 43
    assert resp.headers["Content-Type"] == "image/gif"
    assert resp.headers["Cache-Control"] == "no-store"
    (event,) = spooled(settings)
    assert (event.domain, event.url, event.type, str(event.value), event.referrer) == \
        (site.domain, f"https://{site.domain}/newsletter", "impression", "2.5", "https://mail.example.net/")
    assert event.user_agent == UA and event.browser == "Firefox"
    assert event.ts.timestamp() == quarter(event.received_at)  # the start of the quarter hour it was fetched in
    decode_stored(event.to_json())


def fetch_in_one_quarter(settings, fetches):
    """Run `fetches()` (a list of statuses) until its spooled events all fall in one UTC quarter hour (a
    quarter hour may turn between the fetches: then once more); (statuses, events)."""
    for _ in range(3):
        before = len(spooled(settings))
        statuses = fetches()
        events = spooled(settings)[before:]
        if len({quarter(e.received_at) for e in events}) == 1:
            break
    return statuses, events


def test_a_refetch_from_the_same_address_within_a_quarter_hour_is_the_same_event(client, settings, registry,
                                                                                 domain):
    """An email opened again (same URL, same address, same UTC quarter hour) gets the same id and time, so
    the same hash: both stores count it once (ADR 14, ADR 31), whatever User-Agent the fetch sends, and
    an IPv6 address counts by its /56 as for the rate limit. Another address is another event."""
    s = sites.add(settings.pg_dsn, domain, rate_per_s=100, burst=1000)
    assert registry.refresh()
    query = signed_query(s.secret, params(s))
    at = query.index("sig=") + 4
    upper = query[:at] + query[at:].upper()  # the same signature in capitals: still the same URL
    statuses, events = fetch_in_one_quarter(settings, lambda: [get(client, q, **h).status_code for q, h in (
        (query, {}), (query, {}), (upper, {}), (query, {"User-Agent": "curl/8.0"}),
        (query, {"address": "127.0.0.9"}),
        (query, {"address": "2001:db8:0:1::1"}), (query, {"address": "2001:db8:0:2::7"}),
        (query, {"address": "2001:db8:0:100::1"}))])
    assert statuses == [200] * 8 and [e.type for e in events] == ["pageview"] * 8
    hashes = [e.hash for e in events]
    assert len(set(hashes[:4])) == 1  # one address, two User-Agents, either case of the signature
    assert hashes[5] == hashes[6]  # one /56
    assert len({hashes[0], hashes[4], hashes[5], hashes[7]}) == 4
    assert all(e.ts.timestamp() == quarter(e.received_at) for e in events)


def test_a_thousand_user_agents_from_one_address_count_once(client, settings, registry, domain):
    """The review: the pixel id covered the User-Agent, which the sender chooses: one leaked URL fetched
    from one address with 1,000 User-Agents in one quarter hour was 1,000 distinct events."""
    s = sites.add(settings.pg_dsn, domain, rate_per_s=10_000, burst=100_000)  # an address's share: 10,000
    assert registry.refresh()
    query = signed_query(s.secret, params(s))
    statuses, events = fetch_in_one_quarter(settings, lambda: [
        get(client, query, **{"User-Agent": f"Mozilla/5.0 (agent {i})"}).status_code for i in range(1000)])
    assert statuses == [200] * 1000
    assert len({e.hash for e in events}) == 1 and len({e.user_agent for e in events}) == 1000


def test_bad_signature_tampering_and_expiry_are_403_and_write_nothing(app, client, settings, site, registry):
    good = signed_query(site.secret, params(site))
    other = sites.add(settings.pg_dsn, "x" + site.domain)
    assert registry.refresh()
    cases = [
        (good.replace("newsletter", "newsletteX"), "invalid_signature", "sig"),
        (good.replace("&sig=", "&sig=0"), "invalid_signature", "sig"),
        (good[:-1] + ("0" if good[-1] != "0" else "1"), "invalid_signature", "sig"),
        (good.replace("&sig=", "&type=impression&sig="), "invalid_signature", "sig"),
        (signed_query("sk_not-the-secret", params(site)), "invalid_signature", "sig"),
        (signed_query(site.secret, params(site, exp=str(int(time.time()) - 5))), "invalid_signature", "exp"),
        (signed_query(site.secret, params(site, domain=other.domain)), "site_mismatch", "domain"),
        (signed_query(other.secret, params(site, domain=other.domain)), "site_mismatch", "domain"),
    ]
    for query, code, field in cases:
        resp = get(client, query)
        assert resp.status_code == 403, (query, resp.json)
        assert resp.json["error"]["code"] == code and resp.json["error"]["field"] == field, query
        assert resp.headers["Cache-Control"] == "no-store"
    assert spooled(settings) == []
    assert get(client, good).status_code == 200  # the untouched URL still works


@pytest.mark.parametrize("query, field", [
    ("", "site"),
    ("site=a&domain=b&url=c&exp=1", "sig"),
    ("site=a&domain=b&url=c&exp=1&sig=x&sig=y", "sig"),
    ("site=a&domain=b&url=c&exp=1&sig=x&admin=1", "admin"),
    ("site=a&domain=b&url=c&exp=1e9&sig=x", "exp"),
    ("site=a&domain=b&url=c&exp=%D9%A1&sig=x", "exp"),
    ("site=a&domain=b&url=%ff&exp=1&sig=x", "query"),
    ("site=a&&domain=b", "query"),
])
def test_malformed_pixels_are_400_naming_the_parameter(client, settings, site, query, field):
    resp = get(client, query)
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["code"] == "invalid_pixel" and resp.json["error"]["field"] == field
    assert spooled(settings) == []


def test_unknown_key_is_401(client, settings, site):
    resp = get(client, signed_query(site.secret, params(site, site="pk_" + "z" * 22)))
    assert resp.status_code == 401 and resp.json["error"]["field"] == "site"
    assert spooled(settings) == []


def test_a_signed_but_invalid_event_is_refused_like_collect(client, settings, site):
    for extra, field in (({"url": "javascript:alert(1)"}, "url"), ({"value": "١٢٣"}, "value"),
                         ({"type": "click"}, "type")):
        resp = get(client, signed_query(site.secret, params(site, **extra)))
        assert resp.status_code == 400 and resp.json["error"]["field"] == field, resp.json
    assert spooled(settings) == []


def test_pixels_share_the_sites_rate_limit(app, client, settings, site):
    query = signed_query(site.secret, params(site))
    statuses = [get(client, query, address=f"127.0.1.{i}").status_code for i in range(4)]
    assert statuses == [200, 200, 200, 429]  # burst 3, from four addresses
    assert len(spooled(settings)) == 3
    assert app.extensions["tally_refusals"].snapshot() == {(site.domain, "rate_limited"): 1}


def test_one_address_gets_its_share_of_the_sites_limit(app, client, settings, registry, domain):
    """One address gets TALLY_SITE_ADDRESS_SHARE (a tenth) of the site's limit, as on /collect (ADR 29)."""
    s = sites.add(settings.pg_dsn, domain, rate_per_s=1, burst=20)  # an address's share: 2 events
    assert registry.refresh()
    query = signed_query(s.secret, params(s))
    statuses = [get(client, query, **{"User-Agent": f"agent {i}"}).status_code for i in range(3)]
    assert statuses == [200, 200, 429]
    assert get(client, query, address="127.0.0.2").status_code == 200  # the site itself has room
    assert app.extensions["tally_refusals"].snapshot() == {(s.domain, "address_rate_limited"): 1}


def test_exp_beyond_the_max_ttl_is_400_naming_it(app, client, settings, site):
    """`exp` at most TALLY_PIXEL_MAX_TTL_S (7 days) ahead; today a URL valid until year ~33658 was accepted."""
    now = int(time.time())
    far = signed_query(site.secret, params(site, exp=str(now + 7 * 86400 + 120)))
    resp = get(client, far, address="127.0.0.2")  # (one refusal per address and window counts: the site's
    # limit is 3 events per 3 s, so an address's share is 1)
    assert resp.status_code == 400, resp.json
    err = resp.json["error"]
    assert err["code"] == "invalid_pixel" and err["field"] == "exp" and "TALLY_PIXEL_MAX_TTL_S" in err["message"]
    forever = get(client, signed_query(site.secret, params(site, exp="999999999999")), address="127.0.0.3")
    assert forever.status_code == 400 and forever.json["error"]["field"] == "exp"
    assert spooled(settings) == []
    # a correctly signed URL that lives too long is the site's refusal (its key is registered)
    assert app.extensions["tally_refusals"].snapshot() == {(site.domain, "invalid_pixel"): 2}
    assert get(client, signed_query(site.secret, params(site, exp=str(now + 7 * 86400 - 60)))).status_code == 200


def test_refused_pixels_count_for_the_site_up_to_an_addresss_share(app, client, settings, registry, domain):
    """A site's pixel key is public: one address fetching bad URLs makes at most its share of the site's
    limit per window count on the site's status (ADR 29); before, every fetch counted."""
    s = sites.add(settings.pg_dsn, domain, rate_per_s=1, burst=50)  # a 50 s window; an address's share: 5
    assert registry.refresh()
    bad = signed_query(s.secret, params(s)).replace("newsletter", "newsletteX")
    assert [get(client, bad).status_code for _ in range(20)] == [403] * 20
    assert get(client, bad, address="127.0.0.2").status_code == 403
    counted = app.extensions["tally_refusals"].snapshot()[(s.domain, "invalid_signature")]
    assert 6 <= counted <= 7, counted  # 5 + 1 (+1 if the window turned meanwhile)


def test_the_max_ttl_is_a_setting(make_settings, spool, registry, domain):
    from collector.app import create_app

    settings = make_settings(TALLY_PIXEL_MAX_TTL_S="3600")
    s = sites.add(settings.pg_dsn, domain)
    assert registry.refresh()
    client = create_app(settings, spool, start_sealer=False, registry=registry).test_client()
    now = int(time.time())
    assert get(client, signed_query(s.secret, params(s, exp=str(now + 3000)))).status_code == 200
    assert get(client, signed_query(s.secret, params(s, exp=str(now + 4000)))).status_code == 400


def test_head_counts_nothing(client, settings, site):
    assert client.head(f"/i.gif?{signed_query(site.secret, params(site))}").status_code == 405
    assert spooled(settings) == []


# --- `tally sites sign-pixel` ----------------------------------------------------------------------

def cli(settings, tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_PG_DSN=settings.pg_dsn, TALLY_HOME=str(tmp_path / "cli-home"))
    return subprocess.run([sys.executable, "-m", "tally.cli", "sites", "sign-pixel", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_sign_pixel_prints_a_url_the_collector_accepts(client, settings, site, tmp_path):
    before = int(time.time())
    out = cli(settings, tmp_path, site.domain, "--url", f"https://{site.domain}/newsletter", "--ttl", "7d",
              "--type", "impression")
    assert out.returncode == 0, out.stderr
    (url,) = re.findall(r"(?:https?://[^ ]+)?/i\.gif\?[^ \n]+", out.stdout)  # what a black-box check greps
    assert url.startswith("http://127.0.0.1:8700/i.gif?")  # default: TALLY_BIND_HOST:TALLY_COLLECTOR_PORT
    query = urlsplit(url).query
    exp = int(re.search(r"exp=(\d+)", query).group(1))
    assert before + 7 * 86400 <= exp <= int(time.time()) + 7 * 86400  # signed between the two readings
    resp = get(client, query)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "image/gif"
    (event,) = spooled(settings)
    assert event.type == "impression" and event.url == f"https://{site.domain}/newsletter"
    tampered = get(client, query.replace("newsletter", "newsletteX"))
    assert tampered.status_code == 403 and len(spooled(settings)) == 1


def test_sign_pixel_collector_url_from_flag_and_running_platform(settings, site, tmp_path):
    out = cli(settings, tmp_path, site.domain, "--url", f"https://{site.domain}/", "--ttl", "90s",
              "--collector-url", "https://c.example.org/")
    assert out.returncode == 0 and out.stdout.startswith("https://c.example.org/i.gif?domain="), out.stderr
    run = tmp_path / "cli-home" / "run"
    run.mkdir(parents=True)
    (run / "stack.json").write_text('{"collector_url": "http://127.0.0.1:9911"}')
    out = cli(settings, tmp_path, site.domain, "--url", f"https://{site.domain}/", "--ttl", "2h", "--json")
    assert out.returncode == 0, out.stderr
    assert '"url": "http://127.0.0.1:9911/i.gif?' in out.stdout


@pytest.mark.parametrize("args, words", [
    (("--ttl", "30x"), "--ttl"), (("--ttl", "0d"), "--ttl"), (("--ttl", "١d"), "--ttl"), (("--ttl", "99999d"), "--ttl"),
    (("--ttl", "8d"), "TALLY_PIXEL_MAX_TTL_S"), (("--ttl", "30d"), "TALLY_PIXEL_MAX_TTL_S"),
    (("--ttl", "604801s"), "TALLY_PIXEL_MAX_TTL_S"),
    (("--ttl", "1d", "--url", "ftp://x"), "--url"), (("--ttl", "1d", "--value", "1e3"), "--value"),
])
def test_sign_pixel_refusals(settings, site, tmp_path, args, words):
    base = ["--url", f"https://{site.domain}/"] if "--url" not in args else []
    out = cli(settings, tmp_path, site.domain, *base, *args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr  # a bad value
    assert out.stdout == ""


def test_sign_pixel_for_an_unregistered_domain(settings, tmp_path, domain):
    out = cli(settings, tmp_path, "nobody-" + domain, "--url", "https://x.example.com/", "--ttl", "1d")
    assert out.returncode == 1 and "not registered" in out.stderr


def test_the_readme_example_signs_what_the_collector_verifies():
    from pathlib import Path
    from urllib.parse import parse_qsl

    from core.pixel import check_shape, verify

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Signed pixels"):readme.index("## 4. Reading")]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    assert len(code.strip().splitlines()) <= 6
    secret = "sk_readme-test-secret"
    scope: dict = {}
    exec(code.replace("b\"sk_YOUR_SECRET\"", repr(secret.encode())), scope)
    query = urlsplit(scope["url"]).query
    params = check_shape(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
    verify(secret, params, time.time())
    assert query == signed_query(secret, {k: v for k, v in params.items() if k != "sig"})
