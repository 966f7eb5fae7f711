"""Who may call what, through the real API app (`build_api(settings).test_client()`) and real PostgreSQL:
401 without a valid token, 403 without the right, 429 over the per-token limit, 400 for an unknown Host."""

from __future__ import annotations

import pytest

from oltp import tokens
from tally.roots import build_api
from tests.conftest import registered


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def make_api(make_settings):
    apps = []

    def build(**env: str):
        app = build_api(make_settings(**env))
        apps.append(app)
        return app.test_client()

    yield build
    for app in apps:
        app.extensions["tally_backends"].rollups.pool.close()


@pytest.fixture()
def api(make_api):
    return make_api()


@pytest.fixture()
def keys(conn, servers, domain):
    """One token of each role; the customer reads `domain` only. The domains read here are registered sites
    (any other is 404 `unknown_domain`, ADR 48)."""
    for name in (domain, "example.com", "anyone.example.com"):
        registered(servers.pg_dsn, name)
    return {role: tokens.create(conn, role, [domain] if role == "customer" else [])[1]
            for role in ("admin", "analyst", "customer")}


PROTECTED = [
    ("GET", "/api/v1/domains/example.com/impressions", None),
    ("POST", "/api/v1/sql", {"sql": "SELECT 1"}),
    ("GET", "/api/v1/tokens", None),
    ("POST", "/api/v1/tokens", {"role": "analyst"}),
    ("DELETE", "/api/v1/tokens/tok_0123456789", None),
]


@pytest.mark.parametrize("method, path, body", PROTECTED)
def test_no_token_is_401_with_a_bearer_challenge(api, method, path, body):
    resp = api.open(path, method=method, json=body)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="tally"'  # no error code: nothing was sent
    assert resp.json["error"]["code"] == "missing_token" and "Bearer" in resp.json["error"]["message"]


@pytest.mark.parametrize("header", [
    "Basic dXNlcjpwYXNz", "bearer {t}", "BEARER {t}", "Bearer  {t}", "Bearer {t} ", " Bearer {t}", "Bearer",
    "Bearer ", "Bearer {t} {t}", "Token {t}", "Bearer {t},Bearer {t}", "Bearer t\u00e9st",
])
def test_malformed_authorization_is_401(api, keys, header):
    resp = api.get("/api/v1/domains/example.com/impressions",
                   headers={"Authorization": header.format(t=keys["admin"])})
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="tally", error="invalid_request"'
    assert resp.json["error"]["code"] == "malformed_authorization"


@pytest.mark.parametrize("token", [
    "abc", "tly_tok_ffffffffff_" + "A" * 43, "tly_tok_0123456789", "{t}x", "{t_minus_one}",
])
def test_unknown_or_mangled_token_is_401_invalid_token(api, keys, token):
    admin = keys["admin"]
    token = token.format(t=admin, t_minus_one=admin[:-1] + ("B" if admin[-1] != "B" else "C"))
    resp = api.post("/api/v1/sql", json={"sql": "SELECT 1"}, headers=bearer(token))
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="tally", error="invalid_token"'
    assert resp.json["error"]["code"] == "invalid_token"


def test_a_revoked_token_is_refused_at_once(api, conn):
    info, token = tokens.create(conn, "analyst")
    assert api.post("/api/v1/sql", json={"sql": "SELECT 1"}, headers=bearer(token)).status_code == 200
    tokens.revoke(conn, info.id)
    resp = api.post("/api/v1/sql", json={"sql": "SELECT 1"}, headers=bearer(token))
    assert resp.status_code == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


