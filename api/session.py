"""Dashboard sessions: a signed cookie that names a token without holding it (docs/adr/0017).

`POST /login` checks a pasted token and stores in Flask's signed session cookie only

    {"tid": "tok_0123456789", "exp": <unix time>, "mac": HMAC-SHA256(key, tid | exp | sha256(secret))}

The token id is public; the MAC binds the cookie to that token's stored secret digest, so the cookie
is useless once the token is revoked (or re-minted under the same id) and cannot be made without the
server key. The key is derived from TALLY_SECRET (the same on every API host). Every request with the
cookie looks the token row up again, exactly like a bearer token: revocation is immediate.

The cookie is `HttpOnly`, `SameSite=Strict`, and `Secure` whenever the request came over https
(`request.is_secure`; behind a TLS-terminating proxy, wrap the app in werkzeug's ProxyFix). It is
accepted for GET/HEAD only and only from the same origin (see `cookie_allowed`); anything that
changes state needs the bearer header, which a cross-site page cannot send.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from flask import Flask, Request, request, session
from flask.sessions import SecureCookieSessionInterface
from psycopg_pool import ConnectionPool

from oltp.tokens import Principal, is_token_id

COOKIE_NAME = "tally_session"
SESSION_TTL_S = 8 * 3600
_SAFE_METHODS = frozenset({"GET", "HEAD"})


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, `Secure` whenever the request itself is https."""

    salt = "tally-dashboard-session"

    def get_cookie_secure(self, app: Flask) -> bool:  # type: ignore[override]
        return bool(app.config.get("SESSION_COOKIE_SECURE")) or request.is_secure


def install_sessions(app: Flask, secret: str) -> None:
    app.secret_key = hmac.new(secret.encode(), b"tally dashboard session key v1", hashlib.sha256).hexdigest()
    app.config.update(SESSION_COOKIE_NAME=COOKIE_NAME, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_PATH="/")
    app.session_interface = _SessionInterface()
    app.extensions["tally_session_mac_key"] = hmac.new(secret.encode(), b"tally session mac v1",
                                                       hashlib.sha256).digest()


def _mac(key: bytes, token_id: str, exp: int, digest: bytes) -> str:
    return hmac.new(key, f"{token_id}|{exp}|".encode() + digest, hashlib.sha256).hexdigest()


def _row(pool: ConnectionPool, token_id: str) -> tuple[str, tuple[str, ...], bytes] | None:
    """(role, domains, secret digest) of an unrevoked token, else None (raises psycopg errors)."""
    with pool.connection() as conn:
        row = conn.execute("SELECT role, domains, secret_sha256 FROM api_tokens WHERE id = %s AND revoked_at IS NULL",
                           (token_id,)).fetchone()
    return (row[0], tuple(row[1]), bytes(row[2])) if row else None


def start(app: Flask, pool: ConnectionPool, principal: Principal) -> None:
    """Log this browser in as `principal` (a token just verified)."""
    row = _row(pool, principal.token_id)
    if row is None:  # revoked in between
        return
    exp = int(time.time()) + SESSION_TTL_S
    session.clear()
    session["tid"] = principal.token_id
    session["exp"] = exp
    session["mac"] = _mac(app.extensions["tally_session_mac_key"], principal.token_id, exp, row[2])


def end() -> None:
    session.clear()


def has_cookie(req: Request) -> bool:
    return COOKIE_NAME in req.cookies


def cookie_allowed(req: Request) -> bool:
    """Cookie auth only for safe methods and same-origin requests (CSRF: SameSite=Strict already keeps
    the cookie off cross-site requests; these checks also refuse what a browser marks cross-site)."""
    if req.method not in _SAFE_METHODS:
        return False
    fetch_site = req.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = req.headers.get("Origin")
    if origin is not None and origin != req.host_url.rstrip("/"):
        return False
    return True


def principal(app: Flask, pool_of: Callable[[], ConnectionPool]) -> Principal | None:
    """The principal of this request's session cookie; None if absent, expired, forged or revoked.

    Raises psycopg errors when PostgreSQL cannot be reached (an outage is not a bad session)."""
    token_id, exp, mac = session.get("tid"), session.get("exp"), session.get("mac")
    if not (isinstance(token_id, str) and is_token_id(token_id) and isinstance(exp, int)
            and isinstance(mac, str)) or exp < time.time():
        return None
    row = _row(pool_of(), token_id)
    if row is None:
        return None
    role, domains, digest = row
    if not hmac.compare_digest(mac, _mac(app.extensions["tally_session_mac_key"], token_id, exp, digest)):
        return None
    return Principal(token_id, role, domains)
