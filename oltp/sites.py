"""The sites registry in PostgreSQL: which domains may send events, with which key.

A site is one domain (normalised with `core.event.normalize_domain`; `www.example.com` is a
different site from `example.com`). Each site has

- `site_key`: public (`pk_` + 22 base64url characters); it goes into the page tag and every hit,
- `secret`: private (`sk_` + 43 base64url characters); it stays on the customer's server and signs
  pixel URLs (HMAC), so it is stored retrievably. It is returned by `add`, `rotate_secret`,
  `get` and `load_all` only; never print it outside the command that created it,
- `tz` (IANA name), `origins` (allowed page origins `scheme://host[:port]`, http/https only),
  `rate_per_s` / `burst` (per-site overrides of the collector's limit, `None` = default),
  `respect_dnt` (for the tag), and its URL rule (core/urls.py): `keep_query` (query parameters its
  page URLs keep besides the default campaign tags) or `raw_urls` (URLs stored as sent),
- `account`: the customer the site belongs to (free text such as "Acme Inc."; None: none given).

Every function takes a PostgreSQL DSN, opens one short connection and raises `SiteError`
(with a stable `code`) for anything the caller asked wrongly; nothing is written then.
"""

from __future__ import annotations

import builtins
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg.rows import dict_row

from core.event import EventError, normalize_domain
from core.urls import DEFAULT, UrlRule, check_param_names, rule_for

KEY_PREFIX = "pk_"
SECRET_PREFIX = "sk_"
_COLUMNS = ("domain, tz, origins, site_key, secret, rate_per_s, burst, respect_dnt, keep_query, raw_urls, "
            "account, created_at, updated_at")
MAX_ACCOUNT = 100


