"""Who may call which API route: bearer tokens, roles, domain scoping and per-token rate limits.

Every request to a route must carry `Authorization: Bearer <token>`, exactly that form (the scheme
is matched case-sensitively, one space, then the token), unless the route is marked `public`
(health checks, the dashboard and login pages, static files). Without the header, the dashboard's
session cookie (api/session.py) is accepted instead for same-origin GET/HEAD requests.
Routes declare who may call them:

    @bp.get("/api/v1/domains/<domain>/<metric>")
    @allow("admin", "analyst", "customer", domain_arg="domain")   # customers: only their domains
    def domain_series(domain, metric): ...

A route that declares nothing is admin-only, so a forgotten declaration fails closed. A path under
/api/ that matches no route (or not with this method) is checked like a route first: 401 without a
valid token or session, the 404 / 405 only to an authenticated caller (nobody learns which routes
exist, and an ended session gets 401 on every API path alike).

Answers: no header, a malformed header, or an unknown / revoked / malformed token -> 401 with
`WWW-Authenticate: Bearer ...` (RFC 6750; `error="invalid_token"` for bad tokens); a valid token
without the right -> 403; PostgreSQL unreachable while checking -> 503. All in the JSON error shape.

Rate limits (flask-limiter, in-memory, per process): `Settings.api_rate_limit` shared by every route,
keyed by the token id, or by the client address for requests without a valid token (so guessing
tokens is throttled too); exceeding it -> 429 with `Retry-After`. Probes (`probe`) are exempt.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from flask import Blueprint, Flask, Response, current_app, g, request
from flask_limiter import Limiter, RateLimitExceeded, RequestLimit
from psycopg_pool import ConnectionPool

from api import session
from api.errors import STORE_UNAVAILABLE
from core.event import EventError, normalize_domain
from core.http import error, json_response
from oltp import tokens
from oltp.tokens import Principal, verify

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., object])

# RFC 6750 section 2.1: "Bearer" 1*SP b64token; we accept exactly one space.
_BEARER_RE = re.compile(r"Bearer ([A-Za-z0-9._~+/-]+=*)")
REALM = "tally"
API_PREFIX = "/api/"  # unknown paths under it answer 401 before 404 (see `_enforce`)
# Always public, even if a route forgets to say so: load balancers' probes carry no token.
_PUBLIC_ENDPOINTS = frozenset({"static", "ops.healthz", "ops.readyz"})
_PROBE_ENDPOINTS = frozenset({"ops.healthz", "ops.readyz"})


def public(view: F) -> F:
    """Mark a route as callable without a token (it still passes the Host check and the rate limit)."""
    view.tally_access = "public"  # type: ignore[attr-defined]
    return view


def probe(view: F) -> F:
    """A health probe: public and exempt from rate limits."""
    view.tally_access = "public"  # type: ignore[attr-defined]
    view.tally_probe = True  # type: ignore[attr-defined]
    return view


def allow(*roles: str, domain_arg: str | None = None) -> Callable[[F], F]:
    """Let tokens of `roles` call the route; with `domain_arg`, a customer token must list that URL
    argument's domain (an invalid domain is left to the route, which answers 400)."""
    unknown = set(roles) - {"admin", "analyst", "customer"}
    if unknown or not roles:
        raise ValueError(f"unknown roles {sorted(unknown)}")

    def mark(view: F) -> F:
        view.tally_access = frozenset(roles)  # type: ignore[attr-defined]
        view.tally_domain_arg = domain_arg  # type: ignore[attr-defined]
        return view

    return mark


@dataclass(frozen=True, slots=True)
class _Auth:
    principal: Principal | None
    problem: str | None  # missing | malformed | invalid | session | cookie_refused | store


def _resolve(pool_of: Callable[[], ConnectionPool]) -> _Auth:
    """This request's token, checked once per request (cached on flask.g)."""
    cached: _Auth | None = g.get("tally_auth")
    if cached is not None:
        return cached
    header = request.headers.get("Authorization")
    if header is None and session.has_cookie(request) and not _is_public():
        # (Public routes - pages, static files - are limited by address: no token lookup for each file.)
        # The dashboard's session cookie (api/session.py): GET/HEAD from the same origin only.
        if not session.cookie_allowed(request):
            result = _Auth(None, "cookie_refused")
        else:
            try:
                principal = session.principal(pool_of)
            except psycopg.Error as exc:
                log.warning("session check failed, PostgreSQL error: %s", type(exc).__name__)
                result = _Auth(None, "store")
            else:
                result = _Auth(principal, None if principal else "session")
    elif header is None:
        result = _Auth(None, "missing")
    elif (match := _BEARER_RE.fullmatch(header)) is None:
        result = _Auth(None, "malformed")
    else:
        try:
            principal = verify(pool_of(), match.group(1))
        except psycopg.Error as exc:  # PoolTimeout is an OperationalError too
            log.warning("token check failed, PostgreSQL error: %s", type(exc).__name__)  # never the token
            result = _Auth(None, "store")
        else:
            result = _Auth(principal, None if principal else "invalid")
    g.tally_auth = result
    return result


