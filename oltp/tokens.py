"""API tokens in PostgreSQL: roles (admin, analyst, customer scoped to domains), hashed secrets, revocation.

A token reads `tly_<id>_<secret>`: `id` is public (`tok_` + 10 hex digits, the row's key, safe to log and
to show in lists), `secret` is the base64url form of 32 random bytes (256 bits). Only the SHA-256 of
the secret is stored; the plaintext is returned once, by `create`, and never again. A plain hash (no
salt, no slow KDF) is enough because the secret is 256 random bits, not a password: there is nothing
to guess from a dictionary and nothing to precompute.

`verify` looks the row up by id only and compares digests with `hmac.compare_digest`, so the time it
takes does not depend on how much of a guessed secret is right. Every function takes a psycopg
Connection or a psycopg_pool ConnectionPool.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from core.event import EventError, normalize_domain

ROLES = ("admin", "analyst", "customer")
MAX_NAME = 200
MAX_DOMAINS = 1000

_ID_RE = re.compile(r"tok_[0-9a-f]{10}")
# 32 bytes in unpadded base64url are exactly 43 characters.
_TOKEN_RE = re.compile(r"tly_(tok_[0-9a-f]{10})_([A-Za-z0-9_-]{43})")

Source = psycopg.Connection | ConnectionPool


class TokenError(ValueError):
    """A token cannot be created as asked; the message names the problem."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for. Domains are normalised; they are empty unless role == 'customer'."""

    token_id: str
    role: str
    domains: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def may_query_sql(self) -> bool:
        """Analyst SQL reads every domain's raw events: admins and analysts only."""
        return self.role in ("admin", "analyst")

    def can_read(self, domain: str) -> bool:
        """Whether this token may read `domain` (already normalised): customers only their own domains."""
        return self.role in ("admin", "analyst") or domain in self.domains


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token's row without its secret: safe to list, log and return."""

    id: str
    name: str
    role: str
    domains: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "role": self.role, "domains": list(self.domains),
                "created_at": self.created_at.isoformat(),
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}


