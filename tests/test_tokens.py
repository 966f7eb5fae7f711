"""API tokens against the real PostgreSQL: the store (oltp/tokens.py), `tally tokens ...` as a user runs
it (subprocesses), and the admin-token file `tally up` keeps."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys

import psycopg
import pytest

from oltp import tokens
from tally.cmd_tokens import ensure_admin_token_file
from tests.cli_inproc import run_tally


def test_create_stores_only_a_hash_and_verify_gives_the_principal(conn, domain):
    info, token = tokens.create(conn, "customer", [f"  {domain.upper()}. ", domain, "other.example.org"], "acme")
    assert info.role == "customer" and info.domains == (domain, "other.example.org") and info.name == "acme"
    token_id, secret = tokens.parse(token)
    assert token_id == info.id and token.startswith(f"tly_{info.id}_")
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32  # 256 random bits
    row = conn.execute("SELECT secret_sha256, row_to_json(api_tokens)::text FROM api_tokens WHERE id = %s",
                       (info.id,)).fetchone()
    assert bytes(row[0]) == hashlib.sha256(secret.encode()).digest()
    assert secret not in row[1]  # the plaintext is nowhere in the row
    principal = tokens.verify(conn, token)
    assert principal == tokens.Principal(info.id, "customer", (domain, "other.example.org"))
    assert principal.can_read(domain) and not principal.can_read("example.net")
    assert not principal.may_query_sql and not principal.is_admin


def test_roles_helpers(conn):
    _, admin = tokens.create(conn, "admin")
    _, analyst = tokens.create(conn, "analyst")
    a, b = tokens.verify(conn, admin), tokens.verify(conn, analyst)
    assert a.is_admin and a.may_query_sql and a.can_read("anything.example")
    assert not b.is_admin and b.may_query_sql and b.can_read("anything.example")


def test_list_has_no_secrets_and_revoke_is_immediate_and_idempotent(conn, domain):
    info, token = tokens.create(conn, "customer", [domain])
    listed = {t.id: t for t in tokens.list_tokens(conn)}
    assert listed[info.id].domains == (domain,) and listed[info.id].revoked_at is None
    assert token.split("_", 3)[3] not in json.dumps([t.as_json() for t in listed.values()])
    assert tokens.revoke(conn, info.id) is True
    assert tokens.verify(conn, token) is None
    first = tokens.get(conn, info.id).revoked_at
    assert first is not None
    assert tokens.revoke(conn, info.id) is True and tokens.get(conn, info.id).revoked_at == first
    assert tokens.revoke(conn, "tok_ffffffffff") is False
    assert tokens.revoke(conn, "'; DROP TABLE api_tokens; --") is False
    assert info.id not in {t.id for t in tokens.list_tokens(conn, include_revoked=False)}


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),   # wrong secret, same id
    lambda t: t[:-1],                                    # too short
    lambda t: t + "A",                                   # too long
    lambda t: t.replace("tly_", "tlx_", 1),
    lambda t: "tly_tok_ffffffffff_" + t.split("_", 3)[3],  # unknown id, a real secret
    lambda t: "",
    lambda t: " " + t,
])
def test_verify_refuses_anything_but_the_exact_token(conn, mangle):
    _, token = tokens.create(conn, "analyst")
    assert tokens.verify(conn, mangle(token)) is None
    assert tokens.verify(conn, token) is not None


def test_verify_compares_digests_in_constant_time(conn, monkeypatch):
    """The secret is checked with hmac.compare_digest on SHA-256 digests, never with ==."""
    calls = []
    real = tokens.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    _, token = tokens.create(conn, "analyst")
    assert tokens.verify(conn, token) is not None
    assert tokens.verify(conn, token[:-1] + ("x" if token[-1] != "x" else "y")) is None
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)


@pytest.mark.parametrize("role, domains, words", [
    ("root", [], "role must be one of"),
    ("", [], "role must be one of"),
    ("customer", [], "at least one domain"),
    ("customer", ["not a domain"], "not a valid host name"),
    ("customer", ["example.com/path"], "not a valid host name"),
    ("analyst", ["example.com"], "only customer tokens list domains"),
    ("admin", ["example.com"], "only customer tokens list domains"),
])
def test_bad_requests_are_refused_and_store_nothing(conn, role, domains, words):
    before = conn.execute("SELECT count(*) FROM api_tokens").fetchone()[0]
    with pytest.raises(tokens.TokenError, match=words):
        tokens.create(conn, role, domains)
    assert conn.execute("SELECT count(*) FROM api_tokens").fetchone()[0] == before


def test_the_schema_refuses_inconsistent_rows_too(conn):
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO api_tokens (id, role, domains, secret_sha256) "
                     "VALUES ('tok_0000000001', 'customer', '{}', %s)", (b"x" * 32,))


# --- the admin-token file `tally up` keeps -------------------------------------------------------

def test_admin_token_file_is_created_0600_then_reused(servers, conn, tmp_path):
    token, created = ensure_admin_token_file(servers.pg_dsn, tmp_path)
    path = tmp_path / "admin-token"
    assert created and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tokens.verify(conn, token).is_admin
    assert ensure_admin_token_file(servers.pg_dsn, tmp_path) == (token, False)


def test_admin_token_is_restored_after_a_wipe_and_replaced_after_a_revoke(servers, conn, tmp_path):
    token, _ = ensure_admin_token_file(servers.pg_dsn, tmp_path)
    token_id, _secret = tokens.parse(token)
    conn.execute("DELETE FROM api_tokens WHERE id = %s", (token_id,))  # PostgreSQL data wiped
    assert ensure_admin_token_file(servers.pg_dsn, tmp_path) == (token, False)
    assert tokens.verify(conn, token).is_admin

    tokens.revoke(conn, token_id)
    new, created = ensure_admin_token_file(servers.pg_dsn, tmp_path)
    assert created and new != token and (tmp_path / "admin-token").read_text().strip() == new
    assert tokens.verify(conn, new).is_admin and tokens.verify(conn, token) is None
    assert stat.S_IMODE((tmp_path / "admin-token").stat().st_mode) == 0o600


def test_admin_token_file_with_garbage_or_a_foreign_secret_is_replaced(servers, conn, tmp_path):
    path = tmp_path / "admin-token"
    path.write_text("not a token\n")
    new, created = ensure_admin_token_file(servers.pg_dsn, tmp_path)
    assert created and tokens.verify(conn, new).is_admin
    # Same id, another secret (a file from another installation): not adopted, replaced.
    token_id, _ = tokens.parse(new)
    path.write_text(f"tly_{token_id}_{'A' * 43}\n")
    newer, created = ensure_admin_token_file(servers.pg_dsn, tmp_path)
    assert created and newer != new
    # A customer token in the file is not an admin token.
    _, customer = tokens.create(conn, "customer", ["example.com"])
    path.write_text(customer)
    assert ensure_admin_token_file(servers.pg_dsn, tmp_path)[1] is True


# --- `tally tokens ...` as a second terminal would run it ---------------------------

def tally(servers, tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`tally tokens *args` in this process (tests/cli_inproc.py); the two tests below that read what a new
    process finds (no DSN: a running stack's; the admin token file) use subprocess.run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn)
    return run_tally(["tokens", *args], env)


def test_cli_create_list_revoke(servers, conn, tmp_path, domain):
    out = tally(servers, tmp_path, "create", "--role", "customer", "--domain", domain, "--domain",
                "Second.Example.org", "--name", "acme reporting")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip().splitlines()[-1]  # the token alone on the last line
    principal = tokens.verify(conn, token)
    assert principal.role == "customer" and principal.domains == (domain, "second.example.org")
    assert "shown only this once" in out.stdout

    listed = tally(servers, tmp_path, "list")
    assert listed.returncode == 0 and principal.token_id in listed.stdout and domain in listed.stdout
    assert token.split("_", 3)[3] not in listed.stdout

    as_json = tally(servers, tmp_path, "list", "--json")
    rows = {row["id"]: row for row in json.loads(as_json.stdout)}
    assert rows[principal.token_id]["name"] == "acme reporting" and rows[principal.token_id]["revoked_at"] is None
    assert "token" not in rows[principal.token_id] and "secret_sha256" not in rows[principal.token_id]

    revoked = tally(servers, tmp_path, "revoke", principal.token_id)
    assert revoked.returncode == 0 and principal.token_id in revoked.stdout
    assert tokens.verify(conn, token) is None
    rows = {row["id"]: row for row in json.loads(tally(servers, tmp_path, "list", "--json").stdout)}
    assert rows[principal.token_id]["revoked_at"] is not None


def test_cli_create_json(servers, conn, tmp_path):
    out = tally(servers, tmp_path, "create", "--role", "analyst", "--json", "--name", "ana")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert set(body) == {"id", "role", "domains", "name", "token"}
    assert body["role"] == "analyst" and body["domains"] == [] and body["name"] == "ana"
    assert tokens.verify(conn, body["token"]).token_id == body["id"]


@pytest.mark.parametrize("args, code, words", [
    (("create", "--role", "root"), 2, "role must be one of"),
    (("create", "--role", "customer"), 2, "at least one domain"),
    (("create", "--role", "customer", "--domain", "bad domain"), 2, "not a valid host name"),
    (("create", "--role", "analyst", "--domain", "example.com"), 2, "only customer tokens"),
    (("create",), 2, "--role"),
    (("revoke", "tok_ffffffffff"), 1, "no token tok_ffffffffff"),
    (("revoke", "nonsense"), 2, "not a token id"),
])
def test_cli_refusals_name_the_problem(servers, tmp_path, args, code, words):
    out = tally(servers, tmp_path, *args)
    assert out.returncode == code, out.stdout + out.stderr
    assert words in out.stderr
    assert "tly_" not in out.stdout


def test_cli_without_postgres_says_how_to_get_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path / "nohome"))
    out = subprocess.run([sys.executable, "-m", "tally.cli", "tokens", "list"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "TALLY_PG_DSN" in out.stderr and "tally up" in out.stderr


def test_cli_finds_the_running_platform_through_its_run_state(servers, conn, tmp_path):
    """A second terminal with only TALLY_HOME: the DSN comes from $TALLY_HOME/run/stack.json."""
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    (home / "run" / "stack.json").write_text(json.dumps({"pg_dsn": servers.pg_dsn}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "tally.cli", "tokens", "create", "--role", "admin", "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert tokens.verify(conn, json.loads(out.stdout)["token"]).is_admin