def current_principal() -> Principal | None:
    """The verified token of this request (None on public routes called without one)."""
    auth = g.get("tally_auth")
    return auth.principal if auth is not None else None


def _unauthorized(code: str, message: str, rfc_error: str | None) -> Response:
    resp = error(401, code, message)
    challenge = f'Bearer realm="{REALM}"'
    if rfc_error:
        challenge += f', error="{rfc_error}"'
    resp.headers["WWW-Authenticate"] = challenge
    return resp


def _forbidden(code: str, message: str) -> Response:
    resp = error(403, code, message)
    resp.headers["WWW-Authenticate"] = f'Bearer realm="{REALM}", error="insufficient_scope"'
    return resp


def declared_access(endpoint: str, view: object) -> tuple[str | frozenset[str], bool]:
    """What a route declares, as `_enforce` reads it: ("public" or the roles, whether it is a probe).
    For the OpenAPI document (api/openapi.py), so it cannot disagree with the checks."""
    public_ = endpoint in _PUBLIC_ENDPOINTS or getattr(view, "tally_access", None) == "public"
    probe_ = endpoint in _PROBE_ENDPOINTS or bool(getattr(view, "tally_probe", False))
    return ("public" if public_ else getattr(view, "tally_access", frozenset({"admin"}))), probe_


def _view_attr(name: str, default: object) -> object:
    view = current_app.view_functions.get(request.endpoint or "")
    return getattr(view, name, default)


def _is_public() -> bool:
    return request.endpoint in _PUBLIC_ENDPOINTS or _view_attr("tally_access", None) == "public"


def _is_probe() -> bool:
    return request.endpoint in _PROBE_ENDPOINTS or bool(_view_attr("tally_probe", False))


def _enforce(pool_of: Callable[[], ConnectionPool]) -> Response | None:
    if request.endpoint is None:  # unknown URL or method: Flask answers 404 / 405 ...
        if request.path.startswith(API_PREFIX):  # ... under /api/ only to a caller who may call the API:
            return _refusal(_resolve(pool_of))  # a route's existence is not told to anyone (auth first)
        return None
    if _is_public():
        return None
    auth = _resolve(pool_of)
    refused = _refusal(auth)
    if refused is not None:
        return refused
    principal = auth.principal
    assert principal is not None
    roles = _view_attr("tally_access", frozenset({"admin"}))
    if principal.role not in roles:  # type: ignore[operator]
        return _forbidden("forbidden", f"a {principal.role} token may not call this endpoint")
    domain_arg = _view_attr("tally_domain_arg", None)
    if domain_arg and not principal.is_admin:
        raw = (request.view_args or {}).get(str(domain_arg))
        try:
            domain = normalize_domain(raw)
        except EventError:
            return None  # the route names the bad domain (400)
        if not principal.can_read(domain):
            return _forbidden("forbidden_domain", f"this token may not read {domain}")
    return None


def _refusal(auth: _Auth) -> Response | None:
    """401 (or 503) for a request without a valid token or session; None when it has one."""
    if auth.problem == "missing":
        return _unauthorized("missing_token", "this endpoint needs 'Authorization: Bearer <token>' "
                             "(an admin creates tokens with `tally tokens create`)", None)
    if auth.problem == "malformed":
        return _unauthorized("malformed_authorization",
                             "the Authorization header must be exactly 'Bearer <token>'", "invalid_request")
    if auth.problem == "cookie_refused":
        return _unauthorized("cookie_not_accepted", "the dashboard's session cookie is accepted for same-origin "
                             "GET requests only; send 'Authorization: Bearer <token>'", None)
    if auth.problem == "session":
        return _unauthorized("invalid_session", "the dashboard session expired or its token was revoked; "
                             "log in again at /login", "invalid_token")
    if auth.problem == "invalid":
        return _unauthorized("invalid_token", "the token is unknown, malformed or revoked", "invalid_token")
    if auth.problem == "store" or auth.principal is None:
        return error(503, "store_unavailable", STORE_UNAVAILABLE)
    return None


