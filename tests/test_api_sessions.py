"""Dashboard sessions live in PostgreSQL (api/session.py, migration 0007): logout and revocation end them
on the server, so a copied cookie stops working in every API process; logout refuses cross-site posts;
an ended session gets 401 on every /api/ path, routes that do not exist included; expired sessions are
pruned. Real API apps (`build_api`) on the session's real PostgreSQL."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from oltp import prune, tokens
from tally.roots import build_api

pytestmark = pytest.mark.servers("postgres")

SUMMARY = "/api/v1/domains/{d}/summary?last=1h"


@pytest.fixture()
def make_app(make_settings):
    """Real API apps (each its own pool, like separate API processes), closed afterwards."""
    apps = []

    def build():
        app = build_api(make_settings())
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["tally_backends"].rollups.pool.close()


def login(app, token: str, **headers: str):
    """A browser (test client) logged in with `token`; returns (client, cookie value)."""
    client = app.test_client()
    resp = client.post("/login", data={"token": token}, headers=headers)
    assert resp.status_code == 303, resp.data
    return client, client.get_cookie("tally_session").value


def copied(app, cookie: str):
    """Another client holding a copy of the cookie (as an attacker who copied it would)."""
    thief = app.test_client()
    thief.set_cookie("tally_session", cookie)
    return thief


def sid_of(app, cookie: str) -> str:
    return app.session_interface.get_signing_serializer(app).loads(cookie)["sid"]


def test_logout_ends_a_copied_cookie_in_every_api_process(make_app, conn, domain):
    first, second = make_app(), make_app()  # two API processes on one PostgreSQL
    _, token = tokens.create(conn, "customer", [domain])
    browser, cookie = login(first, token, Origin="http://localhost")
    thief = copied(second, cookie)
    assert thief.get(SUMMARY.format(d=domain)).status_code == 200  # the copy works while the session lives
    out = browser.post("/logout", headers={"Origin": "http://localhost"})
    assert out.status_code == 303 and out.headers["Location"] == "/login"
    assert browser.get_cookie("tally_session") is None
    gone = thief.get(SUMMARY.format(d=domain))
    assert gone.status_code == 401 and gone.json["error"]["code"] == "invalid_session"
    assert copied(first, cookie).get(f"/api/v1/domains/{domain}/impressions").status_code == 401
    assert b'action="/login"' in thief.get("/").data  # the page shows the login form again
    # the token itself still works: logout ends the session, not the token
    assert second.test_client().get(SUMMARY.format(d=domain),
                                    headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "null"}])
def test_logout_from_another_site_is_refused_and_the_session_goes_on(make_app, conn, domain, headers):
    app = make_app()
    _, token = tokens.create(conn, "customer", [domain])
    browser, cookie = login(app, token)
    resp = browser.post("/logout", headers=headers)
    assert resp.status_code == 403 and b"this site" in resp.data
    assert browser.get(SUMMARY.format(d=domain)).status_code == 200
    assert copied(app, cookie).get(SUMMARY.format(d=domain)).status_code == 200


def test_logout_without_a_session_and_during_an_outage(make_app, conn, domain):
    app = make_app()
    assert app.test_client().post("/logout").status_code == 303  # nothing to end: still a clean redirect
    _, token = tokens.create(conn, "customer", [domain])
    browser, cookie = login(app, token)
    app.extensions["tally_backends"].rollups.pool.close()  # PostgreSQL unreachable from here on
    resp = browser.post("/logout")
    assert resp.status_code == 503 and b"not ended" in resp.data
    assert browser.get_cookie("tally_session").value == cookie  # kept, so that a retry can end it
    other = make_app()
    assert copied(other, cookie).get(SUMMARY.format(d=domain)).status_code == 200  # not ended: told so


@pytest.mark.parametrize("path", ["/api/v1/no-such-route", "/api/v1/domains/x.test/summary/extra", "/api/v2/x",
                                  "/api/v1/tokens/tok_0123456789/extra"])
def test_unknown_api_paths_are_401_before_404(make_app, conn, domain, path):
    app = make_app()
    anonymous = app.test_client().get(path)
    assert anonymous.status_code == 401 and anonymous.json["error"]["code"] == "missing_token"
    _, token = tokens.create(conn, "customer", [domain])
    browser, cookie = login(app, token)
    assert browser.get(path).status_code == 404  # a live session learns it does not exist
    browser.post("/logout")
    ended = copied(app, cookie).get(path)
    assert ended.status_code == 401 and ended.json["error"]["code"] == "invalid_session"
    wrong_method = app.test_client().put("/api/v1/domains")
    assert wrong_method.status_code == 401
    assert app.test_client().get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 404
    assert app.test_client().get("/no-such-page").status_code == 404  # outside /api/: plain 404


def test_postgresql_holds_only_the_hash_of_the_session_id(make_app, conn, domain, caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app()
    info, token = tokens.create(conn, "customer", [domain])
    browser, cookie = login(app, token)
    sid = sid_of(app, cookie)
    rows = conn.execute("SELECT id_sha256, token_id, expires_at - created_at, row_to_json(s)::text"
                        " FROM dashboard_sessions s WHERE token_id = %s", (info.id,)).fetchall()
    assert len(rows) == 1
    digest, token_id, ttl, as_text = rows[0]
    assert bytes(digest) == hashlib.sha256(sid.encode()).digest() and token_id == info.id
    assert timedelta(hours=7, minutes=59) < ttl <= timedelta(hours=8)
    assert sid not in as_text and sid.encode() not in bytes(digest)
    browser.get(SUMMARY.format(d=domain))
    browser.post("/logout")
    assert all(sid not in r.getMessage() and cookie not in r.getMessage() for r in caplog.records)


def test_logging_in_again_replaces_the_old_session(make_app, conn, domain):
    app = make_app()
    info, token = tokens.create(conn, "customer", [domain])
    browser, old = login(app, token)
    assert browser.post("/login", data={"token": token}).status_code == 303
    new = browser.get_cookie("tally_session").value
    assert sid_of(app, new) != sid_of(app, old)
    assert copied(app, old).get(SUMMARY.format(d=domain)).status_code == 401  # no session fixation
    assert copied(app, new).get(SUMMARY.format(d=domain)).status_code == 200
    assert conn.execute("SELECT count(*) FROM dashboard_sessions WHERE token_id = %s", (info.id,)).fetchone()[0] == 1


def test_revoking_the_token_deletes_its_sessions(make_app, conn, domain):
    app = make_app()
    info, token = tokens.create(conn, "customer", [domain])
    _, cookie = login(app, token)
    _, cookie2 = login(app, token)
    assert copied(app, cookie).get(SUMMARY.format(d=domain)).status_code == 200
    tokens.revoke(conn, info.id)
    assert copied(app, cookie).get(SUMMARY.format(d=domain)).status_code == 401
    assert copied(app, cookie2).get(SUMMARY.format(d=domain)).status_code == 401
    assert conn.execute("SELECT count(*) FROM dashboard_sessions WHERE token_id = %s", (info.id,)).fetchone()[0] == 0


def test_expired_sessions_are_refused_and_pruned_by_the_retention_pass(make_app, conn, servers, domain):
    app = make_app()
    info, token = tokens.create(conn, "customer", [domain])
    revoked_info, revoked_token = tokens.create(conn, "customer", [domain])
    _, expired = login(app, token)
    _, live = login(app, token)
    _, of_revoked = login(app, revoked_token)
    conn.execute("UPDATE dashboard_sessions SET expires_at = now() - interval '1 second' WHERE id_sha256 = %s",
                 (hashlib.sha256(sid_of(app, expired).encode()).digest(),))
    assert copied(app, expired).get(SUMMARY.format(d=domain)).status_code == 401
    # a revocation that did not go through tokens.revoke (e.g. by hand in SQL) leaves rows behind
    conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE id = %s", (revoked_info.id,))
    assert copied(app, of_revoked).get(SUMMARY.format(d=domain)).status_code == 401
    with psycopg.connect(servers.pg_dsn) as c:
        prune.prune_status(c, 0, datetime.now(UTC))  # the retention pass (rollup worker, `tally retention`)
    left = {bytes(r[0]) for r in conn.execute("SELECT id_sha256 FROM dashboard_sessions WHERE token_id IN (%s, %s)",
                                                (info.id, revoked_info.id))}
    assert left == {hashlib.sha256(sid_of(app, live).encode()).digest()}
    assert copied(app, live).get(SUMMARY.format(d=domain)).status_code == 200
    with psycopg.connect(servers.pg_dsn) as c:  # a dry run deletes nothing
        conn.execute("UPDATE dashboard_sessions SET expires_at = now() - interval '1 second' WHERE token_id = %s",
                     (info.id,))
        prune.prune_status(c, 0, datetime.now(UTC), dry_run=True)
        assert prune.prune_sessions(c, datetime.now(UTC)) == 1
