"""Enrichment at the edge (issue 17, docs/adr/0045-page-and-source.md): an event's `page`, `source`,
`utm_medium` and `utm_campaign`, derived from its stored `url` and `referrer` (after the site's URL rule,
core/urls.py) and its domain, once, in the collector, so that both stores get the same values.

- `page_of`: the URL's path (no query, no fragment) plus only the site's OWN kept query parameters (its
  `--keep-query` names, not the default campaign tags), percent-encoding as sent; always starts with '/'.
- `campaign_of`: `utm_source`, `utm_medium`, `utm_campaign` of the URL's query (percent-decoded, control
  characters dropped, whitespace trimmed and collapsed, the first of repeated names; None when absent
  or blank). The stored URL keeps the campaign tags under every rule (they are in the default
  allowlist; a raw-URL site keeps everything), so reading them from it loses nothing.
- `source_of`: one normalised name (docs/sources.md): the `utm_source` (a known family's name when it
  names one, else lower-cased); else the referrer's family (`FAMILY_HOSTS`, `FAMILY_BRANDS`,
  `ANDROID_APPS`); else its registrable domain (public suffix list incl. its private section, the
  snapshot bundled with tldextract: never the network, never a cache file). None without a referrer
  and for a self-referral (the referrer's registrable domain is the event domain's, or the page URL's own
  host's: a page on localhost or a staging host that names its site with `data-domain`).

All are pure functions of their arguments, cached per argument tuple: in a site's traffic the same pages
and referrers repeat, so `enrich` (what `core.event.event_from_hit` calls per event) is one cache lookup
when they do, and a path cut plus a cached source lookup for a new page without a query.
Input: URLs validated as absolute http(s) without control characters (referrers also `android-app://`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus

MAX_PAGE = 2048  # core.event's limits (core sits below event: stated here, asserted equal there)
MAX_SOURCE = 64
MAX_UTM = 128
# The page is also a key of the rollups' B-tree indexes (a row there holds at most 2704 bytes with the cube's
# other keys): it is cut to this many UTF-8 bytes, on a character boundary.
MAX_PAGE_BYTES = 1000
RESERVED_KEYS = frozenset({"(none)", "(other)"})  # what the rollups show for no value and folded values
NO_KEEP: frozenset[str] = frozenset()

# scheme://, userinfo@ (dropped), host[:port], path, ?query; the fragment is never matched.
_URL_RE = re.compile(r"([a-z][a-z0-9+.\-]*://)(?:[^@/?#]*@)?([^/?#]*)([^?#]*)(?:\?([^#]*))?",
                     re.IGNORECASE | re.DOTALL)
# Control characters, and the invisible format characters (zero widths, bidirectional overrides, soft hyphen,
# BOM) that would make a lookalike of another source in a panel.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_INVISIBLE_RE = re.compile(r"[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]+")
_IPV4_RE = re.compile(r"[0-9]+(?:\.[0-9]+){3}")
_PLAIN_TAG = re.compile(r"[A-Za-z0-9_.\-~]*").fullmatch
_CAMPAIGN = ("utm_source", "utm_medium", "utm_campaign")

# A referrer host that is, or is a subdomain of, one of these is that family ("m.facebook.com",
# "old.reddit.com"). The most specific host wins ("mail.google.com" is Gmail, not Google).
FAMILY_HOSTS: dict[str, tuple[str, ...]] = {
    "DuckDuckGo": ("duckduckgo.com",),
    "Baidu": ("baidu.com",),
    "Ecosia": ("ecosia.org",),
    "Brave": ("search.brave.com",),
    "Hacker News": ("news.ycombinator.com",),
    "Reddit": ("reddit.com", "redd.it"),
    "Twitter": ("twitter.com", "t.co", "x.com"),
    "Facebook": ("facebook.com", "fb.me", "fb.com"),
    "Instagram": ("instagram.com",),
    "LinkedIn": ("linkedin.com", "lnkd.in"),
    "YouTube": ("youtube.com", "youtu.be"),
    "GitHub": ("github.com",),
    "TikTok": ("tiktok.com",),
    "Gmail": ("mail.google.com",),
    "Slack": ("slack.com", "slack-redir.net"),
    "Discord": ("discord.com", "discordapp.com"),
    "Telegram": ("telegram.org", "t.me"),
    "WhatsApp": ("whatsapp.com", "wa.me"),
    "Wikipedia": ("wikipedia.org",),
    "Stack Overflow": ("stackoverflow.com",),
    "Product Hunt": ("producthunt.com",),
    "Mastodon": ("mastodon.social", "mastodon.online"),
    "Bluesky": ("bsky.app",),
    "Threads": ("threads.net", "threads.com"),
    "ChatGPT": ("chatgpt.com", "chat.openai.com"),
    "Perplexity": ("perplexity.ai",),
}
# A registrable domain whose name is one of these, under ANY public suffix, is that family
# (google.com, google.co.uk, google.com.br; yahoo.co.jp; yandex.ru; pinterest.de).
FAMILY_BRANDS: dict[str, str] = {
    "google": "Google", "yahoo": "Yahoo", "yandex": "Yandex", "pinterest": "Pinterest", "bing": "Bing",
}
# Android apps (`android-app://<package>/`, Chrome's referrer for a link opened from an app).
ANDROID_APPS: dict[str, str] = {
    "com.google.android.gm": "Gmail",
    "com.google.android.googlequicksearchbox": "Google",
    "com.google.android.youtube": "YouTube",
    "com.twitter.android": "Twitter",
    "com.facebook.katana": "Facebook",
    "com.facebook.orca": "Facebook",
    "com.instagram.android": "Instagram",
    "com.linkedin.android": "LinkedIn",
    "com.reddit.frontpage": "Reddit",
    "com.slack": "Slack",
    "com.discord": "Discord",
    "org.telegram.messenger": "Telegram",
    "com.whatsapp": "WhatsApp",
    "com.pinterest": "Pinterest",
    "com.zhiliaoapp.musically": "TikTok",
}
# utm_source values (lower-cased) naming a family besides its own name, its hosts and its brand.
UTM_ALIASES: dict[str, str] = {
    "hn": "Hacker News", "hackernews": "Hacker News", "ycombinator": "Hacker News",
    "x": "Twitter", "fb": "Facebook", "ig": "Instagram", "yt": "YouTube", "ddg": "DuckDuckGo",
    "stackoverflow": "Stack Overflow", "producthunt": "Product Hunt", "linked-in": "LinkedIn",
}

_BY_HOST: dict[str, str] = {host: name for name, hosts in FAMILY_HOSTS.items() for host in hosts}
_BY_UTM: dict[str, str] = {
    **{name.lower(): name for name in FAMILY_HOSTS},
    **{brand: name for brand, name in FAMILY_BRANDS.items()},
    **UTM_ALIASES,
}


# Per (url, referrer, domain, rule): a site's pages and referrers repeat. A hit costs one lookup (~0.1 us);
# a miss ~2-6 us (ADR 45). Entries hold up to ~6 KB of strings: 4096 of them bound the memory (~25 MB).
@lru_cache(maxsize=4096)
def enrich(url: str, referrer: str | None, domain: str,
           keep: frozenset[str] = NO_KEEP) -> tuple[str, str | None, str | None, str | None]:
    """(page, source, utm_medium, utm_campaign) of an event with this stored url, referrer and domain;
    `keep`: the site's own `--keep-query` names (`UrlRule.page_keep`)."""
    if "?" not in url and "#" not in url and "@" not in url:  # the commonest page URL: no query to read
        host_at = url.find("//") + 2
        start = url.find("/", host_at)
        page = _cut_page(url[start:MAX_PAGE + start]) if start >= 0 else "/"
        if referrer is None:
            return page, None, None, None
        return page, source_of(referrer, domain, None, url[host_at:start] if start >= 0 else url[host_at:]), None, None
    m = _URL_RE.match(url)
    netloc, path, query = (m.group(2), m.group(3), m.group(4)) if m else ("", "", None)
    utm_source, medium, campaign = _campaign(query)
    source = None if referrer is None and utm_source is None else source_of(referrer, domain, utm_source, netloc)
    return _page(path, query, keep), source, medium, campaign


