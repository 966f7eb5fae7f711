"""What the collector needs to face browsers: CORS by the sites registry, the tag script, the pixel.

- CORS: a page origin may send only for sites that registered it (`tally sites add --origin`).
  `request_origin` normalises the `Origin` header as the registry stores origins; `null` and
  anything unparsable count as no origin at all (refused wherever an origin is needed).
- `TagAsset`: collector/static/tag.min.js, read and gzip-compressed once, with one strong ETag per
  encoding.
- The pixel: `pixel_params` reads and checks a signed `/i.gif` query (core/pixel.py) against the
  registry; the 1x1 transparent GIF it answers with.

See docs/adr/0015-browser-edge.md.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from core.pixel import PixelError, check_lifetime, check_shape, verify
from oltp.sites import Site, SiteError, normalize_origin

PREFLIGHT_MAX_AGE_S = 86400  # browsers cap it lower (Chromium 2 h); one preflight a day per page origin at most
ALLOWED_METHODS = "POST"
ALLOWED_HEADERS = ("content-type",)  # the only request header a sender needs to set
EXPOSED_HEADERS = "Retry-After"  # the tag reads it on 429 / 503

# The smallest transparent 1x1 GIF89a (43 bytes).
GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


def request_origin(header: str | None) -> str | None:
    """The `Origin` header as `scheme://host[:port]` (default ports dropped), or None when it is
    absent, `null` (sandboxed frames, file://, some redirects) or not an http(s) origin."""
    if not header or header.strip() == "null":
        return None
    try:
        return normalize_origin(header)
    except SiteError:
        return None


def origin_allowed(origin: str | None, site: Site) -> bool:
    return origin is not None and origin in site.origins


def cors_headers(origin: str) -> dict[str, str]:
    """The headers of an answer a registered page origin may read (never credentials)."""
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED_HEADERS}


def preflight_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S)}


def unrequested_headers(header: str | None) -> list[str]:
    """The names in `Access-Control-Request-Headers` beyond Content-Type (lower-cased)."""
    names = [h.strip().lower() for h in (header or "").split(",")]
    return [h for h in names if h and h not in ALLOWED_HEADERS]


# ---------------------------------------------------------------------------------------- the tag

TAG_PATH = Path(__file__).resolve().parent / "static" / "tag.min.js"
TAG_CACHE_CONTROL = "public, max-age=3600"


@dataclass(frozen=True, slots=True)
class TagAsset:
    identity: bytes
    gzipped: bytes
    etag: str  # strong, of the identity bytes
    etag_gzip: str  # strong, of the gzip bytes: another representation, another ETag

    @classmethod
    def load(cls, path: Path = TAG_PATH) -> TagAsset:
        data = path.read_bytes()
        packed = gzip.compress(data, compresslevel=9, mtime=0)  # mtime=0: the same bytes on every worker
        return cls(data, packed, f'"{hashlib.sha256(data).hexdigest()[:32]}"',
                   f'"{hashlib.sha256(packed).hexdigest()[:32]}-gz"')

    def pick(self, gzip_ok: bool) -> tuple[bytes, str]:
        return (self.gzipped, self.etag_gzip) if gzip_ok else (self.identity, self.etag)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: `*` or a list of entity tags, compared weakly (a `W/` prefix is ignored)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


# -------------------------------------------------------------------------------------- the pixel

@dataclass(frozen=True, slots=True)
class PixelRefusal(Exception):
    """A pixel request refused before admission: HTTP status, error code, the parameter at fault, and
    the domain of the site whose registered key it carried (None: no such key; counted globally)."""

    status: int
    code: str
    field: str
    message: str
    domain: str | None = None


def pixel_params(query_string: bytes, sites_by_key: dict[str, Site], now_s: float,
                 max_ttl_s: int) -> tuple[Site, dict[str, str]]:
    """The pixel's site and parameters, once the URL is well formed, its key registered, its domain the
    site's, its signature right and unexpired and its expiry within `max_ttl_s` (TALLY_PIXEL_MAX_TTL_S).
    Raises PixelRefusal: 400 malformed or living too long, 401 unknown key, 403 wrong domain / bad or
    expired signature."""
    try:
        pairs = parse_qsl(query_string.decode("utf-8", "strict"), keep_blank_values=True, strict_parsing=True,
                          errors="strict", max_num_fields=20)
        params = check_shape(pairs)
    except PixelError as exc:
        raise PixelRefusal(400, "invalid_pixel", exc.field, str(exc)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise PixelRefusal(400, "invalid_pixel", "query", f"the query string is malformed ({exc})") from None
    site = sites_by_key.get(params["site"])
    if site is None:
        raise PixelRefusal(401, "unknown_site_key", "site", "site: the site key is not registered")
    if params["domain"] != site.domain:
        raise PixelRefusal(403, "site_mismatch", "domain", f"domain: the site key is for {site.domain}, "
                           "not this domain", site.domain)
    try:
        verify(site.secret, params, now_s)
    except PixelError as exc:
        raise PixelRefusal(403, "invalid_signature", exc.field, str(exc), site.domain) from None
    try:
        check_lifetime(int(params["exp"]), now_s, max_ttl_s)
    except PixelError as exc:
        raise PixelRefusal(400, "invalid_pixel", exc.field, str(exc), site.domain) from None
    return site, params