class SiteError(ValueError):
    """A request about sites cannot be done; `code` is stable (unknown_domain, duplicate_domain, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Site:
    domain: str
    tz: str
    origins: tuple[str, ...]
    site_key: str
    secret: str = field(repr=False)
    rate_per_s: float | None = None
    burst: int | None = None
    respect_dnt: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    keep_query: tuple[str, ...] = ()
    raw_urls: bool = False
    account: str | None = None
    url_rule: UrlRule = field(default=DEFAULT, init=False, repr=False, compare=False)  # from the two above

    def __post_init__(self) -> None:
        object.__setattr__(self, "url_rule", rule_for(self.keep_query, self.raw_urls))

    def public_dict(self) -> dict[str, Any]:
        """Everything but the secret (for listings)."""
        return {"domain": self.domain, "tz": self.tz, "origins": builtins.list(self.origins),
                "site_key": self.site_key, "rate_per_s": self.rate_per_s, "burst": self.burst,
                "respect_dnt": self.respect_dnt, "keep_query": builtins.list(self.keep_query),
                "raw_urls": self.raw_urls, "account": self.account,
                "created_at": self.created_at.isoformat() if self.created_at else None,
                "updated_at": self.updated_at.isoformat() if self.updated_at else None}

    def to_dict(self) -> dict[str, Any]:
        """Everything, the secret included (the collector's disk copy; mode 0600)."""
        return {**self.public_dict(), "secret": self.secret}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Site:
        """Inverse of `to_dict`; raises KeyError/TypeError/ValueError on a malformed object."""
        rate, burst = obj.get("rate_per_s"), obj.get("burst")
        return cls(domain=str(obj["domain"]), tz=str(obj["tz"]), origins=tuple(str(o) for o in obj["origins"]),
                   site_key=str(obj["site_key"]), secret=str(obj["secret"]),
                   rate_per_s=None if rate is None else float(rate), burst=None if burst is None else int(burst),
                   respect_dnt=bool(obj.get("respect_dnt", False)),
                   keep_query=tuple(str(n) for n in obj.get("keep_query") or ()),
                   raw_urls=bool(obj.get("raw_urls", False)),
                   account=None if obj.get("account") is None else str(obj["account"]),  # older copies: none
                   created_at=datetime.fromisoformat(obj["created_at"]) if obj.get("created_at") else None,
                   updated_at=datetime.fromisoformat(obj["updated_at"]) if obj.get("updated_at") else None)


def new_site_key() -> str:
    """A fresh public site key: `pk_` + 22 base64url characters (128 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(16)


def new_secret() -> str:
    """A fresh site secret: `sk_` + 43 base64url characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def check_domain(value: Any) -> str:
    """The normalised domain, or SiteError(invalid_domain)."""
    try:
        return normalize_domain(value)
    except EventError as exc:
        raise SiteError("invalid_domain", f"{value!r} is not a valid domain ({exc.problem})") from None


def check_tz(value: Any) -> str:
    """An IANA time zone name known to zoneinfo, or SiteError(invalid_tz)."""
    if not isinstance(value, str) or not value or len(value) > 64 or value.startswith("/") or ".." in value:
        raise SiteError("invalid_tz", f"{value!r} is not an IANA time zone name (e.g. Europe/Berlin)")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise SiteError("invalid_tz", f"{value!r} is not an IANA time zone name (e.g. Europe/Berlin)") from None
    return value


def normalize_origin(value: Any) -> str:
    """`scheme://host[:port]`, lower-cased, default ports dropped; http/https only, nothing after the host."""
    bad = SiteError("invalid_origin", f"{str(value)[:100]!r} is not an origin like https://example.com "
                    "(http or https, a host, an optional port, no path)")
    if not isinstance(value, str) or len(value) > 300:
        raise bad
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise bad from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username is not None \
            or parts.password is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad
    host = parts.hostname.lower().rstrip(".")
    try:
        if "[" in parts.netloc:  # an IP literal in brackets: IPv6 only (urlsplit also takes "IPvFuture",
            host = f"[{ipaddress.IPv6Address(host)}]"  # [v1.any text], which a review put on a site's panel)
        elif host.replace(".", "").isdigit():
            host = str(ipaddress.IPv4Address(host))
        else:
            host = normalize_domain(host)
    except (EventError, ValueError):
        raise bad from None
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def check_account(value: Any) -> str | None:
    """The account a site belongs to, stripped (None for None or blank), or SiteError(invalid_account):
    at most MAX_ACCOUNT printable characters."""
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else None
    if text is None or len(text) > MAX_ACCOUNT or not text.isprintable():
        raise SiteError("invalid_account", f"{str(value)[:40]!r} is not an account name (at most {MAX_ACCOUNT} "
                        "printable characters, e.g. 'Acme Inc.')")
    return text or None


def _check_limits(rate_per_s: float | None, burst: int | None) -> None:
    if rate_per_s is not None and not (isinstance(rate_per_s, (int, float)) and 0 < rate_per_s <= 1e7):
        raise SiteError("invalid_rate", "rate must be a number of events per second in (0, 10000000]")
    if burst is not None and not (isinstance(burst, int) and not isinstance(burst, bool) and 1 <= burst <= 100_000_000):
        raise SiteError("invalid_burst", "burst must be a whole number of events in [1, 100000000]")


def _site(row: dict[str, Any]) -> Site:
    return Site(domain=row["domain"], tz=row["tz"], origins=tuple(row["origins"] or ()), site_key=row["site_key"],
                secret=row["secret"], rate_per_s=row["rate_per_s"], burst=row["burst"],
                respect_dnt=row["respect_dnt"], created_at=row["created_at"], updated_at=row["updated_at"],
                keep_query=tuple(row["keep_query"] or ()), raw_urls=row["raw_urls"], account=row["account"])


def _connect(dsn: str, connect_timeout: float = 5) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row, connect_timeout=max(1, int(connect_timeout)))


def check_keep_query(names: Iterable[str]) -> tuple[str, ...]:
    """Query parameter names a site's URLs keep (core/urls.py), or SiteError(invalid_keep_query)."""
    try:
        return check_param_names(builtins.list(names))
    except ValueError as exc:
        raise SiteError("invalid_keep_query", f"--keep-query: {exc}") from None


