"""`tally migrate`: bring the PostgreSQL and ClickHouse schemas to this release's newest version.

Every process already does this at start-up (idempotently, ADR 18); the command is for doing it
ahead of a rollout, or checking where a database stands (`--status`). PostgreSQL: TALLY_PG_DSN or
a running `tally up`'s. ClickHouse: TALLY_CLICKHOUSE_DSN; an embedded chDB directory can only be
opened by one process (ADR 3), so while `tally up` runs on it this command leaves it alone (that
process migrated it when it started). Exit codes: 0 done, 1 a store unreachable or a migration
failed (message on stderr; the database stays at the last revision that completed), 2 configuration.

With TALLY_CLICKHOUSE_CLUSTER the ClickHouse migrations run in their cluster form (olap/cluster.py, ADR 57).
`--print-sql` prints the ClickHouse statements for the configured mode, as they would run on an empty database,
and runs nothing (it needs no store and no running stack).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

import psycopg

from core.config import Settings
from tally.roots import read_run_state, require_pg

if TYPE_CHECKING:
    from tally.cli_support import SubParsers


def register(sub: SubParsers) -> None:
    """Add the subparser; it sets `func=handler(settings, args) -> exit code`."""
    p = sub.add_parser("migrate", help="migrate the PostgreSQL and ClickHouse schemas to this release",
                       description="Upgrade PostgreSQL (Alembic) and ClickHouse (versioned statements) to the "
                       "newest schema, and apply TALLY_RAW_RETENTION_DAYS as the raw events' TTL.")
    p.add_argument("--status", action="store_true", help="only show the current and newest versions")
    p.add_argument("--skip-clickhouse", action="store_true", help="migrate PostgreSQL only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--print-sql", action="store_true",
                   help="print the ClickHouse statements for the configured mode (one node, or the cluster "
                        "TALLY_CLICKHOUSE_CLUSTER) as they would run on an empty database; runs nothing")
    p.set_defaults(func=cmd_migrate)


def _fail(message: str) -> int:
    print(f"tally migrate: {message}", file=sys.stderr)
    return 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from oltp.schema import current_revisions, ensure_schema, head_revisions

    if args.print_sql:
        return _print_sql(settings, args)
    cluster = settings.clickhouse_cluster
    if cluster is not None and settings.clickhouse_dsn.startswith("chdb://") and not args.skip_clickhouse:
        print(f"tally migrate: TALLY_CLICKHOUSE_CLUSTER={cluster} needs TALLY_CLICKHOUSE_DSN to be a node of that "
              "cluster (http(s)://...); embedded chDB is one node (`tally migrate --print-sql` shows the statements)",
              file=sys.stderr)
        return 2
    dsn = require_pg(settings)
    out: dict[str, object] = {"postgresql": {}, "clickhouse": {}}
    try:
        before = current_revisions(dsn)
        if not args.status:
            ensure_schema(dsn)
        out["postgresql"] = {"before": list(before), "now": list(current_revisions(dsn)),
                             "head": list(head_revisions())}
    except psycopg.OperationalError as exc:
        return _fail(f"cannot reach PostgreSQL ({_first_line(exc)}); is `tally up` running, or TALLY_PG_DSN right?")
    except Exception as exc:
        return _fail(f"PostgreSQL migration failed: {_first_line(exc)}")
    out["clickhouse"] = _clickhouse(settings, args)
    ch = out["clickhouse"]
    if isinstance(ch, dict) and ch.get("error"):
        _print(out, args)
        return _fail(f"ClickHouse: {ch['error']}")
    _print(out, args)
    return 0


def _clickhouse(settings: Settings, args: argparse.Namespace) -> dict[str, object]:
    from olap import schema as ch_schema

    if args.skip_clickhouse:
        return {"skipped": "--skip-clickhouse"}
    cluster = settings.clickhouse_cluster
    if settings.clickhouse_dsn.startswith("chdb://") and read_run_state(settings.home):
        return {"skipped": "chDB is owned by the running `tally up`; it migrated it when it started"}
    latest = max(m.version for m in ch_schema.MIGRATIONS)
    try:
        from olap.client import connect

        client = connect(settings.clickhouse_dsn)
        db = settings.clickhouse_database
        before = sorted(ch_schema.applied_versions(client, db))
        applied: list[int] = []
        if not args.status:
            applied = ch_schema.ensure_schema(client, db, settings.raw_retention_days, cluster)
        ttl = ch_schema.events_ttl_days(client, db, cluster) if (not args.status or before) else None
        return {"before": max(before, default=None), "applied": applied, "head": latest, "ttl_days": ttl}
    except Exception as exc:
        return {"error": _first_line(exc)}


def _print_sql(settings: Settings, args: argparse.Namespace) -> int:
    """Print what the ClickHouse migrations would run on an empty database in the configured mode; run nothing."""
    from olap.schema import planned_statements

    cluster, db = settings.clickhouse_cluster, settings.clickhouse_database
    plan = planned_statements(db, settings.raw_retention_days, cluster)
    if args.json:
        print(json.dumps({"clickhouse": {"cluster": cluster, "database": db,
                                         "steps": [{"step": step, "statements": sts} for step, sts in plan]}}))
        return 0
    mode = f"cluster {cluster} (TALLY_CLICKHOUSE_CLUSTER)" if cluster else "one node (TALLY_CLICKHOUSE_CLUSTER unset)"
    print(f"-- tally migrate --print-sql: the ClickHouse statements for {mode}, database {db}, in order, as they\n"
          "-- would run on an empty database (a migrated one runs only the migrations it lacks). Nothing was run.")
    for step, statements in plan:
        print(f"\n-- {step}")
        for statement in statements:
            print(f"{statement};")
    return 0


def _print(out: dict[str, object], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(out))
        return
    pg = out["postgresql"]
    assert isinstance(pg, dict)
    def revs(key: str) -> str:
        return ", ".join(pg.get(key) or []) or "(none)"

    print(f"postgresql  revision {revs('now')} (was {revs('before')}, newest {revs('head')})")
    ch = out["clickhouse"]
    assert isinstance(ch, dict)
    if "skipped" in ch:
        print(f"clickhouse  skipped: {ch['skipped']}")
    elif "error" not in ch:
        ttl = ch.get("ttl_days")
        print(f"clickhouse  version {max([ch.get('before') or 0, *ch.get('applied', [])]) or '(none)'} "
              f"(applied now: {ch.get('applied') or 'nothing'}, newest {ch.get('head')}), "
              f"raw events TTL: {'none' if ttl == 0 else (f'{ttl} days' if ttl else '?')}")