def _rate_key(pool_of: Callable[[], ConnectionPool]) -> str:
    auth = _resolve(pool_of)
    if auth.principal is not None:
        return f"token:{auth.principal.token_id}"
    return f"addr:{request.remote_addr or 'unknown'}"


def _too_many(limit: RequestLimit) -> Response:
    # reset_at is a whole second rounded up, so a 60 s window could say 61: never more than the window
    retry_after = max(1, min(limit.limit.get_expiry(), math.ceil(limit.reset_at - time.time())))
    resp = error(429, "rate_limited", f"rate limit exceeded ({limit.limit}); retry in {retry_after} s",
                 retry_after_s=retry_after)
    resp.headers["Retry-After"] = str(retry_after)
    return resp


def install_auth(app: Flask, pool_of: Callable[[], ConnectionPool], rate_limit: str) -> Limiter:
    """Install the rate limiter, then token checks, as before-request hooks (after the Host check).

    `pool_of` returns the PostgreSQL pool holding `api_tokens`. Order matters: the limiter counts
    every request, refused ones included, before the token check may refuse it.
    """
    limiter = Limiter(
        key_func=lambda: _rate_key(pool_of),
        app=app,
        application_limits=[rate_limit],  # one budget per token across every route
        storage_uri="memory://",
        strategy="sliding-window-counter",
        headers_enabled=False,  # it would put Retry-After on every answer; 429s set their own
        on_breach=_too_many,
        key_prefix="tally-api",
    )
    limiter.request_filter(_is_probe)
    app.register_error_handler(RateLimitExceeded, lambda exc: exc.get_response())
    app.before_request(lambda: _enforce(pool_of))
    app.extensions["tally_token_pool"] = pool_of
    app.register_blueprint(tokens_bp)
    return limiter


# The token admin API: admin only (analysts and customers get 403; nobody can write without admin).
tokens_bp = Blueprint("tokens", __name__)


def _pool() -> ConnectionPool:
    pool_of: Callable[[], ConnectionPool] = current_app.extensions["tally_token_pool"]
    return pool_of()


def _no_store(resp: Response) -> Response:
    resp.headers["Cache-Control"] = "no-store"  # the answer may carry a token
    return resp


@tokens_bp.post("/api/v1/tokens")
@allow("admin")
def create_token() -> Response:
    """Body {"role": ..., "domains": [...], "name": ...}; answers 201 with the token, shown only this once.
    ---
    post:
      summary: Create a token (admin)
      tags: [tokens]
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: '#/components/schemas/TokenRequest'}
      responses:
        201:
          description: the new token; its secret is shown only in this answer
          content:
            application/json:
              schema: {$ref: '#/components/schemas/CreatedToken'}
    """
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or set(body) - {"role", "domains", "name"}:
        return error(400, "invalid_body", 'send a JSON object {"role": "customer", "domains": ["example.com"], '
                     '"name": "..."}')
    domains = body.get("domains") or []
    if not isinstance(domains, list):
        return error(400, "invalid_token_request", "domains must be a list of domain names")
    try:
        role, names, name = tokens.validate(body.get("role"), domains, body.get("name") or "")
        info, token = tokens.create(_pool(), role, names, name)
    except tokens.TokenError as exc:
        return error(400, "invalid_token_request", str(exc))
    return _no_store(json_response({**info.as_json(), "token": token}, 201))


@tokens_bp.get("/api/v1/tokens")
@allow("admin")
def list_tokens() -> Response:
    """Every token, without secrets.
    ---
    get:
      summary: List tokens (admin)
      tags: [tokens]
      responses:
        200:
          description: every token, oldest first
          content:
            application/json:
              schema: {$ref: '#/components/schemas/TokenList'}
    """
    rows = tokens.list_tokens(_pool())
    return _no_store(json_response({"tokens": [row.as_json() for row in rows]}))


@tokens_bp.delete("/api/v1/tokens/<token_id>")
@allow("admin")
def revoke_token(token_id: str) -> Response:
    """Revoke a token at once.
    ---
    delete:
      summary: Revoke a token (admin)
      tags: [tokens]
      parameters:
        - {name: token_id, in: path, required: true, schema: {type: string, pattern: '^tok_[0-9a-f]{10}$'}}
      responses:
        204:
          description: revoked (idempotent)
        404:
          description: no such token
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
    """
    found = tokens.revoke(_pool(), token_id)
    if not found:
        return error(404, "unknown_token", f"no token {token_id[:40]!r}")
    return Response(status=204)
