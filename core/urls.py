"""What of a page URL and a referrer is stored: the URL rule (docs/adr/0030-url-privacy.md).

Query strings and fragments carry what analytics has no business keeping (`?token=`, `?email=`,
`#access_token=` of OAuth redirects, session ids), and a full referrer is another site's page URL.
So by default an event keeps:

- of its `url`: scheme, host, port and path, plus only the query parameters of an allowlist
  (`DEFAULT_KEEP_QUERY`, the campaign tags, plus the site's own `tally sites update --keep-query`),
  in their order and spelling; never the fragment, never a `user:password@`;
- of its `referrer`: the same, when it is a page of the same origin as `url` (an in-site
  navigation); otherwise its origin only (`https://www.google.com/`, what browsers send across
  sites by default; an Android app's `android-app://<package>/`).

An event's `page` (core/enrich.py) keeps fewer query parameters still: the site's own `--keep-query`
names only (`UrlRule.page_keep`), not the default campaign tags, whatever the rule.

A site may opt out (`--raw-urls`): both are stored as sent. The JS tag applies the same rule
before sending (collector/static/tag.js), and the collector applies it to every sender (the tag,
servers' `POST /collect`, signed pixels) before the event is hashed, so an event's hash (ADR 14)
covers the stored URL: two sends that differ only in what the rule drops are the same event.

Input: URLs already validated as absolute http(s) without control characters (core/event.py).
Cost: a URL without `?`, `#` or `@` is returned as is after three substring tests; the others are
cut by one regex, cached per (url, rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Campaign tags only: click ids (gclid, fbclid, msclkid) and referral codes identify a person or a click.
DEFAULT_KEEP_QUERY = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
MAX_KEEP_QUERY = 20  # names a site may add
PARAM_NAME_RE = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,64}")  # a query parameter name a site may keep
# scheme://, userinfo@ (dropped), host[:port], path, ?query; the fragment is never matched.
_URL_RE = re.compile(r"(https?://)(?:[^@/?#]*@)?([^/?#]*)([^?#]*)(?:\?([^#]*))?", re.IGNORECASE | re.DOTALL)
_APP_RE = re.compile(r"android-app://([^/?#]*)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class UrlRule:
    """Which query parameters an event's URLs keep; `keep is None`: URLs are stored as sent.

    `page_keep`: the site's own `--keep-query` names (also of a raw-URL site), which its events' `page` keeps."""

    keep: frozenset[str] | None
    page_keep: frozenset[str] = frozenset()

    def page(self, url: str) -> str:
        """The page URL as stored (see the module docstring)."""
        if self.keep is None or ("?" not in url and "#" not in url and "@" not in url):
            return url
        return _page(url, self.keep)

    def referrer(self, referrer: str | None, url: str) -> str | None:
        """The referrer as stored: cut like `page` within `url`'s origin, else its origin only."""
        if referrer is None or self.keep is None:
            return referrer
        return _referrer(referrer, url, self.keep)


RAW = UrlRule(None)
DEFAULT = UrlRule(frozenset(DEFAULT_KEEP_QUERY))


def rule_for(keep_query: tuple[str, ...] | list[str], raw_urls: bool) -> UrlRule:
    """A site's rule: URLs as sent when it opted out, else the default allowlist plus its own names; its
    own names are also `page_keep` (RAW and DEFAULT themselves when it has none)."""
    if not keep_query:
        return RAW if raw_urls else DEFAULT
    own = frozenset(keep_query)
    return UrlRule(None, own) if raw_urls else UrlRule(frozenset(DEFAULT_KEEP_QUERY).union(own), own)


@lru_cache(maxsize=8192)
def _page(url: str, keep: frozenset[str]) -> str:
    m = _URL_RE.match(url)
    if m is None:  # not an absolute http(s) URL: the caller validated it; stored as is
        return url
    scheme, host, path, query = m.groups()
    kept = "&".join(p for p in query.split("&") if p.split("=", 1)[0] in keep) if query else ""
    return f"{scheme}{host}{path}?{kept}" if kept else f"{scheme}{host}{path}"


@lru_cache(maxsize=8192)
def _origin(url: str) -> str | None:
    """`scheme://host[:port]` lower-cased (userinfo dropped), or None."""
    m = _URL_RE.match(url)
    return f"{m.group(1)}{m.group(2)}".lower() if m else None


@lru_cache(maxsize=8192)
def _referrer(referrer: str, url: str, keep: frozenset[str]) -> str:
    origin = _origin(referrer)
    if origin is None:  # not http(s): an Android app's `android-app://<package>[/...]` (core/event.py)
        app = _APP_RE.match(referrer)
        return f"android-app://{app.group(1)}/" if app else referrer
    if origin == _origin(url):
        return _page(referrer, keep)
    m = _URL_RE.match(referrer)
    assert m is not None
    return f"{m.group(1)}{m.group(2)}/"


def check_param_names(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The names deduplicated in order; ValueError naming the first that is not a plain parameter name."""
    out = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    for name in out:
        if not PARAM_NAME_RE.fullmatch(name):
            raise ValueError(f"{name[:80]!r} is not a query parameter name (letters, digits, '_', '.', '-', "
                             "'[', ']'; at most 64)")
    if len(out) > MAX_KEEP_QUERY:
        raise ValueError(f"at most {MAX_KEEP_QUERY} query parameter names")
    return out
