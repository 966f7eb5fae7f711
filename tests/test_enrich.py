"""Enrichment at the edge (issue 17, ADR 45, core/enrich.py): an event's page, source and campaign tags.

Unit and property tests (no servers): the page against a brute-force reference (urllib), the campaign tags'
decoding, the documented source table (docs/sources.md must list exactly the table), registrable domains
under multi-label and private suffixes, self-referrals, the offline public suffix list (a fresh interpreter
with the network blocked and an empty cache directory), and every sender's path through `event_from_hit`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.backfill import validate
from core import enrich as en
from core import event as ev
from core.enrich import campaign_of, enrich, page_of, registrable_domain, source_of
from core.event import EventError, HitContext, Limits, decode_stored, event_from_hit
from core.pixel import pixel_hit
from core.urls import DEFAULT, RAW, rule_for

ROOT = Path(__file__).resolve().parent.parent
CTX = HitContext(received_at=datetime.now(UTC), user_agent="UA/1", client_ip="203.0.113.7")


def hit(url: str, referrer: str | None = None, domain: str = "shop.test", rule=None, **extra) -> ev.Event:
    body = {"domain": domain, "url": url, **({"referrer": referrer} if referrer is not None else {}), **extra}
    return event_from_hit(body, CTX, Limits(), b"k" * 32, None, rule)


# ------------------------------------------------------------------------------------------- page


@pytest.mark.parametrize(("url", "keep", "page"), [
    ("https://shop.test/a?x=0", None, "/a"),  # the issue's check
    ("https://shop.test/a?x=0", frozenset({"y"}), "/a"),
    ("https://shop.test", None, "/"),
    ("https://shop.test?x=1#top", frozenset({"x"}), "/?x=1"),
    ("https://shop.test/#/route", None, "/"),
    ("https://user:pw@Shop.Test:8443/Item/%E2%98%83/?b=2&product=3&a&product=4#f", frozenset({"product", "a"}),
     "/Item/%E2%98%83/?product=3&a&product=4"),  # order, spelling and encoding as sent; no fragment
    ("https://shop.test/p?utm_source=x&product=3", frozenset({"product"}), "/p?product=3"),
])
def test_page_is_the_path_plus_only_the_kept_parameters(url: str, keep: frozenset[str] | None, page: str) -> None:
    assert page_of(url, keep) == page


_segment = st.text(st.sampled_from("abcXYZ019-._~%!$'()*+,;=:@/é"), max_size=12)
_param = st.tuples(st.sampled_from(["a", "b", "product", "utm_source", "utm_medium", "x[]"]),
                   st.text(st.sampled_from("abc019-._~%+=/:é"), max_size=6))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(scheme=st.sampled_from(["http://", "https://", "HTTPS://"]), host=st.sampled_from(["shop.test", "a.b:8080"]),
       path=_segment.map(lambda s: "/" + s if s else ""), params=st.lists(_param, max_size=5),
       fragment=st.one_of(st.none(), _segment), keep=st.frozensets(st.sampled_from(["a", "product", "x[]"])))
def test_page_matches_a_brute_force_reference(scheme, host, path, params, fragment, keep) -> None:
    query = "&".join(f"{k}={v}" for k, v in params)
    url = f"{scheme}{host}{path}" + (f"?{query}" if params else "") + (f"#{fragment}" if fragment is not None else "")
    parts = urlsplit(url)
    kept = "&".join(p for p in parts.query.split("&") if p.split("=", 1)[0] in keep) if parts.query else ""
    expected = (parts.path or "/") + (f"?{kept}" if kept else "")
    page = page_of(url, keep)
    assert page == expected and page.startswith("/") and "#" not in page and len(page) <= ev.MAX_PAGE
    assert enrich(url, None, "shop.test", keep)[0] == page  # the event path's own (a fast one without a query)
    assert enrich(url, None, "shop.test", keep)[2:] == campaign_of(url)[1:]


# ------------------------------------------------------------------------------------------ campaign


@pytest.mark.parametrize(("url", "tags"), [
    ("https://shop.test/", (None, None, None)),
    ("https://shop.test/?utm_source=Google&utm_medium=cpc&utm_campaign=Spring%20Sale",
     ("Google", "cpc", "Spring Sale")),
    ("https://shop.test/?utm_campaign=a+b&utm_campaign=second", (None, None, "a b")),  # '+' is a space; first wins
    ("https://shop.test/?utm_medium=%20%20e%0Amail%00%09&utm_source=", (None, "e mail", None)),  # controls dropped
    ("https://shop.test/?utm_source=%FF", ("\ufffd", None, None)),  # invalid UTF-8: the replacement character
    ("https://shop.test/?UTM_SOURCE=x&utm_sourcex=y#utm_source=z", (None, None, None)),  # names exactly; no fragment
    ("https://shop.test/?utm_campaign=" + "c" * 300, (None, None, "c" * 128)),
])
def test_campaign_tags_are_decoded_cleaned_and_cut(url: str, tags: tuple) -> None:
    assert campaign_of(url) == tags


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(value=st.text(max_size=200))
def test_any_sent_campaign_value_is_stored_clean(value: str) -> None:
    """Whatever a tag's value decodes to (control characters, NUL, lone surrogates excluded by UTF-8), the
    stored one has no control character, no outer whitespace and fits the column; nothing is empty."""
    url = "https://shop.test/?utm_medium=" + quote(value.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    _, medium, _ = campaign_of(url)
    assert medium is None or (0 < len(medium) <= ev.MAX_UTM and medium == medium.strip()
                              and not re.search(r"[\x00-\x1f\x7f-\x9f]", medium))


# ------------------------------------------------------------------------------------------- source

FAMILY_CASES = [
    ("https://news.ycombinator.com/item?id=1", "Hacker News"),
    ("https://www.google.com/", "Google"), ("https://www.google.co.uk/", "Google"),
    ("https://google.com.br/", "Google"), ("https://news.google.com/", "Google"),
    ("https://mail.google.com/mail/u/0/", "Gmail"), ("android-app://com.google.android.gm/", "Gmail"),
    ("https://t.co/", "Twitter"), ("https://twitter.com/", "Twitter"), ("https://x.com/", "Twitter"),
    ("https://m.facebook.com/", "Facebook"), ("https://l.facebook.com/", "Facebook"),
    ("https://lm.facebook.com/", "Facebook"), ("https://fb.me/", "Facebook"),
    ("https://www.linkedin.com/", "LinkedIn"), ("https://lnkd.in/", "LinkedIn"),
    ("https://old.reddit.com/", "Reddit"), ("https://en.m.wikipedia.org/", "Wikipedia"),
    ("https://search.yahoo.co.jp/", "Yahoo"), ("https://yandex.ru/", "Yandex"), ("https://www.bing.com/", "Bing"),
    ("https://duckduckgo.com/", "DuckDuckGo"), ("https://search.brave.com/", "Brave"),
    ("https://stackoverflow.com/", "Stack Overflow"), ("https://WWW.GitHub.com./", "GitHub"),
    ("https://user:pw@www.youtube.com:443/", "YouTube"),
]


@pytest.mark.parametrize(("referrer", "source"), FAMILY_CASES)
def test_referrer_families(referrer: str, source: str) -> None:
    assert source_of(referrer, "shop.test", None) == source


@pytest.mark.parametrize(("referrer", "domain", "source"), [
    ("https://blog.example.org/", "shop.test", "example.org"),
    ("https://a.b.example.co.uk/", "shop.test", "example.co.uk"),  # a two-label public suffix
    ("https://alice.github.io/", "shop.test", "alice.github.io"),  # the list's private section
    ("https://bob.github.io/", "alice.github.io", "bob.github.io"),  # another site, not a self-referral
    ("https://ycombinator.com/", "shop.test", "ycombinator.com"),  # not Hacker News: that is news.
    ("http://203.0.113.9:8080/", "shop.test", "203.0.113.9"),
    ("http://[2001:db8::1]:8080/", "shop.test", "[2001:db8::1]"),
    ("android-app://org.example.reader/", "shop.test", "org.example.reader"),
    ("https://" + "x" * 70 + ".example.org/", "shop.test", "example.org"),
    ("https://" + "y" * 63 + ".de/", "shop.test", ("y" * 63 + ".de")[:64]),  # cut to MAX_SOURCE
    # None: no referrer, or the same site (registrable domain), whatever the subdomain, port or scheme
    (None, "shop.test", None), ("", "shop.test", None),
    ("https://shop.test/a", "shop.test", None), ("http://www.shop.test:8080/", "shop.test", None),
    ("https://shop.co.uk/", "www.shop.co.uk", None), ("https://alice.github.io/x", "alice.github.io", None),
    ("http://localhost:3000/", "localhost", None),
])
def test_registrable_domains_and_self_referrals(referrer: str | None, domain: str, source: str | None) -> None:
    assert source_of(referrer, domain, None) == source
    assert source is None or len(source) <= ev.MAX_SOURCE


@pytest.mark.parametrize(("url", "referrer", "source"), [
    # a page that names its site with data-domain: a link between its own pages is no source, whatever its host
    ("http://localhost:8000/b", "http://localhost:8000/a", None),
    ("http://127.0.0.1:8000/b?x=1", "http://127.0.0.1:8000/", None),  # the slow path (a query to read)
    ("http://[::1]:8000/b", "http://[::1]:8000/a", None),
    ("https://staging.example.net/b", "https://www.example.net/", None),  # the page host's registrable domain
    ("http://localhost:8000", "http://localhost:8000/a", None),  # no path
    ("http://localhost:8000/", "https://news.ycombinator.com/", "Hacker News"),  # other sites keep their names
    ("http://localhost:8000/", "http://127.0.0.1:8000/", "127.0.0.1"),  # another host than the page's
    ("https://staging.example.net/?utm_source=hn", "https://staging.example.net/", "Hacker News"),
])
def test_a_referrer_on_the_pages_own_host_is_a_self_referral(url: str, referrer: str, source: str | None) -> None:
    assert enrich(url, referrer, "shop.test")[1] == source


@pytest.mark.parametrize(("utm", "source"), [
    ("google", "Google"), ("Google", "Google"), (" NEWSLETTER  weekly ", "newsletter weekly"),
    ("news.ycombinator.com", "Hacker News"), ("hn", "Hacker News"), ("Hacker News", "Hacker News"),
    ("x", "Twitter"), ("www.google.de", "Google"), ("stack overflow", "Stack Overflow"),
    ("mail.example.org", "mail.example.org"), ("s" * 100, "s" * 64), ("   ", None),
])
def test_utm_source_wins_mapped_to_its_family_else_lower_cased(utm: str, source: str | None) -> None:
    referrer = "https://shop.test/previous"  # a self-referral: without utm_source, no source
    assert source_of(referrer, "shop.test", utm) == source


def test_every_table_entry_resolves_to_its_family() -> None:
    for name, hosts in en.FAMILY_HOSTS.items():
        for host in hosts:
            assert source_of(f"https://{host}/", "shop.test", None) == name, host
            assert source_of(f"https://sub.{host}/", "shop.test", None) == name, host
            assert source_of(None, "shop.test", host) == name, host  # utm_source=<host>
        assert source_of(None, "shop.test", name.lower()) == name
    for brand, name in en.FAMILY_BRANDS.items():
        for suffix in ("com", "co.uk", "de"):
            assert source_of(f"https://www.{brand}.{suffix}/", "shop.test", None) == name
    for package, name in en.ANDROID_APPS.items():
        assert source_of(f"android-app://{package}/", "shop.test", None) == name
    assert all(len(n) <= ev.MAX_SOURCE for n in [*en.FAMILY_HOSTS, *en.FAMILY_BRANDS.values()])


def test_docs_sources_md_lists_exactly_the_table() -> None:
    """docs/sources.md is the documented table: every family with every host, brand and app, and no other."""
    text = (ROOT / "docs" / "sources.md").read_text()
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", text, re.MULTILINE))
    documented = {name: set(re.findall(r"`([^`]+)`", cells)) for name, cells in rows.items() if name != "source"}
    expected: dict[str, set[str]] = {name: set(hosts) for name, hosts in en.FAMILY_HOSTS.items()}
    for brand, name in en.FAMILY_BRANDS.items():
        expected.setdefault(name, set()).add(f"{brand}.*")
    for package, name in en.ANDROID_APPS.items():
        expected.setdefault(name, set()).add(f"android-app://{package}")
    assert documented == expected


def test_the_public_suffix_list_is_the_bundled_one_offline_and_writes_no_cache(tmp_path: Path) -> None:
    """A fresh interpreter whose sockets all fail and whose cache directories are an empty temporary one:
    registrable domains still come out (from tldextract's bundled snapshot), no connection is attempted,
    and no file is written."""
    cache = tmp_path / "cache"
    cache.mkdir()
    code = (
        "import socket, sys\n"
        "tried = []\n"
        "class Blocked(socket.socket):\n"
        "    def connect(self, *a): tried.append(a); raise OSError('network blocked by the test')\n"
        "    def connect_ex(self, *a): tried.append(a); return 111\n"
        "socket.socket = Blocked\n"
        "def no_dns(*a, **k): tried.append(a); raise socket.gaierror('dns blocked by the test')\n"
        "socket.getaddrinfo = no_dns\n"
        "from core.enrich import registrable_domain, source_of\n"
        "print(registrable_domain('a.b.example.co.uk'), registrable_domain('x.alice.github.io'),"
        " source_of('https://www.google.com.br/', 'shop.test', None), len(tried))\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(cache), "TLDEXTRACT_CACHE": str(cache),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["example.co.uk", "alice.github.io", "Google", "0"]
    assert list(cache.rglob("*")) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert "Exception" not in out.stderr and "publicsuffix" not in out.stderr


def test_registrable_domain_follows_the_default_rule_for_unlisted_suffixes() -> None:
    assert [registrable_domain(h) for h in ("shop.test", "www.shop.test", "localhost", "co.uk", "203.0.113.9")] == \
        ["shop.test", "shop.test", "localhost", "co.uk", "203.0.113.9"]


# ------------------------------------------------------------------------------------ event_from_hit


def test_the_issue_check_pageview_from_hacker_news() -> None:
    e = hit("https://shop.test/a?x=0", "https://news.ycombinator.com/item?id=1", rule=DEFAULT)
    assert (e.page, e.source, e.utm_medium, e.utm_campaign) == ("/a", "Hacker News", None, None)
    assert e.referrer == "https://news.ycombinator.com/"  # stored as its origin (another site)
    assert decode_stored(e.to_json()).page == "/a" and decode_stored(e.to_json()).source == "Hacker News"


def test_the_page_keeps_the_sites_own_parameters_under_every_rule() -> None:
    url = "https://shop.test/item?product=3&utm_source=newsletter&utm_campaign=may&session=s3cr3t#x"
    clean, raw = hit(url, rule=rule_for(["product"], False)), hit(url, rule=rule_for(["product"], True))
    assert clean.url == "https://shop.test/item?product=3&utm_source=newsletter&utm_campaign=may" and raw.url == url
    for e in (clean, raw):
        assert (e.page, e.source, e.utm_campaign) == ("/item?product=3", "newsletter", "may")
    for rule in (None, RAW, DEFAULT):  # no own names: the path only
        assert hit(url, rule=rule).page == "/item"


def test_the_hash_covers_only_what_it_covered_before() -> None:
    """The derived fields come from the hashed ones: the hash of an id'd hit is the plain `event_hash`."""
    ts = int(CTX.received_at.timestamp() * 1000)
    e = hit("https://shop.test/a?utm_source=hn", "https://news.ycombinator.com/", rule=DEFAULT, id="i", ts=ts)
    assert e.source == "Hacker News"
    assert e.hash == ev.event_hash("shop.test", "i", ts=e.ts, type="pageview", url=e.url, referrer=e.referrer)


def test_an_android_app_referrer_is_accepted_and_cut_to_the_app() -> None:
    """Chrome reports a link opened from the Gmail app as `android-app://com.google.android.gm/`: such a
    pageview was refused (400, the tag then drops it); now it counts, with the app as its source."""
    sent = "android-app://com.google.android.googlequicksearchbox/https/www.google.com/search?q=me"
    e = hit("https://shop.test/", sent, rule=DEFAULT)
    assert (e.referrer, e.source) == ("android-app://com.google.android.googlequicksearchbox/", "Google")
    assert hit("https://shop.test/", sent, rule=RAW).referrer == sent  # a raw-URL site stores it as sent
    gmail = hit("https://shop.test/", "android-app://com.google.android.gm", rule=DEFAULT)
    assert (gmail.referrer, gmail.source) == ("android-app://com.google.android.gm/", "Gmail")
    assert decode_stored(gmail.to_json()).referrer == "android-app://com.google.android.gm/"
    for bad in ("android-app://", "android-app://com.x/\x00", "android-app://com x/", "ftp://x",
                "android-app://" + "a" * (ev.MAX_URL - 13)):
        with pytest.raises(EventError) as err:
            hit("https://shop.test/", bad)
        assert err.value.field == "referrer"


def test_pixels_and_backfill_get_the_fields_too() -> None:
    params = {"site": "k", "domain": "shop.test", "url": "https://shop.test/mail?utm_medium=email", "exp": "1",
              "sig": "ab", "referrer": "https://mail.google.com/"}
    e = event_from_hit(pixel_hit(params, b"k" * 32, "203.0.113.7", CTX.received_at.timestamp()), CTX, Limits(),
                       b"k" * 32, None, DEFAULT)
    assert (e.page, e.source, e.utm_medium) == ("/mail", "Gmail", "email")
    line = {"domain": "shop.test", "url": "https://shop.test/old?utm_source=Bing", "ts": "2026-01-01T00:00:00Z"}
    backfilled = validate(line, 1, file_id="f" * 16, ctx=HitContext(received_at=datetime(2026, 1, 2, tzinfo=UTC)),
                          limits=Limits(max_past_age=timedelta(days=400)), registered=lambda d: True)
    assert isinstance(backfilled, ev.Event) and (backfilled.page, backfilled.source) == ("/old", "Bing")


def test_the_limits_are_the_stores_and_repeats_come_from_the_cache() -> None:
    assert (en.MAX_PAGE, en.MAX_SOURCE, en.MAX_UTM) == (ev.MAX_PAGE, ev.MAX_SOURCE, ev.MAX_UTM)
    hit("https://shop.test/cached", "https://t.co/")
    before = en.enrich.cache_info().hits
    for _ in range(3):
        hit("https://shop.test/cached", "https://t.co/")
    assert en.enrich.cache_info().hits == before + 3


def test_sources_named_like_the_rollups_own_keys_are_quoted():
    """`(none)` and `(other)` are what the rollups show for no value and for folded values: a source sent with
    that name must not merge into them (or take a cap slot as `(other)`)."""
    from core.enrich import source_of

    assert source_of(None, "shop.test", "(none)") == '"(none)"'
    assert source_of(None, "shop.test", "(Other)") == '"(other)"'
    assert source_of(None, "shop.test", "newsletter") == "newsletter"


def test_invisible_format_characters_are_dropped_from_campaign_tags():
    """A right-to-left override and zero-width spaces around 'google' would show a lookalike of Google."""
    from core.enrich import campaign_of, source_of

    tagged = "https://shop.test/?utm_source=%E2%80%AE%E2%80%8Bgoogle%E2%80%8B&utm_medium=e%C2%ADmail"
    assert campaign_of(tagged)[1] == "email"
    assert source_of(None, "shop.test", campaign_of(tagged)[0]) == "Google"


def test_a_page_is_cut_to_its_byte_limit_on_a_character_boundary():
    from core.enrich import MAX_PAGE_BYTES, enrich

    page = enrich("https://shop.test/" + "字" * 2000, None, "shop.test")[0]
    assert len(page.encode()) <= MAX_PAGE_BYTES and set(page[1:]) == {"字"}
    assert enrich("https://shop.test/" + "a" * 900, None, "shop.test")[0] == "/" + "a" * 900
