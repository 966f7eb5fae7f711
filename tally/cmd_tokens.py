"""`tally tokens create|list|revoke`: admin commands against PostgreSQL (TALLY_PG_DSN or a running `tally up`).

Also the admin token `tally up` keeps in `$TALLY_HOME/admin-token` (`ensure_admin_token_file`).
Exit codes: 0 done, 1 unknown token or PostgreSQL unreachable, 2 bad input (the message names it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from core.config import Settings
from oltp import tokens
from tally.roots import ADMIN_TOKEN_FILE, require_pg

if TYPE_CHECKING:
    from tally.cli_support import SubParsers

log = logging.getLogger(__name__)

ADMIN_TOKEN_NAME = "admin (tally up)"


def register(sub: SubParsers) -> None:
    """Add this group's subparsers; each sets `func=handler(settings, args) -> exit code`."""
    group = sub.add_parser("tokens", help="create, list and revoke API tokens (admin)",
                           description="API tokens. Roles: admin (everything), analyst (read every domain, "
                           "analyst SQL), customer (read only its --domain names).")
    cmds = group.add_subparsers(dest="tokens_command", required=True, metavar="SUBCOMMAND")
    create = cmds.add_parser("create", help="create a token; prints it once, on the last line")
    create.add_argument("--role", required=True, help="admin, analyst or customer")
    create.add_argument("--domain", action="append", default=[], dest="domains", metavar="DOMAIN",
                        help="a domain a customer token may read (repeat for several)")
    create.add_argument("--name", default="", help="a label for lists, e.g. who holds it")
    create.add_argument("--json", action="store_true", help="print one JSON object instead")
    create.set_defaults(func=cmd_create)
    lister = cmds.add_parser("list", help="list tokens (never their secrets)")
    lister.add_argument("--json", action="store_true", help="print a JSON array")
    lister.set_defaults(func=cmd_list)
    revoke = cmds.add_parser("revoke", help="revoke a token at once")
    revoke.add_argument("token_id", metavar="ID", help="the token's id, e.g. tok_0123456789")
    revoke.add_argument("--json", action="store_true", help="print one JSON object")
    revoke.set_defaults(func=cmd_revoke)


def _connect(settings: Settings) -> psycopg.Connection:
    from oltp.schema import ensure_schema

    dsn = require_pg(settings)
    ensure_schema(dsn)
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def _fail(message: str, code: int) -> int:
    print(f"tally tokens: {message}", file=sys.stderr)
    return code


def _store_down(exc: psycopg.Error) -> int:
    # The DSN may carry a password: name the problem, never the DSN.
    return _fail(f"cannot reach PostgreSQL ({type(exc).__name__}); is `tally up` running, or TALLY_PG_DSN set?", 1)


def cmd_create(settings: Settings, args: argparse.Namespace) -> int:
    try:
        tokens.validate(args.role, args.domains, args.name)  # bad input fails before any connection
    except tokens.TokenError as exc:
        return _fail(str(exc), 2)
    try:
        with _connect(settings) as conn:
            info, token = tokens.create(conn, args.role, args.domains, args.name)
    except psycopg.OperationalError as exc:
        return _store_down(exc)
    if args.json:
        print(json.dumps({"id": info.id, "role": info.role, "domains": list(info.domains), "name": info.name,
                          "token": token}))
        return 0
    scope = ", ".join(info.domains) if info.domains else "every domain"
    print(f"created {info.id} ({info.role}; reads {scope}). It is shown only this once; store it now:")
    print(token)
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    try:
        with _connect(settings) as conn:
            rows = tokens.list_tokens(conn)
    except psycopg.OperationalError as exc:
        return _store_down(exc)
    if args.json:
        print(json.dumps([row.as_json() for row in rows]))
        return 0
    print(f"{'id':<15} {'role':<9} {'status':<8} {'created (UTC)':<17} {'name':<20} domains")
    for row in rows:
        status = "revoked" if row.revoked_at else "active"
        created = row.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
        print(f"{row.id:<15} {row.role:<9} {status:<8} {created:<17} {row.name[:20]:<20} {','.join(row.domains)}")
    return 0


def cmd_revoke(settings: Settings, args: argparse.Namespace) -> int:
    """Revoke a token; one revoked before stays as it was, and the output says since when (exit 0)."""
    if not tokens.is_token_id(args.token_id):
        return _fail(f"{args.token_id[:40]!r} is not a token id (they look like tok_0123456789)", 2)
    try:
        with _connect(settings) as conn:
            revoked = tokens.revoke_once(conn, args.token_id)
    except psycopg.OperationalError as exc:
        return _store_down(exc)
    if revoked is None:
        return _fail(f"no token {args.token_id}", 1)
    after, already = revoked  # `already` as the UPDATE found it: of two revokes at once, one revoked it
    revoked_at = after.revoked_at
    assert revoked_at is not None, "revoke_once returns the row revoked"
    since = revoked_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if args.json:
        print(json.dumps({"id": after.id, "revoked_at": revoked_at.isoformat(), "already_revoked": already}))
    elif already:
        print(f"{args.token_id} was already revoked (at {since}); nothing changed")
    else:
        print(f"revoked {args.token_id}")
    return 0


def write_secret_file(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, readable by its owner only (0600) from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def ensure_admin_token_file(dsn: str, home: Path) -> tuple[str, bool]:
    """The admin token `tally up` keeps in `home/admin-token` (0600): (token, True if newly minted).

    An existing file is reused when its token is usable (its row is re-inserted from the hash if the
    PostgreSQL data was wiped); a missing, malformed or revoked one is replaced by a new admin token.
    """
    path = home / ADMIN_TOKEN_FILE
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        try:
            current = path.read_text().strip()
        except FileNotFoundError:
            current = ""
        if current:
            status = tokens.adopt(conn, current, "admin", ADMIN_TOKEN_NAME)
            if status != "unusable":
                if status == "restored":
                    log.warning("admin token %s was missing from PostgreSQL; restored it from %s",
                                tokens.parse(current)[0], path)  # type: ignore[index]
                if path.stat().st_mode & 0o077:
                    os.chmod(path, 0o600)
                return current, False
            log.warning("the admin token in %s is revoked or unknown here; minting a new one", path)
        _info, token = tokens.create(conn, "admin", (), ADMIN_TOKEN_NAME)
    write_secret_file(path, token + "\n")
    return token, True