def add(dsn: str, domain: str, *, tz: str = "UTC", origins: Iterable[str] = (), rate_per_s: float | None = None,
        burst: int | None = None, respect_dnt: bool = False, keep_query: Iterable[str] = (),
        raw_urls: bool = False, account: str | None = None) -> Site:
    """Register a site with a fresh key and secret; returns it (secret included).

    Raises SiteError: invalid_domain, invalid_tz, invalid_origin, invalid_rate, invalid_burst,
    invalid_keep_query, invalid_account, duplicate_domain. Nothing is written unless every argument is valid.
    """
    name = check_domain(domain)
    zone = check_tz(tz)
    allowed = tuple(dict.fromkeys(normalize_origin(o) for o in origins))
    _check_limits(rate_per_s, burst)
    keep = check_keep_query(keep_query)
    owner = check_account(account)
    with _connect(dsn) as conn:
        try:
            row = conn.execute(
                f"INSERT INTO sites (domain, tz, origins, site_key, secret, rate_per_s, burst, respect_dnt, keep_query,"
                f" raw_urls, account) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                (name, zone, builtins.list(allowed), new_site_key(), new_secret(),
                 None if rate_per_s is None else float(rate_per_s), burst, respect_dnt, builtins.list(keep),
                 raw_urls, owner)).fetchone()
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name == "sites_pkey":
                raise SiteError("duplicate_domain", f"{name} is already registered "
                                "(see `tally sites list`; `tally sites rotate-secret` for a new secret)") from None
            raise  # a site_key collision of 128 random bits: not worth a retry path
    assert row is not None
    return _site(row)


def get(dsn: str, domain: str) -> Site | None:
    """The site registered for `domain` (normalised), secret included; None if there is none."""
    name = check_domain(domain)
    with _connect(dsn) as conn:
        row = conn.execute(f"SELECT {_COLUMNS} FROM sites WHERE domain = %s", (name,)).fetchone()
    return _site(row) if row else None


def list_sites(dsn: str) -> builtins.list[Site]:
    """Every site, ordered by domain (secrets included in the objects: print `public_dict()` only)."""
    return load_all(dsn)


def set_url_rule(dsn: str, domain: str, *, keep_query: Iterable[str] | None = None,
                 raw_urls: bool | None = None) -> Site:
    """Change what `domain`'s event URLs keep (None: unchanged); returns the site. Collectors apply it
    within TALLY_REGISTRY_REFRESH_S. SiteError: unknown_domain, invalid_keep_query."""
    name = check_domain(domain)
    keep = None if keep_query is None else builtins.list(check_keep_query(keep_query))
    with _connect(dsn) as conn:
        row = conn.execute(
            f"UPDATE sites SET keep_query = COALESCE(%s, keep_query), raw_urls = COALESCE(%s, raw_urls),"
            f" updated_at = now() WHERE domain = %s RETURNING {_COLUMNS}", (keep, raw_urls, name)).fetchone()
    if row is None:
        raise SiteError("unknown_domain", f"{name} is not registered (see `tally sites list`)")
    return _site(row)


def set_limits(dsn: str, domain: str, *, rate_per_s: float | None = None, burst: int | None = None) -> Site:
    """Change `domain`'s own rate limit (None: unchanged); returns the site. Collectors apply it within
    TALLY_REGISTRY_REFRESH_S (a site whose limit changed starts a fresh window). SiteError:
    unknown_domain, invalid_rate, invalid_burst."""
    name = check_domain(domain)
    _check_limits(rate_per_s, burst)
    with _connect(dsn) as conn:
        row = conn.execute(
            f"UPDATE sites SET rate_per_s = COALESCE(%s, rate_per_s), burst = COALESCE(%s, burst),"
            f" updated_at = now() WHERE domain = %s RETURNING {_COLUMNS}",
            (None if rate_per_s is None else float(rate_per_s), burst, name)).fetchone()
    if row is None:
        raise SiteError("unknown_domain", f"{name} is not registered (see `tally sites list`)")
    return _site(row)


UNCHANGED: Any = object()  # `update`'s account argument: leave it as it is


@dataclass(frozen=True, slots=True)
class Change:
    """What `update` asks for; None (UNCHANGED for `account`) leaves a field as it is."""

    add_origins: tuple[str, ...] = ()
    remove_origins: tuple[str, ...] = ()
    tz: str | None = None
    rate_per_s: float | None = None
    burst: int | None = None
    keep_query: tuple[str, ...] | None = None
    raw_urls: bool | None = None
    account: Any = UNCHANGED  # a name, or None / "" to clear it

    def checked(self) -> Change:
        """The change with every value checked and normalised; SiteError(invalid_*) for the first bad one."""
        _check_limits(self.rate_per_s, self.burst)
        return Change(tuple(dict.fromkeys(normalize_origin(o) for o in self.add_origins)),
                      tuple(dict.fromkeys(normalize_origin(o) for o in self.remove_origins)),
                      None if self.tz is None else check_tz(self.tz), self.rate_per_s, self.burst,
                      None if self.keep_query is None else check_keep_query(self.keep_query), self.raw_urls,
                      self.account if self.account is UNCHANGED else check_account(self.account))


