"""The dashboard's HTML: the page, login and logout (sessions: api/session.py).

These routes answer HTML, so a store that does not answer gets the login form with a 503 (this
blueprint's own handler, asked before the app's JSON one in api/errors.py)."""

from __future__ import annotations

import psycopg
from flask import Blueprint, Response, redirect, render_template, request
from psycopg_pool import ConnectionPool
from werkzeug.wrappers import Response as BaseResponse  # what redirect() is typed to return

from api import session
from api.auth import public
from api.backends import backends
from api.errors import STORE_UNAVAILABLE
from core.event import EventError, normalize_domain
from oltp import tokens
from oltp.tokens import Principal

bp = Blueprint("dashboard", __name__)

# The pages load scripts and styles from this origin only (uPlot is vendored under /static/vendor).
_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _page(html: str, status: int = 200) -> Response:
    resp = Response(html, status=status, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = _PAGE_CSP
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    return resp


def _pool() -> ConnectionPool:
    return backends().rollups.pool


def _session_principal() -> Principal | None:
    """The dashboard session's principal on a public page (None: not logged in)."""
    if not session.has_cookie(request):
        return None
    return session.principal(_pool)


def _domain_hint() -> str:
    value = request.values.get("domain", "")
    try:
        return normalize_domain(value) if value else ""
    except EventError:
        return ""


def _login_page(message: str = "", status: int = 200) -> Response:
    return _page(render_template("login.html", message=message, domain=_domain_hint()), status)


def _to_dashboard() -> BaseResponse:
    domain = _domain_hint()
    return redirect(f"/?domain={domain}" if domain else "/", 303)


@bp.errorhandler(psycopg.OperationalError)
def _store_unavailable(_exc: psycopg.OperationalError) -> Response:
    return _login_page(STORE_UNAVAILABLE, 503)


@bp.get("/")
@public
def dashboard() -> Response:
    """The dashboard, or the login form when this browser has no valid session.
    ---
    get:
      summary: The dashboard page (HTML)
      tags: [dashboard]
      parameters:
        - {name: domain, in: query, required: false, schema: {type: string}}
      responses:
        200:
          description: the dashboard, or the login form
          content: {text/html: {schema: {type: string}}}
    """
    principal = _session_principal()
    if principal is None:
        return _login_page()
    return _page(render_template("dashboard.html", role=principal.role, token_id=principal.token_id))


def _same_origin_form() -> bool:
    """A login or logout form posted from this origin (login CSRF: a cross-site page must not log you in,
    nor out)."""
    return session.same_origin(request)


@bp.get("/login")
@public
def login_form() -> BaseResponse:
    """The login form.
    ---
    get:
      summary: The login page (HTML)
      tags: [dashboard]
      parameters:
        - {name: domain, in: query, required: false, schema: {type: string}}
      responses:
        200:
          description: the login form
          content: {text/html: {schema: {type: string}}}
        303:
          description: this browser is already logged in; redirects to the dashboard
          headers:
            Location: {schema: {type: string}}
    """
    try:
        logged_in = _session_principal() is not None
    except psycopg.OperationalError:
        logged_in = False  # the form still shows; logging in answers 503 if the store stays away
    if logged_in:
        return _to_dashboard()
    return _login_page()


@bp.post("/login")
@public
def login() -> BaseResponse:
    """Check a pasted token and start a session: a row in PostgreSQL, its random id in the cookie (api/session.py).
    ---
    post:
      summary: Log in with an API token (sets the HttpOnly, SameSite=Strict session cookie)
      tags: [dashboard]
      requestBody:
        required: true
        content:
          application/x-www-form-urlencoded:
            schema:
              type: object
              properties:
                token: {type: string}
                domain: {type: string}
              required: [token]
      responses:
        303:
          description: logged in; redirects to the dashboard
          headers:
            Location: {schema: {type: string}}
            Set-Cookie: {schema: {type: string}}
        401:
          description: unknown, malformed or revoked token (the login form again)
          content: {text/html: {schema: {type: string}}}
        403:
          description: the form was posted from another site
          content: {text/html: {schema: {type: string}}}
    """
    if not _same_origin_form():
        return _login_page("log in from this site's own login page", 403)
    token = request.form.get("token", "").strip()
    principal = tokens.verify(_pool(), token) if token else None
    if principal is not None and not session.start(_pool(), principal):
        principal = None  # revoked in between
    if principal is None:
        return _login_page("that token is unknown, malformed or revoked", 401)
    return _to_dashboard()


@bp.post("/logout")
@public
def logout() -> BaseResponse:
    """End this browser's session on the server (a copy of the cookie stops working too) and clear the cookie.
    ---
    post:
      summary: Log out (ends the session server-side, clears the session cookie)
      tags: [dashboard]
      responses:
        303:
          description: logged out; redirects to the login page
          headers:
            Location: {schema: {type: string}}
        403:
          description: the form was posted from another site; the session goes on
          content: {text/html: {schema: {type: string}}}
        503:
          description: PostgreSQL is unavailable; the session was not ended (retry)
          content: {text/html: {schema: {type: string}}}
    """
    if not _same_origin_form():
        return _login_page("log out from this site's own pages", 403)
    try:
        session.end(_pool())
    except psycopg.OperationalError:
        return _login_page("PostgreSQL is unavailable, so the session was not ended; retry", 503)
    return redirect("/login", 303)