def _split(url: str) -> tuple[str, str | None]:
    """(path, query) of an absolute URL; ('', None) for anything else (callers pass validated URLs)."""
    m = _URL_RE.match(url)
    return (m.group(3), m.group(4)) if m else ("", None)


@lru_cache(maxsize=1024)
def page_of(url: str, keep: frozenset[str] | None) -> str:
    """The path of `url` without query or fragment, plus its parameters named in `keep` (in their order and
    spelling); '/' for an empty path. `keep`: the site's own `--keep-query` names (None: none)."""
    return _page(*_split(url), keep)


def _page(path: str, query: str | None, keep: frozenset[str] | None) -> str:
    page = path or "/"
    if query and keep:
        kept = "&".join(p for p in query.split("&") if p.split("=", 1)[0] in keep)
        if kept:
            page = f"{page}?{kept}"
    return _cut_page(page[:MAX_PAGE])


def _cut_page(page: str) -> str:
    """`page` cut to MAX_PAGE_BYTES of UTF-8 on a character boundary (an ASCII page that short: as is)."""
    if len(page) * 4 <= MAX_PAGE_BYTES:
        return page
    data = page.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_PAGE_BYTES:
        return page
    return data[:MAX_PAGE_BYTES].decode("utf-8", "ignore")


@lru_cache(maxsize=1024)
def campaign_of(url: str) -> tuple[str | None, str | None, str | None]:
    """(utm_source, utm_medium, utm_campaign) of `url`'s query: each decoded, cleaned, cut (see module)."""
    return _campaign(_split(url)[1])


