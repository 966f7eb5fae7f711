"""What of a page URL and a referrer is stored (core/urls.py, docs/adr/0030-url-privacy.md; issue 15 item 11).

The rule itself on a table of URLs; then the collector applying it to every sender (a server's JSON
POST /collect by the lean path and by Flask, a browser's POST with an Origin, a signed pixel), per site
(`oltp.sites.set_url_rule`, the registry copy), before the event hash; real PostgreSQL for the registry,
a real spool on disk, Flask's test client.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.pixel import signed_query
from core.urls import DEFAULT, RAW, UrlRule, check_param_names, rule_for
from oltp import sites
from tests.conftest import register
from tests.test_collector import spooled

pytestmark = pytest.mark.servers("postgres")

PAGE = "https://shop.example.com/p"
RULE_CASES = [
    # (url, referrer, stored url, stored referrer) under the default rule
    (PAGE, None, PAGE, None),
    (f"{PAGE}?utm_source=news&token=s3cr3t&utm_medium=mail#access_token=t0k3n", None,
     f"{PAGE}?utm_source=news&utm_medium=mail", None),
    (f"{PAGE}?token=s3cr3t", None, PAGE, None),
    (f"{PAGE}?", None, PAGE, None),
    (f"{PAGE}#", None, PAGE, None),
    (f"{PAGE}?utm_source=a%20b&utm_source=c&UTM_SOURCE=d&utm_source", None,
     f"{PAGE}?utm_source=a%20b&utm_source=c&utm_source", None),  # names exact; order, spelling and repeats kept
    ("https://user:pw@shop.example.com:8443/a/b?x=1", None, "https://shop.example.com:8443/a/b", None),
    ("https://shop.example.com/@user?utm_term=t", None, "https://shop.example.com/@user?utm_term=t", None),
    ("https://shop.example.com?utm_content=c#top", None, "https://shop.example.com?utm_content=c", None),
    (PAGE, "https://www.google.com/search?q=s3cr3t#x", PAGE, "https://www.google.com/"),
    (PAGE, "https://www.google.com", PAGE, "https://www.google.com/"),
    (PAGE, "https://u:p@mail.example.net/inbox/1?id=9", PAGE, "https://mail.example.net/"),
    (PAGE, "https://SHOP.example.com/cart?session=s&utm_campaign=c#f", PAGE,
     "https://SHOP.example.com/cart?utm_campaign=c"),  # same origin (hosts compare case-blind): cut like url
    (PAGE, "http://shop.example.com/cart?x=1", PAGE, "http://shop.example.com/"),  # another scheme: another origin
    (PAGE, "https://shop.example.com:444/cart", PAGE, "https://shop.example.com:444/"),
]


@pytest.mark.parametrize("url, referrer, want_url, want_referrer", RULE_CASES)
def test_the_default_rule(url, referrer, want_url, want_referrer):
    assert DEFAULT.page(url) == want_url
    assert DEFAULT.referrer(referrer, DEFAULT.page(url)) == want_referrer
    assert RAW.page(url) == url and RAW.referrer(referrer, url) == referrer


def test_a_sites_own_parameters_and_the_opt_out():
    rule = rule_for(("ref", "lang"), False)
    assert rule.page(f"{PAGE}?ref=hn&gclid=1&lang=de&utm_source=x") == f"{PAGE}?ref=hn&lang=de&utm_source=x"
    assert rule_for((), True) is RAW and rule_for((), False) is DEFAULT
    assert check_param_names([" ref", "lang", "ref", ""]) == ("ref", "lang")
    for bad in (["a b"], ["x" * 65], ["a=b"], ["a&b"], [f"p{i}" for i in range(21)]):
        with pytest.raises(ValueError):
            check_param_names(bad)


urls = st.builds(
    lambda scheme, auth, host, path, query, frag: f"{scheme}://{auth}{host}{path}{query}{frag}",
    st.sampled_from(["http", "https"]), st.sampled_from(["", "u:p@", "u@"]),
    st.sampled_from(["a.example.com", "A.example.com", "a.example.com:8080", "b.example.org"]),
    st.text("/abc@%=&", max_size=8).map(lambda s: "/" + s),
    st.one_of(st.just(""), st.lists(st.sampled_from(["utm_source=1", "utm_term", "x=2", "=3", "", "ref=r", "a=b=c"]),
                                    max_size=5).map(lambda ps: "?" + "&".join(ps))),
    st.sampled_from(["", "#", "#f", "#a?utm_source=9"]))


@given(urls, st.one_of(st.none(), urls), st.sampled_from([DEFAULT, rule_for(("ref",), False)]))
@hsettings(max_examples=300, deadline=None, derandomize=True)
def test_the_rule_is_idempotent_and_keeps_nothing_it_should_not(url, referrer, rule: UrlRule):
    """Applied twice it changes nothing (a resend of a stored URL is the same event), and what it keeps
    has no fragment, no userinfo and only allowlisted parameter names."""
    page = rule.page(url)
    ref = rule.referrer(referrer, page)
    assert rule.page(page) == page and rule.referrer(ref, page) == ref
    for kept in (page, ref):
        if kept is None:
            continue
        assert "#" not in kept and "@" not in kept.split("/", 3)[2]
        query = kept.partition("?")[2]
        assert rule.keep is not None and all(p.split("=", 1)[0] in rule.keep for p in query.split("&") if query)


# --- the collector ---------------------------------------------------------------------------------

ORIGIN = "https://page.example.org"


def hit(domain: str, path: str = "/p", **extra) -> dict:
    return {"domain": domain, "url": f"https://{domain}{path}", "type": "pageview", **extra}


def test_every_sender_gets_the_sites_rule(client, settings, registry, domain):
    """A server's POST (lean path, and through Flask with a query beyond site=), a browser's POST with an
    Origin and a signed pixel: each stored URL cut, each referrer of another site its origin."""
    key = register(settings, registry, domain, origins=[ORIGIN])
    secret = sites.get(settings.pg_dsn, domain).secret
    dirty = "/p?utm_source=news&token=s3cr3t#access_token=t0k3n"
    ref = "https://mail.example.net/inbox/42?session=s3cr3t"
    assert client.post("/collect", json=hit(domain, dirty, referrer=ref), query_string={"site": key}).status_code == 202
    assert client.post("/collect", json=hit(domain, dirty, referrer=ref),
                       query_string={"site": key, "x": "1"}).status_code == 202  # not the lean path
    assert client.post(f"/collect?site={key}", json=hit(domain, dirty, referrer=ref),
                       headers={"Origin": ORIGIN}).status_code == 202
    query = signed_query(secret, {"site": key, "domain": domain, "url": f"https://{domain}{dirty}", "referrer": ref,
                                  "exp": str(int(time.time()) + 3600)})
    assert client.get(f"/i.gif?{query}").status_code == 200
    stored = spooled(settings)
    assert [(e.url, e.referrer) for e in stored] == \
        [(f"https://{domain}/p?utm_source=news", "https://mail.example.net/")] * 4
    assert not any("s3cr3t" in e.to_json().decode() or "t0k3n" in e.to_json().decode() for e in stored)


def test_the_hash_covers_the_stored_url(client, settings, registry, domain):
    """A resend that differs only in what the rule drops is the same event (ADR 14: the hash is over the
    stored content); a kept parameter that differs makes another event."""
    key = register(settings, registry, domain)
    base = {"id": "evt-1", "ts": int(time.time() * 1000)}
    sends = [hit(domain, "/p?utm_source=a&token=1#x", **base), hit(domain, "/p?token=2&utm_source=a", **base),
             hit(domain, "/p?utm_source=b", **base)]
    hashes = [client.post("/collect", json=s, query_string={"site": key}).json["hashes"][0] for s in sends]
    assert hashes[0] == hashes[1] != hashes[2]


def test_a_site_changes_its_rule(client, settings, registry, domain):
    key = register(settings, registry, domain)
    url = "/p?ref=hn&lang=de&token=s3cr3t#f"
    ref = "https://news.example.com/item?id=1"

    def stored_after_post() -> tuple[str, str | None]:
        assert registry.refresh()
        resp = client.post("/collect", json=hit(domain, url, referrer=ref), query_string={"site": key})
        assert resp.status_code == 202
        last = spooled(settings)[-1]
        return last.url, last.referrer

    assert stored_after_post() == (f"https://{domain}/p", "https://news.example.com/")
    site = sites.set_url_rule(settings.pg_dsn, domain, keep_query=["ref"])
    assert (site.keep_query, site.raw_urls) == (("ref",), False)
    assert stored_after_post() == (f"https://{domain}/p?ref=hn", "https://news.example.com/")
    site = sites.set_url_rule(settings.pg_dsn, domain, raw_urls=True)
    assert (site.keep_query, site.raw_urls) == (("ref",), True)  # unchanged unless given
    assert stored_after_post() == (f"https://{domain}{url}", ref)
    sites.set_url_rule(settings.pg_dsn, domain, raw_urls=False, keep_query=[])
    assert stored_after_post() == (f"https://{domain}/p", "https://news.example.com/")
    # the registry's disk copy keeps the rule (a collector restarted while PostgreSQL is down)
    sites.set_url_rule(settings.pg_dsn, domain, keep_query=["lang"])
    assert registry.refresh()
    from oltp.sites import Site
    assert Site.from_dict(registry.snapshot().by_domain[domain].to_dict()).url_rule == rule_for(("lang",), False)


def test_url_rule_refusals(settings, domain):
    with pytest.raises(sites.SiteError) as exc:
        sites.set_url_rule(settings.pg_dsn, domain, keep_query=["ok"])
    assert exc.value.code == "unknown_domain"
    with pytest.raises(sites.SiteError) as exc:
        sites.add(settings.pg_dsn, domain, keep_query=["a b"])
    assert exc.value.code == "invalid_keep_query" and "--keep-query" in exc.value.message
    assert sites.get(settings.pg_dsn, domain) is None  # nothing written