def validate(role: object, domains: Iterable[object] | None = None,
             name: object = "") -> tuple[str, tuple[str, ...], str]:
    """Check and normalise what `create` would store; raises TokenError naming the first problem.

    Customers need at least one domain (normalised like event domains, deduplicated, order kept);
    admins and analysts read every domain and must list none.
    """
    if role not in ROLES:
        raise TokenError(f"role must be one of {', '.join(ROLES)} (got {str(role)[:40]!r})")
    if name is None:
        name = ""
    if not isinstance(name, str):
        raise TokenError("name must be a string")
    name = name.strip()
    if len(name) > MAX_NAME or any(not ch.isprintable() for ch in name):
        raise TokenError(f"name must be at most {MAX_NAME} printable characters")
    if domains is None:
        domains = ()
    if isinstance(domains, (str, bytes)):
        raise TokenError("domains must be a list of domain names")
    normalised: list[str] = []
    for value in domains:
        try:
            normalised.append(normalize_domain(value))
        except EventError as exc:
            raise TokenError(f"domain {str(value)[:80]!r} is not a valid host name") from exc
    normalised = list(dict.fromkeys(normalised))
    if len(normalised) > MAX_DOMAINS:
        raise TokenError(f"a token lists at most {MAX_DOMAINS} domains")
    if role == "customer" and not normalised:
        raise TokenError("a customer token needs at least one domain (--domain example.com)")
    if role != "customer" and normalised:
        raise TokenError(f"an {role} token reads every domain; only customer tokens list domains")
    return role, tuple(normalised), name


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token string, else None. Says nothing about whether it is valid."""
    match = _TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
    return (match.group(1), match.group(2)) if match else None


def is_token_id(value: str) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


@contextmanager
def _connection(source: Source) -> Iterator[psycopg.Connection]:
    """A connection inside a transaction that commits on success (pool or caller's connection)."""
    if isinstance(source, ConnectionPool):
        with source.connection() as conn, conn.transaction():
            yield conn
    else:
        with source.transaction():
            yield source


_COLUMNS = "id, name, role, domains, created_at, revoked_at"


def _info(row: tuple[Any, ...]) -> TokenInfo:
    return TokenInfo(row[0], row[1], row[2], tuple(row[3]), row[4], row[5])


def create(source: Source, role: str, domains: Iterable[str] | None = None, name: str = "") -> tuple[TokenInfo, str]:
    """Store a new token; returns its info and the plaintext token, which exists nowhere else afterwards."""
    role, normalised, name = validate(role, domains, name)
    for _attempt in range(5):  # 40-bit ids: a collision is rare, retry it rather than fail
        token_id = "tok_" + secrets.token_hex(5)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
        with _connection(source) as conn:
            row = conn.execute(
                f"INSERT INTO api_tokens (id, name, role, domains, secret_sha256) VALUES (%s, %s, %s, %s, %s)"
                f" ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}",
                (token_id, name, role, list(normalised), _digest(secret))).fetchone()
        if row is not None:
            return _info(row), f"tly_{token_id}_{secret}"
    raise RuntimeError("could not find a free token id after 5 attempts")


def list_tokens(source: Source, *, include_revoked: bool = True) -> list[TokenInfo]:
    """Every token (oldest first), without secrets."""
    where = "" if include_revoked else " WHERE revoked_at IS NULL"
    with _connection(source) as conn:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM api_tokens{where} ORDER BY created_at, id").fetchall()
    return [_info(row) for row in rows]


def get(source: Source, token_id: str) -> TokenInfo | None:
    if not is_token_id(token_id):
        return None
    with _connection(source) as conn:
        row = conn.execute(f"SELECT {_COLUMNS} FROM api_tokens WHERE id = %s", (token_id,)).fetchone()
    return _info(row) if row else None


def revoke(source: Source, token_id: str) -> bool:
    """Revoke a token at once (idempotent; keeps the first revocation time), ending its dashboard sessions
    (api/session.py) in the same transaction. False if no such token."""
    if not is_token_id(token_id):
        return False
    with _connection(source) as conn:
        row = conn.execute("UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s"
                           " RETURNING id", (token_id,)).fetchone()
        conn.execute("DELETE FROM dashboard_sessions WHERE token_id = %s", (token_id,))
    return row is not None


def revoke_once(source: Source, token_id: str) -> tuple[TokenInfo, bool] | None:
    """Revoke a token as `revoke` does: (its row, whether it was revoked before), that decided by the UPDATE
    itself, so of two revokes at once only one is told it revoked the token. None if no such token."""
    if not is_token_id(token_id):
        return None
    with _connection(source) as conn:
        row = conn.execute(f"UPDATE api_tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL"
                           f" RETURNING {_COLUMNS}", (token_id,)).fetchone()
        already = row is None
        if row is None:  # revoked before, or no such token: nothing un-revokes, so a read now tells which
            row = conn.execute(f"SELECT {_COLUMNS} FROM api_tokens WHERE id = %s", (token_id,)).fetchone()
        conn.execute("DELETE FROM dashboard_sessions WHERE token_id = %s", (token_id,))
    return (_info(row), already) if row else None


def verify(source: Source, token: str) -> Principal | None:
    """The Principal of a valid, unrevoked token; None for anything else (malformed, unknown, revoked).

    Raises psycopg errors when PostgreSQL cannot be reached: an outage is not an invalid token.
    """
    parsed = parse(token)
    if parsed is None:
        return None
    token_id, secret = parsed
    with _connection(source) as conn:
        row = conn.execute("SELECT role, domains, secret_sha256, revoked_at FROM api_tokens WHERE id = %s",
                           (token_id,)).fetchone()
    if row is None:
        return None
    role, domains, stored, revoked_at = row
    if not hmac.compare_digest(bytes(stored), _digest(secret)) or revoked_at is not None:
        return None
    return Principal(token_id, role, tuple(domains))


def adopt(source: Source, token: str, role: str = "admin", name: str = "") -> str:
    """Make sure a plaintext token we hold (e.g. the admin-token file) is a valid row of `role`.

    Returns "ok" (valid as is), "restored" (its row was missing, e.g. the PostgreSQL data was wiped,
    and was inserted again from the hash), or "unusable" (malformed, revoked, of another role, or its id
    now belongs to another secret): the caller should mint a new token.
    """
    role, _domains, name = validate(role, (), name)
    parsed = parse(token)
    if parsed is None:
        return "unusable"
    token_id, secret = parsed
    with _connection(source) as conn:
        inserted = conn.execute(
            "INSERT INTO api_tokens (id, name, role, domains, secret_sha256) VALUES (%s, %s, %s, '{}', %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING id", (token_id, name, role, _digest(secret))).fetchone()
    if inserted is not None:
        return "restored"
    principal = verify(source, token)
    return "ok" if principal is not None and principal.role == role else "unusable"
