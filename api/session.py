"""Dashboard sessions: a signed cookie holding a random session id, the session kept in PostgreSQL (ADR 17).

`POST /login` checks a pasted token, draws a session id (32 random bytes, base64url), stores a row in
`dashboard_sessions` (oltp/schema.py, migration 0007) holding only the SHA-256 of that id, the token's
id and the expiry (SESSION_TTL_S), and puts in Flask's signed session cookie only

    {"sid": "<the session id>"}

Every request with the cookie looks the session up again, joined with its token, in one query: the
session is valid while its row exists, has not expired and its token is not revoked. There is no
cache, so `POST /logout` (which deletes the row) and token revocation end the session at once in every
API process, and a copied cookie gets 401 afterwards. The id is a secret like a token: never logged,
never stored in plaintext; a database dump does not give working cookies. Expired rows are pruned
by oltp/prune.py; revoking a token deletes its sessions (oltp/tokens.py).

The cookie is `HttpOnly`, `SameSite=Strict`, and `Secure` whenever the request came over https
(`request.is_secure`; behind a TLS-terminating proxy, wrap the app in werkzeug's ProxyFix). It is
accepted for GET/HEAD only and only from the same origin (see `cookie_allowed`); anything that
changes state needs the bearer header, which a cross-site page cannot send.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable

from flask import Flask, Request, request, session
from flask.sessions import SecureCookieSessionInterface
from psycopg_pool import ConnectionPool

from oltp.tokens import Principal

COOKIE_NAME = "tally_session"
SESSION_TTL_S = 8 * 3600
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_SID_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, unpadded base64url


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, `Secure` whenever the request itself is https."""

    salt = "tally-dashboard-session-v2"  # v1 cookies (token id + MAC, no server-side row) are not read

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config.get("SESSION_COOKIE_SECURE")) or request.is_secure


def install_sessions(app: Flask, secret: str) -> None:
    app.secret_key = hmac.new(secret.encode(), b"tally dashboard session key v1", hashlib.sha256).hexdigest()
    app.config.update(SESSION_COOKIE_NAME=COOKIE_NAME, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_PATH="/")
    app.session_interface = _SessionInterface()


def _digest(sid: str) -> bytes:
    return hashlib.sha256(sid.encode("ascii")).digest()


def _cookie_sid() -> str | None:
    """The session id this request's cookie carries, if well-formed."""
    sid = session.get("sid")
    return sid if isinstance(sid, str) and _SID_RE.fullmatch(sid) else None


def start(pool: ConnectionPool, principal: Principal) -> bool:
    """Log this browser in as `principal` (a token just verified): a new session row and cookie. A
    session this browser already had is ended first (no fixation). False if the token was revoked in
    between (no session). Raises psycopg errors."""
    old = _cookie_sid()
    sid = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    with pool.connection() as conn:
        if old is not None:
            conn.execute("DELETE FROM dashboard_sessions WHERE id_sha256 = %s", (_digest(old),))
        row = conn.execute(
            "INSERT INTO dashboard_sessions (id_sha256, token_id, expires_at)"
            " SELECT %s, id, now() + make_interval(secs => %s) FROM api_tokens WHERE id = %s AND revoked_at IS NULL"
            " RETURNING token_id", (_digest(sid), SESSION_TTL_S, principal.token_id)).fetchone()
    session.clear()
    if row is None:
        return False
    session["sid"] = sid
    return True


def end(pool: ConnectionPool) -> None:
    """End this browser's session: delete its row (every API process refuses the cookie from now on),
    then clear the cookie. Raises psycopg errors, leaving the cookie in place so a retry can end it."""
    sid = _cookie_sid()
    if sid is not None:
        with pool.connection() as conn:
            conn.execute("DELETE FROM dashboard_sessions WHERE id_sha256 = %s", (_digest(sid),))
    session.clear()


def has_cookie(req: Request) -> bool:
    return COOKIE_NAME in req.cookies


def cookie_allowed(req: Request) -> bool:
    """Cookie auth only for safe methods and same-origin requests (CSRF: SameSite=Strict already keeps
    the cookie off cross-site requests; these checks also refuse what a browser marks cross-site)."""
    if req.method not in _SAFE_METHODS:
        return False
    return same_origin(req)


def same_origin(req: Request) -> bool:
    """Not marked cross-site by the browser: `Sec-Fetch-Site` (when sent) is same-origin or none, and
    `Origin` (when sent) is this very origin. Forms that change the session (login, logout) need it."""
    fetch_site = req.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = req.headers.get("Origin")
    return origin is None or origin == req.host_url.rstrip("/")


def principal(pool_of: Callable[[], ConnectionPool]) -> Principal | None:
    """The principal of this request's session cookie; None if absent, malformed, forged (the cookie is
    signed), logged out, expired or its token revoked.

    Raises psycopg errors when PostgreSQL cannot be reached (an outage is not a bad session)."""
    sid = _cookie_sid()
    if sid is None:
        return None
    with pool_of().connection() as conn:
        row = conn.execute(
            "SELECT t.id, t.role, t.domains FROM dashboard_sessions s JOIN api_tokens t ON t.id = s.token_id"
            " WHERE s.id_sha256 = %s AND s.expires_at > now() AND t.revoked_at IS NULL",
            (_digest(sid),)).fetchone()
    return Principal(row[0], row[1], tuple(row[2])) if row else None