def update(dsn: str, domain: str, change: Change) -> tuple[Site, Site]:
    """Apply `change` to `domain` in one transaction, keeping its key and secret; returns the site before
    and after. Collectors apply it within TALLY_REGISTRY_REFRESH_S. SiteError: invalid_* (checked before
    anything is read), unknown_domain, unknown_origin (an origin to remove that the site does not have);
    nothing is written then."""
    name = check_domain(domain)
    ch = change.checked()
    with _connect(dsn) as conn, conn.transaction():
        row = conn.execute(f"SELECT {_COLUMNS} FROM sites WHERE domain = %s FOR UPDATE", (name,)).fetchone()
        if row is None:
            raise SiteError("unknown_domain", f"{name} is not registered (see `tally sites list`)")
        before = _site(row)
        missing = [o for o in ch.remove_origins if o not in before.origins]
        if missing:
            raise SiteError("unknown_origin", f"{name} has no origin {', '.join(missing)} to remove (its origins: "
                            f"{', '.join(before.origins) or 'none'})")
        origins = [o for o in dict.fromkeys(before.origins + ch.add_origins) if o not in ch.remove_origins]
        row = conn.execute(
            f"UPDATE sites SET origins = %s, tz = COALESCE(%s, tz), rate_per_s = COALESCE(%s, rate_per_s),"
            f" burst = COALESCE(%s, burst), keep_query = COALESCE(%s, keep_query), raw_urls = COALESCE(%s, raw_urls),"
            f" account = CASE WHEN %s THEN account ELSE %s END, updated_at = now() WHERE domain = %s"
            f" RETURNING {_COLUMNS}",
            (origins, ch.tz, None if ch.rate_per_s is None else float(ch.rate_per_s), ch.burst,
             None if ch.keep_query is None else builtins.list(ch.keep_query), ch.raw_urls,
             ch.account is UNCHANGED, None if ch.account is UNCHANGED else ch.account, name)).fetchone()
    assert row is not None
    return before, _site(row)


def rotate_secret(dsn: str, domain: str) -> str:
    """Give `domain` a new secret and return it; the old one stops working. SiteError(unknown_domain)."""
    name = check_domain(domain)
    secret = new_secret()
    with _connect(dsn) as conn:
        row = conn.execute("UPDATE sites SET secret = %s, updated_at = now() WHERE domain = %s RETURNING domain",
                           (secret, name)).fetchone()
    if row is None:
        raise SiteError("unknown_domain", f"{name} is not registered (see `tally sites list`)")
    return secret


def remove(dsn: str, domain: str) -> None:
    """Unregister `domain`: its key stops being accepted. SiteError(unknown_domain)."""
    name = check_domain(domain)
    with _connect(dsn) as conn:
        row = conn.execute("DELETE FROM sites WHERE domain = %s RETURNING domain", (name,)).fetchone()
    if row is None:
        raise SiteError("unknown_domain", f"{name} is not registered (see `tally sites list`)")


def load_all(dsn: str, *, connect_timeout: float = 5) -> builtins.list[Site]:
    """Every site with its key and secret, for the collector's in-memory copy.

    Raises psycopg.Error (psycopg.OperationalError when PostgreSQL is unreachable).
    """
    with _connect(dsn, connect_timeout) as conn:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM sites ORDER BY domain").fetchall()
    return [_site(row) for row in rows]


def load_public(dsn: str, *, connect_timeout: float = 5) -> builtins.list[dict[str, Any]]:
    """Every site without its key, secret, origins or limits, ordered by domain: what analysts may read
    (the ClickHouse copy, olap/sites_sync.py). Keys: domain, account, tz, keep_query, raw_urls, created_at,
    updated_at. Raises psycopg.Error."""
    with _connect(dsn, connect_timeout) as conn:
        return conn.execute("SELECT domain, account, tz, keep_query, raw_urls, created_at, updated_at FROM sites"
                            " ORDER BY domain").fetchall()


list = list_sites