def _campaign(query: str | None) -> tuple[str | None, str | None, str | None]:
    if not query or "utm_" not in query:
        return None, None, None
    found: dict[str, str] = {}
    for param in query.split("&"):
        name, _, value = param.partition("=")
        if name in _CAMPAIGN and name not in found:
            found[name] = value
    source, medium, campaign = (_tag(found.get(name), MAX_UTM) for name in _CAMPAIGN)
    return source, medium, campaign


def _tag(raw: str | None, limit: int) -> str | None:
    """A campaign tag's value as stored: percent- and '+'-decoded (invalid UTF-8 as U+FFFD), control
    characters dropped, whitespace trimmed and collapsed, cut to `limit`; None when nothing is left."""
    if raw is None:
        return None
    if _PLAIN_TAG(raw):  # the commonest ("cpc", "spring_sale"): nothing to decode or clean
        return raw[:limit] or None
    text = " ".join(_CONTROL_RE.sub(" ", _INVISIBLE_RE.sub("", unquote_plus(raw, errors="replace"))).split())
    return text[:limit].rstrip() or None


@lru_cache(maxsize=4096)  # referrers of other sites are stored as origins: few distinct ones
def source_of(referrer: str | None, domain: str, utm_source: str | None, page_netloc: str = "") -> str | None:
    """The event's traffic source name (see the module docstring and docs/sources.md). `page_netloc`: the page
    URL's `host[:port]`, which differs from `domain` on a page that names its site with `data-domain`."""
    if utm_source is not None:
        utm = " ".join(_CONTROL_RE.sub(" ", _INVISIBLE_RE.sub("", utm_source.lower())).split())
        if utm:
            return _utm_family(utm) or _unreserved(utm[:MAX_SOURCE].rstrip())
    if not referrer:
        return None
    m = _URL_RE.match(referrer)
    if m is None:
        return None
    scheme, host = m.group(1).lower(), _host(m.group(2))
    if scheme == "android-app://":
        return ANDROID_APPS.get(host) or host[:MAX_SOURCE] or None
    if not host:
        return None
    site = registrable_domain(host)
    if site == registrable_domain(domain) or (page_netloc and site == registrable_domain(_host(page_netloc))):
        return None  # a self-referral: a page of the same site, or of the host the page is on (data-domain)
    return family_of_host(host) or _unreserved(site[:MAX_SOURCE])


def _unreserved(source: str) -> str:
    """A source name that cannot be taken for the rollups' own `(none)` / `(other)` keys: those are quoted."""
    return f'"{source}"' if source in RESERVED_KEYS else source


def _utm_family(utm: str) -> str | None:
    """The family a lower-cased utm_source names: by name or alias ("google", "hn"), or as a host."""
    name = _BY_UTM.get(utm) or _BY_UTM.get(utm.replace(" ", ""))
    if name is None and "." in utm and " " not in utm:
        name = family_of_host(utm)
    return name


def _host(netloc: str) -> str:
    """The host of a URL's `host[:port]`, lower-cased, without a trailing dot (an IPv6 literal keeps []).)"""
    if netloc.startswith("["):
        return netloc[:netloc.find("]") + 1].lower()
    host, colon, port = netloc.rpartition(":")
    if not colon or not port.isdigit() and port:
        host = netloc
    return host.lower().rstrip(".")


@lru_cache(maxsize=4096)
def family_of_host(host: str) -> str | None:
    """The family of a (lower-case) host: it or its nearest parent in FAMILY_HOSTS, else its registrable
    domain's name in FAMILY_BRANDS; None when neither."""
    labels = host.split(".")
    for i in range(len(labels) - 1):
        name = _BY_HOST.get(".".join(labels[i:]))
        if name is not None:
            return name
    site = registrable_domain(host)
    return FAMILY_BRANDS.get(site.split(".", 1)[0]) if "." in site else None


@lru_cache(maxsize=4096)
def registrable_domain(host: str) -> str:
    """The host's registrable domain ("site"): its public suffix plus one label (public suffix list incl.
    the private section, so "alice.github.io"); for a host under no listed suffix, its last two labels
    (the list's default rule `*`), so "shop.test"; an IP address or a host that is itself a suffix is
    its own site."""
    if not host or host.startswith("[") or _IPV4_RE.fullmatch(host):
        return host
    parts = _extractor()(host)
    if parts.suffix:
        return str(parts.top_domain_under_public_suffix) or host
    return ".".join(host.split(".")[-2:])


@lru_cache(maxsize=1)
def _extractor() -> Any:
    """tldextract with its bundled public suffix list snapshot only: `suffix_list_urls=()` (no fetch) and
    `cache_dir=None` (no cache file). Imported on first use: it imports `requests` (~0.1 s)."""
    import tldextract  # noqa: PLC0415  # start-up cost: it imports `requests`; every process imports core.event

    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True,
                                 include_psl_private_domains=True)