def test_the_token_is_checked_in_constant_time(api, keys, monkeypatch):
    calls = []
    real = tokens.hmac.compare_digest
    monkeypatch.setattr(tokens.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert api.get("/api/v1/tokens", headers=bearer(keys["admin"])).status_code == 200
    assert calls and all(len(a) == len(b) == 32 for a, b in calls)


def test_a_token_in_the_query_string_is_not_accepted(api, keys):
    resp = api.get("/api/v1/domains/example.com/impressions", query_string={"access_token": keys["admin"]})
    assert resp.status_code == 401


def test_public_routes_need_no_token(api):
    assert api.get("/healthz").status_code == 200
    page = api.get("/")
    assert page.status_code == 200 and b"<svg" in page.data


# --- 403: a valid token without the right --------------------------------------------------------

def test_customer_reads_only_its_domains(api, keys, domain):
    headers = bearer(keys["customer"])
    assert api.get(f"/api/v1/domains/{domain}/impressions", headers=headers).status_code == 200
    assert api.get(f"/api/v1/domains/{domain.upper()}./pageviews", headers=headers).status_code == 200
    for other in ("other.com", f"sub.{domain}", domain.split(".", 1)[1]):
        resp = api.get(f"/api/v1/domains/{other}/impressions", headers=headers)
        assert resp.status_code == 403, other
        assert resp.json["error"]["code"] == "forbidden_domain" and other in resp.json["error"]["message"]
        assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    bad = api.get("/api/v1/domains/not_a_domain/impressions", headers=headers)
    assert bad.status_code == 400 and bad.json["error"]["code"] == "invalid_domain"


def test_customer_may_not_run_analyst_sql_or_touch_tokens(api, keys):
    headers = bearer(keys["customer"])
    for method, path, body in PROTECTED[1:]:
        resp = api.open(path, method=method, json=body, headers=headers)
        assert resp.status_code == 403, path
        assert resp.json["error"]["code"] == "forbidden"


def test_analyst_reads_everything_but_writes_nothing(api, keys, conn):
    headers = bearer(keys["analyst"])
    assert api.get("/api/v1/domains/anyone.example.com/impressions", headers=headers).status_code == 200
    assert api.post("/api/v1/sql", json={"sql": "SELECT 1"}, headers=headers).json["rows"] == [[1]]
    victim, _ = tokens.create(conn, "customer", ["victim.example.com"])
    before = len(tokens.list_tokens(conn))
    for method, path, body in [("POST", "/api/v1/tokens", {"role": "admin"}), ("GET", "/api/v1/tokens", None),
                               ("DELETE", f"/api/v1/tokens/{victim.id}", None)]:
        resp = api.open(path, method=method, json=body, headers=headers)
        assert resp.status_code == 403 and resp.json["error"]["code"] == "forbidden", path
    assert len(tokens.list_tokens(conn)) == before and tokens.get(conn, victim.id).revoked_at is None


# --- the admin API ------------------------------------------------------------------------------

def test_admin_creates_lists_and_revokes_tokens(api, keys, domain):
    headers = bearer(keys["admin"])
    resp = api.post("/api/v1/tokens", json={"role": "customer", "domains": [domain.upper()], "name": "acme"},
                    headers=headers)
    assert resp.status_code == 201 and resp.headers["Cache-Control"] == "no-store"
    created = resp.json
    assert created["role"] == "customer" and created["domains"] == [domain] and created["name"] == "acme"
    new = created["token"]
    assert api.get(f"/api/v1/domains/{domain}/impressions", headers=bearer(new)).status_code == 200

    listed = api.get("/api/v1/tokens", headers=headers)
    assert listed.status_code == 200
    row = {t["id"]: t for t in listed.json["tokens"]}[created["id"]]
    assert "token" not in row and new.split("_", 3)[3] not in listed.get_data(as_text=True)

    assert api.delete(f"/api/v1/tokens/{created['id']}", headers=headers).status_code == 204
    assert api.get(f"/api/v1/domains/{domain}/impressions", headers=bearer(new)).status_code == 401
    gone = api.delete("/api/v1/tokens/tok_ffffffffff", headers=headers)
    assert gone.status_code == 404 and gone.json["error"]["code"] == "unknown_token"


@pytest.mark.parametrize("body, code", [
    ({"role": "root"}, "invalid_token_request"),
    ({"role": "customer"}, "invalid_token_request"),
    ({"role": "customer", "domains": "example.com"}, "invalid_token_request"),
    ({"role": "customer", "domains": ["bad domain"]}, "invalid_token_request"),
    ({"role": "analyst", "domains": ["example.com"]}, "invalid_token_request"),
    ({"role": "analyst", "secret": "mine"}, "invalid_body"),
    (["analyst"], "invalid_body"),
])
def test_admin_bad_create_requests_are_400_and_store_nothing(api, keys, conn, body, code):
    before = len(tokens.list_tokens(conn))
    resp = api.post("/api/v1/tokens", json=body, headers=bearer(keys["admin"]))
    assert resp.status_code == 400 and resp.json["error"]["code"] == code
    assert len(tokens.list_tokens(conn)) == before


# --- 429 and the Host check ------------------------------------------------------------------------

def test_rate_limit_is_per_token_with_retry_after(make_api, keys):
    api = make_api(TALLY_API_RATE_LIMIT="3/minute")
    a, b = bearer(keys["analyst"]), bearer(keys["admin"])
    for _ in range(3):
        assert api.get("/api/v1/domains/example.com/impressions", headers=a).status_code == 200
    resp = api.post("/api/v1/sql", json={"sql": "SELECT 1"}, headers=a)  # one budget across routes
    assert resp.status_code == 429 and resp.json["error"]["code"] == "rate_limited"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert api.get("/api/v1/domains/example.com/impressions", headers=b).status_code == 200  # another token
    for _ in range(5):
        assert api.get("/healthz").status_code == 200  # probes are exempt


def test_requests_without_a_valid_token_are_limited_by_address(make_api, keys):
    api = make_api(TALLY_API_RATE_LIMIT="3/minute")
    for _ in range(3):
        assert api.get("/api/v1/tokens", headers=bearer("tly_tok_ffffffffff_" + "A" * 43)).status_code == 401
    assert api.get("/api/v1/tokens").status_code == 429  # guessing tokens is throttled
    assert api.get("/api/v1/tokens", headers=bearer(keys["admin"])).status_code == 200  # its own budget


def test_unknown_host_is_400_even_with_a_valid_token(make_api, keys):
    api = make_api(TALLY_ALLOWED_HOSTS="localhost,tally.example.com")
    headers = {**bearer(keys["admin"]), "Host": "attacker.example"}
    resp = api.get("/api/v1/domains/example.com/impressions", headers=headers)
    assert resp.status_code == 400 and resp.json["error"]["code"] == "host_not_allowed"
    assert api.post("/api/v1/sql", json={"sql": "SELECT 1"}, headers=headers).status_code == 400
    ok = api.get("/api/v1/domains/example.com/impressions", headers={**headers, "Host": "tally.example.com:8701"})
    assert ok.status_code == 200


def test_token_store_outage_is_a_503_not_a_401(make_settings):
    import dataclasses

    from psycopg_pool import ConnectionPool

    from api.app import create_app
    from oltp.queries import RollupReader

    settings = make_settings()
    real = build_api(settings)
    dead = ConnectionPool("postgresql://postgres@127.0.0.1:1/postgres", min_size=0, max_size=1, open=True,
                          timeout=2, kwargs={"connect_timeout": 1})
    try:
        backends = dataclasses.replace(real.extensions["tally_backends"], rollups=RollupReader(dead))
        resp = create_app(settings, backends).test_client().get(
            "/api/v1/domains/example.com/impressions", headers=bearer("tly_tok_0123456789_" + "A" * 43))
        assert resp.status_code == 503 and resp.json["error"]["code"] == "store_unavailable"
    finally:
        dead.close()
        real.extensions["tally_backends"].rollups.pool.close()


def test_retry_after_never_exceeds_the_window():
    """flask-limiter rounds a window's reset up to a whole second: a 60 s window said 61 now and then."""
    import time
    from types import SimpleNamespace

    from flask import Flask
    from limits import parse

    from api.auth import _too_many

    with Flask(__name__).app_context():
        resp = _too_many(SimpleNamespace(limit=parse("3/minute"), reset_at=time.time() + 60.9))
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "60"
    assert resp.json["error"]["retry_after_s"] == 60
